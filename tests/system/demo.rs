//! `hsm-secrets demo` end to end, as a user runs it: every step passes, the output shows
//! what each step did, and nothing is left behind — also when the demo is interrupted
//! or killed.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use kit::local::{
    Running, UNPRIVILEGED, UnmountOnDrop, UnprivilegedRun, available, command, mounts_under,
    processes_under, softhsm_available, wait_no_processes,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The demo takes well under a minute; the bound is for a loaded 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn demo(work: &std::path::Path) -> Running {
    let mut c = command();
    c.arg("demo").arg("--work-dir").arg(work);
    Running::start(c)
}

/// The lines of step `n`, from its header to the next header.
fn step(output: &str, n: usize) -> String {
    let header = format!("[{n}/12]");
    let next = format!("[{}/12]", n + 1);
    let start = output
        .find(&header)
        .unwrap_or_else(|| panic!("no step {n}:\n{output}"));
    let rest = &output[start..];
    let end = rest.find(&next).unwrap_or(rest.len());
    rest[..end].to_string()
}

#[test]
fn the_demo_walks_through_every_step_and_leaves_nothing_behind() {
    if !available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(work.path());
    let (status, out) = demo(work.path()).finish(RUN_TIMEOUT);
    assert!(status.success(), "demo failed ({status}):\n{out}");
    for n in 1..=12 {
        assert!(
            out.contains(&format!("✔ step {n}:")),
            "step {n} did not pass:\n{out}"
        );
    }
    assert!(!out.contains('✘'), "{out}");
    assert!(out.contains("demo complete: 12/12 steps passed"), "{out}");

    // 1-2: the system and the secrets.
    assert!(
        step(&out, 1).contains("prod-hsm Ready: primary worker-1 at epoch 1, mirrors 2/2"),
        "{out}"
    );
    assert!(
        step(&out, 2).contains("shop/db-credentials: 2 key(s) (password, username)"),
        "{out}"
    );
    // 4: the patch carries the CSI volume, its mount and the injected marker.
    let inject = step(&out, 4);
    for expected in [
        "+ volume hsm-secrets: CSI driver csi.hsmsecrets.io, readOnly true",
        "secrets=db-credentials,api-key",
        "device=prod-hsm",
        "+ container app: mounts it at /var/run/hsm-secrets (readOnly true)",
        "+ node affinity (preferred",
        "+ annotation hsmsecrets.io/status: injected",
    ] {
        assert!(
            inject.contains(expected),
            "missing {expected:?} in:\n{inject}"
        );
    }
    // 5: mounted on a mirror as tmpfs, modes and fsGroup as asked, content as stored.
    let mount = step(&out, 5);
    assert!(mount.contains("NodePublishVolume on worker-2"), "{mount}");
    assert!(
        mount.contains("mount: tmpfs (nodev,noexec,nosuid)"),
        "{mount}"
    );
    for file in [
        "api-key/token",
        "db-credentials/password",
        "db-credentials/username",
    ] {
        let line = mount
            .lines()
            .find(|l| l.trim_start().starts_with(file))
            .unwrap_or_else(|| panic!("{file} not listed:\n{mount}"));
        assert!(line.contains("0440  uid 0 gid 2000"), "{line}");
        assert!(line.contains("content = stored"), "{line}");
    }
    assert!(mount.contains("ReadOnly at epoch 1"), "{mount}");
    // 6: the table before the failure, with the device's age.
    let table = step(&out, 6);
    assert_device_has_an_age(&table);
    assert!(table.contains("$ kubectl get hsmdevice -o wide"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()[..4]
                == ["prod-hsm", "ReadOnly", "worker-1", "Ready"][..]),
        "{table}"
    );
    // 7-8: SIGKILL, then a read from a mirror.
    assert!(step(&out, 7).contains("kill -9"), "{out}");
    assert!(
        step(&out, 8).contains("NodePublishVolume on worker-3"),
        "{out}"
    );
    // 9: a new primary at epoch 2, in the table.
    let failover = step(&out, 9);
    let new_primary = failover
        .split("new primary ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no new primary:\n{failover}"))
        .to_string();
    assert_ne!(new_primary, "worker-1");
    assert!(
        failover.contains("at epoch 2 (was worker-1 at epoch 1)"),
        "{failover}"
    );
    assert!(failover.contains("Event HSMFailover"), "{failover}");
    assert!(
        failover.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.len() > 6 && cells[0] == "prod-hsm" && cells[2] == new_primary && cells[6] == "2"
        }),
        "table after failover:\n{failover}"
    );
    // 10: refused writes say why and what to do; reads go on.
    let refusal = step(&out, 10);
    for expected in [
        "denied by the validating webhook (HTTP 409)",
        "has no writable primary",
        "phase ReadOnlyFallback",
        "kubectl hsm failover prod-hsm --to worker-3",
        "is a read-only mirror at epoch 2, not the primary",
        "content = stored",
    ] {
        assert!(
            refusal.contains(expected),
            "missing {expected:?} in:\n{refusal}"
        );
    }
    // 11: every token lost, restored from the archive, verified, served by a new node.
    let recovery = step(&out, 11);
    for expected in [
        "2 base(s)",
        "epochs {1, 2}",
        "no token of prod-hsm is left",
        "$ hsm-secrets archive restore --recovery-key",
        "(epoch 2), 3 secrets",
        "$ hsm-secrets archive verify: restore drill of device prod-hsm",
        "NodePublishVolume on worker-4",
        "worker-4 serves the 3 files as stored",
    ] {
        assert!(
            recovery.contains(expected),
            "missing {expected:?} in:\n{recovery}"
        );
    }
    assert_eq!(
        recovery.matches("content = stored").count(),
        3,
        "{recovery}"
    );
    assert!(
        step(&out, 12)
            .contains("1 volumes unpublished over CSI, 3 on killed nodes left to the shutdown"),
        "{out}"
    );
    assert!(
        step(&out, 12).contains("3 leftover mounts unmounted"),
        "{out}"
    );
    // The node plugins' audit trails, read by the demo before they are removed: a
    // record of every publish with its pod and versions, none with a value.
    let audit = step(&out, 12);
    for expected in [
        "audit trail: ",
        "records from 4 node plugins",
        "publish ok: 4",
        "unpublish ok: 1",
        "no secret value in it",
    ] {
        assert!(
            audit.contains(expected),
            "missing {expected:?} in:\n{audit}"
        );
    }

    // Nothing left: processes, mounts, directories.
    assert!(
        processes_under(work.path()).is_empty(),
        "{:?}",
        processes_under(work.path())
    );
    assert!(
        mounts_under(work.path()).is_empty(),
        "{:?}",
        mounts_under(work.path())
    );
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "left in the work dir: {left:?}");
}

