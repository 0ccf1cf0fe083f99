//! One export run: lock, check the state against the output, roll committed batches forward,
//! then batch by batch: read a snapshot of complete cache files, stage one Parquet file per
//! table, commit the journal (the commit point), publish, write the manifest, delete exactly
//! the exported files. Nothing published is ever removed (only `purge.rs` replaces files).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, TryLockError};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::config::{Config, Fault};
use crate::load;
use crate::manifest;
use crate::parquet::write_parquet;
use crate::scan::{self, FileId, FileRef, Read1, Walker};
use crate::sink::Sink;
use crate::state::{Batch, BatchOutput, FileKey, NewBatch, RunRows, State};
use crate::summary::Summary;
use crate::tables::{self, TableId};

/// How a run ended (errors are `Err`).
#[derive(Debug)]
pub enum RunOutcome {
    /// Another run holds the lock; nothing was done.
    Busy {
        lock: PathBuf,
    },
    Done(Summary),
    /// The run failed after it had started exporting: `summary` says what it did before
    /// (batches committed before the failure stay committed), with `summary.error` set.
    Failed {
        summary: Summary,
        error: anyhow::Error,
    },
}

enum Item {
    Gone,
    /// By or about a withdrawn participant (`--withdrawn`): never exported, removed.
    Withdrawn {
        id: FileId,
    },
    Unrecognised,
    Bad {
        id: Option<FileId>,
        reason: String,
    },
    Good {
        id: FileId,
        key: FileKey,
        parsed: load::Parsed,
    },
}

struct Run<'a> {
    config: &'a Config,
    state: Option<State>,
    sink: Option<Sink>,
    summary: Summary,
    /// Row de-duplication keys of this run (on disk).
    seen_rows: RunRows,
    /// Folders already warned about (bounded: one entry per unrecognised folder, logged once).
    unrecognised_dirs: HashSet<Arc<str>>,
    progress: indicatif::ProgressBar,
    /// Set once the progress bar is visible (or when it never should be).
    progress_shown: Arc<std::sync::atomic::AtomicBool>,
    /// Files the walk handed out so far.
    listed: u64,
    /// Names the run's deletes give the files they take (its walk skips them).
    takes: scan::TakeToken,
    /// Set when the run fails: the batch being read ahead stops reading.
    cancel_read: Arc<std::sync::atomic::AtomicBool>,
}

/// The cache's lock file (a dot-name: the writer and the walk ignore it).
pub const CACHE_LOCK: &str = ".export.lock";

pub(crate) enum Lock {
    Held(File),
    /// Another run holds it.
    Busy,
    /// The file cannot be created (read-only file system or no permission).
    Unavailable,
}

/// `flock`-style non-blocking lock of `path`, created if `create` (the lock is released when the
/// process ends, however it ends).
pub(crate) fn take_lock(path: &std::path::Path, create: bool) -> Result<Lock> {
    let opened = File::options()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(Lock::Unavailable)
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(Lock::Held(file)),
        Err(TryLockError::WouldBlock) => Ok(Lock::Busy),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// `6038` -> `6,038`: whole numbers for the progress line.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The progress line: files read, a whole rate with thousands separators (`6,038 files/s`)
/// and, once the walk is done and the total is known, how many files are left.
fn progress_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed} {human_pos} files read ({rate}){left}",
    )
    .map(|s| {
        s.with_key(
            "rate",
            |st: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{} files/s", thousands(st.per_sec() as u64));
            },
        )
        .with_key(
            "left",
            |st: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                // Known once the walk is done (the length is set then).
                if let Some(len) = st.len() {
                    let left = len.saturating_sub(st.pos());
                    let _ = write!(w, ", {} left", thousands(left));
                }
            },
        )
    })
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
}

/// Files after which a run counts as large enough for a progress bar.
const LARGE_RUN_FILES: u64 = 20_000;

