//! atproto identifier newtypes (DID, handle, NSID, record key, TID, AT-URI, CID string, firehose
//! sequence number), validated strictly per the atproto specs and the interop syntax fixtures.
//!
//! This module owns identifier syntax. Every value of these types has passed a hand-rolled,
//! allocation-free validator (`is_valid_*`); the types are the ONLY values that other modules may
//! turn into file-system path segments.
//!
//! # Path safety
//!
//! A [`Did`], [`RecordKey`], [`Nsid`], [`Handle`], [`Tid`] or [`CidString`] is always non-empty,
//! pure ASCII, and never contains `/`, `\`, NUL, whitespace or any other control character; a
//! [`RecordKey`] is never `.` or `..` (a DID always starts with `did:`, an NSID/handle always has
//! non-empty dot-separated segments). Note that DIDs and record keys may contain `:` (and DIDs
//! `%`), which is fine on Unix file systems but not on Windows.
//!
//! # Spec choices (where spec and fixtures leave room)
//!
//! * DID: `did:` + method `[a-z]+` + `:` + method-specific id of `[a-zA-Z0-9._:%-]`, not ending in
//!   `:` or `%`, at most 2048 chars. As in the atproto reference implementations, the characters
//!   after a `%` are *not* required to be hex digits (the spec regex does not require it).
//! * NSID: only the total length (317) and per-segment length (63) are limited; the domain
//!   authority is not separately limited to 253 chars (a valid fixture has a 283-char authority).
//! * AT-URI: only the restricted form `at://AUTHORITY[/COLLECTION[/RKEY]]` is accepted; query
//!   strings and fragments are rejected, as are trailing and doubled slashes.
//! * CID: syntax check only (as the atproto Go reference does): 8-256 chars of `[a-zA-Z0-9+=]`,
//!   rejecting legacy CIDv0 (`Qm…`). Use [`CidString::to_cid`] for a full decode.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use ipld_core::cid::Cid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Maximum DID length in bytes.
pub const DID_MAX_LEN: usize = 2048;
/// Maximum handle length in bytes.
pub const HANDLE_MAX_LEN: usize = 253;
/// Maximum NSID length in bytes.
pub const NSID_MAX_LEN: usize = 317;
/// Maximum length of one handle / NSID segment.
pub const SEGMENT_MAX_LEN: usize = 63;
/// Maximum record key length in bytes.
pub const RECORD_KEY_MAX_LEN: usize = 512;
/// Exact TID length.
pub const TID_LEN: usize = 13;
/// Maximum AT-URI length in bytes (8 KiB).
pub const AT_URI_MAX_LEN: usize = 8 * 1024;
/// Minimum CID string length.
pub const CID_MIN_LEN: usize = 8;
/// Maximum CID string length.
pub const CID_MAX_LEN: usize = 256;

/// How much of a rejected input is echoed back inside an [`IdError`].
const ECHO_MAX: usize = 100;

