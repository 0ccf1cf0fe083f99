//! Decoder conformance against fixtures we did not write: the relay capture with its production
//! Jetstream output, the atproto data-model vectors, indigo's edge-case commits and indigo's relay
//! scenarios (`prevData` on current commits, a real `#sync`).

use serde_json::Value;
use sync_core::car::CarBlocks;
use sync_core::cbor;
use sync_core::frame::{capture_frames, commit_repo, decode_frame, Event};
use sync_core::jetstream::{event_lines, JETSTREAM_KINDS};

use crate::fixtures;

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .expect("fixture base64")
}

/// The fields the conformance oracle is compared on (time_us is Jetstream's own clock).
fn comparable(line: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for key in ["did", "kind"] {
        out.insert(key.into(), line[key].clone());
    }
    if let Some(commit) = line.get("commit") {
        let mut c = serde_json::Map::new();
        for key in ["rev", "operation", "collection", "rkey", "record", "cid"] {
            if let Some(v) = commit.get(key) {
                c.insert(key.into(), v.clone());
            }
        }
        out.insert("commit".into(), Value::Object(c));
    }
    for key in ["identity", "account"] {
        if let Some(v) = line.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    Value::Object(out)
}

#[test]
fn relay_capture_matches_production_jetstream() {
    let Some(dir) = fixtures() else { return };
    let frames = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    let expected: Vec<Value> =
        std::fs::read_to_string(dir.join("relay-capture/expected_jetstream_v1.jsonl"))
            .unwrap()
            .lines()
            .map(|l| comparable(&serde_json::from_str(l).unwrap()))
            .collect();
    let mut actual = Vec::new();
    let mut frame_count = 0;
    for frame in capture_frames(&frames) {
        frame_count += 1;
        let event = decode_frame(frame.unwrap()).unwrap();
        for line in event_lines(&event) {
            assert!(
                JETSTREAM_KINDS.contains(&line["kind"].as_str().unwrap()),
                "capture holds only Jetstream kinds, got {line}"
            );
            actual.push(comparable(&line));
        }
    }
    assert_eq!(frame_count, 150);
    assert_eq!(actual.len(), expected.len(), "event count");
    // Jetstream emits in relay order, like us; compare as ordered lists but report every mismatch.
    let mismatches: Vec<String> = actual
        .iter()
        .zip(&expected)
        .enumerate()
        .filter(|(_, (a, e))| a != e)
        .map(|(i, (a, e))| format!("#{i}\n  ours:     {a}\n  expected: {e}"))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_eq!(actual.len(), 152);
}

#[test]
fn data_model_fixtures_decode_and_hash() {
    let Some(dir) = fixtures() else { return };
    let text =
        std::fs::read_to_string(dir.join("interop/data-model/data-model-fixtures.json")).unwrap();
    let entries: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(!entries.is_empty());
    for entry in &entries {
        let bytes = b64(entry["cbor_base64"].as_str().unwrap());
        let json = cbor::decode_to_json(&bytes).unwrap();
        assert_eq!(json, entry["json"], "decoded JSON of {}", entry["cid"]);
        assert_eq!(
            cbor::cid_for_dag_cbor(&bytes).to_string(),
            entry["cid"].as_str().unwrap()
        );
        // and back: JSON -> canonical DAG-CBOR gives the same bytes
        let reencoded = cbor::encode_ipld(&cbor::json_to_ipld(&entry["json"]).unwrap()).unwrap();
        assert_eq!(reencoded, bytes, "re-encoding {}", entry["cid"]);
    }
}

/// indigo commits are JSON bodies (`$bytes` blocks): re-encode to a real frame and decode it.
fn indigo_frame(body: &Value) -> Vec<u8> {
    let header = serde_json::json!({"op": 1, "t": "#commit"});
    let mut frame = cbor::encode_ipld(&cbor::json_to_ipld(&header).unwrap()).unwrap();
    frame.extend(cbor::encode_ipld(&cbor::json_to_ipld(body).unwrap()).unwrap());
    frame
}

#[test]
fn indigo_commits_decode_with_every_record() {
    let Some(dir) = fixtures() else { return };
    let mut seen_41 = false;
    let mut files = 0;
    for entry in std::fs::read_dir(dir.join("indigo-commits")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("firehose_commit_") && name.ends_with(".json")) {
            continue;
        }
        files += 1;
        let body: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let frame = indigo_frame(&body);
        let Event::Commit(commit) = decode_frame(&frame).unwrap_or_else(|e| panic!("{name}: {e}"))
        else {
            panic!("{name}: not a commit")
        };
        assert_eq!(commit.ops.len(), body["ops"].as_array().unwrap().len());
        // February 2025 commits, before `prevData` existed.
        assert_eq!(commit.prev_data, None, "{name}");
        seen_41 |= commit.ops.len() >= 41;
        for op in &commit.ops {
            let op = op.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
            match op.action {
                sync_core::frame::Action::Delete => {
                    assert!(commit.record_json(op).unwrap().is_none())
                }
                _ => {
                    let record = commit
                        .record_json(op)
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                        .unwrap();
                    assert_eq!(
                        record["$type"].as_str(),
                        Some(op.collection.as_str()),
                        "{name}"
                    );
                }
            }
        }
    }
    assert_eq!(files, 4);
    assert!(seen_41, "the large (42-op) commit was decoded");
}

