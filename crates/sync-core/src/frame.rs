//! Firehose frame decoding: `[header {op, t}][body]` DAG-CBOR bytes into typed [`Event`]s.
//!
//! A frame that cannot be decoded is a [`FrameError`]; an op inside a good commit that cannot be
//! used is an [`OpError`] for that op only. Nothing here panics on hostile input (fuzzed).

use ipld_core::cid::Cid;
use serde::Deserialize;

use crate::car::{CarBlocks, CarError};
use crate::cbor::{self, CborError};
use crate::ids::{Did, IdError, Nsid, RecordKey, Seq, Tid};

/// Largest frame accepted from the wire (atproto event-stream limit).
pub const MAX_FRAME_BYTES: usize = 5 * 1024 * 1024;
/// Largest `blocks` CAR of one commit (lexicon `maxLength`), also applied to `#sync` blocks (whose
/// lexicon `maxLength` is 10,000: a `#sync` CAR holds just the signed commit block).
pub const MAX_BLOCKS_BYTES: usize = 2_000_000;
/// Largest record block (atproto record size limit).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Most ops in one commit (lexicon `maxLength`).
pub const MAX_OPS: usize = 200;

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("bad frame header: {0}")]
    Header(String),
    #[error("unknown frame op {0}")]
    UnknownOp(i64),
    #[error("bad {kind} body: {reason}")]
    Body { kind: &'static str, reason: String },
    #[error("invalid identifier in {kind} body: {source}")]
    Id {
        kind: &'static str,
        #[source]
        source: IdError,
    },
    #[error("blocks CAR of {0} bytes exceeds the {MAX_BLOCKS_BYTES}-byte limit")]
    BlocksTooLarge(usize),
    /// The count is exact: the excess ops are counted (skipped unread), never collected.
    #[error("commit has {0} ops, more than {MAX_OPS}")]
    TooManyOps(usize),
    #[error("bad commit CAR: {0}")]
    Car(#[from] CarError),
}

impl FrameError {
    /// Short stable label for metrics (`drops{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge(_) => "frame_too_large",
            FrameError::Header(_) => "bad_header",
            FrameError::UnknownOp(_) => "unknown_op",
            FrameError::Body { .. } => "bad_body",
            FrameError::Id { .. } => "bad_identifier",
            FrameError::BlocksTooLarge(_) => "blocks_too_large",
            FrameError::TooManyOps(_) => "too_many_ops",
            FrameError::Car(_) => "bad_car",
        }
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum OpError {
    #[error("unknown op action {0:?}")]
    Action(String),
    #[error("bad op path {path:?}: {source}")]
    Path {
        path: String,
        #[source]
        source: IdError,
    },
    #[error("op path {0:?} is not collection/rkey")]
    PathShape(String),
    #[error("{0} op without a cid")]
    MissingCid(&'static str),
    /// A record CID that is not CIDv1 + DAG-CBOR + SHA2-256 (see [`cbor::is_atproto_record_cid`]).
    #[error("record CID {0} is not a CIDv1 DAG-CBOR SHA2-256 link")]
    BadCid(Cid),
    #[error("record block {0} is not in the commit")]
    MissingBlock(String),
    #[error("record block of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    RecordTooLarge(usize),
    #[error("record block: {0}")]
    Block(#[from] CborError),
    #[error("op field `{0}` is missing or has the wrong type")]
    Field(&'static str),
    #[error("op is not a map")]
    NotAMap,
}

impl OpError {
    pub fn reason(&self) -> &'static str {
        match self {
            OpError::Action(_) => "bad_action",
            OpError::Path { .. } | OpError::PathShape(_) => "bad_path",
            OpError::MissingCid(_) => "missing_cid",
            OpError::BadCid(_) => "bad_cid",
            OpError::MissingBlock(_) => "missing_block",
            OpError::RecordTooLarge(_) => "record_too_large",
            OpError::Block(CborError::HashMismatch(_)) => "cid_mismatch",
            OpError::Block(_) => "bad_record",
            OpError::Field(_) | OpError::NotAMap => "bad_op",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

/// One validated repo operation of a commit.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoOp {
    pub action: Action,
    pub collection: Nsid,
    pub rkey: RecordKey,
    /// The new record's CID (create/update); `None` for deletes.
    pub cid: Option<Cid>,
    pub prev: Option<Cid>,
}

/// A `#commit` event. Record blocks are borrowed from the frame bytes.
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    pub seq: Seq,
    pub repo: Did,
    pub rev: Tid,
    pub since: Option<&'a str>,
    pub commit: Cid,
    /// `prevData`: the MST root of the repo's previous commit (the one `since` names), which lets a
    /// verifier check the commit inductively. `None` (null or absent) on legacy commits.
    pub prev_data: Option<Cid>,
    pub time: &'a str,
    /// Ops in commit order; a malformed op is an error for that op only.
    pub ops: Vec<Result<RepoOp, OpError>>,
    /// The `blocks` CAR, indexed.
    pub blocks: CarBlocks<'a>,
    /// The `blocks` CAR exactly as sent (at most [`MAX_BLOCKS_BYTES`]), for consumers that need
    /// the bytes themselves (e.g. to hand them on, or to re-read them).
    pub blocks_bytes: &'a [u8],
    /// CIDs whose block was already hash-checked: many ops may point at one block, and a hostile
    /// commit must not make us hash the same megabyte 200 times.
    verified: std::cell::RefCell<Vec<Cid>>,
}

impl<'a> Commit<'a> {
    /// A commit assembled by the caller rather than decoded from a frame: records read from a
    /// repo (a resync or backfill) routed exactly as if they had streamed past. It has no CAR
    /// bytes (`blocks_bytes` is empty) and is not verifiable as a commit; its record blocks are
    /// still hash-checked when read.
    #[allow(clippy::too_many_arguments)]
    pub fn assembled(
        seq: Seq,
        repo: Did,
        rev: Tid,
        commit: Cid,
        time: &'a str,
        ops: Vec<RepoOp>,
        blocks: CarBlocks<'a>,
    ) -> Commit<'a> {
        Commit {
            seq,
            repo,
            rev,
            since: None,
            commit,
            prev_data: None,
            time,
            ops: ops.into_iter().map(Ok).collect(),
            blocks,
            blocks_bytes: &[],
            verified: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// The record block of a create/update op, hash-checked against `op.cid`; `None` for deletes.
    /// A `cid` that is not an atproto record CID is [`OpError::BadCid`] (checked before lookup).
    pub fn record_block(&self, op: &RepoOp) -> Result<Option<&'a [u8]>, OpError> {
        let block = self.record_block_unhashed(op)?;
        if let (Some(cid), Some(block)) = (&op.cid, block) {
            if !self.verified.borrow().contains(cid) {
                cbor::verify_block(cid, block)?;
                self.verified.borrow_mut().push(*cid);
            }
        }
        Ok(block)
    }

    /// [`Commit::record_block`] without the hash check, for a caller that only peeks at the
    /// record to decide whether it wants it, and calls [`Commit::record_block`] before it keeps
    /// anything derived from it (most records of the firehose are read for a decision and
    /// dropped: hashing them all was a quarter of the writer's routing time, BENCHMARKS.md).
    pub fn record_block_unhashed(&self, op: &RepoOp) -> Result<Option<&'a [u8]>, OpError> {
        let Some(cid) = &op.cid else {
            return match op.action {
                Action::Delete => Ok(None),
                Action::Create => Err(OpError::MissingCid("create")),
                Action::Update => Err(OpError::MissingCid("update")),
            };
        };
        if op.action == Action::Delete {
            return Ok(None);
        }
        if !cbor::is_atproto_record_cid(cid) {
            return Err(OpError::BadCid(*cid));
        }
        let block = self
            .blocks
            .get(cid)
            .ok_or_else(|| OpError::MissingBlock(cid.to_string()))?;
        if block.len() > MAX_RECORD_BYTES {
            return Err(OpError::RecordTooLarge(block.len()));
        }
        Ok(Some(block))
    }

    /// The record of a create/update op in the atproto JSON data model; `None` for deletes.
    pub fn record_json(&self, op: &RepoOp) -> Result<Option<serde_json::Value>, OpError> {
        match self.record_block(op)? {
            Some(block) => Ok(Some(cbor::decode_to_json(block)?)),
            None => Ok(None),
        }
    }
}

/// A `#sync` event: the repo's current state, no ops.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncEvent {
    pub seq: Seq,
    pub did: Did,
    pub rev: Tid,
    pub time: String,
    /// The CAR holding the signed commit block (its CID is the first root), as sent; required by
    /// the lexicon, at most [`MAX_BLOCKS_BYTES`]. Owned: `#sync` is rare, and this keeps the event
    /// free of the frame's lifetime. Not parsed here: a verifier reads it.
    pub blocks: Vec<u8>,
}

/// An `#identity` event (handle or DID document changed).
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityEvent {
    pub seq: Seq,
    pub did: Did,
    pub time: String,
    /// As sent; informational only, never used in a path.
    pub handle: Option<String>,
}

/// An `#account` event (activated, deactivated, deleted, taken down...).
#[derive(Debug, Clone, PartialEq)]
pub struct AccountEvent {
    pub seq: Seq,
    pub did: Did,
    pub time: String,
    pub active: bool,
    pub status: Option<String>,
}

/// An `#info` message (e.g. `OutdatedCursor`).
#[derive(Debug, Clone, PartialEq)]
pub struct InfoEvent {
    pub name: String,
    pub message: Option<String>,
}

/// An error frame (`op = -1`); the server closes the connection after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFrame {
    pub error: String,
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Skipped {
    /// `#handle`, `#migrate`, `#tombstone`: superseded by `#identity` / `#account`.
    Deprecated(String),
    /// A message type this build does not know.
    Unknown(String),
}

// A commit (two CIDs inline, ~380 bytes) dwarfs the other variants; an event is built once per
// frame and consumed at once, so boxing it would only add an allocation per commit.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Event<'a> {
    Commit(Commit<'a>),
    Sync(SyncEvent),
    Identity(IdentityEvent),
    Account(AccountEvent),
    Info(InfoEvent),
    Error(ErrorFrame),
    /// A message that is counted and skipped; `seq` is read when the body has one, so the
    /// cursor can still move past it.
    Skipped {
        kind: Skipped,
        seq: Option<Seq>,
    },
}

impl Event<'_> {
    pub fn seq(&self) -> Option<Seq> {
        match self {
            Event::Commit(c) => Some(c.seq),
            Event::Sync(s) => Some(s.seq),
            Event::Identity(i) => Some(i.seq),
            Event::Account(a) => Some(a.seq),
            Event::Skipped { seq, .. } => *seq,
            Event::Info(_) | Event::Error(_) => None,
        }
    }

    /// Stable label for metrics (`events{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Commit(_) => "commit",
            Event::Sync(_) => "sync",
            Event::Identity(_) => "identity",
            Event::Account(_) => "account",
            Event::Info(_) => "info",
            Event::Error(_) => "error",
            Event::Skipped {
                kind: Skipped::Deprecated(_),
                ..
            } => "deprecated",
            Event::Skipped {
                kind: Skipped::Unknown(_),
                ..
            } => "unknown",
        }
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    op: i64,
    #[serde(borrow, default)]
    t: Option<&'a str>,
}