/// The AGE cell of the prod-hsm row is a duration, not `<unknown>`.
fn assert_device_has_an_age(table: &str) {
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("prod-hsm   "))
        .unwrap_or_else(|| panic!("no prod-hsm row:\n{table}"));
    let age = row.split_whitespace().last().unwrap();
    assert!(
        age.ends_with('s') || age.ends_with('m'),
        "AGE {age:?} in:\n{table}"
    );
}

const PLAIN_WARNING: &str = "! plain directory, not tmpfs: run as root for in-memory mounts";

#[test]
fn without_the_privilege_to_mount_the_demo_uses_plain_directories() {
    if !softhsm_available() {
        return;
    }
    let module = hsm_secrets::local::tokens::find_module(None).unwrap();
    let readable = std::fs::metadata(&module).unwrap().permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&readable) & 0o004 != 0,
        "{} must be readable by every user for this test",
        module.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path());
    let run = UnprivilegedRun::prepare(dir.path());
    let mut c = run.command();
    c.arg("demo").arg("--work-dir").arg(&run.work);
    let (status, out) = Running::start(c).finish(RUN_TIMEOUT);
    assert!(status.success(), "demo failed ({status}):\n{out}");
    for n in 1..=12 {
        assert!(
            out.contains(&format!("✔ step {n}:")),
            "step {n} did not pass:\n{out}"
        );
    }
    assert!(!out.contains('✘'), "{out}");
    assert!(out.contains("demo complete: 12/12 steps passed"), "{out}");

    let boot = step(&out, 1);
    assert!(boot.contains(PLAIN_WARNING), "{boot}");
    assert!(boot.contains("--unsafe-plain-directory"), "{boot}");
    let uid = if nix::unistd::geteuid().is_root() {
        UNPRIVILEGED
    } else {
        nix::unistd::geteuid().as_raw()
    };
    for n in [5, 8, 10, 11] {
        let mount = step(&out, n);
        assert!(mount.contains(PLAIN_WARNING), "step {n}:\n{mount}");
        assert!(
            mount.contains("mount: plain directory (not mounted; the files are on disk)"),
            "step {n}:\n{mount}"
        );
        assert!(!mount.contains("mount: tmpfs"), "step {n}:\n{mount}");
        // No fsGroup without privilege: the files keep the demo user's own group.
        let files: Vec<&str> = mount
            .lines()
            .filter(|l| l.contains("content = stored"))
            .collect();
        assert_eq!(files.len(), 3, "step {n}:\n{mount}");
        for line in files {
            assert!(line.contains(&format!("0440  uid {uid} gid ")), "{line}");
        }
    }
    assert!(
        step(&out, 5).contains("3 files written to a plain directory on worker-2"),
        "{out}"
    );
    assert_device_has_an_age(&step(&out, 6));
    let cleanup = step(&out, 12);
    assert!(
        cleanup.contains("1 volumes unpublished over CSI, 3 on killed nodes left to the shutdown"),
        "{cleanup}"
    );
    assert!(cleanup.contains("4 volumes removed"), "{cleanup}");

    // Nothing left: processes, mounts (there never were any), files.
    assert!(
        processes_under(&run.work).is_empty(),
        "{:?}",
        processes_under(&run.work)
    );
    assert!(
        mounts_under(dir.path()).is_empty(),
        "{:?}",
        mounts_under(dir.path())
    );
    let left: Vec<_> = std::fs::read_dir(&run.work).unwrap().collect();
    assert!(left.is_empty(), "left in the work dir: {left:?}");
}

