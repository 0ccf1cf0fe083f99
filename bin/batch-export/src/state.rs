//! The export journal and the exported-keys store: one SQLite file (`<state-dir>/state.sqlite`,
//! WAL, `synchronous=FULL`), so each commit point is one atomic, durable transaction.
//!
//! * `batch` / `batch_output`: before a batch publishes anything, its planned Parquet locations
//!   are committed with state `writing`. A run that finds a `writing` batch was killed before its
//!   commit point: it removes those outputs (rollback) and the cache files are exported again.
//! * `exported`: the key of every exported cache file (hash of its cache-relative path and its
//!   JSON without the `synctimestamp` value), inserted in the same transaction that flips the
//!   batch to `committed`. A cache file whose key is here is already in Parquet: it is deleted,
//!   never exported again. That covers both a run killed between its commit and its deletes and
//!   the writer rewriting a file when it replays events after a crash. Keys are kept for the
//!   configured retention (default 7 days, longer than a relay's 72 h replay window).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

pub type FileKey = [u8; 16];

pub struct State {
    conn: Connection,
}

/// A Parquet file a batch planned to publish.
#[derive(Debug, Clone)]
pub struct PlannedOutput {
    /// Final location: a local path or an S3 key.
    pub location: String,
    /// Temporary location (local temp path or local staging file for S3).
    pub temp: PathBuf,
}

