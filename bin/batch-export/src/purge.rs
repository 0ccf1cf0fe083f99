//! The consent purge (`batch-export purge`, issue 11): removes withdrawn participants' rows from
//! every exported Parquet file and their files from the cache, exactly once, with a ledger.
//!
//! What "their data" is: `withdrawn.rs`. The protocol mirrors the export's (stage, commit,
//! roll forward):
//!
//! 1. under the export's locks, after the start-up check against the output and after rolling
//!    committed export batches forward (so every Parquet file is named by a manifest), their
//!    cache files are removed (the cache walk, `.exported-*` taken files and
//!    `.quarantine/` with its `reasons.log` lines);
//! 2. every Parquet file the manifests name is read, and every other `*.parquet` file under the
//!    table folders (batches from before manifests, the predecessor's files; one in no known
//!    table's folder stops the purge); a file holding rows of theirs is written
//!    again without those rows, fsynced, and staged (`<output>/_batch_export/purge-staging/`
//!    locally, on the output's file system; `<state-dir>/purge-staging/` for S3). Files without
//!    such rows are not touched;
//! 3. **commit point**: one SQLite transaction records the purge (its ledger, free of DIDs), each
//!    staged file with its final location, and the salted hash of each DID;
//! 4. each staged file replaces the published one (local: rename over the old name, fsync both
//!    folders; S3: `PutObject` of the same key), marked done one by one;
//! 5. the manifests naming rewritten files get their new `rows` / `bytes` and the purge id;
//! 6. the ledger `<output>/_batch_export/purges/<id>.json` is written; the purge is marked done.
//!
//! The DIDs' salted hashes are recorded when the purge starts (`pending:<id>`), so a run killed
//! before 3 changed nothing in the output but its DIDs are guarded already: the next run, `purge`
//! or export, must be given them and does the whole purge again. A run killed after 3 is finished
//! by the next run, `purge` or export (steps 4-6 are idempotent and need no DID). A reader sees
//! each file either whole before or whole after.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use polars::prelude::{
    BooleanChunked, DataFrame, DataType, NewChunkedArray, ParquetReader, SerReader,
};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Fault};
use crate::export::{check_output_binding, take_lock, Lock, CACHE_LOCK};
use crate::manifest;
use crate::scan::{self, Read1, Walker};
use crate::sink::{self, Sink};
use crate::state::State;
use crate::withdrawn::Withdrawn;

/// `purge_file.batch_id` of a rewritten Parquet file that no manifest names.
const NO_MANIFEST: i64 = 0;

/// The table of an output-relative Parquet path (`<table>/active/partition_date=<d>/<name>`), if
/// this version knows it.
fn table_of(rel: &str) -> Option<&'static str> {
    let (table, rest) = rel.split_once("/active/partition_date=")?;
    if rest.split('/').count() != 2 {
        return None;
    }
    crate::tables::TABLES
        .iter()
        .find(|t| t.path == table)
        .map(|t| t.path)
}

/// The ledger folder under `<output>/_batch_export/`.
pub const PURGES: &str = "purges";
pub const LEDGER_FORMAT: &str = "batch-export-purge/1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS purge (
    id TEXT PRIMARY KEY,
    committed_at INTEGER NOT NULL,
    state TEXT NOT NULL,           -- committed | done
    ledger BLOB NOT NULL           -- the ledger JSON (salted hashes, never a DID)
);
CREATE TABLE IF NOT EXISTS purge_file (
    purge_id TEXT NOT NULL REFERENCES purge(id),
    batch_id INTEGER NOT NULL,
    rel TEXT NOT NULL,             -- output-relative path of the Parquet file (random hex name)
    staged TEXT NOT NULL,          -- the purged version, fsynced before the commit
    rows INTEGER NOT NULL,         -- rows after the purge
    bytes INTEGER NOT NULL,        -- bytes after the purge
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (purge_id, rel)
);
-- Salted hashes of every DID a purge applied: an export whose --withdrawn list lacks one is
-- refused, so a forgotten flag cannot bring their data back.
CREATE TABLE IF NOT EXISTS purged_did (hash TEXT PRIMARY KEY, purge_id TEXT NOT NULL);
";

/// One rewritten file, as the ledger records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LedgerFile {
    pub table: String,
    /// Output-relative path (the same name as before the purge).
    pub path: String,
    pub rows_before: u64,
    pub rows_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// `<output>/_batch_export/purges/<id>.json`: what a purge removed, without any DID or content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ledger {
    pub format: String,
    pub purge_id: String,
    /// Unix seconds of the commit point.
    pub committed_at: i64,
    /// How `did_hashes` are made (the salt is a secret of the export's state directory).
    pub did_hash: String,
    /// The salted hash of each DID of the withdrawn list applied, sorted.
    pub did_hashes: Vec<String>,
    /// Rows removed per table path.
    pub rows_removed: BTreeMap<String, u64>,
    pub files_rewritten: Vec<LedgerFile>,
    /// Cache files (and quarantined files) of theirs removed by this purge run.
    pub cache_files_removed: u64,
    pub quarantine_files_removed: u64,
}

