//! The processor: frames in order -> decode -> dedupe -> route -> cache files, and the durability
//! barrier that makes files durable before the cursor covering them is committed.
//!
//! Runs on its own thread; the bounded channel in front of it is the only buffer, so a slow or
//! failing disk slows reading instead of growing memory. A failing write is retried with backoff
//! forever (the cursor does not move, /health reports the error); no event is ever skipped.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sync_core::frame::{decode_frame, Event};
use sync_core::route::{route_event, Applied, CacheFile, RoutingState, StateUpdate};
use sync_core::time::rfc3339_to_unix_micros;
use sync_core::transform::sync_timestamp;
use sync_core::verify::VerifyOptions;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Bytes;
use tracing::{debug, error, info, warn};

use crate::cache::{CacheError, CacheWriter};
use crate::metrics::Metrics;
use crate::state::{RevRecord, StateStore};
use crate::tracked::DidSet;

/// What the processor receives, in order.
#[derive(Debug)]
pub enum Input {
    /// Frames in arrival order.
    Frames(Vec<Bytes>),
    /// Time to check whether a commit is due (sent by a ticker while frames are scarce).
    Tick,
    /// New tracked sets (SIGHUP): study users, in-network users.
    Reload(DidSet, DidSet),
    /// The source switched to a live tail with lower seqs (FutureCursor with `--on-future-cursor=live`).
    ResetSeq,
    /// The source is done (end of replay or shutdown): commit and stop.
    End,
}

/// What a processor run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessorSummary {
    pub frames: u64,
    pub files: u64,
    pub commits: u64,
    pub cursor: Option<i64>,
}

pub struct Processor {
    cache: CacheWriter,
    state: StateStore,
    metrics: Arc<Metrics>,
    /// Last handled seq (may be ahead of the committed cursor).
    last_seq: Option<i64>,
    dirty: bool,
    last_commit: Instant,
    commit_interval: Duration,
    clock_secs: i64,
    clock: String,
    /// Shared with the source: the last committed cursor (its resume point after
    /// `ConsumerTooSlow`).
    pub durable_cursor: Arc<AtomicI64>,
    shutdown: Arc<AtomicBool>,
    summary: ProcessorSummary,
}

/// Marks an error that must stop the writer instead of being retried.
#[derive(Debug)]
struct Fatal;

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unrecoverable cache flush failure")
    }
}

impl std::error::Error for Fatal {}

/// After a failed fsync or syncfs the kernel may have dropped the pages and a later flush can
/// report success anyway: such an error stops the writer, and the restart replays from the
/// durable cursor (the temp files are removed at start-up). Other cache errors are retried.
fn cache_error(e: CacheError) -> anyhow::Error {
    let fatal = e.is_flush_failure();
    let e = anyhow::Error::from(e);
    if fatal {
        e.context(Fatal)
    } else {
        e
    }
}

