//! One export run: lock, recover, then batch by batch: read a snapshot of complete cache files,
//! publish one Parquet file per table, commit the journal, delete exactly the exported files.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, TryLockError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::config::{Config, Fault};
use crate::parquet::{build_frame, write_parquet};
use crate::scan::{self, FileId, FileRef, Read1, Walker};
use crate::sink::Sink;
use crate::state::{FileKey, PlannedOutput, State};
use crate::summary::Summary;
use crate::tables::{self, Cell, TableId};

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
    Unrecognised,
    Bad {
        id: Option<FileId>,
        reason: String,
    },
    Good {
        id: FileId,
        key: FileKey,
        parsed: tables::Parsed,
    },
}

struct Run<'a> {
    config: &'a Config,
    state: Option<State>,
    sink: Option<Sink>,
    summary: Summary,
    seen_rows: HashSet<u128>,
    unrecognised_dirs: HashSet<Arc<str>>,
    progress: indicatif::ProgressBar,
    /// Set once the progress bar is visible (or when it never should be).
    progress_shown: std::sync::atomic::AtomicBool,
}

/// The cache's lock file (a dot-name: the writer and the walk ignore it).
pub const CACHE_LOCK: &str = ".export.lock";

enum Lock {
    Held(File),
    /// Another run holds it.
    Busy,
    /// The file cannot be created (read-only file system or no permission).
    Unavailable,
}

