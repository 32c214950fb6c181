//! The hidden prompt of `kubectl hsm update` on a real pseudo-terminal: key names echo,
//! values do not, and the terminal's echo is back on afterwards.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::openpty;
use nix::sys::termios::{LocalFlags, tcgetattr};

/// Collects a stream in the background.
fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 256];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn wait_for(buf: &Arc<Mutex<Vec<u8>>>, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if text.matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {needle:?} x{count}; got {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn values_typed_at_the_prompt_are_not_echoed() {
    let pty = openpty(None, None).unwrap();
    let mut master = std::fs::File::from(pty.master);
    let slave_probe = pty.slave.try_clone().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubectl-hsm"))
        .args([
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "update",
            "db",
            "--dry-run",
        ])
        .stdin(Stdio::from(pty.slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect(child.stderr.take().unwrap());
    let echoed = collect(master.try_clone().unwrap());

    wait_for(&stderr, "key name: ", 1);
    master.write_all(b"password\n").unwrap();
    wait_for(&stderr, "value for password (hidden): ", 1);
    master.write_all(b"hunter2-typed\n").unwrap();
    wait_for(&stderr, "key name: ", 2);
    master.write_all(b"\n").unwrap();

    let status = child.wait().unwrap();
    // Input read, then the (absent) kubeconfig is the error: exit code 1.
    assert_eq!(status.code(), Some(1));
    wait_for(
        &stderr,
        "kubeconfig /nonexistent/kubeconfig: cannot be read",
        1,
    );
    let err_text = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    assert!(!err_text.contains("hunter2"), "{err_text}");
    // The terminal echoed the key name but not the value.
    wait_for(&echoed, "password", 1);
    std::thread::sleep(Duration::from_millis(200));
    let echo_text = String::from_utf8_lossy(&echoed.lock().unwrap()).into_owned();
    assert!(!echo_text.contains("hunter2"), "{echo_text:?}");
    // Echo is restored for whatever runs next in that terminal.
    let attrs = tcgetattr(&slave_probe).unwrap();
    assert!(attrs.local_flags.contains(LocalFlags::ECHO));
}
