//! A private network for the local system: each process (the controller, each node, the
//! clients) in its own network namespace, joined by veth links to a bridge in a hub
//! namespace, so that faults are real ones on real links.
//!
//! ```text
//!   controller ─eth0═h0─┐
//!   worker-1   ─eth0═h1─┤ br0   (namespace <prefix>-hub, 10.213.0.0/24)
//!   worker-2   ─eth0═h2─┤
//!   clients    ─eth0═hN─┘
//! ```
//!
//! - Faults: a member cut off from everything (its hub-side link down), a one-way cut
//!   (a blackhole route in the sender's namespace: its packets to that address are
//!   dropped, the other direction still flows), a slow link (a token bucket on both ends:
//!   bounded rate and queueing delay), and healing all of it.
//! - Only namespaces this module created are touched, each named `hsmnet-<pid>-...`; the
//!   host's own interfaces never are. [`Network::remove`] (and a later `create` for a
//!   dead creator) deletes them: deleting a namespace deletes its links.
//! - What this kernel lacks is said, not faked: `netem` (random loss, jitter, duplication,
//!   reordering) is probed by [`Network::has_netem`].

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::LocalError;

const PREFIX: &str = "hsmnet-";
const NETNS_DIR: &str = "/run/netns";
/// The lab's subnet: private to its hub namespace, never routed from the host.
const SUBNET: [u8; 3] = [10, 213, 0];

/// One process's namespace on the private network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// What runs there: `controller`, `worker-1`, `clients`.
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Its link's name in the hub namespace.
    pub hub_link: String,
}

/// The namespaces of one local system, recorded in its state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub hub: String,
    pub members: Vec<Member>,
}

/// A link's impairment: a token bucket's rate and the most a packet waits in its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slow {
    pub rate_kbit: u32,
    pub queue_ms: u32,
}

