//! Commit verification (Sync 1.1) as pure functions: CAR root, signed commit object, signature,
//! rev plausibility and MST inversion of a `#commit`; the signed commit of a `#sync`.
//!
//! Nothing here reads a clock or resolves an identity: the caller passes the current time and the
//! repo's signing key, so the same bytes always give the same verdict. Every failure carries a
//! stable reason label ([`VerifyError::reason`]) for metrics and for `inspect --did-docs`.

use ipld_core::cid::Cid;
use serde::Deserialize;

use crate::car::{CarBlocks, CarError};
use crate::cbor;
use crate::crypto::{PublicKey, SigError};
use crate::frame::{Action, Commit, OpError, RepoOp, SyncEvent, MAX_BLOCKS_BYTES};
use crate::ids::{Did, IdError, Tid};
use crate::mst::{MstError, Tree};

/// How far a rev's TID clock may run ahead of ours before the commit is rejected. Relays use the
/// same tolerance; a rev far in the future would otherwise become the repo's dedupe bound and
/// make every later commit of that account look like a duplicate.
pub const DEFAULT_MAX_FUTURE_REV_MICROS: u64 = 5 * 60 * 1_000_000;

/// The only repo format version this verifier accepts (atproto repo v3).
pub const COMMIT_VERSION: i64 = 3;

/// Inputs of a verification that are not in the bytes.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// The verifier's clock, Unix microseconds.
    pub now_micros: u64,
    /// Largest tolerated lead of a rev's TID time over `now_micros`.
    pub max_future_rev_micros: u64,
}

