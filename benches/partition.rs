//! Failover under real network faults: a local system with each process in its own
//! network namespace (`local up --isolated-network`), faults set with `local fault`.
//!
//! - Per scenario, five rounds: from the fault to the first write a new primary
//!   acknowledges (a client writing every 20 ms from its own namespace), median, min and
//!   max, and the ratio to a pause of the primary's process (SIGSTOP: the same detection
//!   path with no network involved), measured side by side in the same run. The client
//!   gives each write 250 ms, so one stuck on an unreachable old primary does not hide
//!   the moment the new one takes writes. Also: from healing to every node healthy and
//!   caught up again (the old primary back as a mirror).
//! - False failovers: 60 s of writes with the primary's link slowed (256 kbit/s, up to
//!   300 ms queueing), and with 300 ms latency and 5 % loss when the kernel has netem;
//!   the target is 0.
//!
//! Run: `cargo bench --bench partition` (root, softhsm2, iproute2). `HSM_BENCH_ROUNDS`
//! and `HSM_BENCH_FALSE_SECONDS` shorten it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hsm_secrets::crd::HSMDeviceStatus;
use hsm_secrets::hsm::{Expect, SecretData};
use hsm_secrets::local::{StateFile, network, system};
use hsm_secrets::state::FileState;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn local(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .arg("local")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "local {args:?}: {text}");
    text
}

#[derive(Clone, Copy, Debug)]
enum Scenario {
    PausePrimary,
    IsolatePrimary,
    PrimaryControllerPartition,
    ControllerToPrimaryOneWay,
}

fn main() {
    if let Err(e) = network::can_create() {
        eprintln!("partition bench: cannot create network namespaces: {e}");
        std::process::exit(1);
    }
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("system");
    local(&dir, &["up", "--isolated-network"]);
    let state = StateFile::load(&dir).unwrap();
    let clients = state
        .network
        .as_ref()
        .unwrap()
        .netns_path("clients")
        .unwrap();
    // Every thread from here on (the runtime's too) speaks from the clients' namespace.
    network::enter(&clients).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(run(&dir, &state))
    }));
    local(&dir, &["down"]);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn status(state: &StateFile) -> HSMDeviceStatus {
    let files = FileState::open(&state.state_dir).unwrap();
    system::device_status(&files, &state.device).await.unwrap()
}

/// One write to the current primary, given up after `timeout`; the node that took it.
async fn write(state: &StateFile, n: u64, timeout: Duration) -> Option<String> {
    let (node, epoch, conn) = system::primary(state).await.ok()?;
    let mut data = SecretData::new();
    data.insert("n", n.to_string().into_bytes()).unwrap();
    let path = format!("shop/bench-{n}").parse().unwrap();
    tokio::time::timeout(timeout, conn.put(&path, &data, Expect::Any, epoch))
        .await
        .ok()?
        .ok()
        .map(|_| node)
}

