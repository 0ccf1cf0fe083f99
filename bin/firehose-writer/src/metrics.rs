//! Metrics and health: every metric name is declared here. The pipeline updates plain atomics;
//! prometheus-client encodes them (with the histograms, the scrape-time gauges and the process
//! metrics) for `/metrics`, and [`Metrics::health`] is the `/health` verdict (`http.rs` serves both).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::processor::Input;

pub const FRAMES: &str = "firehose_frames_total";
/// The same total as `firehose_frame_bytes_sum`; kept for existing queries. It can coexist with
/// the histogram only because `/metrics` is Prometheus text 0.0.4 (in OpenMetrics both would be
/// the family `firehose_frame_bytes`).
pub const FRAME_BYTES: &str = "firehose_frame_bytes_total";
pub const FRAME_SIZE: &str = "firehose_frame_bytes";
pub const EVENTS: &str = "firehose_events_total";
pub const ROUTED_FILES: &str = "firehose_routed_files_total";
pub const DROPS: &str = "firehose_drops_total";
pub const DUPLICATES: &str = "firehose_duplicate_events_total";
pub const FUTURE_REVS: &str = "firehose_future_rev_commits_total";
pub const SKIPPED_SEQ: &str = "firehose_replayed_seq_skipped_total";
pub const RECONNECTS: &str = "firehose_reconnects_total";
pub const STALLS: &str = "firehose_stalls_total";
pub const SEQ_RESETS: &str = "firehose_seq_resets_total";
pub const OUTDATED_CURSOR: &str = "firehose_outdated_cursor_total";
pub const WRITE_ERRORS: &str = "firehose_cache_write_errors_total";
pub const STATE_ERRORS: &str = "firehose_state_errors_total";
pub const COMMITS: &str = "firehose_cursor_commits_total";
pub const COMMIT_DURATION: &str = "firehose_commit_duration_seconds";
pub const RELOADS: &str = "firehose_tracked_set_reloads_total";
pub const RELOAD_FAILURES: &str = "firehose_tracked_set_reload_failures_total";
pub const CURSOR: &str = "firehose_cursor";
pub const LAG: &str = "firehose_lag_seconds";
pub const CONNECTED: &str = "firehose_connected";
pub const UNKNOWN_UNFOLLOWS: &str = "firehose_unknown_unfollows_total";
pub const WITHDRAWN_DIDS: &str = "firehose_withdrawn_dids";
pub const WITHDRAWN_FILES_REMOVED: &str = "firehose_withdrawn_files_removed_total";
pub const WITHDRAWN_ROWS_PURGED: &str = "firehose_withdrawn_index_rows_purged_total";
pub const WITHDRAWN_UNLISTED: &str = "firehose_withdrawn_account_deletions_unlisted";
pub const WITHDRAWN_DROPS: &str = "firehose_withdrawn_drops_total";
pub const VERIFIED_COMMITS: &str = "firehose_verified_commits_total";
pub const VERIFY_FAILURES: &str = "firehose_verify_failures_total";
pub const RESYNCS: &str = "firehose_resyncs_total";
pub const RESYNC_QUEUE_DEPTH: &str = "firehose_resync_queue_depth";
pub const REPAIRS_IN_FLIGHT: &str = "firehose_repairs_in_flight";
pub const REPAIRS_COMPLETED: &str = "firehose_repairs_completed_total";
pub const REPAIR_FAILURES: &str = "firehose_repair_failures_total";
pub const REPAIR_RECORDS: &str = "firehose_repair_records_total";
pub const IDENTITY_LOOKUPS: &str = "firehose_identity_lookups_total";
pub const IDENTITY_HOSTS_REFUSED: &str = "firehose_identity_hosts_refused";
pub const LAST_COMMIT: &str = "firehose_last_commit_timestamp_seconds";
pub const LAST_EVENT: &str = "firehose_last_event_timestamp_seconds";
pub const PENDING_FILES: &str = "firehose_pending_files";
pub const CHANNEL_BATCHES: &str = "firehose_channel_batches";
pub const BUILD_INFO: &str = "firehose_build_info";
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";

/// `/health` turns unhealthy when frames wait this many commit intervals without a commit.
pub const NO_COMMIT_INTERVALS: u32 = 10;

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

