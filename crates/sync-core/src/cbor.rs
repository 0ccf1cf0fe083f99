//! DAG-CBOR primitives: item framing, block hashing, and conversion to the atproto JSON data model.
//!
//! Decoding itself is delegated to `serde_ipld_dagcbor` (strict DAG-CBOR: only tag 42, string map
//! keys, no indefinite lengths); this module adds what it lacks: finding where one item ends in a
//! byte stream (a frame is two concatenated items) and the `$link` / `$bytes` JSON conventions.

use base64::Engine as _;
use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

/// Multicodec code of DAG-CBOR.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec code of raw bytes (blobs).
pub const RAW: u64 = 0x55;
/// Multihash code of SHA2-256.
pub const SHA2_256: u64 = 0x12;

/// Nesting deeper than this is rejected before any recursive decoder sees it (stack safety).
pub const MAX_DEPTH: usize = 64;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum CborError {
    #[error("truncated CBOR at byte {0}")]
    Truncated(usize),
    #[error("unsupported CBOR item (major {major}, info {info}) at byte {at}")]
    Unsupported { major: u8, info: u8, at: usize },
    #[error("CBOR nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("invalid DAG-CBOR: {0}")]
    Decode(String),
    #[error("integer {0} does not fit the JSON data model")]
    IntegerRange(i128),
    #[error("non-finite float")]
    NonFiniteFloat,
    #[error("unsupported CID (codec {codec:#x}, hash {hash:#x})")]
    UnsupportedCid { codec: u64, hash: u64 },
    #[error("block hash does not match its CID {0}")]
    HashMismatch(String),
}

/// Reads the argument of a CBOR head (major type in the top 3 bits) at `pos`.
/// Returns (major, info, argument, position after the head).
fn read_head(buf: &[u8], pos: usize) -> Result<(u8, u8, u64, usize), CborError> {
    let b = *buf.get(pos).ok_or(CborError::Truncated(pos))?;
    let major = b >> 5;
    let info = b & 0x1f;
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 0usize),
        24 => (
            u64::from(*buf.get(pos + 1).ok_or(CborError::Truncated(pos))?),
            1,
        ),
        25..=27 => {
            let n = 1usize << (info - 24);
            let bytes = buf
                .get(pos + 1..pos + 1 + n)
                .ok_or(CborError::Truncated(pos))?;
            (
                bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
                n,
            )
        }
        _ => {
            return Err(CborError::Unsupported {
                major,
                info,
                at: pos,
            })
        }
    };
    Ok((major, info, arg, pos + 1 + len))
}

/// Returns the position just after the CBOR item starting at `pos`. Definite lengths only (DAG-CBOR).
pub fn skip_item(buf: &[u8], pos: usize) -> Result<usize, CborError> {
    skip_item_depth(buf, pos, 0)
}

fn skip_item_depth(buf: &[u8], pos: usize, depth: usize) -> Result<usize, CborError> {
    if depth > MAX_DEPTH {
        return Err(CborError::TooDeep);
    }
    let (major, info, arg, mut next) = read_head(buf, pos)?;
    match major {
        0 | 1 => Ok(next),
        2 | 3 => {
            let end = usize::try_from(arg)
                .ok()
                .and_then(|a| next.checked_add(a))
                .filter(|&e| e <= buf.len())
                .ok_or(CborError::Truncated(pos))?;
            Ok(end)
        }
        4 | 5 => {
            let items = if major == 5 {
                arg.saturating_mul(2)
            } else {
                arg
            };
            // Each item takes at least one byte: a count larger than what is left is truncation.
            if items > (buf.len() - next) as u64 {
                return Err(CborError::Truncated(pos));
            }
            for _ in 0..items {
                next = skip_item_depth(buf, next, depth + 1)?;
            }
            Ok(next)
        }
        6 => skip_item_depth(buf, next, depth + 1),
        7 => match info {
            20..=23 | 25..=27 => Ok(next),
            _ => Err(CborError::Unsupported {
                major,
                info,
                at: pos,
            }),
        },
        _ => unreachable!("major type is 3 bits"),
    }
}

/// The text value of `key` in the map that is the whole of `buf`, found in one pass that also
/// bounds the nesting of every value (as [`check_depth`]) without decoding them: `None` when
/// the map has no such key. An error when `buf` is not one map with text keys, the key appears
/// twice or its value is not text, or bytes follow the map.
pub fn map_text_value<'a>(buf: &'a [u8], key: &str) -> Result<Option<&'a str>, CborError> {
    let text = |pos: usize| -> Result<(&'a str, usize), CborError> {
        let (major, _, _, start) = read_head(buf, pos)?;
        if major != 3 {
            return Err(CborError::Decode(format!("expected text at byte {pos}")));
        }
        let end = skip_item(buf, pos)?;
        let s = std::str::from_utf8(&buf[start..end])
            .map_err(|_| CborError::Decode(format!("invalid UTF-8 at byte {pos}")))?;
        Ok((s, end))
    };
    let (major, _, entries, mut pos) = read_head(buf, 0)?;
    if major != 5 {
        return Err(CborError::Decode("expected a map".into()));
    }
    if entries.saturating_mul(2) > (buf.len() - pos) as u64 {
        return Err(CborError::Truncated(0));
    }
    let mut found = None;
    for _ in 0..entries {
        let (name, value) = text(pos)?;
        pos = skip_item_depth(buf, value, 1)?;
        if name == key {
            if found.is_some() {
                return Err(CborError::Decode(format!("duplicate key {key}")));
            }
            found = Some(text(value)?.0);
        }
    }
    if pos != buf.len() {
        return Err(CborError::Decode("trailing bytes after the map".into()));
    }
    Ok(found)
}

