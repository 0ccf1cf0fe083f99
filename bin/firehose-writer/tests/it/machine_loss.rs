//! Machine loss mid-study (issue 10.9): the machine running the writer and the export is lost
//! with its cache and both state stores; only the output survives. A replacement writer started
//! at the output's resume point (`batch-export resume-point`) and an export with
//! `--adopt-output` must produce the dataset of one uninterrupted run: every row once, nothing
//! lost inside the relay's replay window, no duplicate of what the lost machine exported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use firehose_writer::config::Source;
use workspace_tests::relay::TestRelay;

use crate::withdrawn::{batch_export, batch_export_bin, duckdb};
use crate::writer::{config, looped, start_writer, Looped};

const WAIT: Duration = Duration::from_secs(60);

/// Runs batch-export; it must succeed. Returns its summary.
fn export(cache: &Path, output: &Path, state: &Path, extra: &[&str]) -> serde_json::Value {
    let args: Vec<&str> = std::iter::once("--json")
        .chain(extra.iter().copied())
        .collect();
    let out = batch_export(cache, output, state, &args);
    assert!(
        out.status.success(),
        "batch-export {extra:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every exported row per table (its folder above `partition_date=`), as sorted text, without the
/// export's own clock (`synctimestamp` and `insert_timestamp` are the export time in the
/// tables).
fn rows(output: &Path) -> BTreeMap<String, Vec<String>> {
    let out = duckdb(
        r#"
import duckdb, glob, json, os, sys
root = sys.argv[1]
con = duckdb.connect()
tables = {}
for f in sorted(glob.glob(root + "/**/*.parquet", recursive=True)):
    rel = os.path.relpath(f, root)
    if rel.startswith("_batch_export"):
        continue
    cur = con.execute("SELECT * FROM read_parquet(?, hive_partitioning = false)", [f])
    names = [d[0] for d in cur.description]
    for row in cur.fetchall():
        cells = {n: v for n, v in zip(names, row) if n not in ("synctimestamp", "insert_timestamp")}
        table = rel.split(os.sep + "partition_date=")[0]
        tables.setdefault(table, []).append(json.dumps(cells, sort_keys=True, default=str))
print(json.dumps({t: sorted(r) for t, r in tables.items()}))
"#,
        &[output.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

/// A writer following `relay` in `dir` from `cursor` until it has committed `seq`, then stopped.
async fn follow(dir: &Path, relay: &TestRelay, data: &Looped, cursor: Option<i64>, seq: i64) {
    let mut cfg = config(
        dir,
        Source::Relay(relay.url()),
        &data.study,
        &data.in_network,
    );
    cfg.cursor = cursor;
    let writer = start_writer(cfg);
    let reached = writer.wait_for_cursor(seq, WAIT).await;
    let result = writer.stop().await;
    assert!(reached, "the writer reached seq {seq}: {result:?}");
    result.expect("clean stop");
}

fn sqlite_set(state: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut p = state.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_machine_resumes_at_the_outputs_resume_point_and_the_dataset_equals_an_uninterrupted_run(
) {
    let Some(data) = looped(4) else { return };
    let n = data.frames.len();
    let seq_at = |index: usize| 1000 + index as i64;
    let (a, b, c) = (n / 4, n / 2, 3 * n / 4);

    // The reference: one writer over the whole stream, one export.
    let reference = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    follow(reference.path(), &relay, &data, Some(0), data.last_seq).await;
    relay.shutdown().await;
    let ref_out = reference.path().join("output");
    export(
        &reference.path().join("cache"),
        &ref_out,
        &reference.path().join("export-state"),
        &[],
    );
    let want = rows(&ref_out);
    let total: usize = want.values().map(Vec::len).sum();
    assert!(want.len() >= 3 && total > 100, "{total} rows in {want:?}");

    // The lost machine. The relay keeps every frame (its replay window covers the study).
    let lost = tempfile::tempdir().unwrap();
    let survives = tempfile::tempdir().unwrap();
    let output = survives.path().join("dataset");
    let export_state = lost.path().join("export-state");
    let relay = TestRelay::start(data.frames[..a].to_vec()).await.unwrap();
    follow(lost.path(), &relay, &data, Some(0), seq_at(a - 1)).await;
    // The export reads the writer's cursor when it starts (here seq a-1: a copy of the state
    // taken then), and the writer goes on before the walk, so the run also exports files of
    // events after its resume point: the replacement writer writes those again.
    let snapshot = lost.path().join("writer-state-at-export-start.sqlite");
    for (from, to) in sqlite_set(&lost.path().join("state.sqlite"))
        .into_iter()
        .zip(sqlite_set(&snapshot))
    {
        if from.exists() {
            std::fs::copy(from, to).unwrap();
        }
    }
    for f in &data.frames[a..b] {
        relay.push(f.clone());
    }
    follow(lost.path(), &relay, &data, None, seq_at(b - 1)).await;
    export(
        &lost.path().join("cache"),
        &output,
        &export_state,
        &["--writer-state", snapshot.to_str().unwrap()],
    );
    // More events reach the cache, never exported: the machine is lost before the next run.
    for f in &data.frames[b..c] {
        relay.push(f.clone());
    }
    follow(lost.path(), &relay, &data, None, seq_at(c - 1)).await;
    std::fs::remove_dir_all(lost.path()).unwrap();

    // The replacement: the resume point from the output alone.
    let out = std::process::Command::new(batch_export_bin())
        .arg("--output")
        .arg(&output)
        .arg("resume-point")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resume: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(
        resume,
        seq_at(a - 1),
        "the cursor read when the export started"
    );

    let new = tempfile::tempdir().unwrap();
    for f in &data.frames[c..] {
        relay.push(f.clone());
    }
    follow(new.path(), &relay, &data, Some(resume), data.last_seq).await;
    relay.shutdown().await;
    let new_state = new.path().join("export-state");
    // A fresh state directory on an output with batches is refused until it adopts the output.
    let refused = batch_export(&new.path().join("cache"), &output, &new_state, &[]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let adopted = export(
        &new.path().join("cache"),
        &output,
        &new_state,
        &["--adopt-output"],
    );
    // The replacement wrote again the files of events after the resume point that the lost
    // machine had exported: the adopted memory knows them.
    assert!(
        adopted["already_exported"].as_u64().unwrap() > 10,
        "files exported before the loss, written again: {adopted}"
    );
    assert_eq!(adopted["batches_adopted"], 1, "{adopted}");

    let got = rows(&output);
    for (table, want_rows) in &want {
        let got_rows = got.get(table).cloned().unwrap_or_default();
        let missing: Vec<&String> = want_rows.iter().filter(|r| !got_rows.contains(r)).collect();
        let mut seen = std::collections::HashSet::new();
        let duplicated: Vec<&String> = got_rows.iter().filter(|r| !seen.insert(*r)).collect();
        assert!(
            missing.is_empty() && duplicated.is_empty(),
            "{table}: {} missing, {} duplicated; first missing {:?}, first duplicated {:?}",
            missing.len(),
            duplicated.len(),
            missing.first(),
            duplicated.first()
        );
    }
    assert_eq!(got, want, "the dataset equals the uninterrupted run's");
}