/// What a purge run did (printed as text or `--json`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct PurgeSummary {
    pub output: String,
    /// The purge committed by this run (`null` when there was nothing to purge).
    pub purge_id: Option<String>,
    /// DIDs in the withdrawn list, and how many of them no earlier purge had applied.
    pub dids: u64,
    pub dids_new: u64,
    pub parquet_files_read: u64,
    pub parquet_bytes_read: u64,
    pub files_rewritten: u64,
    /// Bytes of the rewritten files (what was written to the output).
    pub bytes_rewritten: u64,
    pub rows_removed: BTreeMap<String, u64>,
    pub cache_files_removed: u64,
    pub quarantine_files_removed: u64,
    /// Keys objects of rewritten batches emptied (the others are emptied by a later export
    /// run: `manifest::keys_kept_from`).
    pub keys_objects_emptied: u64,
    /// Committed purges a killed run left unfinished, finished by this run.
    pub purges_rolled_forward: u64,
    /// Export batches a killed run had committed, published first.
    pub batches_rolled_forward: u64,
    /// S3: whether the bucket keeps old object versions (`off`, `Enabled`, `Suspended`,
    /// `unknown`); `null` for a local output.
    pub s3_versioning: Option<String>,
    /// Old versions of rewritten objects (they hold the withdrawn rows) deleted by this run
    /// (`--s3-delete-noncurrent-versions`), and left in the bucket.
    pub noncurrent_versions_deleted: u64,
    pub noncurrent_versions_left: u64,
    /// Rewritten objects whose old versions could not be looked for (no permission).
    pub versions_unchecked: u64,
    pub seconds: f64,
    pub error: Option<String>,
}

impl PurgeSummary {
    /// The purge is done, but rows of theirs may still be readable in the bucket's old object
    /// versions: a human should look (exit 3).
    pub fn needs_attention(&self) -> bool {
        self.noncurrent_versions_left > 0 || self.versions_unchecked > 0
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let removed: u64 = self.rows_removed.values().sum();
        let _ = writeln!(
            s,
            "batch-export purge: {} withdrawn DIDs ({} new) applied to {}: {}",
            self.dids,
            self.dids_new,
            self.output,
            match &self.purge_id {
                Some(id) => format!("purge {id}, ledger _batch_export/{PURGES}/{id}.json"),
                None => "nothing to purge".to_owned(),
            }
        );
        for (table, n) in &self.rows_removed {
            let _ = writeln!(s, "  {table:<48} {n:>10} rows removed");
        }
        let _ = writeln!(
            s,
            "  parquet: {} files read ({} bytes), {} rewritten ({} bytes), {removed} rows removed",
            self.parquet_files_read,
            self.parquet_bytes_read,
            self.files_rewritten,
            self.bytes_rewritten
        );
        let _ = writeln!(
            s,
            "  cache: {} files removed, {} quarantined files removed; {} purges and {} batches rolled forward",
            self.cache_files_removed,
            self.quarantine_files_removed,
            self.purges_rolled_forward,
            self.batches_rolled_forward
        );
        if self.keys_objects_emptied > 0 {
            let _ = writeln!(
                s,
                "  keys objects of rewritten batches emptied: {}",
                self.keys_objects_emptied
            );
        }
        if let Some(v) = &self.s3_versioning {
            let _ = writeln!(
                s,
                "  s3 versioning: {v}; old versions of rewritten objects: {} deleted, {} left, {} objects not checked",
                self.noncurrent_versions_deleted,
                self.noncurrent_versions_left,
                self.versions_unchecked
            );
        }
        if self.noncurrent_versions_left > 0 {
            let _ = writeln!(
                s,
                "  ATTENTION: the bucket keeps old versions of the rewritten objects, and {} of them \
                 still hold the withdrawn rows: run the purge again with \
                 --s3-delete-noncurrent-versions (needs s3:ListBucketVersions and \
                 s3:DeleteObjectVersion), or have them expired by a lifecycle rule",
                self.noncurrent_versions_left
            );
        }
        if self.versions_unchecked > 0 {
            let _ = writeln!(
                s,
                "  ATTENTION: could not tell whether the bucket keeps old versions of {} rewritten \
                 objects (they would hold the withdrawn rows): grant s3:GetBucketVersioning and \
                 s3:ListBucketVersions, or check by hand",
                self.versions_unchecked
            );
        }
        let _ = writeln!(s, "  time: {:.2} s", self.seconds);
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  FAILED after the above: {e}");
        }
        s
    }
}

/// How a purge run ended (errors before it started are `Err`).
#[derive(Debug)]
pub enum PurgeOutcome {
    Busy {
        lock: PathBuf,
    },
    Done(PurgeSummary),
    Failed {
        summary: PurgeSummary,
        error: anyhow::Error,
    },
}

fn ensure_schema(state: &State) -> Result<()> {
    state
        .conn()
        .execute_batch(SCHEMA)
        .context("creating the purge journal")
}

/// The state directory's secret salt for DID hashes (made on first use).
fn salt(state: &State) -> Result<String> {
    if let Some(s) = state.meta("purge_salt")? {
        return Ok(s);
    }
    let s = format!("{}{}", sink::random_hex(), sink::random_hex());
    state.set_meta("purge_salt", &s)?;
    Ok(s)
}