pub fn run(config: &Config) -> Result<RunOutcome> {
    let started = Instant::now();
    if !config.cache_dir.is_dir() {
        bail!(
            "cache directory {} does not exist",
            config.cache_dir.display()
        );
    }
    if config.threads > 0 {
        // Fails only if a pool exists already (tests calling run twice): keep that one.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .build_global();
    }
    // Two non-blocking locks; a run that finds either held does nothing (exit 0). The state
    // directory's lock keeps one journal to one run; the cache's lock keeps one export at a time
    // deleting from a cache, even when two runs were given different --state-dir. Dry runs write
    // nothing: they take a lock only if its file exists.
    let state_lock = config.state_dir.join("lock");
    let _state_lock = if config.dry_run && !config.state_dir.is_dir() {
        None
    } else {
        fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        match take_lock(&state_lock, !config.dry_run)? {
            Lock::Held(f) => Some(f),
            Lock::Busy => return Ok(RunOutcome::Busy { lock: state_lock }),
            Lock::Unavailable => bail!(
                "cannot create {} (read-only or no permission); the state directory must be writable",
                state_lock.display()
            ),
        }
    };
    let cache_lock = config.cache_dir.join(CACHE_LOCK);
    let _cache_lock = if config.dry_run && !cache_lock.exists() {
        None
    } else {
        match take_lock(&cache_lock, !config.dry_run)? {
            Lock::Held(f) => Some(f),
            Lock::Busy => return Ok(RunOutcome::Busy { lock: cache_lock }),
            Lock::Unavailable => {
                // A read-only cache (a mounted copy, exported with its own --state-dir and
                // --clear-filepaths false): no run can delete from it, so there is nothing
                // for this lock to protect.
                tracing::warn!(lock = %cache_lock.display(), "cannot create the cache lock (read-only cache?); running without it");
                None
            }
        }
    };

    let state = if config.dry_run {
        State::open_read_only(&config.state_dir)?
    } else {
        Some(State::open(&config.state_dir)?)
    };
    if let Some(state) = &state {
        check_output_binding(config, state)?;
    }
    let mut state = state;
    let sink = if config.dry_run {
        None
    } else {
        Some(Sink::new(
            &config.output,
            &config.s3,
            config.state_dir.join("staging"),
        )?)
    };
    let mut adopted = 0;
    let mut withdrawn_not_purged = 0;
    if let (Some(state), Some(sink)) = (state.as_mut(), &sink) {
        if let Some(legacy) = state.legacy_unfinished()?.first() {
            return Err(anyhow::Error::new(crate::UsageError(format!(
                "batch {legacy} in {} was left unfinished by an older batch-export, which \
                 published before committing; this version never removes a published file. \
                 Run the previous version once to roll it back, then this one",
                config.state_dir.display()
            ))));
        }
        if config.adopt_output {
            // Checked first: a refused adoption leaves the state as it was.
            crate::purge::adopt_purges(config, state, sink)?;
            adopted = manifest::adopt(sink, state, &config.state_dir, config.dedupe_retention_secs)
                .context("--adopt-output: rebuilding the state from the output's manifests")?;
        }
        manifest::reconcile(sink, state, &config.state_dir).context(
            "checking the state directory against the output; nothing was exported and the cache is untouched",
        )?;
        // Consent purges first: a committed one is finished before anything is exported, and a
        // --withdrawn list that lacks a DID purged before is refused.
        withdrawn_not_purged = crate::purge::before_export(config, state, sink)?;
        if withdrawn_not_purged > 0 {
            tracing::warn!(
                participants = withdrawn_not_purged,
                "withdrawn participants not purged from the output yet: their new files are \
                 refused, but rows exported before they were listed stay until `batch-export \
                 purge` runs with this list (exit 3 until then)"
            );
        }
    }
    // A spinner on stderr, drawn only when stdout is a terminal and the run turns out large.
    let progress =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
    progress.set_style(progress_style());
    let mut run = Run {
        config,
        state,
        sink,
        summary: Summary::new(config),
        seen_rows: RunRows::new()?,
        unrecognised_dirs: HashSet::new(),
        progress,
        progress_shown: Arc::new(std::sync::atomic::AtomicBool::new(!config.progress)),
        listed: 0,
        takes: scan::TakeToken::new(),
        cancel_read: Arc::default(),
    };
    run.summary.batches_adopted = adopted as u64;
    run.summary.withdrawn_not_purged = withdrawn_not_purged;
    // Read before the walk: every file of events up to this cursor is in the cache now.
    let writer_cursor = match (&config.writer_state, config.dry_run) {
        (Some(path), false) => Some(manifest::read_writer_cursor(path)?),
        _ => None,
    };
    // The resume point's run begins after the newest batch before it (`Resume::first_batch_id`).
    let first_batch_id = match (&run.state, &writer_cursor) {
        (Some(s), Some(_)) => Some(s.last_published()?.map_or(0, |b| b.id) + 1),
        _ => None,
    };
    let mut result = run.go();
    if let (Ok(()), Some(state), Some(sink)) = (&result, &run.state, &run.sink) {
        // Hygiene, not part of the batch protocol: a failure is logged and retried next run.
        match manifest::expire_keys(sink, state, crate::now_secs(), config.dedupe_retention_secs) {
            Ok(0) => {}
            Ok(n) => {
                run.summary.keys_expired_batches = n;
                tracing::info!(
                    batches = n,
                    "emptied the keys objects of batches older than the key retention"
                );
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not empty the keys objects of old batches (the next run tries again)"
            ),
        }
    }
    if let (Ok(()), Some((cursor, upstream))) = (&result, writer_cursor) {
        // Only a run that left nothing behind covers every event up to the cursor.
        if !run.summary.needs_attention() {
            let last_batch_id = match &run.state {
                Some(s) => s.last_published()?.map(|b| b.id),
                None => None,
            };
            let sink = run.sink.as_ref().expect("sink outside dry runs");
            // An unreadable earlier point is replaced; its bound is unknown, so every batch
            // stays kept (0) until the next run.
            let keys_kept_from = first_batch_id.map(|first| match manifest::read_resume(sink) {
                Ok(previous) => manifest::next_keys_kept_from(previous.as_ref(), cursor, first),
                Err(_) => 0,
            });
            result = manifest::write_resume(
                sink,
                &manifest::Resume {
                    writer_cursor: cursor,
                    upstream,
                    last_batch_id,
                    first_batch_id,
                    keys_kept_from,
                    at: crate::now_secs(),
                },
            );
        } else {
            tracing::warn!(
                cursor,
                "the resume point is not moved: this run left files behind (exit 3)"
            );
        }
    }
    run.progress.finish_and_clear();
    run.summary.seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => Ok(RunOutcome::Done(run.summary)),
        Err(error) => {
            run.summary.error = Some(format!("{error:#}"));
            Ok(RunOutcome::Failed {
                summary: run.summary,
                error,
            })
        }
    }
}

