//! In-memory CAR v1 reader for the `blocks` of a firehose commit: header roots and a block index.
//!
//! `iroh-car` is async-only and would force an executor into this pure crate; commit CARs are small
//! and already in memory, so a borrowed, allocation-light index is both simpler and faster
//! (measured in BENCHMARKS.md).

use ipld_core::cid::Cid;
use serde::Deserialize;

/// Most blocks a commit may carry; the 2 MB `blocks` limit bounds it anyway, this bounds the index.
pub const MAX_BLOCKS: usize = 10_000;
/// Most roots a CAR header may list. Firehose CARs have exactly one (the commit); the bound keeps a
/// hostile header of ~300k tiny CIDs (~100 bytes of memory each) from being collected.
pub const MAX_ROOTS: usize = 64;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum CarError {
    #[error("truncated CAR at byte {0}")]
    Truncated(usize),
    #[error("bad varint at byte {0}")]
    Varint(usize),
    #[error("bad CAR header: {0}")]
    Header(String),
    #[error("unsupported CAR version {0}")]
    Version(u64),
    #[error("bad CID in CAR section at byte {0}: {1}")]
    Cid(usize, String),
    #[error("CAR has more than {MAX_BLOCKS} blocks")]
    TooManyBlocks,
    #[error("CAR header has {0} roots, more than {MAX_ROOTS}")]
    TooManyRoots(usize),
    /// Two sections with one CID but different bytes: at most one of them can hash to the CID, and
    /// "first wins" would let the CAR's order decide what a reader sees.
    #[error("CAR repeats block {0} with different bytes")]
    ConflictingBlock(Cid),
}

#[derive(Deserialize)]
struct CarHeader {
    version: u64,
    #[serde(default)]
    roots: Roots,
}

/// The header's `roots`, bounded while decoding: past [`MAX_ROOTS`] the rest is skipped unread
/// (nothing is allocated per item) and only counted.
#[derive(Default)]
enum Roots {
    #[default]
    None,
    Some(Vec<Cid>),
    TooMany(usize),
}

impl<'de> Deserialize<'de> for Roots {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Roots;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of root CIDs")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Roots, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX_ROOTS {
                    return crate::cbor::skip_rest(seq, 0).map(Roots::TooMany);
                }
                let mut roots = Vec::with_capacity(hint);
                while let Some(cid) = seq.next_element::<Cid>()? {
                    if roots.len() == MAX_ROOTS {
                        return crate::cbor::skip_rest(seq, MAX_ROOTS + 1).map(Roots::TooMany);
                    }
                    roots.push(cid);
                }
                Ok(Roots::Some(roots))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The blocks of one CAR file, borrowed from the frame, indexed by CID.
#[derive(Debug, Clone, Default)]
pub struct CarBlocks<'a> {
    pub roots: Vec<Cid>,
    /// The sections in CAR order, identical repeats included.
    blocks: Vec<(Cid, &'a [u8])>,
    /// `(digest_key(cid), position in blocks)` for each distinct CID (the first of identical
    /// repeats). Above [`LINEAR_MAX`] entries it is sorted by key, then CID, and a lookup is a
    /// binary search: a verifier looks up many blocks per commit, and a CAR may hold up to
    /// [`MAX_BLOCKS`]. Up to [`LINEAR_MAX`] (a typical commit has about ten blocks) it stays in
    /// CAR order and a lookup scans these 16-byte pairs, which is as fast as a binary search at
    /// that size and spares the sort on every frame.
    index: Vec<(u64, u32)>,
}

/// Largest index that is scanned rather than sorted and searched.
const LINEAR_MAX: usize = 16;

/// Blocks parsed before the rest of a CAR's sections are counted and reserved exactly: a typical
/// commit (about ten blocks) never pays for the count, a large CAR is not over-allocated by
/// doubling.
const COUNT_AFTER: usize = 64;

/// The first 8 bytes of a CID's digest (zero-padded): a hash prefix, so it nearly always orders
/// two CIDs by itself and the CIDs are compared only when keys are equal (identical repeats, one
/// digest under two codecs, or a hostile CAR of colliding keys, which then costs a normal sort).
fn digest_key(cid: &Cid) -> u64 {
    let digest = cid.hash().digest();
    let mut key = [0u8; 8];
    let n = digest.len().min(8);
    key[..n].copy_from_slice(&digest[..n]);
    u64::from_be_bytes(key)
}

fn read_varint(buf: &[u8], pos: usize) -> Result<(u64, usize), CarError> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *buf.get(pos + i).ok_or(CarError::Truncated(pos))?;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, pos + i + 1));
        }
    }
    Err(CarError::Varint(pos))
}

