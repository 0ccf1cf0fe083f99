//! Signing keys, signatures and DID documents (`sync_core::crypto`, `sync_core::did_doc`): the
//! atproto interop crypto fixtures, the relay capture's DID documents, signatures made here on
//! both curves (valid, tampered, wrong key, high-S), and hostile keys and documents.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sync_core::crypto::{KeyError, KeyType, PublicKey, SigError};
use sync_core::did_doc::{parse_did_doc_map, parse_did_document, DidDocError};
use sync_core::ids::Did;
use sync_core::synth::SplitMix64;

/// Standard alphabet, padding optional (the interop fixtures omit it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// secp256k1 group order n, big-endian.
const K256_N: [u8; 32] = hex32("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141");
/// P-256 group order n, big-endian.
const P256_N: [u8; 32] = hex32("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");

const fn hex32(s: &str) -> [u8; 32] {
    let b = s.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(b[2 * i]) << 4) | nibble(b[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not a lowercase hex digit"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn load(rel: &str) -> Option<Value> {
    let path = crate::fixtures()?.join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn did(s: &str) -> Did {
    Did::parse(s).expect("test DID")
}

/// A deterministic secret key: SHA-256 of the label (valid on both curves with overwhelming
/// probability, and checked by the key constructors).
fn secret(label: &str) -> [u8; 32] {
    Sha256::digest(label.as_bytes()).into()
}

/// (public key, compact low-S signature over `msg`) for a K-256 key, signed by libsecp256k1.
fn sign_k256(label: &str, msg: &[u8]) -> (PublicKey, [u8; 64]) {
    let secp = secp256k1::Secp256k1::signing_only();
    let sk = secp256k1::SecretKey::from_byte_array(&secret(label)).expect("secret key");
    let pk = secp256k1::PublicKey::from_secret_key(&secp, &sk);
    let digest: [u8; 32] = Sha256::digest(msg).into();
    let sig = secp.sign_ecdsa(&secp256k1::Message::from_digest(digest), &sk);
    let key = PublicKey::from_compressed(KeyType::K256, &pk.serialize()).expect("own key");
    (key, sig.serialize_compact())
}

/// (public key, compact low-S signature over `msg`) for a P-256 key.
fn sign_p256(label: &str, msg: &[u8]) -> (PublicKey, [u8; 64]) {
    let sk = p256::ecdsa::SigningKey::from_slice(&secret(label)).expect("secret key");
    let sig: p256::ecdsa::Signature = sk.sign(msg);
    // p256 does not normalize S itself; atproto signers must.
    let sig = sig.normalize_s().unwrap_or(sig);
    let point = sk.verifying_key().to_encoded_point(true);
    let key = PublicKey::from_compressed(KeyType::P256, point.as_bytes()).expect("own key");
    let mut out = [0u8; 64];
    out.copy_from_slice(&sig.to_bytes());
    (key, out)
}

/// The same signature with s replaced by n - s.
fn high_s(sig: &[u8; 64], n: &[u8; 32]) -> [u8; 64] {
    let mut out = *sig;
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(n[i]) - i16::from(sig[32 + i]) - borrow;
        borrow = i16::from(d < 0);
        out[32 + i] = d.rem_euclid(256) as u8;
    }
    assert_eq!(borrow, 0, "s > n");
    out
}

fn reason<T: std::fmt::Debug>(r: Result<T, KeyError>) -> &'static str {
    match r {
        Ok(v) => panic!("expected a key error, got {v:?}"),
        Err(e) => e.reason(),
    }
}

fn doc_reason<T: std::fmt::Debug>(r: Result<T, DidDocError>) -> &'static str {
    match r {
        Ok(v) => panic!("expected a DID document error, got {v:?}"),
        Err(e) => e.reason(),
    }
}

fn multikey_bytes(prefix: &[u8], body: &[u8]) -> String {
    let mut raw = prefix.to_vec();
    raw.extend_from_slice(body);
    format!("z{}", bs58::encode(raw).into_string())
}

// ---------------------------------------------------------------------------------------------
// Interop fixtures
// ---------------------------------------------------------------------------------------------

