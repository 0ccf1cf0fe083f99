//! `/metrics` and `/health` over real HTTP: the names the deploy files use, gauges left out until
//! known, the 503 conditions (no commit while frames arrive, failing cache or state, relay down
//! for longer than the stall timeout), and the endpoint's connection limit and timeouts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use firehose_writer::config::{Config, FutureCursorPolicy, Source};
use firehose_writer::http::{serve_with, Limits};
use firehose_writer::Metrics;
use serde_json::Value;
use sync_core::ids::Tid;
use sync_core::synth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use workspace_tests::relay::TestRelay;

/// Generous: CI machines are shared and a wait only ends early on success.
const WAIT: Duration = Duration::from_secs(30);
const STUDY_USER: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";

/// Names the deploy files reference that later work adds (resync and verification); every other
/// `firehose_*` and `process_*` name in them must be served.
const ADDED_LATER: [&str; 3] = [
    "firehose_verify_failures_total",
    "firehose_resync_queue_depth",
    "firehose_resyncs_total",
];

/// `n` posts by the study user, seqs 1..=n, revs increasing from now.
fn posts(n: i64) -> Vec<Vec<u8>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    (1..=n)
        .map(|seq| {
            let tid = Tid::from_u64((now + seq as u64) << 10).to_string();
            let record = serde_json::json!({"$type": "app.bsky.feed.post", "text": format!("post {seq}"),
                "createdAt": "2026-03-01T12:00:00.000Z"});
            synth::commit_frame(
                seq,
                STUDY_USER,
                &tid,
                "2026-03-01T12:00:00.000Z",
                &[synth::OpSpec::create("app.bsky.feed.post", &tid, record)],
            )
        })
        .collect()
}

fn config(dir: &Path, relay: &str) -> Config {
    std::fs::write(dir.join("study.txt"), STUDY_USER).unwrap();
    Config {
        source: Source::Relay(relay.to_owned()),
        cache_dir: dir.join("cache"),
        state: dir.join("state.sqlite"),
        study_users: dir.join("study.txt"),
        in_network: None,
        study_posts: None,
        cursor: Some(0),
        stall_timeout: Duration::from_secs(60),
        on_future_cursor: FutureCursorPolicy::Exit,
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        commit_interval: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        ..crate::support::offline_defaults()
    }
}

/// What `run` hands out once the writer is up: its metrics and the endpoint's address.
type Started = Arc<Mutex<Option<(Arc<Metrics>, SocketAddr)>>>;

struct Writer {
    handles: Started,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<firehose_writer::ProcessorSummary>>,
}

impl Writer {
    async fn start(cfg: Config) -> Writer {
        let handles = Arc::new(Mutex::new(None));
        let slot = handles.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(firehose_writer::run(
            cfg,
            async move {
                let _ = stopped.await;
            },
            None,
            move |h| *slot.lock().unwrap() = Some((h.metrics, h.metrics_addr.unwrap())),
        ));
        let writer = Writer {
            handles,
            stop,
            task,
        };
        writer.until("the writer is up", |_| true).await;
        writer
    }

    fn addr(&self) -> SocketAddr {
        self.handles.lock().unwrap().as_ref().unwrap().1
    }

