//! The relay source against the test relay: upstream identity and seq resets, over-limit
//! messages, the resume point, cancellable connects, and how the writer stops (signals during
//! start-up, a dead processor, a held lock, an unreadable state).

use crate::writer::start_writer;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use firehose_writer::config::{Args, Config, FutureCursorPolicy};
use firehose_writer::processor::Input;
use firehose_writer::source::{RelaySource, WS_MAX_MESSAGE};
use firehose_writer::{exit_code, Metrics, EXIT_NEEDS_OPERATOR};
use sync_core::synth;
use tokio::sync::{mpsc, watch};
use workspace_tests::relay::{Fault, RelayConfig, TestRelay};

/// Generous: CI machines are shared and a wait only ends early on success.
const WAIT: Duration = Duration::from_secs(30);
const STUDY: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";

/// An identity event of the study user: routed to `study_user_activity/account/`.
/// Each seq's event has its own time, so each is a distinct event with its own cache file
/// (account files are named by the event's content, not by its seq).
fn event_time(seq: i64) -> String {
    format!("2026-07-04T14:38:{:02}.000Z", seq % 60)
}

fn frame(seq: i64) -> Vec<u8> {
    synth::identity_frame(seq, STUDY, None, &event_time(seq))
}

fn frames(seqs: impl IntoIterator<Item = i64>) -> Vec<Vec<u8>> {
    seqs.into_iter().map(frame).collect()
}

fn account_file(dir: &Path, seq: i64) -> std::path::PathBuf {
    let did = sync_core::ids::Did::parse(STUDY).unwrap();
    let time = event_time(seq);
    let name = sync_core::paths::account_file(&sync_core::paths::AccountEventKey {
        did: &did,
        kind: "identity",
        time: &time,
        handle: None,
        active: None,
        status: None,
    });
    dir.join("cache/study_user_activity/account").join(name)
}

/// A writer configuration built the way the binary builds it (flags), following `relay_url`.
fn config(dir: &Path, relay_url: &str) -> Config {
    std::fs::write(dir.join("study.txt"), STUDY).unwrap();
    let args = Args::try_parse_from([
        "firehose-writer".as_ref(),
        "--relay".as_ref(),
        relay_url.as_ref(),
        "--study-users".as_ref(),
        dir.join("study.txt").as_os_str(),
        "--cache-dir".as_ref(),
        dir.join("cache").as_os_str(),
        "--state".as_ref(),
        dir.join("state.sqlite").as_os_str(),
        "--max-backoff".as_ref(),
        "1".as_ref(),
        // Synthetic, unsigned frames and no network: verification and backfill off.
        "--verify".as_ref(),
        "off".as_ref(),
        "--backfill".as_ref(),
        "off".as_ref(),
    ] as [&std::ffi::OsStr; 15])
    .unwrap();
    let mut cfg = Config::from_args(&args).unwrap();
    cfg.metrics_addr = None;
    cfg.commit_interval = Duration::from_millis(100);
    cfg
}

/// A value of the state's meta table, read as an operator would.
fn meta(state: &Path, key: &str) -> Option<String> {
    let conn =
        rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .ok()
}

fn host_of(relay: &TestRelay) -> String {
    relay.addr().to_string()
}