async fn healed(state: &StateFile) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(state).await;
        let healthy = s.nodes.iter().all(|n| {
            n.health == hsm_secrets::crd::NodeHealth::Healthy && n.consecutive_failures == 0
        });
        if healthy && s.mirrors.as_deref() == Some("2/2") {
            return;
        }
        assert!(Instant::now() < deadline, "no recovery within 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (fault → a new primary's first write, heal → every node healthy and caught up)
async fn failover_round(
    dir: &Path,
    state: &StateFile,
    scenario: Scenario,
    n: &mut u64,
) -> (Duration, Duration) {
    healed(state).await;
    let primary = status(state).await.primary_node.unwrap();
    let start = Instant::now();
    match scenario {
        Scenario::PausePrimary => local(dir, &["fault", "pause", &primary]),
        Scenario::IsolatePrimary => local(dir, &["fault", "isolate", &primary]),
        Scenario::PrimaryControllerPartition => {
            local(dir, &["fault", "cut", "controller", &primary, "--both"])
        }
        Scenario::ControllerToPrimaryOneWay => {
            local(dir, &["fault", "cut", "controller", &primary])
        }
    };
    let elapsed = loop {
        *n += 1;
        // A short timeout: a write stuck on an unreachable old primary must not hide the
        // moment the new one takes writes.
        if let Some(node) = write(state, *n, Duration::from_millis(250)).await
            && node != primary
        {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{scenario:?}: no new primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let heal = Instant::now();
    local(dir, &["fault", "heal"]);
    if matches!(scenario, Scenario::PausePrimary) {
        local(dir, &["fault", "resume", &primary]);
    }
    healed(state).await;
    (elapsed, heal.elapsed())
}

/// Failovers while writes go on for `seconds` with the primary's link impaired by `args`.
async fn false_failovers(
    dir: &Path,
    state: &StateFile,
    args: &[&str],
    seconds: u64,
    n: &mut u64,
) -> (u64, u64, u64) {
    healed(state).await;
    let before = status(state).await.failover_count;
    let primary = status(state).await.primary_node.unwrap();
    let mut all = vec!["fault"];
    all.extend(
        args.iter()
            .map(|a| if *a == "PRIMARY" { primary.as_str() } else { a }),
    );
    local(dir, &all);
    let (mut acked, mut refused) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(seconds) {
        *n += 1;
        // Generous: a slowed link answers late, and that is not a failure.
        match write(state, *n, Duration::from_secs(2)).await {
            Some(_) => acked += 1,
            None => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    local(dir, &["fault", "heal"]);
    (status(state).await.failover_count - before, acked, refused)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn run(dir: &Path, state: &StateFile) {
    let rounds = env_or("HSM_BENCH_ROUNDS", 5) as usize;
    let seconds = env_or("HSM_BENCH_FALSE_SECONDS", 60);
    let mut n = 0u64;
    let mut rows = Vec::new();
    for scenario in [
        Scenario::PausePrimary,
        Scenario::IsolatePrimary,
        Scenario::PrimaryControllerPartition,
        Scenario::ControllerToPrimaryOneWay,
    ] {
        let (mut times, mut recoveries) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (failover, recovery) = failover_round(dir, state, scenario, &mut n).await;
            times.push(failover);
            recoveries.push(recovery);
        }
        rows.push((scenario, times, recoveries));
    }
    let floor = median(rows[0].1.clone());
    println!(
        "\nfault → first write acknowledged by a new primary ({rounds} rounds; local timing: 300 ms probes, threshold 3, 1.5 s write lease + 0.5 s margin)"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10} {:>16}",
        "scenario", "median", "min", "max", "vs pause", "heal → healthy"
    );
    for (scenario, times, recoveries) in &rows {
        let m = median(times.clone());
        println!(
            "{:<30} {:>10.2?} {:>10.2?} {:>10.2?} {:>9.2}x {:>16.2?}",
            format!("{scenario:?}"),
            m,
            times.iter().min().unwrap(),
            times.iter().max().unwrap(),
            m.as_secs_f64() / floor.as_secs_f64(),
            median(recoveries.clone())
        );
    }
    println!(
        "\nfalse failovers while writing for {seconds} s with the primary's link impaired (target 0)"
    );
    println!(
        "{:<44} {:>10} {:>8} {:>8}",
        "impairment", "failovers", "acked", "refused"
    );
    let (f, a, r) = false_failovers(
        dir,
        state,
        &["slow", "PRIMARY", "--rate-kbit", "256", "--queue-ms", "300"],
        seconds,
        &mut n,
    )
    .await;
    println!(
        "{:<44} {:>10} {:>8} {:>8}",
        "tbf 256 kbit/s, 300 ms queue", f, a, r
    );
    if network::Network::has_netem() {
        let (f, a, r) = false_failovers(
            dir,
            state,
            &[
                "impair",
                "PRIMARY",
                "--delay-ms",
                "300",
                "--loss-percent",
                "5",
            ],
            seconds,
            &mut n,
        )
        .await;
        println!(
            "{:<44} {:>10} {:>8} {:>8}",
            "netem 300 ms, 5 % loss", f, a, r
        );
    } else {
        println!(
            "{:<44} {:>10}",
            "netem 300 ms, 5 % loss", "not in this kernel (tc qdisc netem unknown)"
        );
    }
}
