//! The writer's state across restarts, as an operator sees it (the binary against the test
//! relay): a future rev never becomes a duplicate bound, a cursor override left in the
//! environment applies once, and `set-cursor` rewinds or skips forward, once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sync_core::ids::Tid;
use sync_core::synth::{self, OpSpec};
use workspace_tests::relay::TestRelay;

use crate::support::stored_cursor;

const BIN: &str = env!("CARGO_BIN_EXE_firehose-writer");
const STUDY: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const POST: &str = "app.bsky.feed.post";
const WAIT: Duration = Duration::from_secs(60);
// Revs of 2024, increasing.
const R1: &str = "3l5kaaaaaaa2a";
const R2: &str = "3l5kaaaaaab2a";
const R3: &str = "3l5kaaaaaac2a";

/// A study user's commit creating the post `rkey`.
fn post(seq: i64, rev: &str, rkey: &str) -> Vec<u8> {
    let time = "2026-07-04T14:00:00.000Z";
    let record = json!({"$type": POST, "text": format!("post {rkey}"), "createdAt": time});
    synth::commit_frame(seq, STUDY, rev, time, &[OpSpec::create(POST, rkey, record)])
}

fn post_file(dir: &Path, rkey: &str) -> PathBuf {
    dir.join(format!(
        "cache/study_user_activity/create/post/author_did={STUDY}_post_uri_suffix={rkey}.json"
    ))
}

/// A rev a year ahead of this machine's clock.
fn far_future_rev() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let micros = (now + Duration::from_secs(365 * 24 * 3600)).as_micros() as u64;
    Tid::from_u64(micros << 10).as_str().to_owned()
}

struct Writer {
    child: Child,
    log: PathBuf,
    state: PathBuf,
}

/// Starts the writer on `dir` following `relay`; `env_cursor` is `FIREHOSE_CURSOR`, as an
/// environment file would set it.
fn start(dir: &Path, relay: &TestRelay, env_cursor: Option<&str>) -> Writer {
    std::fs::write(dir.join("study.txt"), STUDY).unwrap();
    let runs = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".log")
        })
        .count();
    let log = dir.join(format!("writer-{runs}.log"));
    let mut command = Command::new(BIN);
    command
        // Synthetic, unsigned frames and no network: verification and backfill off.
        .args(["--verify", "off", "--backfill", "off"])
        .args(["--relay", &relay.url()])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--state")
        .arg(dir.join("state.sqlite"))
        .arg("--study-users")
        .arg(dir.join("study.txt"))
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--commit-interval-ms",
            "50",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .env_remove("FIREHOSE_CURSOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(cursor) = env_cursor {
        command.env("FIREHOSE_CURSOR", cursor);
    }
    Writer {
        child: command.spawn().expect("start firehose-writer"),
        log,
        state: dir.join("state.sqlite"),
    }
}

