//! A crash at each step of the durability barrier, and the start-up kernel check that decides
//! how the barrier flushes.
//!
//! Each crash test runs the writer binary (built with the `fault-injection` feature) in three
//! steps on the relay capture looped into unique events: a clean replay of the first half, a
//! replay of the whole that aborts (`FIREHOSE_WRITER_FAULT`) at one step of its first barrier,
//! and a clean rerun of the whole. What is on disk right after the crash shows the abort landed
//! in that step; after the rerun, cache and cursor must equal one uninterrupted replay.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;
use sync_core::frame::capture_frames;
use sync_core::synth;
use workspace_tests::fixtures;

use crate::support::{cache_files, stored_cursor};

const BIN: &str = env!("CARGO_BIN_EXE_firehose-writer");

/// The relay capture looped into unique events, its two halves, and the tracked sets.
struct Data {
    dir: tempfile::TempDir,
    first_half_seq: i64,
    last_seq: i64,
}

impl Data {
    fn first_half(&self) -> PathBuf {
        self.dir.path().join("first-half.bin")
    }
    fn all(&self) -> PathBuf {
        self.dir.path().join("all.bin")
    }
    fn study(&self) -> PathBuf {
        self.dir.path().join("study.txt")
    }
    fn network(&self) -> PathBuf {
        self.dir.path().join("network.txt")
    }
    fn did_docs(&self) -> PathBuf {
        self.dir.path().join("did_docs.json")
    }
}

const LOOPS: usize = 4;
const FIRST_SEQ: i64 = 1000;

fn data() -> Option<&'static Data> {
    static DATA: OnceLock<Option<Data>> = OnceLock::new();
    DATA.get_or_init(|| {
        let fixtures = fixtures()?;
        let raw_data = std::fs::read(fixtures.join("relay-capture/frames.bin")).unwrap();
        let raw: Vec<&[u8]> = capture_frames(&raw_data).map(|f| f.unwrap()).collect();
        // Re-signed for the renamed repos: the writer replays with `--did-docs`, so every routed
        // or tracked commit is verified (`--verify routed`) in every crash window.
        let mut looped = synth::LoopedCapture::new(&raw, FIRST_SEQ).signed();
        let frames: Vec<Vec<u8>> = looped.by_ref().take(raw.len() * LOOPS).collect();
        let docs = looped.did_documents("https://pds.invalid");
        let mut dids: Vec<String> = raw
            .iter()
            .filter_map(|f| match sync_core::frame::decode_frame(f).ok()? {
                sync_core::frame::Event::Commit(c) => Some(c.repo.as_str().to_owned()),
                _ => None,
            })
            .collect();
        dids.sort();
        dids.dedup();
        // Half the accounts are study users, the other half in-network: every rule fires.
        let pick = |skip: usize| -> String {
            (0..LOOPS as u32)
                .flat_map(|n| {
                    dids.iter()
                        .skip(skip)
                        .step_by(2)
                        .map(move |d| synth::looped_did(d, n))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let data = Data {
            dir: tempfile::tempdir().unwrap(),
            first_half_seq: FIRST_SEQ + (frames.len() / 2) as i64 - 1,
            last_seq: FIRST_SEQ + frames.len() as i64 - 1,
        };
        std::fs::write(data.did_docs(), docs.to_string()).unwrap();
        std::fs::write(data.study(), pick(0)).unwrap();
        std::fs::write(data.network(), pick(1)).unwrap();
        std::fs::write(
            data.first_half(),
            synth::capture(&frames[..frames.len() / 2]),
        )
        .unwrap();
        std::fs::write(data.all(), synth::capture(&frames)).unwrap();
        Some(data)
    })
    .as_ref()
}

/// Runs the writer binary to the end of `capture` (or to the fault) with `dir`'s cache and
/// state. A long commit interval makes the first barrier of a run hold many files.
fn run(d: &Data, dir: &Path, capture: &Path, env: &[(&str, &str)], extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--replay")
        .arg(capture)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--state")
        .arg(dir.join("state.sqlite"))
        .arg("--study-users")
        .arg(d.study())
        .arg("--in-network")
        .arg(d.network())
        .arg("--did-docs")
        .arg(d.did_docs())
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--commit-interval-ms",
            "1000",
        ])
        .args(["--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        // An abort may leave a core file in the working directory.
        .current_dir(dir)
        .output()
        .expect("run firehose-writer")
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Cache files (relative path -> JSON without the transform clock `synctimestamp`); temp files
/// are included, so a leftover shows up as an extra entry.
fn cache_tree(root: &Path) -> BTreeMap<String, Value> {
    cache_files(root)
        .into_iter()
        .map(|(rel, text)| {
            let mut json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{rel} is partial or corrupt: {e}"));
            if let Some(o) = json.as_object_mut() {
                o.remove("synctimestamp");
            }
            (rel, json)
        })
        .collect()
}

fn is_temp(rel: &str) -> bool {
    rel.rsplit('/').next().unwrap().starts_with(".tmp-")
}

/// The cache of one uninterrupted replay of the whole capture.
fn reference(d: &Data) -> &'static BTreeMap<String, Value> {
    static REFERENCE: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = run(d, tmp.path(), &d.all(), &[], &[]);
        assert_success(&out, "reference run");
        // Every routed or tracked commit was verified, and none failed.
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!log.contains("failed verification"), "{log}");
        assert_eq!(
            stored_cursor(&tmp.path().join("state.sqlite")),
            Some(d.last_seq)
        );
        let tree = cache_tree(&tmp.path().join("cache"));
        assert!(tree.len() > 200, "{} files", tree.len());
        assert!(!tree.keys().any(|k| is_temp(k)));
        tree
    })
}

