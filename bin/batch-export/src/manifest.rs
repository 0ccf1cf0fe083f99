//! The export's memory in the output: one manifest per committed batch
//! (`<output>/_batch_export/batches/<id>.json` with its keys in `<id>.keys`) and the owner
//! marker (`<output>/_batch_export/owner.json`). At start a run compares its state directory
//! with them and refuses (exit 2) a state that is behind, ahead of, or foreign to its output,
//! instead of silently exporting rows twice; `--adopt-output` rebuilds the state from them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::sink::Sink;
use crate::state::{keys_digest, Adopted, Batch, FileKey, State};
use crate::UsageError;

pub const OWNER: &str = "owner.json";
pub const RESUME: &str = "resume.json";
pub const BATCHES: &str = "batches";
pub const FORMAT: &str = "batch-export-manifest/1";

/// `<id>.json`, zero-padded so that names sort as ids do (S3 lists in name order).
pub fn manifest_name(id: i64) -> String {
    format!("{id:012}.json")
}

pub fn keys_name(id: i64) -> String {
    format!("{id:012}.keys")
}

fn id_of(name: &str) -> Option<i64> {
    let stem = name.strip_suffix(".json")?;
    (stem.len() == 12 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    pub table: String,
    /// Relative to the output root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestKeys {
    /// The object beside the manifest holding the batch's sorted 16-byte file keys.
    pub object: String,
    pub count: u64,
    /// SHA-256 (hex) of that object.
    pub sha256: String,
    /// When the keys were removed (Unix seconds): once a batch is older than the key retention
    /// no run reads its keys again ([`adopt`] reads those of batches within it), so the object
    /// is emptied ([`expire_keys`]) and `count` and `sha256` describe the empty object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<i64>,
}

/// What one committed batch put in the output.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub batch_id: i64,
    pub previous_batch_id: Option<i64>,
    /// Unix seconds of the commit point.
    pub committed_at: i64,
    /// The exporter (state directory) that committed it.
    pub owner: String,
    /// Cache files the batch exported (their keys), duplicates within the run included.
    pub files_exported: u64,
    pub rows: u64,
    pub files: Vec<ManifestFile>,
    pub keys: ManifestKeys,
    /// Consent purges (`purges/<id>.json`) that rewrote files of this batch: their `rows` and
    /// `bytes` above, and the batch's `rows`, are after the purge; its keys object is emptied
    /// (`keys.expired_at`) unless the batch must keep its keys ([`keys_kept_from`]) for now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purges: Vec<String>,
}

/// The owner marker: which exporter (state directory) writes this output.
#[derive(Debug, Serialize, Deserialize)]
pub struct Owner {
    pub owner: String,
    pub host: String,
    pub state_dir: String,
    pub since: i64,
}

impl Manifest {
    pub fn of(batch: &Batch, owner: &str, sink: &Sink) -> Manifest {
        Manifest {
            format: FORMAT.to_owned(),
            batch_id: batch.id,
            previous_batch_id: batch.previous,
            committed_at: batch.committed_at,
            owner: owner.to_owned(),
            files_exported: batch.files,
            rows: batch.rows,
            files: batch
                .outputs
                .iter()
                .map(|o| ManifestFile {
                    table: o.table_path.clone(),
                    path: sink.relative(&o.location),
                    rows: o.rows,
                    bytes: o.bytes,
                })
                .collect(),
            keys: ManifestKeys {
                object: keys_name(batch.id),
                count: batch.files,
                sha256: batch.keys_digest.clone(),
                expired_at: None,
            },
            purges: Vec::new(),
        }
    }
}

/// Writes the batch's keys object, then its manifest (so a manifest never names a missing
/// keys object).
pub fn write(sink: &Sink, batch: &Batch, owner: &str, sorted_keys: &[u8]) -> Result<()> {
    sink.put_meta(&format!("{BATCHES}/{}", keys_name(batch.id)), sorted_keys)
        .with_context(|| format!("writing the keys of batch {}", batch.id))?;
    let m = Manifest::of(batch, owner, sink);
    let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
    sink.put_meta(&format!("{BATCHES}/{}", manifest_name(batch.id)), &json)
        .with_context(|| format!("writing the manifest of batch {}", batch.id))
}

/// The state's `meta` key: the newest batch whose keys object [`expire_keys`] has emptied.
const KEYS_EXPIRED_THROUGH: &str = "keys_expired_through";

