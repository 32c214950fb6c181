//! The whole failover path as separate processes: three `hsm-secrets agent` processes on
//! their own SoftHSM tokens and one `hsm-secrets controller` on the file-backed state.
//! The primary is killed with SIGKILL; the controller promotes a mirror once the old
//! write lease has lapsed, and the new primary serves every acknowledged write — under
//! `Active` even writes acknowledged the instant before the kill, while the mirrors keep
//! answering reads throughout.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hsm_secrets::crd::{DevicePhase, HSMDevice, HSMDeviceStatus, MirroringPolicy};
use hsm_secrets::hsm::Expect;
use hsm_secrets::mirror::AgentConnection;
use hsm_secrets::state::{FileState, StateStore};
use kit::mirror::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(120);

async fn status(state: &FileState) -> HSMDeviceStatus {
    state
        .get_device("prod-hsm")
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Three agent processes and a controller process on a file-backed state directory,
/// bootstrapped with n1 primary and both mirrors ready.
struct Processes {
    pki: Pki,
    agents: Vec<AgentProcess>,
    state: FileState,
    _dir: tempfile::TempDir,
    _controller: tokio::process::Child,
    bootstrap: HSMDeviceStatus,
}

impl Processes {
    async fn start(labels: [&str; 3], policy: MirroringPolicy) -> Option<Self> {
        let tokens = Tokens::new();
        tokens.get(labels[0])?;
        let pki = Pki::new(&["n1", "n2", "n3"]);
        let mut agents = Vec::new();
        for (node, label) in ["n1", "n2", "n3"].into_iter().zip(labels) {
            agents.push(spawn_agent_process(&tokens, &pki, node, label).await);
        }
        let dir = tempfile::tempdir().unwrap();
        let state = FileState::open(dir.path()).unwrap();
        let mut device: HSMDevice = kit::resources::device("prod-hsm")
            .mirrored(Some("n1"), &["n2", "n3"])
            .sync_interval(300)
            .auto_failover(3)
            .build();
        if let Some(m) = device.spec.mirroring.as_mut() {
            m.policy = policy;
        }
        state.apply_device(&device).unwrap();
        let controller =
            spawn_controller_process(&pki, dir.path(), &agents.iter().collect::<Vec<_>>(), "warn");
        let bootstrap = wait_for(WAIT, "bootstrap", || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let s = status(&state).await;
            (s.primary_node.as_deref() == Some("n1")
                && s.phase == DevicePhase::Ready
                && s.mirrors.as_deref() == Some("2/2"))
            .then_some(s)
        })
        .await;
        Some(Self {
            pki,
            agents,
            state,
            _dir: dir,
            _controller: controller,
            bootstrap,
        })
    }

    fn client(&self, node: &str) -> AgentConnection {
        let agent = self.agents.iter().find(|a| a.peer.node == node).unwrap();
        self.pki.controller(&agent.peer)
    }

    async fn sigkill(&mut self, node: &str) {
        let agent = self
            .agents
            .iter_mut()
            .find(|a| a.peer.node == node)
            .unwrap();
        kill(
            Pid::from_raw(agent.child.id().unwrap() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
        agent.child.wait().await.unwrap();
    }

    /// Waits until a node other than `old` is primary in status and accepts a write.
    async fn writable_new_primary(&self, old: &str) -> (String, u64) {
        wait_for(WAIT, "a writable new primary", || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let s = status(&self.state).await;
            let node = s.primary_node.filter(|p| p != old)?;
            self.client(&node)
                .put(
                    &path("shop/after"),
                    &data(&[("v", b"x")]),
                    Expect::Any,
                    s.epoch,
                )
                .await
                .ok()?;
            Some((node, s.epoch))
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_primary_process_fails_over_to_a_caught_up_mirror() {
    let Some(mut p) =
        Processes::start(["cp-n1", "cp-n2", "cp-n3"], MirroringPolicy::ReadOnly).await
    else {
        return;
    };
    let st = p.bootstrap.clone();
    let primary = p.client("n1");
    for i in 0..10 {
        primary
            .put(
                &path(&format!("shop/s{i}")),
                &data(&[("v", format!("{i}").as_bytes())]),
                Expect::Any,
                st.epoch,
            )
            .await
            .unwrap();
    }
    let head = primary.health().await.unwrap().applied_sequence;
    for node in ["n2", "n3"] {
        let c = p.client(node);
        wait_for(WAIT, "mirror caught up", || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            (c.health().await.ok()?.applied_sequence >= head).then_some(())
        })
        .await;
    }

    p.sigkill("n1").await;
    let killed = Instant::now();
    let (new_primary, epoch) = p.writable_new_primary("n1").await;
    eprintln!("SIGKILL to a writable new primary: {:?}", killed.elapsed());
    assert_eq!(epoch, st.epoch + 1);

    let conn = p.client(&new_primary);
    for i in 0..10 {
        let got = conn.get(&path(&format!("shop/s{i}"))).await.unwrap();
        assert_eq!(
            kit::mirror::only_value(&got.record),
            Some(format!("{i}").into_bytes()),
            "acknowledged write shop/s{i} survived"
        );
    }
    let reasons: Vec<String> = p
        .state
        .events()
        .unwrap()
        .into_iter()
        .map(|e| e.event.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "HSMFailover"), "{reasons:?}");
    assert_eq!(status(&p.state).await.failover_count, 1);
}

/// Under `Active` a write is acknowledged only once every in-sync mirror applied it, so
/// a primary killed in the middle of a stream of writes loses none that it acknowledged:
/// nothing here waits for the mirrors to catch up. Meanwhile a reader keeps reading
/// from both mirrors, before, during and after the failover, without one error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_active_every_write_acknowledged_before_the_sigkill_is_on_the_new_primary() {
    let Some(mut p) = Processes::start(["ca-n1", "ca-n2", "ca-n3"], MirroringPolicy::Active).await
    else {
        return;
    };
    let epoch = p.bootstrap.epoch;
    let seed = path("shop/seed");
    p.client("n1")
        .put(&seed, &data(&[("v", b"seed")]), Expect::Any, epoch)
        .await
        .unwrap();

    // Reads from the mirrors, every 20 ms, until the end of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for node in ["n2", "n3"] {
        let (conn, stop, reads, seed) = (p.client(node), stop.clone(), reads.clone(), seed.clone());
        readers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match conn.get(&seed).await {
                    Ok(got) if !got.record.is_deleted() => {}
                    Ok(_) => errors.push("no record".to_string()),
                    Err(e) => errors.push(e.to_string()),
                }
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        }));
    }

    // A stream of writes; the primary is killed while it runs.
    let writer = {
        let conn = p.client("n1");
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..10_000u32 {
                let at = path(&format!("shop/w{i}"));
                match conn
                    .put(
                        &at,
                        &data(&[("v", i.to_string().as_bytes())]),
                        Expect::Any,
                        epoch,
                    )
                    .await
                {
                    Ok(_) => acknowledged.push(i),
                    Err(_) => break,
                }
            }
            acknowledged
        })
    };
    wait_for(WAIT, "writes flowing", || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (p.client("n2").health().await.ok()?.applied_sequence > 25).then_some(())
    })
    .await;
    p.sigkill("n1").await;
    let acknowledged = writer.await.unwrap();
    assert!(acknowledged.len() >= 20, "{} writes", acknowledged.len());

    let (new_primary, new_epoch) = p.writable_new_primary("n1").await;
    assert_eq!(new_epoch, epoch + 1);
    let conn = p.client(&new_primary);
    for i in &acknowledged {
        let got = conn.get(&path(&format!("shop/w{i}"))).await.unwrap();
        assert_eq!(
            kit::mirror::only_value(&got.record),
            Some(i.to_string().into_bytes()),
            "acknowledged write shop/w{i} lost"
        );
    }
    let s = status(&p.state).await;
    assert!(
        s.nodes.iter().all(|n| n.lost_writes.is_none()),
        "Active lost nothing: {:?}",
        s.nodes
    );

    // Reads went on through the failover: a few more rounds on the new layout, then stop.
    let before = reads.load(Ordering::Relaxed);
    wait_for(WAIT, "reads after the failover", || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (reads.load(Ordering::Relaxed) > before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let errors = reader.await.unwrap();
        assert!(errors.is_empty(), "mirror reads failed: {errors:?}");
    }
}