    /// Waits until `done` holds for the writer's metrics.
    async fn until(&self, what: &str, done: impl Fn(&Metrics) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let metrics = self.handles.lock().unwrap().as_ref().map(|h| h.0.clone());
            if metrics.is_some_and(|m| done(&m)) {
                return;
            }
            assert!(!self.task.is_finished(), "the writer stopped before {what}");
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/health` until `done` holds; returns the last answer.
    async fn health_until(&self, what: &str, done: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = get(self.addr(), "/health").await;
            let json: Value = serde_json::from_str(&body).unwrap();
            if done(status, &json) {
                return (status, json);
            }
            assert!(!self.task.is_finished(), "the writer stopped before {what}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {what}; last /health: {status} {json}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// One HTTP/1.1 request on a new connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path).await
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The names a Prometheus text exposition declares (`# TYPE`) and the sample names it has.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.insert(rest.split_whitespace().next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap();
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The value of the sample `series` (name with its labels, as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Every `firehose_*` and `process_*` metric name in a deploy file.
fn referenced_names(file: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    // Metric names are words of [a-z0-9_]; job names like `firehose-writer` split at the dash.
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|word| word.starts_with("firehose_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_serve_every_name_the_dashboard_and_alerts_use() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let writer = Writer::start(config(tmp.path(), &relay.url())).await;
    writer.until("connected", Metrics::is_connected).await;

    // Nothing handled or committed yet: those gauges are left out, not reported as 0.
    let (status, before) = get(writer.addr(), "/metrics").await;
    assert_eq!(status, 200);
    let names = exposed_names(&before);
    for unknown in [
        "firehose_cursor",
        "firehose_lag_seconds",
        "firehose_last_event_timestamp_seconds",
        "firehose_last_commit_timestamp_seconds",
    ] {
        assert!(
            !names.contains(unknown),
            "{unknown} before it is known:\n{before}"
        );
    }
    assert_eq!(sample(&before, "firehose_connected"), Some(1.0));

    let frames = posts(20);
    for frame in &frames {
        relay.push(frame.clone());
    }
    writer
        .until("cursor 20", |m| {
            m.cursor.load(std::sync::atomic::Ordering::Relaxed) >= 20
        })
        .await;
    let (status, text) = get(writer.addr(), "/metrics").await;
    assert_eq!(status, 200);
    let names = exposed_names(&text);
    let mut missing = Vec::new();
    for file in ["prometheus-alerts.yml", "grafana-dashboard.json"] {
        for name in referenced_names(file) {
            if !names.contains(&name) && !ADDED_LATER.contains(&name.as_str()) {
                missing.push(format!("{name} ({file})"));
            }
        }
    }
    assert!(missing.is_empty(), "not served: {missing:?}\n{text}");

    assert_eq!(sample(&text, "firehose_cursor"), Some(20.0));
    assert_eq!(sample(&text, "firehose_frames_total"), Some(20.0));
    assert_eq!(sample(&text, "firehose_frame_bytes_count"), Some(20.0));
    let bytes: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(
        sample(&text, "firehose_frame_bytes_sum"),
        Some(bytes as f64)
    );
    assert_eq!(
        sample(&text, "firehose_frame_bytes_total"),
        Some(bytes as f64)
    );
    assert!(sample(&text, "firehose_commit_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "firehose_cursor_commits_total"),
        sample(&text, "firehose_commit_duration_seconds_count")
    );
    let committed = sample(&text, "firehose_last_commit_timestamp_seconds").unwrap();
    assert!(committed > 1.7e9, "seconds since the epoch: {committed}");
    assert_eq!(
        sample(&text, "firehose_last_event_timestamp_seconds"),
        Some(1772366400.0),
        "the time of the last event (2026-03-01T12:00:00Z)"
    );
    assert_eq!(sample(&text, "firehose_pending_files"), Some(0.0));
    assert!(sample(&text, "firehose_channel_batches").is_some());
    assert_eq!(
        sample(&text, "firehose_cache_write_errors_total"),
        Some(0.0)
    );
    assert_eq!(sample(&text, "firehose_state_errors_total"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            &format!(
                "firehose_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&text, "process_open_fds").unwrap() > 0.0);
    let start = sample(&text, "process_start_time_seconds").unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(start > 1.7e9 && start <= now + 1.0, "start time {start}");
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_lint() {
    let Some(promtool) = which("promtool") else {
        if std::env::var("SYNC_SKIP_PROMTOOL").as_deref() == Ok("1") {
            eprintln!("skipping: promtool not found (SYNC_SKIP_PROMTOOL=1)");
            return;
        }
        panic!(
            "promtool not found: .ci/check-deploy installs it (Debian package prometheus); \
             set SYNC_SKIP_PROMTOOL=1 to skip this test instead"
        );
    };
    let relay = TestRelay::start(posts(5)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let writer = Writer::start(config(tmp.path(), &relay.url())).await;
    writer
        .until("cursor 5", |m| {
            m.cursor.load(std::sync::atomic::Ordering::Relaxed) >= 5
        })
        .await;
    let (_, text) = get(writer.addr(), "/metrics").await;
    writer.stop().await;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok_while_frames_are_committed() {
    let relay = TestRelay::start(posts(10)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let writer = Writer::start(config(tmp.path(), &relay.url())).await;
    writer
        .until("cursor 10", |m| {
            m.cursor.load(std::sync::atomic::Ordering::Relaxed) >= 10
        })
        .await;
    let (status, body) = get(writer.addr(), "/health").await;
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["status"], "ok");
    assert_eq!(json["reasons"], serde_json::json!([]));
    assert_eq!(json["connected"], true);
    assert_eq!(json["cursor"], 10);
    assert!(json["lag_seconds"].as_f64().is_some());
    assert_eq!(json["last_error"], Value::Null);
    assert_eq!(json["resync_queue_depth"], 0);
    assert_eq!(json["repairs_in_flight"], 0);
    // A quiet relay after that is not a stuck writer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = get(writer.addr(), "/health").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = request(writer.addr(), "HEAD", "/health").await;
    assert_eq!(status, 200);
    let (status, _) = request(writer.addr(), "POST", "/health").await;
    assert_eq!(status, 405);
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_when_frames_arrive_but_nothing_is_committed() {
    let relay = TestRelay::start(posts(10)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &relay.url());
    // A file where the study folder must go: every study write fails (as on a full disk).
    std::fs::create_dir_all(&cfg.cache_dir).unwrap();
    let blocker = cfg.cache_dir.join("study_user_activity");
    std::fs::write(&blocker, "not a directory").unwrap();
    let writer = Writer::start(cfg).await;
    let (_, json) = writer
        .health_until("503 for the missing commits", |status, json| {
            status == 503
                && json["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_str().unwrap().starts_with("no_commit:"))
        })
        .await;
    assert_eq!(json["status"], "unhealthy");
    let reasons: Vec<&str> = json["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("cache_or_state_failing: cache write")),
        "{reasons:?}"
    );
    assert!(json["last_error"].as_str().unwrap().contains("cache write"));
    // The existing fields are still there.
    assert_eq!(json["connected"], true);
    assert!(json.get("cursor").is_some() && json.get("lag_seconds").is_some());

    let (_, text) = get(writer.addr(), "/metrics").await;
    assert!(sample(&text, "firehose_cache_write_errors_total").unwrap() >= 1.0);
    assert_eq!(sample(&text, "firehose_state_errors_total"), Some(0.0));
    assert_eq!(sample(&text, "firehose_cursor_commits_total"), Some(0.0));
    assert_eq!(
        sample(&text, "firehose_last_commit_timestamp_seconds"),
        None
    );

    // The disk is fixed: the writer catches up and is healthy again.
    std::fs::remove_file(&blocker).unwrap();
    writer
        .health_until("200 after recovery", |status, json| {
            status == 200 && json["cursor"] == 10
        })
        .await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_failures_are_state_errors_and_make_health_503() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &relay.url());
    let state = cfg.state.clone();
    let writer = Writer::start(cfg).await;
    writer.until("connected", Metrics::is_connected).await;
    // Another process holds the database's write lock: the writer's commits fail (busy).
    let locker = rusqlite::Connection::open(&state).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    for frame in posts(5) {
        relay.push(frame);
    }
    let (_, json) = writer
        .health_until("503 for the failing state commit", |status, json| {
            status == 503
                && json["reasons"].as_array().unwrap().iter().any(|r| {
                    r.as_str()
                        .unwrap()
                        .starts_with("cache_or_state_failing: state commit")
                })
        })
        .await;
    assert!(json["last_error"]
        .as_str()
        .unwrap()
        .contains("state commit"));
    let (_, text) = get(writer.addr(), "/metrics").await;
    assert!(sample(&text, "firehose_state_errors_total").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "firehose_cache_write_errors_total"),
        Some(0.0)
    );
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    writer
        .health_until("200 after the lock is released", |status, json| {
            status == 200 && json["cursor"] == 5
        })
        .await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_when_the_relay_is_down_longer_than_the_stall_timeout() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        &format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos"),
    );
    cfg.stall_timeout = Duration::from_secs(1);
    let writer = Writer::start(cfg).await;
    let (_, json) = writer
        .health_until("503 for the lost connection", |status, _| status == 503)
        .await;
    let reasons = json["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{json}");
    assert!(
        reasons[0].as_str().unwrap().starts_with("disconnected:"),
        "{json}"
    );
    assert_eq!(json["connected"], false);
    assert_eq!(json["cursor"], Value::Null);
    assert!(
        json["last_error"].as_str().unwrap().contains("connect"),
        "{json}"
    );
    let (_, text) = get(writer.addr(), "/metrics").await;
    assert_eq!(sample(&text, "firehose_connected"), Some(0.0));
    assert!(sample(&text, "firehose_reconnects_total").unwrap() >= 1.0);
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_bounds_connections_and_closes_slow_ones() {
    let limits = Limits {
        max_connections: 4,
        request_timeout: Duration::from_secs(1),
    };
    let server = serve_with("127.0.0.1:0".parse().unwrap(), Metrics::new(), limits)
        .await
        .unwrap();
    let addr = server.local_addr();
    // Fill every slot: idle connections, and one trickling a request head byte by byte.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let (trickle_read, mut trickle_write) = TcpStream::connect(addr).await.unwrap().into_split();
    let trickler = tokio::spawn(async move {
        let head = b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head.iter().cycle() {
            if trickle_write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // A scraper arriving now is served once a slot frees up, which only the timeout does.
    let (status, body) = get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let mut closed = 0;
    for stream in &mut held {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    let mut trickle_read = trickle_read;
    let mut buf = [0u8; 64];
    if let Ok(Ok(0) | Err(_)) =
        tokio::time::timeout(Duration::from_millis(200), trickle_read.read(&mut buf)).await
    {
        closed += 1;
    }
    assert!(
        closed >= 1,
        "the request was answered while all 4 slots were still held: no connection limit"
    );

    // Every idle or slow connection is closed by the server, none is held forever.
    for mut stream in held {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "an idle connection was never closed");
        assert!(buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"));
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, trickle_read.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a slowly sent request head was never cut off");
    tokio::time::timeout(WAIT, trickler).await.unwrap().unwrap();

    // And the endpoint still answers.
    assert_eq!(get(addr, "/metrics").await.0, 200);
    drop(server);
}
