//! Test support: a temporary cache + output, running the binary, and reading the Parquet back with
//! pyarrow (a second reader that is not Polars) through a python3 subprocess.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

use serde_json::Value;

#[path = "../../../../tests/src/s3.rs"]
pub mod s3;

pub const BIN: &str = env!("CARGO_BIN_EXE_batch-export");

/// Fails (never skips) when pyarrow is missing.
pub fn require_pyarrow() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let out = Command::new("python3")
            .args(["-c", "import pyarrow, pyarrow.parquet"])
            .output()
            .expect("python3 must be on PATH for the batch-export tests");
        assert!(
            out.status.success(),
            "pyarrow is not installed for python3 (pip install -r tests/requirements.txt): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
    pub out: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let out = dir.path().join("out");
        fs::create_dir_all(&cache).unwrap();
        Env { dir, cache, out }
    }

    /// Writes a cache file atomically (temp + rename), as the writer does.
    pub fn write(&self, rel: &str, contents: &str) {
        write_atomic(&self.cache, rel, contents);
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.cache.join(rel).exists()
    }

    /// Runs an export into the local output with `extra` arguments.
    pub fn export(&self, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "--cache-dir".into(),
            self.cache.display().to_string(),
            "--output".into(),
            self.out.display().to_string(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run(&args, &[])
    }

    /// Exports and asserts exit 0; returns the JSON summary.
    pub fn export_ok(&self, extra: &[&str]) -> Value {
        let out = self.export(extra);
        assert_eq!(
            out.status.code(),
            Some(0),
            "export failed: {}",
            describe(&out)
        );
        summary(&out)
    }

    pub fn read(&self) -> Tables {
        read_parquet_tree(&self.out)
    }

    /// Cache files (relative paths) except hidden ones.
    pub fn cache_files(&self) -> Vec<String> {
        list_files(&self.cache)
    }
}

pub fn write_atomic(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    let dir = path.parent().unwrap();
    fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(
        ".tmp-test-{}-{:?}-{}",
        std::process::id(),
        std::thread::current().id(),
        rand_u64()
    ));
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, &path).unwrap();
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    h.finish()
}

pub fn list_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Hidden names are the writer's temp files and the export's own state, except a
            // file the export took out of the way to delete it: that one is still data.
            if name.starts_with('.') && !name.starts_with(".exported-") {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

pub fn run(args: &[String], env: &[(&str, &str)]) -> Output {
    command(args, env).output().expect("running batch-export")
}

pub fn command(args: &[String], env: &[(&str, &str)]) -> Command {
    // `BATCH_EXPORT_TEST_BIN` runs another build of the binary: cargo puts every worktree's
    // `batch-export` at the same path of a shared target directory, where another checkout's
    // build can replace it while these tests run.
    let bin = std::env::var_os("BATCH_EXPORT_TEST_BIN").unwrap_or_else(|| BIN.into());
    let mut c = Command::new(bin);
    c.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("BATCH_EXPORT_") || k.starts_with("AWS_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs one SQL query with python3's sqlite3 module; each row's columns joined by `|`.
pub fn sqlite_query(db: &Path, sql: &str) -> Vec<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nfor r in sqlite3.connect(sys.argv[1]).execute(sys.argv[2]): print('|'.join(map(str, r)))",
            &db.display().to_string(),
            sql,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "sqlite3 query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn summary(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no summary: {}", describe(out)));
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {}", describe(out)))
}

/// One Parquet file as pyarrow sees it.
#[derive(Debug, Clone)]
pub struct PqFile {
    pub path: String,
    pub partition_date: String,
    pub schema: Vec<(String, String)>,
    pub rows: Vec<BTreeMap<String, Value>>,
}

/// Table path (relative to the output root, up to `/active/`) -> its files.
pub type Tables = BTreeMap<String, Vec<PqFile>>;

const READER: &str = r#"
import json, os, re, sys
import pyarrow.parquet as pq
root = sys.argv[1]
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
        if name.startswith('.') or not name.endswith('.parquet'):
            continue
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)
        m = re.fullmatch(r'(.+)/active/partition_date=(\d{4}-\d{2}-\d{2})/[0-9a-f]{32}-0\.parquet', rel)
        if not m:
            raise SystemExit('unexpected Parquet path: ' + rel)
        table = pq.read_table(path)
        out.setdefault(m.group(1), []).append({
            'path': rel,
            'partition_date': m.group(2),
            'schema': [[f.name, str(f.type)] for f in table.schema],
            'rows': table.to_pylist(),
        })
