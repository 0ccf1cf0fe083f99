//! Whole-repo reading: the real `getRepo` CAR of the relay capture against its independent
//! listing, in one slice and in chunks of every awkward size; a synthetic signed repo for the
//! signature; and hostile variants (flipped bytes, truncation, missing records, size limits).

use std::collections::BTreeSet;

use sync_core::crypto::PublicKey;
use sync_core::ids::Did;
use sync_core::repo::{read_repo, RepoReader, DEFAULT_MAX_REPO_BYTES};
use sync_core::synth::SynthRepo;
use sync_core::verify::VerifyOptions;

use crate::fixtures;
use crate::verify::now_micros;

fn expected_commit(dir: &std::path::Path) -> (String, String, String) {
    let text = std::fs::read_to_string(dir.join("relay-capture/repo_expected_commit.txt")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(field("Prev CID:"), "<nil>");
    assert_eq!(field("ATProto Repo Spec Version:"), "3");
    (field("DID:"), field("Data CID:"), field("Revision:"))
}

fn expected_records(dir: &std::path::Path) -> BTreeSet<(String, String)> {
    std::fs::read_to_string(dir.join("relay-capture/repo_expected_records.tsv"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (path, cid) = l.split_once('\t').unwrap();
            (path.to_owned(), cid.to_owned())
        })
        .collect()
}

fn listing(repo: &sync_core::repo::VerifiedRepo) -> BTreeSet<(String, String)> {
    repo.records
        .iter()
        .map(|r| {
            (
                format!("{}/{}", r.collection.as_str(), r.rkey.as_str()),
                r.cid.to_string(),
            )
        })
        .collect()
}

#[test]
fn the_relay_capture_repo_lists_exactly_its_expected_records() {
    let Some(dir) = fixtures() else { return };
    let car = std::fs::read(dir.join("relay-capture/repo.car")).unwrap();
    let (did, data, rev) = expected_commit(&dir);
    let did = Did::parse(&did).unwrap();
    let opts = VerifyOptions::at(now_micros());
    let expected = expected_records(&dir);
    assert_eq!(expected.len(), 23);
    // No DID document ships with this repo, so this reads it without the signature; every
    // hash, the commit structure and the MST are still checked (the signature path is tested on
    // a synthetic repo below).
    for chunk in [car.len(), 1, 2, 3, 7, 64, 1000, 4096] {
        let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
        for piece in car.chunks(chunk) {
            reader.push(piece).unwrap();
        }
        let repo = reader.finish_unsigned(&did, &opts).unwrap();
        assert!(!repo.signature_checked);
        assert_eq!(repo.commit.did, did);
        assert_eq!(repo.commit.data.to_string(), data);
        assert_eq!(repo.commit.rev.as_str(), rev);
        assert_eq!(repo.commit.prev, None);
        assert_eq!(listing(&repo), expected, "chunks of {chunk}");
        // Records come in MST key order, each decodable.
        let keys: Vec<String> = repo
            .records
            .iter()
            .map(|r| format!("{}/{}", r.collection.as_str(), r.rkey.as_str()))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        for record in &repo.records {
            let json = repo.record_json(record).unwrap();
            assert_eq!(json["$type"], record.collection.as_str());
        }
        assert!(repo.invalid_keys.is_empty());
    }
}

#[test]
fn the_relay_capture_repo_fails_cleanly_when_damaged() {
    let Some(dir) = fixtures() else { return };
    let car = std::fs::read(dir.join("relay-capture/repo.car")).unwrap();
    let (did, _, _) = expected_commit(&dir);
    let did = Did::parse(&did).unwrap();
    let opts = VerifyOptions::at(now_micros());
    let read = |bytes: &[u8]| {
        let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
        reader.push(bytes)?;
        reader.finish_unsigned(&did, &opts)
    };
    // Every single-byte flip past the header either fails with a reason or (for bytes the
    // checks cannot see, like a varint's redundant bits) lists exactly the same records.
    let expected = expected_records(&dir);
    let mut failures = std::collections::BTreeMap::<&str, usize>::new();
    for i in 60..car.len() {
        let mut bad = car.clone();
        bad[i] ^= 0x04;
        match read(&bad) {
            Ok(repo) => assert_eq!(listing(&repo), expected, "flip at {i}"),
            Err(e) => *failures.entry(e.reason()).or_default() += 1,
        }
    }
    assert!(
        failures.get("block_hash_mismatch").copied().unwrap_or(0) > 1000,
        "{failures:?}"
    );
    // Truncated anywhere: an error, never a partial listing.
    for cut in [car.len() - 1, car.len() / 2, 10] {
        let err = read(&car[..cut]).unwrap_err();
        assert!(
            [
                "bad_car",
                "missing_blocks",
                "missing_record",
                "missing_commit_block"
            ]
            .contains(&err.reason()),
            "cut at {cut}: {err}"
        );
    }
    // Over the size limit.
    let mut reader = RepoReader::new(car.len() as u64 - 1);
    assert_eq!(reader.push(&car).unwrap_err().reason(), "repo_too_large");
    // Another DID than the commit's.
    let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
    reader.push(&car).unwrap();
    let other = Did::parse("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
    assert_eq!(
        reader.finish_unsigned(&other, &opts).unwrap_err().reason(),
        "did_mismatch"
    );
}

#[test]
fn a_signed_synthetic_repo_verifies_with_its_key_only() {
    let mut repo = SynthRepo::new("did:plc:synthsynthsynthsynthsynt", [3u8; 32]);
    let opts = VerifyOptions::at(now_micros());
    for i in 0..500u32 {
        repo.put(
            "app.bsky.feed.post",
            &format!("3l{:011}", i),
            serde_json::json!({"$type": "app.bsky.feed.post", "text": format!("post {i}"), "createdAt": "2026-01-01T00:00:00Z"}),
        );
    }
    repo.put(
        "app.bsky.graph.follow",
        "3lfollow00000",
        serde_json::json!({"$type": "app.bsky.graph.follow", "subject": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "createdAt": "2026-01-01T00:00:00Z"}),
    );
    let car = repo.get_repo_car(now_micros());
    let did = repo.did();
    let key = repo.public_key();
    let verified = read_repo(&car, &did, &key, &opts, DEFAULT_MAX_REPO_BYTES).unwrap();
    assert!(verified.signature_checked);
    assert_eq!(verified.records.len(), 501);
    assert_eq!(
        verified.records[0].collection.as_str(),
        "app.bsky.feed.post"
    );
    assert_eq!(
        verified.records[500].collection.as_str(),
        "app.bsky.graph.follow"
    );
    assert_eq!(
        verified.record_json(&verified.records[7]).unwrap()["text"],
        "post 7"
    );

    let other = PublicKey::from_did_key(
        &SynthRepo::new("did:plc:otherotherotherotherothe", [9u8; 32])
            .public_key()
            .to_did_key(),
    )
    .unwrap();
    assert_eq!(
        read_repo(&car, &did, &other, &opts, DEFAULT_MAX_REPO_BYTES)
            .unwrap_err()
            .reason(),
        "bad_signature"
    );
    // A record block removed from the CAR: the listing would be incomplete, so it is refused.
    let record_cid = verified.records[3].cid;
    let without = repo.get_repo_car_without(now_micros(), &record_cid);
    assert_eq!(
        read_repo(&without, &did, &key, &opts, DEFAULT_MAX_REPO_BYTES)
            .unwrap_err()
            .reason(),
        "missing_record"
    );
}
