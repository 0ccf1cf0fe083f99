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
    /// Sorted by CID, one entry per CID (identical repeats merged), so lookups are binary searches:
    /// a verifier looks up many blocks per commit, and a CAR may hold up to [`MAX_BLOCKS`].
    blocks: Vec<(Cid, &'a [u8])>,
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
        // Count the sections first (varint hops, no allocation), so the index is allocated once at
        // its exact size and a CAR of hundreds of thousands of tiny sections fails before any of it.
        let mut count = 0usize;
        let mut pos = header_end;
        while pos < buf.len() {
            if count == MAX_BLOCKS {
                return Err(CarError::TooManyBlocks);
            }
            pos = section_at(buf, pos)?.1;
            count += 1;
        }
        let mut blocks = Vec::with_capacity(count);
        pos = header_end;
        while pos < buf.len() {
            let (start, end) = section_at(buf, pos)?;
            let mut section = &buf[start..end];
            let cid =
                Cid::read_bytes(&mut section).map_err(|e| CarError::Cid(start, e.to_string()))?;
            blocks.push((cid, section));
            pos = end;
        }
        // Unstable sort (in place, no scratch buffer); ties broken by position so the first of
        // identical repeats is the one kept, deterministically.
        blocks.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.as_ptr().cmp(&b.1.as_ptr())));
        if let Some(w) = blocks
            .windows(2)
            .find(|w| w[0].0 == w[1].0 && w[0].1 != w[1].1)
        {
            return Err(CarError::ConflictingBlock(w[0].0));
        }
        blocks.dedup_by(|later, kept| later.0 == kept.0);
        Ok(CarBlocks { roots, blocks })
    }

    /// The header's roots (for a commit CAR, the first is the commit block's CID).
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// The block addressed by `cid`, if the CAR carries it (not yet hash-checked).
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        self.blocks
            .binary_search_by(|(c, _)| c.cmp(cid))
            .ok()
            .map(|i| self.blocks[i].1)
    }

    /// Distinct blocks (identical repeats count once).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Every distinct block, in CID order (not the CAR's section order).
    pub fn iter(&self) -> impl Iterator<Item = (&Cid, &'a [u8])> {
        self.blocks.iter().map(|(c, d)| (c, *d))
    }
}
