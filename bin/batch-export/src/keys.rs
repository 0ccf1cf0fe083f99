//! The exported-keys store inside the state database: the keys of every exported cache file,
//! kept as immutable sorted runs with a Bloom filter each, merged like a log-structured tree.
//!
//! Why runs: a key is a hash, so one big B-tree takes every batch's keys at random places.
//! Once the table outgrows SQLite's page cache each commit dirtied nearly every leaf page, and
//! the WAL written per commit grew with the store (at a million keys about 40 MB per batch of
//! 25,000; BENCHMARKS.md). Here a commit writes one new table holding only its own keys, in key
//! order (pages appended, WAL proportional to the batch). When [`FANOUT`] runs of one level and
//! generation exist they are merged into one run of the next level, in a transaction of its
//! own; every key is rewritten about log_FANOUT(batches) times in all.
//!
//! A lookup asks only the runs whose Bloom filter (10 bits a key, 7 probes: about 1 % false
//! positives) may hold the key, so it stays a handful of B-tree probes per key however many
//! runs there are. The filters are read from the database per lookup (about 1.2 bytes a key of
//! the store), never kept across batches.
//!
//! Generations: every run belongs to the retention period (`--dedupe-retention-days`) its keys
//! were committed in; forgetting old keys drops the runs of a generation whose successor started
//! more than a retention ago: whole tables, no scan. Key tables of older versions
//! (`exported_g<start>`, one random-insert B-tree per generation) are still read (without a
//! filter) and dropped by the same rule; no key is added to them.

use std::collections::HashSet;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::state::FileKey;

/// Runs of one level merged into one of the next.
pub const FANOUT: usize = 4;

/// The level of a run rebuilt from the output's manifests (`--adopt-output`): never merged.
const ADOPTED_LEVEL: i64 = 1_000;

const BLOOM_BITS_PER_KEY: usize = 10;
const BLOOM_PROBES: u64 = 7;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS key_run (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,   -- start (Unix seconds) of the retention period of its keys
    level INTEGER NOT NULL,        -- 0: one batch's keys; n + 1: FANOUT runs of level n merged
    keys INTEGER NOT NULL,
    bloom BLOB NOT NULL            -- little-endian u64 words
);
";

fn run_table(id: i64) -> String {
    format!("exported_r{id}")
}

pub(crate) fn legacy_table(start: i64) -> String {
    format!("exported_g{start}")
}

/// A Bloom filter over 16-byte keys that are already uniform hashes: the probe positions come
/// from the key's two halves (double hashing), no further hashing needed.
struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn with_capacity(keys: usize) -> Bloom {
        let bits = (keys.max(1) * BLOOM_BITS_PER_KEY).div_ceil(64) * 64;
        Bloom {
            words: vec![0; bits / 64],
        }
    }

    fn from_bytes(bytes: &[u8]) -> Bloom {
        Bloom {
            words: bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The bit positions of `key` in a filter of `bits` bits.
    fn positions(bits: usize, key: &[u8]) -> impl Iterator<Item = usize> {
        let bits = bits.max(1) as u64;
        let h1 = u64::from_le_bytes(key[..8].try_into().expect("16-byte key"));
        let h2 = u64::from_le_bytes(key[8..16].try_into().expect("16-byte key")) | 1;
        (0..BLOOM_PROBES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % bits) as usize)
    }

    fn insert(&mut self, key: &[u8]) {
        for p in Self::positions(self.words.len() * 64, key) {
            self.words[p / 64] |= 1 << (p % 64);
        }
    }

    fn may_contain(&self, key: &[u8]) -> bool {
        !self.words.is_empty()
            && Self::positions(self.words.len() * 64, key)
                .all(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
    }
}

/// Adds a run holding `sorted` (16-byte keys, sorted, concatenated) to generation `generation`
/// at `level`, inside the caller's transaction. Returns its id.
fn insert_run(tx: &Transaction<'_>, generation: i64, level: i64, sorted: &[u8]) -> Result<i64> {
    let mut bloom = Bloom::with_capacity(sorted.len() / 16);
    for k in sorted.chunks_exact(16) {
        bloom.insert(k);
    }
    tx.execute(
        "INSERT INTO key_run (generation, level, keys, bloom) VALUES (?1, ?2, ?3, ?4)",
        params![
            generation,
            level,
            (sorted.len() / 16) as i64,
            bloom.to_bytes()
        ],
    )?;
    let id = tx.last_insert_rowid();
    let table = run_table(id);
    tx.execute_batch(&format!(
        "CREATE TABLE {table} (key BLOB PRIMARY KEY) WITHOUT ROWID;"
    ))?;
    let mut stmt = tx.prepare(&format!("INSERT OR IGNORE INTO {table} (key) VALUES (?1)"))?;
    for k in sorted.chunks_exact(16) {
        stmt.execute([k])?;
    }
    Ok(id)
}

/// Adds one batch's keys (sorted, concatenated) as a new level-0 run, inside the batch's
/// commit transaction.
pub fn add_batch(tx: &Transaction<'_>, generation: i64, sorted: &[u8]) -> Result<()> {
    if sorted.is_empty() {
        return Ok(());
    }
    insert_run(tx, generation, 0, sorted).map(|_| ())
}

/// Replaces the whole store with one run of `keys` (`--adopt-output`), inside the caller's
/// transaction.
pub fn replace_all(tx: &Transaction<'_>, generation: i64, mut keys: Vec<FileKey>) -> Result<()> {
    drop_all(tx)?;
    keys.sort_unstable();
    keys.dedup();
    let sorted: Vec<u8> = keys.iter().flatten().copied().collect();
    insert_run(tx, generation, ADOPTED_LEVEL, &sorted).map(|_| ())
}

fn drop_all(conn: &Connection) -> Result<()> {
    for (id, _) in runs(conn)? {
        conn.execute_batch(&format!("DROP TABLE {}", run_table(id)))?;
    }
    conn.execute("DELETE FROM key_run", [])?;
    for start in legacy_generations(conn)? {
        conn.execute_batch(&format!("DROP TABLE {}", legacy_table(start)))?;
    }
    Ok(())
}

/// Every run: (id, generation).
fn runs(conn: &Connection) -> Result<Vec<(i64, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT id, generation FROM key_run ORDER BY id")?;
    let runs = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(runs)
}

/// Whether the database has a table of this name.
pub(crate) fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )? > 0)
}