/// `--adopt-output`, before the manifests are adopted: the adopted state has a new salt and no
/// memory of earlier purges, so the guard that refuses an export without a purged DID would be
/// gone. An output with purge ledgers is therefore adopted only with a `--withdrawn` list at
/// least as long as each ledger's (the hashes cannot be checked without the lost salt), and that
/// list becomes the new state's purged set: later runs must give it again.
pub(crate) fn adopt_purges(config: &Config, state: &mut State, sink: &Sink) -> Result<()> {
    ensure_schema(state)?;
    let mut ledgers = 0u64;
    let mut most = 0usize;
    for name in sink.list_meta(PURGES, None)? {
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let bytes = sink
            .get_meta(&format!("{PURGES}/{name}"))?
            .with_context(|| format!("the purge ledger {id} disappeared while adopting"))?;
        let ledger: Ledger = serde_json::from_slice(&bytes)
            .with_context(|| format!("the purge ledger {id} is not valid"))?;
        ledgers += 1;
        most = most.max(ledger.did_hashes.len());
    }
    if ledgers == 0 {
        return Ok(());
    }
    let given = config.withdrawn.len();
    if given < most {
        return Err(anyhow::Error::new(crate::UsageError(format!(
            "this output had participants purged ({ledgers} purge ledger(s) in \
             _batch_export/{PURGES}/, the largest for {most} DID(s)); adopting it with a \
             withdrawn list of {given} DID(s) would let a later export bring their data back. \
             Give --withdrawn (BATCH_EXPORT_WITHDRAWN) the study's whole withdrawn list"
        ))));
    }
    let salt = salt(state)?;
    let tx = state.conn().unchecked_transaction()?;
    for hash in config.withdrawn.salted_hashes(&salt) {
        tx.execute(
            "INSERT OR IGNORE INTO purged_did (hash, purge_id) VALUES (?1, 'adopted')",
            [hash],
        )?;
    }
    tx.commit()
        .context("recording the adopted withdrawn list")?;
    tracing::info!(
        ledgers,
        dids = given,
        "adopted an output with consent purges: the withdrawn list given is now required on every run"
    );
    Ok(())
}

/// At the start of an export run (after the check against the output): refuses a `--withdrawn`
/// list that lacks a DID an earlier purge applied or began (its data would be exported again),
/// finishes committed purges, and redoes a purge killed before its commit point.
///
/// Returns how many DIDs of the list no purge has covered yet: their files are refused from now
/// on, but rows exported before they were listed stay until `batch-export purge` runs (the run
/// exits 3 so that a human does).
pub(crate) fn before_export(config: &Config, state: &mut State, sink: &Sink) -> Result<u64> {
    ensure_schema(state)?;
    let purged: i64 = state
        .conn()
        .query_row("SELECT count(*) FROM purged_did", [], |r| r.get(0))?;
    if purged > 0 {
        let salt = salt(state)?;
        let have: BTreeSet<String> = config.withdrawn.salted_hashes(&salt).into_iter().collect();
        let mut stmt = state.conn().prepare("SELECT hash FROM purged_did")?;
        let missing = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .filter_map(|h| h.ok())
            .filter(|h| !have.contains(h))
            .count();
        if missing > 0 {
            return Err(anyhow::Error::new(crate::UsageError(format!(
                "{missing} DID(s) purged from this output earlier are not in --withdrawn \
                 (BATCH_EXPORT_WITHDRAWN); exporting without them would export their data \
                 again. Give every run the same withdrawn list"
            ))));
        }
    }
    roll_forward(config, state, sink)?;
    if state.meta("purge_pending")?.is_some() {
        // Its DIDs' hashes were recorded when it started, so the check above made sure this
        // run's list holds them: the purge is done again, whole, before anything is exported.
        tracing::warn!(
            "a purge was killed before its commit point (nothing in the output had changed): \
             this run does it again before exporting"
        );
        let mut summary = PurgeSummary::default();
        go(config, state, sink, &mut summary).context("finishing a purge a killed run began")?;
        tracing::info!(
            purge = summary.purge_id.as_deref().unwrap_or("-"),
            files_rewritten = summary.files_rewritten,
            rows_removed = summary.rows_removed.values().sum::<u64>(),
            cache_files_removed = summary.cache_files_removed,
            "purge finished by the export run"
        );
    }
    if config.withdrawn.is_empty() {
        return Ok(0);
    }
    let salt = salt(state)?;
    // A DID taken over from an adopted output's list counts as not purged: the list may have
    // grown after the output's last purge (an account deletion the writer added, say), and a
    // purge after the adoption costs a scan, never a row.
    let mut purged = state.conn().prepare(
        "SELECT 1 FROM purged_did WHERE hash = ?1 \
         AND purge_id NOT LIKE 'pending:%' AND purge_id != 'adopted'",
    )?;
    let mut unpurged = 0;
    for hash in config.withdrawn.salted_hashes(&salt) {
        if !purged.exists([&hash])? {
            unpurged += 1;
        }
    }
    Ok(unpurged)
}

/// Finishes every committed purge (steps 4-6). Returns how many there were.
fn roll_forward(config: &Config, state: &mut State, sink: &Sink) -> Result<u64> {
    let ids: Vec<String> = {
        let mut stmt = state
            .conn()
            .prepare("SELECT id FROM purge WHERE state = 'committed' ORDER BY id")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids
    };
    for id in &ids {
        tracing::warn!(purge = %id, "finishing a purge a previous run committed");
        apply(config, state, sink, id).with_context(|| format!("finishing purge {id}"))?;
    }
    clean_purge_staging(state, sink)?;
    Ok(ids.len() as u64)
}