#[test]
fn relay_capture_commits_carry_prev_data_and_their_car() {
    let Some(dir) = fixtures() else { return };
    let frames = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    let mut commits = 0;
    for frame in capture_frames(&frames) {
        let frame = frame.unwrap();
        let Event::Commit(c) = decode_frame(frame).unwrap() else {
            continue;
        };
        commits += 1;
        let seq = c.seq.0;
        // The live relay sends the inductive-firehose field on every commit.
        let prev_data = c
            .prev_data
            .unwrap_or_else(|| panic!("seq {seq}: no prevData"));
        assert!(cbor::is_atproto_record_cid(&prev_data), "seq {seq}");
        assert_ne!(prev_data, c.commit, "seq {seq}");
        // `blocks_bytes` is the CAR as sent, borrowed from the frame; the commit is its first root.
        assert!(frame.as_ptr_range().contains(&c.blocks_bytes.as_ptr()));
        let again = CarBlocks::parse(c.blocks_bytes).unwrap();
        assert_eq!(again.roots(), c.blocks.roots(), "seq {seq}");
        assert_eq!(c.blocks.roots().first(), Some(&c.commit), "seq {seq}");
        assert!(c.blocks.get(&c.commit).is_some(), "seq {seq}: commit block");
        // The index finds every block it lists, each CID listed once.
        let listed: Vec<_> = c.blocks.iter().collect();
        let distinct: std::collections::HashSet<_> = listed.iter().map(|(cid, _)| *cid).collect();
        assert_eq!(distinct.len(), listed.len(), "seq {seq}");
        assert_eq!(listed.len(), c.blocks.len(), "seq {seq}");
        for (cid, data) in listed {
            assert_eq!(c.blocks.get(cid), Some(data), "seq {seq}: {cid}");
        }
    }
    assert_eq!(commits, 148);
}

/// The frames of one indigo relay scenario, with the JSON body of each.
fn scenario_frames(dir: &std::path::Path, name: &str) -> Vec<(Value, Vec<u8>)> {
    let path = dir.join("indigo-commits/relay-scenarios").join(name);
    let scenario: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    scenario["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let to_cbor = |v: &Value| cbor::encode_ipld(&cbor::json_to_ipld(v).unwrap()).unwrap();
            let mut frame = to_cbor(&m["frame"]["header"]);
            frame.extend(to_cbor(&m["frame"]["body"]));
            (m["frame"]["body"].clone(), frame)
        })
        .collect()
}

#[test]
fn relay_scenario_commits_have_prev_data_exactly_when_sent() {
    let Some(dir) = fixtures() else { return };
    let (mut with, mut without) = (0, 0);
    for name in ["post_lifecycle.json", "post_lifecycle_legacy.json"] {
        for (body, frame) in scenario_frames(&dir, name) {
            let Event::Commit(c) = decode_frame(&frame).unwrap_or_else(|e| panic!("{name}: {e}"))
            else {
                continue;
            };
            let sent = body["prevData"]["$link"].as_str();
            assert_eq!(
                c.prev_data.map(|p| p.to_string()).as_deref(),
                sent,
                "{name} seq {}",
                c.seq.0
            );
            if sent.is_some() {
                with += 1;
            } else {
                without += 1;
            }
        }
    }
    assert_eq!((with, without), (6, 6));
}

#[test]
fn indigo_sync_event_decodes_with_its_commit_car() {
    let Some(dir) = fixtures() else { return };
    let frames = scenario_frames(&dir, "account_lifecycle.json");
    let mut syncs = 0;
    for (body, frame) in &frames {
        let Event::Sync(s) = decode_frame(frame).unwrap() else {
            continue;
        };
        syncs += 1;
        assert_eq!(s.blocks, b64(body["blocks"]["$bytes"].as_str().unwrap()));
        // The CAR holds the signed commit, whose CID is its first root, for this did and rev.
        let car = CarBlocks::parse(&s.blocks).unwrap();
        let root = car.roots()[0];
        let block = car.get(&root).expect("commit block");
        cbor::verify_block(&root, block).unwrap();
        let commit = cbor::decode_to_json(block).unwrap();
        assert_eq!(commit["did"].as_str(), Some(s.did.as_str()));
        assert_eq!(commit["rev"].as_str(), Some(s.rev.as_str()));
        assert!(commit["sig"]["$bytes"].is_string());
    }
    assert_eq!(syncs, 1);
}

/// `commit_repo` (the verifier's cheap look before a full decode) names exactly the repo of
/// every commit of the relay capture and of the relay scenarios, and nothing for other messages.
#[test]
fn commit_repo_agrees_with_the_full_decode() {
    let Some(dir) = fixtures() else { return };
    let data = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    let mut frames: Vec<Vec<u8>> = capture_frames(&data).map(|f| f.unwrap().to_vec()).collect();
    let capture = frames.len();
    for name in [
        "account_lifecycle.json",
        "post_lifecycle.json",
        "legacy.json",
        "seq_ordering.json",
    ] {
        frames.extend(scenario_frames(&dir, name).into_iter().map(|(_, f)| f));
    }
    let (mut commits, mut others) = (0, 0);
    for frame in &frames {
        let full = match decode_frame(frame) {
            Ok(Event::Commit(c)) => Some(c.repo.as_str().to_owned()),
            _ => None,
        };
        assert_eq!(commit_repo(frame).map(str::to_owned), full);
        match full {
            Some(_) => commits += 1,
            None => others += 1,
        }
    }
    assert!(
        commits > 100 && others > 0,
        "{commits} commits, {others} others of {capture}"
    );
    // Not a frame, or a truncated commit: no repo.
    assert_eq!(commit_repo(b""), None);
    let first_commit = frames.iter().find(|f| commit_repo(f).is_some()).unwrap();
    assert_eq!(commit_repo(&first_commit[..first_commit.len() / 2]), None);
}
