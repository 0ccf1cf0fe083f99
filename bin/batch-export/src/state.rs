//! The export journal and the exported-keys store: one SQLite file (`<state-dir>/state.sqlite`,
//! WAL, `synchronous=FULL`), so each commit point is one atomic, durable transaction.
//!
//! * `batch` / `batch_output`: a batch is recorded once, at its commit point, with state
//!   `committed`: its Parquet files are staged and fsynced (never where a reader looks), their
//!   final locations are recorded, and its files' keys are stored. Only then is anything
//!   published. A run that finds a `committed` batch rolls it *forward* (publishes the staged
//!   files, writes the manifest) and marks it `published`; nothing published is ever removed.
//! * exported keys (`keys.rs`): the key of every exported cache file (hash of its
//!   cache-relative path and its JSON without the volatile value), written in the commit
//!   transaction as one sorted run per batch with a Bloom filter; runs are merged four into one
//!   after the batch and dropped a whole retention generation at a time. A cache file whose key
//!   is here is already in Parquet: it is deleted, never exported again. That covers a run
//!   killed between its commit and its deletes and the writer rewriting a file when it replays
//!   events after a crash.
//! * [`RunRows`] (a private temporary SQLite database on disk, gone with the run): the row
//!   de-duplication keys of the current run, so the in-run URI de-duplication does not hold
//!   the run in memory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use sha2::{Digest, Sha256};

pub type FileKey = [u8; 16];

/// The journal's schema version (`meta.schema_version`). 1: publish before commit (rolled back
/// on a crash); 2: stage, commit, publish (rolled forward), key generations, manifests; 3:
/// exported keys in merged runs (`keys.rs`), which a version-2 binary would not read, so it
/// must refuse this state rather than export its files again.
const SCHEMA_VERSION: i64 = 3;

pub struct State {
    conn: Connection,
}

fn newer_schema(version: i64) -> String {
    format!("the state database was written by a newer batch-export (schema {version}); use that version")
}

/// One Parquet file of a batch: its final location and where it is staged until published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutput {
    pub table_path: String,
    /// Final location: a local path or an S3 key.
    pub location: String,
    /// The staged file (local; beside the output for a local output, in the state directory
    /// for S3), fsynced before the commit point.
    pub staged: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// A committed batch (published or not).
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: i64,
    pub committed_at: i64,
    pub previous: Option<i64>,
    pub files: u64,
    pub rows: u64,
    /// SHA-256 (hex) of the batch's sorted file keys: what its manifest records.
    pub keys_digest: String,
    pub outputs: Vec<BatchOutput>,
}

/// What a new batch commits.
pub struct NewBatch<'a> {
    pub now: i64,
    pub outputs: &'a [BatchOutput],
    pub keys: &'a [FileKey],
    pub rows: u64,
}