/// A state directory describes one output: its exported-keys store says which cache files are
/// already in *that* output, and its journal's committed batches can only be published there.
/// Used with another output it would delete cache files whose rows never reach the first one
/// and skip files as "already exported" that the new one never got. So the first run records
/// the output and every later run must name the same one.
pub(crate) fn check_output_binding(config: &Config, state: &State) -> Result<()> {
    match state.bound_output()? {
        Some(bound) if bound != config.output_identity => {
            Err(anyhow::Error::new(crate::UsageError(format!(
                "the state directory {} belongs to the output {bound}, not {}: its journal and \
                 exported keys describe what was exported there. Run with that output (same \
                 --output and --s3-endpoint) to continue that export; to export this cache somewhere else, give that export its \
                 own --state-dir (on the live cache also --clear-filepaths false, so the regular \
                 export still gets every file), or export a copy of the cache",
                config.state_dir.display(),
                config.output_identity,
            ))))
        }
        Some(_) => Ok(()),
        None if config.dry_run => Ok(()),
        None => state.bind_output(&config.output_identity),
    }
}

/// One batch's files sorted by what happens to them.
#[derive(Default)]
struct Sorted {
    rows: BTreeMap<TableId, Vec<load::Row>>,
    /// Keys of the files this batch exports (duplicates within the run included).
    keys: Vec<FileKey>,
    /// Files to delete once the batch is published: exported now, or exported before.
    to_delete: Vec<(String, FileId)>,
    /// Files of withdrawn participants: removed whatever `--clear-filepaths` says.
    withdrawn: Vec<(String, FileId)>,
}