#[derive(Deserialize)]
struct RawCommit<'a> {
    seq: i64,
    #[serde(borrow)]
    repo: &'a str,
    #[serde(borrow)]
    rev: &'a str,
    #[serde(borrow, default)]
    since: Option<&'a str>,
    commit: Cid,
    #[serde(default, rename = "prevData")]
    prev_data: Option<Cid>,
    #[serde(borrow)]
    blocks: &'a [u8],
    #[serde(borrow)]
    ops: RawOps<'a>,
    #[serde(borrow)]
    time: &'a str,
    // Every other field (`blobs`, `rebase`, `tooBig`, `prev`, ...) is skipped by serde as
    // `IgnoredAny`, which walks the CBOR without allocating, however long a list it holds.
}

/// A commit's `ops`, bounded while decoding: a list longer than [`MAX_OPS`] is counted and skipped
/// unread, so a 5 MiB frame of millions of one-byte "ops" costs no memory per op (collecting them
/// first, as a `Vec`, cost ~2 GB).
enum RawOps<'a> {
    Ops(Vec<RawOp<'a>>),
    TooMany(usize),
}

impl<'de: 'a, 'a> Deserialize<'de> for RawOps<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = RawOps<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of repo ops")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawOps<'a>, A::Error> {
                // DAG-CBOR lists have a definite length, so the hint is the exact count.
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX_OPS {
                    return cbor::skip_rest(seq, 0).map(RawOps::TooMany);
                }
                let mut ops = Vec::with_capacity(hint);
                while let Some(op) = seq.next_element::<RawOp<'a>>()? {
                    if ops.len() == MAX_OPS {
                        return cbor::skip_rest(seq, MAX_OPS + 1).map(RawOps::TooMany);
                    }
                    ops.push(op);
                }
                Ok(RawOps::Ops(ops))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// One entry of a commit's `ops`. Read leniently: a field of the wrong type fails this op (an