/// Empties the keys objects of published batches older than the retention, oldest first, and
/// of batches a consent purge rewrote once no lost-machine replay needs them
/// ([`keys_kept_from`]). A file key, though not reversible, lets whoever holds the very file (a
/// public post, say) tell that it was exported: so the output keeps a key no longer than the
/// state does, and a withdrawn participant's keys leave the output with their purge (or, for a
/// batch still kept, at the first run after it stops being kept). The newest batch keeps its
/// keys (the start-up check compares them with the state). Returns how many batches were
/// emptied.
pub fn expire_keys(sink: &Sink, state: &State, now: i64, retention_secs: i64) -> Result<u64> {
    let through: i64 = state
        .meta(KEYS_EXPIRED_THROUGH)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let ids: Vec<i64> = state
        .conn()
        .prepare(
            "SELECT id FROM batch WHERE state = 'published' AND id > ?1 AND started_at < ?2 \
             AND id < (SELECT max(id) FROM batch WHERE state = 'published') ORDER BY id \
             LIMIT 1000",
        )?
        .query_map(rusqlite::params![through, now - retention_secs], |r| {
            r.get(0)
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut emptied = 0;
    for id in ids {
        emptied += u64::from(empty_keys(sink, id, now)?);
        state.set_meta(KEYS_EXPIRED_THROUGH, &id.to_string())?;
    }
    // Most runs owe nothing: the resume point (a GET on S3) is read only when something is owed.
    let any_owed = state
        .conn()
        .prepare("SELECT 1 FROM keys_owed LIMIT 1")?
        .exists([])?;
    if !any_owed {
        return Ok(emptied);
    }
    let owed: Vec<i64> = state
        .conn()
        .prepare("SELECT batch_id FROM keys_owed WHERE batch_id < ?1 ORDER BY batch_id LIMIT 1000")?
        .query_map([keys_kept_from(sink, state)?], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in owed {
        emptied += u64::from(empty_keys(sink, id, now)?);
        state
            .conn()
            .execute("DELETE FROM keys_owed WHERE batch_id = ?1", [id])?;
    }
    Ok(emptied)
}

/// Batches a consent purge rewrote whose keys object it could not empty yet (the newest batch,
/// or one a lost-machine replay may still need): [`expire_keys`] empties them once it may.
/// Created with the state (`State::open`).
pub(crate) const KEYS_OWED_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS keys_owed (batch_id INTEGER PRIMARY KEY);";

/// The first batch whose keys must stay whatever a purge did: the newest batch (the start-up
/// check reads its keys), and every batch from the resume point's `keys_kept_from` on (the
/// runs that recorded it and the one before), because a replacement writer started there
/// (deploy/README.md, "A lost machine") captures again the files of events after the cursor,
/// which those batches may hold, and an adopted state recognises them only by these keys. A
/// resume point from a version that did not record the bound, or one that cannot be read, keeps
/// every batch until a run records a new one.
pub(crate) fn keys_kept_from(sink: &Sink, state: &State) -> Result<i64> {
    let newest = state.last_published()?.map_or(i64::MAX, |b| b.id);
    let resume = match read_resume(sink) {
        Ok(None) => i64::MAX,
        Ok(Some(r)) => r.keys_kept_from.or(r.first_batch_id).unwrap_or(0),
        // Nothing is emptied on a guess: the next run writes a readable one.
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "the resume point cannot be read: every batch keeps its keys for now"
            );
            0
        }
    };
    Ok(newest.min(resume))
}

/// [`Resume::keys_kept_from`] for a run that began at batch `first_batch_id` and read the
/// writer cursor `cursor`, given the resume point before it: the batches of the previous
/// recording run stay kept too (a writer that committed nothing between that run's walk and
/// this run's start may have had files after `cursor` in them), and while the cursor does not
/// move the older bound holds.
pub fn next_keys_kept_from(previous: Option<&Resume>, cursor: i64, first_batch_id: i64) -> i64 {
    let bound = match previous {
        None => first_batch_id,
        Some(p) if p.writer_cursor == cursor => p.keys_kept_from.or(p.first_batch_id).unwrap_or(0),
        Some(p) => p.first_batch_id.unwrap_or(0),
    };
    bound.min(first_batch_id)
}

/// Empties the keys object of batch `id`: the manifest first (`keys.expired_at`, `count` 0 and
/// the empty object's digest), then the object, so a crash in between is finished by the next
/// call. True when the manifest changed. Batches published before manifests existed have none
/// (and no keys object).
pub(crate) fn empty_keys(sink: &Sink, id: i64, now: i64) -> Result<bool> {
    let Some(mut m) = read_manifest(sink, id)? else {
        return Ok(false);
    };
    let changed = m.keys.expired_at.is_none();
    if changed {
        m.keys.count = 0;
        m.keys.sha256 = keys_digest(&[]);
        m.keys.expired_at = Some(now);
        let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
        sink.put_meta(&format!("{BATCHES}/{}", manifest_name(id)), &json)
            .with_context(|| format!("updating the manifest of batch {id}"))?;
    }
    // Named by the id, not by the manifest's text: an edited manifest cannot point the write
    // elsewhere.
    sink.put_meta(&format!("{BATCHES}/{}", keys_name(id)), &[])
        .with_context(|| format!("emptying the keys object of batch {id}"))?;
    Ok(changed)
}

pub(crate) fn read_manifest(sink: &Sink, id: i64) -> Result<Option<Manifest>> {
    let Some(bytes) = sink.get_meta(&format!("{BATCHES}/{}", manifest_name(id)))? else {
        return Ok(None);
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("the manifest of batch {id} is not valid"))?;
    Ok(Some(m))
}

/// Manifest ids in the output after `after` (all of them for `None`), ascending.
pub(crate) fn manifest_ids(sink: &Sink, after: Option<i64>) -> Result<Vec<i64>> {
    let start = after.map(manifest_name);
    Ok(sink
        .list_meta(BATCHES, start.as_deref())?
        .iter()
        .filter_map(|n| id_of(n))
        .collect())
}

fn refuse(msg: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg))
}

