//! Per-repo chain check: does a verified commit or `#sync` continue the state we hold for that
//! repo (`rev`, MST root `data`), repeat it, or reveal a gap that needs a resync?

use ipld_core::cid::Cid;

use crate::ids::Tid;
use crate::verify::{SignedCommit, VerifiedCommit};

/// What a consumer remembers about one repo after the last commit it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    pub rev: Tid,
    /// The repo's MST root after that commit.
    pub data: Cid,
}

impl ChainState {
    /// The state a signed commit leaves the repo in.
    pub fn after(commit: &SignedCommit) -> ChainState {
        ChainState {
            rev: commit.rev,
            data: commit.data,
        }
    }
}

/// Why a commit does not continue the held state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// `since` is not the rev we hold (a commit in between was not seen).
    Since,
    /// `prevData` is not the MST root we hold (the tree changed in a way we did not see).
    PrevData,
    /// A `#sync` announced a newer tree than the one we hold.
    Sync,
}

impl Gap {
    /// Short stable label for metrics (`resyncs{reason=...}`).
    pub fn reason(self) -> &'static str {
        match self {
            Gap::Since => "since_mismatch",
            Gap::PrevData => "prev_data_mismatch",
            Gap::Sync => "sync_newer",
        }
    }
}

/// Where a verified event stands against the held chain state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainVerdict {
    /// Nothing is held for this repo yet: accept, and start the chain here.
    First,
    /// Continues the held state exactly.
    InOrder,
    /// Its rev is not newer than the held one: already seen (a replay or a relay swap).
    Duplicate,
    /// Newer, but something between the held state and this event was not seen.
    Gap(Gap),
}

/// Classifies a verified `#commit` against the held state of its repo.
///
/// `since` is the envelope's `since` (the rev of the repo's previous commit). A legacy commit
/// (no `prevData`) can only be checked by `since`.
pub fn check_commit(
    held: Option<&ChainState>,
    commit: &VerifiedCommit,
    since: Option<&str>,
) -> ChainVerdict {
    let Some(held) = held else {
        return ChainVerdict::First;
    };
    if commit.commit.rev <= held.rev {
        return ChainVerdict::Duplicate;
    }
    if since != Some(held.rev.as_str()) {
        return ChainVerdict::Gap(Gap::Since);
    }
    match commit.prev_data {
        Some(prev_data) if prev_data != held.data => ChainVerdict::Gap(Gap::PrevData),
        _ => ChainVerdict::InOrder,
    }
}

/// Classifies a verified `#sync` (the repo's current signed commit) against the held state: a
/// newer rev whose tree differs from ours is a gap to repair; a newer rev with the same tree only
/// moves the rev forward ([`ChainVerdict::InOrder`]).
pub fn check_sync(held: Option<&ChainState>, sync: &SignedCommit) -> ChainVerdict {
    let Some(held) = held else {
        return ChainVerdict::First;
    };
    if sync.rev <= held.rev {
        ChainVerdict::Duplicate
    } else if sync.data != held.data {
        ChainVerdict::Gap(Gap::Sync)
    } else {
        ChainVerdict::InOrder
    }
}
