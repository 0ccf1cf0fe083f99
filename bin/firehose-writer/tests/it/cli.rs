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
