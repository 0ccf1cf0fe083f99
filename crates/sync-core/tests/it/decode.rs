//! Decoder conformance against fixtures we did not write: the relay capture with its production
//! Jetstream output, the atproto data-model vectors and indigo's edge-case commits.

use serde_json::Value;
use sync_core::cbor;
use sync_core::frame::{capture_frames, decode_frame, Event};
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