fn owner_json(owner: &str, state_dir: &std::path::Path) -> Vec<u8> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    serde_json::to_vec_pretty(&Owner {
        owner: owner.to_owned(),
        host,
        state_dir: canonical(state_dir),
        since: crate::now_secs(),
    })
    .expect("the owner marker serializes")
}

/// A state directory as the owner marker records it (canonical, so two spellings of one
/// directory are one exporter).
fn canonical(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_owned())
        .display()
        .to_string()
}

fn read_owner(sink: &Sink) -> Result<Option<Owner>> {
    match sink.get_meta(OWNER)? {
        None => Ok(None),
        Some(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "the owner marker {}/_batch_export/{OWNER} is not valid",
                sink.describe()
            )
        })?)),
    }
}

const ADOPT_HINT: &str = "if this state directory is meant to continue the export into this \
output (it was restored from a backup, lost, or moved to a new machine), run once with \
--adopt-output: it rebuilds the exported-key memory from the output's manifests, takes the owner \
marker over, and exports what is still in the cache exactly once";

/// Checks the state directory against the output's owner marker and manifests before anything
/// is published. Refuses (exit 2) a second exporter, and a state directory that is behind or
/// ahead of its output.
pub fn reconcile(sink: &Sink, state: &State, state_dir: &Path) -> Result<()> {
    let me = state.ensure_owner_id()?;
    let out = sink.describe();
    let marker = read_owner(sink)?;
    // A marker of another state directory: a second exporter. A marker naming this state
    // directory's path with another id: this directory was recreated (lost, restored from a
    // backup); the manifest checks below say which.
    let foreign = marker.as_ref().filter(|o| o.owner != me);
    if let Some(o) = foreign.filter(|o| o.state_dir != canonical(state_dir)) {
        return Err(refuse(format!(
            "the output {out} is written by another exporter (owner marker \
             {out}/_batch_export/{OWNER}: state directory {} on host {:?}, since {}), not by \
             this state directory ({}). Two exporters on one output would export rows \
             twice. Stop the other exporter; {ADOPT_HINT}",
            o.state_dir,
            o.host,
            o.since,
            state_dir.display()
        )));
    }
    let last = state.last_published()?;
    let unpublished: Vec<i64> = state.unpublished()?.iter().map(|b| b.id).collect();
    let newer = manifest_ids(sink, last.as_ref().map(|b| b.id))?;
    let unknown: Vec<i64> = newer
        .iter()
        .copied()
        .filter(|id| !unpublished.contains(id))
        .collect();
    if let Some(&newest) = unknown.last() {
        let had = match &last {
            Some(b) => format!("its last published batch is {}", b.id),
            None => "it has published nothing".to_owned(),
        };
        return Err(refuse(format!(
            "the state directory {} is behind the output {out}: the output's newest manifest is \
             batch {newest}, but {had} (a state directory restored from a backup, a new or lost \
             one, or one that belongs to another output). Exporting now would export again rows \
             that are already in the output; {ADOPT_HINT}",
            state_dir.display()
        )));
    }
    if let Some(b) = &last {
        if b.id >= state.manifests_from()? {
            match read_manifest(sink, b.id)? {
                None => {
                    return Err(refuse(format!(
                        "the state directory {} is ahead of the output {out}: it published batch \
                         {} but the output has no manifest for it (the output was restored from \
                         an older copy, emptied, or is another output with the same name). Rows \
                         of that batch and earlier ones may be missing there, and their cache \
                         files are gone. Restore the output, or export to a new output with a \
                         new --state-dir; if the output is known to be right, {ADOPT_HINT}",
                        state_dir.display(),
                        b.id
                    )))
                }
                Some(m) if m.keys.sha256 != b.keys_digest => {
                    return Err(refuse(format!(
                        "the output {out}'s manifest of batch {} records other files than this \
                         state directory {} committed as that batch: they are different \
                         exports. {ADOPT_HINT}",
                        b.id,
                        state_dir.display()
                    )))
                }
                Some(_) => {}
            }
        }
    }
    if foreign.is_some() {
        return Err(refuse(format!(
            "the state directory {} was recreated since it claimed the output {out} (the owner \
             marker names another exporter id for the same path): its memory of what was \
             exported is not the one the output was written with. {ADOPT_HINT}",
            state_dir.display()
        )));
    }
    // Only now is this state directory known to be the output's: claim it if unclaimed. A
    // race with another exporter is lost cleanly (the conditional create fails).
    if marker.is_none() && !sink.create_meta(OWNER, &owner_json(&me, state_dir))? {
        match read_owner(sink)? {
            Some(o) if o.owner == me => {}
            _ => {
                return Err(refuse(format!(
                    "another exporter claimed the output {out} at the same time; {ADOPT_HINT}"
                )))
            }
        }
    }
    Ok(())
}

