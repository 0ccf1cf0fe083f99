//! The repair side of the state store: each tracked repo's chain state (`rev`, `data`), the
//! records held per tracked repo (what a resync diffs against), and the durable backfill/resync
//! queue. Changes are pending until [`StateStore::commit`], like every other index update, so
//! a repair's files are durable before the chain state and queue entry that follow from them.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{Context, Result};
use ipld_core::cid::Cid;
use rusqlite::{params, OptionalExtension, Transaction};
use sync_core::chain::ChainState;
use sync_core::ids::{Did, Nsid, RecordKey, Tid};
use sync_core::resync::HeldRecord;

use super::StateStore;

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a queued repo needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WorkKind {
    /// Its chain broke (or its commits could not be verified): fetch and diff.
    Resync,
    /// A study user seen for the first time: fetch, index, and (with `--backfill-since`) write
    /// recent records. Includes everything a resync does, so it wins when both are asked for.
    Backfill,
}

impl WorkKind {
    pub fn label(self) -> &'static str {
        match self {
            WorkKind::Resync => "resync",
            WorkKind::Backfill => "backfill",
        }
    }

    fn parse(s: &str) -> Option<WorkKind> {
        match s {
            "resync" => Some(WorkKind::Resync),
            "backfill" => Some(WorkKind::Backfill),
            _ => None,
        }
    }
}

/// One queued repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItem {
    pub kind: WorkKind,
    /// Why it was queued (a stable label: `since_mismatch`, `bad_signature`, `first_seen`...).
    pub reason: String,
    pub attempts: u32,
    /// Not to be tried before this Unix time (backoff, a PDS's rate-limit reset).
    pub not_before: i64,
    /// Failed in a way retrying cannot fix (e.g. larger than the repo limit): kept, counted and
    /// shown, not retried until the next start.
    pub failed: bool,
    pub last_error: Option<String>,
    /// Finished; dropped from the queue at the next commit.
    pub(super) done: bool,
    /// The repo is not tracked now: kept (fetched if it is tracked again), not counted in the
    /// queue depth. In memory only: a start finds out again when the entry comes due.
    pub parked: bool,
}

/// A held-record change waiting for the next commit.
#[derive(Debug, Clone)]
pub(super) enum HeldChange {
    /// Held with this CID (`None`: deleted while a repair was pending), learnt at this rev.
    Put {
        cid: Option<String>,
        rev: String,
    },
    Remove,
}

/// A queue change waiting for the next commit.
#[derive(Debug, Clone)]
pub(super) enum WorkChange {
    Upsert(WorkItem),
    Remove,
}

fn parse_chain(rev: &str, data: Option<&str>) -> Option<ChainState> {
    Some(ChainState {
        rev: Tid::parse(rev).ok()?,
        data: Cid::from_str(data?).ok()?,
    })
}

impl StateStore {
    pub(super) fn load_work(&mut self) -> Result<()> {
        let mut stmt = self.conn.prepare(
            "SELECT did, kind, reason, attempts, not_before, failed, last_error FROM repo_work",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })?;
        let mut work = HashMap::new();
        for row in rows {
            let (did, kind, reason, attempts, not_before, _failed, last_error) = row?;
            let (Ok(did), Some(kind)) = (Did::parse(&did), WorkKind::parse(&kind)) else {
                continue;
            };
            work.insert(
                did,
                WorkItem {
                    kind,
                    reason,
                    attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                    not_before,
                    // A new start retries what failed before (the operator may have raised the
                    // limit); the error stays visible until then.
                    failed: false,
                    last_error,
                    done: false,
                    parked: false,
                },
            );
        }
        drop(stmt);
        self.work = work;
        let mut stmt = self.conn.prepare("SELECT did FROM backfilled")?;
        let dids = stmt.query_map([], |r| r.get::<_, String>(0))?;
        for did in dids {
            if let Ok(did) = Did::parse(&did?) {
                self.backfilled.insert(did);
            }
        }
        Ok(())
    }
}

