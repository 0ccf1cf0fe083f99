//! A local S3-compatible server for tests: moto (`python3 -m moto.server`, PyPI `moto[server]`,
//! see `tests/requirements.txt`) on 127.0.0.1 at a free port. Std only, so a test binary can also
//! include this file with `#[path]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server; killed (by its pid) when dropped.
pub struct S3Server {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
}

/// Environment a client of the test server needs (dummy credentials, fixed region, no IMDS).
pub const CLIENT_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// One raw HTTP/1.1 request without a body; returns the status code and the whole response.
pub fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, out))
}

impl S3Server {
    /// Starts moto; panics with install instructions when `moto` is not importable.
    pub fn start() -> S3Server {
        let check = Command::new("python3")
            .args(["-c", "import moto.server, boto3"])
            .output()
            .expect("python3 must be on PATH for the S3 tests");
        assert!(
            check.status.success(),
            "moto is not installed for python3 (pip install -r tests/requirements.txt): {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting python3 -m moto.server");
        let server = S3Server {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http(port, "GET", "/") {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "moto server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let (code, body) = http(self.port, "PUT", &format!("/{bucket}")).expect("PUT bucket");
        assert_eq!(code, 200, "creating bucket {bucket}: {body}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