/// An identifier failed validation: the (truncated) input and the reason.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid DID {0:?}: {1}")]
    Did(String, &'static str),
    #[error("invalid handle {0:?}: {1}")]
    Handle(String, &'static str),
    #[error("invalid NSID {0:?}: {1}")]
    Nsid(String, &'static str),
    #[error("invalid record key {0:?}: {1}")]
    RecordKey(String, &'static str),
    #[error("invalid TID {0:?}: {1}")]
    Tid(String, &'static str),
    #[error("invalid AT-URI {0:?}: {1}")]
    AtUri(String, &'static str),
    #[error("invalid CID {0:?}: {1}")]
    Cid(String, &'static str),
}

impl IdError {
    /// The (possibly truncated) rejected input.
    pub fn input(&self) -> &str {
        match self {
            IdError::Did(s, _)
            | IdError::Handle(s, _)
            | IdError::Nsid(s, _)
            | IdError::RecordKey(s, _)
            | IdError::Tid(s, _)
            | IdError::AtUri(s, _)
            | IdError::Cid(s, _) => s,
        }
    }

    /// Why the input was rejected.
    pub fn reason(&self) -> &'static str {
        match self {
            IdError::Did(_, r)
            | IdError::Handle(_, r)
            | IdError::Nsid(_, r)
            | IdError::RecordKey(_, r)
            | IdError::Tid(_, r)
            | IdError::AtUri(_, r)
            | IdError::Cid(_, r) => r,
        }
    }
}

/// Copy of `s` for an error message, cut to about [`ECHO_MAX`] bytes so hostile inputs stay small.
fn echo(s: &str) -> String {
    if s.len() <= ECHO_MAX {
        return s.to_owned();
    }
    let mut end = ECHO_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(+{} bytes)", &s[..end], s.len() - end)
}

// ---------------------------------------------------------------------------------------------
// Character classes
// ---------------------------------------------------------------------------------------------

const C_ALPHA: u8 = 1 << 0;
const C_DIGIT: u8 = 1 << 1;
/// DID method-specific id: `[a-zA-Z0-9._:%-]`.
const C_DID: u8 = 1 << 2;
/// Record key: `[a-zA-Z0-9._:~-]`.
const C_RKEY: u8 = 1 << 3;
/// CID string: `[a-zA-Z0-9+=]`.
const C_CID: u8 = 1 << 4;
/// Domain label: `[a-zA-Z0-9-]`.
const C_LABEL: u8 = 1 << 5;
const C_ALNUM: u8 = C_ALPHA | C_DIGIT;

const CLASS: [u8; 256] = build_class();

const fn build_class() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        let mut f = 0u8;
        if c.is_ascii_alphabetic() {
            f |= C_ALPHA | C_DID | C_RKEY | C_CID | C_LABEL;
        }
        if c.is_ascii_digit() {
            f |= C_DIGIT | C_DID | C_RKEY | C_CID | C_LABEL;
        }
        match c {
            b'.' | b'_' | b':' => f |= C_DID | C_RKEY,
            b'-' => f |= C_DID | C_RKEY | C_LABEL,
            b'%' => f |= C_DID,
            b'~' => f |= C_RKEY,
            b'+' | b'=' => f |= C_CID,
            _ => {}
        }
        t[i] = f;
        i += 1;
    }
    t
}

#[inline]
fn is(c: u8, class: u8) -> bool {
    CLASS[c as usize] & class != 0
}

#[inline]
fn all(b: &[u8], class: u8) -> bool {
    b.iter().all(|&c| is(c, class))
}

// ---------------------------------------------------------------------------------------------
// Validators (no allocation)
// ---------------------------------------------------------------------------------------------

fn check_did(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.len() > DID_MAX_LEN {
        return Err("too long (max 2048 chars)");
    }
    let Some(rest) = b.strip_prefix(b"did:") else {
        return Err("must start with \"did:\"");
    };
    let Some(colon) = rest.iter().position(|&c| c == b':') else {
        return Err("missing ':' after method");
    };
    let (method, msid) = (&rest[..colon], &rest[colon + 1..]);
    if method.is_empty() {
        return Err("empty method");
    }
    if !method.iter().all(u8::is_ascii_lowercase) {
        return Err("method must be lowercase ASCII letters only");
    }
    let Some(&last) = msid.last() else {
        return Err("empty method-specific identifier");
    };
    if !all(msid, C_DID) {
        return Err("disallowed character (only ASCII letters, digits and ._:%- allowed)");
    }
    if last == b':' || last == b'%' {
        return Err("must not end with ':' or '%'");
    }
    Ok(())
}

/// One DNS-style label: 1-63 chars of `[a-zA-Z0-9-]`, no leading or trailing hyphen.
#[inline]
fn check_label(l: &[u8]) -> Result<(), &'static str> {
    let (Some(&first), Some(&last)) = (l.first(), l.last()) else {
        return Err("empty segment");
    };
    if l.len() > SEGMENT_MAX_LEN {
        return Err("segment too long (max 63 chars)");
    }
    if !all(l, C_LABEL) {
        return Err("disallowed character (only ASCII letters, digits, hyphens and periods)");
    }
    if first == b'-' || last == b'-' {
        return Err("segment must not start or end with a hyphen");
    }
    Ok(())
}

fn check_handle(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("empty");
    }
    if b.len() > HANDLE_MAX_LEN {
        return Err("too long (max 253 chars)");
    }
    let mut segments = 0usize;
    let mut tld: &[u8] = &[];
    for label in b.split(|&c| c == b'.') {
        check_label(label)?;
        segments += 1;
        tld = label;
    }
    if segments < 2 {
        return Err("needs at least two segments");
    }
    if !tld[0].is_ascii_alphabetic() {
        return Err("last segment (TLD) must start with a letter");
    }
    Ok(())
}

fn check_nsid(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("empty");
    }
    if b.len() > NSID_MAX_LEN {
        return Err("too long (max 317 chars)");
    }
    let Some(dot) = b.iter().rposition(|&c| c == b'.') else {
        return Err("needs at least three segments");
    };
    let (authority, name) = (&b[..dot], &b[dot + 1..]);
    let Some(&name_first) = name.first() else {
        return Err("empty segment");
    };
    if name.len() > SEGMENT_MAX_LEN {
        return Err("segment too long (max 63 chars)");
    }
    if !name_first.is_ascii_alphabetic() || !all(name, C_ALNUM) {
        return Err("name segment must be ASCII letters and digits, starting with a letter");
    }
    let mut segments = 0usize;
    for label in authority.split(|&c| c == b'.') {
        check_label(label)?;
        if segments == 0 && !label[0].is_ascii_alphabetic() {
            return Err("first segment must start with a letter");
        }
        segments += 1;
    }
    if segments < 2 {
        return Err("needs at least three segments");
    }
    Ok(())
}

fn check_record_key(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("empty");
    }
    if b.len() > RECORD_KEY_MAX_LEN {
        return Err("too long (max 512 chars)");
    }
    if !all(b, C_RKEY) {
        return Err("disallowed character (only ASCII letters, digits and ._:~- allowed)");
    }
    if b == b"." || b == b".." {
        return Err("must not be \".\" or \"..\"");
    }
    Ok(())
}

/// The base32-sortable alphabet used by TIDs, in sort order.
const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
/// Byte -> 5-bit value, or 0xFF if not in [`TID_ALPHABET`].
const TID_DECODE: [u8; 256] = build_tid_decode();