/// [`OpError`]), not the frame, so the other ops of the commit are still captured. The CBOR
/// itself must still be well formed; malformed bytes are a frame error.
struct RawOp<'a>(Result<RawOpFields<'a>, OpError>);

struct RawOpFields<'a> {
    action: &'a str,
    path: &'a str,
    cid: Option<Cid>,
    prev: Option<Cid>,
}

/// An op field's value, as far as op parsing cares.
enum Loose<'a> {
    Str(&'a str),
    Link(Cid),
    Null,
    /// Any other type (or a CID whose bytes do not parse): the op fails.
    Other,
}

/// Generates the visitor methods of values that are neither strings, links, nulls nor maps.
macro_rules! visit_other {
    ($other:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($other)
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Loose<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an op field")
            }
            visit_other!(Loose::Other);
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(v))
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Loose<'a>, E> {
                // Frames are decoded from a slice, so strings always borrow; be safe anyway.
                Ok(Loose::Other)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Loose<'a>, E> {
                Ok(Loose::Null)
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Loose<'a>, E> {
                Ok(Loose::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Loose<'a>, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_newtype_struct<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Loose<'a>, D::Error> {
                // serde_ipld_dagcbor hands a tag-42 link over as a newtype of its bytes.
                let bytes = <&'de [u8]>::deserialize(d)?;
                Ok(Cid::try_from(bytes).map_or(Loose::Other, Loose::Link))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Loose<'a>, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Loose::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawOp<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = RawOp<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a repo op")
            }
            visit_other!(RawOp(Err(OpError::NotAMap)));
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<RawOp<'a>, E> {
                Ok(RawOp(Err(OpError::NotAMap)))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<RawOp<'a>, E> {
                Ok(RawOp(Err(OpError::NotAMap)))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<RawOp<'a>, E> {
                Ok(RawOp(Err(OpError::NotAMap)))
            }
            fn visit_newtype_struct<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<RawOp<'a>, D::Error> {
                <&'de [u8]>::deserialize(d)?;
                Ok(RawOp(Err(OpError::NotAMap)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawOp<'a>, A::Error> {
                let (mut action, mut path) = (None, None);
                let (mut cid, mut prev) = (Loose::Null, Loose::Null);
                while let Some(key) = map.next_key::<&'de str>()? {
                    match key {
                        "action" => action = Some(map.next_value::<Loose<'a>>()?),
                        "path" => path = Some(map.next_value::<Loose<'a>>()?),
                        "cid" => cid = map.next_value::<Loose<'a>>()?,
                        "prev" => prev = map.next_value::<Loose<'a>>()?,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                let text = |v: Option<Loose<'a>>, field| match v {
                    Some(Loose::Str(s)) => Ok(s),
                    _ => Err(OpError::Field(field)),
                };
                let link = |v: Loose<'a>, field| match v {
                    Loose::Link(c) => Ok(Some(c)),
                    Loose::Null => Ok(None),
                    _ => Err(OpError::Field(field)),
                };
                let fields = (|| {
                    Ok(RawOpFields {
                        action: text(action, "action")?,
                        path: text(path, "path")?,
                        cid: link(cid, "cid")?,
                        prev: link(prev, "prev")?,
                    })
                })();
                Ok(RawOp(fields))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawSync<'a> {
    seq: i64,
    #[serde(borrow)]
    did: &'a str,
    #[serde(borrow)]
    rev: &'a str,
    #[serde(borrow)]
    time: &'a str,
    #[serde(borrow)]
    blocks: &'a [u8],
}

#[derive(Deserialize)]
struct RawIdentity<'a> {
    seq: i64,
    #[serde(borrow)]
    did: &'a str,
    #[serde(borrow)]
    time: &'a str,
    #[serde(default)]
    handle: Option<String>,
}

#[derive(Deserialize)]
struct RawAccount<'a> {
    seq: i64,
    #[serde(borrow)]
    did: &'a str,
    #[serde(borrow)]
    time: &'a str,
    active: bool,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct RawInfo {
    name: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    error: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct SeqOnly {
    #[serde(default)]
    seq: Option<i64>,
}

fn body<'a, T: Deserialize<'a>>(kind: &'static str, bytes: &'a [u8]) -> Result<T, FrameError> {
    serde_ipld_dagcbor::from_slice(bytes).map_err(|e| FrameError::Body {
        kind,
        reason: e.to_string(),
    })
}

fn id<T>(kind: &'static str, r: Result<T, IdError>) -> Result<T, FrameError> {
    r.map_err(|source| FrameError::Id { kind, source })
}

fn parse_op(raw: RawOp<'_>) -> Result<RepoOp, OpError> {
    let raw = raw.0?;
    let action = match raw.action {
        "create" => Action::Create,
        "update" => Action::Update,
        "delete" => Action::Delete,
        other => return Err(OpError::Action(other.chars().take(32).collect())),
    };
    let Some((collection, rkey)) = raw.path.split_once('/') else {
        return Err(OpError::PathShape(raw.path.chars().take(128).collect()));
    };
    let path_err = |source| OpError::Path {
        path: raw.path.chars().take(128).collect(),
        source,
    };
    Ok(RepoOp {
        action,
        collection: Nsid::parse(collection).map_err(path_err)?,
        rkey: RecordKey::parse(rkey).map_err(path_err)?,
        cid: raw.cid,
        prev: raw.prev,
    })
}

/// The `seq` of a frame's body, if it has one, without decoding the rest (cheap: the body's
/// other fields are skipped, not parsed).
pub fn frame_seq(frame: &[u8]) -> Option<i64> {
    let end = cbor::skip_item(frame, 0).ok()?;
    seq_of(frame.get(end..)?).map(|s| s.0)
}

/// The `repo` of a `#commit` message without decoding the rest (one pass over the body's map
/// that skips the other values, their nesting bounded): what decides whether a commit is worth
/// decoding in full. `None` for any other message and for a body that is not one map with a
/// text `repo`; a commit named here may still fail [`decode_frame`] (which says why).
pub fn commit_repo(frame: &[u8]) -> Option<&str> {
    if frame.len() > MAX_FRAME_BYTES {
        return None;
    }
    let (header, body) = split_header(frame).ok()?;
    if header.op != 1 || header.t != Some("#commit") {
        return None;
    }
    cbor::map_text_value(body, "repo").ok().flatten()
}

/// True when the message is an error frame (`op = -1`); reads only the header.
pub fn is_error_frame(frame: &[u8]) -> bool {
    split_header(frame).is_ok_and(|(h, _)| h.op == -1)
}

/// A message's header, decoded, and the bytes of its body (not checked here).
fn split_header(frame: &[u8]) -> Result<(Header<'_>, &[u8]), FrameError> {
    let end = cbor::skip_item(frame, 0).map_err(|e| FrameError::Header(e.to_string()))?;
    let header = serde_ipld_dagcbor::from_slice(&frame[..end])
        .map_err(|e| FrameError::Header(e.to_string()))?;
    Ok((header, &frame[end..]))
}

/// Decodes one binary WebSocket message of `com.atproto.sync.subscribeRepos`.
pub fn decode_frame(frame: &[u8]) -> Result<Event<'_>, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(frame.len()));
    }
    let (header, body_bytes) = split_header(frame)?;
    // Bounds nesting before serde's recursive decoder runs, and rejects trailing garbage.
    match cbor::skip_item(body_bytes, 0) {
        Ok(end) if end == body_bytes.len() => {}
        Ok(_) => {
            return Err(FrameError::Body {
                kind: "frame",
                reason: "trailing bytes after body".into(),
            })
        }
        Err(e) => {
            return Err(FrameError::Body {
                kind: "frame",
                reason: e.to_string(),
            })
        }
    }
    match header.op {
        1 => {}
        -1 => {
            let raw: RawError = body("error", body_bytes)?;
            return Ok(Event::Error(ErrorFrame {
                error: raw.error,
                message: raw.message,
            }));
        }
        other => return Err(FrameError::UnknownOp(other)),
    }
    let t = header
        .t
        .ok_or_else(|| FrameError::Header("message frame without t".into()))?;
    match t {
        "#commit" => decode_commit(body_bytes).map(Event::Commit),
        "#sync" => {
            let raw: RawSync<'_> = body("sync", body_bytes)?;
            if raw.blocks.len() > MAX_BLOCKS_BYTES {
                return Err(FrameError::BlocksTooLarge(raw.blocks.len()));
            }
            Ok(Event::Sync(SyncEvent {
                seq: Seq(raw.seq),
                did: id("sync", Did::parse(raw.did))?,
                rev: id("sync", Tid::parse(raw.rev))?,
                time: raw.time.to_owned(),
                blocks: raw.blocks.to_vec(),
            }))
        }
        "#identity" => {
            let raw: RawIdentity<'_> = body("identity", body_bytes)?;
            Ok(Event::Identity(IdentityEvent {
                seq: Seq(raw.seq),
                did: id("identity", Did::parse(raw.did))?,
                time: raw.time.to_owned(),
                handle: raw.handle,
            }))
        }
        "#account" => {
            let raw: RawAccount<'_> = body("account", body_bytes)?;
            Ok(Event::Account(AccountEvent {
                seq: Seq(raw.seq),
                did: id("account", Did::parse(raw.did))?,
                time: raw.time.to_owned(),
                active: raw.active,
                status: raw.status,
            }))
        }
        "#info" => {
            let raw: RawInfo = body("info", body_bytes)?;
            Ok(Event::Info(InfoEvent {
                name: raw.name,
                message: raw.message,
            }))
        }
        "#handle" | "#migrate" | "#tombstone" => Ok(Event::Skipped {
            kind: Skipped::Deprecated(t.to_owned()),
            seq: seq_of(body_bytes),
        }),
        other => Ok(Event::Skipped {
            kind: Skipped::Unknown(other.chars().take(64).collect()),
            seq: seq_of(body_bytes),
        }),
    }
}

fn seq_of(body_bytes: &[u8]) -> Option<Seq> {
    serde_ipld_dagcbor::from_slice::<SeqOnly>(body_bytes)
        .ok()
        .and_then(|s| s.seq)
        .map(Seq)
}

fn decode_commit(body_bytes: &[u8]) -> Result<Commit<'_>, FrameError> {
    let raw: RawCommit<'_> = body("commit", body_bytes)?;
    if raw.blocks.len() > MAX_BLOCKS_BYTES {
        return Err(FrameError::BlocksTooLarge(raw.blocks.len()));
    }
    let ops = match raw.ops {
        RawOps::Ops(ops) => ops,
        RawOps::TooMany(n) => return Err(FrameError::TooManyOps(n)),
    };
    let blocks = CarBlocks::parse(raw.blocks)?;
    Ok(Commit {
        seq: Seq(raw.seq),
        repo: id("commit", Did::parse(raw.repo))?,
        rev: id("commit", Tid::parse(raw.rev))?,
        since: raw.since,
        commit: raw.commit,
        prev_data: raw.prev_data,
        time: raw.time,
        ops: ops.into_iter().map(parse_op).collect(),
        blocks,
        blocks_bytes: raw.blocks,
        verified: std::cell::RefCell::new(Vec::new()),
    })
}

/// Iterates the frames of a capture file: `[u32 little-endian length][frame]...`.
/// Yields an error (and stops) on a truncated length or frame.
pub fn capture_frames(data: &[u8]) -> impl Iterator<Item = Result<&[u8], CaptureError>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= data.len() {
            return None;
        }
        let Some(len_bytes) = data.get(pos..pos + 4) else {
            let at = pos;
            pos = data.len();
            return Some(Err(CaptureError { offset: at }));
        };
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let start = pos + 4;
        match data.get(start..start + len) {
            Some(frame) => {
                pos = start + len;
                Some(Ok(frame))
            }
            None => {
                let at = pos;
                pos = data.len();
                Some(Err(CaptureError { offset: at }))
            }
        }
    })
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("truncated capture record at byte offset {offset}")]
pub struct CaptureError {
    pub offset: usize,
}
