//! Whole repositories (`com.atproto.sync.getRepo` CAR files): read from a byte slice or pushed in
//! chunks as they arrive, every block hash-checked, the signed commit verified, and every record
//! listed `(collection, rkey, cid)` by walking the MST in key order.
//!
//! The reader is sans-I/O: the caller moves bytes (an HTTP body, a file, a test vector) and this
//! module only parses them, so it works the same on a stream, on chunks or on a slice. Callers
//! that already iterate a CAR's blocks (for instance with `iroh-car` over an async body) can feed
//! blocks directly with [`RepoReader::push_block`].

use std::collections::HashMap;

use ipld_core::cid::Cid;
use serde::Deserialize;

use crate::cbor::{self, CborError};
use crate::crypto::PublicKey;
use crate::ids::{Did, Nsid, RecordKey};
use crate::mst::{self, MstError};
use crate::verify::{verify_commit_block, SignedCommit, VerifyError, VerifyOptions};

/// Largest single CAR section (CID + block): records are at most 1 MiB, MST nodes far smaller.
pub const MAX_SECTION_BYTES: usize = 2 * 1024 * 1024;

/// Default cap on a whole repo CAR (the writer makes it configurable).
pub const DEFAULT_MAX_REPO_BYTES: u64 = 1 << 30;

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum RepoError {
    #[error("repo CAR exceeds the {0}-byte limit")]
    TooLarge(u64),
    #[error("CAR section of {0} bytes exceeds the {MAX_SECTION_BYTES}-byte limit")]
    SectionTooLarge(u64),
    #[error("bad varint at byte {0}")]
    Varint(u64),
    #[error("bad CAR header: {0}")]
    Header(String),
    #[error("CAR has {0} roots, expected exactly one (the commit)")]
    Roots(usize),
    #[error("bad CID in CAR section at byte {0}: {1}")]
    Cid(u64, String),
    #[error("block {cid}: {source}")]
    Block {
        cid: String,
        #[source]
        source: CborError,
    },
    #[error("CAR ends inside a section (truncated download?)")]
    Truncated,
    #[error("commit: {0}")]
    Commit(#[from] VerifyError),
    #[error("MST: {0}")]
    Mst(Box<MstError>),
    #[error("record {path} ({cid}) is not in the CAR")]
    MissingRecord { path: String, cid: String },
    #[error("record {path} has CID {cid}, not an atproto record CID")]
    RecordCid { path: String, cid: String },
}

impl RepoError {
    /// Short stable label for metrics (`resync_failures{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            RepoError::TooLarge(_) => "repo_too_large",
            RepoError::SectionTooLarge(_) => "block_too_large",
            RepoError::Varint(_)
            | RepoError::Header(_)
            | RepoError::Roots(_)
            | RepoError::Cid(..)
            | RepoError::Truncated => "bad_car",
            RepoError::Block { source, .. } => match source {
                CborError::HashMismatch(_) => "block_hash_mismatch",
                _ => "bad_block",
            },
            RepoError::Commit(e) => e.reason(),
            RepoError::Mst(e) if matches!(**e, MstError::MissingBlock(_)) => "missing_blocks",
            RepoError::Mst(_) => "bad_mst",
            RepoError::MissingRecord { .. } => "missing_record",
            RepoError::RecordCid { .. } => "bad_cid",
        }
    }
}

/// One record of a repo, by path and content address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoRecord {
    pub collection: Nsid,
    pub rkey: RecordKey,
    pub cid: Cid,
}

/// Where a block's bytes are in a [`BlockStore`].
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    chunk: u32,
    start: u32,
    len: u32,
}

/// The blocks of a repo: bytes packed into 1 MiB chunks, indexed by SHA-256 digest.
///
/// Every block a repo can use (commit, MST nodes, records) is DAG-CBOR addressed by SHA-256, so the
/// 32-byte digest is the whole key. Per block this costs the bytes plus ~50 bytes of index, where
/// a map of `Cid -> Vec<u8>` costs ~200 (a CAR of tiny blocks would otherwise take ~9x its size),
/// and growing chunk by chunk never copies what is already stored.
#[derive(Debug, Clone, Default)]
struct BlockStore {
    chunks: Vec<Vec<u8>>,
    index: HashMap<[u8; 32], BlockRef>,
    bytes: usize,
}