impl Run<'_> {
    fn go(&mut self) -> Result<()> {
        self.roll_forward()?;
        if let Some(state) = &self.state {
            if !self.config.dry_run {
                let n = state.prune(crate::now_secs(), self.config.dedupe_retention_secs)?;
                if n > 0 {
                    tracing::info!(generations = n, "forgot exported keys past the retention");
                }
            }
        }
        let mut walker = Walker::new(&self.config.cache_dir)?;
        if self.config.clear_cache && !self.config.dry_run {
            walker.prune_empty_dirs(self.config.prune_min_age_secs);
        }
        walker.skip_takes_of(&self.takes);
        let mut walk = walker.ahead(self.config.batch_files)?;
        // Batch N + 1's files are read (in parallel) while batch N is sorted, staged, committed,
        // published and deleted: at most two batches are held, one being read and one being
        // exported (and the walk lists the names of batch N + 2). Reading never changes
        // anything, and the files of two batches are disjoint.
        std::thread::scope(|scope| -> Result<()> {
            let mut reading = self.start_reading(scope, &mut walk)?;
            let result = loop {
                let Some(read) = reading.take() else {
                    break Ok(());
                };
                let (items, read_s) = match read.thread.join() {
                    Ok(read) => read,
                    // A bug, reported as the run's error (exit 1 with its summary), like a
                    // walk thread that dies: the batch was never staged, nothing is lost.
                    Err(panic) => {
                        break Err(anyhow::anyhow!(
                            "reading a batch's files failed ({}); nothing of that batch was exported",
                            crate::panic_message(&*panic)
                        ));
                    }
                };
                reading = match self.start_reading(scope, &mut walk) {
                    Ok(next) => next,
                    Err(e) => break Err(e),
                };
                let times = Times {
                    walk_s: read.walk_s,
                    read_s,
                };
                if !items.is_empty() {
                    if let Err(e) = self.batch(items, &read.export_ts, times) {
                        break Err(e);
                    }
                }
                // After the batch that deleted their files.
                self.summary.dirs_pruned += walk.prune(read.left);
            };
            if result.is_err() {
                // The error is what the run reports: the read ahead stops, and whatever became
                // of it (a panic included) must not replace the error.
                self.cancel_read
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(read) = reading.take() {
                    let _ = read.thread.join();
                }
            }
            result
        })
    }

    /// Takes the walk's next chunk and starts reading its files on a thread of its own; `None`
    /// once the walk is over.
    fn start_reading<'scope>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        walk: &mut scan::WalkAhead,
    ) -> Result<Option<Reading<'scope>>>
    where
        Self: 'scope,
    {
        let t_walk = Instant::now();
        let Some(chunk) = walk.next_chunk()? else {
            return Ok(None);
        };
        let walk_s = t_walk.elapsed().as_secs_f64();
        self.summary.skipped = chunk.skipped;
        self.summary.dirs_pruned += chunk.pruned;
        self.listed += chunk.files.len() as u64;
        if chunk.done {
            // The walk is done: the progress line can say how many files are left.
            self.progress.set_length(self.listed);
        }
        let export_ts = sync_core::transform::sync_timestamp(crate::now_secs());
        let config = self.config;
        let progress = self.progress.clone();
        let shown = self.progress_shown.clone();
        let cancel = self.cancel_read.clone();
        let files = chunk.files;
        let ts = export_ts.clone();
        let pool = read_pool(config.threads)?;
        let thread = std::thread::Builder::new()
            .name("batch-read".into())
            .spawn_scoped(scope, move || {
                let t_read = Instant::now();
                let items = read_all(pool, config, &progress, &shown, &cancel, files, &ts);
                (items, t_read.elapsed().as_secs_f64())
            })
            .context("starting a batch's reader")?;
        Ok(Some(Reading {
            thread,
            export_ts,
            walk_s,
            left: chunk.left,
        }))
    }
}

/// A batch's files being read while the previous batch is exported.
struct Reading<'scope> {
    thread: std::thread::ScopedJoinHandle<'scope, (Vec<(FileRef, Item)>, f64)>,
    export_ts: String,
    walk_s: f64,
    /// Folders the walk left while listing this batch (pruned after its deletes).
    left: Vec<(String, Option<std::time::SystemTime>)>,
}