/// `flock`-style non-blocking lock of `path`, created if `create` (the lock is released when the
/// process ends, however it ends).
fn take_lock(path: &std::path::Path, create: bool) -> Result<Lock> {
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
    let sink = if config.dry_run {
        None
    } else {
        Some(Sink::new(
            &config.output,
            &config.s3,
            config.state_dir.join("staging"),
        )?)
    };
    // A spinner on stderr, drawn only when stdout is a terminal and the run turns out large.
    let progress =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed} {pos} files read ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let mut run = Run {
        config,
        state,
        sink,
        summary: Summary::new(config),
        seen_rows: HashSet::new(),
        unrecognised_dirs: HashSet::new(),
        progress,
        progress_shown: std::sync::atomic::AtomicBool::new(!config.progress),
    };
    let result = run.go();
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
/// already in *that* output, and its journal's unfinished batches can only be rolled back there.
/// Used with another output it would delete cache files whose rows never reach the first one,
/// skip files as "already exported" that the new one never got, and roll back through the wrong
/// sink (leaving an orphan Parquet file that duplicates rows). So the first run records the
/// output and every later run must name the same one.
fn check_output_binding(config: &Config, state: &State) -> Result<()> {
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

impl Run<'_> {
    fn go(&mut self) -> Result<()> {
        self.recover()?;
        if let Some(state) = &self.state {
            if !self.config.dry_run {
                let n = state.prune(crate::now_secs(), self.config.dedupe_retention_secs)?;
                if n > 0 {
                    tracing::info!(keys = n, "forgot exported keys past the retention");
                }
            }
        }
        let mut walker = Walker::new(&self.config.cache_dir)?;
        loop {
            let files: Vec<FileRef> = walker.by_ref().take(self.config.batch_files).collect();
            self.summary.skipped = walker.skipped;
            if files.is_empty() {
                break;
            }
            self.batch(files)?;
        }
        if self.config.clear_cache && !self.config.dry_run {
            self.summary.dirs_pruned = scan::prune_empty_dirs(
                &self.config.cache_dir,
                &mut walker.dirs,
                self.config.prune_min_age_secs,
            );
        }
        Ok(())
    }

    /// Rolls back batches a killed run left before their commit point.
    fn recover(&mut self) -> Result<()> {
        let (Some(state), Some(sink)) = (&self.state, &self.sink) else {
            return Ok(());
        };
        for u in state.unfinished()? {
            tracing::warn!(
                batch = u.id,
                outputs = u.outputs.len(),
                "rolling back a batch a previous run did not finish"
            );
            for o in &u.outputs {
                sink.remove(o)
                    .with_context(|| format!("rolling back batch {}", u.id))?;
            }
            state.mark_rolled_back(u.id)?;
            self.summary.batches_rolled_back += 1;
        }
        if let Sink::S3(_) = sink {
            // Staging files of rolled-back batches (all are unreferenced now).
            if let Ok(entries) = fs::read_dir(self.config.state_dir.join("staging")) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn batch(&mut self, files: Vec<FileRef>) -> Result<()> {
        let root = &self.config.cache_dir;
        let export_ts = sync_core::transform::sync_timestamp(crate::now_secs());
        let progress = &self.progress;
        let shown = &self.progress_shown;
        // Phase 1 (parallel): read, key, parse.
        let t_read = Instant::now();
        let items: Vec<(FileRef, Item)> = files
            .into_par_iter()
            .map(|f| {
                let item = read_one(root, &f, &export_ts);
                progress.inc(1);
                if progress.position() >= LARGE_RUN_FILES
                    && !shown.swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    progress.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    progress.enable_steady_tick(std::time::Duration::from_millis(200));
                }
                (f, item)
            })
            .collect();

        let read_s = t_read.elapsed().as_secs_f64();
        // Phase 2: which files were exported before (replays), duplicates, rows.
        let t_lookup = Instant::now();
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
        let mut rows: BTreeMap<TableId, Vec<Vec<Cell>>> = BTreeMap::new();
        let mut batch_keys: Vec<FileKey> = Vec::new();
        let mut to_delete: Vec<(String, FileId)> = Vec::new();
        let mut replays: Vec<(String, FileId)> = Vec::new();
        for (f, item) in items {
            match item {
                Item::Gone => self.summary.files_gone += 1,
                Item::Unrecognised => {
                    self.summary.files_unrecognised += 1;
                    if self.unrecognised_dirs.insert(f.dir.clone()) {
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
                    if exported.next().unwrap_or(false) {
                        self.summary.already_exported += 1;
                        replays.push((f.disk_rel_path(), id));
                        continue;
                    }
                    batch_keys.push(key);
                    to_delete.push((f.disk_rel_path(), id));
                    if !self.seen_rows.insert(parsed.dedupe) {
                        self.summary.duplicates += 1;
                        continue;
                    }
                    rows.entry(parsed.table).or_default().push(parsed.row);
                }
            }
        }
        let row_count: usize = rows.values().map(Vec::len).sum();
        if self.config.dry_run {
            for (t, r) in &rows {
                self.summary.table(tables::table(*t).path).rows += r.len() as u64;
            }
            return Ok(());
        }

        let lookup_s = t_lookup.elapsed().as_secs_f64();
        // Phase 3: plan (journal), write and publish, commit.
        let t_write = Instant::now();
        let now = crate::now_secs();
        let partition = &export_ts[..10];
        let state = self.state.as_mut().expect("state outside dry runs");
        let sink = self.sink.as_ref().expect("sink outside dry runs");
        if rows.is_empty() {
            if !batch_keys.is_empty() {
                state.commit_without_outputs(now, &batch_keys)?;
            }
        } else {
            let mut planned: Vec<(String, PlannedOutput, usize)> = Vec::new();
            for (t, r) in &rows {
                let def = tables::table(*t);
                planned.push((
                    def.path.to_owned(),
                    sink.plan(def.path, partition)?,
                    r.len(),
                ));
            }
            let batch_id = state.plan(now, &planned)?;
            Fault::hit(self.config.fault, Fault::AfterPlan);
            let published = publish_all(self.config, sink, &mut rows, &planned, &mut self.summary);
            if let Err(e) = published {
                // Best effort now; otherwise the next run rolls the batch back.
                let undone = planned.iter().all(|(_, o, _)| sink.remove(o).is_ok());
                if undone {
                    state.mark_rolled_back(batch_id)?;
                }
                return Err(e.context(format!(
                    "batch {batch_id} not exported; the cache is untouched"
                )));
            }
            Fault::hit(self.config.fault, Fault::AfterPublish);
            let write_s = t_write.elapsed().as_secs_f64();
            let t_commit = Instant::now();
            state.commit(batch_id, now, &batch_keys, row_count)?;
            Fault::hit(self.config.fault, Fault::AfterCommit);
            let commit_s = t_commit.elapsed().as_secs_f64();
            tracing::info!(
                batch = batch_id,
                files = batch_keys.len(),
                rows = row_count,
                read_s,
                lookup_s,
                write_s,
                commit_s,
                "batch committed"
            );
        }
        self.summary.files_exported += batch_keys.len() as u64;

        // Phase 4: delete exactly the exported files (and replays of files exported before).
        if self.config.clear_filepaths {
            let t = Instant::now();
            let deleted: usize = to_delete
                .par_iter()
                .chain(replays.par_iter())
                .map(|(rel, id)| match scan::delete_if_same_with(root, rel, *id, || {
                    Fault::hit(self.config.fault, Fault::AfterTake)
                }) {
                    Ok(d) => usize::from(d),
                    Err(e) => {
                        tracing::warn!(file = %rel, error = %e, "could not delete an exported file (the next run will)");
                        0
                    }
                })
                .sum();
            self.summary.files_deleted += deleted as u64;
            self.summary.delete_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    }
}

fn read_one(root: &std::path::Path, f: &FileRef, export_ts: &str) -> Item {
    let Some(source) = &f.source else {
        return Item::Unrecognised;
    };
    if !f.name.ends_with(".json") {
        return match scan::read_file(root, f, None) {
            Read1::Gone => Item::Gone,
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
        Read1::Ok { id, key, bytes } => match tables::parse(source, &f.name, &bytes, export_ts) {
            Ok(parsed) => Item::Good { id, key, parsed },
            Err(reason) => Item::Bad {
                id: Some(id),
                reason,
            },
        },
    }
}

fn publish_all(
    config: &Config,
    sink: &Sink,
    rows: &mut BTreeMap<TableId, Vec<Vec<Cell>>>,
    planned: &[(String, PlannedOutput, usize)],
    summary: &mut Summary,
) -> Result<()> {
    for ((t, table_rows), (table_path, out, _)) in rows.iter_mut().zip(planned) {
        let def = tables::table(*t);
        let taken = std::mem::take(table_rows);
        let mut df = build_frame(def, &taken)?;
        drop(taken);
        let bytes = write_parquet(&mut df, def, &out.temp, config.compression)?;
        drop(df);
        Fault::hit(config.fault, Fault::AfterWrite);
        sink.publish(out)
            .with_context(|| format!("publishing {table_path}"))?;
        let s = summary.table(table_path);
        s.rows += out_rows(planned, table_path);
        s.parquet_files += 1;
        s.bytes += bytes;
        summary.parquet_files += 1;
        summary.parquet_bytes += bytes;
        tracing::debug!(table = %table_path, location = %out.location, bytes, "published");
    }
    Ok(())
}

fn out_rows(planned: &[(String, PlannedOutput, usize)], table_path: &str) -> u64 {
    planned
        .iter()
        .find(|(p, _, _)| p == table_path)
        .map_or(0, |(_, _, n)| *n as u64)
}