#[test]
fn ctrl_c_stops_the_demo_and_cleans_up() {
    if !available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(work.path());
    let mut run = demo(work.path());
    // Interrupt once a volume is mounted: cleanup must unmount it too.
    run.wait_for_output("✔ step 5:", RUN_TIMEOUT);
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGINT).unwrap();
    let (status, out) = run.finish(RUN_TIMEOUT);
    assert!(!status.success(), "{out}");
    assert!(out.contains("interrupted: cleaning up"), "{out}");
    assert!(out.contains("volumes unpublished over CSI"), "{out}");
    wait_no_processes(work.path(), Duration::from_secs(30));
    assert!(
        mounts_under(work.path()).is_empty(),
        "{:?}",
        mounts_under(work.path())
    );
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn children_die_with_a_killed_demo() {
    if !available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(work.path());
    let mut run = demo(work.path());
    run.wait_for_output("✔ step 1:", RUN_TIMEOUT);
    assert!(!processes_under(work.path()).is_empty(), "the system runs");
    // SIGKILL: no cleanup code runs in the demo; its children notice on their own.
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGKILL).unwrap();
    let (status, _) = run.finish(RUN_TIMEOUT);
    assert!(!status.success());
    wait_no_processes(work.path(), Duration::from_secs(60));
}

#[test]
fn a_missing_softhsm_module_fails_the_first_step_by_name() {
    let work = tempfile::tempdir().unwrap();
    let mut c = command();
    c.arg("demo")
        .arg("--work-dir")
        .arg(work.path())
        .args(["--softhsm-module", "/nonexistent/libsofthsm2.so"]);
    let (status, out) = Running::start(c).finish(RUN_TIMEOUT);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(
            "✘ step 1: SoftHSM2: --softhsm-module /nonexistent/libsofthsm2.so does not exist"
        ),
        "{out}"
    );
    assert!(out.contains("step 1/12 (Start three nodes"), "{out}");
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        0,
        "nothing left"
    );
}

/// A directory of stand-in programs for the scripts' tests, first on their `PATH`.
struct FakeTools {
    dir: tempfile::TempDir,
}

