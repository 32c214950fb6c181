//! Mirroring benchmark: agents over SoftHSM2 tokens, gRPC with mutual TLS on loopback.
//!
//! - initial sync of N secrets (default 10,000) onto an empty mirror, against the floor
//!   of copying the same records token to token in-process (read + apply, no network);
//! - a pull with nothing new at 100 vs N secrets (interleaved; target ratio <= 1.2);
//! - a pull of 10 changes among N, against the floor of 10 reads + 10 applies in-process;
//! - write latency under the Active policy (one synchronous mirror) vs ReadOnly
//!   (asynchronous), interleaved, median and p99.
//!
//! Run: `cargo bench --bench mirror` (needs softhsm2). Env: BENCH_SECRETS (default
//! 10000), BENCH_SAMPLES (default 200).
//!
//! On SoftHSM's file backend, overwriting a secret on a large token is dominated by the
//! token itself (destroying the old generation makes SoftHSM rescan and stat the whole
//! token directory, 40,000 files at 10,000 secrets), which the floor of the "10 changes"
//! row pays too.

use hsm_secrets_testkit as kit;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_secrets::hsm::{Expect, Pkcs11Config, Pkcs11Store, SecretData, SecretPath, SecretStore};
use hsm_secrets::mirror::{
    Agent, AgentConfig, AgentConnection, AgentTls, GeneratedPki, Peer, SyncSettings, bind,
    generate_pki, pb, serve,
};

const HOUR_MS: u64 = 3_600_000;

fn main() {
    let dir = kit::bench::private_softhsm_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(dir));
}

struct Bench {
    lib: PathBuf,
    pin_file: PathBuf,
    pki: GeneratedPki,
}

struct Node {
    agent: Agent,
    store: Arc<dyn SecretStore>,
    peer: Peer,
}

impl Bench {
    async fn open(&self, label: &str) -> Arc<dyn SecretStore> {
        Arc::new(
            Pkcs11Store::open(Pkcs11Config::new(&self.lib, label, &self.pin_file))
                .await
                .expect("open token"),
        )
    }

    fn tls(&self, node: &str) -> AgentTls {
        AgentTls::from_files(self.pki.files(node).expect("certs")).expect("tls")
    }

    async fn node(&self, name: &str, store: Arc<dyn SecretStore>) -> Node {
        let mut cfg = AgentConfig::new(name, self.tls(name));
        cfg.sync = SyncSettings {
            pull_interval: Duration::from_secs(3600),
            sync_interval: Duration::from_secs(3600),
            ..SyncSettings::default()
        };
        let agent = Agent::start(cfg, store.clone()).await;
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let peer = Peer {
            node: name.into(),
            endpoint: format!("https://{}", listener.local_addr().expect("addr")),
        };
        tokio::spawn(serve(agent.clone(), listener, std::future::pending()));
        Node { agent, store, peer }
    }

    fn controller(&self, peer: &Peer) -> AgentConnection {
        AgentConnection::new(peer, &self.tls("controller"), Duration::from_secs(600))
            .expect("client")
    }