/// Under `Active` a mirror that stops applying pushes holds writes back (they are not
/// acknowledged) only until the controller has recorded it outside the write set in
/// HSMDevice status and said so with a renewal; writes then go on with the other mirror,
/// and the stopped mirror comes back into the set by itself once it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_active_a_stopped_mirror_leaves_the_write_set_through_the_status_first() {
    let Some(p) = Processes::start(["cs-n1", "cs-n2", "cs-n3"], MirroringPolicy::Active).await
    else {
        return;
    };
    let epoch = p.bootstrap.epoch;
    let primary = p.client("n1");
    let n3 = p.agents.iter().find(|a| a.peer.node == "n3").unwrap();
    let n3_pid = Pid::from_raw(n3.child.id().unwrap() as i32);
    kill(n3_pid, Signal::SIGSTOP).unwrap();

    let put = |i: u32| {
        let primary = primary.clone();
        async move {
            primary
                .put(
                    &path(&format!("shop/k{i}")),
                    &data(&[("v", i.to_string().as_bytes())]),
                    Expect::Any,
                    epoch,
                )
                .await
        }
    };
    let err = put(0).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("mirror(s) n3 of the Active write set did not apply it"),
        "{err}"
    );
    // Acknowledged again once the status shows n3 outside the write set.
    let mut i = 1;
    let w = wait_for(WAIT, "writes acknowledged without n3", || {
        i += 1;
        let attempt = put(i);
        async move { attempt.await.ok() }
    })
    .await;
    assert_eq!(w.replicated_to, ["n2"]);
    let s = status(&p.state).await;
    let entry = |s: &HSMDeviceStatus, node: &str| {
        s.nodes
            .iter()
            .find(|n| n.node == node)
            .unwrap()
            .outside_write_set
    };
    assert!(entry(&s, "n3"), "{:?}", s.nodes);
    assert!(!entry(&s, "n2"));

    // n3 resumes, catches up by pulling, rejoins; the mark goes and writes wait for it.
    kill(n3_pid, Signal::SIGCONT).unwrap();
    wait_for(WAIT, "n3 back in the write set", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = status(&p.state).await;
        (!entry(&s, "n3")).then_some(())
    })
    .await;
    let w = put(1_000).await.unwrap();
    let mut to = w.replicated_to.clone();
    to.sort();
    assert_eq!(to, ["n2", "n3"]);
}
