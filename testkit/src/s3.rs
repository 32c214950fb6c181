//! A real S3-compatible server for tests: `moto_server` (PyPI `moto[server]`) started on a
//! free loopback port and stopped on drop. Under CI a missing server is a failure, never a
//! silent skip.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3Server {
    pub endpoint: String,
    child: Child,
}

impl S3Server {
    /// None when moto is not installed outside CI.
    pub fn start() -> Option<Self> {
        Self::launch(&[])
    }

    /// A server that checks credentials, as a real S3 does: only `bucket` is created
    /// unsigned; every later call must be signed by a key the server knows (none here),
    /// so any key is wrong.
    #[allow(dead_code)]
    pub fn start_checking_credentials(bucket: &str) -> Option<Self> {
        // Two calls pass unchecked: the start-up probe and the bucket's creation.
        let server = Self::launch(&[("INITIAL_NO_AUTH_ACTION_COUNT", "2")])?;
        server.create_bucket(bucket);
        Some(server)
    }

    fn launch(env: &[(&str, &str)]) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(_) if std::env::var_os("CI").is_some() => {
                panic!("moto_server is required under CI: pip install 'moto[server]'")
            }
            Err(_) => {
                eprintln!("skipping: moto_server not installed (pip install 'moto[server]')");
                return None;
            }
        };
        let server = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.request("GET", "/").is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    /// Creates `bucket` (unsigned: moto accepts it).
    pub fn create_bucket(&self, bucket: &str) {
        let status = self
            .request("PUT", &format!("/{bucket}"))
            .expect("create bucket");
        assert_eq!(status, 200, "create bucket {bucket}");
    }

    /// One plain HTTP/1.1 request; the status code.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status line in {answer:?}")))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
