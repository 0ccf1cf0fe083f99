//! Merkle Search Tree (atproto repository v3): key heights, the node codec, a partial in-memory
//! tree for inverting commits, and a bounded whole-tree walk.
//!
//! Shape rules (atproto repository spec, MST section): a key's height is the number of leading
//! zero bits of SHA-256(key) divided by two (fanout 4); a node holds the keys of one height in
//! ascending order, with lower subtrees between them; the shape depends only on the key set, so
//! the root CID depends only on the key/value set. A node may have no entries and only a left
//! subtree ("empty intermediate node"), except at the top; the only node with neither is the root
//! of an empty tree.
//!
//! Limits: keys are 1..=[`MAX_KEY_LEN`] bytes (any bytes: repo path syntax is checked where ops
//! are decoded, not here). Trees higher than [`MAX_HEIGHT`] are rejected, which bounds every
//! recursion in this module (heights strictly decrease towards the leaves): a key of that height
//! needs 128 leading zero bits of SHA-256, which no real key has.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use ipld_core::cid::multihash::Multihash;
use ipld_core::cid::Cid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::car::CarBlocks;
use crate::cbor::{self, CborError, DAG_CBOR, SHA2_256};

/// Longest key accepted (indigo's limit; repo paths are at most 317 + 1 + 512 bytes).
pub const MAX_KEY_LEN: usize = 1024;
/// Highest tree accepted; bounds recursion depth (see the module docs).
pub const MAX_HEIGHT: u32 = 64;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum MstError {
    #[error("MST node {0} is not available")]
    MissingBlock(Cid),
    #[error("MST node block does not hash to its CID {0}")]
    HashMismatch(Cid),
    #[error("MST link {0} is not a DAG-CBOR SHA2-256 CIDv1")]
    BadLink(Cid),
    #[error("undecodable MST node: {0}")]
    BadNode(String),
    #[error("MST node is not in canonical encoding")]
    NonCanonical,
    #[error("bad MST key: {0}")]
    BadKey(&'static str),
    #[error("MST keys out of order")]
    KeyOrder,
    #[error("MST key or subtree at the wrong height")]
    HeightMismatch,
    #[error("empty MST node where one is not allowed")]
    EmptyNode,
    #[error("MST height {0} exceeds {MAX_HEIGHT}")]
    TooDeep(u32),
}

impl MstError {
    /// Short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            MstError::MissingBlock(_) => "missing_block",
            MstError::HashMismatch(_) => "node_hash_mismatch",
            MstError::BadLink(_) => "bad_link",
            MstError::BadNode(_) => "bad_node",
            MstError::NonCanonical => "non_canonical_node",
            MstError::BadKey(_) => "bad_key",
            MstError::KeyOrder => "key_order",
            MstError::HeightMismatch => "height_mismatch",
            MstError::EmptyNode => "empty_node",
            MstError::TooDeep(_) => "too_deep",
        }
    }
}

/// Error of [`walk`]: the tree was bad, or the visitor stopped the walk.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum WalkError<E> {
    #[error(transparent)]
    Mst(#[from] MstError),
    #[error("walk visitor failed: {0}")]
    Visit(E),
}

/// MST key height: leading zero bits of SHA-256(key) counted in 2-bit steps (fanout 4).
pub fn key_height(key: &[u8]) -> u32 {
    // Every key of every loaded node is hashed (a commit's proof reads dozens): a key that fits
    // one SHA-256 block (repo paths nearly always do) is padded here and compressed once, without
    // the streaming hasher's buffering (MST inversion 16.4 -> 15.0 us per commit, BENCHMARKS.md).
    if key.len() <= ONE_BLOCK_KEY {
        let mut block = [0u8; 64];
        block[..key.len()].copy_from_slice(key);
        block[key.len()] = 0x80;
        block[56..].copy_from_slice(&(key.len() as u64 * 8).to_be_bytes());
        let mut state = SHA256_IV;
        sha2::compress256(&mut state, &[block.into()]);
        let mut height = 0;
        for word in state {
            if word != 0 {
                return height + word.leading_zeros() / 2;
            }
            height += 16;
        }
        return height;
    }
    let digest = Sha256::digest(key);
    let mut height = 0;
    for &b in digest.iter() {
        if b != 0 {
            return height + b.leading_zeros() / 2;
        }
        height += 4;
    }
    height
}