const CHUNK_BYTES: usize = 1 << 20;

/// The SHA-256 digest a DAG-CBOR CID addresses, or `None` for any other kind of CID.
fn dag_cbor_digest(cid: &Cid) -> Option<[u8; 32]> {
    if cid.codec() != cbor::DAG_CBOR || cid.hash().code() != cbor::SHA2_256 {
        return None;
    }
    cid.hash().digest().try_into().ok()
}

impl BlockStore {
    fn insert(&mut self, digest: [u8; 32], block: &[u8]) {
        if self.index.contains_key(&digest) {
            return;
        }
        let fits = self
            .chunks
            .last()
            .is_some_and(|c| c.capacity() - c.len() >= block.len());
        if !fits {
            self.chunks
                .push(Vec::with_capacity(CHUNK_BYTES.max(block.len())));
        }
        let chunk = self.chunks.len() - 1;
        let data = &mut self.chunks[chunk];
        let start = data.len();
        data.extend_from_slice(block);
        self.bytes += block.len();
        // Blocks are at most MAX_SECTION_BYTES and chunks at most that or 1 MiB: all fit in u32.
        self.index.insert(
            digest,
            BlockRef {
                chunk: chunk as u32,
                start: start as u32,
                len: block.len() as u32,
            },
        );
    }

    fn get(&self, cid: &Cid) -> Option<&[u8]> {
        let at = self.index.get(&dag_cbor_digest(cid)?)?;
        let start = at.start as usize;
        self.chunks
            .get(at.chunk as usize)?
            .get(start..start + at.len as usize)
    }

    fn contains(&self, cid: &Cid) -> bool {
        dag_cbor_digest(cid).is_some_and(|d| self.index.contains_key(&d))
    }
}

impl mst::BlockSource for BlockStore {
    fn block(&self, cid: &Cid) -> Option<&[u8]> {
        self.get(cid)
    }
}

/// A repo that passed every check: signed commit by the expected key, MST complete and
/// well-formed, every record present and hash-checked.
#[derive(Debug, Clone)]
pub struct VerifiedRepo {
    pub commit: SignedCommit,
    /// False only for [`RepoReader::finish_unsigned`].
    pub signature_checked: bool,
    /// Every record, in MST key order.
    pub records: Vec<RepoRecord>,
    /// MST keys that are not `collection/rkey` with a valid NSID and record key: listed, not
    /// fatal, so one odd key does not cost the rest of the repo.
    pub invalid_keys: Vec<String>,
    /// Record blocks (MST nodes and the commit are dropped after the walk).
    blocks: BlockStore,
}

impl VerifiedRepo {
    /// The record's DAG-CBOR bytes (already hash-checked).
    pub fn record_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.blocks.get(cid)
    }

    /// The record in the atproto JSON data model.
    pub fn record_json(&self, record: &RepoRecord) -> Result<serde_json::Value, CborError> {
        let block = self
            .record_block(&record.cid)
            .ok_or_else(|| CborError::Decode(format!("record block {} is absent", record.cid)))?;
        cbor::decode_to_json(block)
    }

    /// Bytes held for record blocks.
    pub fn block_bytes(&self) -> usize {
        self.blocks.bytes
    }
}

#[derive(Deserialize)]
struct CarHeader {
    version: u64,
    #[serde(default)]
    roots: Vec<Cid>,
}

/// Reads a repo CAR pushed in chunks of any size. Memory is the repo's blocks (each checked as
/// it arrives) plus at most one partial section.
#[derive(Debug)]
pub struct RepoReader {
    max_bytes: u64,
    received: u64,
    /// Bytes not yet parsed (at most one incomplete section, or the header).
    pending: Vec<u8>,
    roots: Option<Vec<Cid>>,
    blocks: BlockStore,
    /// Blocks that are not DAG-CBOR/SHA-256: no repo structure can refer to them.
    ignored_blocks: u64,
}

/// A complete varint at the start of `buf`: `Ok(Some((value, length)))`, `Ok(None)` if more
/// bytes are needed.
fn varint(buf: &[u8], offset: u64) -> Result<Option<(u64, usize)>, RepoError> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 10 {
        return Err(RepoError::Varint(offset));
    }
    Ok(None)
}

