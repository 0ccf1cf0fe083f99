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
use std::collections::HashSet;

use sync_core::chain::{check_commit, check_sync, ChainState, ChainVerdict};
use sync_core::frame::{decode_frame, Action, Commit, Event, SyncEvent};
use sync_core::ids::{Did, Nsid, Seq};
use sync_core::records::RecordKind;
use sync_core::repo::{RepoRecord, VerifiedRepo};
use sync_core::resync::{self, Change, RepairContext};
use sync_core::route::{route_event, Applied, CacheFile, RoutingState, StateUpdate};
use sync_core::time::rfc3339_to_unix_micros;
use sync_core::transform::sync_timestamp;
use sync_core::verify::VerifyOptions;
use sync_core::verify::{verify_commit, verify_sync, VerifiedCommit};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Bytes;
use tracing::{debug, error, info, warn};

use crate::cache::{CacheError, CacheWriter};
use crate::config::VerifyMode;
use crate::metrics::Metrics;
use crate::repair::{repair_backoff, RepairRequest, RepairResult, MAX_IN_FLIGHT};
use crate::state::{RevRecord, StateStore, WorkKind};
use crate::tracked::DidSet;
use crate::verifier::{Ahead, Identities};
use crate::withdrawn::Screen;

mod withdraw;
pub use withdraw::Withdrawals;

/// What the processor receives, in order.
#[derive(Debug)]
pub enum Input {
    /// Frames in arrival order.
    Frames(Vec<Bytes>),
    /// Frames in arrival order, with what the verification stage checked ahead (by position).
    Verified(Vec<Bytes>, Vec<Option<Ahead>>),
    /// Time to check whether a commit is due (sent by a ticker while frames are scarce).
    Tick,
    /// New tracked sets (SIGHUP): study users, in-network users.
    Reload(DidSet, DidSet),
    /// A new `--withdrawn` list (SIGHUP), sent just before the `Reload` it was read with.
    Withdrawn(std::collections::HashSet<Did>),
    /// The source switched to a live tail with lower seqs (FutureCursor with `--on-future-cursor=live`).
    ResetSeq,
    /// A repo fetched for a backfill or resync (or why it could not be).
    Repaired(Box<crate::repair::RepairResult>),
    /// The source is done (end of replay or shutdown): commit and stop.
    End,
}

/// `--verify` and where its keys come from.
pub struct Verification {
    pub mode: VerifyMode,
    /// `None` only with `VerifyMode::Off`.
    pub identities: Option<Arc<dyn Identities>>,
}

impl Verification {
    pub fn off() -> Verification {
        Verification {
            mode: VerifyMode::Off,
            identities: None,
        }
    }
}

