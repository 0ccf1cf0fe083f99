//! A local S3-compatible server for tests: moto (`moto.server`, PyPI `moto[server]`, see
//! `tests/requirements.txt`) on 127.0.0.1 at a free port, with every request it receives logged
//! (method, path, query) so that tests can assert what a client did and did not send (e.g. no
//! `DeleteObject`). Std only, so a test binary can also include this file with `#[path]`.

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
    /// One line per request received: `METHOD /path?query`.
    log: std::path::PathBuf,
}

/// moto's own server entry point, with a WSGI wrapper that appends each request's method, path
/// and query to a log file before moto handles it.
const LOGGING_MOTO: &str = r#"
import sys, threading
import moto.server as ms
log = open(sys.argv[1], 'a', buffering=1)
lock = threading.Lock()
orig = ms.run_simple
def run_simple(host, port, app, **kw):
    def logged(environ, start_response):
        headers = ','.join(sorted(k[5:].lower().replace('_', '-') + '=' + environ[k] for k in environ
                                  if k.startswith('HTTP_X_AMZ_CHECKSUM') or k.startswith('HTTP_X_AMZ_SDK_CHECKSUM')
                                  or k.startswith('HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION') or k == 'HTTP_X_AMZ_TRAILER'))
        with lock:
            log.write(environ['REQUEST_METHOD'] + ' ' + environ.get('PATH_INFO', '') + '?' + environ.get('QUERY_STRING', '') + ' ' + headers + '\n')
        return app(environ, start_response)
    return orig(host, port, logged, **kw)
ms.run_simple = run_simple
ms.main(sys.argv[2:])
"#;

/// One request an S3 server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `x-amz-checksum-*`, `x-amz-sdk-checksum-*`, `x-amz-trailer` and `x-amz-server-side-encryption*` headers as
    /// `name=value`, comma-separated.
    pub headers: String,
}

impl Request {
    /// `DeleteObject` (DELETE of a key, not an `uploadId` abort) or `DeleteObjects` (`POST ?delete`).
    pub fn is_delete_object(&self) -> bool {
        let has = |name: &str| {
            self.query
                .split('&')
                .any(|kv| kv.split('=').next() == Some(name))
        };
        (self.method == "DELETE" && !has("uploadId")) || (self.method == "POST" && has("delete"))
    }
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
        let log =
            std::env::temp_dir().join(format!("s3-requests-{}-{port}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let child = Command::new("python3")
            .args([
                "-c",
                LOGGING_MOTO,
                &log.display().to_string(),
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
            log,
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

impl S3Server {
    /// Every request the server received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (method, rest) = l.split_once(' ')?;
                let (target, headers) = rest.split_once(' ').unwrap_or((rest, ""));
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                Some(Request {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    query: query.to_owned(),
                    headers: headers.to_owned(),
                })
            })
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A second, independent S3-compatible server: `s3s-fs` (crates.io, pinned 0.14.1; `.ci/run`
/// installs it with `cargo install s3s-fs --version 0.14.1 --features binary --locked`), storing
/// objects as files under a temporary directory. Found as `$S3S_FS_BIN`, else `s3s-fs` on
/// `PATH`. Killed (by its pid) when dropped.
pub struct S3sFs {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    /// The root directory: each bucket is a folder, each object a file.
    pub root: std::path::PathBuf,
}

impl S3sFs {
    /// Starts s3s-fs with the test credentials ([`CLIENT_ENV`]); panics with install
    /// instructions when the binary is missing.
    pub fn start(root: &std::path::Path) -> S3sFs {
        let bin = std::env::var_os("S3S_FS_BIN").unwrap_or_else(|| "s3s-fs".into());
        let port = free_port();
        std::fs::create_dir_all(root).expect("creating the s3s-fs root");
        let child = Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                "testing",
                "--secret-key",
                "testing",
            ])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin:?} ({e}): install it with `cargo install s3s-fs --version \
                     0.14.1 --features binary --locked` (what .ci/run does) or set S3S_FS_BIN"
                )
            });
        let server = S3sFs {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            root: root.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A bucket is a folder of the root.
    pub fn create_bucket(&self, bucket: &str) {
        std::fs::create_dir_all(self.root.join(bucket)).expect("creating a bucket folder");
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