/// Longest message that fits one SHA-256 block with its padding (0x80 and the 8-byte length).
const ONE_BLOCK_KEY: usize = 55;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Length of the longest common prefix of `a` and `b`, in bytes.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn check_key(key: &[u8]) -> Result<(), MstError> {
    if key.is_empty() {
        return Err(MstError::BadKey("empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(MstError::BadKey("key longer than MAX_KEY_LEN"));
    }
    Ok(())
}

/// A CIDv1 DAG-CBOR SHA2-256: what every atproto writer uses for nodes and records.
fn is_standard_cid(cid: &Cid) -> bool {
    let mh = cid.hash();
    cid.version() == ipld_core::cid::Version::V1
        && cid.codec() == DAG_CBOR
        && mh.code() == SHA2_256
        && mh.size() == 32
}

/// Node links must be what [`cbor::verify_block`] can check and what writers produce.
fn check_link(cid: &Cid) -> Result<(), MstError> {
    if is_standard_cid(cid) {
        Ok(())
    } else {
        Err(MstError::BadLink(*cid))
    }
}

/// Where tree nodes come from (a commit's CAR, a whole repo's blocks, a map in tests).
pub trait BlockSource {
    /// The block addressed by `cid`, if present (not yet hash-checked: the MST code checks it).
    fn block(&self, cid: &Cid) -> Option<&[u8]>;
}

impl BlockSource for CarBlocks<'_> {
    fn block(&self, cid: &Cid) -> Option<&[u8]> {
        // A commit CAR is a handful of blocks: a scan that compares the digests' first bytes
        // before whole CIDs beats building an index.
        fn head(c: &Cid) -> Option<[u8; 8]> {
            c.hash().digest().get(..8)?.try_into().ok()
        }
        let want = head(cid);
        self.iter()
            .find(|(c, _)| head(c) == want && *c == cid)
            .map(|(_, b)| b)
    }
}

impl<S: BuildHasher> BlockSource for HashMap<Cid, Vec<u8>, S> {
    fn block(&self, cid: &Cid) -> Option<&[u8]> {
        self.get(cid).map(Vec::as_slice)
    }
}

impl<B: BlockSource + ?Sized> BlockSource for &B {
    fn block(&self, cid: &Cid) -> Option<&[u8]> {
        (**self).block(cid)
    }
}

/// Decoded MST node in wire form: `l` left subtree, `e` entries.
///
/// Fields are declared in DAG-CBOR canonical key order ("e" < "l"; "k" < "p" < "t" < "v").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeData {
    /// Entries in key order (`e`).
    #[serde(rename = "e")]
    pub entries: Vec<EntryData>,
    /// Subtree of keys before the first entry (`l`, nullable).
    #[serde(rename = "l")]
    pub left: Option<Cid>,
}

/// One entry of a [`NodeData`]: the key is the previous entry's key cut to `prefix_len` bytes
/// followed by `key_suffix` (the first entry's prefix is empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryData {
    /// Key bytes after the shared prefix (`k`).
    #[serde(rename = "k", with = "serde_bytes")]
    pub key_suffix: Vec<u8>,
    /// Bytes shared with the previous entry's key (`p`).
    #[serde(rename = "p")]
    pub prefix_len: u64,
    /// Subtree of keys between this entry and the next (`t`, nullable).
    #[serde(rename = "t")]
    pub right: Option<Cid>,
    /// The value (record CID) (`v`).
    #[serde(rename = "v")]
    pub value: Cid,
}

/// Decodes a node block strictly: it must be DAG-CBOR of exactly this shape in canonical form
/// (map keys in order, nullable fields present, shortest integer and length forms), i.e. the
/// bytes [`encode_node`] would write. Key prefixes are not checked here (that needs the
/// reconstructed keys; the tree loader and the walk do it).
pub fn decode_node(bytes: &[u8]) -> Result<NodeData, MstError> {
    let mut entries = Vec::new();
    let left = read_wire(bytes, |e| {
        entries.push(EntryData {
            key_suffix: e.suffix.to_vec(),
            prefix_len: e.prefix_len,
            right: e.right,
            value: e.value,
        });
        Ok(())
    })?;
    Ok(NodeData { entries, left })
}

/// One entry as read from its block, key suffix borrowed.
struct WireEntry<'a> {
    prefix_len: u64,
    suffix: &'a [u8],
    value: Cid,
    right: Option<Cid>,
}

/// Reads a node block, handing each entry to `on_entry` as it is read (no intermediate list);
/// returns the left link. An encoding error wins over an error `on_entry` returned earlier.
fn read_wire<'a>(
    bytes: &'a [u8],
    mut on_entry: impl FnMut(WireEntry<'a>) -> Result<(), MstError>,
) -> Result<Option<Cid>, MstError> {
    let mut entry_err = None;
    let left = Canonical { buf: bytes, pos: 0 }.node(|e| {
        if entry_err.is_none() {
            entry_err = on_entry(e).err();
        }
    });
    match (left, entry_err) {
        (Some(_), Some(e)) => Err(e),
        (Some(left), None) => Ok(left),
        // The fast reader accepts only the canonical layout; when it refuses, the general
        // decoder tells a non-canonical encoding of a node from something that is not a node.
        (None, _) => Err(match serde_ipld_dagcbor::from_slice::<NodeData>(bytes) {
            Ok(_) => MstError::NonCanonical,
            Err(e) => MstError::BadNode(e.to_string()),
        }),
    }
}