/// Removes files in the purge staging folder that belong to no unfinished purge (a run killed
/// before its commit point; they hold no row of theirs either way).
fn clean_purge_staging(state: &State, sink: &Sink) -> Result<()> {
    let dir = sink.purge_staging_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut keep = BTreeSet::new();
    let mut stmt = state.conn().prepare(
        "SELECT f.staged FROM purge_file f JOIN purge p ON p.id = f.purge_id WHERE p.state = 'committed'",
    )?;
    for s in stmt.query_map([], |r| r.get::<_, String>(0))? {
        keep.insert(PathBuf::from(s?));
    }
    for e in entries.flatten() {
        let p = e.path();
        if !keep.contains(&p) && e.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Steps 4-6 of a committed purge; idempotent.
/// Returns how many keys objects it emptied.
fn apply(config: &Config, state: &mut State, sink: &Sink, id: &str) -> Result<u64> {
    let (ledger_bytes,): (Vec<u8>,) =
        state
            .conn()
            .query_row("SELECT ledger FROM purge WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?,))
            })?;
    let ledger: Ledger =
        serde_json::from_slice(&ledger_bytes).context("the journal's ledger is not valid")?;
    struct Pending {
        batch_id: i64,
        rel: String,
        staged: PathBuf,
        rows: u64,
        bytes: u64,
        done: bool,
    }
    let files: Vec<Pending> = {
        let mut stmt = state.conn().prepare(
            "SELECT batch_id, rel, staged, rows, bytes, done FROM purge_file WHERE purge_id = ?1 ORDER BY rel",
        )?;
        let files = stmt
            .query_map([id], |r| {
                Ok(Pending {
                    batch_id: r.get(0)?,
                    rel: r.get(1)?,
                    staged: PathBuf::from(r.get::<_, String>(2)?),
                    rows: r.get::<_, i64>(3)? as u64,
                    bytes: r.get::<_, i64>(4)? as u64,
                    done: r.get::<_, i64>(5)? != 0,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        files
    };
    // 4. Replace each file, marking it done (a replay of a done file is skipped; of one not
    // marked, repeated: a rename of a staged file already gone is a no-op, a PUT sends the same
    // bytes again).
    let mut replaced = 0;
    for f in files.iter().filter(|f| !f.done) {
        sink.replace(&f.staged, &sink.location_of(&f.rel))
            .with_context(|| format!("replacing {}", f.rel))?;
        state.conn().execute(
            "UPDATE purge_file SET done = 1 WHERE purge_id = ?1 AND rel = ?2",
            params![id, f.rel],
        )?;
        replaced += 1;
        if replaced == 1 {
            Fault::hit(config.fault, Fault::PurgeAfterReplaceOne);
        }
    }
    Fault::hit(config.fault, Fault::PurgeAfterReplace);
    // 5. The manifests: new rows and bytes of the rewritten files, the purge id.
    let mut by_batch: BTreeMap<i64, Vec<&Pending>> = BTreeMap::new();
    for f in &files {
        by_batch.entry(f.batch_id).or_default().push(f);
    }
    // Files no manifest names (`NO_MANIFEST`: published by a version before manifests, or
    // put in the output by another tool) have no manifest to update.
    by_batch.remove(&NO_MANIFEST);
    // Their file keys leave the output with their rows: the keys object of each batch this
    // purge rewrote is emptied (all of its keys: which are theirs cannot be told without their
    // files), but for the batches whose keys must stay a while (`manifest::keys_kept_from`),
    // which a later export run empties once they may go.
    let kept_from = manifest::keys_kept_from(sink, state)?;
    let now = crate::now_secs();
    let mut keys_emptied = 0;
    for (batch_id, fs_) in by_batch {
        let mut m = manifest::read_manifest(sink, batch_id)?
            .with_context(|| format!("the manifest of batch {batch_id} is missing"))?;
        for mf in &mut m.files {
            if let Some(f) = fs_.iter().find(|f| f.rel == mf.path) {
                mf.rows = f.rows;
                mf.bytes = f.bytes;
            }
        }
        m.rows = m.files.iter().map(|f| f.rows).sum();
        if !m.purges.iter().any(|p| p == id) {
            m.purges.push(id.to_owned());
        }
        let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
        sink.put_meta(
            &format!(
                "{}/{}",
                manifest::BATCHES,
                manifest::manifest_name(batch_id)
            ),
            &json,
        )
        .with_context(|| format!("updating the manifest of batch {batch_id}"))?;
        if batch_id < kept_from {
            keys_emptied += u64::from(manifest::empty_keys(sink, batch_id, now)?);
        } else {
            state.conn().execute(
                "INSERT OR IGNORE INTO keys_owed (batch_id) VALUES (?1)",
                [batch_id],
            )?;
        }
    }
    Fault::hit(config.fault, Fault::PurgeAfterManifests);
    // 6. The ledger, then done.
    sink.put_meta(&format!("{PURGES}/{id}.json"), &ledger_bytes)
        .context("writing the purge ledger")?;
    Fault::hit(config.fault, Fault::PurgeAfterLedger);
    state
        .conn()
        .execute("UPDATE purge SET state = 'done' WHERE id = ?1", [id])?;
    for f in &files {
        sink.discard_staged(&f.staged)?;
    }
    // The WAL may still hold the pages of the transactions above (no DID is in them, but the
    // file should be as small as it says): checkpoint it away.
    state
        .conn()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    tracing::info!(
        purge = %id,
        files = files.len(),
        rows_removed = ledger.rows_removed.values().sum::<u64>(),
        keys_objects_emptied = keys_emptied,
        "purge finished"
    );
    Ok(keys_emptied)
}

/// S3 buckets with versioning keep the version of each object a purge replaced, and those old
/// versions hold the withdrawn rows. Every object any purge rewrote is looked at (so a later run
/// with `--s3-delete-noncurrent-versions` finishes what an earlier one only counted): its old
/// versions are deleted with that flag (`DeleteObject` with a version id; the current object
/// is never deleted), otherwise counted and reported (exit 3).
fn sweep_versions(
    config: &Config,
    state: &State,
    sink: &Sink,
    summary: &mut PurgeSummary,
) -> Result<()> {
    let Sink::S3(s3) = sink else {
        return Ok(());
    };
    // The objects this state's purges rewrote, and those the output's ledgers name (a purge by
    // an earlier state directory, before an adoption).
    let mut rels: BTreeSet<String> = state
        .conn()
        .prepare(
            "SELECT DISTINCT f.rel FROM purge_file f JOIN purge p ON p.id = f.purge_id \
             WHERE p.state = 'done'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for name in sink.list_meta(PURGES, None)? {
        let Some(bytes) = sink.get_meta(&format!("{PURGES}/{name}"))? else {
            continue;
        };
        let ledger: Ledger = serde_json::from_slice(&bytes)
            .with_context(|| format!("the purge ledger {PURGES}/{name} is not valid"))?;
        rels.extend(ledger.files_rewritten.into_iter().map(|f| f.path));
    }
    let delete = config.s3.delete_noncurrent_versions;
    match s3.versioning() {
        sink::Versioning::Off => {
            summary.s3_versioning = Some("off".into());
            return Ok(());
        }
        sink::Versioning::On(status) => summary.s3_versioning = Some(status),
        sink::Versioning::Unknown(why) => {
            summary.s3_versioning = Some("unknown".into());
            tracing::warn!(error = %why, "cannot tell whether the bucket keeps old object versions; looking for them object by object");
        }
    }
    for rel in &rels {
        let key = sink.location_of(rel);
        let old = match s3.noncurrent_versions(&key) {
            Ok(old) => old,
            Err(e) if !delete => {
                tracing::warn!(file = %rel, error = format!("{e:#}"), "cannot list the old versions of a rewritten object");
                summary.versions_unchecked += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if delete {
            for version in &old {
                s3.delete_version(&key, version)?;
                summary.noncurrent_versions_deleted += 1;
            }
        } else {
            summary.noncurrent_versions_left += old.len() as u64;
        }
    }
    // Keys objects emptied by an export run (`manifest::expire_keys`) keep their keys in the
    // version before: the same rule (no personal data, but a file key tells whoever holds the
    // file that it was exported).
    let batches = sink.location_of(&format!("{}/{}/", sink::META_DIR, manifest::BATCHES));
    match s3.noncurrent_versions_under(&batches) {
        Ok(old) => {
            for (key, version) in old.iter().filter(|(k, _)| k.ends_with(".keys")) {
                if delete {
                    s3.delete_version(key, version)?;
                    summary.noncurrent_versions_deleted += 1;
                } else {
                    summary.noncurrent_versions_left += 1;
                }
            }
        }
        Err(e) if !delete => {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot list the old versions of the keys objects"
            );
            summary.versions_unchecked += 1;
        }
        Err(e) => return Err(e),
    }
    if summary.noncurrent_versions_left > 0 {
        tracing::warn!(
            versions = summary.noncurrent_versions_left,
            "old versions of rewritten objects still hold the withdrawn rows (--s3-delete-noncurrent-versions deletes them)"
        );
    }
    Ok(())
}

/// Rows of `df` that are theirs (any string column mentions a withdrawn DID).
fn theirs(df: &DataFrame, withdrawn: &Withdrawn) -> Result<Vec<bool>> {
    let mut hit = vec![false; df.height()];
    for col in df.columns() {
        if col.dtype() != &DataType::String {
            continue;
        }
        for (i, v) in col.str()?.iter().enumerate() {
            if !hit[i] {
                if let Some(s) = v {
                    hit[i] = withdrawn.mentions(s.as_bytes());
                }
            }
        }
    }
    Ok(hit)
}

/// A file of the output a purge rewrites.
struct Rewritten {
    batch_id: i64,
    file: LedgerFile,
    staged: PathBuf,
}

/// Reads one published file; if it holds rows of theirs, writes the rest to `staged` (fsynced).
fn rewrite_one(
    config: &Config,
    sink: &Sink,
    batch_id: i64,
    table: &str,
    rel: &str,
    staging: &Path,
    purge_id: &str,
) -> Result<(u64, Option<Rewritten>)> {
    let location = sink.location_of(rel);
    let (read, df) = match sink {
        // A local file is read through its descriptor (Polars maps it): a copy in memory would
        // be a second copy of the page cache.
        Sink::Local { .. } => {
            let file = fs::File::open(&location).with_context(|| format!("opening {location}"))?;
            let read = file.metadata()?.len();
            (read, ParquetReader::new(file).finish())
        }
        Sink::S3(_) => {
            let bytes = sink.read_location(&location)?;
            let read = bytes.len() as u64;
            (read, ParquetReader::new(Cursor::new(bytes)).finish())
        }
    };
    let df = df.with_context(|| format!("reading {rel}"))?;
    let hit = theirs(&df, &config.withdrawn)?;
    let removed = hit.iter().filter(|h| **h).count() as u64;
    if removed == 0 {
        return Ok((read, None));
    }
    let def = crate::tables::TABLES
        .iter()
        .find(|t| t.path == table)
        .with_context(|| format!("{rel}: unknown table {table}"))?;
    let keep: Vec<bool> = hit.iter().map(|h| !h).collect();
    let mask = BooleanChunked::from_slice("keep".into(), &keep);
    let mut kept = df.filter(&mask).context("filtering rows")?;
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let staged = staging.join(format!("{name}.purge-{purge_id}"));
    let bytes_after = crate::parquet::write_parquet(&mut kept, def, &staged, config.compression)?;
    Ok((
        read,
        Some(Rewritten {
            batch_id,
            file: LedgerFile {
                table: table.to_owned(),
                path: rel.to_owned(),
                rows_before: df.height() as u64,
                rows_after: kept.height() as u64,
                bytes_before: read,
                bytes_after,
            },
            staged,
        }),
    ))
}

/// Removes cache files (`rel` on disk, only the very file that was read) of withdrawn
/// participants, and their folder when it is a nested one that is now empty (a per-author
/// folder is named by their DID). Failures are logged without the name and left for the next
/// run (which finds the file again).
pub(crate) fn remove_cache_files(root: &Path, files: &[(String, scan::FileId)]) -> u64 {
    let mut removed = 0;
    for (rel, id) in files {
        match scan::delete_if_same(root, rel, *id) {
            Ok(true) => {
                removed += 1;
                if let Some((dir, _)) = rel.rsplit_once('/') {
                    if scan::is_prunable(dir) {
                        let _ = fs::remove_dir(root.join(dir));
                    }
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not remove a withdrawn participant's cache file; the next run tries again")
            }
        }
    }
    removed
}

/// Step 1: their files in the cache (the walk, taken files included) and the empty per-author
/// folders named by their DIDs. Returns the files removed.
fn purge_cache(config: &Config) -> Result<u64> {
    let root = &config.cache_dir;
    let mut theirs = Vec::new();
    let mut unreadable = 0u64;
    let mut walker = Walker::new(root)?;
    for f in walker.by_ref() {
        match scan::read_file(root, &f, None) {
            Read1::Ok { id, bytes, .. } => {
                let disk = f.disk_rel_path();
                if config.withdrawn.covers_file(&f.rel_path(), &bytes)
                    || config.withdrawn.mentions(disk.as_bytes())
                {
                    theirs.push((disk, id));
                }
            }
            Read1::Gone => {}
            // Its name may still be theirs: a file the purge cannot read is a file it cannot
            // vouch for.
            Read1::Unreadable(_) => unreadable += 1,
        }
    }
    // Entries the walk had to skip (a folder it cannot list, a name that is not UTF-8, a
    // symlink) may hold their data: the purge stops rather than report a cache it did not see.
    let skipped = walker.skipped;
    if skipped.any() || unreadable > 0 {
        bail!(
            "the cache walk could not read everything ({unreadable} unreadable files, {} \
             folders or entries it could not list, {} names that are not UTF-8, {} symlinks or \
             other non-regular files): the purge cannot vouch for what it did not read, so \
             nothing was purged. Fix the permissions or remove those entries (the export's log \
             names them) and run again",
            skipped.unreadable,
            skipped.non_utf8_names,
            skipped.non_regular_files
        );
    }
    let removed = remove_cache_files(root, &theirs);
    if removed < theirs.len() as u64 {
        bail!(
            "{} of their cache files could not be removed (see the log); nothing was purged from the output",
            theirs.len() as u64 - removed
        );
    }
    // The removals are made durable before the commit point: after a power loss their files
    // must not come back (the export would refuse them, but the cache would hold them again).
    let dirs: BTreeSet<&str> = theirs
        .iter()
        .map(|(rel, _)| rel.rsplit_once('/').map_or("", |(dir, _)| dir))
        .collect();
    for dir in dirs {
        let path = root.join(dir);
        if path.is_dir() {
            sink::sync_dir(&path).with_context(|| format!("fsync of {}", path.display()))?;
        }
    }
    for did in config.withdrawn.dids() {
        for side in ["create", "delete"] {
            let dir = root
                .join("in_network_user_activity")
                .join(side)
                .join("post")
                .join(did.as_str());
            let _ = fs::remove_dir(dir);
        }
    }
    Ok(removed)
}

/// Step 1 for `<cache>/.quarantine/`: files of theirs, their `reasons.log` lines, and folders
/// left empty. Returns the files removed.
fn purge_quarantine(config: &Config) -> Result<u64> {
    let qroot = config.cache_dir.join(".quarantine");
    if !qroot.is_dir() {
        return Ok(0);
    }
    let w = &config.withdrawn;
    let mut removed_rel = BTreeSet::new();
    let mut stack = vec![qroot.clone()];
    let mut dirs = Vec::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let t = e.file_type()?;
            if t.is_dir() {
                dirs.push(p.clone());
                stack.push(p);
                continue;
            }
            let rel = p
                .strip_prefix(&qroot)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            if rel == "reasons.log" || !t.is_file() {
                continue;
            }
            let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            if w.covers_file(&rel, &bytes) {
                fs::remove_file(&p).context("removing a quarantined file of theirs")?;
                removed_rel.insert(rel);
            }
        }
    }
    // Deepest first: a folder emptied by the removals goes, and so does its parent.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = fs::remove_dir(&d);
    }
    let log = qroot.join("reasons.log");
    if let Ok(text) = fs::read_to_string(&log) {
        let kept: String = text
            .lines()
            .filter(|l| {
                let path = l.split('\t').nth(1).unwrap_or("");
                !w.mentions(l.as_bytes()) && !removed_rel.contains(path)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if kept != text {
            let tmp = qroot.join(format!(".tmp-{}", sink::random_hex()));
            fs::write(&tmp, kept.as_bytes()).context("rewriting .quarantine/reasons.log")?;
            fs::File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &log).context("rewriting .quarantine/reasons.log")?;
            sink::sync_dir(&qroot)?;
        }
    }
    Ok(removed_rel.len() as u64)
}

/// `batch-export purge`.
pub fn run(config: &Config) -> Result<PurgeOutcome> {
    let started = Instant::now();
    if config.withdrawn.is_empty() {
        return Err(anyhow::Error::new(crate::UsageError(
            "purge needs --withdrawn FILE (BATCH_EXPORT_WITHDRAWN) with at least one DID".into(),
        )));
    }
    if config.dry_run {
        return Err(anyhow::Error::new(crate::UsageError(
            "purge has no --dry-run".into(),
        )));
    }
    if !config.cache_dir.is_dir() {
        bail!(
            "cache directory {} does not exist",
            config.cache_dir.display()
        );
    }
    // The export's two locks: a purge and an export never run at once.
    fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    let state_lock = config.state_dir.join("lock");
    let _state_lock = match take_lock(&state_lock, true)? {
        Lock::Held(f) => f,
        Lock::Busy => return Ok(PurgeOutcome::Busy { lock: state_lock }),
        Lock::Unavailable => bail!("cannot create {}", state_lock.display()),
    };
    let cache_lock = config.cache_dir.join(CACHE_LOCK);
    let _cache_lock = match take_lock(&cache_lock, true)? {
        Lock::Held(f) => f,
        Lock::Busy => return Ok(PurgeOutcome::Busy { lock: cache_lock }),
        Lock::Unavailable => bail!(
            "cannot create {}: a purge must remove files from the cache",
            cache_lock.display()
        ),
    };
    let state = State::open(&config.state_dir)?;
    check_output_binding(config, &state)?;
    let sink = Sink::new(&config.output, &config.s3, config.state_dir.join("staging"))?;
    manifest::reconcile(&sink, &state, &config.state_dir)
        .context("checking the state directory against the output; nothing was purged")?;
    ensure_schema(&state)?;
    let mut summary = PurgeSummary {
        output: sink.describe(),
        dids: config.withdrawn.len() as u64,
        ..PurgeSummary::default()
    };
    let (mut state, sink, rolled) = crate::export::roll_forward_batches(config, state, sink)?;
    summary.batches_rolled_forward = rolled;
    let result = go(config, &mut state, &sink, &mut summary)
        .and_then(|()| sweep_versions(config, &state, &sink, &mut summary));
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(match result {
        Ok(()) => PurgeOutcome::Done(summary),
        Err(error) => {
            summary.error = Some(format!("{error:#}"));
            PurgeOutcome::Failed { summary, error }
        }
    })
}

fn go(config: &Config, state: &mut State, sink: &Sink, summary: &mut PurgeSummary) -> Result<()> {
    summary.purges_rolled_forward = roll_forward(config, state, sink)?;
    let salt = salt(state)?;
    let hashes = config.withdrawn.salted_hashes(&salt);
    let mut new = 0;
    for h in &hashes {
        let known: Option<String> = state
            .conn()
            .query_row(
                "SELECT purge_id FROM purged_did WHERE hash = ?1 \
                 AND purge_id NOT LIKE 'pending:%' AND purge_id != 'adopted'",
                [h],
                |r| r.get(0),
            )
            .optional()?;
        new += u64::from(known.is_none());
    }
    summary.dids_new = new;
    let id = format!("{:010}-{}", crate::now_secs(), &sink::random_hex()[..8]);
    // Until the commit point: a marker (no DID) so that an export run can say a purge is owed.
    state.set_meta("purge_pending", &id)?;
    // The DIDs are guarded from now on (not only from the commit point): an export run after a
    // crash before it must be given them too, and then finishes this purge (`before_export`).
    {
        let tx = state.conn_mut().transaction()?;
        {
            let mut stmt =
                tx.prepare("INSERT OR IGNORE INTO purged_did (hash, purge_id) VALUES (?1, ?2)")?;
            for h in &hashes {
                stmt.execute(params![h, format!("pending:{id}")])?;
            }
        }
        tx.commit().context("recording the purge's DIDs")?;
    }
    // 1. The cache.
    summary.cache_files_removed = purge_cache(config)?;
    summary.quarantine_files_removed = purge_quarantine(config)?;
    Fault::hit(config.fault, Fault::PurgeAfterCache);
    // 2. The output: every file every manifest names.
    let staging = sink.purge_staging_dir();
    sink::create_dir_all_durable(&staging)?;
    let mut files = Vec::new();
    for batch_id in manifest::manifest_ids(sink, None)? {
        let m = manifest::read_manifest(sink, batch_id)?
            .with_context(|| format!("the manifest of batch {batch_id} disappeared"))?;
        for f in m.files {
            files.push((batch_id, f.table, f.path));
        }
    }
    // Parquet files in the output that no manifest names are theirs to purge too: batches
    // published before manifests existed (a state upgraded from version 1) and files of the
    // predecessor or of another tool in the same table folders.
    let named: BTreeSet<&str> = files.iter().map(|(_, _, rel)| rel.as_str()).collect();
    let mut unnamed = Vec::new();
    for rel in sink.list_parquet()? {
        if named.contains(rel.as_str()) {
            continue;
        }
        let Some(table) = table_of(&rel) else {
            bail!(
                "{rel} is a Parquet file in no manifest and in no table folder this version \
                 knows: its rows cannot be checked for the withdrawn participants, so nothing \
                 was purged. Move it out of the output (or purge it by hand) and run again"
            );
        };
        unnamed.push((NO_MANIFEST, table.to_owned(), rel));
    }
    files.extend(unnamed);
    let work = |(batch_id, table, rel): &(i64, String, String)| {
        rewrite_one(config, sink, *batch_id, table, rel, &staging, &id)
    };
    // One file at a time: Polars decodes each file on its own thread pool already, and a rayon
    // loop around it kept many decoded files alive at once (a worker waiting for Polars' pool
    // steals the next file meanwhile): 886 MB peak at 1M rows against 70 MB one by one, for
    // 1.7 s instead of 1.2 s (BENCHMARKS.md).
    let results: Vec<Result<(u64, Option<Rewritten>)>> = files.iter().map(work).collect();
    let mut rewritten = Vec::new();
    for r in results {
        let (read, rw) = r?;
        summary.parquet_files_read += 1;
        summary.parquet_bytes_read += read;
        rewritten.extend(rw);
    }
    sink::sync_dir(&staging).with_context(|| format!("fsync of {}", staging.display()))?;
    let nothing = rewritten.is_empty()
        && new == 0
        && summary.cache_files_removed == 0
        && summary.quarantine_files_removed == 0;
    if nothing {
        state
            .conn()
            .execute("DELETE FROM meta WHERE k = 'purge_pending'", [])?;
        return Ok(());
    }
    Fault::hit(config.fault, Fault::PurgeAfterStage);
    // 3. The commit point.
    let mut rows_removed: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rewritten {
        *rows_removed.entry(r.file.table.clone()).or_default() +=
            r.file.rows_before - r.file.rows_after;
    }
    let ledger = Ledger {
        format: LEDGER_FORMAT.to_owned(),
        purge_id: id.clone(),
        committed_at: crate::now_secs(),
        did_hash: "sha256(salt || 0x00 || did), hex; the salt is a secret of the export's state \
                   directory (state.sqlite, meta.purge_salt)"
            .to_owned(),
        did_hashes: hashes.clone(),
        rows_removed: rows_removed.clone(),
        files_rewritten: rewritten.iter().map(|r| r.file.clone()).collect(),
        cache_files_removed: summary.cache_files_removed,
        quarantine_files_removed: summary.quarantine_files_removed,
    };
    let ledger_json = serde_json::to_vec_pretty(&ledger).expect("a ledger serializes");
    {
        let tx = state.conn_mut().transaction()?;
        tx.execute(
            "INSERT INTO purge (id, committed_at, state, ledger) VALUES (?1, ?2, 'committed', ?3)",
            params![id, ledger.committed_at, ledger_json],
        )?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO purge_file (purge_id, batch_id, rel, staged, rows, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for r in &rewritten {
                stmt.execute(params![
                    id,
                    r.batch_id,
                    r.file.path,
                    r.staged.to_string_lossy(),
                    r.file.rows_after as i64,
                    r.file.bytes_after as i64
                ])?;
            }
            // A DID an earlier purge applied keeps that purge's id (one taken over from an
            // adopted list, whose purge this state cannot vouch for, gets this one).
            let mut stmt = tx.prepare(
                "INSERT INTO purged_did (hash, purge_id) VALUES (?1, ?2)
                 ON CONFLICT (hash) DO UPDATE SET purge_id = excluded.purge_id
                 WHERE purged_did.purge_id LIKE 'pending:%' OR purged_did.purge_id = 'adopted'",
            )?;
            for h in &hashes {
                stmt.execute(params![h, id])?;
            }
        }
        tx.execute("DELETE FROM meta WHERE k = 'purge_pending'", [])?;
        tx.commit().context("committing the purge")?;
    }
    Fault::hit(config.fault, Fault::PurgeAfterCommit);
    summary.purge_id = Some(id.clone());
    summary.files_rewritten = rewritten.len() as u64;
    summary.bytes_rewritten = rewritten.iter().map(|r| r.file.bytes_after).sum();
    summary.rows_removed = rows_removed;
    // 4-6.
    summary.keys_objects_emptied += apply(config, state, sink, &id)?;
    clean_purge_staging(state, sink)?;
    Ok(())
}