/// Reads labelled counts kept elsewhere (the identity resolver's), at scrape time.
type LookupCounts = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;
type Reading = Box<dyn Fn() -> u64 + Send + Sync>;

/// Counters, gauges and health inputs shared by the source, the processor and the HTTP endpoint.
pub struct Metrics {
    pub frames: AtomicU64,
    pub frame_bytes: AtomicU64,
    frame_size: Histogram,
    events: Labelled,
    routed: Labelled,
    drops: Labelled,
    /// Commits (and `#sync`s) that passed verification.
    pub verified_commits: AtomicU64,
    /// Commits and `#sync`s dropped by verification, by reason.
    verify_failures: Labelled,
    /// Repos queued for a resync or backfill, by reason.
    resyncs: Labelled,
    /// Queued repos (backfill and resync) not yet done; failed ones excluded.
    pub resync_queue_depth: AtomicU64,
    pub repairs_in_flight: AtomicU64,
    repairs_completed: Labelled,
    repair_failures: Labelled,
    /// Files written by repairs, by `<kind>_<create|update|delete>`.
    repair_records: Labelled,
    /// Identity lookups by result (from the resolver's own counters, read at scrape time).
    identity_lookups: OnceLock<LookupCounts>,
    /// Identity hosts whose circuit breaker is open now (read at scrape time).
    identity_hosts_refused: OnceLock<Reading>,
    pub duplicates: AtomicU64,
    /// Commits whose rev is more than 5 minutes ahead of the clock: routed, never a dedupe bound.
    pub future_revs: AtomicU64,
    pub skipped_seq: AtomicU64,
    pub reconnects: AtomicU64,
    pub stalls: AtomicU64,
    /// Connections whose first seq was at or below the cursor asked for.
    pub seq_resets: AtomicU64,
    pub outdated_cursor: AtomicU64,
    /// Failed cache writes and flushes (each attempt).
    pub write_errors: AtomicU64,
    /// Failed state (SQLite) lookups and commits (each attempt).
    pub state_errors: AtomicU64,
    pub commits: AtomicU64,
    /// Study users' deletes of follows never seen (made before tracking began, without a
    /// backfill): the subject is unknown, so it stays in-network.
    pub unknown_unfollows: AtomicU64,
    /// Withdrawn DIDs in effect (the `--withdrawn` list and account deletions counted as
    /// withdrawals).
    pub withdrawn_dids: AtomicU64,
    /// Cache files removed by withdrawal purges.
    pub withdrawn_files_removed: AtomicU64,
    /// State index rows removed by withdrawal purges.
    pub withdrawn_rows_purged: AtomicU64,
    /// Account deletions taken as withdrawals that the last attempt could not add to the
    /// `--withdrawn` file (tried again at every start and reload).
    pub withdrawn_unlisted: AtomicU64,
    /// Events (by a withdrawn DID) and ops (naming one) not routed, by `what`.
    withdrawn_drops: Labelled,
    commit_duration: Histogram,
    /// Tracked-set reloads applied (SIGHUP).
    pub reloads: AtomicU64,
    /// Reloads refused because a file did not parse (the old sets stay).
    pub reload_failures: AtomicU64,
    /// Committed cursor, -1 before the first commit.
    pub cursor: AtomicI64,
    /// `time` of the last handled event, Unix microseconds (0 = none yet).
    pub last_event_time_us: AtomicI64,
    /// Wall clock of the last commit, Unix microseconds (0 = none yet).
    last_commit_time_us: AtomicI64,
    /// Files written but not yet made durable by a commit.
    pending_files: AtomicU64,
    /// The channels between the socket and the processor (the source's, and the verification
    /// stage's when verification is on), for their occupancy; weak so metrics never keep them
    /// open.
    channels: Mutex<Vec<mpsc::WeakSender<Input>>>,
    connected: AtomicBool,
    /// Health clocks: milliseconds since `started` plus one, so that 0 can mean "never".
    started: Instant,
    /// When the oldest frame not yet committed (or found to need no commit) arrived; 0 when
    /// everything handled is settled. A sentinel rather than two timestamps compared, so that
    /// an arrival and a settle in the same millisecond cannot hide a stuck processor.
    unsettled_since_ms: AtomicU64,
    /// When the relay connection was lost (or the writer started); 0 while connected.
    disconnected_since_ms: AtomicU64,
    commit_interval_ms: AtomicU64,
    /// 0: no relay connection to watch (replay).
    stall_timeout_ms: AtomicU64,
    /// Failing cache writes/flushes or state lookups/commits: cleared by the processor on recovery.
    cache_error: Mutex<Option<String>>,
    /// Connection problems and relay error frames: cleared by the first event after them.
    source_error: Mutex<Option<String>>,
}