/// Reader of exactly the bytes [`encode_parts`] writes; any deviation is `None`. (The shape is
/// fixed and flat, so there is no recursion.)
struct Canonical<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Canonical<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    /// The next bytes are exactly `want` (compared as an array: no memcmp call per map key).
    fn expect<const N: usize>(&mut self, want: [u8; N]) -> Option<()> {
        let got: [u8; N] = self.take(N)?.try_into().ok()?;
        (got == want).then_some(())
    }

    /// A head of major type `major` in its shortest form; returns the argument.
    fn head(&mut self, major: u8) -> Option<u64> {
        let b = self.byte()?;
        if b >> 5 != major {
            return None;
        }
        let (arg, min) = match b & 0x1f {
            info @ 0..=23 => return Some(u64::from(info)),
            24 => (u64::from(self.byte()?), 24),
            25 => (
                u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
                0x100,
            ),
            26 => (
                u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
                0x1_0000,
            ),
            27 => (
                u64::from_be_bytes(self.take(8)?.try_into().ok()?),
                0x1_0000_0000,
            ),
            _ => return None,
        };
        (arg >= min).then_some(arg)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.head(2)?).ok()?;
        self.take(len)
    }

    fn link(&mut self) -> Option<Option<Cid>> {
        if self.buf.get(self.pos) == Some(&0xf6) {
            self.pos += 1;
            return Some(None);
        }
        self.expect([0xd8, 42])?;
        let (&prefix, raw) = self.bytes()?.split_first()?;
        if prefix != 0 {
            return None;
        }
        // Fast path: the CIDv1 DAG-CBOR SHA2-256 every atproto writer uses for nodes and records.
        if let [0x01, 0x71, 0x12, 0x20, digest @ ..] = raw {
            if digest.len() == 32 {
                let mh = Multihash::wrap(SHA2_256, digest).ok()?;
                return Some(Some(Cid::new_v1(DAG_CBOR, mh)));
            }
        }
        let mut rest = raw;
        let cid = Cid::read_bytes(&mut rest).ok()?;
        // Non-minimal varints inside the CID would re-encode shorter.
        (rest.is_empty() && cid.encoded_len() == raw.len()).then_some(Some(cid))
    }

    /// Reads the whole node; returns its left link.
    fn node(&mut self, mut on_entry: impl FnMut(WireEntry<'a>)) -> Option<Option<Cid>> {
        self.expect([0xa2, 0x61, b'e'])?;
        // A huge count fails at the end of the buffer; nothing is reserved from it.
        let n = self.head(4)?;
        for _ in 0..n {
            self.expect([0xa4, 0x61, b'k'])?;
            let suffix = self.bytes()?;
            self.expect([0x61, b'p'])?;
            let prefix_len = self.head(0)?;
            self.expect([0x61, b't'])?;
            let right = self.link()?;
            self.expect([0x61, b'v'])?;
            let value = self.link()??;
            on_entry(WireEntry {
                prefix_len,
                suffix,
                value,
                right,
            });
        }
        self.expect([0x61, b'l'])?;
        let left = self.link()?;
        (self.pos == self.buf.len()).then_some(left)
    }
}

/// Encodes a node as canonical DAG-CBOR (written by hand: the layout is fixed, and this runs for
/// every node changed by an inversion).
pub fn encode_node(node: &NodeData) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + node.entries.len() * 90);
    encode_parts(
        &mut buf,
        node.left.as_ref(),
        node.entries.iter().map(|e| RawEntry {
            prefix_len: e.prefix_len,
            suffix: &e.key_suffix,
            value: &e.value,
            right: e.right.as_ref(),
        }),
    );
    buf
}

struct RawEntry<'a> {
    prefix_len: u64,
    suffix: &'a [u8],
    value: &'a Cid,
    right: Option<&'a Cid>,
}

fn write_head(buf: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        buf.push(m | arg as u8);
    } else if arg <= u64::from(u8::MAX) {
        buf.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= u64::from(u16::MAX) {
        buf.push(m | 25);
        buf.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u64::from(u32::MAX) {
        buf.push(m | 26);
        buf.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        buf.push(m | 27);
        buf.extend_from_slice(&arg.to_be_bytes());
    }
}

/// A one-letter text key (all MST map keys are one ASCII letter).
fn write_key(buf: &mut Vec<u8>, k: u8) {
    buf.extend_from_slice(&[0x61, k]);
}

/// Tag 42 over a byte string of the multibase-identity prefix 0x00 and the binary CID.
fn write_link(buf: &mut Vec<u8>, cid: Option<&Cid>) {
    match cid {
        None => buf.push(0xf6),
        Some(cid) if is_standard_cid(cid) => {
            // The common case, without the generic varint writer.
            buf.extend_from_slice(&[0xd8, 42, 0x58, 37, 0x00, 0x01, 0x71, 0x12, 0x20]);
            buf.extend_from_slice(cid.hash().digest());
        }
        Some(cid) => {
            buf.extend_from_slice(&[0xd8, 42]);
            write_head(buf, 2, cid.encoded_len() as u64 + 1);
            buf.push(0);
            // Writing into a Vec cannot fail.
            let _ = cid.write_bytes(&mut *buf);
        }
    }
}

fn encode_parts<'a>(
    buf: &mut Vec<u8>,
    left: Option<&Cid>,
    entries: impl ExactSizeIterator<Item = RawEntry<'a>>,
) {
    buf.push(0xa2); // map of 2
    write_key(buf, b'e');
    write_head(buf, 4, entries.len() as u64);
    for e in entries {
        buf.push(0xa4); // map of 4
        write_key(buf, b'k');
        write_head(buf, 2, e.suffix.len() as u64);
        buf.extend_from_slice(e.suffix);
        write_key(buf, b'p');
        write_head(buf, 0, e.prefix_len);
        write_key(buf, b't');
        write_link(buf, e.right);
        write_key(buf, b'v');
        write_link(buf, Some(e.value));
    }
    write_key(buf, b'l');
    write_link(buf, left);
}