/// A barrier is also due after this many unsynced files, bounding the work (and the temp
/// files) of one barrier during a burst.
const MAX_PENDING_FILES: usize = 4096;
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Processor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: CacheWriter,
        state: StateStore,
        metrics: Arc<Metrics>,
        start_seq: Option<i64>,
        commit_interval: Duration,
        durable_cursor: Arc<AtomicI64>,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        if let Some(c) = state.cursor() {
            metrics.cursor.store(c, Ordering::Relaxed);
        }
        // The resume point until the first commit: where this run starts (`--cursor` may
        // rewind below the stored cursor; a live tail has none), not where the previous run ended.
        if let Some(c) = start_seq {
            durable_cursor.store(c, Ordering::Relaxed);
        }
        Processor {
            cache,
            state,
            metrics,
            last_seq: start_seq,
            dirty: false,
            last_commit: Instant::now(),
            commit_interval,
            clock_secs: -1,
            clock: String::new(),
            durable_cursor,
            shutdown,
            summary: ProcessorSummary::default(),
        }
    }

    /// Consumes inputs until `End` (or the channel closes), then commits.
    pub fn run(mut self, mut rx: mpsc::Receiver<Input>) -> Result<ProcessorSummary> {
        while let Some(input) = rx.blocking_recv() {
            match input {
                Input::Frames(frames) => {
                    for frame in &frames {
                        self.handle_frame(frame)?;
                    }
                }
                Input::Tick => {}
                Input::Reload(study, in_network) => {
                    info!(
                        study_users = study.len(),
                        in_network = in_network.len(),
                        "tracked sets reloaded"
                    );
                    self.state.replace_sets(study, in_network);
                    self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                }
                Input::ResetSeq => {
                    self.last_seq = None;
                    // The old stream's cursor means nothing to the new one.
                    self.durable_cursor.store(-1, Ordering::Relaxed);
                }
                Input::End => break,
            }
            let due = self.last_commit.elapsed() >= self.commit_interval
                || self.cache.pending() >= MAX_PENDING_FILES;
            if self.dirty && due {
                self.commit()?;
            } else if !self.dirty && self.cache.pending() == 0 {
                // Nothing handled needs a commit: /health must not count this as stuck.
                self.metrics.settled();
            }
            self.metrics.set_pending_files(self.cache.pending());
        }
        self.commit()?;
        self.summary.cursor = self.state.cursor();
        info!(cursor = ?self.summary.cursor, frames = self.summary.frames, files = self.summary.files, "processor stopped; cache and cursor are durable");
        Ok(self.summary)
    }

    fn clock(&mut self) -> &str {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if now != self.clock_secs {
            self.clock_secs = now;
            self.clock = sync_timestamp(now);
        }
        &self.clock
    }

    fn handle_frame(&mut self, bytes: &[u8]) -> Result<()> {
        self.summary.frames += 1;
        self.metrics.frame(bytes.len());
        let event = match decode_frame(bytes) {
            Ok(event) => event,
            Err(e) => {
                self.metrics.dropped(e.reason());
                warn!(error = %e, bytes = bytes.len(), "dropping undecodable frame");
                return Ok(());
            }
        };
        self.metrics.event(event.kind());
        let seq = event.seq().map(|s| s.0);
        if let (Some(seq), Some(last)) = (seq, self.last_seq) {
            if seq <= last {
                self.metrics.skipped_seq.fetch_add(1, Ordering::Relaxed);
                debug!(seq, last, "skipping already handled seq");
                return Ok(());
            }
        }
        match &event {
            Event::Info(info) if info.name == "OutdatedCursor" => {
                self.metrics.outdated_cursor.fetch_add(1, Ordering::Relaxed);
                error!(message = ?info.message, cursor = ?self.last_seq, "relay says OutdatedCursor: the cursor fell out of its replay window, events between it and the oldest retained event were LOST upstream");
            }
            Event::Info(info) => info!(name = %info.name, message = ?info.message, "relay info"),
            Event::Error(e) => warn!(error = %e.error, message = ?e.message, "relay error frame"),
            Event::Skipped { kind, seq } => debug!(?kind, ?seq, "skipping message kind"),
            _ => {}
        }
        if let Event::Commit(commit) = &event {
            if self.state.is_duplicate(&commit.repo, &commit.rev) {
                self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                // A study user's skipped commit is worth seeing in the log: if the rev memory
                // were ever wrong, this is the only trace of what was not captured.
                if self.state.is_study_user(&commit.repo) {
                    info!(seq, repo = %commit.repo, rev = %commit.rev, "skipping a study user's duplicate commit (rev not newer than the last captured)");
                } else {
                    debug!(seq, repo = %commit.repo, rev = %commit.rev, "duplicate event (rev not newer)");
                }
                self.advance(seq);
                return Ok(());
            }
        }
        let clock = self.clock().to_owned();
        // A failed index lookup would silently drop a reaction: route again until the lookups
        // succeed (the cursor does not move meanwhile).
        let routing = self.retry_state("state lookup", seq, |p| {
            let routing = route_event(&event, &p.state, &clock);
            match p.state.take_lookup_error() {
                Some(e) => Err(anyhow::anyhow!(e)),
                None => Ok(routing),
            }
        })?;
        for dropped in &routing.dropped {
            self.metrics.dropped(dropped.reason);
            debug!(seq, reason = dropped.reason, detail = %dropped.detail, "dropped op");
        }
        for file in &routing.files {
            self.write_with_retry(seq, file)?;
        }
        for update in &routing.updates {
            // Not retried: a failed apply may have changed part of the in-memory indexes, so the
            // safe recovery is the restart's replay from the durable cursor. It is still counted
            // and shown before the writer stops.
            let applied = match self.state.apply(update) {
                Ok(applied) => applied,
                Err(e) => {
                    self.metrics.state_errors.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .set_cache_error(Some(format!("state index update: {e:#}")));
                    return Err(e).context("updating the state indexes");
                }
            };
            if let (Applied::UnknownUnfollow, StateUpdate::StudyUnfollow { uri, follower, .. }) =
                (applied, update)
            {
                self.metrics
                    .unknown_unfollows
                    .fetch_add(1, Ordering::Relaxed);
                info!(
                    seq,
                    repo = %follower,
                    rkey = uri.rkey().unwrap_or_default(),
                    "a study user deleted a follow made before tracking began: its subject is unknown and stays in-network; recorded in unknown_unfollows for the repo backfill"
                );
            }
        }
        for file in &routing.files {
            self.metrics.routed(file.folder);
            debug!(seq, path = %file.path, "routed");
        }
        self.summary.files += routing.files.len() as u64;
        let time = match &event {
            Event::Commit(c) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0);
                if self
                    .state
                    .record_rev(&c.repo, &c.rev, &VerifyOptions::at(now))
                    == RevRecord::FutureRev
                {
                    // Routed all the same (the ops are real data); only the rev is not trusted.
                    self.metrics.future_revs.fetch_add(1, Ordering::Relaxed);
                    if self.state.is_study_user(&c.repo) {
                        warn!(seq, repo = %c.repo, rev = %c.rev, "study user's commit has a rev more than 5 minutes ahead of the clock: routed, but not kept as the repo's duplicate bound");
                    } else {
                        debug!(seq, repo = %c.repo, rev = %c.rev, "commit rev ahead of the clock: not kept as a duplicate bound");
                    }
                }
                Some(c.time)
            }
            Event::Identity(i) => Some(i.time.as_str()),
            Event::Account(a) => Some(a.time.as_str()),
            Event::Sync(s) => Some(s.time.as_str()),
            _ => None,
        };
        if let Some(us) = time.and_then(rfc3339_to_unix_micros) {
            self.metrics.last_event_time_us.store(us, Ordering::Relaxed);
        }
        self.advance(seq);
        Ok(())
    }

    fn advance(&mut self, seq: Option<i64>) {
        if let Some(seq) = seq {
            self.last_seq = Some(seq);
            self.dirty = true;
        }
    }

    /// Runs a cache operation until it succeeds; failures count as cache write errors.
    fn retry<T>(
        &mut self,
        what: &str,
        seq: Option<i64>,
        op: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.retry_counted(what, seq, |m| &m.write_errors, op)
    }

    /// As [`Self::retry`] for state (SQLite) operations, counted as state errors.
    fn retry_state<T>(
        &mut self,
        what: &str,
        seq: Option<i64>,
        op: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.retry_counted(what, seq, |m| &m.state_errors, op)
    }

    fn retry_counted<T>(
        &mut self,
        what: &str,
        seq: Option<i64>,
        errors: fn(&Metrics) -> &AtomicU64,
        mut op: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let mut delay = RETRY_START;
        let mut failed = false;
        loop {
            match op(self) {
                Ok(v) => {
                    if failed {
                        info!(seq, "{what} recovered");
                        self.metrics.set_cache_error(None);
                    }
                    return Ok(v);
                }
                Err(e) if e.is::<Fatal>() || e.chain().any(|c| c.is::<Fatal>()) => {
                    errors(&self.metrics).fetch_add(1, Ordering::Relaxed);
                    self.metrics.set_cache_error(Some(format!("{what}: {e:#}")));
                    error!(seq, error = %format!("{e:#}"), "{what} failed in a way a retry cannot repair; stopping with the cursor at the last durable seq");
                    return Err(e);
                }
                Err(e) => {
                    failed = true;
                    errors(&self.metrics).fetch_add(1, Ordering::Relaxed);
                    self.metrics.set_cache_error(Some(format!("{what}: {e:#}")));
                    error!(seq, error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what} failed; the cursor will not move until it succeeds");
                    if self.shutdown.load(Ordering::Relaxed) {
                        bail!("shutting down while {what} is failing: {e:#}; the cursor stays at the last durable seq");
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn write_with_retry(&mut self, seq: Option<i64>, file: &CacheFile) -> Result<()> {
        self.retry("cache write", seq, |p| {
            p.cache
                .write(&file.path, file.contents.as_bytes())
                .map_err(cache_error)
        })
    }

    /// The durability barrier: files flushed and renamed, directory entries flushed
    /// ([`CacheWriter::sync`]), then the cursor and state updates committed in one transaction.
    fn commit(&mut self) -> Result<()> {
        if !self.dirty && self.cache.pending() == 0 {
            return Ok(());
        }
        let seq = self.last_seq;
        let started = Instant::now();
        self.retry("cache sync", seq, |p| {
            p.cache.sync().map(|_| ()).map_err(cache_error)
        })?;
        self.retry_state("state commit", seq, |p| p.state.commit(seq))?;
        if let Some(seq) = seq {
            self.metrics.cursor.store(seq, Ordering::Relaxed);
            self.durable_cursor.store(seq, Ordering::Relaxed);
        }
        self.metrics.committed(started.elapsed());
        self.summary.commits += 1;
        self.dirty = false;
        self.last_commit = Instant::now();
        Ok(())
    }
}
