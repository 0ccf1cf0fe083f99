//! atproto signing keys and signatures: parsing public keys (Multikey, `did:key`, legacy DID
//! document multibase) and checking commit signatures (ECDSA over SHA-256, compact, low-S only).
//!
//! K-256 goes through libsecp256k1 (the `secp256k1` crate), about 3x faster than the pure-Rust
//! `k256` (see `benches/verify_sig.rs`); P-256 goes through `p256`. A [`PublicKey`] holds the
//! already-decompressed point so [`PublicKey::verify`] does no key parsing.
//!
//! Nothing here panics on hostile input: every malformed key or signature is a [`KeyError`] or
//! [`SigError`] with a stable metric label from `reason()`.

use std::fmt;
use std::sync::OnceLock;

use p256::ecdsa::signature::Verifier;
use sha2::{Digest, Sha256};

/// Multicodec varint of `secp256k1-pub` (0xe7).
const MULTICODEC_K256: [u8; 2] = [0xe7, 0x01];
/// Multicodec varint of `p256-pub` (0x1200).
const MULTICODEC_P256: [u8; 2] = [0x80, 0x24];
/// SEC1 compressed point length for both curves.
pub const COMPRESSED_KEY_LEN: usize = 33;
/// SEC1 uncompressed point length for both curves (legacy DID documents only).
const UNCOMPRESSED_KEY_LEN: usize = 65;
/// Compact `r || s` signature length.
pub const SIGNATURE_LEN: usize = 64;
/// Longest multibase key string accepted. The longest legitimate form (legacy uncompressed key,
/// 65 bytes) is 90 chars; the cap keeps base58 decoding (quadratic) cheap on hostile input.
const MULTIBASE_MAX_LEN: usize = 128;
const DID_KEY_PREFIX: &str = "did:key:";

/// The two curves atproto signing keys may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// secp256k1 (`ES256K`).
    K256,
    /// NIST P-256 / secp256r1 (`ES256`).
    P256,
}

impl KeyType {
    /// The JWT algorithm name atproto uses for this curve.
    pub fn jwt_alg(self) -> &'static str {
        match self {
            KeyType::K256 => "ES256K",
            KeyType::P256 => "ES256",
        }
    }

    fn multicodec(self) -> [u8; 2] {
        match self {
            KeyType::K256 => MULTICODEC_K256,
            KeyType::P256 => MULTICODEC_P256,
        }
    }
}

/// A key string or key bytes could not be turned into a public key.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    #[error("empty key string")]
    Empty,
    #[error("key string of {0} bytes is too long")]
    TooLong(usize),
    #[error("not a did:key (missing \"did:key:\" prefix)")]
    NotDidKey,
    #[error("multibase prefix is not 'z' (base58btc)")]
    MultibasePrefix,
    #[error("invalid base58btc")]
    Base58,
    #[error("malformed multicodec varint")]
    BadMulticodec,
    #[error("unsupported multicodec {0:#x} (want secp256k1-pub 0xe7 or p256-pub 0x1200)")]
    UnsupportedMulticodec(u64),
    #[error("{key_type:?} key of {len} bytes, expected {expected}")]
    Length {
        key_type: KeyType,
        len: usize,
        expected: &'static str,
    },
    #[error("{0:?} key bytes are not a valid curve point")]
    InvalidPoint(KeyType),
}

impl KeyError {
    /// Short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::Empty => "empty",
            KeyError::TooLong(_) => "too_long",
            KeyError::NotDidKey => "not_did_key",
            KeyError::MultibasePrefix => "bad_multibase_prefix",
            KeyError::Base58 => "bad_base58",
            KeyError::BadMulticodec => "bad_multicodec",
            KeyError::UnsupportedMulticodec(_) => "unsupported_multicodec",
            KeyError::Length { .. } => "bad_key_length",
            KeyError::InvalidPoint(_) => "invalid_point",
        }
    }
}