/// What the crash left, compared with the state after the first half.
#[derive(Debug)]
struct AtCrash {
    temps: usize,
    /// Files renamed into place by the crashed run.
    new_files: usize,
    cursor: Option<i64>,
}

/// The three runs around a crash at `point`; returns what the crash left on disk.
fn crash_at(point: &str) -> Option<AtCrash> {
    let d = data()?;
    let reference = reference(d);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state.sqlite");
    let cache = tmp.path().join("cache");

    assert_success(&run(d, tmp.path(), &d.first_half(), &[], &[]), "first half");
    assert_eq!(stored_cursor(&state), Some(d.first_half_seq));
    let before = cache_tree(&cache);

    let out = run(
        d,
        tmp.path(),
        &d.all(),
        &[("FIREHOSE_WRITER_FAULT", point)],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the run aborts at {point}: {:?} (a binary built without the `fault-injection` \
         feature never does: is {BIN} from this build?)\n{stderr}",
        out.status
    );
    assert!(stderr.contains("test fault"), "{stderr}");
    let crashed = cache_files(&cache);
    for (rel, text) in &before {
        let now = serde_json::from_str::<Value>(&crashed[rel]).map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("synctimestamp");
            }
            v
        });
        assert_eq!(now.ok().as_ref(), Some(text), "{rel} is unchanged");
    }
    let at_crash = AtCrash {
        temps: crashed.keys().filter(|k| is_temp(k)).count(),
        new_files: crashed
            .keys()
            .filter(|k| !is_temp(k) && !before.contains_key(*k))
            .count(),
        cursor: stored_cursor(&state),
    };

    assert_success(&run(d, tmp.path(), &d.all(), &[], &[]), "rerun");
    assert_eq!(stored_cursor(&state), Some(d.last_seq));
    let after = cache_tree(&cache);
    let missing: Vec<&String> = reference
        .keys()
        .filter(|k| !after.contains_key(*k))
        .collect();
    let extra: Vec<&String> = after
        .keys()
        .filter(|k| !reference.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "after a crash at {point}: missing {missing:?}\nextra {extra:?}"
    );
    assert_eq!(
        &after, reference,
        "every file equals the uninterrupted run's"
    );
    Some(at_crash)
}

#[test]
fn a_crash_after_the_temp_writes_loses_nothing() {
    let Some(c) = crash_at("after-temp-write") else {
        return;
    };
    let d = data().unwrap();
    assert!(c.temps > 1, "the batch sat in temp files: {c:?}");
    assert_eq!(c.new_files, 0, "nothing renamed: {c:?}");
    assert_eq!(c.cursor, Some(d.first_half_seq));
}

#[test]
fn a_crash_after_the_first_syncfs_loses_nothing() {
    let Some(c) = crash_at("after-first-syncfs") else {
        return;
    };
    let d = data().unwrap();
    assert!(c.temps > 1, "flushed, not renamed: {c:?}");
    assert_eq!(c.new_files, 0, "{c:?}");
    assert_eq!(c.cursor, Some(d.first_half_seq));
}

