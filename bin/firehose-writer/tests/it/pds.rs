//! End to end against the real upstream: the official atproto PDS (`@atproto/dev-env`, Node 22)
//! driven by `tests/pds/driver.mjs`. The driver creates accounts and performs posts, replies,
//! likes, reposts, quotes, follows, blocks, profile edits, deletes, a handle change, a
//! deactivation and account deletions; the writer follows the PDS's own
//! `com.atproto.sync.subscribeRepos` and the cache must then hold exactly the files the driver
//! expects (computed by the driver from the routing rules, not by our code).
//!
//! Needs `tests/setup.sh` (Node 22 and the npm packages, cached under
//! `${SYNC_CACHE:-$HOME/.cache/firehose-sync}/pds`). Without them the test fails and says so;
//! `SYNC_SKIP_PDS=1` skips it instead.

use crate::support::stored_cursor;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use workspace_tests::pds::{toolchain_or_skip, Driver, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_firehose-writer");

/// Held by every test that runs a PDS network (this one and `gapfree.rs`'s): one network at a
/// time, so a machine with two cores is not asked to start several PDSs and writers at once
/// (the other tests of the binary still run alongside).
pub(crate) fn one_network_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the writer with `args` plus what every end-to-end run uses: `--cache-dir
/// <work>/cache`, `--state <work>/state.sqlite`, `--metrics-addr metrics_addr` (e.g.
/// `127.0.0.1:0`), a 50 ms commit interval and JSON logs (debug for the writer) in
/// `<work>/<name>.log`.
pub(crate) fn spawn_writer(
    work: &Path,
    name: &'static str,
    metrics_addr: &str,
    args: &[&OsStr],
) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--cache-dir")
        .arg(work.join("cache"))
        .arg("--state")
        .arg(work.join("state.sqlite"))
        .args(["--metrics-addr", metrics_addr])
        .args(["--commit-interval-ms", "50", "--log-format", "json"])
        .env("RUST_LOG", "info,firehose_writer=debug")
        .stdout(Stdio::null());
    Proc::spawn(name, &mut cmd, work.join(format!("{name}.log")))
}

/// SIGTERM: the writer drains and exits; panics unless it exits within 30 s.
pub(crate) fn sigterm(writer: &mut Proc) -> ExitStatus {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(writer.pid() as i32, libc::SIGTERM);
    }
    writer
        .wait_exit(Duration::from_secs(30))
        .expect("the writer did not exit within 30 s of SIGTERM")
}

/// The log lines of errors, warnings, dropped ops and duplicates.
pub(crate) fn bad_log_lines(writer: &Proc) -> Vec<String> {
    writer
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("\"level\":\"ERROR\"")
                || l.contains("\"level\":\"WARN\"")
                || l.contains("dropped op")
                || l.contains("duplicate event")
        })
        .map(str::to_owned)
        .collect()
}

pub(crate) fn wait_cursor(writer: &mut Proc, state: &Path, seq: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let cursor = stored_cursor(state);
        if cursor.is_some_and(|c| c >= seq) {
            return;
        }
        assert!(
            writer.alive(),
            "the writer exited while waiting for seq {seq}"
        );
        assert!(
            Instant::now() < deadline,
            "the writer's cursor is {cursor:?}, not {seq}, after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Every file under `root`, relative, skipping names that start with `.`.
pub(crate) fn cache_files(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out
}

pub(crate) fn read_json(cache: &Path, rel: &str) -> Value {
    let text = std::fs::read_to_string(cache.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}: {text}"))
}

pub(crate) fn str_of<'v>(v: &'v Value, key: &str) -> &'v str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

/// The one expected path that ends with `suffix` (and contains `part`).
fn find<'e>(expected: &'e BTreeSet<String>, part: &str, suffix: &str) -> &'e str {
    let hits: Vec<&String> = expected
        .iter()
        .filter(|p| p.contains(part) && p.ends_with(suffix))
        .collect();
    assert_eq!(hits.len(), 1, "{part} .. {suffix}: {hits:?}");
    hits[0]
}

pub(crate) fn rkey(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap()
}