impl VerifyOptions {
    /// Options with the default 5-minute future-rev tolerance.
    pub fn at(now_micros: u64) -> Self {
        VerifyOptions {
            now_micros,
            max_future_rev_micros: DEFAULT_MAX_FUTURE_REV_MICROS,
        }
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum VerifyError {
    #[error("bad CAR: {0}")]
    Car(#[from] CarError),
    #[error("CAR blocks of {0} bytes exceed the {MAX_BLOCKS_BYTES}-byte limit")]
    BlocksTooLarge(usize),
    #[error("CAR has {0} roots, expected exactly one")]
    CarRootCount(usize),
    // CIDs in errors are kept as text: errors are rare, and a `Cid` (~90 bytes) in a variant
    // would make every `Result` of the hot path that large.
    #[error("CAR root {found} is not the commit {expected}")]
    CarRoot { expected: String, found: String },
    #[error("commit block {0} is not in the CAR")]
    MissingCommitBlock(String),
    #[error("commit block does not hash to {0}")]
    CommitHash(String),
    #[error("commit object does not decode: {0}")]
    CommitObject(String),
    #[error("commit version {0}, expected {COMMIT_VERSION}")]
    CommitVersion(i64),
    #[error("commit field {field}: {source}")]
    CommitField {
        field: &'static str,
        #[source]
        source: IdError,
    },
    #[error("commit is by {commit}, the envelope says {envelope}")]
    DidMismatch { envelope: Did, commit: Did },
    #[error("commit rev is {commit}, the envelope says {envelope}")]
    RevMismatch { envelope: Tid, commit: Tid },
    #[error("rev {rev} is {ahead_secs} s ahead of the clock")]
    FutureRev { rev: Tid, ahead_secs: u64 },
    #[error("signature: {0}")]
    Signature(#[from] SigError),
    #[error("op {index} cannot be read: {source}")]
    BadOp {
        index: usize,
        #[source]
        source: Box<OpError>,
    },
    #[error("{action} of {path} without `prev`")]
    MissingPrev { action: &'static str, path: String },
    #[error("{action} of {path}: {why}")]
    BadOpShape {
        action: &'static str,
        path: String,
        why: &'static str,
    },
    #[error("two ops on {0}")]
    DuplicateOpPath(String),
    #[error("op {action} {path}: the tree holds {tree:?}, the op says {op:?}")]
    OpMismatch {
        action: &'static str,
        path: String,
        tree: Option<String>,
        op: Option<String>,
    },
    #[error("record block of {path}: {source}")]
    RecordBlock {
        path: String,
        #[source]
        source: Box<OpError>,
    },
    #[error("the commit's blocks do not prove its ops: {0}")]
    MissingBlocks(Box<MstError>),
    #[error("MST: {0}")]
    Mst(Box<MstError>),
    #[error("ops inverted give root {computed}, prevData is {prev_data}")]
    InversionMismatch { computed: String, prev_data: String },
}

impl VerifyError {
    /// Short stable label for metrics (`verify_failures{reason=...}`) and audit lines.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Car(_) => "bad_car",
            VerifyError::BlocksTooLarge(_) => "blocks_too_large",
            VerifyError::CarRootCount(_) | VerifyError::CarRoot { .. } => "car_root_mismatch",
            VerifyError::MissingCommitBlock(_) => "missing_commit_block",
            VerifyError::CommitHash(_) => "commit_hash_mismatch",
            VerifyError::CommitObject(_) | VerifyError::CommitField { .. } => "bad_commit_object",
            VerifyError::CommitVersion(_) => "bad_commit_version",
            VerifyError::DidMismatch { .. } => "did_mismatch",
            VerifyError::RevMismatch { .. } => "rev_mismatch",
            VerifyError::FutureRev { .. } => "future_rev",
            VerifyError::Signature(e) => e.reason(),
            VerifyError::BadOp { .. } => "bad_op",
            VerifyError::MissingPrev { .. } => "missing_prev",
            VerifyError::BadOpShape { .. } => "bad_op_shape",
            VerifyError::DuplicateOpPath(_) => "duplicate_op_path",
            VerifyError::OpMismatch { .. } => "op_mismatch",
            VerifyError::RecordBlock { source, .. } => match &**source {
                OpError::MissingBlock(_) => "missing_record_block",
                other => other.reason(),
            },
            VerifyError::MissingBlocks(_) => "missing_blocks",
            VerifyError::Mst(_) => "bad_mst",
            VerifyError::InversionMismatch { .. } => "inversion_mismatch",
        }
    }
}

/// Every reason label [`VerifyError::reason`] can return (for metric pre-registration and docs),
/// together with the signature reasons of [`SigError`].
pub const VERIFY_REASONS: &[&str] = &[
    "bad_car",
    "blocks_too_large",
    "car_root_mismatch",
    "missing_commit_block",
    "commit_hash_mismatch",
    "bad_commit_object",
    "bad_commit_version",
    "did_mismatch",
    "rev_mismatch",
    "future_rev",
    "bad_signature",
    "high_s_signature",
    "bad_signature_length",
    "bad_op",
    "missing_prev",
    "bad_op_shape",
    "duplicate_op_path",
    "op_mismatch",
    "missing_record_block",
    "cid_mismatch",
    "bad_cid",
    "record_too_large",
    "missing_blocks",
    "bad_mst",
    "inversion_mismatch",
];

/// A decoded, hash-checked, signature-checked repo commit object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommit {
    /// The CID of the commit block.
    pub cid: Cid,
    pub did: Did,
    pub rev: Tid,
    /// Root of the repo's MST after this commit.
    pub data: Cid,
    pub prev: Option<Cid>,
}

/// How a `#commit`'s ops were checked against the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inversion {
    /// The ops, applied in reverse to the partial MST, gave back `prevData`.
    Proven,
    /// A legacy commit without `prevData`: signature and structure checked, ops not provable.
    Legacy,
}

/// A `#commit` that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCommit {
    pub commit: SignedCommit,
    /// The envelope's `prevData`: the MST root before this commit (None for legacy commits).
    pub prev_data: Option<Cid>,
    pub inversion: Inversion,
}

#[derive(Deserialize)]
struct RawSignedCommit<'a> {
    #[serde(borrow)]
    did: &'a str,
    version: i64,
    data: Cid,
    #[serde(borrow)]
    rev: &'a str,
    prev: Option<Cid>,
    #[serde(borrow, with = "serde_bytes")]
    sig: &'a [u8],
}

/// The argument of the CBOR head at `pos`, with its major type and the position after it.
fn cbor_head(buf: &[u8], pos: usize) -> Option<(u8, u64, usize)> {
    let b = *buf.get(pos)?;
    let (major, info) = (b >> 5, b & 0x1f);
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 0),
        24..=27 => {
            let n = 1usize << (info - 24);
            let bytes = buf.get(pos + 1..pos + 1 + n)?;
            (bytes.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)), n)
        }
        _ => return None,
    };
    Some((major, arg, pos + 1 + len))
}