/// The `/health` verdict: `healthy` maps to 200, otherwise 503; `json` is the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub healthy: bool,
    pub json: serde_json::Value,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            frames: AtomicU64::new(0),
            frame_bytes: AtomicU64::new(0),
            // 128 B .. 4 MiB: relay frames are mostly 0.5–20 KiB; the limit is 5 MiB.
            frame_size: Histogram::new(exponential_buckets(128.0, 2.0, 16)),
            events: Labelled::default(),
            routed: Labelled::default(),
            drops: Labelled::default(),
            verified_commits: AtomicU64::new(0),
            verify_failures: Labelled::default(),
            resyncs: Labelled::default(),
            resync_queue_depth: AtomicU64::new(0),
            repairs_in_flight: AtomicU64::new(0),
            repairs_completed: Labelled::default(),
            repair_failures: Labelled::default(),
            repair_records: Labelled::default(),
            identity_lookups: OnceLock::new(),
            identity_hosts_refused: OnceLock::new(),
            duplicates: AtomicU64::new(0),
            future_revs: AtomicU64::new(0),
            skipped_seq: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            outdated_cursor: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            state_errors: AtomicU64::new(0),
            seq_resets: AtomicU64::new(0),
            unknown_unfollows: AtomicU64::new(0),
            withdrawn_dids: AtomicU64::new(0),
            withdrawn_files_removed: AtomicU64::new(0),
            withdrawn_rows_purged: AtomicU64::new(0),
            withdrawn_unlisted: AtomicU64::new(0),
            withdrawn_drops: Labelled::default(),
            commits: AtomicU64::new(0),
            // 1 ms .. 30 s: a barrier is a syncfs, renames and one SQLite commit; seconds mean a
            // struggling disk, and a retried failure can stretch one barrier much further.
            commit_duration: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            cursor: AtomicI64::new(-1),
            last_event_time_us: AtomicI64::new(0),
            last_commit_time_us: AtomicI64::new(0),
            pending_files: AtomicU64::new(0),
            channels: Default::default(),
            connected: AtomicBool::new(false),
            started: Instant::now(),
            unsettled_since_ms: AtomicU64::new(0),
            disconnected_since_ms: AtomicU64::new(1),
            commit_interval_ms: AtomicU64::new(500),
            stall_timeout_ms: AtomicU64::new(0),
            cache_error: Mutex::new(None),
            source_error: Mutex::new(None),
        }
    }
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// What `/health` judges against: the commit interval, and the stall timeout when the
    /// source is a relay connection (`None` for a replay, which has no connection).
    pub fn configure_health(&self, commit_interval: Duration, stall_timeout: Option<Duration>) {
        self.commit_interval_ms
            .store(commit_interval.as_millis() as u64, Ordering::Relaxed);
        self.stall_timeout_ms.store(
            stall_timeout.map_or(0, |d| d.as_millis() as u64),
            Ordering::Relaxed,
        );
    }

    /// Adds a channel between the socket and the processor to `firehose_channel_batches` (and
    /// to what /health waits for before it calls the processor settled).
    pub fn watch_channel(&self, tx: &mpsc::Sender<Input>) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx.downgrade());
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// A frame of `len` bytes was received (it is counted whether or not it decodes).
    pub fn frame(&self, len: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.frame_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.frame_size.observe(len as f64);
    }

    /// A frame arrived from upstream: from now on, no commit for a while means no progress.
    pub fn frame_arrived(&self) {
        // The oldest unsettled arrival counts: a later one must not restart the clock.
        let _ = self.unsettled_since_ms.compare_exchange(
            0,
            self.now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The processor has nothing left to make durable (idle, or every handled frame needed none).
    pub fn settled(&self) {
        // Inputs still queued behind this one (frames that arrived before it was handled) are
        // not settled: marking them so would hide a processor that then gets stuck on them.
        if self.channel_batches().unwrap_or(0) > 0 {
            return;
        }
        self.unsettled_since_ms.store(0, Ordering::Relaxed);
    }

    /// A durability barrier completed after `took`.
    pub fn committed(&self, took: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.commit_duration.observe(took.as_secs_f64());
        self.last_commit_time_us
            .store(unix_micros(), Ordering::Relaxed);
        self.pending_files.store(0, Ordering::Relaxed);
        // A commit is progress: what is queued behind it starts a fresh wait, and nothing
        // queued means everything handled is settled.
        let queued = if self.channel_batches().unwrap_or(0) > 0 {
            self.now_ms()
        } else {
            0
        };
        self.unsettled_since_ms.store(queued, Ordering::Relaxed);
    }

    pub fn set_pending_files(&self, n: usize) {
        self.pending_files.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        let since = if connected { 0 } else { self.now_ms() };
        self.disconnected_since_ms.store(since, Ordering::Relaxed);
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn event(&self, kind: &'static str) {
        self.events.inc(kind, 1);
    }
    pub fn routed(&self, folder: &'static str) {
        self.routed.inc(folder, 1);
    }
    /// Not routed because of a withdrawal: `event` (by a withdrawn DID) or `op` (naming one).
    pub fn withdrawn_dropped(&self, what: &'static str, n: u64) {
        self.withdrawn_drops.inc(what, n);
    }

    /// Events (`event`) or ops (`op`) not routed because of a withdrawal so far.
    pub fn withdrawn_drops(&self, what: &str) -> u64 {
        self.withdrawn_drops
            .snapshot()
            .get(what)
            .copied()
            .unwrap_or(0)
    }

    pub fn dropped(&self, reason: &'static str) {
        self.drops.inc(reason, 1);
    }
    pub fn verify_failed(&self, reason: &'static str) {
        self.verify_failures.inc(reason, 1);
    }
    pub fn verify_failures(&self) -> BTreeMap<&'static str, u64> {
        self.verify_failures.snapshot()
    }
    pub fn resync_queued(&self, reason: &'static str) {
        self.resyncs.inc(reason, 1);
    }
    pub fn resyncs(&self) -> BTreeMap<&'static str, u64> {
        self.resyncs.snapshot()
    }
    pub fn repair_completed(&self, kind: &'static str) {
        self.repairs_completed.inc(kind, 1);
    }
    pub fn repairs_completed(&self) -> BTreeMap<&'static str, u64> {
        self.repairs_completed.snapshot()
    }
    pub fn repair_failed(&self, reason: &'static str) {
        self.repair_failures.inc(reason, 1);
    }
    pub fn repair_failures(&self) -> BTreeMap<&'static str, u64> {
        self.repair_failures.snapshot()
    }
    pub fn repair_records(&self, change: &'static str, n: u64) {
        if n > 0 {
            self.repair_records.inc(change, n);
        }
    }
    pub fn repair_record_counts(&self) -> BTreeMap<&'static str, u64> {
        self.repair_records.snapshot()
    }
    /// Where identity lookup counts come from (the resolver), read at each scrape.
    pub fn watch_identity_lookups(
        &self,
        read: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
    ) {
        let _ = self.identity_lookups.set(Box::new(read));
    }
    pub fn watch_identity_hosts_refused(&self, read: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.identity_hosts_refused.set(Box::new(read));
    }
    fn identity_hosts_refused(&self) -> Option<u64> {
        self.identity_hosts_refused.get().map(|read| read())
    }
    fn identity_lookups(&self) -> BTreeMap<&'static str, u64> {
        self.identity_lookups
            .get()
            .map(|read| read().into_iter().collect())
            .unwrap_or_default()
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
    fn cache_error(&self) -> Option<String> {
        self.cache_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// The current problem, if any: a cache problem first (it blocks the cursor), else a
    /// connection problem not yet followed by an event.
    pub fn last_error(&self) -> Option<String> {
        self.cache_error().or_else(|| {
            self.source_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// Seconds between now and the `time` of the last handled event.
    pub fn lag_seconds(&self) -> Option<f64> {
        let t = self.last_event_time_us.load(Ordering::Relaxed);
        if t == 0 {
            return None;
        }
        Some((unix_micros() - t).max(0) as f64 / 1e6)
    }

    /// Why the writer is not making progress, if it is not: frames arrive but nothing was
    /// committed for [`NO_COMMIT_INTERVALS`] commit intervals, the cache or state keeps failing,
    /// or the relay connection has been down for longer than the stall timeout.
    pub fn unhealthy_reasons(&self) -> Vec<String> {
        let now = self.now_ms();
        let mut reasons = Vec::new();
        let secs = |ms: u64| ms as f64 / 1000.0;
        let limit = self
            .commit_interval_ms
            .load(Ordering::Relaxed)
            .saturating_mul(NO_COMMIT_INTERVALS.into());
        let since = self.unsettled_since_ms.load(Ordering::Relaxed);
        let waiting = now.saturating_sub(since);
        if since > 0 && waiting > limit {
            reasons.push(format!(
                "no_commit: frames arrive but nothing was committed for {:.1} s (limit {:.1} s, {NO_COMMIT_INTERVALS} commit intervals)",
                secs(waiting),
                secs(limit)
            ));
        }
        if let Some(error) = self.cache_error() {
            reasons.push(format!("cache_or_state_failing: {error}"));
        }
        let stall = self.stall_timeout_ms.load(Ordering::Relaxed);
        let since = self.disconnected_since_ms.load(Ordering::Relaxed);
        if stall > 0 && since > 0 && now.saturating_sub(since) > stall {
            reasons.push(format!(
                "disconnected: no relay connection for {:.1} s (stall timeout {:.1} s)",
                secs(now.saturating_sub(since)),
                secs(stall)
            ));
        }
        reasons
    }

    pub fn health(&self) -> Health {
        let cursor = self.cursor.load(Ordering::Relaxed);
        let reasons = self.unhealthy_reasons();
        let healthy = reasons.is_empty();
        Health {
            healthy,
            json: serde_json::json!({
                "status": if healthy { "ok" } else { "unhealthy" },
                "reasons": reasons,
                "connected": self.is_connected(),
                "cursor": if cursor < 0 { None } else { Some(cursor) },
                "lag_seconds": self.lag_seconds(),
                "last_error": self.last_error(),
                "resync_queue_depth": self.resync_queue_depth.load(Ordering::Relaxed),
                "repairs_in_flight": self.repairs_in_flight.load(Ordering::Relaxed),
                "identity_hosts_refused": self.identity_hosts_refused(),
            }),
        }
    }

    pub fn health_json(&self) -> String {
        self.health().json.to_string()
    }

    /// Batches waiting in every watched channel still open; `None` when none is.
    fn channel_batches(&self) -> Option<usize> {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .iter()
            .filter_map(|weak| weak.upgrade())
            .map(|tx| tx.max_capacity() - tx.capacity())
            .reduce(|a, b| a + b)
    }
}

/// `/metrics` as text, outside the HTTP server (tests, diagnostics).
pub fn render(metrics: &Arc<Metrics>) -> String {
    let mut body = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a collector.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut body, &registry(metrics));
    body
}

/// The registry `/metrics` encodes: the histograms and build info, and a collector reading the
/// atomics, the scrape-time gauges and the process metrics.
pub fn registry(metrics: &Arc<Metrics>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        COMMIT_DURATION,
        "Duration of the durability barrier: file syncs, renames and the SQLite commit",
        metrics.commit_duration.clone(),
    );
    registry.register(
        FRAME_SIZE,
        "Size of the binary frames received",
        metrics.frame_size.clone(),
    );
    registry.register(
        BUILD_INFO.trim_end_matches("_info"),
        "The running build",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register_collector(Box::new(ScrapeTime(metrics.clone())));
    registry
}

/// Reads everything that is not a registered metric at each scrape.
struct ScrapeTime(Arc<Metrics>);

impl fmt::Debug for ScrapeTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScrapeTime")
    }
}

