//! Repairing a repo from a fresh copy (resync and backfill): which records a consumer missed or
//! still holds after they were deleted, and the assembled commits that route them exactly as if
//! they had streamed past.
//!
//! Pure: the held records come from the caller's index, the repo from [`crate::repo`].

use std::collections::HashMap;

use ipld_core::cid::Cid;

use crate::car::{CarBlocks, CarError};
use crate::frame::{Action, Commit, RepoOp};
use crate::ids::{Did, Nsid, RecordKey, Seq, Tid};
use crate::repo::{RepoRecord, VerifiedRepo};
use crate::time::rfc3339_to_unix_micros;

/// A record the consumer routed or indexed earlier for this repo, or (`cid: None`) a delete it
/// saw while a repair of the repo was pending.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeldRecord {
    pub collection: Nsid,
    pub rkey: RecordKey,
    /// The record's CID as text (as stored); `None` for a delete seen in the stream;
    /// [`CID_NOT_RECORDED`] for a record an older state indexed without its CID.
    pub cid: Option<String>,
    /// The rev of the commit the consumer learnt it from (`None`: unknown, e.g. a state from
    /// before revs were kept): compared with the fetched repo's rev, so stream commits handled
    /// while the fetch was under way are neither undone nor repeated.
    pub rev: Option<Tid>,
}

/// The CID of a held record whose CID was never recorded (a state from before records were
/// held per repo, seeded from its indexes): the repo holding the record at all counts as
/// unchanged (its CID cannot be compared, and an update would write it again), and the repo
/// lacking it is a missed delete like any other.
pub const CID_NOT_RECORDED: &str = "not-recorded";

impl HeldRecord {
    /// Learnt from a commit newer than the fetched repo's `rev`.
    fn newer_than(&self, rev: &Tid) -> bool {
        self.rev.is_some_and(|r| r > *rev)
    }
}

/// What a repo holds that the consumer does not, and the other way round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoDiff<'r> {
    /// In the repo, not held: missed creates.
    pub creates: Vec<&'r RepoRecord>,
    /// Held with another CID: missed updates.
    pub updates: Vec<&'r RepoRecord>,
    /// Held, gone from the repo: missed deletes.
    pub deletes: Vec<HeldRecord>,
    /// Held with the same CID.
    pub unchanged: usize,
}

/// Compares the records of a repo fetched at `rev` in the collections `relevant` selects with
/// what is held. Held records outside `relevant` are compared too (a held record is relevant by
/// definition). What the consumer learnt from commits newer than `rev` (handled from the stream
/// while the fetch was under way) wins over the fetched copy: such a record is not deleted, such
/// a delete is not undone, such an update is not reverted.
pub fn diff<'r>(
    repo: &'r [RepoRecord],
    rev: &Tid,
    held: impl IntoIterator<Item = HeldRecord>,
    relevant: impl Fn(&Nsid) -> bool,
) -> RepoDiff<'r> {
    let mut held: HashMap<(Nsid, RecordKey), HeldRecord> = held
        .into_iter()
        .map(|h| ((h.collection.clone(), h.rkey.clone()), h))
        .collect();
    let mut out = RepoDiff::default();
    for record in repo {
        match held.remove(&(record.collection.clone(), record.rkey.clone())) {
            Some(h) if h.newer_than(rev) => out.unchanged += 1,
            Some(h) => match &h.cid {
                Some(cid) if cid == CID_NOT_RECORDED => out.unchanged += 1,
                Some(cid) if *cid == record.cid.to_string() => out.unchanged += 1,
                Some(_) => out.updates.push(record),
                // A delete seen at or before `rev`, yet the repo at `rev` holds the record: it
                // was created again.
                None => out.creates.push(record),
            },
            None if relevant(&record.collection) => out.creates.push(record),
            None => {}
        }
    }
    let mut deletes: Vec<HeldRecord> = held
        .into_values()
        .filter(|h| h.cid.is_some() && !h.newer_than(rev))
        .collect();
    deletes.sort();
    out.deletes = deletes;
    out
}

/// Ops per assembled commit: keeps the per-commit bookkeeping (verified-block list, overlay of
/// new posts) small for repos of any size.
pub const OPS_PER_COMMIT: usize = 64;