/// Starts of the key tables an older version wrote (one per generation).
fn legacy_generations(conn: &Connection) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'exported_g%'",
    )?;
    let starts = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(|n| n.ok()?.strip_prefix("exported_g")?.parse().ok())
        .collect();
    Ok(starts)
}

/// The generations that hold keys, oldest first.
pub fn generations(conn: &Connection) -> Result<Vec<i64>> {
    let mut gens: Vec<i64> = runs(conn)?.into_iter().map(|(_, g)| g).collect();
    gens.extend(legacy_generations(conn)?);
    gens.sort_unstable();
    gens.dedup();
    Ok(gens)
}

/// The generation new keys go to: the newest, or a new one (starting `now`) once the newest is
/// a retention old.
pub fn current_generation(conn: &Connection, now: i64, retention_secs: i64) -> Result<i64> {
    Ok(match generations(conn)?.last() {
        Some(&start) if now - start < retention_secs.max(1) => start,
        _ => now,
    })
}

/// Which of `keys` are in the store (same order as `keys`). Each run is asked only for the keys
/// its filter may hold, in sorted chunks of `key IN (...)` (a local B-tree walk per chunk).
pub fn contains_mask(conn: &Connection, keys: &[FileKey]) -> Result<Vec<bool>> {
    let mut sorted: Vec<&FileKey> = keys.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut found: HashSet<FileKey> = HashSet::new();
    let mut tables: Vec<(String, Option<Bloom>)> = legacy_generations(conn)?
        .into_iter()
        .map(|g| (legacy_table(g), None))
        .collect();
    // A dry run opens an older state read-only, without upgrading it: version 1 kept every key
    // in `exported`, version 2 had no `key_run`.
    if table_exists(conn, "exported")? {
        tables.push(("exported".to_owned(), None));
    }
    if table_exists(conn, "key_run")? {
        let mut stmt = conn.prepare_cached("SELECT id, bloom FROM key_run ORDER BY id DESC")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let bloom: Vec<u8> = r.get(1)?;
            tables.push((run_table(r.get(0)?), Some(Bloom::from_bytes(&bloom))));
        }
    }
    for (table, bloom) in &tables {
        let candidates: Vec<&FileKey> = sorted
            .iter()
            .copied()
            .filter(|k| !found.contains(*k) && bloom.as_ref().is_none_or(|b| b.may_contain(*k)))
            .collect();
        probe(conn, table, &candidates, &mut found)?;
    }
    Ok(keys.iter().map(|k| found.contains(k)).collect())
}

fn probe(
    conn: &Connection,
    table: &str,
    sorted: &[&FileKey],
    found: &mut HashSet<FileKey>,
) -> Result<()> {
    const CHUNK: usize = 500;
    for chunk in sorted.chunks(CHUNK) {
        let sql = format!(
            "SELECT key FROM {table} WHERE key IN ({})",
            vec!["?"; chunk.len()].join(",")
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let params = rusqlite::params_from_iter(chunk.iter().map(|k| &k[..]));
        let mut rows = stmt.query(params)?;
        while let Some(row) = rows.next()? {
            let key: Vec<u8> = row.get(0)?;
            if let Ok(k) = FileKey::try_from(key.as_slice()) {
                found.insert(k);
            }
        }
    }
    Ok(())
}

/// What [`compact`] did: merges made and keys written by them (a merge rewrites every key of
/// its inputs, so a top-level merge writes most of the store once; logged for that reason).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    pub merges: usize,
    pub keys: u64,
}