/// Backfill and resync: where fetch requests go, and the backfill policy.
#[derive(Default)]
pub struct Repairs {
    /// `None`: no fetcher (an offline replay): the queue is kept for a later run.
    pub requests: Option<tokio::sync::mpsc::UnboundedSender<RepairRequest>>,
    pub backfill: bool,
    /// `--backfill-since`, Unix microseconds.
    pub backfill_since: Option<i64>,
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
    verification: Verification,
    repairs: Repairs,
    /// Repos whose fetch request is out (at most [`MAX_IN_FLIGHT`]).
    in_flight: HashSet<Did>,
    /// When [`Self::dispatch_repairs`] last went through the queue (at most every
    /// [`REPAIR_SCAN_EVERY`]: after an OutdatedCursor the queue holds every tracked repo).
    last_repair_scan: Option<Instant>,
    /// When parked entries were last checked for repos tracked again.
    last_unpark_scan: Option<Instant>,
    /// Repos whose chain broke again while their fetch was out.
    refetch: HashSet<Did>,
    /// Consent withdrawal (`processor/withdraw.rs`).
    withdrawals: Withdrawals,
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
            verification: Verification::off(),
            repairs: Repairs::default(),
            in_flight: HashSet::new(),
            refetch: HashSet::new(),
            withdrawals: Withdrawals::default(),
            last_repair_scan: None,
            last_unpark_scan: None,
        }
    }

    /// Sets the verification policy and the backfill/resync machinery (both off by default),
    /// and queues the study users never backfilled.
    pub fn with_repairs(mut self, verification: Verification, repairs: Repairs) -> Self {
        self.verification = verification;
        self.repairs = repairs;
        self.queue_backfills();
        self
    }

    /// Queues a backfill for every study user neither backfilled nor queued (start, reload).
    fn queue_backfills(&mut self) {
        if !self.repairs.backfill {
            return;
        }
        for did in self.state.study_users_to_backfill() {
            if self.state.enqueue(&did, WorkKind::Backfill, "first_seen") {
                self.metrics.resync_queued("first_seen");
                info!(repo = %did, "study user queued for backfill");
                self.dirty = true;
            }
        }
        self.dispatch_repairs();
    }

    /// Sends due queue entries to the fetcher, up to [`MAX_IN_FLIGHT`] at a time. Goes through
    /// the queue at most every [`REPAIR_SCAN_EVERY`] (the ticks, every commit interval, make
    /// sure nothing waits longer): it is called for every repair result and queued resync, and
    /// the queue may hold every tracked repo.
    fn dispatch_repairs(&mut self) {
        if self
            .last_repair_scan
            .is_some_and(|t| t.elapsed() < REPAIR_SCAN_EVERY)
        {
            return;
        }
        self.last_repair_scan = Some(Instant::now());
        if self
            .last_unpark_scan
            .is_none_or(|t| t.elapsed() >= UNPARK_SCAN_EVERY)
        {
            self.last_unpark_scan = Some(Instant::now());
            let tracked_again: Vec<Did> = self
                .state
                .work_items()
                .filter(|(did, w)| w.parked && self.state.tracked(did))
                .map(|(did, _)| did.clone())
                .collect();
            for did in tracked_again {
                self.state.park_work(&did, false);
            }
        }
        self.metrics
            .resync_queue_depth
            .store(self.state.work_depth() as u64, Ordering::Relaxed);
        if self.repairs.requests.is_none() {
            return;
        }
        // All slots taken: nothing to sort (an OutdatedCursor may queue every tracked repo).
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return;
        }
        let now = crate::state::unix_now();
        let mut due: Vec<(Did, WorkKind, u32)> = self
            .state
            .work_items()
            .filter(|(did, w)| {
                !w.failed && !w.parked && w.not_before <= now && !self.in_flight.contains(*did)
            })
            .map(|(did, w)| (did.clone(), w.kind, w.attempts))
            .collect();
        // Fewest attempts first, so one repo that keeps failing does not hold up the rest; only
        // the few that can go out now are put in order (the rest may be a million entries).
        let take = (MAX_IN_FLIGHT - self.in_flight.len()) * 4;
        if due.len() > take {
            due.select_nth_unstable_by_key(take, |(_, _, attempts)| *attempts);
            due.truncate(take);
        }
        due.sort_by_key(|(_, _, attempts)| *attempts);
        for (did, kind, _) in due {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            if !self.state.tracked(&did) {
                // Untracked since it was queued (a reload, an unfollow): parked, not fetched.
                self.state.park_work(&did, true);
                continue;
            }
            self.state.park_work(&did, false);
            let Some(requests) = &self.repairs.requests else {
                return;
            };
            if requests
                .send(RepairRequest {
                    did: did.clone(),
                    kind,
                })
                .is_err()
            {
                return;
            }
            debug!(repo = %did, kind = kind.label(), "repo fetch requested");
            self.in_flight.insert(did);
        }
        self.metrics
            .repairs_in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    /// Consumes inputs until `End` (or the channel closes), then commits.
    pub fn run(mut self, mut rx: mpsc::Receiver<Input>) -> Result<ProcessorSummary> {
        self.purge_at_start()?;
        while let Some(input) = rx.blocking_recv() {
            match input {
                Input::Frames(frames) => {
                    // Frames being handled are not settled, whatever an idle tick handled just
                    // before them recorded (the source stamps arrival before a batch is sent).
                    self.metrics.frame_arrived();
                    for frame in &frames {
                        self.handle_frame(frame.len(), decode_frame(frame), None)?;
                    }
                }
                Input::Verified(frames, mut ahead) => {
                    self.metrics.frame_arrived();
                    for (i, frame) in frames.iter().enumerate() {
                        let checked = ahead.get_mut(i).and_then(Option::take);
                        self.handle_frame(frame.len(), decode_frame(frame), checked)?;
                    }
                }
                Input::Tick => self.dispatch_repairs(),
                Input::Repaired(result) if self.withdrawn_repair(&result.did) => {}
                Input::Repaired(result) => {
                    self.apply_repair(*result)?;
                    self.dispatch_repairs();
                }
                Input::Reload(study, in_network) => {
                    info!(
                        study_users = study.len(),
                        in_network = in_network.len(),
                        "tracked sets reloaded"
                    );
                    self.state.replace_sets(study, in_network);
                    // After the new study-user file is taken: one taken out of it is not written
                    // back to the withdrawn list.
                    self.list_account_deletions();
                    // Parked repairs of repos the new sets track again go out now.
                    self.last_unpark_scan = None;
                    self.last_repair_scan = None;
                    self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                    self.queue_backfills();
                }
                Input::Withdrawn(dids) => self.reload_withdrawn(dids)?,
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

    fn handle_frame(
        &mut self,
        len: usize,
        event: Result<Event<'_>, sync_core::frame::FrameError>,
        ahead: Option<Ahead>,
    ) -> Result<()> {
        self.summary.frames += 1;
        self.metrics.frame(len);
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                self.metrics.dropped(e.reason());
                warn!(error = %e, bytes = len, "dropping undecodable frame");
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
        // Nothing by or about a withdrawn participant is routed (checked like the tracked sets).
        let Some(screen) = self.screen_withdrawn(seq, &event)? else {
            self.advance(seq);
            return Ok(());
        };
        let routed_event = match &screen {
            Screen::Ops { event, .. } => &**event,
            _ => &event,
        };
        match &event {
            Event::Info(info) if info.name == "OutdatedCursor" => {
                self.metrics.outdated_cursor.fetch_add(1, Ordering::Relaxed);
                error!(message = ?info.message, cursor = ?self.last_seq, "relay says OutdatedCursor: the cursor fell out of its replay window, events between it and the oldest retained event were LOST upstream; every tracked repo is queued for a resync");
                let repos =
                    self.retry_state("listing tracked repos", seq, |p| p.state.repos_to_resync())?;
                for did in repos {
                    self.enqueue_resync(&did, "outdated_cursor");
                }
                self.dispatch_repairs();
            }
            Event::Identity(identity) => {
                if let Some(identities) = &self.verification.identities {
                    if self.verification.mode == VerifyMode::All
                        || self.state.tracked(&identity.did)
                    {
                        identities.changed(&identity.did);
                    }
                }
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
            let routing = route_event(routed_event, &p.state, &clock);
            match p.state.take_lookup_error() {
                Some(e) => Err(anyhow::anyhow!(e)),
                None => Ok(routing),
            }
        })?;
        // Verification before anything of the event is written.
        let mut chain_after: Option<ChainState> = None;
        let mut gap: Option<&'static str> = None;
        match &event {
            Event::Commit(c) => {
                let tracked = self.state.tracked(&c.repo);
                if self.must_verify(tracked, !routing.files.is_empty()) {
                    let verified = match self.verify_commit(c, ahead) {
                        Ok(v) => v,
                        Err(reason) => {
                            self.verify_failed(seq, &c.repo, c.rev.as_str(), reason, tracked);
                            self.advance(seq);
                            return Ok(());
                        }
                    };
                    self.metrics
                        .verified_commits
                        .fetch_add(1, Ordering::Relaxed);
                    if tracked {
                        let held =
                            self.retry_state("chain lookup", seq, |p| p.state.chain(&c.repo))?;
                        match check_commit(held.as_ref(), &verified, c.since) {
                            ChainVerdict::Duplicate => {
                                self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                                debug!(seq, repo = %c.repo, rev = %c.rev, "commit not newer than the repo's chain state");
                                self.advance(seq);
                                return Ok(());
                            }
                            ChainVerdict::Gap(g) => gap = Some(g.reason()),
                            ChainVerdict::First | ChainVerdict::InOrder => {}
                        }
                        chain_after = Some(ChainState::after(&verified.commit));
                    }
                }
            }
            Event::Sync(sync)
                if self.verification.mode != VerifyMode::Off && self.state.tracked(&sync.did) =>
            {
                self.handle_sync(seq, sync)?;
            }
            _ => {}
        }
        for dropped in &routing.dropped {
            self.metrics.dropped(dropped.reason);
            debug!(seq, reason = dropped.reason, detail = %dropped.detail, "dropped op");
        }
        if let (Event::Commit(c), false) = (&event, routing.dropped.is_empty()) {
            // A record the commit should have carried and did not (verification, when on,
            // already refused such a commit and queued the resync): the repo's copy has it, if
            // the resync compares that collection for this repo. Not for a bad CID (the author's
            // record, which a resync would not verify either), and never re-enabling an entry
            // that failed for good (a repo over --max-repo-bytes).
            let (study, in_network) = (
                self.state.is_study_user(&c.repo),
                self.state.is_in_network(&c.repo),
            );
            let missed = (study || in_network)
                && routing.dropped.iter().any(|d| {
                    matches!(d.reason, "missing_block" | "missing_cid" | "cid_mismatch")
                        && d.op_index
                            .and_then(|i| c.ops.get(i))
                            .and_then(|op| op.as_ref().ok())
                            .is_some_and(|op| {
                                relevant_collection(study, in_network, &op.collection)
                            })
                });
            let failed_for_good = self.state.work_item(&c.repo).is_some_and(|w| w.failed);
            if missed && !failed_for_good {
                self.queue_resync(&c.repo, "missing_record");
            }
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
                    "a study user deleted a follow made before tracking began: its subject is unknown and stays in-network; recorded in unknown_unfollows"
                );
            }
        }
        for file in &routing.files {
            self.metrics.routed(file.folder);
            debug!(seq, path = %file.path, "routed");
        }
        self.summary.files += routing.files.len() as u64;
        if let Event::Commit(c) = &event {
            self.hold_ops(c);
        }
        let time = match &event {
            Event::Commit(c) if chain_after.is_some() => {
                if let Some(chain) = chain_after {
                    self.state.record_chain(&c.repo, chain);
                }
                if let Some(reason) = gap {
                    info!(seq, repo = %c.repo, rev = %c.rev, since = ?c.since, reason, "gap in a tracked repo's chain: queued for a resync");
                    self.queue_resync(&c.repo, reason);
                }
                Some(c.time)
            }
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

    fn must_verify(&self, tracked: bool, produces_files: bool) -> bool {
        match self.verification.mode {
            VerifyMode::Off => false,
            VerifyMode::All => true,
            VerifyMode::Routed => tracked || produces_files,
        }
    }

    /// Verifies a commit with its repo's key; a bad signature is tried once more with the
    /// document fetched again (the key may have rotated without an `#identity` we saw).
    fn verify_commit(
        &self,
        c: &Commit<'_>,
        ahead: Option<Ahead>,
    ) -> Result<VerifiedCommit, &'static str> {
        let identities = self
            .verification
            .identities
            .as_ref()
            .ok_or("no_identity_source")?;
        let identity = identities.identity(&c.repo)?;
        let opts = VerifyOptions::at(now_micros());
        let first = match ahead {
            // Checked with the key the repo still has (no `#identity` changed it since). A rev
            // the stage found ahead of its clock is judged again at this one: the stage may have
            // checked it a moment ago (up to its queue's depth), and the verdict must be the
            // one verifying in turn would give.
            Some(ahead)
                if ahead.identity.signing_key == identity.signing_key
                    && !matches!(ahead.result, Err("future_rev")) =>
            {
                ahead.result
            }
            _ => verify_commit(c, &identity.signing_key, &opts).map_err(|e| e.reason()),
        };
        match first {
            Ok(v) => Ok(v),
            Err("bad_signature") => {
                let fresh = identities.refresh(&c.repo)?;
                if fresh.signing_key == identity.signing_key {
                    return Err("bad_signature");
                }
                info!(repo = %c.repo, "signing key changed since the cached document; verifying with the new one");
                verify_commit(c, &fresh.signing_key, &opts).map_err(|e| e.reason())
            }
            Err(reason) => Err(reason),
        }
    }

    fn verify_failed(
        &mut self,
        seq: Option<i64>,
        repo: &Did,
        rev: &str,
        reason: &'static str,
        tracked: bool,
    ) {
        self.metrics.verify_failed(reason);
        if tracked {
            warn!(seq, repo = %repo, rev, reason, "dropping a tracked repo's commit that failed verification (nothing of it is written); the repo is queued for a resync");
            self.queue_resync(repo, reason);
        } else {
            warn!(seq, repo = %repo, rev, reason, "dropping a commit that failed verification (nothing of it is written)");
        }
    }

    /// A tracked repo's `#sync`: verified, then compared with the chain state; a newer tree
    /// queues a resync.
    fn handle_sync(&mut self, seq: Option<i64>, sync: &SyncEvent) -> Result<()> {
        let Some(identities) = self.verification.identities.as_ref() else {
            return Ok(());
        };
        let opts = VerifyOptions::at(now_micros());
        let verified = identities
            .identity(&sync.did)
            .and_then(|id| verify_sync(sync, &id.signing_key, &opts).map_err(|e| e.reason()));
        let signed = match verified {
            Ok(signed) => signed,
            Err(reason) => {
                self.verify_failed(seq, &sync.did, sync.rev.as_str(), reason, true);
                return Ok(());
            }
        };
        self.metrics
            .verified_commits
            .fetch_add(1, Ordering::Relaxed);
        let held = self.retry_state("chain lookup", seq, |p| p.state.chain(&sync.did))?;
        match check_sync(held.as_ref(), &signed) {
            ChainVerdict::Gap(g) => {
                info!(seq, repo = %sync.did, rev = %sync.rev, "#sync announces a newer tree: queued for a resync");
                // Later commits continue from the announced state.
                self.state
                    .record_chain(&sync.did, ChainState::after(&signed));
                self.queue_resync(&sync.did, g.reason());
            }
            ChainVerdict::First => self.queue_resync(&sync.did, "sync_first_seen"),
            ChainVerdict::InOrder => self
                .state
                .record_chain(&sync.did, ChainState::after(&signed)),
            ChainVerdict::Duplicate => {}
        }
        Ok(())
    }

    /// Queues a resync of `did` (once; a queued backfill covers it) and asks for it.
    fn queue_resync(&mut self, did: &Did, reason: &'static str) {
        if self.enqueue_resync(did, reason) {
            self.dispatch_repairs();
        }
    }

    /// [`Self::queue_resync`] without asking the fetcher yet. A repo whose fetch is already out
    /// may have been fetched before what this reason reports: it is fetched once more after the
    /// result is applied.
    fn enqueue_resync(&mut self, did: &Did, reason: &'static str) -> bool {
        if self.in_flight.contains(did) {
            self.refetch.insert(did.clone());
        }
        let queued = self.state.enqueue(did, WorkKind::Resync, reason);
        if queued {
            self.metrics.resync_queued(reason);
            self.dirty = true;
        }
        queued
    }

    /// Keeps the tracked repo's records as the stream changes them (what a resync diffs with).
    fn hold_ops(&mut self, c: &Commit<'_>) {
        let study = self.state.is_study_user(&c.repo);
        let in_network = self.state.is_in_network(&c.repo);
        if !study && !in_network {
            return;
        }
        for op in c.ops.iter().flatten() {
            if !relevant_collection(study, in_network, &op.collection) {
                continue;
            }
            let cid = match op.action {
                // Held only if it could be routed: a record whose block is missing, does not
                // match its CID or has no CID was dropped, and held as if routed a resync would
                // find it "unchanged" and never write it (held as a delete, it would hide it).
                Action::Create | Action::Update => match (op.cid, c.record_block(op)) {
                    (Some(cid), Ok(Some(_))) => Some(cid.to_string()),
                    _ => continue,
                },
                Action::Delete => None,
            };
            self.state
                .hold(&c.repo, &op.collection, &op.rkey, cid, &c.rev);
        }
    }

    /// A fetched repo (or why it could not be fetched).
    fn apply_repair(&mut self, result: RepairResult) -> Result<()> {
        let RepairResult { did, outcome } = result;
        self.in_flight.remove(&did);
        self.metrics
            .repairs_in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
        let Some(item) = self.state.work_item(&did).cloned() else {
            return Ok(());
        };
        if !self.state.tracked(&did) {
            // Untracked while it was fetched (a reload, an unfollow): its records would be
            // routed as a stranger's. The entry stays queued, parked: tracked again (a re-follow,
            // the study-user file restored), the repo is fetched then, so the gap that queued it
            // is still repaired (its chain state stayed where the gap left it).
            self.refetch.remove(&did);
            self.state.park_work(&did, true);
            self.metrics.repair_failed("untracked");
            info!(repo = %did, "repair parked: the repo is no longer tracked; it is repaired if it is tracked again");
            return Ok(());
        }
        match outcome {
            Err(failure) => {
                self.metrics.repair_failed(failure.reason);
                let retry_at = (!failure.permanent).then(|| {
                    let backoff = failure
                        .retry_after
                        .unwrap_or_else(|| repair_backoff(item.attempts));
                    crate::state::unix_now() + backoff.as_secs().max(1) as i64
                });
                match retry_at {
                    Some(at) => {
                        warn!(repo = %did, kind = item.kind.label(), reason = failure.reason, error = %failure.message, attempts = item.attempts + 1, retry_in_secs = at - crate::state::unix_now(), "repo fetch failed; will retry")
                    }
                    None => {
                        error!(repo = %did, kind = item.kind.label(), reason = failure.reason, error = %failure.message, "repo fetch failed permanently: not retried until the writer restarts; the repo stays out of sync")
                    }
                }
                self.state.work_failed(&did, failure.message, retry_at);
                self.dirty = true;
                Ok(())
            }
            Ok(repo) => {
                self.apply_repo(&did, item.kind, &repo)?;
                if self.refetch.remove(&did) {
                    info!(repo = %did, "the repo's chain broke again while it was being fetched: fetching it once more");
                    self.queue_resync(&did, "gap_during_fetch");
                }
                Ok(())
            }
        }
    }

    /// Diffs a verified repo with what is held for it and writes what was missed (creates,
    /// updates, deletes) through the ordinary routing, then moves the chain state to the repo's
    /// commit. Everything becomes durable with the next barrier, files first.
    fn apply_repo(&mut self, did: &Did, kind: WorkKind, repo: &VerifiedRepo) -> Result<()> {
        let study = self.state.is_study_user(did);
        let in_network = self.state.is_in_network(did);
        let held = self.retry_state("held records", None, |p| p.state.held_records(did))?;
        let rev = repo.commit.rev;
        let diff = resync::diff(&repo.records, &rev, held, |c| {
            relevant_collection(study, in_network, c)
        });
        // Which missed records are also written as cache files (the rest only feed the indexes).
        // While the processor catches up (its stream position more than the margin behind the
        // clock, e.g. after an upgrade or an outage), the stream commits between that position
        // and the fetched rev will be skipped as duplicates once the chain moves to the fetched
        // rev: records created after the position (less a margin for clocks) are written now.
        // Live, that window is the fetch's latency and the rule below applies as is.
        let now_us = now_micros() as i64;
        let stream_us = self.metrics.last_event_time_us.load(Ordering::Relaxed);
        let stream_gate = (stream_us > 0 && now_us - stream_us > REPAIR_CLOCK_MARGIN_US)
            .then(|| stream_us.saturating_sub(REPAIR_CLOCK_MARGIN_US));
        let at_most = |since: i64| stream_gate.map_or(since, |gate| since.min(gate));
        let since: Option<i64> = match kind {
            WorkKind::Backfill => self.repairs.backfill_since.map(at_most).or(stream_gate),
            WorkKind::Resync if self.state.is_backfilled(did) => Some(i64::MIN),
            WorkKind::Resync => {
                // Since the writer first saw the repo (an hour before this repair when it has
                // not recorded that yet).
                let first = self
                    .retry_state("first seen", None, |p| p.state.first_seen(did))?
                    .map(|secs| secs.saturating_mul(1_000_000))
                    .unwrap_or_else(|| now_us.saturating_sub(3_600_000_000));
                Some(at_most(first))
            }
        };
        let written = |record: &RepoRecord| -> bool {
            let Some(since) = since else { return false };
            if since == i64::MIN {
                return true;
            }
            let created = repo
                .record_json(record)
                .ok()
                .and_then(|json| resync::created_at_micros(&json, &record.rkey));
            // No creation time: written (a research team would rather have it than not).
            created.is_none_or(|t| t >= since)
        };
        let mut write: Vec<Change<'_>> = Vec::new();
        let mut index_only: Vec<Change<'_>> = Vec::new();
        for record in &diff.creates {
            if written(record) {
                write.push(Change::Create(record));
            } else {
                index_only.push(Change::Create(record));
            }
        }
        for record in &diff.updates {
            if written(record) {
                write.push(Change::Update(record));
            } else {
                index_only.push(Change::Update(record));
            }
        }
        let (written_creates, indexed) = (
            write
                .iter()
                .filter(|c| !matches!(c, Change::Delete(_)))
                .count(),
            index_only.len(),
        );
        write.extend(diff.deletes.iter().map(Change::Delete));
        let time = now_rfc3339();
        let ctx = RepairContext {
            seq: Seq(self.last_seq.unwrap_or(0)),
            time: &time,
        };
        let clock = self.clock().to_owned();
        let mut files = 0u64;
        for (changes, write_files) in [(&write, true), (&index_only, false)] {
            let commits = resync::assemble(repo, did, ctx, changes)
                .map_err(|e| anyhow::anyhow!("assembling repaired records of {did}: {e}"))?;
            for commit in commits {
                let Some(event) = self.screen_repaired(Event::Commit(commit)) else {
                    continue;
                };
                let routing = self.retry_state("state lookup", None, |p| {
                    let routing = route_event(&event, &p.state, &clock);
                    match p.state.take_lookup_error() {
                        Some(e) => Err(anyhow::anyhow!(e)),
                        None => Ok(routing),
                    }
                })?;
                for dropped in &routing.dropped {
                    self.metrics.dropped(dropped.reason);
                    debug!(repo = %did, reason = dropped.reason, detail = %dropped.detail, "dropped repaired record");
                }
                if write_files {
                    for file in &routing.files {
                        self.write_with_retry(None, file)?;
                        self.metrics.routed(file.folder);
                        debug!(repo = %did, path = %file.path, "repaired");
                    }
                    files += routing.files.len() as u64;
                }
                for update in &routing.updates {
                    let keep = write_files
                        || matches!(
                            update,
                            StateUpdate::StudyPost { .. } | StateUpdate::StudyFollow { .. }
                        );
                    if keep {
                        self.state
                            .apply(update)
                            .context("updating the state indexes from a repaired repo")?;
                    }
                }
            }
        }
        // The repair is done before its records are held: a delete is then forgotten, not kept
        // as a tombstone.
        self.state.work_done(did, kind, rev);
        for record in diff.creates.iter().chain(&diff.updates) {
            self.state.hold(
                did,
                &record.collection,
                &record.rkey,
                Some(record.cid.to_string()),
                &rev,
            );
        }
        for deleted in &diff.deletes {
            self.state
                .hold(did, &deleted.collection, &deleted.rkey, None, &rev);
        }
        self.state.purge_tombstones(did);
        // The chain state and the duplicate bound stay where the stream left them: stream
        // commits not handled yet (older than the fetched rev, or newer) are still handled, and
        // rewrite the same file names. Moving the bound to the fetched rev would skip the ones
        // in between, whose records a repair that only indexes (or a create gate) did not write.
        let label = kind.label();
        self.metrics.repair_completed(label);
        let (creates_label, deletes_label, index_label) = match kind {
            WorkKind::Backfill => ("backfill_create", "backfill_delete", "backfill_index"),
            WorkKind::Resync => ("resync_create", "resync_delete", "resync_index"),
        };
        self.metrics
            .repair_records(creates_label, written_creates as u64);
        self.metrics
            .repair_records(deletes_label, diff.deletes.len() as u64);
        self.metrics.repair_records(index_label, indexed as u64);
        info!(
            repo = %did,
            kind = label,
            rev = %rev,
            records = repo.records.len(),
            written = written_creates,
            deleted = diff.deletes.len(),
            indexed,
            unchanged = diff.unchanged,
            files,
            "repo repaired from its PDS"
        );
        self.summary.files += files;
        self.dirty = true;
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

/// The collections a resync compares for a repo: every routed kind for a study user, posts for
/// an in-network account.
pub fn relevant_collection(study: bool, in_network: bool, collection: &Nsid) -> bool {
    (study && RecordKind::of(collection).is_some())
        || (in_network && collection.as_str() == sync_core::records::POST)
}

/// Least time between two passes of [`Processor::dispatch_repairs`] over the queue.
const REPAIR_SCAN_EVERY: Duration = Duration::from_millis(250);

/// How often parked queue entries are checked for repos tracked again.
const UNPARK_SCAN_EVERY: Duration = Duration::from_secs(10);

/// How far before the stream position a repair still writes records as files: `createdAt` is
/// the author's clock, event times the relay's.
const REPAIR_CLOCK_MARGIN_US: i64 = 10 * 60 * 1_000_000;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The wall clock as RFC 3339 (UTC, milliseconds), the `time` of repaired deletes.
pub(crate) fn now_rfc3339() -> String {
    let micros = now_micros() as i64;
    // `%Y-%m-%d-%H:%M:%S` -> `%Y-%m-%dT%H:%M:%S.mmmZ`
    let stamp = sync_timestamp(micros.div_euclid(1_000_000));
    format!(
        "{}T{}.{:03}Z",
        &stamp[..10],
        &stamp[11..],
        micros.rem_euclid(1_000_000) / 1_000
    )
}