/// How long a batch waited for the walk, and took to read (logged with the other phases).
struct Times {
    walk_s: f64,
    read_s: f64,
}

/// Publishes the batches a killed or failed run committed, and nothing else (the consent
/// purge needs every batch's files in a manifest before it reads the output). Returns the state,
/// the sink and the number of batches rolled forward.
pub(crate) fn roll_forward_batches(
    config: &Config,
    state: State,
    sink: Sink,
) -> Result<(State, Sink, u64)> {
    let mut run = Run {
        config,
        state: Some(state),
        sink: Some(sink),
        summary: Summary::new(config),
        seen_rows: RunRows::new()?,
        unrecognised_dirs: HashSet::new(),
        progress: indicatif::ProgressBar::hidden(),
        progress_shown: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        listed: 0,
        takes: scan::TakeToken::new(),
        cancel_read: Arc::default(),
    };
    let result = run.roll_forward();
    let n = run.summary.batches_rolled_forward;
    let state = run.state.take().expect("given");
    let sink = run.sink.take().expect("given");
    result.map(|()| (state, sink, n))
}

impl Run<'_> {
    /// Finishes what a killed or failed run committed: publishes its staged files, writes its
    /// manifest, marks it published. Its cache files are then deleted by the walk (their keys
    /// are known). Staged files of batches killed before their commit point were never visible
    /// and are removed.
    fn roll_forward(&mut self) -> Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        if self.sink.is_none() {
            return Ok(());
        }
        for b in state.unpublished()? {
            tracing::warn!(
                batch = b.id,
                outputs = b.outputs.len(),
                "publishing a batch a previous run committed but did not finish"
            );
            self.publish(&b, true)
                .with_context(|| format!("rolling batch {} forward", b.id))?;
            self.summary.batches_rolled_forward += 1;
        }
        let sink = self.sink.as_ref().expect("checked above");
        let n = sink.clean_staging()?;
        if n > 0 {
            tracing::info!(
                files = n,
                "removed staged files of batches killed before their commit point"
            );
        }
        Ok(())
    }

    /// One batch of the protocol, from its files as read.
    fn batch(&mut self, items: Vec<(FileRef, Item)>, export_ts: &str, times: Times) -> Result<()> {
        let Times { walk_s, read_s } = times;
        let t_sort = Instant::now();
        let sorted = self.sort(items)?;
        let sort_s = t_sort.elapsed().as_secs_f64();
        if self.config.dry_run {
            for (t, r) in &sorted.rows {
                self.summary.table(tables::table(*t).path).rows += r.len() as u64;
            }
            return Ok(());
        }
        let t_write = Instant::now();
        let outputs = self.stage(sorted.rows, export_ts)?;
        let write_s = t_write.elapsed().as_secs_f64();
        if !sorted.keys.is_empty() {
            let t_commit = Instant::now();
            let batch = self.commit(&outputs, &sorted.keys)?;
            let commit_s = t_commit.elapsed().as_secs_f64();
            Fault::hit(self.config.fault, Fault::AfterCommit);
            let t_publish = Instant::now();
            self.publish(&batch, false)
                .with_context(|| format!("batch {} is committed but not yet published; the cache is untouched and the next run publishes it", batch.id))?;
            tracing::info!(
                batch = batch.id,
                files = batch.files,
                rows = batch.rows,
                walk_s,
                read_s,
                sort_s,
                write_s,
                commit_s,
                publish_s = t_publish.elapsed().as_secs_f64(),
                "batch published"
            );
            self.summary.files_exported += sorted.keys.len() as u64;
        }
        self.delete(&sorted.to_delete);
        if !self.config.dry_run {
            crate::purge::remove_cache_files(&self.config.cache_dir, &sorted.withdrawn);
            let state = self.state.as_mut().expect("state outside dry runs");
            let t_merge = Instant::now();
            let merged = state
                .merge_key_runs()
                .context("merging the exported-key runs (the batch is published)")?;
            if merged.merges > 0 {
                // Every FANOUT^k batches a merge rewrites FANOUT^k batches' keys (and its WAL
                // grows by as much): logged so a slow batch can be told apart from a slow disk.
                tracing::info!(
                    merges = merged.merges,
                    keys = merged.keys,
                    merge_s = t_merge.elapsed().as_secs_f64(),
                    "merged exported-key runs"
                );
            }
        }
        // The batch's rows, bytes and DataFrames are gone by now (moved into `stage`).
        release_freed_memory();
        Ok(())
    }

    /// Phase 2: which files were exported before (replays), bad files, duplicate rows.
    fn sort(&mut self, items: Vec<(FileRef, Item)>) -> Result<Sorted> {
        let root = &self.config.cache_dir;
        let goods: Vec<FileKey> = items
            .iter()
            .filter_map(|(_, i)| match i {
                Item::Good { key, .. } => Some(*key),
                _ => None,
            })
            .collect();
        let exported = match &self.state {
            Some(s) => s.exported_mask(&goods)?,
            None => vec![false; goods.len()],
        };
        let mut exported = exported.into_iter();
        let mut out = Sorted::default();
        let mut fresh: Vec<load::Parsed> = Vec::new();
        for (f, item) in items {
            match item {
                Item::Gone => self.summary.files_gone += 1,
                Item::Withdrawn { id } => {
                    // Counted and logged without its name: the name holds their DID.
                    self.summary.withdrawn_files += 1;
                    out.withdrawn.push((f.disk_rel_path(), id));
                }
                Item::Unrecognised => {
                    self.summary.files_unrecognised += 1;
                    if self.unrecognised_dirs.len() < 10_000
                        && self.unrecognised_dirs.insert(f.dir.clone())
                    {
                        tracing::warn!(dir = %f.dir, "files in a folder that feeds no table are left in place");
                    }
                }
                Item::Bad { id, reason } => {
                    self.summary.files_read += 1;
                    self.summary.quarantined += 1;
                    let rel = f.rel_path();
                    tracing::warn!(file = %rel, %reason, "corrupt cache file");
                    if !self.config.dry_run {
                        match scan::quarantine(root, &f, id, &reason) {
                            Ok(dest) => tracing::warn!(to = %dest.display(), "quarantined"),
                            Err(e) => {
                                // Left in place and read again next run; counted (exit 3).
                                self.summary.quarantined -= 1;
                                self.summary.quarantine_failed += 1;
                                tracing::error!(file = %rel, error = format!("{e:#}"), "could not quarantine")
                            }
                        }
                    }
                }
                Item::Good { id, key, parsed } => {
                    self.summary.files_read += 1;
                    self.summary.unknown_keys += parsed.unknown_keys;
                    if exported.next().unwrap_or(false) {
                        self.summary.already_exported += 1;
                        out.to_delete.push((f.disk_rel_path(), id));
                        continue;
                    }
                    out.keys.push(key);
                    out.to_delete.push((f.disk_rel_path(), id));
                    fresh.push(parsed);
                }
            }
        }
        let dedupe: Vec<u128> = fresh.iter().map(|p| p.dedupe).collect();
        let first = self.seen_rows.first_in_run(&dedupe)?;
        for (parsed, first) in fresh.into_iter().zip(first) {
            if first {
                out.rows.entry(parsed.table).or_default().push(parsed.row);
            } else {
                self.summary.duplicates += 1;
            }
        }
        Ok(out)
    }

    /// Phase 3: each table's Parquet file, written and fsynced under a staged name that no
    /// reader looks at. Nothing is visible yet.
    fn stage(
        &mut self,
        rows: BTreeMap<TableId, Vec<load::Row>>,
        export_ts: &str,
    ) -> Result<Vec<BatchOutput>> {
        let sink = self.sink.as_ref().expect("sink outside dry runs");
        let partition = &export_ts[..10];
        let mut outputs = Vec::new();
        for (t, table_rows) in rows {
            let def = tables::table(t);
            let planned = sink.plan(def.path, partition)?;
            let n = table_rows.len() as u64;
            let mut df = load::frame(def, table_rows, export_ts)?;
            let bytes = write_parquet(&mut df, def, &planned.staged, self.config.compression)?;
            outputs.push(BatchOutput {
                table_path: def.path.to_owned(),
                location: planned.location,
                staged: planned.staged,
                rows: n,
                bytes,
            });
        }
        if !outputs.is_empty() {
            let dir = sink.staging_dir();
            crate::sink::sync_dir(&dir).with_context(|| format!("fsync of {}", dir.display()))?;
            Fault::hit(self.config.fault, Fault::AfterStage);
        }
        Ok(outputs)
    }

    /// Phase 4, the commit point: the batch, its staged outputs and its files' keys, in one
    /// transaction.
    fn commit(&mut self, outputs: &[BatchOutput], keys: &[FileKey]) -> Result<Batch> {
        let state = self.state.as_mut().expect("state outside dry runs");
        state.commit(
            &NewBatch {
                now: crate::now_secs(),
                outputs,
                keys,
                rows: outputs.iter().map(|o| o.rows).sum(),
            },
            self.config.dedupe_retention_secs,
        )
    }

    /// Phase 5: publish every staged file (rename, or upload), then the manifest, then mark the
    /// batch published. Idempotent, so a later run can roll a committed batch forward.
    fn publish(&mut self, batch: &Batch, recovering: bool) -> Result<()> {
        let state = self.state.as_ref().expect("state outside dry runs");
        let sink = self.sink.as_ref().expect("sink outside dry runs");
        for (i, o) in batch.outputs.iter().enumerate() {
            sink.publish(&o.staged, &o.location, recovering)
                .with_context(|| format!("publishing {}", o.table_path))?;
            if i == 0 {
                Fault::hit(self.config.fault, Fault::AfterPublishOne);
            }
            let s = self.summary.table(&o.table_path);
            s.rows += o.rows;
            s.parquet_files += 1;
            s.bytes += o.bytes;
            self.summary.parquet_files += 1;
            self.summary.parquet_bytes += o.bytes;
        }
        Fault::hit(self.config.fault, Fault::AfterPublish);
        let owner = state.ensure_owner_id()?;
        let keys = state.batch_keys(batch.id)?;
        manifest::write(sink, batch, &owner, &keys)?;
        Fault::hit(self.config.fault, Fault::AfterManifest);
        state.mark_published(batch.id)?;
        for o in &batch.outputs {
            sink.discard_staged(&o.staged)?;
        }
        Ok(())
    }

    /// Phase 6: delete exactly the exported files (and replays of files exported before).
    fn delete(&mut self, files: &[(String, FileId)]) {
        if !self.config.clear_filepaths || self.config.dry_run {
            return;
        }
        let root = &self.config.cache_dir;
        let t = Instant::now();
        let fault = self.config.fault;
        let takes = &self.takes;
        let (deleted, failed) = files
            .par_iter()
            .map(|(rel, id)| match scan::delete_if_same_with(root, rel, *id, takes, || {
                Fault::hit(fault, Fault::AfterTake)
            }) {
                Ok(d) => (usize::from(d), 0usize),
                Err(e) => {
                    tracing::error!(file = %rel, error = %e, "could not delete an exported file (it stays, is known as exported, and the next run tries again)");
                    (0, 1)
                }
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        self.summary.files_deleted += deleted as u64;
        self.summary.delete_failed += failed as u64;
        self.summary.delete_seconds += t.elapsed().as_secs_f64();
    }
}

/// Hands the batch's freed buffers back to the kernel. glibc keeps freed memory in the arena of
/// the thread that allocated it (the read phase's and Polars' worker threads each have one), so
/// without this the run's peak RSS grew with the number of batches, not with the batch
/// (BENCHMARKS.md, "Allocator").
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Phase 1 (parallel): read, key, parse.
fn read_all(
    pool: &rayon::ThreadPool,
    config: &Config,
    progress: &indicatif::ProgressBar,
    shown: &std::sync::atomic::AtomicBool,
    cancel: &std::sync::atomic::AtomicBool,
    files: Vec<FileRef>,
    export_ts: &str,
) -> Vec<(FileRef, Item)> {
    let root = &config.cache_dir;
    pool.install(|| {
        files
            .into_par_iter()
            .filter(|_| !cancel.load(std::sync::atomic::Ordering::Relaxed))
            .map(|f| {
                let item = read_one(root, &f, export_ts, &config.withdrawn);
                progress.inc(1);
                if progress.position() >= LARGE_RUN_FILES
                    && !shown.swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    progress.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    progress.enable_steady_tick(std::time::Duration::from_millis(200));
                }
                (f, item)
            })
            .collect()
    })
}