#[test]
fn signature_fixtures_verify_as_expected_with_both_key_forms() {
    let Some(vectors) = load("interop/crypto/signature-fixtures.json") else {
        return;
    };
    let vectors = vectors.as_array().expect("array of vectors");
    assert!(vectors.len() >= 6, "only {} vectors", vectors.len());
    let mut tagged = 0;
    for v in vectors {
        let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}"));
        let comment = s("comment");
        let key_type = match s("didDocSuite") {
            "EcdsaSecp256k1VerificationKey2019" => KeyType::K256,
            "EcdsaSecp256r1VerificationKey2019" => KeyType::P256,
            other => panic!("{comment}: suite {other}"),
        };
        let from_did = PublicKey::from_did_key(s("publicKeyDid")).expect(comment);
        let legacy =
            PublicKey::from_legacy_multibase(key_type, s("publicKeyMultibase")).expect(comment);
        assert_eq!(from_did, legacy, "{comment}: both forms name the same key");
        assert_eq!(from_did.key_type(), key_type, "{comment}");
        assert_eq!(key_type.jwt_alg(), s("algorithm"), "{comment}");
        assert_eq!(
            from_did.to_did_key(),
            s("publicKeyDid"),
            "{comment}: did:key round trip"
        );

        let message = B64.decode(s("messageBase64")).expect(comment);
        let signature = B64.decode(s("signatureBase64")).expect(comment);
        let valid = v["validSignature"].as_bool().expect(comment);
        let tags: Vec<&str> = v["tags"]
            .as_array()
            .expect(comment)
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for key in [&from_did, &legacy] {
            let result = key.verify(&message, &signature);
            assert_eq!(result.is_ok(), valid, "{comment}: {result:?}");
            if tags.contains(&"high-s") {
                assert_eq!(result, Err(SigError::HighS), "{comment}");
            }
            if tags.contains(&"der-encoded") {
                assert_eq!(
                    result.map_err(|e| e.reason()),
                    Err("bad_signature_length"),
                    "{comment}"
                );
            }
        }
        tagged += usize::from(!tags.is_empty());
    }
    assert!(
        tagged >= 4,
        "expected high-s and der vectors for both curves, saw {tagged}"
    );
}

/// Private key bytes of a W3C did:key vector (hex for K-256, base58 for P-256).
fn w3c_private_key(v: &Value) -> Vec<u8> {
    if let Some(h) = v["privateKeyBytesHex"].as_str() {
        hex(h)
    } else if let Some(b) = v["privateKeyBytesBase58"].as_str() {
        bs58::decode(b).into_vec().expect("base58 private key")
    } else {
        panic!("no private key in {v}")
    }
}

fn check_w3c(rel: &str, key_type: KeyType, derive: impl Fn(&[u8]) -> [u8; 33]) {
    let Some(vectors) = load(rel) else {
        return;
    };
    let vectors = vectors.as_array().expect("array of vectors");
    assert!(!vectors.is_empty());
    for v in vectors {
        let expected = v["publicDidKey"].as_str().expect("publicDidKey");
        let point = derive(&w3c_private_key(v));
        let key = PublicKey::from_compressed(key_type, &point).expect(expected);
        assert_eq!(key.to_did_key(), expected);
        assert_eq!(key.to_compressed(), point);
        let parsed = PublicKey::from_did_key(expected).expect(expected);
        assert_eq!(parsed, key);
        assert_eq!(parsed.key_type(), key_type);
        assert_eq!(parsed.to_did_key(), expected);
        assert_eq!(PublicKey::from_multikey(&parsed.to_multikey()), Ok(key));
    }
}

#[test]
fn w3c_did_key_k256_vectors_encode_and_round_trip() {
    check_w3c("interop/crypto/w3c_didkey_K256.json", KeyType::K256, |sk| {
        let secp = secp256k1::Secp256k1::signing_only();
        let sk = secp256k1::SecretKey::from_slice(sk).expect("K-256 secret");
        secp256k1::PublicKey::from_secret_key(&secp, &sk).serialize()
    });
}