#[test]
fn follows_the_official_pds_firehose() {
    let Some(toolchain) = toolchain_or_skip() else {
        return;
    };
    let _network = one_network_at_a_time();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_path_buf();
    let work = work.as_path();
    // SYNC_PDS_KEEP=1 keeps the cache, state and logs for a look afterwards.
    let _tmp = if std::env::var("SYNC_PDS_KEEP").as_deref() == Ok("1") {
        eprintln!("keeping {}", work.display());
        let _ = tmp.keep();
        None
    } else {
        Some(tmp)
    };
    let cache = work.join("cache");
    let state = work.join("state.sqlite");

    // PDS_DRIVER_URLS=1: the ready line also names the PLC: the writer runs with its defaults
    // (`--verify routed --backfill on`) and resolves every identity from that PLC.
    let mut driver = Driver::start_with_env(&toolchain, work, None, &[("PDS_DRIVER_URLS", "1")]);
    let ready = driver.recv(Duration::from_secs(180), "ready line");
    let ws = str_of(&ready, "ws").to_owned();
    let plc_url = str_of(&ready, "plc_url").to_owned();
    let list = |key: &str| -> Vec<String> {
        ready[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {ready}"))
            .iter()
            .map(|d| d.as_str().unwrap().to_owned())
            .collect()
    };
    let study = list("study");
    let in_network = list("in_network");
    std::fs::write(work.join("study.txt"), study.join("\n")).unwrap();
    std::fs::write(work.join("network.txt"), in_network.join("\n")).unwrap();
    eprintln!(
        "PDS up at {ws} (PLC {plc_url}) after {:?}; study {study:?}, in-network {in_network:?}",
        started.elapsed()
    );

    let study_file = work.join("study.txt");
    let network_file = work.join("network.txt");
    let mut writer = spawn_writer(
        work,
        "writer",
        "127.0.0.1:0",
        &[
            "--relay".as_ref(),
            ws.as_ref(),
            "--cursor".as_ref(),
            "0".as_ref(),
            "--study-users".as_ref(),
            study_file.as_os_str(),
            "--in-network".as_ref(),
            network_file.as_os_str(),
            "--plc-url".as_ref(),
            plc_url.as_ref(),
        ],
    );

    driver.send("go");
    let done = loop {
        let msg = driver.recv(Duration::from_secs(300), "scenario step");
        if let Some(seq) = msg.get("sync").and_then(Value::as_i64) {
            wait_cursor(&mut writer, &state, seq, Duration::from_secs(60));
            driver.send("ok");
        } else if msg.get("done").is_some() {
            break msg;
        }
    };
    let last_seq = done["last_seq"].as_i64().expect("last_seq");
    wait_cursor(&mut writer, &state, last_seq, Duration::from_secs(60));
    eprintln!(
        "scenario done at seq {last_seq} after {:?}; events: {}",
        started.elapsed(),
        done["event_counts"]
    );

    // SIGTERM: the writer drains and exits cleanly.
    let status = sigterm(&mut writer);
    assert!(status.success(), "writer exit status {status}");
    assert!(stored_cursor(&state).unwrap() >= last_seq);
    // Every frame of the real PDS decoded and routed cleanly: no errors, warnings, dropped ops.
    let bad = bad_log_lines(&writer);
    assert!(bad.is_empty(), "writer log:\n{}", bad.join("\n"));

    driver.send("stop");
    driver.close_stdin();

    // Exactly the expected files.
    let expected: BTreeSet<String> = done["expected"]
        .as_array()
        .expect("expected list")
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let actual = cache_files(&cache);
    let missing: Vec<&String> = expected.difference(&actual).collect();
    let unexpected: Vec<&String> = actual.difference(&expected).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "cache differs from the expected tree ({} expected, {} present)\nmissing:\n  {}\nunexpected:\n  {}",
        expected.len(),
        actual.len(),
        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "),
        unexpected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
    );

    // Spot checks of the contents.
    let rec = &done["records"];
    let uri = |k: &str| str_of(rec, k).to_owned();
    let (p1, r2, r3, l1, l3, qt) = (
        uri("p1"),
        uri("r2"),
        uri("r3"),
        uri("l1"),
        uri("l3"),
        uri("qt"),
    );
    // A3's reply to A2's reply: nested under P1, reply_root = P1.
    let path = find(
        &expected,
        "/reply_to_user_post/",
        &format!("_post_uri_suffix={}.json", rkey(&r2)),
    );
    assert!(
        path.contains(&format!("/reply_to_user_post/{}/", rkey(&p1))),
        "{path}"
    );
    let reply = read_json(&cache, path);
    assert_eq!(str_of(&reply, "uri"), r2);
    assert_eq!(str_of(&reply, "reply_root"), p1);
    // S2's reply: the same document in its own post folder and under P1.
    let own = find(
        &expected,
        "/create/post/",
        &format!("_post_uri_suffix={}.json", rkey(&r3)),
    );
    let nested = find(
        &expected,
        "/reply_to_user_post/",
        &format!("_post_uri_suffix={}.json", rkey(&r3)),
    );
    assert_eq!(read_json(&cache, own), read_json(&cache, nested));
    // S2's like of P1, in both like folders.
    for folder in ["/create/like/", "/create/like_on_user_post/"] {
        let like = read_json(
            &cache,
            find(
                &expected,
                folder,
                &format!("_like_uri_suffix={}.json", rkey(&l3)),
            ),
        );
        assert_eq!(str_of(&like, "uri"), l3);
        assert_eq!(like["record"]["subject"]["uri"].as_str(), Some(p1.as_str()));
    }
    // A2's unlike of P1: the delete document names the like.
    let unlike = read_json(
        &cache,
        find(
            &expected,
            "/delete/like_on_user_post/",
            &format!("_like_uri_suffix={}.json", rkey(&l1)),
        ),
    );
    assert_eq!(str_of(&unlike, "uri"), l1);
    assert_eq!(str_of(&unlike, "collection"), "app.bsky.feed.like");
    // The quote of P1 embeds P1.
    let quote = read_json(
        &cache,
        find(
            &expected,
            "/quote_of_user_post/",
            &format!("_post_uri_suffix={}.json", rkey(&qt)),
        ),
    );
    assert_eq!(str_of(&quote, "uri"), qt);
    assert!(quote.to_string().contains(&p1), "{quote}");
    // S1's follow of A2 (a create stays after its delete).
    let follow = read_json(&cache, find(&expected, "/follow/follower/", ".json"));
    assert_eq!(str_of(&follow, "follower_did"), study[0]);
    assert_eq!(str_of(&follow, "uri"), uri("f1"));
    // Profiles: one per commit rev, the later one edited.
    let revs = rec["profile_revs"].as_array().unwrap();
    let profile = read_json(
        &cache,
        find(
            &expected,
            "/create/profile/",
            &format!("_rev={}.json", revs[1].as_str().unwrap()),
        ),
    );
    assert_eq!(
        profile["record"]["displayName"].as_str(),
        Some("Study One (edited)")
    );
    // Account and identity events: the writer's view matches the PDS sequencer's.
    let events = rec["account_events"].as_array().unwrap();
    assert!(
        events.iter().any(
            |e| e["type"] == "identity" && e["handle"].as_str() == Some("s1-renamed-user.test")
        ),
        "no identity event for the handle change: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "account" && e["status"] == "deleted"),
        "no account deletion event: {events:?}"
    );
    // Files are named by the event, not the seq: two identical events (same instant, same
    // content) share one file, which holds the later seq.
    let name_of = |e: &Value| {
        let did = sync_core::ids::Did::parse(str_of(e, "did")).unwrap();
        sync_core::paths::account_file(&sync_core::paths::AccountEventKey {
            did: &did,
            kind: str_of(e, "type"),
            time: str_of(e, "time"),
            handle: e["handle"].as_str(),
            active: e["active"].as_bool(),
            status: e["status"].as_str(),
        })
    };
    let mut last_seq: BTreeMap<String, i64> = BTreeMap::new();
    for e in events {
        last_seq.insert(name_of(e), e["seq"].as_i64().unwrap());
    }
    for e in events {
        let (did, kind) = (str_of(e, "did"), str_of(e, "type"));
        let name = name_of(e);
        let seq = last_seq[&name];
        let file = read_json(&cache, &format!("study_user_activity/account/{name}"));
        assert_eq!(str_of(&file, "did"), did);
        assert_eq!(str_of(&file, "kind"), kind);
        assert_eq!(file["seq"].as_i64(), Some(seq));
        if kind == "identity" {
            assert_eq!(file["handle"], e["handle"], "{file}");
        } else {
            assert_eq!(file["active"], e["active"], "{file}");
            assert_eq!(file["status"], e["status"], "{file}");
        }
    }

    let status = driver.proc.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "driver shutdown: {status:?}"
    );
    eprintln!(
        "{} files as expected; test took {:?}",
        expected.len(),
        started.elapsed()
    );
}