/// Parses and checks node `cid` on its own: hash, codec, keys rebuilt and ordered, heights
/// consistent. Its links are returned as stubs. `expected` is the height the parent implies,
/// `None` for the root (whose height is its first key's, and which may be the empty node but not
/// a bare pointer). Bounds against the neighbouring keys are the caller's business.
fn parse_node(cid: &Cid, bytes: &[u8], expected: Option<u32>) -> Result<(Node, u32), MstError> {
    cbor::verify_block(cid, bytes).map_err(|e| match e {
        CborError::HashMismatch(_) => MstError::HashMismatch(*cid),
        _ => MstError::BadLink(*cid),
    })?;
    // Most nodes hold a few entries; the vector grows for the rest.
    let mut entries: Vec<Entry> = Vec::with_capacity(8);
    let left = read_wire(bytes, |e| {
        if let Some(t) = &e.right {
            check_link(t)?;
        }
        let prev: &[u8] = entries.last().map_or(&[], |e| e.key.as_bytes());
        let p = usize::try_from(e.prefix_len)
            .ok()
            .filter(|&p| p <= prev.len())
            .ok_or(MstError::BadKey("prefix longer than the previous key"))?;
        let key = Key::new(&prev[..p], e.suffix);
        let key_bytes = key.as_bytes();
        check_key(key_bytes)?;
        // `key` and `prev` share their first `p` bytes by construction, so both checks look at
        // byte `p` only. Writers always share the longest prefix; anything else is a second
        // encoding of the same node, which would give the same key set two root CIDs.
        let (next, prev_next) = (key_bytes.get(p), prev.get(p));
        if let (Some(a), Some(b)) = (next, prev_next) {
            if a == b {
                return Err(MstError::NonCanonical);
            }
        }
        // Strictly ascending: `key` must not end at the shared prefix and must not branch lower.
        match (next, prev_next) {
            (None, _) => return Err(MstError::KeyOrder),
            (Some(a), Some(b)) if a < b => return Err(MstError::KeyOrder),
            _ => {}
        }
        entries.push(Entry {
            key,
            value: e.value,
            right: e.right.map(Sub::Stub),
        });
        Ok(())
    })?;
    if let Some(l) = &left {
        check_link(l)?;
    }
    let height = match (expected, entries.first()) {
        (Some(h), _) => h,
        (None, Some(e)) => key_height(e.key.as_bytes()),
        (None, None) => 0,
    };
    if height > MAX_HEIGHT {
        return Err(MstError::TooDeep(height));
    }
    let skip = usize::from(expected.is_none()); // the root's first key defined its height
    for e in entries.iter().skip(skip) {
        if key_height(e.key.as_bytes()) != height {
            return Err(MstError::HeightMismatch);
        }
    }
    if entries.is_empty() {
        // A non-root node needs something below it; the top must not be a bare pointer.
        if expected.is_some() != left.is_some() {
            return Err(MstError::EmptyNode);
        }
    }
    if height == 0 && (left.is_some() || entries.iter().any(|e| e.right.is_some())) {
        return Err(MstError::HeightMismatch);
    }
    let node = Node {
        left: left.map(Sub::Stub),
        entries,
        cid: Some(*cid),
    };
    Ok((node, height))
}

/// A subtree: loaded, or known only by CID (its block was not available).
#[derive(Debug, Clone)]
enum Sub {
    Stub(Cid),
    Node(Box<Node>),
}

#[derive(Debug, Clone, Default)]
struct Node {
    left: Option<Sub>,
    entries: Vec<Entry>,
    /// CID of the current encoding; `None` when the node (or anything below it) changed.
    cid: Option<Cid>,
}

/// Longest key stored inline (repo paths nearly always fit: loading then allocates no key).
const INLINE_KEY: usize = 62;

/// Key bytes of an entry.
#[derive(Debug, Clone)]
enum Key {
    Inline(u8, [u8; INLINE_KEY]),
    Heap(Box<[u8]>),
}