/// The commit block without its `sig` entry: the bytes the signature covers.
///
/// Works on the encoded map rather than re-serialising a struct, so fields this build does not
/// know are still covered exactly as the signer encoded them. The block was checked to be
/// canonical DAG-CBOR, so copying the other entries in their order, minus one, is the canonical
/// encoding of the unsigned commit.
fn unsigned_bytes(block: &[u8]) -> Option<Vec<u8>> {
    let (major, count, mut pos) = cbor_head(block, 0)?;
    if major != 5 || count == 0 || count > 64 {
        return None;
    }
    // The map head of one entry fewer (count <= 64), then every entry but `sig`, in one buffer.
    let remaining = count - 1;
    let mut out = Vec::with_capacity(block.len());
    if remaining < 24 {
        out.push(0xa0 | remaining as u8);
    } else {
        out.push(0xb8);
        out.push(remaining as u8);
    }
    let mut removed = false;
    for _ in 0..count {
        let key_start = pos;
        let key_end = cbor::skip_item(block, pos).ok()?;
        let value_end = cbor::skip_item(block, key_end).ok()?;
        // The text string "sig": head 0x63 then the three bytes.
        if &block[key_start..key_end] == b"\x63sig" {
            removed = true;
        } else {
            out.extend_from_slice(&block[key_start..value_end]);
        }
        pos = value_end;
    }
    if !removed || pos != block.len() {
        return None;
    }
    Some(out)
}

fn check_future_rev(rev: &Tid, opts: &VerifyOptions) -> Result<(), VerifyError> {
    let rev_micros = rev.timestamp_micros();
    let limit = opts.now_micros.saturating_add(opts.max_future_rev_micros);
    if rev_micros > limit {
        return Err(VerifyError::FutureRev {
            rev: *rev,
            ahead_secs: (rev_micros - opts.now_micros) / 1_000_000,
        });
    }
    Ok(())
}

/// True when `rev` is no more than the tolerance ahead of the clock: a rev that fails this must
/// never become a repo's dedupe bound, whatever else is known about the commit.
pub fn rev_is_plausible(rev: &Tid, opts: &VerifyOptions) -> bool {
    check_future_rev(rev, opts).is_ok()
}

/// Checks the signed commit object addressed by `root` inside `blocks`: the CAR's only root,
/// present, hash-checked, version 3, `did`/`rev` equal to the envelope's, rev not in the future,
/// signature by `key`.
pub fn verify_signed_commit(
    blocks: &CarBlocks<'_>,
    root: &Cid,
    envelope_did: &Did,
    envelope_rev: &Tid,
    key: &PublicKey,
    opts: &VerifyOptions,
) -> Result<SignedCommit, VerifyError> {
    if blocks.roots.len() != 1 {
        return Err(VerifyError::CarRootCount(blocks.roots.len()));
    }
    if blocks.roots[0] != *root {
        return Err(VerifyError::CarRoot {
            expected: root.to_string(),
            found: blocks.roots[0].to_string(),
        });
    }
    let block = blocks
        .get(root)
        .ok_or_else(|| VerifyError::MissingCommitBlock(root.to_string()))?;
    verify_commit_block(
        root,
        block,
        envelope_did,
        Some(envelope_rev),
        Some(key),
        opts,
    )
}

/// Checks one commit block: it hashes to `cid`, decodes to a version-3 commit by `did` (with
/// `rev`, when the caller knows which rev to expect), its rev is not in the future, and `sig`
/// verifies with `key` over the block without `sig`. `key: None` skips only the signature (for
/// auditing data whose identity is not at hand); every other check still runs.
pub fn verify_commit_block(
    cid: &Cid,
    block: &[u8],
    did: &Did,
    rev: Option<&Tid>,
    key: Option<&PublicKey>,
    opts: &VerifyOptions,
) -> Result<SignedCommit, VerifyError> {
    if !cbor::is_atproto_record_cid(cid) || cbor::verify_block(cid, block).is_err() {
        return Err(VerifyError::CommitHash(cid.to_string()));
    }
    cbor::check_depth(block).map_err(|e| VerifyError::CommitObject(e.to_string()))?;
    // Only the canonical encoding is accepted: otherwise one signed commit would have many
    // CIDs (a reordered map, a longer length prefix), and the signed bytes cut from it below
    // would not be the bytes the signer encoded.
    let ipld: ipld_core::ipld::Ipld = serde_ipld_dagcbor::from_slice(block)
        .map_err(|e| VerifyError::CommitObject(e.to_string()))?;
    let canonical =
        serde_ipld_dagcbor::to_vec(&ipld).map_err(|e| VerifyError::CommitObject(e.to_string()))?;
    if canonical != block {
        return Err(VerifyError::CommitObject(
            "not in canonical DAG-CBOR form".into(),
        ));
    }
    // `prev` is required (nullable) in a v3 commit; serde alone would read its absence as null.
    if !matches!(&ipld, ipld_core::ipld::Ipld::Map(m) if m.contains_key("prev")) {
        return Err(VerifyError::CommitObject("commit without `prev`".into()));
    }
    let raw: RawSignedCommit<'_> = serde_ipld_dagcbor::from_slice(block)
        .map_err(|e| VerifyError::CommitObject(e.to_string()))?;
    if raw.version != COMMIT_VERSION {
        return Err(VerifyError::CommitVersion(raw.version));
    }
    let commit_did = Did::parse(raw.did).map_err(|source| VerifyError::CommitField {
        field: "did",
        source,
    })?;
    let commit_rev = Tid::parse(raw.rev).map_err(|source| VerifyError::CommitField {
        field: "rev",
        source,
    })?;
    if commit_did != *did {
        return Err(VerifyError::DidMismatch {
            envelope: did.clone(),
            commit: commit_did,
        });
    }
    if let Some(rev) = rev {
        if commit_rev != *rev {
            return Err(VerifyError::RevMismatch {
                envelope: *rev,
                commit: commit_rev,
            });
        }
    }
    check_future_rev(&commit_rev, opts)?;
    let unsigned = unsigned_bytes(block)
        .ok_or_else(|| VerifyError::CommitObject("commit map without a `sig` entry".into()))?;
    if let Some(key) = key {
        key.verify(&unsigned, raw.sig)?;
    }
    Ok(SignedCommit {
        cid: *cid,
        did: commit_did,
        rev: commit_rev,
        data: raw.data,
        prev: raw.prev,
    })
}