#[test]
fn a_crash_in_the_middle_of_the_renames_loses_nothing() {
    let Some(c) = crash_at("mid-rename") else {
        return;
    };
    let d = data().unwrap();
    assert!(c.temps > 0 && c.new_files > 0, "half renamed: {c:?}");
    assert_eq!(c.cursor, Some(d.first_half_seq));
}

#[test]
fn a_crash_after_the_second_syncfs_loses_nothing() {
    let Some(c) = crash_at("after-second-syncfs") else {
        return;
    };
    let d = data().unwrap();
    assert_eq!(c.temps, 0, "all renamed: {c:?}");
    assert!(c.new_files > 1, "{c:?}");
    assert_eq!(c.cursor, Some(d.first_half_seq), "the cursor did not move");
}

#[test]
fn a_crash_inside_the_state_transaction_loses_nothing() {
    let Some(c) = crash_at("before-state-commit") else {
        return;
    };
    let d = data().unwrap();
    assert_eq!(c.temps, 0, "{c:?}");
    assert!(c.new_files > 1, "{c:?}");
    assert_eq!(
        c.cursor,
        Some(d.first_half_seq),
        "the uncommitted transaction is rolled back"
    );
}

#[test]
fn a_crash_after_the_state_commit_loses_nothing() {
    let Some(c) = crash_at("after-state-commit") else {
        return;
    };
    let d = data().unwrap();
    assert_eq!(c.temps, 0, "{c:?}");
    assert!(c.new_files > 1, "{c:?}");
    assert!(
        c.cursor > Some(d.first_half_seq),
        "the cursor moved with the commit: {c:?}"
    );
}

#[test]
fn an_unknown_fault_point_is_refused() {
    let Some(d) = data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        d,
        tmp.path(),
        &d.first_half(),
        &[("FIREHOSE_WRITER_FAULT", "mid_rename")],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a known fault point"), "{stderr}");
}

// ---- the kernel check -------------------------------------------------------------------------

