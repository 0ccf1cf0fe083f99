//! Commit-signature verification cost, single thread.
//!
//! `cargo bench -p sync-core --bench verify_sig [-- SECONDS]` (SECONDS per measurement, default 3)
//! Signs 64 commit-sized messages (~200 bytes, the size of an unsigned commit block) with keys
//! derived here, then measures µs per operation:
//! - `verify K-256 (secp256k1)`: [`PublicKey::verify`] on K-256 keys (libsecp256k1);
//! - `verify K-256 (k256)`: the same signatures through pure-Rust `k256`, for comparison;
//! - `verify P-256 (p256)`: [`PublicKey::verify`] on P-256 keys;
//! - `from_multikey K-256` / `P-256`: parsing a Multikey string (base58 + point decompression),
//!   the per-DID cost when a DID document is (re)loaded.

use std::hint::black_box;
use std::time::{Duration, Instant};

use p256::ecdsa::signature::{Signer, Verifier};
use sha2::{Digest, Sha256};
use sync_core::crypto::{KeyType, PublicKey};

const N: usize = 64;

fn secret(i: usize) -> [u8; 32] {
    Sha256::digest(format!("bench key {i}").as_bytes()).into()
}

fn message(i: usize) -> Vec<u8> {
    (0..200).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// Runs `f` over `0..N` until `budget` has passed; prints and returns µs per call.
fn measure(name: &str, budget: Duration, mut f: impl FnMut(usize) -> bool) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    let mut ok = 0u64;
    while start.elapsed() < budget {
        for i in 0..N {
            ok += u64::from(f(i));
        }
        calls += N as u64;
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / calls as f64;
    println!(
        "{name:<28} {us:>8.2} µs/op  {:>9.0} ops/s  ({calls} calls, {ok} ok)",
        1e6 / us
    );
    assert_eq!(ok, calls, "{name}: some operations failed");
    us
}

fn main() {
    let seconds: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(seconds);

    let messages: Vec<Vec<u8>> = (0..N).map(message).collect();

    let secp = secp256k1::Secp256k1::signing_only();
    let mut k_keys = Vec::new();
    let mut k_sigs = Vec::new();
    let mut k256_keys = Vec::new();
    let mut k256_sigs = Vec::new();
    let mut p_keys = Vec::new();
    let mut p_sigs = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        let sk = secp256k1::SecretKey::from_byte_array(&secret(i)).expect("secret key");
        let pk = secp256k1::PublicKey::from_secret_key(&secp, &sk);
        let digest: [u8; 32] = Sha256::digest(msg).into();
        let sig = secp
            .sign_ecdsa(&secp256k1::Message::from_digest(digest), &sk)
            .serialize_compact();
        k_keys.push(PublicKey::from_compressed(KeyType::K256, &pk.serialize()).expect("key"));
        k256_keys.push(k256::ecdsa::VerifyingKey::from_sec1_bytes(&pk.serialize()).expect("key"));
        k256_sigs.push(k256::ecdsa::Signature::from_slice(&sig).expect("sig"));
        k_sigs.push(sig);

        let sk = p256::ecdsa::SigningKey::from_slice(&secret(i)).expect("secret key");
        let sig: p256::ecdsa::Signature = sk.sign(msg);
        let sig = sig.normalize_s().unwrap_or(sig);
        let point = sk.verifying_key().to_encoded_point(true);
        p_keys.push(PublicKey::from_compressed(KeyType::P256, point.as_bytes()).expect("key"));
        p_sigs.push(sig.to_bytes());
    }
    let k_multikeys: Vec<String> = k_keys.iter().map(PublicKey::to_multikey).collect();
    let p_multikeys: Vec<String> = p_keys.iter().map(PublicKey::to_multikey).collect();

    println!("{N} keys/messages, {seconds} s per measurement");
    let k = measure("verify K-256 (secp256k1)", budget, |i| {
        k_keys[i]
            .verify(black_box(&messages[i]), black_box(&k_sigs[i]))
            .is_ok()
    });
    let k_rust = measure("verify K-256 (k256)", budget, |i| {
        k256_keys[i]
            .verify(black_box(&messages[i]), black_box(&k256_sigs[i]))
            .is_ok()
    });
    let p = measure("verify P-256 (p256)", budget, |i| {
        p_keys[i]
            .verify(black_box(&messages[i]), black_box(&p_sigs[i]))
            .is_ok()
    });
    measure("from_multikey K-256", budget, |i| {
        PublicKey::from_multikey(black_box(&k_multikeys[i])).is_ok()
    });
    measure("from_multikey P-256", budget, |i| {
        PublicKey::from_multikey(black_box(&p_multikeys[i])).is_ok()
    });
    println!(
        "K-256: secp256k1 is {:.1}x faster than k256; P-256 costs {:.1}x a K-256 verify",
        k_rust / k,
        p / k
    );
}
