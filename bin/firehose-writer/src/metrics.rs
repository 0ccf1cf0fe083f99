//! Metrics and health: every metric name is declared here; `/metrics` renders Prometheus text and
//! `/health` a JSON status, served by a tiny HTTP endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const FRAMES: &str = "firehose_frames_total";
pub const FRAME_BYTES: &str = "firehose_frame_bytes_total";
pub const EVENTS: &str = "firehose_events_total";
pub const ROUTED_FILES: &str = "firehose_routed_files_total";
pub const DROPS: &str = "firehose_drops_total";
pub const DUPLICATES: &str = "firehose_duplicate_events_total";
pub const SKIPPED_SEQ: &str = "firehose_replayed_seq_skipped_total";
pub const RECONNECTS: &str = "firehose_reconnects_total";
pub const STALLS: &str = "firehose_stalls_total";
pub const SEQ_RESETS: &str = "firehose_seq_resets_total";
pub const OUTDATED_CURSOR: &str = "firehose_outdated_cursor_total";
pub const WRITE_ERRORS: &str = "firehose_cache_write_errors_total";
pub const COMMITS: &str = "firehose_cursor_commits_total";
pub const RELOADS: &str = "firehose_tracked_set_reloads_total";
pub const RELOAD_FAILURES: &str = "firehose_tracked_set_reload_failures_total";
pub const CURSOR: &str = "firehose_cursor";
pub const LAG: &str = "firehose_lag_seconds";
pub const CONNECTED: &str = "firehose_connected";