    async fn primary(&self, node: &Node, mirrors: &[&Node]) {
        self.controller(&node.peer)
            .assign_role(pb::AssignRoleRequest {
                role: pb::Role::Primary as i32,
                epoch: 1,
                lease_duration_ms: HOUR_MS,
                mirrors: mirrors
                    .iter()
                    .map(|m| pb::MirrorTarget {
                        node: m.peer.node.clone(),
                        endpoint: m.peer.endpoint.clone(),
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("assign primary");
    }

    async fn mirror(&self, node: &Node, primary: &Node) {
        self.controller(&node.peer)
            .assign_role(pb::AssignRoleRequest {
                role: pb::Role::ReadOnly as i32,
                epoch: 1,
                primary_node: primary.peer.node.clone(),
                primary_endpoint: primary.peer.endpoint.clone(),
                ..Default::default()
            })
            .await
            .expect("assign mirror");
    }
}

fn secret(i: usize) -> (SecretPath, SecretData) {
    let mut d = SecretData::new();
    d.insert("value", format!("secret-{i:08}").into_bytes())
        .expect("insert");
    let p: SecretPath = format!("ns{}/s{i}", i % 10).parse().expect("path");
    (p, d)
}

async fn fill(store: &dyn SecretStore, count: usize) {
    for i in 0..count {
        let (p, d) = secret(i);
        store.put(&p, d, Expect::Absent).await.expect("fill");
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v[((v.len() * 99) / 100).min(v.len() - 1)]
}

struct Row {
    name: String,
    ours: String,
    floor_name: &'static str,
    floor: String,
    ratio: f64,
    target: &'static str,
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

async fn run(dir: PathBuf) {
    let count = kit::bench::env_usize("BENCH_SECRETS", 10_000);
    let samples = kit::bench::env_usize("BENCH_SAMPLES", 200);
    let labels = [
        "big-p",
        "big-m",
        "big-floor",
        "small-p",
        "small-m",
        "act-p",
        "act-m",
        "ro-p",
        "ro-m",
    ];
    for l in labels {
        kit::bench::init_token(l);
    }
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, kit::softhsm::USER_PIN).expect("pin");
    let pki = generate_pki(
        &dir.join("pki"),
        &[
            "big-p",
            "big-m",
            "small-p",
            "small-m",
            "act-p",
            "act-m",
            "ro-p",
            "ro-m",
            "controller",
        ],
    )
    .expect("pki");
    let b = Bench {
        lib: kit::bench::library(),
        pin_file,
        pki,
    };
    let mut rows = Vec::new();

    // --- fill the large primary directly (not part of any measurement)
    let big_p_store = b.open("big-p").await;
    let t = Instant::now();
    fill(big_p_store.as_ref(), count).await;
    let fill_time = t.elapsed();
    eprintln!("filled {count} secrets in {fill_time:.1?}");
    let small_p_store = b.open("small-p").await;
    fill(small_p_store.as_ref(), 100).await;

    let big_p = b.node("big-p", big_p_store.clone()).await;
    let small_p = b.node("small-p", small_p_store).await;
    b.primary(&big_p, &[]).await;
    b.primary(&small_p, &[]).await;

    // --- initial sync of `count` secrets onto an empty mirror
    let big_m = b.node("big-m", b.open("big-m").await).await;
    let t = Instant::now();
    b.mirror(&big_m, &big_p).await;
    let report = first_pass(&big_m.agent).await;
    let initial = t.elapsed();
    assert_eq!(report.fetched as usize, count, "{report:?}");
    // Floor: the same records read from the primary token and applied to another token
    // in-process, sequentially (no network, no agent).
    let floor_store = b.open("big-floor").await;
    let t = Instant::now();
    for e in big_p_store.manifest().await.expect("manifest") {
        let r = big_p_store.record(&e.path).await.expect("read");
        floor_store.apply(r).await.expect("apply");
    }
    let copy_floor = t.elapsed();
    rows.push(Row {
        name: format!("initial sync, {count} secrets"),
        ours: format!(
            "{:.1?} ({:.0} secrets/s)",
            initial,
            count as f64 / initial.as_secs_f64()
        ),
        floor_name: "in-process read+apply",
        floor: format!(
            "{:.1?} ({:.0} secrets/s)",
            copy_floor,
            count as f64 / copy_floor.as_secs_f64()
        ),
        ratio: initial.as_secs_f64() / copy_floor.as_secs_f64(),
        target: "-",
    });

    // --- a pull with nothing new: 100 vs `count` secrets, interleaved
    let small_m = b.node("small-m", b.open("small-m").await).await;
    b.mirror(&small_m, &small_p).await;
    first_pass(&small_m.agent).await;
    let health = b.controller(&big_p.peer);
    let (mut small, mut big, mut rtt) = (vec![], vec![], vec![]);
    for _ in 0..samples.max(50) {
        let t = Instant::now();
        let r = small_m.agent.pull_now().await.expect("pull small");
        small.push(t.elapsed());
        assert_eq!(r.applied, 0);
        let t = Instant::now();
        let r = big_m.agent.pull_now().await.expect("pull big");
        big.push(t.elapsed());
        assert_eq!((r.applied, r.calls), (0, 1));
        let t = Instant::now();
        health
            .changes(&hsm_secrets::mirror::ChangesAsk {
                since: u64::MAX,
                ..Default::default()
            })
            .await
            .expect("rpc");
        rtt.push(t.elapsed());
    }
    let (s, g, f) = (median(&mut small), median(&mut big), median(&mut rtt));
    rows.push(Row {
        name: format!("no-change pull, {count} secrets (vs 100)"),
        ours: ms(g),
        floor_name: "same pull at 100 secrets",
        floor: ms(s),
        ratio: g.as_secs_f64() / s.as_secs_f64(),
        target: "<= 1.2x",
    });
    rows.push(Row {
        name: format!("no-change pull, {count} secrets (vs bare RPC)"),
        ours: ms(g),
        floor_name: "one Changes RPC from a client",
        floor: ms(f),
        ratio: g.as_secs_f64() / f.as_secs_f64(),
        target: "-",
    });

    // --- 10 changes among `count`, against 10 in-process reads + applies
    let primary_client = b.controller(&big_p.peer);
    let (mut ours, mut floor) = (vec![], vec![]);
    let rounds = (samples / 10).max(10);
    for round in 0..rounds {
        let mut changed = Vec::new();
        for k in 0..10 {
            let i = (round * 977 + k * 1013) % count;
            let (p, mut d) = secret(i);
            d.insert("round", round.to_string().into_bytes())
                .expect("insert");
            primary_client
                .put(&p, &d, Expect::Any, 1)
                .await
                .expect("change");
            changed.push(p);
        }
        let t = Instant::now();
        let r = big_m.agent.pull_now().await.expect("pull changes");
        ours.push(t.elapsed());
        assert_eq!(r.applied, 10, "{r:?}");
        let t = Instant::now();
        for p in &changed {
            let r = big_p_store.record(p).await.expect("read");
            floor_store.apply(r).await.expect("apply");
        }
        floor.push(t.elapsed());
    }
    let (o, f) = (median(&mut ours), median(&mut floor));
    rows.push(Row {
        name: format!("pull of 10 changes among {count}"),
        ours: ms(o),
        floor_name: "10 in-process read+apply",
        floor: ms(f),
        ratio: o.as_secs_f64() / f.as_secs_f64(),
        target: "-",
    });

    // --- write latency: Active (one synchronous mirror) vs ReadOnly, interleaved
    let act_m = b.node("act-m", b.open("act-m").await).await;
    let act_p = b.node("act-p", b.open("act-p").await).await;
    let ro_m = b.node("ro-m", b.open("ro-m").await).await;
    let ro_p = b.node("ro-p", b.open("ro-p").await).await;
    b.mirror(&act_m, &act_p).await;
    b.primary(&act_p, &[&act_m]).await;
    b.mirror(&ro_m, &ro_p).await;
    b.primary(&ro_p, &[]).await;
    let (act, ro) = (b.controller(&act_p.peer), b.controller(&ro_p.peer));
    let (mut a, mut r) = (vec![], vec![]);
    for i in 0..samples {
        let (p, d) = secret(i % 50);
        let t = Instant::now();
        let w = act.put(&p, &d, Expect::Any, 1).await.expect("active write");
        a.push(t.elapsed());
        assert_eq!(w.replicated_to, ["act-m"], "{w:?}");
        let t = Instant::now();
        ro.put(&p, &d, Expect::Any, 1)
            .await
            .expect("read-only write");
        r.push(t.elapsed());
    }
    let (am, rm) = (median(&mut a), median(&mut r));
    let (ap, rp) = (p99(&mut a), p99(&mut r));
    rows.push(Row {
        name: "write, Active policy (median)".into(),
        ours: ms(am),
        floor_name: "write, ReadOnly policy",
        floor: ms(rm),
        ratio: am.as_secs_f64() / rm.as_secs_f64(),
        target: "-",
    });
    rows.push(Row {
        name: "write, Active policy (p99)".into(),
        ours: ms(ap),
        floor_name: "write, ReadOnly policy",
        floor: ms(rp),
        ratio: ap.as_secs_f64() / rp.as_secs_f64(),
        target: "-",
    });
    // The Active mirror already holds every write; the ReadOnly one catches up by pulling.
    ro_m.agent.pull_now().await.expect("catch up");
    assert_eq!(
        act_m.store.manifest().await.expect("manifest"),
        act_p.store.manifest().await.expect("manifest")
    );

    println!();
    println!("| measurement | hsm-secrets | floor | floor value | ratio | target |");
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2}x | {} |",
            r.name, r.ours, r.floor_name, r.floor, r.ratio, r.target
        );
    }
    println!();
    println!(
        "samples: {samples} per latency row ({rounds} rounds of 10 changes); the primary was filled with {count} secrets in {fill_time:.1?} ({:.0} puts/s, direct store writes)",
        count as f64 / fill_time.as_secs_f64()
    );
    let stats = big_p.agent.stats();
    println!(
        "large primary answered {} Changes calls, {} of them from the change index alone",
        stats.changes_calls, stats.changes_answered_from_index
    );
}

/// Waits for the mirror's first full pass, which its engine starts on assignment.
async fn first_pass(agent: &Agent) -> hsm_secrets::mirror::FullPassReport {
    loop {
        if let Some(report) = agent.sync_state().last_full_pass {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