/// A batch found in state `writing` at start-up.
#[derive(Debug)]
pub struct Unfinished {
    pub id: i64,
    pub outputs: Vec<PlannedOutput>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batch (
    id INTEGER PRIMARY KEY,
    started_at INTEGER NOT NULL,
    state TEXT NOT NULL,           -- writing | committed | rolled_back
    files INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batch_output (
    batch_id INTEGER NOT NULL REFERENCES batch(id),
    table_path TEXT NOT NULL,
    location TEXT NOT NULL,
    temp TEXT NOT NULL,
    rows INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_output_batch ON batch_output(batch_id);
CREATE TABLE IF NOT EXISTS exported (
    key BLOB PRIMARY KEY,
    batch_id INTEGER NOT NULL,
    at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
";

impl State {
    /// Opens (creating) the state database in `dir`.
    pub fn open(dir: &Path) -> Result<State> {
        let path = dir.join("state.sqlite");
        let conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch(SCHEMA)
            .context("creating the state schema")?;
        Ok(State { conn })
    }

    /// Opens an existing state database read-only (dry runs); `None` when there is none yet.
    pub fn open_read_only(dir: &Path) -> Result<Option<State>> {
        let path = dir.join("state.sqlite");
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Some(State { conn }))
    }

    /// The output this state directory is bound to (`None` before its first run).
    pub fn bound_output(&self) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT v FROM meta WHERE k = 'output'", [], |r| r.get(0))
            .optional()?)
    }

    /// Binds this state directory to `identity` (first run only; see `export::run`).
    pub fn bind_output(&self, identity: &str) -> Result<()> {
        self.conn
            .execute("INSERT INTO meta (k, v) VALUES ('output', ?1)", [identity])
            .context("recording the output in the state database")?;
        Ok(())
    }

    /// Batches killed before their commit point.
    pub fn unfinished(&self) -> Result<Vec<Unfinished>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM batch WHERE state = 'writing' ORDER BY id")?;
        let ids: Vec<i64> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        let mut outs = self
            .conn
            .prepare("SELECT location, temp FROM batch_output WHERE batch_id = ?1")?;
        for id in ids {
            let outputs = outs
                .query_map([id], |r| {
                    Ok(PlannedOutput {
                        location: r.get(0)?,
                        temp: PathBuf::from(r.get::<_, String>(1)?),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            out.push(Unfinished { id, outputs });
        }
        Ok(out)
    }

    pub fn mark_rolled_back(&self, id: i64) -> Result<()> {
        self.conn
            .execute("UPDATE batch SET state = 'rolled_back' WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Commits the plan of a batch (state `writing`) before anything is published.
    pub fn plan(&mut self, now: i64, outputs: &[(String, PlannedOutput, usize)]) -> Result<i64> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO batch (started_at, state) VALUES (?1, 'writing')",
            [now],
        )?;
        let id = tx.last_insert_rowid();
        {
            let mut stmt = tx.prepare(
                "INSERT INTO batch_output (batch_id, table_path, location, temp, rows) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (table, o, rows) in outputs {
                stmt.execute(params![
                    id,
                    table,
                    o.location,
                    o.temp.to_string_lossy(),
                    *rows as i64
                ])?;
            }
        }
        tx.commit().context("committing the batch plan")?;
        Ok(id)
    }

    /// The commit point: the batch's outputs are published; its files' keys become exported.
    pub fn commit(&mut self, batch_id: i64, now: i64, keys: &[FileKey], rows: usize) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT OR REPLACE INTO exported (key, batch_id, at) VALUES (?1, ?2, ?3)",
            )?;
            let mut sorted: Vec<&FileKey> = keys.iter().collect();
            sorted.sort_unstable();
            for k in sorted {
                stmt.execute(params![&k[..], batch_id, now])?;
            }
        }
        tx.execute(
            "UPDATE batch SET state = 'committed', files = ?2, rows = ?3 WHERE id = ?1",
            params![batch_id, keys.len() as i64, rows as i64],
        )?;
        tx.commit().context("committing the batch")?;
        Ok(())
    }

    /// A batch with no output (only already-exported or duplicate files): commit keys directly.
    pub fn commit_without_outputs(&mut self, now: i64, keys: &[FileKey]) -> Result<()> {
        let id = self.plan(now, &[])?;
        self.commit(id, now, keys, 0)
    }

    /// Which of `keys` were exported before (same order as `keys`). Asked in sorted chunks of
    /// `key IN (...)`, which keeps the B-tree walk local and the per-statement cost low.
    pub fn exported_mask(&self, keys: &[FileKey]) -> Result<Vec<bool>> {
        const CHUNK: usize = 500;
        let mut sorted: Vec<&FileKey> = keys.iter().collect();
        sorted.sort_unstable();
        let mut found: std::collections::HashSet<FileKey> = std::collections::HashSet::new();
        for chunk in sorted.chunks(CHUNK) {
            let sql = format!(
                "SELECT key FROM exported WHERE key IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut stmt = self.conn.prepare_cached(&sql)?;
            let params = rusqlite::params_from_iter(chunk.iter().map(|k| &k[..]));
            let mut rows = stmt.query(params)?;
            while let Some(row) = rows.next()? {
                let key: Vec<u8> = row.get(0)?;
                if let Ok(k) = FileKey::try_from(key.as_slice()) {
                    found.insert(k);
                }
            }
        }
        Ok(keys.iter().map(|k| found.contains(k)).collect())
    }

    /// Forgets exported keys older than the retention (at most once an hour).
    pub fn prune(&self, now: i64, retention_secs: i64) -> Result<usize> {
        let last: Option<i64> = self
            .conn
            .query_row("SELECT v FROM meta WHERE k = 'last_prune'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok());
        if matches!(last, Some(t) if now - t < 3600) {
            return Ok(0);
        }
        let cutoff = now - retention_secs;
        let n = self
            .conn
            .execute("DELETE FROM exported WHERE at < ?1", [cutoff])?;
        self.conn.execute(
            "DELETE FROM batch_output WHERE batch_id IN (SELECT id FROM batch WHERE started_at < ?1 AND state != 'writing')",
            [cutoff],
        )?;
        self.conn.execute(
            "DELETE FROM batch WHERE started_at < ?1 AND state != 'writing'",
            [cutoff],
        )?;
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (k, v) VALUES ('last_prune', ?1)",
            [now.to_string()],
        )?;
        Ok(n)
    }
}