/// One change to route.
#[derive(Debug, Clone, Copy)]
pub enum Change<'r> {
    Create(&'r RepoRecord),
    Update(&'r RepoRecord),
    Delete(&'r HeldRecord),
}

/// The event context given to assembled commits: the repo's commit (rev, CID), and the `seq` and
/// `time` the caller attributes the repair to (they appear in delete files).
#[derive(Debug, Clone, Copy)]
pub struct RepairContext<'t> {
    pub seq: Seq,
    pub time: &'t str,
}

/// Assembles `changes` into commits of at most [`OPS_PER_COMMIT`] ops, in order, carrying the
/// repo's rev and commit CID, with each create/update's record block from `repo`.
pub fn assemble<'r>(
    repo: &'r VerifiedRepo,
    did: &Did,
    ctx: RepairContext<'r>,
    changes: &[Change<'_>],
) -> Result<Vec<Commit<'r>>, CarError> {
    let mut commits = Vec::with_capacity(changes.len().div_ceil(OPS_PER_COMMIT));
    for chunk in changes.chunks(OPS_PER_COMMIT) {
        let mut ops = Vec::with_capacity(chunk.len());
        let mut blocks: Vec<(Cid, &'r [u8])> = Vec::with_capacity(chunk.len());
        for change in chunk {
            let (action, collection, rkey, cid) = match change {
                Change::Create(r) => (Action::Create, &r.collection, &r.rkey, Some(r.cid)),
                Change::Update(r) => (Action::Update, &r.collection, &r.rkey, Some(r.cid)),
                Change::Delete(h) => (Action::Delete, &h.collection, &h.rkey, None),
            };
            if let Some(cid) = cid {
                // A verified repo holds every record block; a missing one reads as a missing
                // block when routed (dropped and counted), never as a panic.
                if let Some(block) = repo.record_block(&cid) {
                    blocks.push((cid, block));
                }
            }
            ops.push(RepoOp {
                action,
                collection: collection.clone(),
                rkey: rkey.clone(),
                cid,
                prev: None,
            });
        }
        let blocks = CarBlocks::from_blocks(vec![repo.commit.cid], blocks)?;
        commits.push(Commit::assembled(
            ctx.seq,
            did.clone(),
            repo.commit.rev,
            repo.commit.cid,
            ctx.time,
            ops,
            blocks,
        ));
    }
    Ok(commits)
}

/// When a record was created, Unix microseconds: its `createdAt` when it has a valid one, else
/// the timestamp of a TID record key, else `None` (e.g. a profile's `self` without `createdAt`).
pub fn created_at_micros(record: &serde_json::Value, rkey: &RecordKey) -> Option<i64> {
    if let Some(us) = record
        .get("createdAt")
        .and_then(|v| v.as_str())
        .and_then(rfc3339_to_unix_micros)
    {
        return Some(us);
    }
    crate::ids::Tid::parse(rkey.as_str())
        .ok()
        .map(|tid| tid.timestamp_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u8) -> Cid {
        let digest = [n; 32];
        let mh = ipld_core::cid::multihash::Multihash::<64>::wrap(0x12, &digest).unwrap();
        Cid::new_v1(0x71, mh)
    }

    fn rec(collection: &str, rkey: &str, n: u8) -> RepoRecord {
        RepoRecord {
            collection: Nsid::parse(collection).unwrap(),
            rkey: RecordKey::parse(rkey).unwrap(),
            cid: cid(n),
        }
    }

    fn held(r: &RepoRecord) -> HeldRecord {
        HeldRecord {
            collection: r.collection.clone(),
            rkey: r.rkey.clone(),
            cid: Some(r.cid.to_string()),
            rev: Some(Tid::parse("3kaaaaaaaaaa2").unwrap()),
        }
    }

    const FETCHED: &str = "3kbbbbbbbbbb2";
    const NEWER: &str = "3kcccccccccc2";

    #[test]
    fn diff_finds_missed_creates_updates_and_deletes() {
        let kept = rec("app.bsky.feed.post", "3kaaaaaaaaaa2", 1);
        let missed = rec("app.bsky.feed.post", "3kaaaaaaaaab2", 2);
        let changed = rec("app.bsky.actor.profile", "self", 3);
        let ignored = rec("app.bsky.feed.generator", "x", 4);
        let repo = vec![kept.clone(), missed.clone(), changed.clone(), ignored];
        let gone = rec("app.bsky.feed.like", "3kaaaaaaaaac2", 5);
        let mut old_profile = held(&changed);
        old_profile.cid = Some(cid(9).to_string());
        let d = diff(
            &repo,
            &Tid::parse(FETCHED).unwrap(),
            vec![held(&kept), old_profile, held(&gone)],
            |c| c.as_str() != "app.bsky.feed.generator",
        );
        assert_eq!(d.creates, vec![&missed]);
        assert_eq!(d.updates, vec![&changed]);
        assert_eq!(d.deletes, vec![held(&gone)]);
        assert_eq!(d.unchanged, 1);
    }

    /// Stream commits newer than the fetched repo were handled while it was fetched: the fetched
    /// copy must not undo them.
    #[test]
    fn what_the_stream_taught_after_the_fetched_rev_wins() {
        let fetched = Tid::parse(FETCHED).unwrap();
        let newer = Some(Tid::parse(NEWER).unwrap());
        // Deleted from the stream after the fetch: the repo still has it.
        let deleted_later = rec("app.bsky.feed.post", "3kaaaaaaaaaa2", 1);
        // Created from the stream after the fetch: the repo does not have it yet.
        let created_later = rec("app.bsky.feed.post", "3kaaaaaaaaab2", 2);
        // Deleted before the fetch, but in the fetched repo: created again.
        let recreated = rec("app.bsky.feed.post", "3kaaaaaaaaac2", 3);
        let repo = vec![deleted_later.clone(), recreated.clone()];
        let tombstone = |r: &RepoRecord, rev: Option<Tid>| HeldRecord {
            cid: None,
            rev,
            ..held(r)
        };
        let mut later = held(&created_later);
        later.rev = newer;
        let d = diff(
            &repo,
            &fetched,
            vec![
                tombstone(&deleted_later, newer),
                later,
                tombstone(&recreated, Some(Tid::parse("3kaaaaaaaaaa2").unwrap())),
            ],
            |_| true,
        );
        assert_eq!(d.creates, vec![&recreated]);
        assert!(d.updates.is_empty());
        assert!(d.deletes.is_empty(), "{:?}", d.deletes);
        assert_eq!(d.unchanged, 1);
    }

    #[test]
    fn a_record_held_without_its_cid_is_kept_or_deleted_never_updated() {
        let still_there = rec("app.bsky.feed.post", "3kaaaaaaaaaa2", 1);
        let gone = rec("app.bsky.feed.post", "3kaaaaaaaaab2", 2);
        let seeded = |r: &RepoRecord| HeldRecord {
            cid: Some(CID_NOT_RECORDED.to_owned()),
            rev: None,
            ..held(r)
        };
        let repo = [still_there.clone()];
        let d = diff(
            &repo,
            &Tid::parse(FETCHED).unwrap(),
            vec![seeded(&still_there), seeded(&gone)],
            |_| true,
        );
        assert!(d.creates.is_empty() && d.updates.is_empty(), "{d:?}");
        assert_eq!(d.unchanged, 1);
        assert_eq!(d.deletes, vec![seeded(&gone)]);
    }

    #[test]
    fn created_at_prefers_the_record_then_the_tid() {
        let rkey = RecordKey::parse("3kaaaaaaaaaa2").unwrap();
        let with = serde_json::json!({"createdAt": "2024-01-02T03:04:05.000Z"});
        assert_eq!(
            created_at_micros(&with, &rkey),
            rfc3339_to_unix_micros("2024-01-02T03:04:05.000Z")
        );
        let tid = crate::ids::Tid::parse("3kaaaaaaaaaa2").unwrap();
        assert_eq!(
            created_at_micros(&serde_json::json!({"createdAt": "garbage"}), &rkey),
            Some(tid.timestamp_micros() as i64)
        );
        let profile = RecordKey::parse("self").unwrap();
        assert_eq!(created_at_micros(&serde_json::json!({}), &profile), None);
    }
}