impl Network {
    /// Namespaces for `members` (in this order), all joined on one bridge. Namespaces of
    /// earlier runs whose creator is gone are removed first.
    pub fn create(members: &[&str]) -> Result<Self, LocalError> {
        collect_leftovers();
        let tag = format!("{PREFIX}{}-{}", std::process::id(), unique());
        let hub = format!("{tag}-hub");
        let mut network = Network {
            hub: hub.clone(),
            members: Vec::new(),
        };
        // On any failure, what was made so far is removed.
        let built = (|| {
            ip(&["netns", "add", &hub])?;
            ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &hub, "link", "set", "br0", "up"])?;
            for (index, name) in members.iter().enumerate() {
                check_member_name(name)?;
                let member = Member {
                    name: (*name).into(),
                    netns: format!("{tag}-{index}"),
                    addr: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], index as u8 + 10),
                    hub_link: format!("h{index}"),
                };
                ip(&["netns", "add", &member.netns])?;
                network.members.push(member.clone());
                ip(&[
                    "-n",
                    &hub,
                    "link",
                    "add",
                    &member.hub_link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &member.netns,
                ])?;
                ip(&["-n", &hub, "link", "set", &member.hub_link, "master", "br0"])?;
                ip(&["-n", &hub, "link", "set", &member.hub_link, "up"])?;
                let cidr = format!("{}/24", member.addr);
                ip(&["-n", &member.netns, "addr", "add", &cidr, "dev", "eth0"])?;
                ip(&["-n", &member.netns, "link", "set", "eth0", "up"])?;
                ip(&["-n", &member.netns, "link", "set", "lo", "up"])?;
            }
            Ok::<_, LocalError>(())
        })();
        if let Err(e) = built {
            network.remove();
            return Err(e);
        }
        Ok(network)
    }

    pub fn member(&self, name: &str) -> Result<&Member, LocalError> {
        self.members.iter().find(|m| m.name == name).ok_or_else(|| {
            LocalError::Check(format!(
                "no member {name} on the private network (members: {})",
                self.members
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// `name`'s namespace file, for `nsenter --net=` or [`enter`].
    pub fn netns_path(&self, name: &str) -> Result<String, LocalError> {
        Ok(format!("{NETNS_DIR}/{}", self.member(name)?.netns))
    }

    /// `name` loses every link: nothing reaches it, it reaches nothing.
    pub fn isolate(&self, name: &str) -> Result<(), LocalError> {
        let member = self.member(name)?;
        ip(&["-n", &self.hub, "link", "set", &member.hub_link, "down"])
    }

    /// `name`'s link comes back.
    pub fn reconnect(&self, name: &str) -> Result<(), LocalError> {
        let member = self.member(name)?;
        ip(&["-n", &self.hub, "link", "set", &member.hub_link, "up"])
    }

    /// `from`'s packets to `to` are dropped (one way: `to` still reaches `from`, though a
    /// TCP connection needs both ways).
    pub fn cut(&self, from: &str, to: &str) -> Result<(), LocalError> {
        let (from, to) = (self.member(from)?, self.member(to)?);
        let target = format!("{}/32", to.addr);
        ip(&["-n", &from.netns, "route", "replace", "blackhole", &target])
    }

    /// Undoes [`Network::cut`].
    pub fn uncut(&self, from: &str, to: &str) -> Result<(), LocalError> {
        let (from, to) = (self.member(from)?, self.member(to)?);
        let target = format!("{}/32", to.addr);
        ip(&["-n", &from.netns, "route", "del", "blackhole", &target])
    }

    /// `name`'s link, both ways, limited to `slow`.
    pub fn slow(&self, name: &str, slow: Slow) -> Result<(), LocalError> {
        let (rate, latency) = (
            format!("{}kbit", slow.rate_kbit),
            format!("{}ms", slow.queue_ms),
        );
        self.root_qdisc(
            name,
            &["tbf", "rate", &rate, "burst", "16kb", "latency", &latency],
        )
    }

    /// `name`'s link, both ways, with `delay_ms` of latency and `loss_percent` random loss
    /// (`netem`; see [`Network::has_netem`] for whether this kernel has it).
    pub fn impair(&self, name: &str, delay_ms: u32, loss_percent: u32) -> Result<(), LocalError> {
        let (delay, loss) = (format!("{delay_ms}ms"), format!("{loss_percent}%"));
        self.root_qdisc(name, &["netem", "delay", &delay, "loss", &loss])
            .map_err(|e| {
                LocalError::Check(format!(
                    "{e} (this kernel may lack netem: use `local fault slow` for a bounded rate \
                     and queueing delay)"
                ))
            })
    }

    /// Sets `qdisc` as the root queue of both ends of `name`'s link (its own `eth0` and
    /// its port on the hub), so both directions carry the impairment.
    fn root_qdisc(&self, name: &str, qdisc: &[&str]) -> Result<(), LocalError> {
        let member = self.member(name)?;
        for (netns, dev) in [
            (member.netns.as_str(), "eth0"),
            (self.hub.as_str(), member.hub_link.as_str()),
        ] {
            let mut args = vec!["-n", netns, "qdisc", "replace", "dev", dev, "root"];
            args.extend_from_slice(qdisc);
            run("tc", &args)?;
        }
        Ok(())
    }

    /// Every fault undone: links up, cuts removed, rates unlimited.
    pub fn heal(&self) -> Result<(), LocalError> {
        for member in &self.members {
            ip(&["-n", &self.hub, "link", "set", &member.hub_link, "up"])?;
            // Flushing an empty set of routes is not an error.
            ip(&["-n", &member.netns, "route", "flush", "type", "blackhole"])?;
            for (netns, dev) in [
                (member.netns.as_str(), "eth0"),
                (self.hub.as_str(), member.hub_link.as_str()),
            ] {
                // No qdisc to delete is the usual case.
                let _ = run("tc", &["-n", netns, "qdisc", "del", "dev", dev, "root"]);
            }
        }
        Ok(())
    }

    /// Deletes every namespace (and with them their links). Idempotent.
    pub fn remove(&self) {
        for netns in self
            .members
            .iter()
            .map(|m| m.netns.as_str())
            .chain([self.hub.as_str()])
        {
            if Path::new(NETNS_DIR).join(netns).exists()
                && let Err(error) = ip(&["netns", "del", netns])
            {
                tracing::warn!(%error, netns, "cannot delete a network namespace");
            }
        }
    }

    /// Whether this kernel has `netem` (random loss, delay jitter, duplication,
    /// reordering), tried on a throwaway namespace.
    pub fn has_netem() -> bool {
        let probe = format!("{PREFIX}{}-{}-probe", std::process::id(), unique());
        if ip(&["netns", "add", &probe]).is_err() {
            return false;
        }
        let ok = run(
            "tc",
            &[
                "-n", &probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
            ],
        )
        .is_ok();
        let _ = ip(&["netns", "del", &probe]);
        ok
    }
}

/// Moves the calling thread into `netns_path`'s network: every socket it opens from now
/// on (and every thread it starts) is on that network. For a client thread with its own
/// runtime.
pub fn enter(netns_path: &str) -> Result<(), LocalError> {
    let file =
        std::fs::File::open(netns_path).map_err(|e| LocalError::io("open", netns_path, e))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        LocalError::Check(format!(
            "cannot enter the network namespace {netns_path}: {e} (this needs root)"
        ))
    })
}

/// Runs `future` to its end on a thread of its own inside `netns_path`'s network (a
/// runtime of its own there), for a caller outside it.
pub fn block_on_in<T: Send>(
    netns_path: &str,
    future: impl std::future::Future<Output = T> + Send,
) -> Result<T, LocalError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(netns_path)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| LocalError::Check(format!("start a runtime: {e}")))?;
                Ok(runtime.block_on(future))
            })
            .join()
            .unwrap_or_else(|_| Err(LocalError::Check("the client thread panicked".into())))
    })
}