impl Key {
    /// The concatenation of `a` and `b`.
    fn new(a: &[u8], b: &[u8]) -> Key {
        let len = a.len() + b.len();
        match u8::try_from(len) {
            Ok(short) if len <= INLINE_KEY => {
                let mut buf = [0u8; INLINE_KEY];
                buf[..a.len()].copy_from_slice(a);
                buf[a.len()..len].copy_from_slice(b);
                Key::Inline(short, buf)
            }
            _ => Key::Heap([a, b].concat().into_boxed_slice()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline(len, buf) => &buf[..usize::from(*len)],
            Key::Heap(b) => b,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: Key,
    value: Cid,
    right: Option<Sub>,
}

/// Slot `i` of a node is the subtree before entry `i` (slot `len` is after the last entry).
fn slot(node: &Node, i: usize) -> &Option<Sub> {
    match i.checked_sub(1).and_then(|j| node.entries.get(j)) {
        Some(e) => &e.right,
        None => &node.left,
    }
}

fn slot_mut(node: &mut Node, i: usize) -> &mut Option<Sub> {
    match i.checked_sub(1) {
        Some(j) if j < node.entries.len() => &mut node.entries[j].right,
        _ => &mut node.left,
    }
}

impl Node {
    /// Index of `key` among the entries, or of the slot it would fall into.
    fn search(&self, key: &[u8]) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.key.as_bytes().cmp(key))
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.left.is_none()
    }
}

/// Slot index for a key that is not at this node's height: no entry can equal it (its height
/// differs from every entry's), so `search` never finds it.
fn slot_index(node: &Node, key: &[u8]) -> usize {
    match node.search(key) {
        Ok(i) | Err(i) => i,
    }
}

fn into_sub(node: Box<Node>) -> Option<Sub> {
    (!node.is_empty()).then_some(Sub::Node(node))
}

/// Lifts a subtree of height `from` to height `to` by wrapping it in empty intermediate nodes.
fn wrap(sub: Option<Sub>, from: u32, to: u32) -> Option<Sub> {
    let mut sub = sub?;
    for _ in from..to {
        sub = Sub::Node(Box::new(Node {
            left: Some(sub),
            entries: Vec::new(),
            cid: None,
        }));
    }
    Some(sub)
}

fn leaf(key: &[u8], value: Cid) -> Box<Node> {
    Box::new(Node {
        left: None,
        entries: vec![Entry {
            key: Key::new(key, &[]),
            value,
            right: None,
        }],
        cid: None,
    })
}

/// Fails (without changing anything) if splitting `sub` at `key` would cross a stub.
fn check_split(mut sub: Option<&Sub>, key: &[u8]) -> Result<(), MstError> {
    loop {
        match sub {
            None => return Ok(()),
            Some(Sub::Stub(c)) => return Err(MstError::MissingBlock(*c)),
            Some(Sub::Node(n)) => sub = slot(n, slot_index(n, key)).as_ref(),
        }
    }
}

/// Splits a subtree into the keys below and above `key` (which is not in it). Recursion depth is
/// the subtree's height. Call [`check_split`] first: an error here leaves parts moved out.
type Halves = (Option<Sub>, Option<Sub>);

fn split(sub: Option<Sub>, key: &[u8]) -> Result<Halves, MstError> {
    let mut node = match sub {
        None => return Ok((None, None)),
        Some(Sub::Stub(c)) => return Err(MstError::MissingBlock(c)),
        Some(Sub::Node(n)) => n,
    };
    let i = slot_index(&node, key);
    let (mid_left, mid_right) = split(slot_mut(&mut node, i).take(), key)?;
    let right = Box::new(Node {
        left: mid_right,
        entries: node.entries.split_off(i),
        cid: None,
    });
    *slot_mut(&mut node, i) = mid_left;
    node.cid = None;
    Ok((into_sub(node), into_sub(right)))
}

/// Fails (without changing anything) if merging `left` and `right` would cross a stub: the merge
/// follows `left`'s last slots and `right`'s first slots down until one side ends.
fn check_merge(mut left: Option<&Sub>, mut right: Option<&Sub>) -> Result<(), MstError> {
    loop {
        match (left, right) {
            (None, _) | (_, None) => return Ok(()),
            (Some(Sub::Stub(c)), _) | (_, Some(Sub::Stub(c))) => {
                return Err(MstError::MissingBlock(*c))
            }
            (Some(Sub::Node(l)), Some(Sub::Node(r))) => {
                left = slot(l, l.entries.len()).as_ref();
                right = r.left.as_ref();
            }
        }
    }
}

/// Joins two adjacent subtrees of the same height. Call [`check_merge`] first.
fn merge(left: Option<Sub>, right: Option<Sub>) -> Result<Option<Sub>, MstError> {
    match (left, right) {
        (None, x) | (x, None) => Ok(x),
        (Some(Sub::Stub(c)), _) | (_, Some(Sub::Stub(c))) => Err(MstError::MissingBlock(c)),
        (Some(Sub::Node(mut l)), Some(Sub::Node(mut r))) => {
            let last = l.entries.len();
            let inner = merge(slot_mut(&mut l, last).take(), r.left.take())?;
            *slot_mut(&mut l, last) = inner;
            l.entries.append(&mut r.entries);
            l.cid = None;
            Ok(Some(Sub::Node(l)))
        }
    }
}

fn insert_into(
    node: &mut Node,
    height: u32,
    key: &[u8],
    key_h: u32,
    value: Cid,
) -> Result<Option<Cid>, MstError> {
    if key_h == height {
        return match node.search(key) {
            Ok(i) => {
                let prev = std::mem::replace(&mut node.entries[i].value, value);
                if prev != value {
                    node.cid = None;
                }
                Ok(Some(prev))
            }
            Err(i) => {
                // The subtree where the key falls is cut in two around it.
                check_split(slot(node, i).as_ref(), key)?;
                let (below, above) = split(slot_mut(node, i).take(), key)?;
                *slot_mut(node, i) = below;
                node.entries.insert(
                    i,
                    Entry {
                        key: Key::new(key, &[]),
                        value,
                        right: above,
                    },
                );
                node.cid = None;
                Ok(None)
            }
        };
    }
    // key_h < height: descend (height >= 1 here).
    let i = slot_index(node, key);
    let child_h = height - 1;
    let prev = match slot_mut(node, i) {
        Some(Sub::Stub(c)) => return Err(MstError::MissingBlock(*c)),
        Some(Sub::Node(child)) => insert_into(child, child_h, key, key_h, value)?,
        empty @ None => {
            *empty = wrap(Some(Sub::Node(leaf(key, value))), key_h, child_h);
            None
        }
    };
    if prev != Some(value) {
        node.cid = None;
    }
    Ok(prev)
}

fn remove_from(
    node: &mut Node,
    height: u32,
    key: &[u8],
    key_h: u32,
) -> Result<Option<Cid>, MstError> {
    if key_h == height {
        let Ok(i) = node.search(key) else {
            return Ok(None);
        };
        // The subtrees on both sides of the key become one.
        check_merge(slot(node, i).as_ref(), node.entries[i].right.as_ref())?;
        let entry = node.entries.remove(i);
        let before = slot_mut(node, i).take();
        *slot_mut(node, i) = merge(before, entry.right)?;
        node.cid = None;
        return Ok(Some(entry.value));
    }
    let i = slot_index(node, key);
    let child_slot = slot_mut(node, i);
    let (prev, emptied) = match child_slot {
        None => return Ok(None),
        Some(Sub::Stub(c)) => return Err(MstError::MissingBlock(*c)),
        Some(Sub::Node(child)) => {
            let prev = remove_from(child, height - 1, key, key_h)?;
            (prev, child.is_empty())
        }
    };
    if prev.is_some() {
        if emptied {
            *child_slot = None;
        }
        node.cid = None;
    }
    Ok(prev)
}

fn sub_cid(sub: &mut Sub) -> Cid {
    match sub {
        Sub::Stub(c) => *c,
        Sub::Node(n) => node_cid(n).0,
    }
}

/// The node's CID, encoding it (and changed nodes below it) if it changed; also returns the
/// fresh encoding when one was made.
fn node_cid(node: &mut Node) -> (Cid, Option<Vec<u8>>) {
    if let Some(c) = node.cid {
        return (c, None);
    }
    let bytes = encode_mem(node);
    let cid = cbor::cid_for_dag_cbor(&bytes);
    node.cid = Some(cid);
    (cid, Some(bytes))
}

/// Encodes a loaded node, computing child CIDs first (recursion bounded by the height).
fn encode_mem(node: &mut Node) -> Vec<u8> {
    let left = node.left.as_mut().map(sub_cid);
    let rights: Vec<Option<Cid>> = node
        .entries
        .iter_mut()
        .map(|e| e.right.as_mut().map(sub_cid))
        .collect();
    let mut buf = Vec::with_capacity(16 + node.entries.len() * 90);
    let mut prev: &[u8] = &[];
    encode_parts(
        &mut buf,
        left.as_ref(),
        node.entries.iter().zip(&rights).map(|(e, right)| {
            let p = common_prefix_len(prev, e.key.as_bytes());
            prev = e.key.as_bytes();
            RawEntry {
                prefix_len: p as u64,
                suffix: &e.key.as_bytes()[p..],
                value: &e.value,
                right: right.as_ref(),
            }
        }),
    );
    buf
}

/// Replaces the stubs of a parsed node by the nodes `blocks` holds, recursively, checking that
/// the node's keys lie strictly between `lower` and `upper`. Recursion depth is bounded by the
/// height (children are one lower, and [`parse_node`] refuses links below height 0).
///
/// Work stays linear in the blocks: a node linked from two places fails on its second visit,
/// at once if it has entries (they are outside the second range), through `entryless` if it has
/// none (a chain of those over a missing block would otherwise be re-read from every link to it).
fn build<B: BlockSource + ?Sized>(
    node: &mut Node,
    height: u32,
    lower: Option<&[u8]>,
    upper: Option<&[u8]>,
    blocks: &B,
    entryless: &mut HashSet<Cid>,
) -> Result<(), MstError> {
    if let (Some(lo), Some(first)) = (lower, node.entries.first()) {
        if first.key.as_bytes() <= lo {
            return Err(MstError::KeyOrder);
        }
    }
    if let (Some(hi), Some(last)) = (upper, node.entries.last()) {
        if last.key.as_bytes() >= hi {
            return Err(MstError::KeyOrder);
        }
    }
    let child_h = height.saturating_sub(1);
    for i in 0..=node.entries.len() {
        let Some(Sub::Stub(c)) = slot(node, i) else {
            continue;
        };
        let Some(bytes) = blocks.block(c) else {
            continue;
        };
        let lo = match i.checked_sub(1) {
            Some(j) => Some(node.entries[j].key.as_bytes()),
            None => lower,
        };
        let hi = node.entries.get(i).map(|e| e.key.as_bytes()).or(upper);
        let (mut child, _) = parse_node(c, bytes, Some(child_h))?;
        if child.entries.is_empty() && !entryless.insert(*c) {
            return Err(MstError::KeyOrder);
        }
        build(&mut child, child_h, lo, hi, blocks, entryless)?;
        *slot_mut(node, i) = Some(Sub::Node(Box::new(child)));
    }
    Ok(())
}

/// A partial in-memory MST: nodes whose blocks were available are loaded; absent subtrees are
/// kept as stubs (CID only). Used to invert a firehose commit (apply its ops in reverse and
/// compare the root with `prevData`) and to build trees in tests and benchmarks.
///
/// Operations check that they can complete before changing anything, so a failed operation
/// (e.g. [`MstError::MissingBlock`]) leaves the tree as it was.
#[derive(Debug, Clone)]
pub struct Tree {
    root: Sub,
    height: u32,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::empty()
    }
}