/// The MST key of an op: `collection/rkey`.
fn op_path(op: &RepoOp) -> String {
    format!("{}/{}", op.collection.as_str(), op.rkey.as_str())
}

fn mst_error(e: MstError) -> VerifyError {
    match e {
        MstError::MissingBlock(_) => VerifyError::MissingBlocks(Box::new(e)),
        other => VerifyError::Mst(Box::new(other)),
    }
}

/// Verifies a `#commit` completely: [`verify_signed_commit`], every op readable with its record
/// block present and hash-checked, and (when the commit carries `prevData`) the MST inversion:
/// the ops applied in reverse to the partial tree in `blocks` must give back `prevData`, and each
/// op must agree with the tree (a create's or update's `cid` is the tree's value for its path).
///
/// A commit without `prevData` is a legacy commit: it is returned as [`Inversion::Legacy`], not
/// rejected; whether to accept it is the caller's policy.
pub fn verify_commit(
    commit: &Commit<'_>,
    key: &PublicKey,
    opts: &VerifyOptions,
) -> Result<VerifiedCommit, VerifyError> {
    let signed = verify_signed_commit(
        &commit.blocks,
        &commit.commit,
        &commit.repo,
        &commit.rev,
        key,
        opts,
    )?;
    let inversion = prove_ops(commit, &signed.data)?;
    Ok(VerifiedCommit {
        prev_data: commit.prev_data,
        commit: signed,
        inversion,
    })
}