/// Merges, while any generation has [`FANOUT`] runs of one level, the oldest of them into one
/// run of the next level, one transaction per merge (a crash leaves either the runs or their
/// merge).
pub fn compact(conn: &Connection) -> Result<Merged> {
    let mut merged = Merged::default();
    loop {
        let group: Option<(i64, i64)> = conn
            .query_row(
                "SELECT generation, level FROM key_run WHERE level < ?1
                 GROUP BY generation, level HAVING count(*) >= ?2 ORDER BY level LIMIT 1",
                params![ADOPTED_LEVEL, FANOUT as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((generation, level)) = group else {
            return Ok(merged);
        };
        let keys = merge(conn, generation, level).with_context(|| {
            format!("merging exported-key runs of level {level} (generation {generation})")
        })?;
        merged.merges += 1;
        merged.keys += keys;
    }
}

/// One merge; returns the number of keys in the merged run.
fn merge(conn: &Connection, generation: i64, level: i64) -> Result<u64> {
    {
        let tx = conn.unchecked_transaction()?;
        let inputs: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM key_run WHERE generation = ?1 AND level = ?2 ORDER BY id LIMIT ?3",
            )?;
            let ids = stmt
                .query_map(params![generation, level, FANOUT as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            ids
        };
        let keys: i64 = tx.query_row(
            &format!(
                "SELECT coalesce(sum(keys), 0) FROM key_run WHERE id IN ({})",
                inputs
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            [],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO key_run (generation, level, keys, bloom) VALUES (?1, ?2, ?3, x'')",
            params![generation, level + 1, keys],
        )?;
        let id = tx.last_insert_rowid();
        let table = run_table(id);
        let union = inputs
            .iter()
            .map(|i| format!("SELECT key FROM {}", run_table(*i)))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        tx.execute_batch(&format!(
            "CREATE TABLE {table} (key BLOB PRIMARY KEY) WITHOUT ROWID;
             INSERT OR IGNORE INTO {table} (key) SELECT key FROM ({union}) ORDER BY key;"
        ))?;
        let mut bloom = Bloom::with_capacity(keys as usize);
        let mut n = 0i64;
        {
            let mut stmt = tx.prepare(&format!("SELECT key FROM {table}"))?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let key: Vec<u8> = r.get(0)?;
                bloom.insert(&key);
                n += 1;
            }
        }
        tx.execute(
            "UPDATE key_run SET bloom = ?1, keys = ?2 WHERE id = ?3",
            params![bloom.to_bytes(), n, id],
        )?;
        for i in &inputs {
            tx.execute_batch(&format!("DROP TABLE {}", run_table(*i)))?;
            tx.execute("DELETE FROM key_run WHERE id = ?1", [i])?;
        }
        tx.commit()?;
        Ok(n as u64)
    }
}

/// Forgets keys older than the retention: drops each generation whose successor started more
/// than `retention_secs` ago (every key in it is at least that old). Returns the number of
/// generations dropped.
pub fn prune(conn: &Connection, now: i64, retention_secs: i64) -> Result<usize> {
    let gens = generations(conn)?;
    let legacy: HashSet<i64> = legacy_generations(conn)?.into_iter().collect();
    let runs = runs(conn)?;
    let mut dropped = 0;
    for pair in gens.windows(2) {
        let (old, successor) = (pair[0], pair[1]);
        if now - successor < retention_secs {
            continue;
        }
        let tx = conn.unchecked_transaction()?;
        for (id, _) in runs.iter().filter(|(_, g)| *g == old) {
            tx.execute_batch(&format!("DROP TABLE {}", run_table(*id)))?;
            tx.execute("DELETE FROM key_run WHERE id = ?1", [id])?;
        }
        if legacy.contains(&old) {
            tx.execute_batch(&format!("DROP TABLE {}", legacy_table(old)))?;
        }
        tx.commit()?;
        dropped += 1;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> FileKey {
        // Uniform like the real keys (SHA-256 prefixes).
        let d = <sha2::Sha256 as sha2::Digest>::digest(i.to_le_bytes());
        d[..16].try_into().unwrap()
    }

    fn store() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn add(conn: &mut Connection, generation: i64, keys: impl Iterator<Item = u64>) {
        let mut ks: Vec<FileKey> = keys.map(key).collect();
        ks.sort_unstable();
        let sorted: Vec<u8> = ks.iter().flatten().copied().collect();
        let tx = conn.transaction().unwrap();
        add_batch(&tx, generation, &sorted).unwrap();
        tx.commit().unwrap();
    }

    /// The level of every run, lowest first.
    fn levels(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT level FROM key_run ORDER BY level")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn run_count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM key_run", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_bloom_filter_never_misses_and_rarely_lies() {
        let mut b = Bloom::with_capacity(10_000);
        for i in 0..10_000 {
            b.insert(&key(i));
        }
        assert!((0..10_000).all(|i| b.may_contain(&key(i))));
        let false_positives = (10_000..110_000)
            .filter(|i| b.may_contain(&key(*i)))
            .count();
        // 10 bits a key and 7 probes: about 1 %.
        assert!(
            false_positives < 2_000,
            "{false_positives} false positives in 100,000"
        );
        let round_trip = Bloom::from_bytes(&b.to_bytes());
        assert!((0..10_000).all(|i| round_trip.may_contain(&key(i))));
    }

    #[test]
    fn runs_merge_level_by_level_and_keep_every_key() {
        let mut conn = store();
        let batches = 21u64;
        for b in 0..batches {
            add(&mut conn, 100, b * 50..(b + 1) * 50);
            compact(&conn).unwrap();
        }
        // 21 batches in base 4 is 111: one run each of levels 2, 1 and 0.
        assert_eq!(levels(&conn), [0, 1, 2]);
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'exported_r%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 3, "merged runs' tables are dropped");
        let asked: Vec<FileKey> = (0..batches * 50 + 500).map(key).collect();
        let mask = contains_mask(&conn, &asked).unwrap();
        for (i, m) in mask.iter().enumerate() {
            assert_eq!(*m, (i as u64) < batches * 50, "key {i}");
        }
    }

    #[test]
    fn generations_merge_apart_and_are_dropped_whole() {
        let mut conn = store();
        let day = 86_400;
        for b in 0..3 {
            add(&mut conn, 1_000_000, b * 10..(b + 1) * 10);
        }
        add(&mut conn, 1_000_000 + day, 30..40);
        // Four runs, but of two generations: nothing to merge.
        assert_eq!(compact(&conn).unwrap().merges, 0);
        assert_eq!(run_count(&conn), 4);
        assert_eq!(
            current_generation(&conn, 1_000_000 + day + 10, day).unwrap(),
            1_000_000 + day
        );
        assert_eq!(
            current_generation(&conn, 1_000_000 + 2 * day, day).unwrap(),
            1_000_000 + 2 * day
        );
        assert_eq!(prune(&conn, 1_000_000 + day + day / 2, day).unwrap(), 0);
        assert_eq!(prune(&conn, 1_000_000 + 2 * day, day).unwrap(), 1);
        assert_eq!(run_count(&conn), 1);
        let mask = contains_mask(&conn, &[key(5), key(35)]).unwrap();
        assert_eq!(mask, [false, true]);
    }

    #[test]
    fn a_legacy_key_table_is_read_and_dropped_by_the_same_rule() {
        let mut conn = store();
        conn.execute_batch(
            "CREATE TABLE exported_g100 (key BLOB PRIMARY KEY, batch_id INTEGER NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO exported_g100 VALUES (?1, 1, 100)",
            [&key(1)[..]],
        )
        .unwrap();
        add(&mut conn, 200, 2..3);
        assert_eq!(generations(&conn).unwrap(), [100, 200]);
        assert_eq!(
            contains_mask(&conn, &[key(1), key(2), key(3)]).unwrap(),
            [true, true, false]
        );
        assert_eq!(prune(&conn, 300, 100).unwrap(), 1);
        assert_eq!(
            contains_mask(&conn, &[key(1), key(2)]).unwrap(),
            [false, true]
        );
    }

    #[test]
    fn adoption_replaces_everything_with_one_run_that_is_never_merged() {
        let mut conn = store();
        for b in 0..3 {
            add(&mut conn, 100, b * 10..(b + 1) * 10);
        }
        let tx = conn.transaction().unwrap();
        replace_all(&tx, 50, (100..110).rev().map(key).collect()).unwrap();
        tx.commit().unwrap();
        assert_eq!(run_count(&conn), 1, "the old runs are gone");
        // Eight new runs of the adopted run's generation: two merges of four, none with the
        // adopted run (which would rewrite every adopted key at the next merge).
        for b in 0..8 {
            add(&mut conn, 50, 200 + b..201 + b);
        }
        let merged = compact(&conn).unwrap();
        assert_eq!(merged, Merged { merges: 2, keys: 8 });
        assert_eq!(levels(&conn), [1, 1, ADOPTED_LEVEL]);
        let mask = contains_mask(&conn, &[key(5), key(100), key(109), key(201), key(207)]).unwrap();
        assert_eq!(mask, [false, true, true, true, true]);
    }
}
