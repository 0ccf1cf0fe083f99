//! End-to-end: the built binaries run as processes on the shared fixtures.

use std::process::Command;

use serde_json::Value;
use workspace_tests::fixtures;

#[test]
fn inspect_prints_the_relay_capture_as_jetstream_lines() {
    let Some(dir) = fixtures() else { return };
    let output = Command::new(env!("CARGO_BIN_EXE_firehose-writer"))
        .arg("inspect")
        .arg(dir.join("relay-capture/frames.bin"))
        .output()
        .expect("firehose-writer runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected: Vec<Value> =
        std::fs::read_to_string(dir.join("relay-capture/expected_jetstream_v1.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), expected.len());
    for (ours, theirs) in lines.iter().zip(&expected) {
        assert_eq!(ours["did"], theirs["did"]);
        assert_eq!(ours["kind"], theirs["kind"]);
        if theirs["kind"] == "commit" {
            for key in ["rev", "operation", "collection", "rkey", "record", "cid"] {
                assert_eq!(
                    ours["commit"].get(key),
                    theirs["commit"].get(key),
                    "{key} of {theirs}"
                );
            }
        } else {
            let kind = theirs["kind"].as_str().unwrap();
            assert_eq!(ours[kind], theirs[kind]);
        }
    }
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("150 frames, 152 events, 0 invalid frames"));
}

#[test]
fn inspect_reports_a_truncated_capture_and_a_missing_file() {
    let Some(dir) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    let cut = tmp.path().join("cut.bin");
    std::fs::write(&cut, &data[..data.len() - 10]).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_firehose-writer"))
        .arg("inspect")
        .arg(&cut)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("truncated after 149 frames"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        151,
        "everything readable is printed"
    );

    let output = Command::new(env!("CARGO_BIN_EXE_firehose-writer"))
        .args(["inspect", "/nonexistent/frames.bin"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("reading capture /nonexistent/frames.bin")
    );
}

/// Runs `inspect --did-docs DOCS FRAMES` and returns its lines and stderr.
fn inspect_verified(docs: &std::path::Path, frames: &std::path::Path) -> (Vec<Value>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_firehose-writer"))
        .arg("inspect")
        .arg("--did-docs")
        .arg(docs)
        .arg(frames)
        .output()
        .expect("firehose-writer runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let lines = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, stderr)
}

#[test]
fn inspect_with_did_docs_verifies_every_commit_of_the_relay_capture() {
    let Some(dir) = fixtures() else { return };
    let (lines, stderr) = inspect_verified(
        &dir.join("relay-capture/did_docs.json"),
        &dir.join("relay-capture/frames.bin"),
    );
    assert_eq!(lines.len(), 152);
    for line in &lines {
        match line["kind"].as_str().unwrap() {
            "commit" => assert_eq!(line["verify"], "ok", "{line}"),
            _ => assert!(line.get("verify").is_none(), "{line}"),
        }
    }
    assert!(
        stderr.contains("148 commits/syncs verified, 0 failed verification"),
        "{stderr}"
    );
}

#[test]
fn inspect_with_did_docs_names_missing_and_wrong_keys() {
    let Some(dir) = fixtures() else { return };
    let docs: serde_json::Map<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("relay-capture/did_docs.json")).unwrap(),
    )
    .unwrap();
    let dids: Vec<String> = docs.keys().cloned().collect();
    let (missing, forged, donor) = (&dids[0], &dids[1], &dids[2]);
    let mut edited = docs.clone();
    edited.remove(missing);
    // The forged DID gets another account's key under its own id: the document parses, but its
    // commits were not signed by that key.
    let mut wrong = docs[donor].clone();
    let text = serde_json::to_string(&wrong)
        .unwrap()
        .replace(donor.as_str(), forged);
    wrong = serde_json::from_str(&text).unwrap();
    edited.insert(forged.clone(), wrong);
    let tmp = tempfile::tempdir().unwrap();
    let docs_path = tmp.path().join("docs.json");
    std::fs::write(&docs_path, serde_json::to_vec(&edited).unwrap()).unwrap();
    let (lines, stderr) = inspect_verified(&docs_path, &dir.join("relay-capture/frames.bin"));
    let mut failed_events = std::collections::HashSet::new();
    for line in lines.iter().filter(|l| l["kind"] == "commit") {
        let did = line["did"].as_str().unwrap();
        let expected = if did == missing {
            "no_did_document"
        } else if did == forged {
            "bad_signature"
        } else {
            "ok"
        };
        assert_eq!(line["verify"], expected, "{line}");
        if expected != "ok" {
            failed_events.insert(line["seq"].as_i64().unwrap());
        }
    }
    assert!(!failed_events.is_empty());
    assert!(
        stderr.contains(&format!("{} failed verification", failed_events.len())),
        "{stderr}"
    );
}

#[test]
fn inspect_with_did_docs_shows_the_verdict_of_a_commit_without_ops() {
    use sync_core::synth::{self, SynthRepo};
    let tmp = tempfile::tempdir().unwrap();
    let mut repo = SynthRepo::new("did:plc:synthsynthsynthsynthsynt", [4u8; 32]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let frame = repo.commit(7, now - 1_000_000, "2026-01-01T00:00:00Z", &[]);
    let frames = tmp.path().join("frames.bin");
    std::fs::write(&frames, synth::capture(&[frame])).unwrap();
    let docs = tmp.path().join("docs.json");
    let with_key =
        serde_json::json!({ repo.did().as_str(): repo.did_document("https://pds.example") });
    for (content, expected) in [(with_key, "ok"), (serde_json::json!({}), "no_did_document")] {
        std::fs::write(&docs, content.to_string()).unwrap();
        let (lines, _) = inspect_verified(&docs, &frames);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["kind"], "commit");
        assert_eq!(lines[0]["commit"]["ops"], 0);
        assert_eq!(lines[0]["verify"], expected);
    }
}