impl Writer {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the stored cursor reaches `seq`.
    fn wait_cursor(&mut self, seq: i64) {
        let deadline = Instant::now() + WAIT;
        while stored_cursor(&self.state).unwrap_or(-1) < seq {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("writer exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "cursor {:?}, not {seq}:\n{}",
                stored_cursor(&self.state),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, a clean exit, and the log lines (JSON).
    fn stop(mut self) -> Vec<Value> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        let status: ExitStatus = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "writer did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = self.log_text();
        assert!(status.success(), "{status}:\n{text}");
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The log lines at `level` whose message contains `text`.
fn lines<'a>(log: &'a [Value], level: &str, text: &str) -> Vec<&'a Value> {
    log.iter()
        .filter(|l| {
            l["level"] == level
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(text))
        })
        .collect()
}

fn set_cursor(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("set-cursor")
        .args(args)
        .env_remove("FIREHOSE_STATE")
        .output()
        .expect("run set-cursor")
}

/// A value of the state's meta table, read as an operator would.
fn meta(state: &Path, key: &str) -> Option<String> {
    let conn =
        rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .ok()
}

fn override_record(state: &Path) -> Value {
    serde_json::from_str(&meta(state, "cursor_override").expect("an override recorded")).unwrap()
}

#[test]
fn a_future_rev_is_routed_but_never_makes_later_commits_duplicates() {
    let future = far_future_rev();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt
        .block_on(TestRelay::start(vec![
            post(1, &future, "post-a"),
            post(2, R1, "post-b"),
            post(3, R2, "post-c"),
            // A replay of the commit at seq 3 (same rev): the one real duplicate.
            post(4, R2, "post-d"),
        ]))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut writer = start(dir, &relay, Some("0"));
    writer.wait_cursor(4);
    let log = writer.stop();
    for rkey in ["post-a", "post-b", "post-c"] {
        assert!(post_file(dir, rkey).exists(), "{rkey} routed");
    }
    assert!(!post_file(dir, "post-d").exists(), "the duplicate skipped");
    let warned = lines(&log, "WARN", "5 minutes ahead");
    assert_eq!(warned.len(), 1, "{log:#?}");
    assert_eq!(warned[0]["fields"]["seq"], 1);
    assert_eq!(warned[0]["fields"]["repo"], STUDY);
    assert_eq!(warned[0]["fields"]["rev"], future.as_str());
    let duplicates = lines(&log, "INFO", "duplicate");
    assert_eq!(duplicates.len(), 1, "{log:#?}");
    assert_eq!(duplicates[0]["fields"]["seq"], 4);
    assert_eq!(duplicates[0]["fields"]["repo"], STUDY);
    assert_eq!(duplicates[0]["fields"]["rev"], R2);

    // The durable bound is R2, not the future rev: after a restart a newer commit is routed.
    let mut writer = start(dir, &relay, None);
    relay.push(post(5, R3, "post-e"));
    writer.wait_cursor(5);
    writer.stop();
    assert!(post_file(dir, "post-e").exists());
    assert_eq!(relay.cursors(), [Some(0), Some(4)]);
    rt.block_on(relay.shutdown());
}

/// Issue 8 item 6: `--cursor` / `FIREHOSE_CURSOR` left in the environment applies once; a new
/// value applies again, with a warning when it rewinds or skips forward past the stored cursor.
#[test]
fn a_cursor_left_in_the_environment_applies_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt
        .block_on(TestRelay::start(vec![
            post(1, R1, "post-a"),
            post(2, R2, "post-b"),
            post(3, R3, "post-c"),
        ]))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut writer = start(dir, &relay, Some("0"));
    writer.wait_cursor(3);
    writer.stop();

    // Restarted with the same environment: resumes from the stored cursor, and the duplicate
    // memory survives (a replay of seq 2's commit is still recognised).
    let mut writer = start(dir, &relay, Some("0"));
    relay.push(post(4, R2, "post-d"));
    writer.wait_cursor(4);
    let log = writer.stop();
    assert_eq!(relay.cursors(), [Some(0), Some(3)], "no rewind on restart");
    assert_eq!(lines(&log, "INFO", "already applied").len(), 1, "{log:#?}");
    assert!(lines(&log, "WARN", "rewinding").is_empty(), "{log:#?}");
    assert!(!post_file(dir, "post-d").exists(), "still a duplicate");
    assert_eq!(stored_cursor(&dir.join("state.sqlite")), Some(4));

    // A different value is a new decision: applied (a rewind), and the range captured again.
    std::fs::remove_file(post_file(dir, "post-b")).unwrap();
    let mut writer = start(dir, &relay, Some("1"));
    // The stored cursor is already 4, so waiting for it proves nothing: wait for the
    // subscription, which follows the override, then for the replayed seq 2 to be written.
    assert!(rt.block_on(relay.wait_for_subscriptions(3, WAIT)));
    let deadline = std::time::Instant::now() + WAIT;
    while !post_file(dir, "post-b").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.wait_cursor(4);
    let log = writer.stop();
    assert_eq!(relay.cursors()[2], Some(1));
    assert_eq!(lines(&log, "WARN", "rewinding").len(), 1, "{log:#?}");
    assert!(post_file(dir, "post-b").exists(), "captured again");
    let record = override_record(&dir.join("state.sqlite"));
    assert_eq!(
        (&record["cursor"], &record["previous"], &record["by"]),
        (&json!(1), &json!(4), &json!("--cursor"))
    );

    // Past the stored cursor: applied with a warning, and what lies between is not captured.
    relay.push(post(5, "3l5kaaaaaad2a", "post-e"));
    relay.push(post(6, "3l5kaaaaaae2a", "post-f"));
    relay.push(post(7, "3l5kaaaaaaf2a", "post-g"));
    let mut writer = start(dir, &relay, Some("6"));
    writer.wait_cursor(7);
    let log = writer.stop();
    assert_eq!(relay.cursors()[3], Some(6));
    assert_eq!(lines(&log, "WARN", "skipping forward").len(), 1, "{log:#?}");
    assert!(post_file(dir, "post-g").exists());
    assert!(!post_file(dir, "post-e").exists() && !post_file(dir, "post-f").exists());
    let record = override_record(&dir.join("state.sqlite"));
    assert_eq!(
        (&record["cursor"], &record["previous"], &record["by"]),
        (&json!(6), &json!(4), &json!("--cursor"))
    );
    rt.block_on(relay.shutdown());
}