impl FakeTools {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `name` as a bash script with `body`.
    fn script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The real `name` (from /usr/bin or /bin), reachable under the fake PATH.
    fn real(&self, name: &str) {
        let real = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no {name} in /usr/bin or /bin"));
        std::os::unix::fs::symlink(real, self.dir.path().join(name)).unwrap();
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("calls.log")
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Runs `script` (relative to the repository) with bash and only these tools on the
    /// PATH: (success, stderr).
    fn run(&self, script: &str, args: &[&str], path: &str) -> (bool, String) {
        let out = std::process::Command::new("/bin/bash")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
            .args(args)
            .env("PATH", path)
            .env("FAKE_LOG", self.log())
            .env("FAKE_DIR", self.dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A first run on a machine without SoftHSM is not silent: the script says what it is
/// missing and which package it installs, with what, then the version it installed.
#[test]
fn ensure_softhsm_says_what_it_installs() {
    let tools = FakeTools::new();
    for tool in ["id", "env"] {
        tools.real(tool);
    }
    tools.script("sudo", r#"exec "$@""#);
    tools.script(
        "apt-get",
        r#"echo "apt-get $*" >> "$FAKE_LOG"
if [ "$1" = install ]; then
  printf '#!/bin/bash\necho 2.6.1\n' > "$FAKE_DIR/softhsm2-util"
  /bin/chmod +x "$FAKE_DIR/softhsm2-util"
fi"#,
    );
    let path = tools.dir.path().display().to_string();
    let (ok, err) = tools.run("scripts/ensure-softhsm.sh", &[], &path);
    assert!(ok, "{err}");
    assert!(
        err.contains("SoftHSM2") && err.contains("missing") && err.contains("softhsm2 package"),
        "{err}"
    );
    assert!(
        err.contains("apt-get update, then apt-get install softhsm2"),
        "{err}"
    );
    assert!(err.contains("SoftHSM2 2.6.1 installed"), "{err}");
    let calls = tools.calls();
    assert!(calls.contains("apt-get update"), "{calls}");
    assert!(calls.contains("install -y -qq softhsm2"), "{calls}");

    // Installed now: one line saying so, nothing installed again.
    std::fs::remove_file(tools.log()).unwrap();
    let (ok, err) = tools.run("scripts/ensure-softhsm.sh", &[], &path);
    assert!(ok, "{err}");
    assert_eq!(err.trim(), "SoftHSM2 2.6.1 is installed");
    assert_eq!(tools.calls(), "");
}

/// `scripts/demo.sh` says what it does before each long step (the first build takes
/// minutes) and lets cargo show its build progress, then runs the demo quietly with the
/// user's arguments.
#[test]
fn the_demo_script_announces_the_build_and_shows_its_progress() {
    let tools = FakeTools::new();
    tools.script("softhsm2-util", "echo 2.6.1");
    tools.script("cargo", r#"echo "cargo $*" >> "$FAKE_LOG""#);
    let path = format!("{}:/usr/bin:/bin", tools.dir.path().display());
    let (ok, err) = tools.run("scripts/demo.sh", &["--keep"], &path);
    assert!(ok, "{err}");
    let calls = tools.calls();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(
        calls,
        [
            "cargo build --locked -p hsm-secrets --bin hsm-secrets",
            "cargo run --locked --quiet -p hsm-secrets --bin hsm-secrets -- demo --keep",
        ],
        "the build is not --quiet; only the run is"
    );
    let checking = err.find("Checking for SoftHSM2").expect(&err);
    let building = err.find("Building hsm-secrets").expect(&err);
    let running = err.find("Running the demo").expect(&err);
    assert!(checking < building && building < running, "{err}");
    assert!(err.contains("SoftHSM2 2.6.1 is installed"), "{err}");
    assert!(err.contains("about 10 minutes on 2 cores"), "{err}");
    assert!(err.contains("later runs start in seconds"), "{err}");
}

/// `hsm-secrets demo --sites`: two complete systems as the sites of one device; every step
/// passes, the output shows the refusals and the promotion, and nothing is left behind.
#[test]
fn the_two_site_demo_promotes_by_hand_fences_and_rejoins_leaving_nothing_behind() {
    if !available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(work.path());
    let mut c = command();
    c.arg("demo")
        .arg("--sites")
        .arg("--work-dir")
        .arg(work.path());
    let (status, out) = Running::start(c).finish(RUN_TIMEOUT);
    assert!(status.success(), "demo --sites failed ({status}):\n{out}");
    for n in 1..=8 {
        assert!(out.contains(&format!("✔ step {n}:")), "step {n}:\n{out}");
    }
    assert!(!out.contains('✘'), "{out}");
    for expected in [
        "two-site demo complete: 8/8 steps passed",
        "site B's primary holds the new value: passive",
        "equal to site A's",
        "site site-b is passive: it follows the archive of the active site prod-hsm",
        "denied by its validating webhook (HTTP 409)",
        "ACTIVE SITE (ARCHIVE)",
        "site site-a is fenced: site site-b was promoted at site epoch 1",
        "site A is passive, following site B, and holds site B's write",
    ] {
        assert!(out.contains(expected), "missing {expected:?}:\n{out}");
    }
    wait_no_processes(work.path(), Duration::from_secs(30));
    assert!(mounts_under(work.path()).is_empty());
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        0,
        "the demo left files behind"
    );
}