// ---- 1. upstream identity and seq resets ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cursor_is_stored_with_its_upstream_and_another_upstream_needs_a_decision() {
    let a = TestRelay::start(frames(1..=5)).await.unwrap();
    let b = TestRelay::start(frames(1..=3)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state.sqlite");
    let mut cfg = config(tmp.path(), &a.url());
    cfg.cursor = Some(0);
    let writer = start_writer(cfg.clone());
    assert!(writer.wait_for_cursor(5, WAIT).await);
    writer.stop().await.unwrap();
    assert_eq!(meta(&state, "cursor").as_deref(), Some("5"));
    assert_eq!(meta(&state, "upstream"), Some(host_of(&a)));

    // Another relay without a decision: exit 3 before connecting, naming both and the ways out.
    let mut other = config(tmp.path(), &b.url());
    other.cursor = None;
    let err = firehose_writer::run(other.clone(), std::future::pending(), None, |_| {})
        .await
        .expect_err("another upstream must stop the writer");
    let msg = format!("{err:#}");
    assert_eq!(exit_code(&err), EXIT_NEEDS_OPERATOR, "{msg}");
    for needle in [
        host_of(&a).as_str(),
        host_of(&b).as_str(),
        "--cursor",
        "--on-future-cursor=live",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing in: {msg}");
    }
    assert_eq!(b.connections(), 0);
    assert_eq!(meta(&state, "upstream"), Some(host_of(&a)), "unchanged");

    // --cursor says where to start on the new upstream; its cursors are stored as its own.
    let mut decided = other.clone();
    decided.cursor = Some(1);
    let writer = start_writer(decided);
    assert!(writer.wait_for_cursor(3, WAIT).await);
    writer.stop().await.unwrap();
    assert_eq!(b.cursors(), [Some(1)]);
    assert_eq!(meta(&state, "cursor").as_deref(), Some("3"));
    assert_eq!(meta(&state, "upstream"), Some(host_of(&b)));

    // Back to the first relay with --on-future-cursor live: a live tail, stored as the first's.
    let mut live = config(tmp.path(), &a.url());
    live.on_future_cursor = FutureCursorPolicy::Live;
    let writer = start_writer(live);
    assert!(a.wait_for_subscriptions(2, WAIT).await);
    a.push(frame(6));
    assert!(writer.wait_for_cursor(6, WAIT).await);
    writer.stop().await.unwrap();
    assert_eq!(a.cursors(), [Some(0), None], "no cursor of b's sent to a");
    assert_eq!(meta(&state, "cursor").as_deref(), Some("6"));
    assert_eq!(meta(&state, "upstream"), Some(host_of(&a)));
    assert!(account_file(tmp.path(), 6).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_seq_at_or_below_the_requested_cursor_is_handled_like_future_cursor() {
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    // The relay's sequence was reset (or it is another relay): it ignores our cursor.
    relay.set_fault(Fault::IgnoreCursor);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &relay.url());
    cfg.cursor = Some(3);
    let writer = start_writer(cfg.clone());
    let err = tokio::time::timeout(WAIT, writer.task)
        .await
        .expect("the writer stops")
        .unwrap()
        .expect_err("a reset must stop the writer under --on-future-cursor=exit");
    let msg = format!("{err:#}");
    assert_eq!(exit_code(&err), EXIT_NEEDS_OPERATOR, "{msg}");
    assert!(
        msg.contains("answered cursor 3 with seq 1") && msg.contains("--on-future-cursor=live"),
        "{msg}"
    );
    let metrics = writer.metrics.lock().unwrap().clone().unwrap();
    assert_eq!(metrics.seq_resets.load(Ordering::Relaxed), 1);
    assert!(firehose_writer::metrics::render(&metrics).contains("firehose_seq_resets_total 1"));
    assert_eq!(metrics.skipped_seq.load(Ordering::Relaxed), 0);
    assert_eq!(relay.cursors(), [Some(3)]);
    assert!(
        !account_file(tmp.path(), 4).exists(),
        "nothing of the foreign sequence is captured"
    );

    // live: drop the cursor and tail live; the live events are captured.
    cfg.on_future_cursor = FutureCursorPolicy::Live;
    let writer = start_writer(cfg);
    assert!(relay.wait_for_subscriptions(3, WAIT).await);
    relay.push(frame(6));
    assert!(writer.wait_for_cursor(6, WAIT).await);
    let metrics = writer.metrics();
    writer.stop().await.unwrap();
    assert_eq!(relay.cursors(), [Some(3), Some(3), None]);
    assert_eq!(metrics.seq_resets.load(Ordering::Relaxed), 1);
    assert!(account_file(tmp.path(), 6).exists());
    assert!(!account_file(tmp.path(), 4).exists());
}

// ---- 7. a message over the size limit ----------------------------------------------------------

/// A relay source without a processor: frames are collected from the channel.
fn bare_source(relay: &TestRelay, cursor: Option<i64>, max_message_bytes: usize) -> RelaySource {
    RelaySource {
        url: relay.url(),
        start_cursor: cursor,
        stall_timeout: Duration::from_secs(60),
        max_backoff: Duration::from_millis(200),
        on_future_cursor: FutureCursorPolicy::Exit,
        metrics: Metrics::new(),
        durable_cursor: Arc::new(AtomicI64::new(-1)),
        max_message_bytes,
    }
}

fn seqs_of(rx: &mut mpsc::Receiver<Input>) -> Vec<i64> {
    let mut seqs = Vec::new();
    while let Ok(input) = rx.try_recv() {
        if let Input::Frames(frames) = input {
            seqs.extend(frames.iter().filter_map(|f| sync_core::frame::frame_seq(f)));
        }
    }
    seqs
}

/// Waits until `n` seqs came through the channel; returns them.
async fn collect_seqs(rx: &mut mpsc::Receiver<Input>, n: usize) -> Vec<i64> {
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seqs.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "got {seqs:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        seqs.extend(seqs_of(rx));
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_at_the_same_resume_point_stops_after_three_tries() {
    const LIMIT: usize = 16 * 1024;
    let relay = TestRelay::start(frames(1..=5)).await.unwrap();
    // Part of the log: every replay past seq 5 meets it again.
    relay.push(vec![0xa5; 4 * LIMIT]);
    for seq in 6..=8 {
        relay.push(frame(seq));
    }
    let (tx, mut rx) = mpsc::channel(64);
    let (_stop, stopped) = watch::channel(false);
    let err = tokio::time::timeout(WAIT, bare_source(&relay, Some(0), LIMIT).run(tx, stopped))
        .await
        .expect("gives up instead of reconnecting forever")
        .expect_err("the message can never be received");
    let msg = format!("{err:#}");
    assert_eq!(exit_code(&err), EXIT_NEEDS_OPERATOR, "{msg}");
    assert!(
        msg.contains(&format!("{}-byte message right after seq 5", 4 * LIMIT))
            && msg.contains(&format!("{LIMIT}-byte WebSocket limit"))
            && msg.contains("set-cursor"),
        "{msg}"
    );
    assert_eq!(relay.cursors(), [Some(0), Some(5), Some(5)]);
    assert_eq!(seqs_of(&mut rx), [1, 2, 3, 4, 5], "each frame once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_message_over_the_limit_costs_one_reconnect() {
    const LIMIT: usize = 16 * 1024;
    let relay = TestRelay::start(frames(1..=8)).await.unwrap();
    relay.set_fault(Fault::OversizedAfter(3, 4 * LIMIT));
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(bare_source(&relay, Some(0), LIMIT).run(tx, stopped));
    let seqs = collect_seqs(&mut rx, 8).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(relay.cursors(), [Some(0), Some(3)]);
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "each frame once");
}

/// The source opens its own socket (read through a buffer, then the WebSocket handshake): a
/// relay at an IPv6 literal (`ws://[::1]:PORT/...`) is reached and read like any other, across
/// messages larger and smaller than one read of the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_at_an_ipv6_literal_is_read_frame_by_frame() {
    // Messages larger than one read of the socket (256 KiB) between ordinary ones; the source
    // only reads their seq.
    let big = |seq| synth::identity_frame(seq, STUDY, Some(&"a".repeat(300_000)), &event_time(seq));
    let mut log = frames(1..=40);
    log.push(big(41));
    log.extend(frames(42..=60));
    let config = RelayConfig {
        host: Some(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
        ..RelayConfig::default()
    };
    let relay = match TestRelay::start_with_config(log, config).await {
        Ok(relay) => relay,
        Err(e) => {
            eprintln!("skipped: this machine cannot listen on [::1] ({e})");
            return;
        }
    };
    assert!(relay.url().starts_with("ws://[::1]:"), "{}", relay.url());
    relay.push(big(61));
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(bare_source(&relay, Some(0), WS_MAX_MESSAGE).run(tx, stopped));
    let seqs = collect_seqs(&mut rx, 61).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        seqs,
        (1..=61).collect::<Vec<_>>(),
        "each frame once, in order"
    );
    assert_eq!(relay.cursors(), [Some(0)], "one connection");
}

// ---- 17. one resume point ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_an_info_frame_resumes_after_the_last_seq() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    relay.set_fault(Fault::DropAfter(4));
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, stopped) = watch::channel(false);
    // No processor: nothing is ever handled, as when the first frames are still queued.
    let task = tokio::spawn(bare_source(&relay, None, WS_MAX_MESSAGE).run(tx, stopped));
    assert!(relay.wait_for_subscriptions(1, WAIT).await);
    for seq in 1..=3 {
        relay.push(frame(seq));
    }
    relay.push(synth::info_frame(
        "Note",
        Some("a notice last before the drop"),
    ));
    assert!(relay.wait_for_subscriptions(2, WAIT).await);
    relay.push(frame(4));
    let seqs = collect_seqs(&mut rx, 4).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        relay.cursors(),
        [None, Some(3)],
        "a trailing seq-less frame does not turn the resume point into a live tail"
    );
    assert_eq!(seqs, [1, 2, 3, 4], "each frame once");
}