#[test]
fn set_cursor_rewinds_once_warns_when_skipping_forward_and_waits_for_the_writer() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt
        .block_on(TestRelay::start(vec![
            post(1, R1, "post-a"),
            post(2, R2, "post-b"),
            post(3, R3, "post-c"),
        ]))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let state = dir.join("state.sqlite");
    let state_arg = state.to_str().unwrap();
    let mut writer = start(dir, &relay, Some("0"));
    writer.wait_cursor(3);

    // Refused while the writer runs: it would overwrite the cursor at its next commit.
    let out = set_cursor(&["1", "--state", state_arg]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another firehose-writer is running"),
        "{stderr}"
    );
    writer.stop();
    assert_eq!(stored_cursor(&state), Some(3));

    // Re-capturing a period: the files after seq 1 were lost.
    for rkey in ["post-b", "post-c"] {
        std::fs::remove_file(post_file(dir, rkey)).unwrap();
    }
    let out = set_cursor(&["1", "--state", state_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("rewound from 3"), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(stored_cursor(&state), Some(1));
    let record = override_record(&state);
    assert_eq!(
        (&record["cursor"], &record["previous"], &record["by"]),
        (&json!(1), &json!(3), &json!("set-cursor"))
    );
    assert!(record["at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(
        meta(&state, "upstream"),
        None,
        "the new cursor belongs to the relay the next start follows"
    );

    // The environment file still says 0 (already applied): the command's cursor wins, and the
    // rewound commits are captured again, not skipped as duplicates.
    let mut writer = start(dir, &relay, Some("0"));
    writer.wait_cursor(3);
    writer.stop();
    assert_eq!(relay.cursors()[1], Some(1));
    assert!(post_file(dir, "post-b").exists() && post_file(dir, "post-c").exists());
    assert_eq!(meta(&state, "upstream"), Some(relay.addr().to_string()));

    // Skipping forward is allowed, with a warning.
    let out = set_cursor(&["10", "--state", state_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("NEVER be captured"),
        "{stderr}"
    );
    assert_eq!(stored_cursor(&state), Some(10));

    // Mistakes are clear errors, and leave nothing behind.
    let missing = dir.join("nope/state.sqlite");
    let out = set_cursor(&["1", "--state", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no state database"));
    assert!(!dir.join("nope").exists());
    let out = set_cursor(&["--state", state_arg, "--", "-5"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a negative cursor is a usage error"
    );
    assert_eq!(stored_cursor(&state), Some(10));
    rt.block_on(relay.shutdown());
}

/// A record whose block the commit lacks cannot be routed: it must not be held either (held as
/// if routed, a later resync would find it "unchanged" in the repo and never write it).
#[test]
fn a_record_whose_block_is_missing_is_not_held_as_routed() {
    let dir = tempfile::tempdir().unwrap();
    let time = "2026-07-04T14:00:00.000Z";
    let record =
        |rkey: &str| json!({"$type": POST, "text": format!("post {rkey}"), "createdAt": time});
    let frame = synth::commit_frame_lacking(
        1,
        STUDY,
        R1,
        time,
        &[
            OpSpec::create(POST, "3l5kwhole0002", record("3l5kwhole0002")),
            OpSpec::create(POST, "3l5kpart00002", record("3l5kpart00002")),
        ],
        &["3l5kpart00002"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt.block_on(TestRelay::start(vec![frame])).unwrap();
    let mut writer = start(dir.path(), &relay, Some("0"));
    writer.wait_cursor(1);
    writer.stop();
    rt.block_on(relay.shutdown());
    assert!(post_file(dir.path(), "3l5kwhole0002").exists());
    assert!(!post_file(dir.path(), "3l5kpart00002").exists());
    let c = rusqlite::Connection::open(dir.path().join("state.sqlite")).unwrap();
    let held: Vec<(String, Option<String>)> = c
        .prepare("SELECT rkey, cid FROM repo_records WHERE did = ?1 ORDER BY rkey")
        .unwrap()
        .query_map([STUDY], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let rkeys: Vec<&str> = held.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(rkeys, ["3l5kwhole0002"], "{held:?}");
    assert!(held[0].1.is_some(), "held with its CID");
    // And the repo is queued for a resync, which has the record.
    let queued: Vec<(String, String)> = c
        .prepare("SELECT did, reason FROM repo_work")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(queued, [(STUDY.to_owned(), "missing_record".to_owned())]);
}