/// The read phase's own worker threads (`threads`, or one per core).
///
/// Not the global pool: the batch being exported builds its DataFrames and Parquet columns
/// there while the next batch is read, and rayon serves work sent from outside a pool only
/// after its workers have run out of their own, so sharing one pool made every export step wait
/// for the whole read ahead (BENCHMARKS.md, "A read pool of its own"). With two pools the
/// kernel shares the cores between both phases.
fn read_pool(threads: usize) -> Result<&'static rayon::ThreadPool> {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("batch-read-{i}"))
        .build()
        .context("starting the read phase's threads")?;
    // Another run of this process may have set it meanwhile; either pool will do.
    Ok(POOL.get_or_init(|| pool))
}

fn read_one(
    root: &std::path::Path,
    f: &FileRef,
    export_ts: &str,
    withdrawn: &crate::withdrawn::Withdrawn,
) -> Item {
    let Some(source) = &f.source else {
        return Item::Unrecognised;
    };
    if !f.name.ends_with(".json") {
        return match scan::read_file(root, f, None) {
            Read1::Gone => Item::Gone,
            Read1::Ok { id, bytes, .. } if withdrawn.covers_file(&f.rel_path(), &bytes) => {
                Item::Withdrawn { id }
            }
            Read1::Ok { id, .. } => Item::Bad {
                id: Some(id),
                reason: "not a .json file".into(),
            },
            Read1::Unreadable(reason) => Item::Bad { id: None, reason },
        };
    }
    match scan::read_file(root, f, source.volatile_key()) {
        Read1::Gone => Item::Gone,
        Read1::Unreadable(reason) => Item::Bad { id: None, reason },
        // Before parsing: a withdrawn participant's file is neither exported nor quarantined
        // (a quarantine would keep it), whatever its content.
        Read1::Ok { id, bytes, .. } if withdrawn.covers_file(&f.rel_path(), &bytes) => {
            Item::Withdrawn { id }
        }
        Read1::Ok { id, key, bytes } => match load::parse(source, &f.name, bytes, export_ts) {
            Ok(parsed) => Item::Good { id, key, parsed },
            Err(reason) => Item::Bad {
                id: Some(id),
                reason,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// A terminal that keeps what is drawn on it.
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            200
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.is_empty() {
                self.0.lock().unwrap().push(s.to_owned());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The rate is a whole number with separators, and "left" appears once the total is known.
    #[test]
    fn the_progress_line_shows_whole_rates_and_then_files_left() {
        let screen = Screen::default();
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::term_like(Box::new(screen.clone())),
        );
        bar.set_style(super::progress_style());
        let last = || {
            let drawn = screen.0.lock().unwrap();
            let line = drawn.iter().rev().find(|l| l.contains("files read"));
            line.cloned().unwrap_or_default()
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        bar.inc(6_038);
        bar.tick();
        let line = last();
        assert!(line.contains(" 6,038 files read ("), "{line}");
        let rate = line
            .split_once("files read (")
            .and_then(|(_, r)| r.split_once(" files/s)"))
            .map(|(r, _)| r.to_owned())
            .unwrap_or_else(|| panic!("no rate in {line:?}"));
        assert!(
            !rate.is_empty() && rate.chars().all(|c| c.is_ascii_digit() || c == ','),
            "a whole rate: {line:?}"
        );
        assert!(!line.contains("left"), "{line}");
        bar.set_length(10_000);
        std::thread::sleep(std::time::Duration::from_millis(100));
        bar.tick();
        let line = last();
        assert!(line.ends_with(", 3,962 left"), "{line}");
    }

    #[test]
    fn progress_numbers_are_whole_with_separators() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(6038), "6,038");
        assert_eq!(super::thousands(1_234_567), "1,234,567");
    }
}