#[test]
fn w3c_did_key_p256_vectors_encode_and_round_trip() {
    check_w3c("interop/crypto/w3c_didkey_P256.json", KeyType::P256, |sk| {
        let sk = p256::SecretKey::from_slice(sk).expect("P-256 secret");
        let point = sk.public_key().to_encoded_point(true);
        point.as_bytes().try_into().expect("33 bytes")
    });
}

// ---------------------------------------------------------------------------------------------
// Relay capture DID documents
// ---------------------------------------------------------------------------------------------

#[test]
fn relay_capture_did_docs_all_parse() {
    let Some(root) = crate::fixtures() else {
        return;
    };
    let text =
        std::fs::read_to_string(root.join("relay-capture/did_docs.json")).expect("did_docs.json");
    let raw: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("JSON object");
    assert!(!raw.is_empty());

    for (d, doc) in &raw {
        let did = did(d);
        let id = parse_did_document(&did, doc).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(id.did, did);
        assert!(matches!(
            id.signing_key.key_type(),
            KeyType::K256 | KeyType::P256
        ));
        let pds = id
            .pds_endpoint
            .as_deref()
            .unwrap_or_else(|| panic!("{d}: no PDS"));
        assert!(pds.starts_with("https://"), "{d}: {pds}");
        // The key re-encodes to exactly the document's Multikey string.
        let listed = doc["verificationMethod"][0]["publicKeyMultibase"]
            .as_str()
            .expect("key");
        assert_eq!(id.signing_key.to_multikey(), listed, "{d}");
        if let Some(h) = &id.handle {
            assert!(!h.starts_with("at://") && !h.is_empty(), "{d}: {h}");
        }
    }

    let map = parse_did_doc_map(&text).expect("map parses");
    assert_eq!(map.len(), raw.len());
    for (d, doc) in &raw {
        let did = did(d);
        let from_map = map.get(&did).unwrap_or_else(|| panic!("{d} missing"));
        assert_eq!(
            from_map.as_ref().ok(),
            parse_did_document(&did, doc).as_ref().ok(),
            "{d}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures made here
// ---------------------------------------------------------------------------------------------

#[test]
fn own_signatures_verify_and_tampering_fails_on_both_curves() {
    let msg = b"commit bytes to sign";
    for (name, sign) in [
        (
            "K-256",
            sign_k256 as fn(&str, &[u8]) -> (PublicKey, [u8; 64]),
        ),
        ("P-256", sign_p256),
    ] {
        let (key, sig) = sign("alice", msg);
        assert_eq!(key.verify(msg, &sig), Ok(()), "{name}");

        let (other_key, other_sig) = sign("bob", msg);
        assert_ne!(key, other_key);
        assert_eq!(
            other_key.verify(msg, &sig),
            Err(SigError::Invalid),
            "{name}: wrong key"
        );
        assert_eq!(
            key.verify(msg, &other_sig),
            Err(SigError::Invalid),
            "{name}: other's sig"
        );

        let mut flipped = sig;
        flipped[5] ^= 0x01; // inside r, so S stays low
        assert_eq!(
            key.verify(msg, &flipped),
            Err(SigError::Invalid),
            "{name}: flipped byte"
        );
        let mut flipped_s = sig;
        flipped_s[63] ^= 0x01; // low bit of s: S stays low
        assert_eq!(
            key.verify(msg, &flipped_s),
            Err(SigError::Invalid),
            "{name}: flipped s"
        );

        let mut msg2 = msg.to_vec();
        msg2[0] ^= 0x20;
        assert_eq!(
            key.verify(&msg2, &sig),
            Err(SigError::Invalid),
            "{name}: other message"
        );

        assert_eq!(
            key.verify(msg, &sig[..63]),
            Err(SigError::Length(63)),
            "{name}"
        );
        assert_eq!(key.verify(msg, &[]), Err(SigError::Length(0)), "{name}");
        let mut long = sig.to_vec();
        long.push(0);
        assert_eq!(
            key.verify(msg, &long).map_err(|e| e.reason()),
            Err("bad_signature_length")
        );
        // r = 0 / s = 0 and r, s >= n are not signatures at all.
        assert_eq!(
            key.verify(msg, &[0u8; 64]),
            Err(SigError::Invalid),
            "{name}: zeros"
        );
        assert_eq!(
            key.verify(msg, &[0xffu8; 64]),
            Err(SigError::Invalid),
            "{name}: ones"
        );

        // Parsing the key back from its string forms verifies the same signature.
        assert_eq!(
            PublicKey::from_did_key(&key.to_did_key())
                .unwrap()
                .verify(msg, &sig),
            Ok(())
        );
    }
}

#[test]
fn high_s_variant_of_a_valid_signature_is_rejected_with_its_own_reason() {
    let msg = b"malleable?";
    let (key, sig) = sign_k256("carol", msg);
    let high = high_s(&sig, &K256_N);
    // The variant really is the same signature with S negated (libsecp256k1 normalizes it back).
    let mut back = secp256k1::ecdsa::Signature::from_compact(&high).expect("parses");
    back.normalize_s();
    assert_eq!(back.serialize_compact(), sig);
    let err = key.verify(msg, &high).expect_err("high-S must fail");
    assert_eq!(err, SigError::HighS);
    assert_eq!(err.reason(), "high_s_signature");

    let (key, sig) = sign_p256("carol", msg);
    let high = high_s(&sig, &P256_N);
    let parsed = p256::ecdsa::Signature::from_slice(&high).expect("parses");
    let normalized = parsed.normalize_s().expect("is high");
    assert_eq!(normalized.to_bytes().as_slice(), &sig[..]);
    // p256 itself accepts it; only our low-S rule rejects it.
    {
        use p256::ecdsa::signature::Verifier;
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.to_compressed()).unwrap();
        assert!(vk.verify(msg, &parsed).is_ok());
    }
    let err = key.verify(msg, &high).expect_err("high-S must fail");
    assert_eq!(err.reason(), "high_s_signature");
}

#[test]
fn legacy_uncompressed_keys_parse_to_the_compressed_key() {
    let secp = secp256k1::Secp256k1::signing_only();
    let sk = secp256k1::SecretKey::from_byte_array(&secret("dave")).unwrap();
    let pk = secp256k1::PublicKey::from_secret_key(&secp, &sk);
    let uncompressed = format!(
        "z{}",
        bs58::encode(pk.serialize_uncompressed()).into_string()
    );
    let compressed = format!("z{}", bs58::encode(pk.serialize()).into_string());
    let a = PublicKey::from_legacy_multibase(KeyType::K256, &uncompressed).unwrap();
    let b = PublicKey::from_legacy_multibase(KeyType::K256, &compressed).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.to_compressed(), pk.serialize());

    let sk = p256::SecretKey::from_slice(&secret("dave")).unwrap();
    let point = sk.public_key().to_encoded_point(false);
    let uncompressed = format!("z{}", bs58::encode(point.as_bytes()).into_string());
    let a = PublicKey::from_legacy_multibase(KeyType::P256, &uncompressed).unwrap();
    assert_eq!(a.key_type(), KeyType::P256);
    assert_eq!(
        a.to_compressed().as_slice(),
        sk.public_key().to_encoded_point(true).as_bytes()
    );

    // A K-256 point is (almost surely) not a P-256 point, and the legacy type decides the curve.
    let k_uncompressed = format!(
        "z{}",
        bs58::encode(pk.serialize_uncompressed()).into_string()
    );
    assert_eq!(
        reason(PublicKey::from_legacy_multibase(
            KeyType::P256,
            &k_uncompressed
        )),
        "invalid_point"
    );
    // Hybrid encoding (tag 0x06/0x07), which libsecp256k1 alone would accept.
    let mut hybrid = pk.serialize_uncompressed();
    hybrid[0] = 0x06 | (hybrid[64] & 1);
    let hybrid = format!("z{}", bs58::encode(hybrid).into_string());
    assert_eq!(
        reason(PublicKey::from_legacy_multibase(KeyType::K256, &hybrid)),
        "invalid_point"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile keys
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_key_strings_fail_with_specific_reasons() {
    let (k_key, _) = sign_k256("erin", b"");
    let (p_key, _) = sign_p256("erin", b"");
    let good_k = k_key.to_multikey();
    let k_point = k_key.to_compressed();

    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("z".into(), "empty"),
        (good_k[1..].to_owned(), "bad_multibase_prefix"),
        (format!("f{}", &good_k[1..]), "bad_multibase_prefix"),
        (format!("Z{}", &good_k[1..]), "bad_multibase_prefix"),
        ("z0OIl".into(), "bad_base58"),
        ("zQ3sh é".into(), "bad_base58"),
        ("z Q3sh".into(), "bad_base58"),
        (format!("z{}", "1".repeat(500)), "too_long"),
        (multikey_bytes(&[0x80], &[]), "bad_multicodec"),
        (multikey_bytes(&[0xe7], &[]), "bad_multicodec"),
        (multikey_bytes(&[0xff; 12], &[]), "bad_multicodec"),
        // ed25519-pub (0xed), a key type atproto does not use.
        (
            multikey_bytes(&[0xed, 0x01], &[7u8; 32]),
            "unsupported_multicodec",
        ),
        // Raw key with no multicodec: the point tag 0x02 is read as a varint.
        (multikey_bytes(&[], &k_point), "unsupported_multicodec"),
        (
            multikey_bytes(&[0xe7, 0x01], &k_point[..32]),
            "bad_key_length",
        ),
        (
            multikey_bytes(&[0xe7, 0x01], &[k_point.as_slice(), &[0]].concat()),
            "bad_key_length",
        ),
        (multikey_bytes(&[0xe7, 0x01], &[]), "bad_key_length"),
        (multikey_bytes(&[0x80, 0x24], &[4u8; 65]), "bad_key_length"),
        (
            multikey_bytes(&[0xe7, 0x01], &[[0x04].as_slice(), &k_point[1..]].concat()),
            "invalid_point",
        ),
        (
            multikey_bytes(&[0xe7, 0x01], &[[0x00].as_slice(), &k_point[1..]].concat()),
            "invalid_point",
        ),
        // x >= p is not a field element on either curve.
        (
            multikey_bytes(&[0xe7, 0x01], &[[0x02].as_slice(), &[0xff; 32]].concat()),
            "invalid_point",
        ),
        (
            multikey_bytes(&[0x80, 0x24], &[[0x03].as_slice(), &[0xff; 32]].concat()),
            "invalid_point",
        ),
    ];
    for (input, want) in &cases {
        assert_eq!(
            reason(PublicKey::from_multikey(input)),
            *want,
            "multikey {input:?}"
        );
        if !input.is_empty() {
            let did_key = format!("did:key:{input}");
            assert_eq!(
                reason(PublicKey::from_did_key(&did_key)),
                *want,
                "{did_key:?}"
            );
        }
    }

    assert_eq!(reason(PublicKey::from_did_key("")), "empty");
    assert_eq!(reason(PublicKey::from_did_key("did:key:")), "empty");
    assert_eq!(reason(PublicKey::from_did_key(&good_k)), "not_did_key");
    assert_eq!(
        reason(PublicKey::from_did_key(&format!("did:web:{good_k}"))),
        "not_did_key"
    );
    assert_eq!(
        reason(PublicKey::from_did_key(&format!("DID:KEY:{good_k}"))),
        "not_did_key"
    );

    // Legacy form: a Multikey (with its multicodec prefix) is the wrong length for a raw point.
    assert_eq!(
        reason(PublicKey::from_legacy_multibase(KeyType::K256, &good_k)),
        "bad_key_length"
    );
    assert_eq!(
        reason(PublicKey::from_legacy_multibase(KeyType::P256, "")),
        "empty"
    );
    assert_eq!(
        reason(PublicKey::from_legacy_multibase(KeyType::K256, "zzzz!")),
        "bad_base58"
    );

    // Compressed bytes.
    assert_eq!(
        reason(PublicKey::from_compressed(KeyType::K256, &[])),
        "bad_key_length"
    );
    assert_eq!(
        reason(PublicKey::from_compressed(KeyType::P256, &[2u8; 65])),
        "bad_key_length"
    );
    assert_eq!(
        PublicKey::from_compressed(KeyType::P256, &p_key.to_compressed()),
        Ok(p_key.clone())
    );

    // An x coordinate that is a field element but has no point on the curve, found by search
    // (about half of all x qualify), on each curve.
    for key_type in [KeyType::K256, KeyType::P256] {
        let mut on = 0;
        let mut off = 0;
        for x in 1u8..=40 {
            let mut bytes = [0u8; 33];
            bytes[0] = 0x02;
            bytes[32] = x;
            match PublicKey::from_compressed(key_type, &bytes) {
                Ok(k) => {
                    on += 1;
                    assert_eq!(k.to_compressed(), bytes);
                }
                Err(e) => {
                    off += 1;
                    assert_eq!(e, KeyError::InvalidPoint(key_type));
                }
            }
        }
        assert!(
            on > 0 && off > 0,
            "{key_type:?}: {on} on the curve, {off} off"
        );
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = SplitMix64(0xC0FFEE);
    let (k_key, k_sig) = sign_k256("frank", b"m");
    let (p_key, p_sig) = sign_p256("frank", b"m");
    let prefixes: [&[u8]; 4] = [&[0xe7, 0x01], &[0x80, 0x24], &[], &[0xe7]];
    // Few iterations: P-256 verification is slow in unoptimized test builds.
    for i in 0..400u64 {
        let len = rng.below(70) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let prefix = prefixes[(i % 4) as usize];
        let mk = multikey_bytes(prefix, &bytes);
        let _ = PublicKey::from_multikey(&mk);
        let _ = PublicKey::from_did_key(&format!("did:key:{mk}"));
        let _ = PublicKey::from_legacy_multibase(KeyType::K256, &mk);
        let _ = PublicKey::from_legacy_multibase(KeyType::P256, &mk);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = PublicKey::from_multikey(s);
        }
        // Random signatures, and valid ones with a few random bytes changed.
        let _ = k_key.verify(b"m", &bytes);
        let _ = p_key.verify(b"m", &bytes);
        for (key, sig) in [(&k_key, k_sig), (&p_key, p_sig)] {
            let mut s = sig;
            s[rng.below(64) as usize] = rng.next_u64() as u8;
            let r = key.verify(b"m", &s);
            assert!(r.is_err() || s == sig, "mutated signature verified");
        }
        bytes.resize(64, 0);
        assert!(k_key.verify(b"m", &bytes).is_err());
        assert!(p_key.verify(b"m", &bytes).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// DID documents
// ---------------------------------------------------------------------------------------------

const ALICE: &str = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";

fn alice_doc(key: &PublicKey) -> Value {
    json!({
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": ALICE,
        "alsoKnownAs": ["https://example.com", "at://alice.example.com", "at://second.example"],
        "verificationMethod": [
            {"id": format!("{ALICE}#other"), "type": "Multikey", "controller": ALICE,
             "publicKeyMultibase": "zNotAKey"},
            {"id": format!("{ALICE}#atproto"), "type": "Multikey", "controller": ALICE,
             "publicKeyMultibase": key.to_multikey()}
        ],
        "service": [
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
             "serviceEndpoint": "https://pds.example.com"}
        ]
    })
}

#[test]
fn did_document_fields_are_extracted() {
    let (key, _) = sign_p256("alice", b"");
    let alice = did(ALICE);
    let id = parse_did_document(&alice, &alice_doc(&key)).expect("parses");
    assert_eq!(id.did, alice);
    assert_eq!(id.signing_key, key);
    assert_eq!(id.pds_endpoint.as_deref(), Some("https://pds.example.com"));
    assert_eq!(id.handle.as_deref(), Some("alice.example.com"));

    // Relative key id, absolute service id, legacy key types, http endpoint.
    let (k_key, _) = sign_k256("alice", b"");
    for (kind, key, multibase) in [
        ("Multikey", &k_key, k_key.to_multikey()),
        (
            "EcdsaSecp256k1VerificationKey2019",
            &k_key,
            format!("z{}", bs58::encode(k_key.to_compressed()).into_string()),
        ),
        (
            "EcdsaSecp256r1VerificationKey2019",
            &key,
            format!("z{}", bs58::encode(key.to_compressed()).into_string()),
        ),
    ] {
        let doc = json!({
            "id": ALICE,
            "verificationMethod": [{"id": "#atproto", "type": kind, "publicKeyMultibase": multibase}],
            "service": [{"id": format!("{ALICE}#atproto_pds"), "type": "AtprotoPersonalDataServer",
                         "serviceEndpoint": "http://localhost:2583"}]
        });
        let id = parse_did_document(&alice, &doc).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(&id.signing_key, key, "{kind}");
        assert_eq!(
            id.pds_endpoint.as_deref(),
            Some("http://localhost:2583"),
            "{kind}"
        );
        assert_eq!(id.handle, None, "{kind}");
    }

    // The first #atproto method wins, even if a later one is different.
    let mut doc = alice_doc(&key);
    doc["verificationMethod"]
        .as_array_mut()
        .unwrap()
        .push(json!(
            {"id": "#atproto", "type": "Multikey", "publicKeyMultibase": k_key.to_multikey()}
        ));
    assert_eq!(parse_did_document(&alice, &doc).unwrap().signing_key, key);
}

#[test]
fn did_document_without_usable_pds_still_gives_the_key() {
    let (key, _) = sign_k256("alice", b"");
    let alice = did(ALICE);
    let services = [
        json!(null),
        json!("not an array"),
        json!([]),
        json!([{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "ftp://x"}]),
        json!([{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://"}]),
        json!([{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https:///path"}]),
        json!([{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://a b"}]),
        json!([{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://ä.example"}]),
        json!([{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": {"uri": "https://x"}}]),
        json!([{"id": "#atproto_pds", "type": "SomethingElse", "serviceEndpoint": "https://x"}]),
        json!([{"id": "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb#atproto_pds", "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://x"}]),
        json!([{"id": 5, "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://x"}]),
        json!(["#atproto_pds"]),
    ];
    for service in services {
        let mut doc = alice_doc(&key);
        doc["service"] = service.clone();
        doc["alsoKnownAs"] = json!([7, "at://"]);
        let id = parse_did_document(&alice, &doc).unwrap_or_else(|e| panic!("{service}: {e}"));
        assert_eq!(id.signing_key, key, "{service}");
        assert_eq!(id.pds_endpoint, None, "{service}");
        assert_eq!(id.handle, None, "{service}");
    }
}

#[test]
fn hostile_did_documents_fail_with_specific_reasons() {
    let (key, _) = sign_k256("alice", b"");
    let alice = did(ALICE);
    let with = |field: &str, value: Value| {
        let mut doc = alice_doc(&key);
        doc[field] = value;
        doc
    };
    let vm = |m: Value| with("verificationMethod", json!([m]));
    let cases: Vec<(Value, &str)> = vec![
        (json!([]), "not_object"),
        (json!("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"), "not_object"),
        (json!(null), "not_object"),
        (with("id", json!(null)), "missing_id"),
        (with("id", json!(42)), "missing_id"),
        (
            with("id", json!("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb")),
            "id_mismatch",
        ),
        (with("id", json!(format!("{ALICE} "))), "id_mismatch"),
        (with("id", json!("x".repeat(100_000))), "id_mismatch"),
        (
            with("verificationMethod", json!({"id": "#atproto"})),
            "bad_verification_method",
        ),
        (
            with("verificationMethod", json!("#atproto")),
            "bad_verification_method",
        ),
        (with("verificationMethod", json!(null)), "no_atproto_key"),
        (with("verificationMethod", json!([])), "no_atproto_key"),
        (
            with("verificationMethod", json!([1, "x", null, []])),
            "no_atproto_key",
        ),
        (
            vm(
                json!({"id": "#atproto_pds", "type": "Multikey", "publicKeyMultibase": key.to_multikey()}),
            ),
            "no_atproto_key",
        ),
        (
            vm(
                json!({"id": "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb#atproto", "type": "Multikey",
                   "publicKeyMultibase": key.to_multikey()}),
            ),
            "no_atproto_key",
        ),
        (
            vm(
                json!({"id": "atproto", "type": "Multikey", "publicKeyMultibase": key.to_multikey()}),
            ),
            "no_atproto_key",
        ),
        (
            vm(
                json!({"id": "#atproto", "type": "Ed25519VerificationKey2020",
                   "publicKeyMultibase": key.to_multikey()}),
            ),
            "unsupported_key_type",
        ),
        (
            vm(json!({"id": "#atproto", "publicKeyMultibase": key.to_multikey()})),
            "unsupported_key_type",
        ),
        (
            vm(json!({"id": "#atproto", "type": "Multikey"})),
            "missing_public_key",
        ),
        (
            vm(json!({"id": "#atproto", "type": "Multikey", "publicKeyMultibase": 5})),
            "missing_public_key",
        ),
        (
            vm(json!({"id": "#atproto", "type": "Multikey", "publicKeyJwk": {"kty": "EC"}})),
            "missing_public_key",
        ),
        (
            vm(json!({"id": "#atproto", "type": "Multikey", "publicKeyMultibase": "zNotAKey0"})),
            "bad_key",
        ),
        (
            vm(
                json!({"id": "#atproto", "type": "Multikey", "publicKeyMultibase": key.to_did_key()}),
            ),
            "bad_key",
        ),
        (
            vm(
                json!({"id": "#atproto", "type": "EcdsaSecp256k1VerificationKey2019",
                   "publicKeyMultibase": key.to_multikey()}),
            ),
            "bad_key",
        ),
    ];
    for (doc, want) in &cases {
        let got = doc_reason(parse_did_document(&alice, doc));
        assert_eq!(
            got,
            *want,
            "{}",
            &doc.to_string()[..doc.to_string().len().min(300)]
        );
    }
    // Echoed values stay small.
    let err = parse_did_document(&alice, &with("id", json!("x".repeat(100_000)))).unwrap_err();
    assert!(err.to_string().len() < 400, "{}", err.to_string().len());
    // The key error is kept as the source.
    let err = parse_did_document(
        &alice,
        &vm(json!({"id": "#atproto", "type": "Multikey", "publicKeyMultibase": "f00"})),
    )
    .unwrap_err();
    assert_eq!(err, DidDocError::Key(KeyError::MultibasePrefix));
}

#[test]
fn did_doc_map_reports_bad_documents_per_did() {
    let (key, _) = sign_k256("alice", b"");
    let bob = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";
    let map = json!({
        ALICE: alice_doc(&key),
        bob: {"id": bob, "verificationMethod": []},
        "did:web:example.com": alice_doc(&key),
    });
    let parsed = parse_did_doc_map(&map.to_string()).expect("map");
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[&did(ALICE)].as_ref().unwrap().signing_key, key);
    assert_eq!(
        parsed[&did(bob)]
            .as_ref()
            .map_err(DidDocError::reason)
            .unwrap_err(),
        "no_atproto_key"
    );
    assert_eq!(
        parsed[&did("did:web:example.com")]
            .as_ref()
            .map_err(DidDocError::reason)
            .unwrap_err(),
        "id_mismatch"
    );

    assert_eq!(doc_reason(parse_did_doc_map("")), "bad_json");
    assert_eq!(doc_reason(parse_did_doc_map("{")), "bad_json");
    assert_eq!(
        doc_reason(parse_did_doc_map(&"[".repeat(10_000))),
        "bad_json"
    );
    assert_eq!(doc_reason(parse_did_doc_map("[]")), "not_object");
    assert_eq!(doc_reason(parse_did_doc_map("null")), "not_object");
    assert_eq!(
        doc_reason(parse_did_doc_map(r#"{"not a did": {}}"#)),
        "bad_did"
    );
    assert!(parse_did_doc_map("{}").expect("empty map").is_empty());
    let map = parse_did_doc_map(&format!(r#"{{"{ALICE}": 7}}"#)).expect("map");
    assert_eq!(
        map[&did(ALICE)]
            .as_ref()
            .map_err(DidDocError::reason)
            .unwrap_err(),
        "not_object"
    );
}