print(json.dumps(out))
"#;

pub fn read_parquet_tree(root: &Path) -> Tables {
    require_pyarrow();
    if !root.exists() {
        return Tables::new();
    }
    let out = Command::new("python3")
        .args(["-c", READER, &root.display().to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pyarrow reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("reader JSON");
    let mut tables = Tables::new();
    for (table, files) in v.as_object().unwrap() {
        let mut list = Vec::new();
        for f in files.as_array().unwrap() {
            list.push(PqFile {
                path: f["path"].as_str().unwrap().to_owned(),
                partition_date: f["partition_date"].as_str().unwrap().to_owned(),
                schema: f["schema"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            p[0].as_str().unwrap().to_owned(),
                            p[1].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect(),
                rows: f["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_object().unwrap().clone().into_iter().collect())
                    .collect(),
            });
        }
        tables.insert(table.clone(), list);
    }
    tables
}

/// All rows of a table across its files.
pub fn rows(tables: &Tables, table: &str) -> Vec<BTreeMap<String, Value>> {
    tables
        .get(table)
        .map(|files| files.iter().flat_map(|f| f.rows.clone()).collect())
        .unwrap_or_default()
}

/// The schema every file of `table` has (asserting they agree).
pub fn schema(tables: &Tables, table: &str) -> Vec<(String, String)> {
    let files = tables
        .get(table)
        .unwrap_or_else(|| panic!("no table {table} in {:?}", tables.keys()));
    let first = files[0].schema.clone();
    for f in files {
        assert_eq!(f.schema, first, "schema drift in {}", f.path);
    }
    first
}

pub fn expect_schema(cols: &[(&str, &str)]) -> Vec<(String, String)> {
    cols.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

pub const POST_SCHEMA: &[(&str, &str)] = &[
    ("uri", "string"),
    ("cid", "string"),
    ("indexed_at", "string"),
    ("author_did", "string"),
    ("author_handle", "string"),
    ("author_avatar", "string"),
    ("author_display_name", "string"),
    ("created_at", "string"),
    ("text", "string"),
    ("embed", "string"),
    ("entities", "string"),
    ("facets", "string"),
    ("labels", "string"),
    ("langs", "string"),
    ("reply_parent", "string"),
    ("reply_root", "string"),
    ("tags", "string"),
    ("synctimestamp", "string"),
    ("url", "string"),
    ("source", "string"),
    ("like_count", "int64"),
    ("reply_count", "int64"),
    ("repost_count", "int64"),
];

pub const LIKE_SCHEMA: &[(&str, &str)] = &[
    ("author", "string"),
    ("cid", "string"),
    ("record", "string"),
    ("uri", "string"),
    ("synctimestamp", "string"),
];

pub const SOCIAL_SCHEMA: &[(&str, &str)] = &[
    ("follow_handle", "string"),
    ("follow_url", "string"),
    ("follow_did", "string"),
    ("follower_handle", "string"),
    ("follower_url", "string"),
    ("follower_did", "string"),
    ("insert_timestamp", "string"),
    ("relationship_to_study_user", "string"),
];

pub fn is_export_ts(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 19
        && s.chars().enumerate().all(|(i, c)| match i {
            4 | 7 | 10 => c == '-',
            13 | 16 => c == ':',
            _ => c.is_ascii_digit(),
        })
}

/// A TCP proxy to a local S3 server that forwards the first `fail_after` request bytes and then
/// breaks: open connections are cut and every new request gets `500 Internal Server Error`.
pub struct FlakyProxy {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    healed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyProxy {
    pub fn start(upstream: u16, fail_after: usize) -> FlakyProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let healed = Arc::new(AtomicBool::new(false));
        let healed2 = healed.clone();
        let sent = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
            while !stop2.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let (mut client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let broken = !healed2.load(Ordering::Relaxed);
                if broken && sent.load(Ordering::Relaxed) >= fail_after {
                    let mut buf = [0u8; 4096];
                    let _ = client.read(&mut buf);
                    let _ = client.write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let sent2 = sent.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if broken && sent2.fetch_add(n, Ordering::Relaxed) + n > fail_after {
                            break;
                        }
                        if server.try_clone().unwrap().write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Both);
                });
            }
        });
        FlakyProxy { port, stop, healed }
    }

    /// From now on every new connection is forwarded in full (the store is "back"), at the same
    /// endpoint: the export's state directory is bound to its endpoint.
    pub fn heal(&self) {
        self.healed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