impl Tree {
    /// The empty tree (root `{e: [], l: null}`).
    pub fn empty() -> Tree {
        Tree {
            root: Sub::Node(Box::default()),
            height: 0,
        }
    }

    /// Loads the tree rooted at `root` from `blocks`. Every node block that is present is
    /// hash-checked, decoded and validated (canonical encoding, keys strictly ascending within
    /// and across nodes, every key at its node's height, children one level lower, no empty
    /// nodes); absent nodes become stubs. Missing the root block is an error.
    pub fn load<B: BlockSource + ?Sized>(root: Cid, blocks: &B) -> Result<Tree, MstError> {
        check_link(&root)?;
        let bytes = blocks.block(&root).ok_or(MstError::MissingBlock(root))?;
        let (mut node, height) = parse_node(&root, bytes, None)?;
        build(&mut node, height, None, None, blocks, &mut HashSet::new())?;
        Ok(Tree {
            root: Sub::Node(Box::new(node)),
            height,
        })
    }

    /// Height of the root node (0 for an empty tree).
    pub fn height(&self) -> u32 {
        self.height
    }

    /// True when the tree holds no keys.
    pub fn is_empty(&self) -> bool {
        matches!(&self.root, Sub::Node(n) if n.is_empty())
    }

    /// The value of `key`; [`MstError::MissingBlock`] if the lookup must cross a stub.
    pub fn get(&self, key: &[u8]) -> Result<Option<Cid>, MstError> {
        check_key(key)?;
        let key_h = key_height(key);
        if key_h > self.height {
            return Ok(None);
        }
        let mut height = self.height;
        let mut sub = &self.root;
        loop {
            let node = match sub {
                Sub::Stub(c) => return Err(MstError::MissingBlock(*c)),
                Sub::Node(n) => n,
            };
            if height == key_h {
                return Ok(node.search(key).ok().map(|i| node.entries[i].value));
            }
            match slot(node, slot_index(node, key)) {
                None => return Ok(None),
                Some(s) => sub = s,
            }
            height -= 1;
        }
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: &[u8], value: Cid) -> Result<Option<Cid>, MstError> {
        check_key(key)?;
        let key_h = key_height(key);
        if key_h > MAX_HEIGHT {
            return Err(MstError::TooDeep(key_h));
        }
        if self.is_empty() {
            self.root = Sub::Node(leaf(key, value));
            self.height = key_h;
            return Ok(None);
        }
        if key_h > self.height {
            // A new top: the whole tree is cut around the key, and each half is lifted to just
            // below the new root with empty intermediate nodes.
            check_split(Some(&self.root), key)?;
            let whole = std::mem::replace(&mut self.root, Sub::Node(Box::default()));
            let (below, above) = split(Some(whole), key)?;
            self.root = Sub::Node(Box::new(Node {
                left: wrap(below, self.height, key_h - 1),
                entries: vec![Entry {
                    key: Key::new(key, &[]),
                    value,
                    right: wrap(above, self.height, key_h - 1),
                }],
                cid: None,
            }));
            self.height = key_h;
            return Ok(None);
        }
        match &mut self.root {
            Sub::Stub(c) => Err(MstError::MissingBlock(*c)),
            Sub::Node(n) => insert_into(n, self.height, key, key_h, value),
        }
    }