/// A signature was rejected.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SigError {
    /// Not 64 bytes; DER-encoded signatures land here (atproto allows only compact `r || s`).
    #[error("signature is {0} bytes, expected {SIGNATURE_LEN} (compact r||s)")]
    Length(usize),
    /// Mathematically valid or not, a high-S signature is invalid in atproto (malleability).
    #[error("signature S value is high (atproto requires low-S)")]
    HighS,
    /// Does not verify against this key and message (including r or s out of range).
    #[error("signature does not verify")]
    Invalid,
}

impl SigError {
    /// Short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SigError::Length(_) => "bad_signature_length",
            SigError::HighS => "high_s_signature",
            SigError::Invalid => "bad_signature",
        }
    }
}

/// A parsed atproto signing public key (compressed point), ready to verify.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(Inner);

#[derive(Clone, PartialEq, Eq)]
enum Inner {
    K256(secp256k1::PublicKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// One verification-only libsecp256k1 context for the process: creating one per call would cost
/// more than the verification itself.
fn secp() -> &'static secp256k1::Secp256k1<secp256k1::VerifyOnly> {
    static CTX: OnceLock<secp256k1::Secp256k1<secp256k1::VerifyOnly>> = OnceLock::new();
    CTX.get_or_init(secp256k1::Secp256k1::verification_only)
}

impl PublicKey {
    /// atproto Multikey: 'z' + base58btc( multicodec varint (0xe7 0x01 = secp256k1-pub, 0x80 0x24
    /// = p256-pub) + 33-byte compressed point ).
    pub fn from_multikey(multibase: &str) -> Result<PublicKey, KeyError> {
        let bytes = decode_multibase(multibase)?;
        let (codec, len) = read_varint(&bytes).ok_or(KeyError::BadMulticodec)?;
        let key_type = match codec {
            0xe7 => KeyType::K256,
            0x1200 => KeyType::P256,
            other => return Err(KeyError::UnsupportedMulticodec(other)),
        };
        PublicKey::from_compressed(key_type, &bytes[len..])
    }

    /// "did:key:" + multikey.
    pub fn from_did_key(did_key: &str) -> Result<PublicKey, KeyError> {
        if did_key.is_empty() {
            return Err(KeyError::Empty);
        }
        let multikey = did_key
            .strip_prefix(DID_KEY_PREFIX)
            .ok_or(KeyError::NotDidKey)?;
        PublicKey::from_multikey(multikey)
    }

    /// Legacy DID-document forms (`EcdsaSecp256k1VerificationKey2019` /
    /// `EcdsaSecp256r1VerificationKey2019`): multibase of the raw SEC1 key bytes, no multicodec
    /// prefix, compressed or uncompressed point.
    pub fn from_legacy_multibase(
        key_type: KeyType,
        multibase: &str,
    ) -> Result<PublicKey, KeyError> {
        let bytes = decode_multibase(multibase)?;
        // libsecp256k1 also accepts 65-byte "hybrid" keys (tag 0x06/0x07) that p256 rejects;
        // checking the tag here makes both curves accept exactly the standard SEC1 forms.
        let tag_ok = match bytes.len() {
            COMPRESSED_KEY_LEN => matches!(bytes[0], 0x02 | 0x03),
            UNCOMPRESSED_KEY_LEN => bytes[0] == 0x04,
            len => {
                return Err(KeyError::Length {
                    key_type,
                    len,
                    expected: "33 (compressed) or 65 (uncompressed)",
                })
            }
        };
        if !tag_ok {
            return Err(KeyError::InvalidPoint(key_type));
        }
        from_sec1(key_type, &bytes)
    }

    /// A SEC1 compressed point (33 bytes, leading 0x02 or 0x03).
    pub fn from_compressed(key_type: KeyType, bytes: &[u8]) -> Result<PublicKey, KeyError> {
        if bytes.len() != COMPRESSED_KEY_LEN {
            return Err(KeyError::Length {
                key_type,
                len: bytes.len(),
                expected: "33 (compressed point)",
            });
        }
        if !matches!(bytes[0], 0x02 | 0x03) {
            return Err(KeyError::InvalidPoint(key_type));
        }
        from_sec1(key_type, bytes)
    }

    pub fn key_type(&self) -> KeyType {
        match self.0 {
            Inner::K256(_) => KeyType::K256,
            Inner::P256(_) => KeyType::P256,
        }
    }