/// A batch rebuilt from the output's manifests (`--adopt-output`).
pub struct Adopted {
    pub id: i64,
    pub committed_at: i64,
    pub previous: Option<i64>,
    pub files: u64,
    pub rows: u64,
    pub keys_digest: String,
    /// `None` for a batch older than the key retention (its keys are not needed any more).
    pub keys: Option<Vec<FileKey>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batch (
    id INTEGER PRIMARY KEY,
    started_at INTEGER NOT NULL,   -- the commit time (Unix seconds)
    state TEXT NOT NULL,           -- committed | published (v1 also: writing | rolled_back)
    files INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_output (
    batch_id INTEGER NOT NULL REFERENCES batch(id),
    table_path TEXT NOT NULL,
    location TEXT NOT NULL,
    temp TEXT NOT NULL,            -- the staged file
    rows INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_output_batch ON batch_output(batch_id);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
";

/// Columns added by schema version 2.
const SCHEMA_V2: &str = "
ALTER TABLE batch ADD COLUMN previous INTEGER;
ALTER TABLE batch ADD COLUMN keys_digest TEXT;
-- The sorted 16-byte keys of a committed batch until its manifest is written (then NULL).
ALTER TABLE batch ADD COLUMN keys BLOB;
ALTER TABLE batch_output ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
";

/// SHA-256 (lowercase hex) of keys in sorted order, concatenated: the batch's key digest.
pub fn keys_digest(sorted: &[u8]) -> String {
    let d = Sha256::digest(sorted);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys sorted and concatenated (what the manifest's `.keys` object holds).
pub fn sorted_key_bytes(keys: &[FileKey]) -> Vec<u8> {
    let mut sorted: Vec<&FileKey> = keys.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.into_iter().flat_map(|k| k.iter().copied()).collect()
}

impl State {
    /// Opens (creating or upgrading) the state database in `dir`.
    pub fn open(dir: &Path) -> Result<State> {
        let path = dir.join("state.sqlite");
        let conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The WAL file is truncated back to this size after a checkpoint: one large commit
        // (50,000 keys is ~5 MB of pages) does not leave a WAL of that size behind for good.
        conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // Erasure is physical (consent purges, `purge.rs`): freed pages and cells are
        // overwritten with zeros, so nothing deleted stays readable in the file.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.execute_batch(SCHEMA)
            .and_then(|()| conn.execute_batch(crate::keys::SCHEMA))
            .and_then(|()| conn.execute_batch(crate::manifest::KEYS_OWED_SCHEMA))
            .context("creating the state schema")?;
        let state = State { conn };
        state.upgrade()?;
        Ok(state)
    }

    /// Opens an existing state database read-only (dry runs); `None` when there is none yet.
    pub fn open_read_only(dir: &Path) -> Result<Option<State>> {
        let path = dir.join("state.sqlite");
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        let state = State { conn };
        // Not upgraded (read-only): an older schema is read as it is (`keys::contains_mask`
        // knows its key tables); a newer one may keep keys where this version does not look.
        let version = state.schema_version()?;
        if version > SCHEMA_VERSION {
            bail!(newer_schema(version));
        }
        Ok(Some(state))
    }

    fn schema_version(&self) -> Result<i64> {
        if !crate::keys::table_exists(&self.conn, "meta")? {
            return Ok(1);
        }
        Ok(self
            .meta("schema_version")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(1))
    }

    /// The connection, for the purge journal (`purge.rs`), which keeps its own tables here so
    /// that a purge and an export batch share one durable commit mechanism.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub(crate) fn meta(&self, k: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT v FROM meta WHERE k = ?1", [k], |r| r.get(0))
            .optional()?)
    }

    pub(crate) fn set_meta(&self, k: &str, v: &str) -> Result<()> {
        self.conn
            .execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)", [k, v])?;
        Ok(())
    }

    /// Version 1 published before its commit point; its `committed` batches are published, and
    /// its one key table becomes the first generation. Version 2's key tables stay as they are.
    fn upgrade(&self) -> Result<()> {
        let version = self.schema_version()?;
        if version > SCHEMA_VERSION {
            bail!(newer_schema(version));
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction()?;
        if version < 2 {
            let has_column: bool = self.conn.query_row(
                "SELECT count(*) FROM pragma_table_info('batch') WHERE name = 'keys_digest'",
                [],
                |r| r.get::<_, i64>(0),
            )? > 0;
            if !has_column {
                tx.execute_batch(SCHEMA_V2)?;
            }
            tx.execute(
                "UPDATE batch SET state = 'published' WHERE state = 'committed'",
                [],
            )?;
            if crate::keys::table_exists(&tx, "exported")? {
                let start: i64 = tx
                    .query_row("SELECT min(at) FROM exported", [], |r| {
                        r.get::<_, Option<i64>>(0)
                    })?
                    .unwrap_or_else(crate::now_secs);
                tx.execute_batch(&format!(
                    "ALTER TABLE exported RENAME TO {}",
                    crate::keys::legacy_table(start)
                ))?;
            }
            // Batches up to here were published without a manifest (version 1): the check against
            // the output's manifests starts after them.
            tx.execute(
                "INSERT OR REPLACE INTO meta (k, v) SELECT 'manifests_from', coalesce(max(id), 0) + 1 FROM batch",
                [],
            )?;
        }
        // 2 -> 3: nothing to move; the version-2 key tables are read as they are (`keys.rs`).
        tx.execute(
            "INSERT OR REPLACE INTO meta (k, v) VALUES ('schema_version', ?1)",
            [SCHEMA_VERSION.to_string()],
        )?;
        tx.commit().context("upgrading the state database")?;
        Ok(())
    }

    /// The output this state directory is bound to (`None` before its first run).
    pub fn bound_output(&self) -> Result<Option<String>> {
        self.meta("output")
    }

    /// Binds this state directory to `identity` (first run only; see `export::run`).
    pub fn bind_output(&self, identity: &str) -> Result<()> {
        self.conn
            .execute("INSERT INTO meta (k, v) VALUES ('output', ?1)", [identity])
            .context("recording the output in the state database")?;
        Ok(())
    }

    /// The first batch id that has a manifest (batches before it were published by version 1,
    /// which wrote none).
    pub fn manifests_from(&self) -> Result<i64> {
        Ok(self
            .meta("manifests_from")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(1))
    }

    /// This state directory's exporter id (a random UUID made on first use): what the output's
    /// owner marker names. `None` in a read-only state that never got one.
    pub fn owner_id(&self) -> Result<Option<String>> {
        self.meta("owner")
    }

    /// The exporter id, made on first use.
    pub fn ensure_owner_id(&self) -> Result<String> {
        if let Some(id) = self.owner_id()? {
            return Ok(id);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.set_meta("owner", &id)?;
        Ok(id)
    }

    /// Batches a version-1 run left before its commit point (`writing`): that protocol may
    /// already have published their files, and this one never removes a published file.
    pub fn legacy_unfinished(&self) -> Result<Vec<i64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM batch WHERE state = 'writing' ORDER BY id")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids)
    }

    fn batch_from_row(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<Batch> {
        Ok(Batch {
            id: r.get(0)?,
            committed_at: r.get(1)?,
            previous: r.get(2)?,
            files: r.get::<_, i64>(3)? as u64,
            rows: r.get::<_, i64>(4)? as u64,
            keys_digest: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
            outputs: Vec::new(),
        })
    }

    fn outputs_of(&self, id: i64) -> Result<Vec<BatchOutput>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT table_path, location, temp, rows, bytes FROM batch_output WHERE batch_id = ?1 ORDER BY rowid",
        )?;
        let outs = stmt
            .query_map([id], |r| {
                Ok(BatchOutput {
                    table_path: r.get(0)?,
                    location: r.get(1)?,
                    staged: PathBuf::from(r.get::<_, String>(2)?),
                    rows: r.get::<_, i64>(3)? as u64,
                    bytes: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(outs)
    }

    const BATCH_COLUMNS: &'static str = "id, started_at, previous, files, rows, keys_digest";

    /// The newest published batch.
    pub fn last_published(&self) -> Result<Option<Batch>> {
        let sql = format!(
            "SELECT {} FROM batch WHERE state = 'published' ORDER BY id DESC LIMIT 1",
            Self::BATCH_COLUMNS
        );
        Ok(self
            .conn
            .query_row(&sql, [], |r| self.batch_from_row(r))
            .optional()?)
    }

    /// Batches past their commit point whose publication did not finish (oldest first).
    pub fn unpublished(&self) -> Result<Vec<Batch>> {
        let sql = format!(
            "SELECT {} FROM batch WHERE state = 'committed' ORDER BY id",
            Self::BATCH_COLUMNS
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut batches: Vec<Batch> = stmt
            .query_map([], |r| self.batch_from_row(r))?
            .collect::<rusqlite::Result<_>>()?;
        for b in &mut batches {
            b.outputs = self.outputs_of(b.id)?;
        }
        Ok(batches)
    }

    /// The sorted keys of a committed batch whose manifest is not written yet.
    pub fn batch_keys(&self, id: i64) -> Result<Vec<u8>> {
        let keys: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT keys FROM batch WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .flatten();
        keys.with_context(|| format!("batch {id} has no keys recorded (already published?)"))
    }

    /// The commit point: the batch (state `committed`), its staged outputs and its files' keys,
    /// in one transaction. Returns the batch id.
    pub fn commit(&mut self, b: &NewBatch<'_>, retention_secs: i64) -> Result<Batch> {
        let generation = crate::keys::current_generation(&self.conn, b.now, retention_secs)?;
        let sorted = sorted_key_bytes(b.keys);
        let digest = keys_digest(&sorted);
        let tx = self.conn.transaction()?;
        let previous: Option<i64> = tx.query_row(
            "SELECT max(id) FROM batch WHERE state IN ('committed', 'published')",
            [],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO batch (started_at, state, files, rows, previous, keys_digest, keys) VALUES (?1, 'committed', ?2, ?3, ?4, ?5, ?6)",
            params![b.now, b.keys.len() as i64, b.rows as i64, previous, digest, sorted],
        )?;
        let id = tx.last_insert_rowid();
        {
            let mut stmt = tx.prepare(
                "INSERT INTO batch_output (batch_id, table_path, location, temp, rows, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for o in b.outputs {
                stmt.execute(params![
                    id,
                    o.table_path,
                    o.location,
                    o.staged.to_string_lossy(),
                    o.rows as i64,
                    o.bytes as i64
                ])?;
            }
        }
        crate::keys::add_batch(&tx, generation, &sorted)?;
        tx.commit().context("committing the batch")?;
        Ok(Batch {
            id,
            committed_at: b.now,
            previous,
            files: b.keys.len() as u64,
            rows: b.rows,
            keys_digest: digest,
            outputs: b.outputs.to_vec(),
        })
    }

    /// Every output of the batch is published and its manifest written.
    pub fn mark_published(&self, id: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE batch SET state = 'published', keys = NULL WHERE id = ?1",
            [id],
        )?;
        Ok(())
    }

    /// Which of `keys` were exported before (same order as `keys`).
    pub fn exported_mask(&self, keys: &[FileKey]) -> Result<Vec<bool>> {
        crate::keys::contains_mask(&self.conn, keys)
    }

    /// Merges the exported-key runs that are due (`keys.rs`): after a batch, outside its commit
    /// point.
    pub fn merge_key_runs(&mut self) -> Result<crate::keys::Merged> {
        // A merged run holds every key of its inputs, so their freed pages reveal nothing that
        // stays hidden: no need to zero them (secure_delete is there for the consent purges).
        self.conn.pragma_update(None, "secure_delete", "OFF")?;
        let merged = crate::keys::compact(&self.conn);
        self.conn.pragma_update(None, "secure_delete", "ON")?;
        merged
    }

    /// Forgets exported keys older than the retention (whole generations, `keys.rs`). Returns
    /// the number of generations dropped.
    pub fn prune(&self, now: i64, retention_secs: i64) -> Result<usize> {
        crate::keys::prune(&self.conn, now, retention_secs)
    }

    /// Replaces the journal and the exported keys with what the output's manifests say
    /// (`--adopt-output`), in one transaction. Batches the state had committed but not
    /// published are forgotten: their cache files are still in the cache (nothing is deleted
    /// before publication) and are exported again.
    pub fn adopt(&mut self, batches: &[Adopted], retention_secs: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM batch_output", [])?;
        tx.execute("DELETE FROM batch", [])?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO batch (id, started_at, state, files, rows, previous, keys_digest) VALUES (?1, ?2, 'published', ?3, ?4, ?5, ?6)",
            )?;
            for b in batches {
                ins.execute(params![
                    b.id,
                    b.committed_at,
                    b.files as i64,
                    b.rows as i64,
                    b.previous,
                    b.keys_digest
                ])?;
            }
        }
        // One generation that began a retention ago: the next batch starts a new one, and these
        // keys are forgotten a retention after that, like keys exported just now.
        let keys = batches
            .iter()
            .flat_map(|b| b.keys.iter().flatten().copied())
            .collect();
        crate::keys::replace_all(&tx, crate::now_secs() - retention_secs, keys)?;
        let first = batches.iter().map(|b| b.id).min().unwrap_or(1);
        tx.execute(
            "INSERT OR REPLACE INTO meta (k, v) VALUES ('manifests_from', ?1)",
            [first.to_string()],
        )?;
        tx.commit().context("adopting the output's manifests")?;
        Ok(())
    }
}

/// The row de-duplication keys of one run (rows are de-duplicated by URI within a run),
/// on disk in a private temporary database that SQLite deletes when the run ends, stored like
/// the exported keys (sorted runs with Bloom filters, `keys.rs`): inserting a batch's keys writes
/// a new run instead of touching pages all over one B-tree, which outgrew its cache at a few
/// million rows (BENCHMARKS.md). Memory: SQLite's page cache and one batch's filters.
pub struct RunRows {
    conn: Connection,
}

impl RunRows {
    pub fn new() -> Result<RunRows> {
        // An empty file name is a private temporary database on disk.
        let conn = Connection::open("").context("opening the run's de-duplication store")?;
        // Private and thrown away with the run: no rollback journal, no fsync.
        conn.pragma_update(None, "journal_mode", "OFF")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        // 16 MiB of page cache before pages go to the temporary file: a fixed bound, whatever
        // the run's length.
        conn.pragma_update(None, "cache_size", -16384)?;
        conn.execute_batch(crate::keys::SCHEMA)?;
        Ok(RunRows { conn })
    }

    /// Records row de-duplication keys; returns, per key, whether it is new in this run (a key
    /// repeated within `keys` is new only the first time).
    pub fn first_in_run(&self, keys: &[u128]) -> Result<Vec<bool>> {
        let keys: Vec<FileKey> = keys.iter().map(|k| k.to_be_bytes()).collect();
        let seen = crate::keys::contains_mask(&self.conn, &keys)?;
        let mut in_batch = std::collections::HashSet::with_capacity(keys.len());
        let mut out = vec![false; keys.len()];
        let mut new = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if !seen[i] && in_batch.insert(*k) {
                out[i] = true;
                new.push(*k);
            }
        }
        new.sort_unstable();
        let sorted: Vec<u8> = new.iter().flatten().copied().collect();
        let tx = self.conn.unchecked_transaction()?;
        crate::keys::add_batch(&tx, 0, &sorted)?;
        tx.commit()?;
        crate::keys::compact(&self.conn)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> FileKey {
        let mut k = [0u8; 16];
        k[..4].copy_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn deleted_rows_leave_no_bytes_in_the_database_file() {
        let tmp = tempfile::tempdir().unwrap();
        let state = State::open(tmp.path()).unwrap();
        let marker = "purged-marker-7f3c2a9e1b";
        state.set_meta("erasure_probe", marker).unwrap();
        state.set_meta("erasure_neighbour", "stays").unwrap();
        state
            .conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let file = tmp.path().join("state.sqlite");
        let holds = |bytes: &[u8]| bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
        assert!(
            holds(&std::fs::read(&file).unwrap()),
            "the probe was written"
        );
        state
            .conn()
            .execute("DELETE FROM meta WHERE k = 'erasure_probe'", [])
            .unwrap();
        state
            .conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        // Without secure_delete the deleted cell stays in its page as a free block.
        assert!(!holds(&std::fs::read(&file).unwrap()));
        assert!(!holds(
            &std::fs::read(tmp.path().join("state.sqlite-wal")).unwrap_or_default()
        ));
    }

    #[test]
    fn generations_rotate_and_old_keys_are_dropped_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = State::open(tmp.path()).unwrap();
        let day = 86_400;
        let commit = |s: &mut State, now: i64, keys: &[FileKey]| {
            s.commit(
                &NewBatch {
                    now,
                    outputs: &[],
                    keys,
                    rows: 0,
                },
                day,
            )
            .unwrap()
        };
        commit(&mut s, 1_000_000, &[key(1)]);
        commit(&mut s, 1_000_000 + day / 2, &[key(2)]);
        assert_eq!(crate::keys::generations(&s.conn).unwrap(), vec![1_000_000]);
        commit(&mut s, 1_000_000 + day, &[key(3)]);
        assert_eq!(crate::keys::generations(&s.conn).unwrap().len(), 2);
        assert_eq!(
            s.exported_mask(&[key(1), key(2), key(3), key(4)]).unwrap(),
            [true, true, true, false]
        );
        // Key 2 is only half a retention old a day after the first generation began: kept.
        assert_eq!(s.prune(1_000_000 + day + day / 2, day).unwrap(), 0);
        assert!(s.exported_mask(&[key(2)]).unwrap()[0]);
        // A retention after the second generation began, every key of the first is older.
        assert_eq!(s.prune(1_000_000 + 2 * day, day).unwrap(), 1);
        assert_eq!(
            s.exported_mask(&[key(1), key(2), key(3)]).unwrap(),
            [false, false, true]
        );
    }

    #[test]
    fn a_commit_writes_about_its_batch_however_many_keys_are_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = State::open(tmp.path()).unwrap();
        let hashed =
            |i: u64| -> FileKey { Sha256::digest(i.to_le_bytes())[..16].try_into().unwrap() };
        let commit = |s: &mut State, batch: u64| {
            let keys: Vec<FileKey> = (batch * 2_000..(batch + 1) * 2_000).map(hashed).collect();
            s.commit(
                &NewBatch {
                    now: 1_000,
                    outputs: &[],
                    keys: &keys,
                    rows: 0,
                },
                86_400,
            )
            .unwrap();
            s.merge_key_runs().unwrap();
        };
        for batch in 0..100 {
            commit(&mut s, batch);
        }
        // The WAL frames (pages) the next commit writes, with 200,000 keys stored.
        s.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let keys: Vec<FileKey> = (200_000..202_000).map(hashed).collect();
        s.commit(
            &NewBatch {
                now: 1_000,
                outputs: &[],
                keys: &keys,
                rows: 0,
            },
            86_400,
        )
        .unwrap();
        let frames: i64 = s
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap();
        // 2,000 keys are 32 KB, twice (the batch row keeps them for its manifest): ~20 pages
        // and a few of the journal's. One B-tree of all keys would take the batch's random keys
        // into most of its ~2,000 leaf pages.
        assert!(frames < 100, "the commit wrote {frames} pages");
        assert!(
            s.exported_mask(&[hashed(7), hashed(201_999), hashed(300_000)])
                .unwrap()
                == [true, true, false]
        );
    }

    #[test]
    fn run_rows_are_new_once() {
        let tmp = tempfile::tempdir().unwrap();
        let _ = tmp;
        let s = RunRows::new().unwrap();
        assert_eq!(s.first_in_run(&[1, 2, 1]).unwrap(), [true, true, false]);
        assert_eq!(s.first_in_run(&[2, 3]).unwrap(), [false, true]);
        // Across merges of its runs (four runs of a level merge into one).
        for b in 0..10u128 {
            let batch: Vec<u128> = (b * 100..(b + 1) * 100).map(|k| k * 7_919).collect();
            assert!(s.first_in_run(&batch).unwrap().iter().all(|new| *new));
        }
        let again: Vec<u128> = (0..1_000u128).map(|k| k * 7_919).chain([1, 3, 5]).collect();
        let mask = s.first_in_run(&again).unwrap();
        assert!(mask[..1_003 - 1].iter().all(|new| !*new), "seen before");
        assert!(mask[1_002], "5 is new");
    }

    /// A state as version 2 left it: one published batch, one committed, two keys.
    fn version_2_state(dir: &Path) {
        let c = Connection::open(dir.join("state.sqlite")).unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c.execute_batch(SCHEMA_V2).unwrap();
        c.execute_batch(
            "CREATE TABLE exported_g100 (key BLOB PRIMARY KEY, batch_id INTEGER NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO batch (id, started_at, state, keys) VALUES (1, 100, 'published', NULL);
             INSERT INTO batch (id, started_at, state, keys) VALUES (2, 100, 'committed', x'00000002000000000000000000000000');
             INSERT INTO exported_g100 VALUES (x'00000001000000000000000000000000', 1, 100);
             INSERT INTO exported_g100 VALUES (x'00000002000000000000000000000000', 2, 100);
             INSERT INTO meta VALUES ('schema_version', '2'), ('manifests_from', '1');",
        )
        .unwrap();
    }

    /// A state as version 1 left it: one batch, its key in the single `exported` table.
    fn version_1_state(dir: &Path) {
        let c = Connection::open(dir.join("state.sqlite")).unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c.execute_batch(
            "CREATE TABLE exported (key BLOB PRIMARY KEY, batch_id INTEGER NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO batch (id, started_at, state) VALUES (1, 100, 'committed');
             INSERT INTO exported VALUES (x'00000001000000000000000000000000', 1, 100);",
        )
        .unwrap();
    }

    #[test]
    fn a_dry_run_reads_older_states_without_upgrading_them() {
        for (version, make, known) in [
            (2, version_2_state as fn(&Path), vec![true, true, false]),
            (1, version_1_state, vec![true, false, false]),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            make(tmp.path());
            let s = State::open_read_only(tmp.path()).unwrap().expect("a state");
            assert_eq!(
                s.exported_mask(&[key(1), key(2), key(4)]).unwrap(),
                known,
                "version {version}"
            );
            assert_eq!(s.schema_version().unwrap(), version, "left as it was");
        }
    }

    #[test]
    fn a_version_2_journal_keeps_its_committed_batches_and_keys() {
        let tmp = tempfile::tempdir().unwrap();
        version_2_state(tmp.path());
        let mut s = State::open(tmp.path()).unwrap();
        // Version 2 committed before publishing: its committed batch is rolled forward, not
        // taken as published (that was version 1's meaning).
        assert_eq!(
            s.unpublished()
                .unwrap()
                .iter()
                .map(|b| b.id)
                .collect::<Vec<_>>(),
            [2]
        );
        assert_eq!(s.manifests_from().unwrap(), 1);
        assert_eq!(s.meta("schema_version").unwrap().as_deref(), Some("3"));
        // Its keys are still known, and new ones go to runs beside them.
        s.commit(
            &NewBatch {
                now: 150,
                outputs: &[],
                keys: &[key(3)],
                rows: 0,
            },
            86_400,
        )
        .unwrap();
        assert_eq!(
            s.exported_mask(&[key(1), key(2), key(3), key(4)]).unwrap(),
            [true, true, true, false]
        );
    }

    #[test]
    fn a_newer_journal_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        drop(State::open(tmp.path()).unwrap());
        {
            let c = Connection::open(tmp.path().join("state.sqlite")).unwrap();
            c.execute("UPDATE meta SET v = '4' WHERE k = 'schema_version'", [])
                .unwrap();
        }
        let err = State::open(tmp.path()).err().expect("refused");
        assert!(format!("{err:#}").contains("newer batch-export"), "{err:#}");
        // Also by a dry run, which would not see keys a newer version keeps elsewhere.
        let err = State::open_read_only(tmp.path()).err().expect("refused");
        assert!(format!("{err:#}").contains("newer batch-export"), "{err:#}");
    }

    #[test]
    fn a_version_1_journal_is_upgraded() {
        let tmp = tempfile::tempdir().unwrap();
        version_1_state(tmp.path());
        let s = State::open(tmp.path()).unwrap();
        assert_eq!(s.last_published().unwrap().unwrap().id, 1);
        assert!(s.exported_mask(&[key(1)]).unwrap()[0]);
        drop(s);
        // Opening again changes nothing.
        let s = State::open(tmp.path()).unwrap();
        assert_eq!(crate::keys::generations(&s.conn).unwrap(), vec![100]);
    }
}