#[test]
fn a_kernel_older_than_5_8_is_refused_unless_allowed_and_then_fsyncs_every_file() {
    let Some(d) = data() else { return };
    let old = [("FIREHOSE_WRITER_FAKE_KERNEL", "5.4.0-150-generic")];
    let tmp = tempfile::tempdir().unwrap();
    let out = run(d, tmp.path(), &d.all(), &old, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 3: a human must upgrade the kernel or allow it; the unit does not restart on 3.
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    for needle in [
        "kernel 5.4.0-150-generic is older than 5.8",
        "syncfs does not report writeback errors",
        "--allow-old-kernel",
        "FIREHOSE_ALLOW_OLD_KERNEL",
    ] {
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    }
    assert!(
        !tmp.path().join("cache").exists() && !tmp.path().join("state.sqlite").exists(),
        "refused before touching anything"
    );

    // Allowed (by flag, or by its variable): every file is fsynced one by one, and the cache
    // is the same as with syncfs.
    for (allow_env, flag) in [(None, "--allow-old-kernel"), (Some("true"), "")] {
        let tmp = tempfile::tempdir().unwrap();
        let mut env = old.to_vec();
        if let Some(v) = allow_env {
            env.push(("FIREHOSE_ALLOW_OLD_KERNEL", v));
        }
        let extra: Vec<&str> = [flag].into_iter().filter(|f| !f.is_empty()).collect();
        let out = run(d, tmp.path(), &d.all(), &env, &extra);
        assert_success(&out, "allowed old kernel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("fsynced one by one"), "{stderr}");
        assert_eq!(
            stored_cursor(&tmp.path().join("state.sqlite")),
            Some(d.last_seq)
        );
        assert_eq!(&cache_tree(&tmp.path().join("cache")), reference(d));
    }
}

#[test]
fn this_kernel_passes_the_check() {
    let Some(d) = data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = run(d, tmp.path(), &d.first_half(), &[], &[]);
    assert_success(&out, "a run on this machine's kernel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("fsynced one by one"), "{stderr}");
}

// ---- a crash at each step of a consent-withdrawal purge ----------------------------------------

/// The whole capture replayed (cache and state), the study user to withdraw (the one named by
/// the most files), and the cache after one uninterrupted purge of them.
struct Withdrawal {
    full: tempfile::TempDir,
    did: String,
    /// Files of theirs in the full cache, by the README rule applied here independently.
    theirs: usize,
    purged: BTreeMap<String, Value>,
    /// The routed index and the salted hashes of records about them after that purge.
    index: (Vec<(String, String)>, Vec<Vec<u8>>),
}

impl Withdrawal {
    fn list(&self) -> PathBuf {
        self.full.path().join("withdrawn.txt")
    }

    /// A copy of the full replay's cache and state in `to`.
    fn copy_into(&self, to: &Path) {
        for (rel, bytes) in crate::support::cache_file_bytes(&self.full.path().join("cache")) {
            let target = to.join("cache").join(&rel);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(target, bytes).unwrap();
        }
        for (path, bytes) in sqlite_files(&self.full.path().join("state.sqlite")) {
            std::fs::write(to.join(path.file_name().unwrap()), bytes).unwrap();
        }
    }

    /// How many files of theirs `cache` still holds.
    fn theirs_in(&self, cache: &Path) -> usize {
        theirs(cache, &self.did).len()
    }
}

use crate::withdrawn::{contains, is_theirs, purge_index, sqlite_files, withdrawn_rows};

/// The files of `did` under `cache`: path or contents name them, or they lie in the reaction
/// folder of one of their posts.
fn theirs(cache: &Path, did: &str) -> Vec<String> {
    let files = crate::support::cache_file_bytes(cache);
    let post_prefix = format!("at://{did}/app.bsky.feed.post/");
    let rkeys: Vec<String> = files
        .values()
        .filter_map(|bytes| serde_json::from_slice::<Value>(bytes).ok())
        .filter_map(|json| {
            let uri = json.get("uri")?.as_str()?;
            uri.strip_prefix(&post_prefix).map(str::to_owned)
        })
        .collect();
    let rkeys: Vec<&str> = rkeys.iter().map(String::as_str).collect();
    files
        .iter()
        .filter(|(path, bytes)| is_theirs(path, bytes, did, &rkeys))
        .map(|(path, _)| path.clone())
        .collect()
}

fn withdrawal() -> Option<&'static Withdrawal> {
    static W: OnceLock<Option<Withdrawal>> = OnceLock::new();
    W.get_or_init(|| {
        let d = data()?;
        let full = tempfile::tempdir().unwrap();
        assert_success(&run(d, full.path(), &d.all(), &[], &[]), "full replay");
        let cache = full.path().join("cache");
        let files = crate::support::cache_file_bytes(&cache);
        let study = std::fs::read_to_string(d.study()).unwrap();
        let did = study
            .lines()
            .max_by_key(|did| {
                files
                    .iter()
                    .filter(|(p, b)| p.contains(did) || contains(b, did))
                    .count()
            })
            .unwrap()
            .to_owned();
        let their_files = theirs(&cache, &did);
        assert!(
            their_files.len() >= 4,
            "{did} has files to remove: {their_files:?}"
        );
        std::fs::write(
            full.path().join("withdrawn.txt"),
            format!("# withdrew\n{did}\n"),
        )
        .unwrap();

        // One uninterrupted purge: the full cache without exactly their files.
        let tmp = tempfile::tempdir().unwrap();
        let w = Withdrawal {
            theirs: their_files.len(),
            purged: BTreeMap::new(),
            index: Default::default(),
            did,
            full,
        };
        w.copy_into(tmp.path());
        let out = run(
            d,
            tmp.path(),
            &d.all(),
            &[],
            &["--withdrawn", w.list().to_str().unwrap()],
        );
        assert_success(&out, "uninterrupted purge");
        let purged = cache_tree(&tmp.path().join("cache"));
        let mut expected = cache_tree(&cache);
        for rel in &their_files {
            expected.remove(rel);
        }
        assert_eq!(
            purged, expected,
            "the purge removes their files and only theirs"
        );
        let index = purge_index(&tmp.path().join("state.sqlite"));
        Some(Withdrawal { purged, index, ..w })
    })
    .as_ref()
}

/// What a withdrawal purge that crashed at `point` left.
#[derive(Debug)]
struct AtPurgeCrash {
    /// Their files still in the cache.
    theirs_left: usize,
    /// Purges recorded in the state (salted hashes).
    recorded: usize,
}

/// A purge of the withdrawal's DID that aborts at `point`, then a clean rerun, which must end
/// exactly as the uninterrupted purge did, with the DID nowhere in the cache or the state.
fn purge_crash_at(point: &str) -> Option<AtPurgeCrash> {
    purge_crash_then(point, |_| {})
}

/// [`purge_crash_at`], with `after_crash` given the state file between the crash and the rerun.
fn purge_crash_then(point: &str, after_crash: impl FnOnce(&Path)) -> Option<AtPurgeCrash> {
    let d = data()?;
    let w = withdrawal()?;
    let tmp = tempfile::tempdir().unwrap();
    w.copy_into(tmp.path());
    let state = tmp.path().join("state.sqlite");
    let cache = tmp.path().join("cache");
    let list = w.list();
    let flags = ["--withdrawn", list.to_str().unwrap()];

    let out = run(
        d,
        tmp.path(),
        &d.all(),
        &[("FIREHOSE_WRITER_FAULT", point)],
        &flags,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "the purge aborts at {point}: {:?}\n{stderr}",
        out.status
    );
    let at_crash = AtPurgeCrash {
        theirs_left: w.theirs_in(&cache),
        recorded: withdrawn_rows(&state).len(),
    };
    let mut others = cache_tree(&cache);
    others.retain(|rel, _| !is_temp(rel));
    for (rel, json) in &w.purged {
        assert_eq!(
            others.get(rel),
            Some(json),
            "{rel}: nobody else's file is touched"
        );
    }
    after_crash(&state);

    let out = run(d, tmp.path(), &d.all(), &[], &flags);
    assert_success(&out, "rerun after the crash");
    assert_eq!(stored_cursor(&state), Some(d.last_seq));
    assert_eq!(
        cache_tree(&cache),
        w.purged,
        "after a crash at {point} the rerun ends as the uninterrupted purge"
    );
    assert_eq!(
        withdrawn_rows(&state).len(),
        1,
        "the purge is recorded once"
    );
    // What the files alone told (records of others naming them) is not lost with the files.
    let index = purge_index(&state);
    assert_eq!(
        index.0, w.index.0,
        "after a crash at {point} the routed index ends as after the uninterrupted purge"
    );
    assert_eq!(
        index.1, w.index.1,
        "after a crash at {point} the records about them are those of the uninterrupted purge"
    );
    for (path, bytes) in sqlite_files(&state) {
        assert!(
            !contains(&bytes, &w.did),
            "{} still holds the withdrawn DID",
            path.display()
        );
    }
    Some(at_crash)
}

#[test]
fn a_withdrawal_purge_killed_before_removing_files_is_finished_by_the_next_start() {
    let Some(c) = purge_crash_at("withdraw-before-removal") else {
        return;
    };
    let w = withdrawal().unwrap();
    assert_eq!(c.theirs_left, w.theirs, "nothing removed yet: {c:?}");
    assert_eq!(c.recorded, 0, "{c:?}");
}

#[test]
fn a_withdrawal_purge_killed_between_two_removals_is_finished_by_the_next_start() {
    let Some(c) = purge_crash_at("withdraw-removal@2") else {
        return;
    };
    let w = withdrawal().unwrap();
    assert_eq!(c.theirs_left, w.theirs - 2, "two files removed: {c:?}");
    assert_eq!(c.recorded, 0, "{c:?}");
}

#[test]
fn a_withdrawal_purge_killed_before_its_index_purge_commits_is_finished_by_the_next_start() {
    let Some(c) = purge_crash_at("withdraw-before-record") else {
        return;
    };
    assert_eq!(c.theirs_left, 0, "every file removed: {c:?}");
    assert_eq!(c.recorded, 0, "the index purge is not committed: {c:?}");
}

#[test]
fn a_withdrawal_purge_killed_before_the_wal_is_truncated_leaves_nothing_of_theirs() {
    // The killed writer had not checkpointed the purge: the database file still holds the pages
    // from before it. A writer that starts on the state must erase them before it runs, not only
    // when it closes cleanly: the state is searched while a store is open on it.
    let Some(c) = purge_crash_then("withdraw-after-record", |state| {
        let w = withdrawal().unwrap();
        // The purge's pages are in the WAL; the database file still has the old ones.
        let before = sqlite_files(state)
            .into_iter()
            .any(|(_, bytes)| contains(&bytes, &w.did));
        assert!(
            before,
            "the crash left pages of theirs behind (else this tests nothing)"
        );
        let store =
            firehose_writer::state::StateStore::open(state, Default::default(), Default::default())
                .unwrap();
        for (path, bytes) in sqlite_files(state) {
            assert!(
                !contains(&bytes, &w.did),
                "{} holds the withdrawn DID while a writer runs on it",
                path.display()
            );
        }
        drop(store);
    }) else {
        return;
    };
    assert_eq!(c.theirs_left, 0, "{c:?}");
    assert_eq!(c.recorded, 1, "the purge is committed: {c:?}");
}