#[derive(Default)]
struct Labelled(Mutex<BTreeMap<&'static str, u64>>);

impl Labelled {
    fn inc(&self, label: &'static str, by: u64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(label).or_default() += by;
    }
    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counters shared by the source, the processor and the HTTP endpoint.
#[derive(Default)]
pub struct Metrics {
    pub frames: AtomicU64,
    pub frame_bytes: AtomicU64,
    events: Labelled,
    routed: Labelled,
    drops: Labelled,
    pub duplicates: AtomicU64,
    pub skipped_seq: AtomicU64,
    pub reconnects: AtomicU64,
    pub stalls: AtomicU64,
    /// Connections whose first seq was at or below the cursor asked for.
    pub seq_resets: AtomicU64,
    pub outdated_cursor: AtomicU64,
    pub write_errors: AtomicU64,
    pub commits: AtomicU64,
    /// Tracked-set reloads applied (SIGHUP).
    pub reloads: AtomicU64,
    /// Reloads refused because a file did not parse (the old sets stay).
    pub reload_failures: AtomicU64,
    /// Committed cursor, -1 before the first commit.
    pub cursor: AtomicI64,
    /// `time` of the last handled event, Unix microseconds (0 = none yet).
    pub last_event_time_us: AtomicI64,
    pub connected: AtomicBool,
    /// Failing cache writes/flushes or state commits: cleared by the processor on recovery.
    cache_error: Mutex<Option<String>>,
    /// Connection problems and relay error frames: cleared by the first event after them.
    source_error: Mutex<Option<String>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let m = Metrics::default();
        m.cursor.store(-1, Ordering::Relaxed);
        Arc::new(m)
    }

    pub fn event(&self, kind: &'static str) {
        self.events.inc(kind, 1);
    }
    pub fn routed(&self, folder: &'static str) {
        self.routed.inc(folder, 1);
    }
    pub fn dropped(&self, reason: &'static str) {
        self.drops.inc(reason, 1);
    }
    pub fn drops(&self) -> BTreeMap<&'static str, u64> {
        self.drops.snapshot()
    }
    pub fn routed_files(&self) -> BTreeMap<&'static str, u64> {
        self.routed.snapshot()
    }
    pub fn events(&self) -> BTreeMap<&'static str, u64> {
        self.events.snapshot()
    }

    pub fn set_cache_error(&self, error: Option<String>) {
        *self.cache_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
    pub fn set_source_error(&self, error: Option<String>) {
        *self.source_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
    /// The current problem, if any: a cache problem first (it blocks the cursor), else a
    /// connection problem not yet followed by an event.
    pub fn last_error(&self) -> Option<String> {
        let read = |m: &Mutex<Option<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        read(&self.cache_error).or_else(|| read(&self.source_error))
    }

    /// Seconds between now and the `time` of the last handled event.
    pub fn lag_seconds(&self) -> Option<f64> {
        let t = self.last_event_time_us.load(Ordering::Relaxed);
        if t == 0 {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_micros() as i64;
        Some((now - t).max(0) as f64 / 1e6)
    }

    pub fn health_json(&self) -> String {
        let cursor = self.cursor.load(Ordering::Relaxed);
        serde_json::json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "cursor": if cursor < 0 { None } else { Some(cursor) },
            "lag_seconds": self.lag_seconds(),
            "last_error": self.last_error(),
        })
        .to_string()
    }

    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let labelled = |out: &mut String,
                        name: &str,
                        help: &str,
                        label: &str,
                        values: BTreeMap<&'static str, u64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v) in values {
                let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
            }
        };
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(&mut out, FRAMES, "Binary frames received.", r(&self.frames));
        counter(
            &mut out,
            FRAME_BYTES,
            "Bytes of binary frames received.",
            r(&self.frame_bytes),
        );
        labelled(
            &mut out,
            EVENTS,
            "Decoded events by kind.",
            "kind",
            self.events.snapshot(),
        );
        labelled(
            &mut out,
            ROUTED_FILES,
            "Cache files written by folder.",
            "folder",
            self.routed.snapshot(),
        );
        labelled(
            &mut out,
            DROPS,
            "Frames, ops or records dropped, by reason.",
            "reason",
            self.drops.snapshot(),
        );
        counter(
            &mut out,
            DUPLICATES,
            "Events skipped because their rev was not newer.",
            r(&self.duplicates),
        );
        counter(
            &mut out,
            SKIPPED_SEQ,
            "Frames skipped because their seq was already handled.",
            r(&self.skipped_seq),
        );
        counter(
            &mut out,
            RECONNECTS,
            "Reconnects to the relay.",
            r(&self.reconnects),
        );
        counter(
            &mut out,
            STALLS,
            "Connections closed by the stall watchdog.",
            r(&self.stalls),
        );
        counter(
            &mut out,
            SEQ_RESETS,
            "Connections whose first seq was at or below the requested cursor (reset or another relay).",
            r(&self.seq_resets),
        );
        counter(
            &mut out,
            OUTDATED_CURSOR,
            "OutdatedCursor infos: events were lost upstream.",
            r(&self.outdated_cursor),
        );
        counter(
            &mut out,
            WRITE_ERRORS,
            "Failed cache writes or syncs (retried).",
            r(&self.write_errors),
        );
        counter(&mut out, COMMITS, "Cursor commits.", r(&self.commits));
        counter(
            &mut out,
            RELOADS,
            "Tracked-set reloads applied.",
            r(&self.reloads),
        );
        counter(
            &mut out,
            RELOAD_FAILURES,
            "Tracked-set reloads refused (the previous sets stay).",
            r(&self.reload_failures),
        );
        let _ = writeln!(
            out,
            "# HELP {CURSOR} Committed cursor (seq).\n# TYPE {CURSOR} gauge\n{CURSOR} {}",
            self.cursor.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP {LAG} Seconds behind the last handled event's time.\n# TYPE {LAG} gauge\n{LAG} {}", self.lag_seconds().unwrap_or(0.0));
        let _ = writeln!(out, "# HELP {CONNECTED} 1 when connected to the relay.\n# TYPE {CONNECTED} gauge\n{CONNECTED} {}", u8::from(self.connected.load(Ordering::Relaxed)));
        out
    }
}

/// Serves `/health` and `/metrics` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while len < buf.len() {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        stream.read(&mut buf[len..]),
                    )
                    .await
                    {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => {
                            len += n;
                            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
                let request = String::from_utf8_lossy(&buf[..len]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/health" => ("200 OK", "application/json", metrics.health_json()),
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.prometheus()),
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "not found: try /health or /metrics\n".to_owned(),
                    ),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(local)
}