// ---- 8. keepalive: see writer::a_quiet_upstream_that_answers_pings_is_not_reconnected ----------

// ---- 9. stopping ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_connect_is_abandoned_on_shutdown() {
    // Accepts TCP connections and never answers the WebSocket handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos"),
    );
    let writer = start_writer(cfg);
    let deadline = tokio::time::Instant::now() + WAIT;
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The handshake would wait for its 30 s connect timeout; shutdown must not.
    tokio::time::timeout(Duration::from_secs(15), writer.stop())
        .await
        .expect("shutdown abandons the pending handshake")
        .expect("clean stop");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_processor_ends_the_run_at_once() {
    let relay = TestRelay::start(frames(1..=3)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &relay.url());
    cfg.cursor = Some(0);
    // Nothing but the processor's end may stop this run: no stall reconnects.
    cfg.stall_timeout = Duration::from_secs(3600);
    let writer = start_writer(cfg);
    assert!(writer.wait_for_cursor(3, WAIT).await);
    // The state database loses a table under the writer: the next study follow cannot be
    // indexed and the processor stops with an error.
    let conn = rusqlite::Connection::open(tmp.path().join("state.sqlite")).unwrap();
    conn.busy_timeout(WAIT).unwrap();
    conn.execute_batch("DROP TABLE study_follows").unwrap();
    let follow = serde_json::json!({"$type": "app.bsky.graph.follow",
        "subject": "did:plc:q6gjnaw2blty4crticxkmujt", "createdAt": "2026-07-04T14:38:07.877Z"});
    relay.push(synth::commit_frame(
        4,
        STUDY,
        "3l5jzzzzzzz2a",
        "2026-07-04T14:38:07.877Z",
        &[synth::OpSpec::create(
            "app.bsky.graph.follow",
            "3l5jv2xq4tk2p",
            follow,
        )],
    ));
    // The relay stays open and quiet: only the processor's end can stop the run.
    let err = tokio::time::timeout(WAIT, writer.task)
        .await
        .expect("the run ends when the processor does, not at the next frame")
        .unwrap()
        .expect_err("a failed processor fails the run");
    let msg = format!("{err:#}");
    assert!(msg.contains("processor stopped"), "{msg}");
    assert_eq!(exit_code(&err), 1, "{msg}");
    assert_eq!(
        crate::support::stored_cursor(&tmp.path().join("state.sqlite")),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_state_lock_exits_3() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &relay.url());
    let first = start_writer(cfg.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    // on_start runs after the lock is taken
    while first.metrics.lock().unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first writer did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = firehose_writer::run(cfg, std::future::pending(), None, |_| {})
        .await
        .expect_err("the state is locked");
    let msg = format!("{err:#}");
    assert!(msg.contains("another firehose-writer is running"), "{msg}");
    assert_eq!(
        exit_code(&err),
        EXIT_NEEDS_OPERATOR,
        "a restart cannot take the lock: {msg}"
    );
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_newer_state_database_exits_3() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "ws://127.0.0.1:9");
    // Not a database at all (e.g. --state pointed at the wrong file).
    std::fs::write(&cfg.state, vec![0x42; 8192]).unwrap();
    let err = firehose_writer::run(cfg.clone(), std::future::pending(), None, |_| {})
        .await
        .expect_err("not a database");
    let msg = format!("{err:#}");
    assert_eq!(exit_code(&err), EXIT_NEEDS_OPERATOR, "{msg}");
    assert!(
        msg.contains("unreadable") && msg.contains("state.sqlite"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&cfg.state).unwrap(),
        vec![0x42; 8192],
        "left untouched"
    );

    // Written by a newer writer.
    std::fs::remove_file(&cfg.state).unwrap();
    let conn = rusqlite::Connection::open(&cfg.state).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let err = firehose_writer::run(cfg.clone(), std::future::pending(), None, |_| {})
        .await
        .expect_err("a newer schema");
    let msg = format!("{err:#}");
    assert_eq!(exit_code(&err), EXIT_NEEDS_OPERATOR, "{msg}");
    assert!(msg.contains("schema version 99"), "{msg}");
}