/// Writes the pending repair changes inside the commit's transaction.
pub(super) fn write_pending(pending: &super::Pending, tx: &Transaction<'_>) -> Result<()> {
    {
        // Before the changes: tombstones recorded after a repair was applied must survive.
        let mut purge =
            tx.prepare_cached("DELETE FROM repo_records WHERE did = ?1 AND cid IS NULL")?;
        for did in &pending.purge_tombstones {
            purge.execute(params![did.as_str()])?;
        }
        let mut upsert = tx.prepare_cached(
            "INSERT OR REPLACE INTO repo_records (did, collection, rkey, cid, rev) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut remove = tx.prepare_cached(
            "DELETE FROM repo_records WHERE did = ?1 AND collection = ?2 AND rkey = ?3",
        )?;
        for ((did, collection, rkey), change) in &pending.held {
            match change {
                HeldChange::Put { cid, rev } => {
                    upsert.execute(params![did.as_str(), collection, rkey, cid, rev])?
                }
                HeldChange::Remove => remove.execute(params![did.as_str(), collection, rkey])?,
            };
        }
        let mut put_work = tx.prepare_cached(
            "INSERT OR REPLACE INTO repo_work (did, kind, reason, queued_at, attempts, not_before, last_error, failed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut remove_work = tx.prepare_cached("DELETE FROM repo_work WHERE did = ?1")?;
        let now = unix_now();
        for (did, change) in &pending.work {
            match change {
                WorkChange::Upsert(item) => put_work.execute(params![
                    did.as_str(),
                    item.kind.label(),
                    item.reason,
                    now,
                    item.attempts,
                    item.not_before,
                    item.last_error,
                    item.failed as i64
                ])?,
                WorkChange::Remove => remove_work.execute(params![did.as_str()])?,
            };
        }
        let mut backfilled = tx.prepare_cached(
            "INSERT OR REPLACE INTO backfilled (did, rev, at) VALUES (?1, ?2, ?3)",
        )?;
        for (did, rev) in &pending.backfilled {
            backfilled.execute(params![did.as_str(), rev.as_str(), now])?;
        }
        Ok(())
    }
}

impl StateStore {
    /// The chain state held for `did` (pending or committed); `None` when nothing verified is
    /// held (never seen, or only unverified revs).
    pub fn chain(&self, did: &Did) -> Result<Option<ChainState>> {
        if let Some(rev) = self.pending.revs.get(did) {
            return Ok(self
                .pending
                .datas
                .get(did)
                .and_then(|data| parse_chain(rev.as_str(), Some(data))));
        }
        let row: Option<(String, Option<String>)> = self
            .conn
            .prepare_cached("SELECT rev, data FROM repo_revs WHERE did = ?1")?
            .query_row(params![did.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .context("reading a chain state")?;
        Ok(row.and_then(|(rev, data)| parse_chain(&rev, data.as_deref())))
    }

    /// Moves `did`'s chain state to a verified commit's (rev and MST root).
    pub fn record_chain(&mut self, did: &Did, state: ChainState) {
        self.remember_rev(did, &state.rev);
        self.pending.revs.insert(did.clone(), state.rev);
        self.pending
            .datas
            .insert(did.clone(), state.data.to_string());
    }

    /// When this writer first recorded a rev of `did` (Unix seconds), if it did.
    pub fn first_seen(&self, did: &Did) -> Result<Option<i64>> {
        let first: Option<Option<i64>> = self
            .conn
            .prepare_cached("SELECT first_seen FROM repo_revs WHERE did = ?1")?
            .query_row(params![did.as_str()], |r| r.get(0))
            .optional()?;
        Ok(first.flatten())
    }

    /// Records that `did`'s record `collection/rkey` is held with `cid` as of commit `rev`, or
    /// (`None`) was deleted: while a repair of the repo is queued the delete is kept, with its
    /// rev, so the repair does not bring the record back.
    pub fn hold(
        &mut self,
        did: &Did,
        collection: &Nsid,
        rkey: &RecordKey,
        cid: Option<String>,
        rev: &Tid,
    ) {
        let change = if cid.is_none() && self.work_item(did).is_none() {
            HeldChange::Remove
        } else {
            HeldChange::Put {
                cid,
                rev: rev.as_str().to_owned(),
            }
        };
        self.pending.held.insert(
            (
                did.clone(),
                collection.as_str().to_owned(),
                rkey.as_str().to_owned(),
            ),
            change,
        );
    }

    /// Forgets the deletes kept for `did` during its repair (called when the repair is applied).
    pub fn purge_tombstones(&mut self, did: &Did) {
        self.pending.held.retain(|(d, _, _), change| {
            !(d == did && matches!(change, HeldChange::Put { cid: None, .. }))
        });
        self.pending.purge_tombstones.push(did.clone());
    }

    /// The records held for `did`: committed, with the pending changes applied.
    pub fn held_records(&self, did: &Did) -> Result<Vec<HeldRecord>> {
        type Row = (Option<String>, Option<String>);
        let mut held: HashMap<(String, String), Row> = self
            .conn
            .prepare_cached("SELECT collection, rkey, cid, rev FROM repo_records WHERE did = ?1")?
            .query_map(params![did.as_str()], |r| {
                Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?)))
            })?
            .collect::<Result<_, _>>()
            .context("reading held records")?;
        if self.pending.purge_tombstones.contains(did) {
            held.retain(|_, (cid, _)| cid.is_some());
        }
        for ((d, collection, rkey), change) in &self.pending.held {
            if d != did {
                continue;
            }
            let key = (collection.clone(), rkey.clone());
            match change {
                HeldChange::Put { cid, rev } => held.insert(key, (cid.clone(), Some(rev.clone()))),
                HeldChange::Remove => held.remove(&key),
            };
        }
        Ok(held
            .into_iter()
            .filter_map(|((collection, rkey), (cid, rev))| {
                Some(HeldRecord {
                    collection: Nsid::parse(&collection).ok()?,
                    rkey: RecordKey::parse(&rkey).ok()?,
                    cid,
                    rev: rev.and_then(|r| Tid::parse(&r).ok()),
                })
            })
            .collect())
    }

    /// The queue entry of `did`, if any (finished ones excluded).
    pub fn work_item(&self, did: &Did) -> Option<&WorkItem> {
        self.work.get(did).filter(|w| !w.done)
    }

    /// Every queued repo (finished ones excluded).
    pub fn work_items(&self) -> impl Iterator<Item = (&Did, &WorkItem)> {
        self.work.iter().filter(|(_, w)| !w.done)
    }

    /// Queued repos still to be done (failed ones excluded): `/health`'s queue depth.
    pub fn work_depth(&self) -> usize {
        self.work_items()
            .filter(|(_, w)| !w.failed && !w.parked)
            .count()
    }

    /// Parks (`true`) or unparks `did`'s entry (see [`WorkItem::parked`]).
    pub fn park_work(&mut self, did: &Did, parked: bool) {
        if let Some(item) = self.work.get_mut(did) {
            item.parked = parked;
        }
    }

    fn put_work(&mut self, did: &Did, item: WorkItem) {
        self.work.insert(did.clone(), item.clone());
        self.pending
            .work
            .insert(did.clone(), WorkChange::Upsert(item));
    }

    /// Queues `did` (durable with the next commit). A repo is queued once: asking again keeps
    /// the entry (a backfill request upgrades a queued resync). True when the queue changed.
    pub fn enqueue(&mut self, did: &Did, kind: WorkKind, reason: &str) -> bool {
        if let Some(item) = self.work_item(did) {
            if item.kind >= kind && !item.failed {
                return false;
            }
            let mut item = item.clone();
            item.kind = item.kind.max(kind);
            item.failed = false;
            self.put_work(did, item);
            return true;
        }
        self.put_work(
            did,
            WorkItem {
                kind,
                reason: reason.to_owned(),
                attempts: 0,
                not_before: 0,
                failed: false,
                last_error: None,
                done: false,
                parked: false,
            },
        );
        true
    }

    /// `did`'s repair is applied: the entry leaves the queue with the next commit; a backfill is
    /// recorded so it is not done again.
    pub fn work_done(&mut self, did: &Did, kind: WorkKind, rev: Tid) {
        if let Some(item) = self.work.get_mut(did) {
            item.done = true;
        }
        self.pending.work.insert(did.clone(), WorkChange::Remove);
        if kind == WorkKind::Backfill {
            self.backfilled.insert(did.clone());
            self.pending.backfilled.push((did.clone(), rev));
        }
    }

    /// `did`'s repair failed: retried at `retry_at` (Unix seconds), or never again in this run
    /// (`None`).
    pub fn work_failed(&mut self, did: &Did, error: String, retry_at: Option<i64>) {
        let Some(mut item) = self.work_item(did).cloned() else {
            return;
        };
        item.attempts = item.attempts.saturating_add(1);
        item.last_error = Some(error);
        match retry_at {
            Some(at) => item.not_before = at,
            None => item.failed = true,
        }
        self.put_work(did, item);
    }

    /// True once `did` was backfilled (committed or pending).
    pub fn is_backfilled(&self, did: &Did) -> bool {
        self.backfilled.contains(did)
    }

    /// The study users (from the loaded set) not yet backfilled nor queued.
    pub fn study_users_to_backfill(&self) -> Vec<Did> {
        self.study_users
            .iter()
            .filter(|did| !self.backfilled.contains(did) && self.work_item(did).is_none())
            .collect()
    }

    /// Tracked repos a resync can repair after `OutdatedCursor`: every study user and every repo
    /// with a held rev that is still tracked.
    pub fn repos_to_resync(&self) -> Result<Vec<Did>> {
        let mut out: Vec<Did> = self.study_users.iter().collect();
        let mut stmt = self.conn.prepare("SELECT did FROM repo_revs")?;
        for did in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(did) = Did::parse(&did?) {
                if self.tracked(&did) && !self.study_users.contains(&did) {
                    out.push(did);
                }
            }
        }
        Ok(out)
    }
}