    /// The SEC1 compressed point.
    pub fn to_compressed(&self) -> [u8; COMPRESSED_KEY_LEN] {
        match &self.0 {
            Inner::K256(k) => k.serialize(),
            Inner::P256(k) => {
                let mut out = [0u8; COMPRESSED_KEY_LEN];
                // A valid VerifyingKey always encodes to exactly 33 bytes compressed.
                out.copy_from_slice(k.to_encoded_point(true).as_bytes());
                out
            }
        }
    }

    /// 'z' + base58btc(multicodec + compressed point).
    pub fn to_multikey(&self) -> String {
        let mut raw = [0u8; 2 + COMPRESSED_KEY_LEN];
        raw[..2].copy_from_slice(&self.key_type().multicodec());
        raw[2..].copy_from_slice(&self.to_compressed());
        let mut out = String::with_capacity(50);
        out.push('z');
        out.push_str(&bs58::encode(raw).into_string());
        out
    }

    /// "did:key:" + [`PublicKey::to_multikey`].
    pub fn to_did_key(&self) -> String {
        let mut out = String::from(DID_KEY_PREFIX);
        out.push_str(&self.to_multikey());
        out
    }

    /// atproto signature check: ECDSA over SHA-256(message), signature exactly 64 bytes compact
    /// r||s, low-S only (high-S and DER fail).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SigError> {
        if signature.len() != SIGNATURE_LEN {
            return Err(SigError::Length(signature.len()));
        }
        match &self.0 {
            Inner::K256(key) => {
                let sig = secp256k1::ecdsa::Signature::from_compact(signature)
                    .map_err(|_| SigError::Invalid)?;
                // libsecp256k1 would reject high-S too, but only as a plain failure; the
                // distinct reason tells a non-normalizing signer from a forgery.
                let mut low = sig;
                low.normalize_s();
                if low != sig {
                    return Err(SigError::HighS);
                }
                let digest: [u8; 32] = Sha256::digest(message).into();
                secp()
                    .verify_ecdsa(&secp256k1::Message::from_digest(digest), &sig, key)
                    .map_err(|_| SigError::Invalid)
            }
            Inner::P256(key) => {
                let sig =
                    p256::ecdsa::Signature::from_slice(signature).map_err(|_| SigError::Invalid)?;
                // p256 verification accepts high-S, so this check is what enforces atproto's rule.
                if sig.normalize_s().is_some() {
                    return Err(SigError::HighS);
                }
                key.verify(message, &sig).map_err(|_| SigError::Invalid)
            }
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_did_key())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_did_key())
    }
}

/// Parses a SEC1 point whose length and tag byte the caller has already checked.
fn from_sec1(key_type: KeyType, bytes: &[u8]) -> Result<PublicKey, KeyError> {
    let inner = match key_type {
        KeyType::K256 => secp256k1::PublicKey::from_slice(bytes)
            .map(Inner::K256)
            .ok(),
        KeyType::P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
            .map(Inner::P256)
            .ok(),
    };
    inner.map(PublicKey).ok_or(KeyError::InvalidPoint(key_type))
}

/// 'z' + base58btc → bytes.
fn decode_multibase(multibase: &str) -> Result<Vec<u8>, KeyError> {
    if multibase.is_empty() {
        return Err(KeyError::Empty);
    }
    if multibase.len() > MULTIBASE_MAX_LEN {
        return Err(KeyError::TooLong(multibase.len()));
    }
    let b58 = multibase
        .strip_prefix('z')
        .ok_or(KeyError::MultibasePrefix)?;
    if b58.is_empty() {
        return Err(KeyError::Empty);
    }
    bs58::decode(b58).into_vec().map_err(|_| KeyError::Base58)
}

/// Unsigned LEB128 varint as multicodec uses it (at most 9 bytes, minimal encoding): (value,
/// bytes consumed), or `None` if truncated, overlong or non-minimal.
fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(9) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // A trailing zero byte would be a second encoding of the same value.
            if b == 0 && i > 0 {
                return None;
            }
            return Some((value, i + 1));
        }
    }
    None
}