#[test]
fn sigterm_during_start_up_stops_the_writer_cleanly() {
    use std::process::{Command, Stdio};
    use std::time::Instant;
    let tmp = tempfile::tempdir().unwrap();
    // A study-user list large enough that loading it takes a while: the signal lands during
    // start-up, before the writer could install a handler that late.
    let mut list = String::with_capacity(300_000 * 33);
    for n in 0..300_000u64 {
        list.push_str(&format!("did:plc:{n:0>24}\n"));
    }
    std::fs::write(tmp.path().join("study.txt"), list).unwrap();
    let state = tmp.path().join("state.sqlite");
    let mut lock = state.clone().into_os_string();
    lock.push(".lock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_firehose-writer"))
        // Synthetic, unsigned frames and no network: verification and backfill off.
        .args(["--verify", "off", "--backfill", "off"])
        .args([
            "--relay",
            "ws://127.0.0.1:9",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--study-users")
        .arg(tmp.path().join("study.txt"))
        .arg("--state")
        .arg(&state)
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The lock is the first thing the writer takes, long after main installed its handlers.
    let deadline = Instant::now() + WAIT;
    while !Path::new(&lock).exists() {
        assert!(Instant::now() < deadline, "the writer never took its lock");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the writer did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "stopped cleanly, not killed by the signal: {status:?}"
    );
}