/// The ops half of [`verify_commit`], for a commit whose signed object was checked elsewhere:
/// every op readable, every create/update's record block present and hash-checked, and (with
/// `prevData`) the MST inversion from `data`, the commit's MST root, back to `prevData`.
pub fn prove_ops(commit: &Commit<'_>, data: &Cid) -> Result<Inversion, VerifyError> {
    let proving = commit.prev_data.is_some();
    let mut ops: Vec<(String, &RepoOp)> = Vec::with_capacity(commit.ops.len());
    for (index, op) in commit.ops.iter().enumerate() {
        let op = op.as_ref().map_err(|source| VerifyError::BadOp {
            index,
            source: Box::new(source.clone()),
        })?;
        let path = op_path(op);
        check_op_shape(op, &path, proving)?;
        if op.action != Action::Delete {
            commit
                .record_block(op)
                .map_err(|source| VerifyError::RecordBlock {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
        }
        ops.push((path, op));
    }
    // The ops list is not signed: two ops on one path could cancel out around a forged record
    // (update A to F, then back) and still invert to `prevData`. One op per path, as the PDS
    // writes them; then the order indigo uses (deletes first, then by path), so proofs that
    // suffice for the reference implementation suffice here.
    ops.sort_by(|(a, _), (b, _)| a.cmp(b));
    if let Some(pair) = ops.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(VerifyError::DuplicateOpPath(pair[0].0.clone()));
    }
    // Stable: paths stay sorted within deletes and within the rest.
    ops.sort_by_key(|(_, op)| op.action != Action::Delete);
    let mut tree = Tree::load(*data, &commit.blocks).map_err(mst_error)?;
    let mismatch = |path: &str, op: &RepoOp, tree: Option<Cid>| VerifyError::OpMismatch {
        action: op.action.as_str(),
        path: path.to_owned(),
        tree: tree.map(|c| c.to_string()),
        op: op.cid.map(|c| c.to_string()),
    };
    let Some(prev_data) = commit.prev_data else {
        // Legacy commits cannot be inverted to anything checkable, but each op must still agree
        // with the signed tree: creates and updates hold their `cid`, deletes are absent.
        for (path, op) in &ops {
            let in_tree = tree.get(path.as_bytes()).map_err(mst_error)?;
            let agrees = match op.action {
                Action::Delete => in_tree.is_none(),
                _ => in_tree.is_some() && in_tree == op.cid,
            };
            if !agrees {
                return Err(mismatch(path, op, in_tree));
            }
        }
        return Ok(Inversion::Legacy);
    };
    for (path, op) in &ops {
        let key = path.as_bytes();
        // Each inverse step returns what the tree held for the path after the commit, which
        // must be exactly what the op says it wrote.
        let (after, expected) = match (op.action, op.prev) {
            (Action::Create, _) => (tree.remove(key).map_err(mst_error)?, op.cid),
            (Action::Update, Some(prev)) => (tree.insert(key, prev).map_err(mst_error)?, op.cid),
            (Action::Delete, Some(prev)) => (tree.insert(key, prev).map_err(mst_error)?, None),
            // check_op_shape guarantees `prev` for updates and deletes of a proven commit.
            (_, None) => return Err(missing_prev(op, path)),
        };
        if after != expected {
            return Err(mismatch(path, op, after));
        }
    }
    let computed = tree.root_cid().map_err(mst_error)?;
    if computed != prev_data {
        return Err(VerifyError::InversionMismatch {
            computed: computed.to_string(),
            prev_data: prev_data.to_string(),
        });
    }
    Ok(Inversion::Proven)
}

fn missing_prev(op: &RepoOp, path: &str) -> VerifyError {
    VerifyError::MissingPrev {
        action: op.action.as_str(),
        path: path.to_owned(),
    }
}

/// The fields each action must (not) carry: a create has a `cid` and no `prev`, an update a
/// `cid` and a different `prev`, a delete a `prev` and no `cid`. `prev` is only required where
/// the commit claims to be provable (`prevData` present); legacy commits predate it.
fn check_op_shape(op: &RepoOp, path: &str, proving: bool) -> Result<(), VerifyError> {
    let shape = |why: &'static str| VerifyError::BadOpShape {
        action: op.action.as_str(),
        path: path.to_owned(),
        why,
    };
    match op.action {
        Action::Create => {
            if op.cid.is_none() {
                return Err(shape("a create without `cid`"));
            }
            if proving && op.prev.is_some() {
                return Err(shape("a create with `prev`"));
            }
        }
        Action::Update => {
            if op.cid.is_none() {
                return Err(shape("an update without `cid`"));
            }
            if proving && op.prev.is_none() {
                return Err(missing_prev(op, path));
            }
            if op.prev.is_some() && op.prev == op.cid {
                return Err(shape("an update whose `prev` is its `cid`"));
            }
        }
        Action::Delete => {
            if op.cid.is_some() {
                return Err(shape("a delete with `cid`"));
            }
            if proving && op.prev.is_none() {
                return Err(missing_prev(op, path));
            }
        }
    }
    Ok(())
}

/// Verifies a `#sync` event: its `blocks` CAR has one root, the signed commit (other blocks are
/// ignored),
/// signed by `key`, with `did` and `rev` equal to the event's. The returned commit's `data` is
/// the repo's current MST root and `rev` its current revision.
pub fn verify_sync(
    sync: &SyncEvent,
    key: &PublicKey,
    opts: &VerifyOptions,
) -> Result<SignedCommit, VerifyError> {
    if sync.blocks.len() > MAX_BLOCKS_BYTES {
        return Err(VerifyError::BlocksTooLarge(sync.blocks.len()));
    }
    let blocks = CarBlocks::parse(&sync.blocks)?;
    if blocks.roots.len() != 1 {
        return Err(VerifyError::CarRootCount(blocks.roots.len()));
    }
    let root = blocks.roots[0];
    verify_signed_commit(&blocks, &root, &sync.did, &sync.rev, key, opts)
}