    /// Removes `key`, returning its value. If the subtrees on both sides of the key must be
    /// merged and one of them is a stub, this is [`MstError::MissingBlock`] (the commit did not
    /// carry enough proof).
    pub fn remove(&mut self, key: &[u8]) -> Result<Option<Cid>, MstError> {
        check_key(key)?;
        let key_h = key_height(key);
        if key_h > self.height {
            return Ok(None);
        }
        let prev = match &mut self.root {
            Sub::Stub(c) => return Err(MstError::MissingBlock(*c)),
            Sub::Node(n) => remove_from(n, self.height, key, key_h)?,
        };
        if prev.is_some() {
            self.trim_top();
        }
        Ok(prev)
    }

    /// The top must hold entries: a root left with only a pointer is replaced by its child.
    /// A stub child becomes the root as it is (its CID is then the root CID).
    fn trim_top(&mut self) {
        while let Sub::Node(n) = &mut self.root {
            if !n.entries.is_empty() {
                return;
            }
            match n.left.take() {
                Some(child) => {
                    self.root = child;
                    self.height = self.height.saturating_sub(1);
                }
                None => {
                    self.height = 0;
                    return;
                }
            }
        }
    }

    /// Root CID, encoding only nodes changed since load (unchanged subtrees and stubs keep their
    /// CIDs). Never fails today; the `Result` leaves room for lazily loaded trees.
    pub fn root_cid(&mut self) -> Result<Cid, MstError> {
        Ok(sub_cid(&mut self.root))
    }