/// Checks nesting depth of a whole item without decoding it (guards the recursive decoders).
pub fn check_depth(buf: &[u8]) -> Result<(), CborError> {
    skip_item(buf, 0).map(|_| ())
}

/// Verifies that `block` hashes to `cid` (SHA2-256, the only hash atproto uses).
pub fn verify_block(cid: &Cid, block: &[u8]) -> Result<(), CborError> {
    let mh = cid.hash();
    if mh.code() != SHA2_256 || mh.size() != 32 {
        return Err(CborError::UnsupportedCid {
            codec: cid.codec(),
            hash: mh.code(),
        });
    }
    let digest = Sha256::digest(block);
    if digest.as_slice() != mh.digest() {
        return Err(CborError::HashMismatch(cid.to_string()));
    }
    Ok(())
}

/// True for the only CID form atproto uses for records (and commits, MST nodes): CIDv1, DAG-CBOR
/// codec, SHA2-256 multihash with a 32-byte digest. A record addressed any other way (CIDv0, raw
/// codec, another hash) is not a valid atproto record, whatever its bytes hash to.
pub fn is_atproto_record_cid(cid: &Cid) -> bool {
    let mh = cid.hash();
    cid.version() == ipld_core::cid::Version::V1
        && cid.codec() == DAG_CBOR
        && mh.code() == SHA2_256
        && mh.size() == 32
}

/// Skips the remaining items of a sequence without decoding them (nothing is allocated per item)
/// and returns `seen` plus their count: how a bounded list rejects a hostile length without
/// collecting it.
pub(crate) fn skip_rest<'de, A: serde::de::SeqAccess<'de>>(
    mut seq: A,
    seen: usize,
) -> Result<usize, A::Error> {
    let mut n = seen;
    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// The CIDv1 (DAG-CBOR, SHA2-256) that addresses `block`.
pub fn cid_for_dag_cbor(block: &[u8]) -> Cid {
    let digest = Sha256::digest(block);
    let mh = ipld_core::cid::multihash::Multihash::<64>::wrap(SHA2_256, &digest)
        .expect("a 32-byte digest fits a 64-byte multihash");
    Cid::new_v1(DAG_CBOR, mh)
}

/// Decodes one DAG-CBOR item (the whole slice) into the atproto JSON data model:
/// links become `{"$link": "<cid>"}`, byte strings `{"$bytes": "<base64, no padding>"}`.
pub fn decode_to_json(block: &[u8]) -> Result<Value, CborError> {
    check_depth(block)?;
    let ipld: Ipld =
        serde_ipld_dagcbor::from_slice(block).map_err(|e| CborError::Decode(e.to_string()))?;
    ipld_to_json(ipld)
}

/// Converts a decoded IPLD value into the atproto JSON data model.
pub fn ipld_to_json(ipld: Ipld) -> Result<Value, CborError> {
    Ok(match ipld {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(b),
        Ipld::Integer(i) => {
            if let Ok(v) = i64::try_from(i) {
                Value::Number(v.into())
            } else if let Ok(v) = u64::try_from(i) {
                Value::Number(v.into())
            } else {
                return Err(CborError::IntegerRange(i));
            }
        }
        Ipld::Float(f) => Value::Number(Number::from_f64(f).ok_or(CborError::NonFiniteFloat)?),
        Ipld::String(s) => Value::String(s),
        Ipld::Bytes(b) => {
            let mut m = Map::with_capacity(1);
            m.insert(
                "$bytes".to_owned(),
                Value::String(base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)),
            );
            Value::Object(m)
        }
        Ipld::List(items) => Value::Array(
            items
                .into_iter()
                .map(ipld_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Ipld::Map(map) => {
            let mut m = Map::with_capacity(map.len());
            for (k, v) in map {
                m.insert(k, ipld_to_json(v)?);
            }
            Value::Object(m)
        }
        Ipld::Link(cid) => {
            let mut m = Map::with_capacity(1);
            m.insert("$link".to_owned(), Value::String(cid.to_string()));
            Value::Object(m)
        }
    })
}

/// Converts atproto JSON (with `$link` / `$bytes`) back into IPLD, for encoding test data.
pub fn json_to_ipld(value: &Value) -> Result<Ipld, CborError> {
    Ok(match value {
        Value::Null => Ipld::Null,
        Value::Bool(b) => Ipld::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ipld::Integer(i.into())
            } else if let Some(u) = n.as_u64() {
                Ipld::Integer(u.into())
            } else {
                Ipld::Float(n.as_f64().ok_or(CborError::NonFiniteFloat)?)
            }
        }
        Value::String(s) => Ipld::String(s.clone()),
        Value::Array(a) => Ipld::List(a.iter().map(json_to_ipld).collect::<Result<_, _>>()?),
        Value::Object(m) => {
            if m.len() == 1 {
                if let Some(Value::String(link)) = m.get("$link") {
                    let cid = Cid::try_from(link.as_str())
                        .map_err(|e| CborError::Decode(format!("bad $link {link:?}: {e}")))?;
                    return Ok(Ipld::Link(cid));
                }
                if let Some(Value::String(b)) = m.get("$bytes") {
                    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(b.trim_end_matches('='))
                        .map_err(|e| CborError::Decode(format!("bad $bytes: {e}")))?;
                    return Ok(Ipld::Bytes(bytes));
                }
            }
            Ipld::Map(
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), json_to_ipld(v)?)))
                    .collect::<Result<_, CborError>>()?,
            )
        }
    })
}