/// The section starting at `pos` (its varint length prefix): (contents range start, end).
fn section_at(buf: &[u8], pos: usize) -> Result<(usize, usize), CarError> {
    let (section_len, start) = read_varint(buf, pos)?;
    let end = usize::try_from(section_len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .filter(|&e| e <= buf.len())
        .ok_or(CarError::Truncated(pos))?;
    Ok((start, end))
}

/// A repeat of a kept block must carry the same bytes.
fn check_repeat(blocks: &[(Cid, &[u8])], kept: u32, repeat: u32) -> Result<(), CarError> {
    let (cid, data) = &blocks[kept as usize];
    if blocks[repeat as usize].1 == *data {
        Ok(())
    } else {
        Err(CarError::ConflictingBlock(*cid))
    }
}

impl<'a> CarBlocks<'a> {
    /// Parses a CAR v1 byte string. Every section's CID is parsed; block bytes are borrowed.
    ///
    /// A CID repeated with identical bytes is kept once (harmless); repeated with different bytes
    /// it is [`CarError::ConflictingBlock`].
    pub fn parse(buf: &'a [u8]) -> Result<Self, CarError> {
        let (header_start, header_end) = section_at(buf, 0)?;
        let header_bytes = &buf[header_start..header_end];
        crate::cbor::check_depth(header_bytes).map_err(|e| CarError::Header(e.to_string()))?;
        let header: CarHeader = serde_ipld_dagcbor::from_slice(header_bytes)
            .map_err(|e| CarError::Header(e.to_string()))?;
        if header.version != 1 {
            return Err(CarError::Version(header.version));
        }
        let roots = match header.roots {
            Roots::None => Vec::new(),
            Roots::Some(roots) => roots,
            Roots::TooMany(n) => return Err(CarError::TooManyRoots(n)),
        };
        let mut blocks: Vec<(Cid, &[u8])> = Vec::with_capacity(16);
        let mut index: Vec<(u64, u32)> = Vec::with_capacity(16);
        let mut pos = header_end;
        while pos < buf.len() {
            if blocks.len() == COUNT_AFTER {
                // Many sections: count the rest (varint hops, no allocation) and reserve exactly,
                // so hundreds of thousands of tiny sections fail before any is stored.
                let mut rest = 0usize;
                let mut p = pos;
                while p < buf.len() {
                    if blocks.len() + rest == MAX_BLOCKS {
                        return Err(CarError::TooManyBlocks);
                    }
                    p = section_at(buf, p)?.1;
                    rest += 1;
                }
                blocks.reserve_exact(rest);
                index.reserve_exact(rest);
            }
            if blocks.len() == MAX_BLOCKS {
                return Err(CarError::TooManyBlocks);
            }
            let (start, end) = section_at(buf, pos)?;
            let mut section = &buf[start..end];
            let cid =
                Cid::read_bytes(&mut section).map_err(|e| CarError::Cid(start, e.to_string()))?;
            // MAX_BLOCKS fits a u32.
            index.push((digest_key(&cid), blocks.len() as u32));
            blocks.push((cid, section));
            pos = end;
        }
        Self::indexed(roots, blocks, index)
    }

    /// Blocks gathered elsewhere (e.g. a verified repo's records), indexed like a parsed CAR's.
    /// Repeats follow [`Self::parse`]'s rule.
    pub fn from_blocks(roots: Vec<Cid>, blocks: Vec<(Cid, &'a [u8])>) -> Result<Self, CarError> {
        if blocks.len() > MAX_BLOCKS {
            return Err(CarError::TooManyBlocks);
        }
        let index = blocks
            .iter()
            .enumerate()
            .map(|(i, (cid, _))| (digest_key(cid), i as u32))
            .collect();
        Self::indexed(roots, blocks, index)
    }

    /// Drops repeated CIDs from `index` (in CAR order) and sorts it when large.
    fn indexed(
        roots: Vec<Cid>,
        blocks: Vec<(Cid, &'a [u8])>,
        mut index: Vec<(u64, u32)>,
    ) -> Result<Self, CarError> {
        // Drop repeats, keeping the first; a repeat with other bytes is an error.
        let cid_at = |i: u32| &blocks[i as usize].0;
        let same = |a: (u64, u32), b: (u64, u32)| a.0 == b.0 && cid_at(a.1) == cid_at(b.1);
        let mut kept = 0;
        if index.len() > LINEAR_MAX {
            // By key, then CID (only compared on equal keys), then position: repeats end up
            // adjacent, the first copy leading.
            index.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| cid_at(a.1).cmp(cid_at(b.1)))
                    .then(a.1.cmp(&b.1))
            });
            for r in 0..index.len() {
                if kept > 0 && same(index[kept - 1], index[r]) {
                    check_repeat(&blocks, index[kept - 1].1, index[r].1)?;
                } else {
                    index[kept] = index[r];
                    kept += 1;
                }
            }
        } else {
            // At most LINEAR_MAX entries: compare with every kept one (keys first, inline: this
            // runs for nearly every frame).
            for r in 0..index.len() {
                let (key, i) = index[r];
                let first = index[..kept]
                    .iter()
                    .find(|&&(k, j)| k == key && blocks[j as usize].0 == blocks[i as usize].0);
                match first {
                    Some(&(_, first)) => check_repeat(&blocks, first, i)?,
                    None => {
                        index[kept] = (key, i);
                        kept += 1;
                    }
                }
            }
        }
        index.truncate(kept);
        Ok(CarBlocks {
            roots,
            blocks,
            index,
        })
    }

    /// The header's roots (for a commit CAR, the first is the commit block's CID).
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// The block addressed by `cid`, if the CAR carries it (not yet hash-checked).
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        let key = digest_key(cid);
        let at = |i: u32| &self.blocks[i as usize];
        let found = if self.index.len() > LINEAR_MAX {
            self.index
                .binary_search_by(|&(k, i)| k.cmp(&key).then_with(|| at(i).0.cmp(cid)))
                .ok()
                .map(|n| self.index[n].1)
        } else {
            // Scanned: right for any order (dropping repeats may leave a sorted index this short).
            self.index
                .iter()
                .find(|&&(k, i)| k == key && at(i).0 == *cid)
                .map(|&(_, i)| i)
        };
        found.map(|i| at(i).1)
    }

    /// Distinct blocks (identical repeats count once).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every distinct block (the first of identical repeats). The order is unspecified: the CAR's
    /// for small CARs, by digest for larger ones.
    pub fn iter(&self) -> impl Iterator<Item = (&Cid, &'a [u8])> {
        self.index.iter().map(|&(_, i)| {
            let (cid, data) = &self.blocks[i as usize];
            (cid, *data)
        })
    }
}