const fn build_tid_decode() -> [u8; 256] {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 32 {
        t[TID_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
}

fn check_tid(s: &str) -> Result<[u8; TID_LEN], &'static str> {
    let Ok(bytes) = <[u8; TID_LEN]>::try_from(s.as_bytes()) else {
        return Err("must be exactly 13 chars");
    };
    if bytes.iter().any(|&c| TID_DECODE[c as usize] == 0xFF) {
        return Err("disallowed character (base32-sortable 234567a-z only)");
    }
    if TID_DECODE[bytes[0] as usize] >= 16 {
        return Err("first char must be one of 234567abcdefghij (high bit must be 0)");
    }
    Ok(bytes)
}

/// Why an AT-URI component was rejected; mentions query/fragment when that is the likely cause.
fn uri_part_err(part: &str, default: &'static str) -> &'static str {
    if part.bytes().any(|c| c == b'?' || c == b'#') {
        "query and fragment are not allowed"
    } else {
        default
    }
}

/// Returns the byte offsets (authority end, collection end) into `s`.
fn check_at_uri(s: &str) -> Result<(u32, u32), &'static str> {
    const PREFIX: &str = "at://";
    if s.len() > AT_URI_MAX_LEN {
        return Err("too long (max 8192 chars)");
    }
    let Some(rest) = s.strip_prefix(PREFIX) else {
        return Err("must start with \"at://\"");
    };
    let base = PREFIX.len();
    let authority_len = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    if authority.is_empty() {
        return Err("empty authority");
    }
    if check_did(authority).is_err() && check_handle(authority).is_err() {
        return Err(uri_part_err(
            authority,
            "authority is not a valid DID or handle",
        ));
    }
    // Offsets fit in u32: s.len() <= AT_URI_MAX_LEN.
    let authority_end = (base + authority_len) as u32;
    if authority_len == rest.len() {
        return Ok((authority_end, authority_end));
    }
    let path = &rest[authority_len + 1..];
    let collection_len = path.find('/').unwrap_or(path.len());
    let collection = &path[..collection_len];
    if collection.is_empty() {
        return Err("empty path segment (trailing or doubled '/')");
    }
    if check_nsid(collection).is_err() {
        return Err(uri_part_err(collection, "collection is not a valid NSID"));
    }
    let collection_end = authority_end + 1 + collection_len as u32;
    if collection_len == path.len() {
        return Ok((authority_end, collection_end));
    }
    let rkey = &path[collection_len + 1..];
    if rkey.is_empty() {
        return Err("empty record key (trailing '/')");
    }
    if rkey.contains('/') {
        return Err("too many path segments (only collection and record key allowed)");
    }
    if check_record_key(rkey).is_err() {
        return Err(uri_part_err(rkey, "record key is not valid"));
    }
    Ok((authority_end, collection_end))
}

fn check_cid(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.len() < CID_MIN_LEN {
        return Err("too short (min 8 chars)");
    }
    if b.len() > CID_MAX_LEN {
        return Err("too long (max 256 chars)");
    }
    if !all(b, C_CID) {
        return Err("disallowed character (only ASCII letters, digits, '+' and '=' allowed)");
    }
    if b.starts_with(b"Qm") {
        return Err("CIDv0 is not allowed");
    }
    Ok(())
}

/// Whether `s` is a syntactically valid DID.
pub fn is_valid_did(s: &str) -> bool {
    check_did(s).is_ok()
}
/// Whether `s` is a syntactically valid handle.
pub fn is_valid_handle(s: &str) -> bool {
    check_handle(s).is_ok()
}
/// Whether `s` is a syntactically valid NSID.
pub fn is_valid_nsid(s: &str) -> bool {
    check_nsid(s).is_ok()
}
/// Whether `s` is a syntactically valid record key.
pub fn is_valid_record_key(s: &str) -> bool {
    check_record_key(s).is_ok()
}
/// Whether `s` is a syntactically valid TID.
pub fn is_valid_tid(s: &str) -> bool {
    check_tid(s).is_ok()
}
/// Whether `s` is a valid restricted AT-URI (`at://AUTHORITY[/COLLECTION[/RKEY]]`).
pub fn is_valid_at_uri(s: &str) -> bool {
    check_at_uri(s).is_ok()
}
/// Whether `s` is a syntactically valid atproto CID string.
pub fn is_valid_cid(s: &str) -> bool {
    check_cid(s).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Shared trait impls
// ---------------------------------------------------------------------------------------------

/// Display / FromStr / AsRef / Borrow / comparisons with `str` / String conversions / serde, for a
/// type with `parse(&str)`, `from_string(String)` and `as_str()`.
macro_rules! str_traits {
    ($ty:ident, $expecting:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                self.as_str()
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::from_string(s)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$ty, E> {
                        <$ty>::parse(s).map_err(E::custom)
                    }
                    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<$ty, E> {
                        <$ty>::from_string(s).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

/// A validated identifier stored as `Box<str>` in field `.0`.
macro_rules! boxed_str_id {
    ($ty:ident, $check:ident, $variant:ident, $expecting:literal) => {
        impl $ty {
            /// Validates `s` and stores a copy.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                match $check(s) {
                    Ok(()) => Ok(Self(Box::from(s))),
                    Err(why) => Err(IdError::$variant(echo(s), why)),
                }
            }

            /// Validates `s`, reusing its allocation.
            pub fn from_string(s: String) -> Result<Self, IdError> {
                match $check(&s) {
                    Ok(()) => Ok(Self(s.into_boxed_str())),
                    Err(why) => Err(IdError::$variant(echo(&s), why)),
                }
            }

            /// The identifier text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Length in bytes.
            #[allow(clippy::len_without_is_empty)] // never empty
            pub fn len(&self) -> usize {
                self.0.len()
            }

            /// The identifier text as an owned `String`.
            pub fn into_string(self) -> String {
                self.0.into_string()
            }
        }

        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0.into_string()
            }
        }

        str_traits!($ty, $expecting);
    };
}

// ---------------------------------------------------------------------------------------------
// Did
// ---------------------------------------------------------------------------------------------

/// A DID (`did:method:identifier`), <https://atproto.com/specs/did>. Path-safe.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Did(Box<str>);

boxed_str_id!(Did, check_did, Did, "a DID string");

impl Did {
    /// The method, e.g. `plc` for `did:plc:…`.
    pub fn method(&self) -> &str {
        let rest = &self.0[4..];
        match rest.find(':') {
            Some(i) => &rest[..i],
            None => rest, // unreachable for a validated DID
        }
    }

    /// Everything after `did:METHOD:`.
    pub fn method_specific_id(&self) -> &str {
        let rest = &self.0[4..];
        match rest.find(':') {
            Some(i) => &rest[i + 1..],
            None => "", // unreachable for a validated DID
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handle
// ---------------------------------------------------------------------------------------------

/// A handle (domain name), <https://atproto.com/specs/handle>. Case is preserved; compare
/// [`Handle::normalized`] values for case-insensitive equality.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(Box<str>);

boxed_str_id!(Handle, check_handle, Handle, "a handle string");

impl Handle {
    /// The lowercase form of this handle.
    pub fn normalized(&self) -> Handle {
        Handle(self.0.to_ascii_lowercase().into_boxed_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Nsid
// ---------------------------------------------------------------------------------------------

/// A namespaced identifier such as `app.bsky.feed.post`, <https://atproto.com/specs/nsid>.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nsid(Box<str>);

boxed_str_id!(Nsid, check_nsid, Nsid, "an NSID string");

impl Nsid {
    fn last_dot(&self) -> usize {
        self.0.rfind('.').unwrap_or(0) // a validated NSID always has a '.'
    }

    /// The domain authority (all segments but the last), e.g. `app.bsky.feed`.
    pub fn authority(&self) -> &str {
        &self.0[..self.last_dot()]
    }

    /// The name segment (the last one), e.g. `post`.
    pub fn name(&self) -> &str {
        &self.0[self.last_dot() + 1..]
    }
}

// ---------------------------------------------------------------------------------------------
// RecordKey
// ---------------------------------------------------------------------------------------------

/// A record key, <https://atproto.com/specs/record-key>: 1-512 chars of `[A-Za-z0-9._:~-]`, never
/// `.` or `..`. Path-safe.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey(Box<str>);

boxed_str_id!(
    RecordKey,
    check_record_key,
    RecordKey,
    "a record key string"
);

impl From<Tid> for RecordKey {
    fn from(t: Tid) -> RecordKey {
        RecordKey(Box::from(t.as_str()))
    }
}

impl From<&Tid> for RecordKey {
    fn from(t: &Tid) -> RecordKey {
        RecordKey(Box::from(t.as_str()))
    }
}

// ---------------------------------------------------------------------------------------------
// CidString
// ---------------------------------------------------------------------------------------------

/// A CID in string form that passed the atproto CID *syntax* check (8-256 chars of
/// `[a-zA-Z0-9+=]`, not a legacy `Qm…` CIDv0). It is not decoded: use [`CidString::to_cid`] for
/// that. Path-safe.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidString(Box<str>);

boxed_str_id!(CidString, check_cid, Cid, "a CID string");

impl CidString {
    /// Fully decodes the CID (multibase + multihash).
    pub fn to_cid(&self) -> Result<Cid, IdError> {
        Cid::try_from(self.as_str())
            .map_err(|_| IdError::Cid(echo(self.as_str()), "not a decodable CID"))
    }

    /// The canonical string form of `cid` (CIDv1, base32); a CIDv0 is converted to CIDv1.
    pub fn from_cid(cid: &Cid) -> CidString {
        let v1 = Cid::new_v1(cid.codec(), *cid.hash());
        let s = v1.to_string();
        debug_assert!(is_valid_cid(&s), "CIDv1 string failed syntax check: {s}");
        CidString(s.into_boxed_str())
    }
}

impl From<&Cid> for CidString {
    fn from(cid: &Cid) -> CidString {
        CidString::from_cid(cid)
    }
}

impl From<Cid> for CidString {
    fn from(cid: Cid) -> CidString {
        CidString::from_cid(&cid)
    }
}

// ---------------------------------------------------------------------------------------------
// Tid
// ---------------------------------------------------------------------------------------------

/// A timestamp identifier, <https://atproto.com/specs/tid>: 13 base32-sortable chars. Stored
/// inline (`Copy`); ordering equals numeric (and thus time) ordering. Path-safe.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tid([u8; TID_LEN]);

impl Tid {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        match check_tid(s) {
            Ok(bytes) => Ok(Tid(bytes)),
            Err(why) => Err(IdError::Tid(echo(s), why)),
        }
    }

    /// Validates `s` (no allocation is kept).
    pub fn from_string(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }

    /// The 13-char TID text.
    pub fn as_str(&self) -> &str {
        match std::str::from_utf8(&self.0) {
            Ok(s) => s,
            Err(_) => unreachable!("TID bytes are ASCII"),
        }
    }

    /// The 64-bit integer this TID encodes.
    pub fn to_u64(&self) -> u64 {
        self.0.iter().fold(0u64, |acc, &c| {
            (acc << 5) | u64::from(TID_DECODE[c as usize])
        })
    }

    /// Encodes any 64-bit integer as a TID.
    pub fn from_u64(v: u64) -> Tid {
        let mut out = [0u8; TID_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (TID_LEN - 1 - i);
            *slot = TID_ALPHABET[((v >> shift) & 31) as usize];
        }
        Tid(out)
    }

    /// The timestamp part: microseconds since the UNIX epoch.
    pub fn timestamp_micros(&self) -> u64 {
        (self.to_u64() >> 10) & ((1 << 53) - 1)
    }

    /// The 10-bit clock identifier.
    pub fn clock_id(&self) -> u16 {
        (self.to_u64() & 0x3FF) as u16
    }
}

impl fmt::Debug for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Tid").field(&self.as_str()).finish()
    }
}

impl Hash for Tid {
    // Hash like `str` so that `Borrow<str>` is consistent.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

str_traits!(Tid, "a TID string");

impl From<Tid> for String {
    fn from(v: Tid) -> String {
        v.as_str().to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// AtUri
// ---------------------------------------------------------------------------------------------

/// A restricted AT-URI, <https://atproto.com/specs/at-uri-scheme>:
/// `at://AUTHORITY[/COLLECTION[/RKEY]]` where AUTHORITY is a DID or handle, COLLECTION an NSID
/// and RKEY a record key; no query, fragment or trailing slash. Component offsets are stored, so
/// the accessors do not re-parse.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AtUri {
    // Field order matters for the derived Ord: the string first (offsets are a function of it).
    s: Box<str>,
    /// End of the authority (exclusive).
    authority_end: u32,
    /// End of the collection (exclusive); equal to `authority_end` if there is no collection.
    collection_end: u32,
}

impl AtUri {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        match check_at_uri(s) {
            Ok((authority_end, collection_end)) => Ok(AtUri {
                s: Box::from(s),
                authority_end,
                collection_end,
            }),
            Err(why) => Err(IdError::AtUri(echo(s), why)),
        }
    }

    /// Validates `s`, reusing its allocation.
    pub fn from_string(s: String) -> Result<Self, IdError> {
        match check_at_uri(&s) {
            Ok((authority_end, collection_end)) => Ok(AtUri {
                s: s.into_boxed_str(),
                authority_end,
                collection_end,
            }),
            Err(why) => Err(IdError::AtUri(echo(&s), why)),
        }
    }

    /// `at://{did}/{collection}/{rkey}` from already-validated parts (no re-validation).
    pub fn from_parts(did: &Did, collection: &Nsid, rkey: &RecordKey) -> AtUri {
        let (d, c, r) = (did.as_str(), collection.as_str(), rkey.as_str());
        let mut s = String::with_capacity(5 + d.len() + 1 + c.len() + 1 + r.len());
        s.push_str("at://");
        s.push_str(d);
        // At most 5 + 2048 + 1 + 317 chars: fits in u32.
        let authority_end = s.len() as u32;
        s.push('/');
        s.push_str(c);
        let collection_end = s.len() as u32;
        s.push('/');
        s.push_str(r);
        debug_assert!(s.len() <= AT_URI_MAX_LEN);
        AtUri {
            s: s.into_boxed_str(),
            authority_end,
            collection_end,
        }
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.s
    }

    /// The whole URI as an owned `String`.
    pub fn into_string(self) -> String {
        self.s.into_string()
    }

    /// The authority: a DID or a handle.
    pub fn authority(&self) -> &str {
        &self.s[5..self.authority_end as usize]
    }

    /// The authority as a [`Did`], if it is one (rather than a handle).
    pub fn authority_did(&self) -> Option<Did> {
        let a = self.authority();
        a.starts_with("did:").then(|| Did(Box::from(a)))
    }

    /// The collection NSID text, if present.
    pub fn collection(&self) -> Option<&str> {
        (self.collection_end > self.authority_end)
            .then(|| &self.s[self.authority_end as usize + 1..self.collection_end as usize])
    }

    /// The collection as an [`Nsid`], if present.
    pub fn collection_nsid(&self) -> Option<Nsid> {
        self.collection().map(|c| Nsid(Box::from(c)))
    }

    /// The record key text, if present.
    pub fn rkey(&self) -> Option<&str> {
        ((self.collection_end as usize) < self.s.len())
            .then(|| &self.s[self.collection_end as usize + 1..])
    }

    /// The record key as a [`RecordKey`], if present.
    pub fn record_key(&self) -> Option<RecordKey> {
        self.rkey().map(|r| RecordKey(Box::from(r)))
    }
}

impl Hash for AtUri {
    // Hash like `str` so that `Borrow<str>` is consistent.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

str_traits!(AtUri, "an AT-URI string");

impl From<AtUri> for String {
    fn from(v: AtUri) -> String {
        v.s.into_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Seq
// ---------------------------------------------------------------------------------------------

/// A firehose sequence number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub i64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for Seq {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Seq)
    }
}

impl From<i64> for Seq {
    fn from(v: i64) -> Seq {
        Seq(v)
    }
}

impl From<Seq> for i64 {
    fn from(v: Seq) -> i64 {
        v.0
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path_safe(s: &str) -> bool {
        !s.is_empty()
            && s != "."
            && s != ".."
            && !s
                .bytes()
                .any(|c| c == b'/' || c == b'\\' || c == 0 || c.is_ascii_control())
            && s.is_ascii()
    }

    #[test]
    fn hostile_dids_rejected() {
        for s in [
            "did:plc:../../etc",
            "did:web:a/b",
            "did:web:a\\b",
            "did:plc:abc\0",
            "did:plc:\0",
            "did:plc:a b",
            "did:plc:abc\n",
            "did:plc:é",
            "did:web:..%2F..%2F/",
            "did:plc:",
            "did::abc",
            "..",
            ".",
            "",
        ] {
            assert!(Did::parse(s).is_err(), "accepted {s:?}");
            assert!(!is_valid_did(s), "accepted {s:?}");
        }
    }

    #[test]
    fn hostile_rkeys_rejected() {
        for s in [
            "", ".", "..", "a/b", "/", "../x", "a\\b", "\\", "a\0", "\0", " ", "a b", "a\n", "é",
            "%2F", "a?b", "a#b",
        ] {
            assert!(RecordKey::parse(s).is_err(), "accepted {s:?}");
        }
        assert!(RecordKey::parse(&"a".repeat(513)).is_err());
        assert!(RecordKey::parse(&"a".repeat(512)).is_ok());
        for s in ["...", ".a", "a.", "self", "3jzfcijpj2z2a", "~", ":"] {
            assert!(RecordKey::parse(s).is_ok(), "rejected {s:?}");
        }
    }

    #[test]
    fn did_accessors() {
        let d = Did::parse("did:plc:7iza6de2dwap2sbkpav7c6c6").unwrap();
        assert_eq!(d.method(), "plc");
        assert_eq!(d.method_specific_id(), "7iza6de2dwap2sbkpav7c6c6");
        let d = Did::parse("did:web:localhost%3A1234").unwrap();
        assert_eq!(d.method(), "web");
        assert_eq!(d.method_specific_id(), "localhost%3A1234");
        assert!(Did::parse(&format!("did:plc:{}", "a".repeat(DID_MAX_LEN - 8))).is_ok());
        assert!(Did::parse(&format!("did:plc:{}", "a".repeat(DID_MAX_LEN - 7))).is_err());
    }

    #[test]
    fn handles() {
        let long = format!(
            "shoooort{}.test",
            ".loooooooooooooooooooooooooong".repeat(8)
        );
        assert_eq!(long.len(), 253);
        let max_seg = format!("short.{}.test", "o".repeat(63));
        let valid = [
            "A.ISI.EDU",
            "XX.LCS.MIT.EDU",
            "SRI-NIC.ARPA",
            "john.test",
            "jan.test",
            "a234567890123456789.test",
            "john2.test",
            "john-john.test",
            "john.bsky.app",
            "jo.hn",
            "a.co",
            "a.org",
            "joh.n",
            "j0.h0",
            long.as_str(),
            max_seg.as_str(),
            "jaymome-johnber123456.test",
            "jay.mome-johnber123456.test",
            "john.test.bsky.app",
            "john.t",
            "laptop.local",
            "laptop.arpa",
            "xn--ls8h.test",
            "xn--bcher-kva.tld",
            "expyuzz4wqqyqhjn.onion",
            "friend.expyuzz4wqqyqhjn.onion",
            "12345.test",
            "8.cn",
            "4chan.org",
            "4chan.o-g",
            "blah.4chan.org",
            "thing.a01",
            "120.0.0.1.com",
            "0john.test",
            "9sta--ck.com",
            "handle.invalid",
        ];
        for h in valid {
            assert!(Handle::parse(h).is_ok(), "rejected {h:?}");
        }
        let too_long = format!("{long}x");
        let seg_too_long = format!("short.{}.test", "o".repeat(64));
        let invalid = [
            "",
            "did:thing.test",
            "did:thing",
            "john-.test",
            "john.0",
            "john.-",
            too_long.as_str(),
            seg_too_long.as_str(),
            "xn--bcher-.tld",
            "john..test",
            "jo_hn.test",
            "-john.test",
            ".john.test",
            "jo!hn.test",
            "jo%hn.test",
            "jo&hn.test",
            "jo@hn.test",
            "jo*hn.test",
            "jo|hn.test",
            "jo:hn.test",
            "jo/hn.test",
            "john💩.test",
            "bücher.test",
            "john .test",
            "john.test.",
            "john",
            "john.",
            ".",
            "..",
            "john.123",
            "o.1.2",
            "127.0.0.1",
        ];
        for h in invalid {
            assert!(Handle::parse(h).is_err(), "accepted {h:?}");
        }
        let h = Handle::parse("JoHn.TeST").unwrap();
        assert_eq!(h.normalized().as_str(), "john.test");
        assert_eq!(h.as_str(), "JoHn.TeST");
    }

    #[test]
    fn nsid_accessors() {
        let n = Nsid::parse("app.bsky.feed.post").unwrap();
        assert_eq!(n.authority(), "app.bsky.feed");
        assert_eq!(n.name(), "post");
        for bad in [
            "a.b", "a.b.", ".a.b", "a..b.c", "a.b.c-d", "1a.b.c", "a.b.1c", "a.-b.c",
        ] {
            assert!(Nsid::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn tid_encoding() {
        let t = Tid::parse("3jzfcijpj2z2a").unwrap();
        assert_eq!(Tid::from_u64(t.to_u64()), t);
        assert_eq!(t.to_u64() >> 10, t.timestamp_micros());
        assert_eq!(Tid::from_u64(0).as_str(), "2222222222222");
        assert_eq!(Tid::from_u64(u64::MAX).as_str(), "jzzzzzzzzzzzz");
        assert!(Tid::parse("kzzzzzzzzzzzz").is_err());
        let rk: RecordKey = t.into();
        assert_eq!(rk.as_str(), "3jzfcijpj2z2a");
        assert_eq!(format!("{t:?}"), "Tid(\"3jzfcijpj2z2a\")");
    }

    #[test]
    fn at_uri_accessors() {
        let u = AtUri::parse("at://did:plc:asdf123/com.atproto.feed.post/record").unwrap();
        assert_eq!(u.authority(), "did:plc:asdf123");
        assert_eq!(u.collection(), Some("com.atproto.feed.post"));
        assert_eq!(u.rkey(), Some("record"));
        assert_eq!(u.authority_did().unwrap().as_str(), "did:plc:asdf123");

        let u = AtUri::parse("at://did:plc:asdf123/com.atproto.feed.post").unwrap();
        assert_eq!(u.collection(), Some("com.atproto.feed.post"));
        assert_eq!(u.rkey(), None);

        let u = AtUri::parse("at://user.bsky.social").unwrap();
        assert_eq!(u.authority(), "user.bsky.social");
        assert_eq!(u.collection(), None);
        assert_eq!(u.rkey(), None);
        assert_eq!(u.authority_did(), None);

        let did = Did::parse("did:plc:abc").unwrap();
        let nsid = Nsid::parse("app.bsky.feed.like").unwrap();
        let rkey = RecordKey::parse("3jzfcijpj2z2a").unwrap();
        let u = AtUri::from_parts(&did, &nsid, &rkey);
        assert_eq!(
            u,
            AtUri::parse("at://did:plc:abc/app.bsky.feed.like/3jzfcijpj2z2a").unwrap()
        );
        assert_eq!(u.collection_nsid(), Some(nsid));
        assert_eq!(u.record_key(), Some(rkey));

        assert_eq!(
            AtUri::parse("at://did:plc:abc#frag").unwrap_err().reason(),
            "query and fragment are not allowed"
        );
    }

    #[test]
    fn cid_string() {
        let s = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi";
        let c = CidString::parse(s).unwrap();
        let cid = c.to_cid().unwrap();
        assert_eq!(CidString::from_cid(&cid), c);
        // CIDv0 is rejected as a string but converted to v1 from a decoded CID.
        let v0 = "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR";
        assert!(CidString::parse(v0).is_err());
        let cid0 = Cid::try_from(v0).unwrap();
        let c1 = CidString::from_cid(&cid0);
        assert!(c1.as_str().starts_with('b'));
        assert_eq!(c1.to_cid().unwrap().hash(), cid0.hash());
        assert!(CidString::parse("zzzzzzzzzz").unwrap().to_cid().is_err());
    }

    #[test]
    fn errors_are_truncated() {
        let huge = format!("did:plc:{}", "/".repeat(1_000_000));
        let e = Did::parse(&huge).unwrap_err();
        assert!(e.to_string().len() < 300, "{}", e.to_string().len());
        assert!(e.input().ends_with("(+999908 bytes)"), "{}", e.input());
        // Multi-byte chars are cut on a char boundary.
        let e = RecordKey::parse(&"é".repeat(200)).unwrap_err();
        assert!(e.input().starts_with('é'));
        let e = Nsid::parse("a.b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid NSID \"a.b\": needs at least three segments"
        );
    }

    #[test]
    fn serde_round_trip() {
        let d: Did = serde_json::from_str("\"did:plc:abc\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"did:plc:abc\"");
        assert!(serde_json::from_str::<Did>("\"did:plc:a/b\"").is_err());
        assert!(serde_json::from_str::<Did>("12").is_err());
        assert!(serde_json::from_value::<RecordKey>(serde_json::json!("..")).is_err());
        let t: Tid = serde_json::from_value(serde_json::json!("3jzfcijpj2z2a")).unwrap();
        assert_eq!(
            serde_json::to_value(t).unwrap(),
            serde_json::json!("3jzfcijpj2z2a")
        );
        let u: AtUri = serde_json::from_str("\"at://did:plc:abc/app.bsky.feed.post/x\"").unwrap();
        assert_eq!(u.rkey(), Some("x"));
        let s: Seq = serde_json::from_str("42").unwrap();
        assert_eq!(s, Seq(42));
        assert_eq!(serde_json::to_string(&s).unwrap(), "42");
        assert_eq!(s.to_string(), "42");
    }

    #[test]
    fn borrow_str_lookup() {
        let mut m = std::collections::HashMap::new();
        m.insert(Did::parse("did:plc:abc").unwrap(), 1);
        m.insert(Did::parse("did:plc:def").unwrap(), 2);
        assert_eq!(m.get("did:plc:def"), Some(&2));
        let mut m = std::collections::HashSet::new();
        m.insert(Tid::parse("3jzfcijpj2z2a").unwrap());
        assert!(m.contains("3jzfcijpj2z2a"));
        let mut m = std::collections::HashSet::new();
        m.insert(AtUri::parse("at://did:plc:abc/app.bsky.feed.post/x").unwrap());
        assert!(m.contains("at://did:plc:abc/app.bsky.feed.post/x"));
    }

    proptest! {
        #[test]
        fn arbitrary_strings_are_path_safe(s in any::<String>()) {
            if Did::parse(&s).is_ok() {
                prop_assert!(path_safe(&s));
            }
            if RecordKey::parse(&s).is_ok() {
                prop_assert!(path_safe(&s));
            }
        }

        #[test]
        fn near_miss_dids_are_path_safe(
            s in r"did:[a-z]{1,4}:[a-zA-Z0-9._:%/\\\x00 -]{0,12}"
        ) {
            let ok = Did::parse(&s).is_ok();
            prop_assert_eq!(ok, is_valid_did(&s));
            if ok {
                prop_assert!(path_safe(&s));
            }
            // Completeness: only the forbidden chars / trailing ':' or '%' cause rejection.
            let msid = &s[s[4..].find(':').unwrap() + 5..];
            let clean = !msid.is_empty()
                && msid.bytes().all(|c| c.is_ascii_alphanumeric() || b"._:%-".contains(&c))
                && !msid.ends_with(':')
                && !msid.ends_with('%');
            prop_assert_eq!(ok, clean);
        }

        #[test]
        fn near_miss_rkeys_are_path_safe(s in r"[a-zA-Z0-9._:~/\\\x00 -]{0,6}") {
            let ok = RecordKey::parse(&s).is_ok();
            prop_assert_eq!(ok, is_valid_record_key(&s));
            if ok {
                prop_assert!(path_safe(&s));
            }
            let clean = !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"._:~-".contains(&c));
            prop_assert_eq!(ok, clean);
        }

        #[test]
        fn from_parts_round_trips(
            did in r"did:[a-z]{1,5}:[a-zA-Z0-9._:%-]{0,20}[a-zA-Z0-9._-]",
            nsid in r"[a-z][a-z0-9-]{0,5}[a-z0-9]\.[a-z0-9]{1,6}\.[a-zA-Z][a-zA-Z0-9]{0,8}",
            rkey in r"[a-zA-Z0-9._:~-]{3,20}",
        ) {
            let (did, nsid, rkey) = (
                Did::parse(&did).unwrap(),
                Nsid::parse(&nsid).unwrap(),
                RecordKey::parse(&rkey).unwrap(),
            );
            let u = AtUri::from_parts(&did, &nsid, &rkey);
            let p = AtUri::parse(u.as_str()).unwrap();
            prop_assert_eq!(&p, &u);
            prop_assert_eq!(p.authority(), did.as_str());
            prop_assert_eq!(p.collection(), Some(nsid.as_str()));
            prop_assert_eq!(p.rkey(), Some(rkey.as_str()));
            prop_assert_eq!(p.authority_did(), Some(did));
        }

        #[test]
        fn tid_round_trips_and_orders(a in any::<u64>(), b in any::<u64>()) {
            let (ta, tb) = (Tid::from_u64(a), Tid::from_u64(b));
            prop_assert_eq!(Tid::parse(ta.as_str()).unwrap(), ta);
            prop_assert_eq!(ta.to_u64(), a);
            prop_assert_eq!(a.cmp(&b), ta.cmp(&tb));
            prop_assert_eq!(a.cmp(&b), ta.as_str().cmp(tb.as_str()));
        }

        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = (
                Did::parse(&s),
                Handle::parse(&s),
                Nsid::parse(&s),
                RecordKey::parse(&s),
                Tid::parse(&s),
                AtUri::parse(&s),
                CidString::parse(&s),
            );
        }
    }
}