/// Encodes IPLD as canonical DAG-CBOR.
pub fn encode_ipld(ipld: &Ipld) -> Result<Vec<u8>, CborError> {
    serde_ipld_dagcbor::to_vec(ipld).map_err(|e| CborError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_text_value_finds_one_text_key_in_one_bounded_pass() {
        let map = |entries: &[(&str, Ipld)]| {
            encode_ipld(&Ipld::Map(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            ))
            .unwrap()
        };
        let nested = (0..2 * MAX_DEPTH).fold(Ipld::Null, |inner, _| Ipld::List(vec![inner]));
        let good = map(&[
            ("ops", Ipld::List(vec![Ipld::Map(Default::default())])),
            ("repo", Ipld::String("did:plc:x".into())),
            ("blocks", Ipld::Bytes(vec![7; 300])),
        ]);
        assert_eq!(map_text_value(&good, "repo").unwrap(), Some("did:plc:x"));
        assert_eq!(map_text_value(&good, "rev").unwrap(), None);
        // Not text, nested too deep (even in another key), trailing bytes, not a map, cut short.
        let number = map(&[("repo", Ipld::Integer(1))]);
        assert!(map_text_value(&number, "repo").is_err());
        let deep = map(&[("repo", Ipld::String("x".into())), ("z", nested)]);
        assert!(matches!(
            map_text_value(&deep, "repo"),
            Err(CborError::TooDeep)
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(map_text_value(&trailing, "repo").is_err());
        assert!(map_text_value(&encode_ipld(&Ipld::List(vec![])).unwrap(), "repo").is_err());
        assert!(map_text_value(&good[..good.len() - 1], "repo").is_err());
        // A key given twice (not canonical DAG-CBOR, built by hand): refused, not either value.
        let mut twice = vec![0xa2];
        for value in ["a", "b"] {
            twice.extend([0x64, b'r', b'e', b'p', b'o', 0x61, value.as_bytes()[0]]);
        }
        assert!(map_text_value(&twice, "repo").is_err());
        twice[0] = 0xa1;
        twice.truncate(8);
        assert_eq!(map_text_value(&twice, "repo").unwrap(), Some("a"));
    }

    #[test]
    fn skip_item_finds_item_boundaries() {
        // {"op": 1, "t": "#commit"} followed by 0x01
        let header =
            encode_ipld(&json_to_ipld(&serde_json::json!({"op": 1, "t": "#commit"})).unwrap())
                .unwrap();
        let mut buf = header.clone();
        buf.push(0x01);
        assert_eq!(skip_item(&buf, 0).unwrap(), header.len());
        assert_eq!(skip_item(&buf, header.len()).unwrap(), buf.len());
    }

    #[test]
    fn skip_item_rejects_truncation_and_huge_counts() {
        assert_eq!(skip_item(&[0x62, b'a'], 0), Err(CborError::Truncated(0)));
        // array claiming 2^32 items in a 6-byte buffer
        assert_eq!(
            skip_item(&[0x9a, 0xff, 0xff, 0xff, 0xff, 0x01], 0),
            Err(CborError::Truncated(0))
        );
        // indefinite-length map is not DAG-CBOR
        assert!(matches!(
            skip_item(&[0xbf], 0),
            Err(CborError::Unsupported { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_rejected_without_recursion_overflow() {
        let buf = vec![0x81u8; 100_000]; // [[[[...
        assert!(decode_to_json(&buf).is_err());
    }

    #[test]
    fn hash_mismatch_is_detected() {
        let block = encode_ipld(&Ipld::String("hello".into())).unwrap();
        let cid = cid_for_dag_cbor(&block);
        verify_block(&cid, &block).unwrap();
        let mut other = block.clone();
        other[1] ^= 1;
        assert!(matches!(
            verify_block(&cid, &other),
            Err(CborError::HashMismatch(_))
        ));
    }
}