    /// Every node block of the tree, for building CARs in tests and benchmarks. The tree must
    /// be fully loaded: a stub is [`MstError::MissingBlock`].
    pub fn node_blocks(&mut self) -> Result<Vec<(Cid, Vec<u8>)>, MstError> {
        fn collect(node: &mut Node, out: &mut Vec<(Cid, Vec<u8>)>) -> Result<(), MstError> {
            let (cid, fresh) = node_cid(node);
            out.push((cid, fresh.unwrap_or_else(|| encode_mem(node))));
            let mut subs: Vec<&mut Sub> = node.left.iter_mut().collect();
            subs.extend(node.entries.iter_mut().filter_map(|e| e.right.as_mut()));
            for sub in subs {
                match sub {
                    Sub::Stub(c) => return Err(MstError::MissingBlock(*c)),
                    Sub::Node(n) => collect(n, out)?,
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        match &mut self.root {
            Sub::Stub(c) => return Err(MstError::MissingBlock(*c)),
            Sub::Node(n) => collect(n, &mut out)?,
        }
        Ok(out)
    }
}

/// One node on the walk's current path.
struct Frame {
    node: Node,
    height: u32,
    /// Next step: even `2i` visits slot `i`, odd `2i + 1` emits entry `i`.
    step: usize,
}

/// Walks a whole tree in key order, calling `visit(key, value)` for every leaf. Every node is
/// hash-checked and validated like [`Tree::load`] does (keys strictly ascending across the whole
/// walk, heights consistent, no empty nodes below the root); a missing node is
/// [`MstError::MissingBlock`]. Memory is the current path (at most [`MAX_HEIGHT`] + 1 decoded
/// nodes) and the last key; the walk is a loop, not a recursion.
///
/// A subtree linked from two places is rejected on its second visit (its keys repeat), so a
/// hostile DAG cannot make the walk revisit nodes more than once per path.
pub fn walk<B, E>(
    root: Cid,
    blocks: &B,
    mut visit: impl FnMut(&[u8], Cid) -> Result<(), E>,
) -> Result<(), WalkError<E>>
where
    B: BlockSource + ?Sized,
{
    check_link(&root)?;
    let bytes = blocks.block(&root).ok_or(MstError::MissingBlock(root))?;
    let (node, height) = parse_node(&root, bytes, None)?;
    let mut stack = vec![Frame {
        node,
        height,
        step: 0,
    }];
    let mut last_key: Vec<u8> = Vec::new();
    while let Some(frame) = stack.last_mut() {
        let step = frame.step;
        frame.step += 1;
        let i = step / 2;
        if step % 2 == 1 {
            if let Some(e) = frame.node.entries.get(i) {
                // The first key is never empty (check_key), so `[]` works as "none yet".
                if e.key.as_bytes() <= last_key.as_slice() {
                    return Err(MstError::KeyOrder.into());
                }
                last_key.clear();
                last_key.extend_from_slice(e.key.as_bytes());
                visit(e.key.as_bytes(), e.value).map_err(WalkError::Visit)?;
            }
            continue;
        }
        if i > frame.node.entries.len() {
            stack.pop();
            continue;
        }
        // Links of a parsed node are stubs.
        if let Some(Sub::Stub(link)) = slot(&frame.node, i) {
            let link = *link;
            let child_h = frame.height.saturating_sub(1);
            let bytes = blocks.block(&link).ok_or(MstError::MissingBlock(link))?;
            let (node, height) = parse_node(&link, bytes, Some(child_h))?;
            stack.push(Frame {
                node,
                height,
                step: 0,
            });
        }
    }
    Ok(())
}