/// `--adopt-output`: rebuilds the journal and the exported keys from the output's manifests
/// (keys of batches within the retention), then takes the owner marker over. Returns the number
/// of batches adopted.
pub fn adopt(
    sink: &Sink,
    state: &mut State,
    state_dir: &std::path::Path,
    retention_secs: i64,
) -> Result<usize> {
    let me = state.ensure_owner_id()?;
    let now = crate::now_secs();
    let mut batches = Vec::new();
    let mut owed = Vec::new();
    let mut previous: Option<i64> = None;
    for id in manifest_ids(sink, None)? {
        let m = read_manifest(sink, id)?
            .with_context(|| format!("the manifest of batch {id} disappeared while adopting"))?;
        if m.format != FORMAT || m.batch_id != id {
            bail!("the manifest of batch {id} is not a {FORMAT} manifest of that batch");
        }
        if m.previous_batch_id != previous && previous.is_some() {
            tracing::warn!(
                batch = id,
                previous = ?m.previous_batch_id,
                expected = ?previous,
                "manifest chain has a gap (manifests were removed from the output?)"
            );
        }
        previous = Some(id);
        // A batch a purge rewrote whose keys were kept then: still owed (`keys_owed`).
        if !m.purges.is_empty() && m.keys.expired_at.is_none() {
            owed.push(id);
        }
        // An emptied keys object (or one a killed run had not emptied yet after its manifest
        // said so) holds nothing to remember.
        let keys = if now - m.committed_at <= retention_secs && m.keys.expired_at.is_none() {
            let bytes = sink
                .get_meta(&format!("{BATCHES}/{}", m.keys.object))?
                .with_context(|| format!("the keys object of batch {id} is missing"))?;
            if keys_digest(&bytes) != m.keys.sha256 || bytes.len() as u64 != m.keys.count * 16 {
                bail!("the keys object of batch {id} does not match its manifest (sha256 or size)");
            }
            Some(
                bytes
                    .chunks_exact(16)
                    .map(|c| FileKey::try_from(c).expect("16 bytes"))
                    .collect(),
            )
        } else {
            None
        };
        batches.push(Adopted {
            id,
            committed_at: m.committed_at,
            previous: m.previous_batch_id,
            files: m.files_exported,
            rows: m.rows,
            keys_digest: m.keys.sha256,
            keys,
        });
    }
    state.adopt(&batches, retention_secs)?;
    // The adopted journal starts over: which batches' keys objects are emptied is read from
    // the manifests again (`expire_keys` skips those already marked).
    state
        .conn()
        .execute("DELETE FROM meta WHERE k = ?1", [KEYS_EXPIRED_THROUGH])?;
    for id in owed {
        state.conn().execute(
            "INSERT OR IGNORE INTO keys_owed (batch_id) VALUES (?1)",
            [id],
        )?;
    }
    sink.put_meta(OWNER, &owner_json(&me, state_dir))
        .context("taking the owner marker over")?;
    tracing::warn!(
        batches = batches.len(),
        output = %sink.describe(),
        "adopted the output: the exported-key memory was rebuilt from its manifests"
    );
    Ok(batches.len())
}