/// Whether this process can make network namespaces (root with CAP_SYS_ADMIN and
/// iproute2): tried, not guessed.
pub fn can_create() -> Result<(), LocalError> {
    let probe = format!("{PREFIX}{}-{}-probe", std::process::id(), unique());
    ip(&["netns", "add", &probe])?;
    ip(&["netns", "del", &probe])
}

fn check_member_name(name: &str) -> Result<(), LocalError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    match ok {
        true => Ok(()),
        false => Err(LocalError::Check(format!(
            "network member {name:?}: use 1-32 lowercase letters, digits or '-'"
        ))),
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Deletes the namespaces of labs (`hsmnet-<pid>-<n>-...`) whose creating process is gone
/// and in which no process runs any more: what a killed run left. A system that `local
/// up` started outlives its creator, but its processes keep its namespaces.
fn collect_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let mut labs: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.strip_prefix(PREFIX).unwrap_or_default().splitn(3, '-');
        let (Some(pid), Some(run)) = (parts.next(), parts.next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() {
            labs.entry(format!("{PREFIX}{pid}-{run}"))
                .or_default()
                .push(name);
        }
    }
    for (tag, namespaces) in labs {
        let pid = tag
            .trim_start_matches(PREFIX)
            .split('-')
            .next()
            .unwrap_or("");
        let creator_alive = Path::new(&format!("/proc/{pid}")).exists();
        let occupied = namespaces.iter().any(|netns| {
            Command::new("ip")
                .args(["netns", "pids", netns])
                .output()
                .map(|out| !out.stdout.is_empty() || !out.status.success())
                .unwrap_or(true)
        });
        if creator_alive || occupied {
            continue;
        }
        for netns in namespaces {
            tracing::info!(%netns, "removing a network namespace left by a run that is gone");
            let _ = ip(&["netns", "del", &netns]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), LocalError> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), LocalError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| LocalError::Spawn {
            process: program.into(),
            detail: format!("{e} (install iproute2)"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(LocalError::Check(format!(
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
