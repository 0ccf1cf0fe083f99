//! In-memory CAR v1 reader for the `blocks` of a firehose commit: header roots and a block index.
//!
//! `iroh-car` is async-only and would force an executor into this pure crate; commit CARs are small
//! and already in memory, so a borrowed, allocation-light index is both simpler and faster
//! (measured in BENCHMARKS.md).

use ipld_core::cid::Cid;
use serde::Deserialize;

/// Most blocks a commit may carry; the 2 MB `blocks` limit bounds it anyway, this bounds the index.
pub const MAX_BLOCKS: usize = 10_000;

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
}

#[derive(Deserialize)]
struct CarHeader {
    version: u64,
    #[serde(default)]
    roots: Vec<Cid>,
}

/// The blocks of one CAR file, borrowed from the frame.
#[derive(Debug, Clone, Default)]
pub struct CarBlocks<'a> {
    pub roots: Vec<Cid>,
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

impl<'a> CarBlocks<'a> {
    /// Parses a CAR v1 byte string. Every section's CID is parsed; block bytes are borrowed.
    pub fn parse(buf: &'a [u8]) -> Result<Self, CarError> {
        let (header_len, mut pos) = read_varint(buf, 0)?;
        let header_end = usize::try_from(header_len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&e| e <= buf.len())
            .ok_or(CarError::Truncated(pos))?;
        let header_bytes = &buf[pos..header_end];
        crate::cbor::check_depth(header_bytes).map_err(|e| CarError::Header(e.to_string()))?;
        let header: CarHeader = serde_ipld_dagcbor::from_slice(header_bytes)
            .map_err(|e| CarError::Header(e.to_string()))?;
        if header.version != 1 {
            return Err(CarError::Version(header.version));
        }
        pos = header_end;
        let mut blocks = Vec::new();
        while pos < buf.len() {
            let (section_len, start) = read_varint(buf, pos)?;
            let end = usize::try_from(section_len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&e| e <= buf.len())
                .ok_or(CarError::Truncated(pos))?;
            let mut section = &buf[start..end];
            let before = section.len();
            let cid =
                Cid::read_bytes(&mut section).map_err(|e| CarError::Cid(start, e.to_string()))?;
            debug_assert!(section.len() <= before);
            if blocks.len() == MAX_BLOCKS {
                return Err(CarError::TooManyBlocks);
            }
            blocks.push((cid, section));
            pos = end;
        }
        Ok(CarBlocks {
            roots: header.roots,
            blocks,
        })
    }

    /// The block addressed by `cid`, if the CAR carries it (not yet hash-checked).
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        self.blocks
            .iter()
            .find(|(c, _)| c == cid)
            .map(|(_, data)| *data)
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Cid, &'a [u8])> {
        self.blocks.iter().map(|(c, d)| (c, *d))
    }
}