/// Where a replacement writer may resume: every file of events up to `writer_cursor` was in
/// the cache when a run started, and that run ended with all of them in the output.
#[derive(Debug, Serialize, Deserialize)]
pub struct Resume {
    pub writer_cursor: i64,
    /// The relay the cursor belongs to (the writer's stored upstream), if it recorded one.
    pub upstream: Option<String>,
    /// The newest batch when the run ended.
    pub last_batch_id: Option<i64>,
    /// The first batch this run could have published (the newest before it, plus one): this
    /// batch and later ones may hold files of events after the cursor, so their keys stay
    /// ([`keys_kept_from`]). Absent in resume points of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_batch_id: Option<i64>,
    /// The first batch whose keys a purge must leave (and an export run not empty) while this
    /// is the resume point: [`next_keys_kept_from`]. Absent in older resume points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_kept_from: Option<i64>,
    /// Unix seconds.
    pub at: i64,
}

/// The writer's committed cursor and upstream, read from its state database (read only).
pub fn read_writer_cursor(path: &Path) -> Result<(i64, Option<String>)> {
    use rusqlite::{OpenFlags, OptionalExtension};
    let conn = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening the writer state {}", path.display()))?;
    let get = |k: &str| -> Result<Option<String>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
            .optional()
            .with_context(|| format!("reading {k} from {}", path.display()))
    };
    let cursor = get("cursor")?
        .with_context(|| format!("{} has no committed cursor yet", path.display()))?
        .parse::<i64>()
        .context("the writer's stored cursor is not a number")?;
    Ok((cursor, get("upstream")?))
}

/// Records the resume point in the output (overwrites the previous one; it only moves forward,
/// since a writer cursor only grows between overrides).
pub fn write_resume(sink: &Sink, resume: &Resume) -> Result<()> {
    sink.put_meta(
        RESUME,
        &serde_json::to_vec_pretty(resume).expect("the resume point serializes"),
    )
    .context("writing the resume point")
}

/// The output's resume point, if a run with `--writer-state` recorded one.
pub fn read_resume(sink: &Sink) -> Result<Option<Resume>> {
    match sink.get_meta(RESUME)? {
        None => Ok(None),
        Some(b) => Ok(Some(
            serde_json::from_slice(&b).context("the resume point is not valid")?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_bound_keeps_the_previous_recording_run_and_holds_while_the_cursor_stands() {
        let point = |cursor, first, kept| Resume {
            writer_cursor: cursor,
            upstream: None,
            last_batch_id: None,
            first_batch_id: first,
            keys_kept_from: kept,
            at: 0,
        };
        // No earlier point: this run's batches.
        assert_eq!(next_keys_kept_from(None, 100, 7), 7);
        // The cursor moved: the previous recording run's batches stay kept too.
        assert_eq!(
            next_keys_kept_from(Some(&point(50, Some(4), Some(2))), 100, 7),
            4
        );
        // It did not: the older bound holds.
        assert_eq!(
            next_keys_kept_from(Some(&point(100, Some(4), Some(2))), 100, 7),
            2
        );
        // An older version's point, without the bound: every batch kept for one more run.
        assert_eq!(next_keys_kept_from(Some(&point(50, None, None)), 100, 7), 0);
        // Never past this run's own first batch.
        assert_eq!(
            next_keys_kept_from(Some(&point(50, Some(9), Some(9))), 100, 7),
            7
        );
    }

    #[test]
    fn manifest_names_sort_as_ids() {
        assert_eq!(manifest_name(42), "000000000042.json");
        assert!(manifest_name(9) < manifest_name(10));
        assert_eq!(id_of("000000000042.json"), Some(42));
        assert_eq!(id_of("000000000042.keys"), None);
        assert_eq!(id_of("42.json"), None);
    }
}