fn counter<N>(enc: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> fmt::Result
where
    ConstCounter<N>: EncodeMetric,
{
    // The encoder appends `_total` to a counter family's name.
    let family = name.strip_suffix("_total").unwrap_or(name);
    let counter = ConstCounter::new(value);
    counter.encode(enc.encode_descriptor(family, help, None, counter.metric_type())?)
}

fn labelled(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: BTreeMap<&'static str, u64>,
) -> fmt::Result {
    let family = name.strip_suffix("_total").unwrap_or(name);
    let mut metric = enc.encode_descriptor(family, help, None, MetricType::Counter)?;
    for (value, count) in values {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge<N>(enc: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let gauge = ConstGauge::new(value);
    gauge.encode(enc.encode_descriptor(name, help, None, gauge.metric_type())?)
}

impl Collector for ScrapeTime {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &self.0;
        let e = &mut enc;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(e, FRAMES, "Binary frames received.", r(&m.frames))?;
        counter(
            e,
            FRAME_BYTES,
            "Bytes of binary frames received.",
            r(&m.frame_bytes),
        )?;
        labelled(
            e,
            EVENTS,
            "Decoded events by kind.",
            "kind",
            m.events.snapshot(),
        )?;
        labelled(
            e,
            ROUTED_FILES,
            "Cache files written by folder.",
            "folder",
            m.routed.snapshot(),
        )?;
        labelled(
            e,
            DROPS,
            "Frames, ops or records dropped, by reason.",
            "reason",
            m.drops.snapshot(),
        )?;
        counter(
            e,
            DUPLICATES,
            "Events skipped because their rev was not newer.",
            r(&m.duplicates),
        )?;
        counter(
            e,
            FUTURE_REVS,
            "Commits whose rev is more than 5 minutes ahead of the clock (routed, not kept as the repo's duplicate bound).",
            r(&m.future_revs),
        )?;
        counter(
            e,
            SKIPPED_SEQ,
            "Frames skipped because their seq was already handled.",
            r(&m.skipped_seq),
        )?;
        counter(e, RECONNECTS, "Reconnects to the relay.", r(&m.reconnects))?;
        counter(
            e,
            STALLS,
            "Connections closed by the stall watchdog.",
            r(&m.stalls),
        )?;
        counter(
            e,
            SEQ_RESETS,
            "Connections whose first seq was at or below the requested cursor (reset or another relay).",
            r(&m.seq_resets),
        )?;
        counter(
            e,
            OUTDATED_CURSOR,
            "OutdatedCursor infos: events were lost upstream.",
            r(&m.outdated_cursor),
        )?;
        counter(
            e,
            WRITE_ERRORS,
            "Failed cache file writes and flushes (each attempt; writes are retried).",
            r(&m.write_errors),
        )?;
        counter(
            e,
            UNKNOWN_UNFOLLOWS,
            "Study users' unfollows of follows never seen (subject unknown; kept in-network, recorded in unknown_unfollows for the operator).",
            r(&m.unknown_unfollows),
        )?;
        gauge(
            e,
            WITHDRAWN_DIDS,
            "Withdrawn DIDs in effect (--withdrawn list and account deletions counted as withdrawals).",
            r(&m.withdrawn_dids),
        )?;
        counter(
            e,
            WITHDRAWN_FILES_REMOVED,
            "Cache files removed by consent-withdrawal purges.",
            r(&m.withdrawn_files_removed),
        )?;
        counter(
            e,
            WITHDRAWN_ROWS_PURGED,
            "State index rows removed by consent-withdrawal purges.",
            r(&m.withdrawn_rows_purged),
        )?;
        gauge(
            e,
            WITHDRAWN_UNLISTED,
            "Account deletions taken as withdrawals that could not be added to the --withdrawn file (retried at every start and reload; batch-export cannot purge them until they are listed).",
            r(&m.withdrawn_unlisted),
        )?;
        labelled(
            e,
            WITHDRAWN_DROPS,
            "Not routed because of a consent withdrawal: events of a withdrawn DID (what=event), ops naming one (what=op).",
            "what",
            m.withdrawn_drops.snapshot(),
        )?;
        counter(
            e,
            VERIFIED_COMMITS,
            "Commits and #sync events that passed verification (signature, structure, MST inversion).",
            r(&m.verified_commits),
        )?;
        labelled(
            e,
            VERIFY_FAILURES,
            "Commits and #sync events dropped because they failed verification, by reason (nothing of them is written).",
            "reason",
            m.verify_failures.snapshot(),
        )?;
        labelled(
            e,
            RESYNCS,
            "Repos queued for a repair from their PDS (resync or backfill), by reason.",
            "reason",
            m.resyncs.snapshot(),
        )?;
        gauge(
            e,
            RESYNC_QUEUE_DEPTH,
            "Repos waiting for a backfill or resync (failed ones excluded).",
            r(&m.resync_queue_depth),
        )?;
        gauge(
            e,
            REPAIRS_IN_FLIGHT,
            "Repo fetches (getRepo) in progress.",
            r(&m.repairs_in_flight),
        )?;
        labelled(
            e,
            REPAIRS_COMPLETED,
            "Repairs applied, by kind (backfill, resync).",
            "kind",
            m.repairs_completed.snapshot(),
        )?;
        labelled(
            e,
            REPAIR_FAILURES,
            "Failed repair attempts, by reason (retried with backoff unless the reason is permanent).",
            "reason",
            m.repair_failures.snapshot(),
        )?;
        labelled(
            e,
            REPAIR_RECORDS,
            "Records repaired from repos, by kind and change (e.g. resync_create, resync_delete, backfill_index).",
            "change",
            m.repair_records.snapshot(),
        )?;
        labelled(
            e,
            IDENTITY_LOOKUPS,
            "DID document lookups by result (cache hits, fetches, errors by reason).",
            "result",
            m.identity_lookups(),
        )?;
        if let Some(refused) = m.identity_hosts_refused() {
            gauge(
                e,
                IDENTITY_HOSTS_REFUSED,
                "Identity hosts (the PLC, did:web hosts) whose circuit breaker is open: lookups of them fail at once.",
                refused,
            )?;
        }
        counter(
            e,
            STATE_ERRORS,
            "Failed state database (SQLite) lookups and commits (each attempt; retried).",
            r(&m.state_errors),
        )?;
        counter(e, COMMITS, "Cursor commits.", r(&m.commits))?;
        counter(e, RELOADS, "Tracked-set reloads applied.", r(&m.reloads))?;
        counter(
            e,
            RELOAD_FAILURES,
            "Tracked-set reloads refused (the previous sets stay).",
            r(&m.reload_failures),
        )?;
        gauge(
            e,
            CONNECTED,
            "1 when connected to the relay.",
            i64::from(m.is_connected()),
        )?;
        gauge(
            e,
            PENDING_FILES,
            "Cache files written but not yet made durable by a commit.",
            r(&m.pending_files),
        )?;
        // Unknown values are left out rather than reported as 0, which would read as real.
        let cursor = m.cursor.load(Ordering::Relaxed);
        if cursor >= 0 {
            gauge(e, CURSOR, "Committed cursor (seq).", cursor)?;
        }
        if let Some(lag) = m.lag_seconds() {
            gauge(e, LAG, "Seconds behind the last handled event's time.", lag)?;
        }
        let event_us = m.last_event_time_us.load(Ordering::Relaxed);
        if event_us != 0 {
            gauge(
                e,
                LAST_EVENT,
                "The `time` of the last handled event, seconds since the epoch.",
                event_us as f64 / 1e6,
            )?;
        }
        let commit_us = m.last_commit_time_us.load(Ordering::Relaxed);
        if commit_us != 0 {
            gauge(
                e,
                LAST_COMMIT,
                "When the cursor was last committed, seconds since the epoch.",
                commit_us as f64 / 1e6,
            )?;
        }
        if let Some(batches) = m.channel_batches() {
            gauge(
                e,
                CHANNEL_BATCHES,
                "Inputs (frame batches) waiting in the channels between the socket and the processor.",
                batches as u64,
            )?;
        }
        process_metrics(e)
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape time (prometheus-client has
/// no process collector). Each is left out where the system does not provide it.
fn process_metrics(e: &mut DescriptorEncoder) -> fmt::Result {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|v| v * 1024)
        };
        if let Some(rss) = kib("VmRSS:") {
            gauge(
                e,
                PROCESS_RESIDENT_MEMORY,
                "Resident memory size in bytes.",
                rss,
            )?;
        }
        if let Some(size) = kib("VmSize:") {
            gauge(
                e,
                PROCESS_VIRTUAL_MEMORY,
                "Virtual memory size in bytes.",
                size,
            )?;
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            e,
            PROCESS_OPEN_FDS,
            "Number of open file descriptors.",
            dir.count() as u64,
        )?;
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))?
                .to_owned();
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        })
    {
        gauge(
            e,
            PROCESS_MAX_FDS,
            "Maximum number of open file descriptors.",
            max,
        )?;
    }
    if let (Some(stat), Some(ticks)) = (ProcStat::read(), clock_ticks()) {
        counter(
            e,
            PROCESS_CPU,
            "Total user and system CPU time spent in seconds.",
            stat.cpu_ticks as f64 / ticks,
        )?;
        if let Some(boot) = boot_time() {
            // Rounded to the clock tick, the resolution of the start time: the value then stays
            // the same from scrape to scrape.
            let start = ((boot + stat.start_ticks as f64 / ticks) * ticks).round() / ticks;
            gauge(
                e,
                PROCESS_START_TIME,
                "Start time of the process since unix epoch in seconds.",
                start,
            )?;
        }
    }
    Ok(())
}