impl RepoReader {
    /// A reader that refuses repos over `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        RepoReader {
            max_bytes,
            received: 0,
            pending: Vec::new(),
            roots: None,
            blocks: BlockStore::default(),
            ignored_blocks: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Feeds the next bytes of the CAR. Complete sections are parsed and hash-checked at once.
    ///
    /// Sections are parsed straight from `chunk`; only a section cut by the chunk's end is
    /// copied aside, so each block is copied once (into the repo's block map).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), RepoError> {
        let chunk_start = self.received;
        self.received += chunk.len() as u64;
        if self.received > self.max_bytes {
            return Err(RepoError::TooLarge(self.max_bytes));
        }
        let mut rest = chunk;
        // First finish the section a previous chunk left incomplete.
        while !self.pending.is_empty() && !rest.is_empty() {
            let offset = chunk_start - self.pending.len() as u64;
            match varint(&self.pending, offset)? {
                None => {
                    // Not even the length is complete: move one byte over (at most 10 times).
                    self.pending.push(rest[0]);
                    rest = &rest[1..];
                }
                Some((len, head)) => {
                    let need = self.section_end(len, head)?;
                    let take = (need - self.pending.len()).min(rest.len());
                    self.pending.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if self.pending.len() == need {
                        let section = std::mem::take(&mut self.pending);
                        self.section(&section[head..], offset)?;
                    }
                }
            }
        }
        let mut pos = 0usize;
        loop {
            let offset = chunk_start + (chunk.len() - rest.len() + pos) as u64;
            let Some((len, head)) = varint(&rest[pos..], offset)? else {
                break;
            };
            let end = pos + self.section_end(len, head)?;
            if end > rest.len() {
                break;
            }
            self.section(&rest[pos + head..end], offset)?;
            pos = end;
        }
        self.pending.extend_from_slice(&rest[pos..]);
        Ok(())
    }

    /// The length of a section (its length prefix included), within the limits.
    fn section_end(&self, len: u64, head: usize) -> Result<usize, RepoError> {
        if self.roots.is_none() && len > 64 * 1024 {
            return Err(RepoError::Header(format!("header of {len} bytes")));
        }
        if len > MAX_SECTION_BYTES as u64 {
            return Err(RepoError::SectionTooLarge(len));
        }
        Ok(head + len as usize)
    }

    /// One complete section: the header first, then `CID + block`s.
    fn section(&mut self, section: &[u8], offset: u64) -> Result<(), RepoError> {
        if self.roots.is_none() {
            self.roots = Some(parse_header(section)?);
            return Ok(());
        }
        let mut rest = section;
        let cid = Cid::read_bytes(&mut rest).map_err(|e| RepoError::Cid(offset, e.to_string()))?;
        self.insert_block(cid, rest)
    }

    /// Sets the CAR roots when the caller parsed the header itself (see [`Self::push_block`]).
    pub fn set_roots(&mut self, roots: Vec<Cid>) {
        self.roots = Some(roots);
    }

    /// Adds one block whose CAR section the caller already split (for instance with `iroh-car`).
    pub fn push_block(&mut self, cid: Cid, block: Vec<u8>) -> Result<(), RepoError> {
        self.received += block.len() as u64;
        if self.received > self.max_bytes {
            return Err(RepoError::TooLarge(self.max_bytes));
        }
        if block.len() > MAX_SECTION_BYTES {
            return Err(RepoError::SectionTooLarge(block.len() as u64));
        }
        self.insert_block(cid, &block)
    }

    /// Blocks skipped because their CID is not DAG-CBOR/SHA-256 (nothing in a repo can link
    /// them).
    pub fn ignored_blocks(&self) -> u64 {
        self.ignored_blocks
    }

    fn insert_block(&mut self, cid: Cid, block: &[u8]) -> Result<(), RepoError> {
        let Some(digest) = dag_cbor_digest(&cid) else {
            self.ignored_blocks += 1;
            return Ok(());
        };
        // Every block is checked as it arrives: a CID repeated with other bytes fails here
        // (its hash cannot match both), so "first wins" never decides what a repo holds.
        cbor::verify_block(&cid, block).map_err(|source| RepoError::Block {
            cid: cid.to_string(),
            source,
        })?;
        self.blocks.insert(digest, block);
        Ok(())
    }

    /// Ends the stream: verifies the signed commit (by `did`, signed with `key`, rev not in the
    /// future), walks the MST from its `data` root and lists every record.
    pub fn finish(
        self,
        did: &Did,
        key: &PublicKey,
        opts: &VerifyOptions,
    ) -> Result<VerifiedRepo, RepoError> {
        self.finish_with(did, Some(key), opts)
    }

    /// [`Self::finish`] without the signature check, for auditing a repo whose DID document is
    /// not at hand (hashes, commit structure and the MST are still checked). The result says
    /// so in [`VerifiedRepo::signature_checked`]; never use it to decide what a user published.
    pub fn finish_unsigned(
        self,
        did: &Did,
        opts: &VerifyOptions,
    ) -> Result<VerifiedRepo, RepoError> {
        self.finish_with(did, None, opts)
    }

    fn finish_with(
        self,
        did: &Did,
        key: Option<&PublicKey>,
        opts: &VerifyOptions,
    ) -> Result<VerifiedRepo, RepoError> {
        if !self.pending.is_empty() {
            return Err(RepoError::Truncated);
        }
        let roots = self.roots.ok_or(RepoError::Truncated)?;
        if roots.len() != 1 {
            return Err(RepoError::Roots(roots.len()));
        }
        let root = roots[0];
        let commit_block = self
            .blocks
            .get(&root)
            .ok_or_else(|| VerifyError::MissingCommitBlock(root.to_string()))?;
        let commit = verify_commit_block(&root, commit_block, did, None, key, opts)?;
        let blocks = self.blocks;
        let mut records = Vec::new();
        let mut invalid_keys = Vec::new();
        let mut missing: Option<RepoError> = None;
        let walked = mst::walk(commit.data, &blocks, |key: &[u8], cid: Cid| {
            let path = String::from_utf8_lossy(key);
            if !cbor::is_atproto_record_cid(&cid) {
                return Err(RepoError::RecordCid {
                    path: path.into_owned(),
                    cid: cid.to_string(),
                });
            }
            if !blocks.contains(&cid) {
                missing.get_or_insert(RepoError::MissingRecord {
                    path: path.into_owned(),
                    cid: cid.to_string(),
                });
                return Ok(());
            }
            match parse_path(&path) {
                Some((collection, rkey)) => records.push(RepoRecord {
                    collection,
                    rkey,
                    cid,
                }),
                None => invalid_keys.push(path.into_owned()),
            }
            Ok(())
        });
        match walked {
            Ok(()) => {}
            Err(mst::WalkError::Mst(e)) => return Err(RepoError::Mst(Box::new(e))),
            Err(mst::WalkError::Visit(e)) => return Err(e),
        }
        if let Some(e) = missing {
            return Err(e);
        }
        // Keep only the records' bytes: the tree and the commit are done with.
        let mut kept = BlockStore::default();
        for record in &records {
            if let (Some(digest), Some(block)) =
                (dag_cbor_digest(&record.cid), blocks.get(&record.cid))
            {
                kept.insert(digest, block);
            }
        }
        drop(blocks);
        let blocks = kept;
        Ok(VerifiedRepo {
            commit,
            signature_checked: key.is_some(),
            records,
            invalid_keys,
            blocks,
        })
    }
}

fn parse_header(bytes: &[u8]) -> Result<Vec<Cid>, RepoError> {
    cbor::check_depth(bytes).map_err(|e| RepoError::Header(e.to_string()))?;
    let header: CarHeader =
        serde_ipld_dagcbor::from_slice(bytes).map_err(|e| RepoError::Header(e.to_string()))?;
    if header.version != 1 {
        return Err(RepoError::Header(format!(
            "version {}, expected 1",
            header.version
        )));
    }
    Ok(header.roots)
}

fn parse_path(path: &str) -> Option<(Nsid, RecordKey)> {
    let (collection, rkey) = path.split_once('/')?;
    Some((Nsid::parse(collection).ok()?, RecordKey::parse(rkey).ok()?))
}

/// Reads and verifies a whole repo CAR held in memory.
pub fn read_repo(
    car: &[u8],
    did: &Did,
    key: &PublicKey,
    opts: &VerifyOptions,
    max_bytes: u64,
) -> Result<VerifiedRepo, RepoError> {
    let mut reader = RepoReader::new(max_bytes);
    reader.push(car)?;
    reader.finish(did, key, opts)
}