/// The fields of `/proc/self/stat` the process metrics need, in clock ticks.
struct ProcStat {
    cpu_ticks: u64,
    /// Since boot.
    start_ticks: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        ProcStat::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<ProcStat> {
        // The command name (field 2) may contain spaces and parentheses: fields resume after
        // its last ')', with field 3 (state) first.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            cpu_ticks: field(14)? + field(15)?,
            start_ticks: field(22)?,
        })
    }
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

/// When the system booted, seconds since the epoch: the wall clock minus `CLOCK_BOOTTIME`, which
/// (unlike `btime` in /proc/stat) is available under systemd's `ProcSubset=pid`.
fn boot_time() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this stack.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let up = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some(now.as_secs_f64() - up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_handled_in_the_millisecond_of_a_settle_still_count_as_waiting() {
        let metrics = Metrics::new();
        metrics.configure_health(Duration::from_millis(1), None);
        // Arrival, an idle settle and the batch's own stamp, all within one millisecond as a
        // fast machine does them: the batch that then gets stuck must still be reported.
        metrics.frame_arrived();
        metrics.settled();
        metrics.frame_arrived();
        std::thread::sleep(Duration::from_millis(30));
        let reasons = metrics.unhealthy_reasons();
        assert!(
            reasons.iter().any(|r| r.starts_with("no_commit:")),
            "{reasons:?}"
        );
        // Settled again: healthy, however long ago the frames arrived.
        metrics.settled();
        assert!(metrics.unhealthy_reasons().is_empty());
        // A commit with nothing queued behind it settles too.
        metrics.frame_arrived();
        metrics.committed(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(metrics.unhealthy_reasons().is_empty());
    }

    #[test]
    fn open_identity_breakers_are_a_gauge_and_a_health_field_only_once_watched() {
        let metrics = Arc::new(Metrics::new());
        assert!(!render(&metrics).contains(IDENTITY_HOSTS_REFUSED));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&metrics.health_json()).unwrap()
                ["identity_hosts_refused"],
            serde_json::Value::Null
        );
        metrics.watch_identity_hosts_refused(|| 2);
        let text = render(&metrics);
        assert!(
            text.lines()
                .any(|l| l == format!("{IDENTITY_HOSTS_REFUSED} 2")),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&metrics.health_json()).unwrap()
                ["identity_hosts_refused"],
            2
        );
    }

    #[test]
    fn proc_stat_fields_follow_the_last_parenthesis() {
        // A command name may hold spaces and parentheses; utime 14, stime 15, starttime 22.
        let line = "4242 (fw (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 9 0 123456 287563776 6848 18446744073709551615";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(stat.cpu_ticks, 200);
        assert_eq!(stat.start_ticks, 123456);
        assert!(ProcStat::parse("4242 (truncated").is_none());
    }
}
