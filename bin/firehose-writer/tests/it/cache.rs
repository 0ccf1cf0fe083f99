//! The cache writer (`firehose_writer::cache`): paths cannot leave the cache root, writes are
//! atomic, and the durability barrier flushes what it claims to.
//!
//! Path safety: for arbitrary (and hand-picked hostile) strings used as DID and record key, when
//! `Did::parse` / `RecordKey::parse` accept them, every `Folder` variant's path built from them
//! resolves under the root with only plain components, and a real `CacheWriter::write` + `sync`
//! creates the file there and nowhere else: the root is `<tmp>/sandbox/cache` and `<tmp>` must
//! hold nothing but `sandbox` afterwards (and `sandbox` nothing but `cache`).
//!
//! Writer semantics: invisible until `sync`, atomic replace on rewrite (idempotent replay),
//! `.tmp-` temp names and `remove_stale_temps`, a failed `sync` keeps its pending files, and
//! names over 255 bytes are refused by `Folder::path`.
//!
//! Flushing: `syncfs` on a cache-root descriptor held for the writer's lifetime, any `syncfs`
//! error final (no fallback), per-file `fsync` for a folder on another file system (a mount
//! inside the cache) and where `syncfs` is not used.

use std::fs;
use std::path::{Component, Path, PathBuf};

use firehose_writer::cache::{CacheError, CacheWriter, FlushMode, FlushStats, TEMP_PREFIX};
use proptest::prelude::*;
use sync_core::ids::{Did, RecordKey, Tid};
use sync_core::paths::{self, AccountEventKey, CachePath, Folder, MAX_NAME_BYTES};

const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const A1: &str = "did:plc:w4xbfzo7kqfes5zb7r6qv3rw";
const RKEY: &str = "3l5jnpb6xyz2k";
const REV: &str = "3l5jnpb6xyz3a";

/// The kinds routing passes to `StudyDelete` and `record_file`.
const KINDS: [&str; 6] = ["post", "like", "repost", "follow", "block", "profile"];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `<tmp>/sandbox/cache` under a fresh temp dir.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// On tmpfs when there is one: the path-safety tests write and fsync thousands of files,
    /// which costs minutes on a real disk and tests nothing about paths.
    fn in_memory() -> Self {
        let shm = Path::new("/dev/shm");
        match tempfile::tempdir_in(shm) {
            Ok(tmp) if shm.is_dir() => Sandbox { tmp },
            _ => Sandbox::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("sandbox").join("cache")
    }

    /// Nothing exists beside the cache root: `<tmp>` = {sandbox}, `<tmp>/sandbox` = {cache}.
    fn assert_contained(&self) {
        assert_eq!(names(self.tmp.path()), ["sandbox"], "beside the sandbox");
        assert_eq!(
            names(&self.tmp.path().join("sandbox")),
            ["cache"],
            "beside the cache root"
        );
        // and nothing under the root is a symlink or a special file
        for path in walk(&self.root()) {
            let ty = fs::symlink_metadata(&path).unwrap().file_type();
            assert!(ty.is_file() || ty.is_dir(), "{} is neither", path.display());
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every path below `dir` (files and directories), depth first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    walk(dir).into_iter().filter(|p| p.is_file()).collect()
}

/// Every folder variant that can be built from these identifiers.
fn folders(did: &Did, rkey: &RecordKey) -> Vec<Folder> {
    let mut v = vec![
        Folder::StudyPost,
        Folder::ReplyToUserPost(rkey.clone()),
        Folder::InNetworkPost(did.clone()),
        Folder::StudyLike(rkey.clone()),
        Folder::LikeOnUserPost(rkey.clone()),
        Folder::Follower,
        Folder::Followee,
        Folder::StudyRepost,
        Folder::RepostOfUserPost(rkey.clone()),
        Folder::QuoteOfUserPost(rkey.clone()),
        Folder::StudyBlock,
        Folder::StudyProfile,
        Folder::Account,
    ];
    v.extend(KINDS.map(Folder::StudyDelete));
    v
}

/// Every file name kind routing builds from these identifiers.
fn file_names(did: &Did, other: &Did, rkey: &RecordKey) -> Vec<String> {
    let rev = Tid::parse(REV).unwrap();
    let mut v: Vec<String> = KINDS
        .iter()
        .map(|k| paths::record_file(did, k, rkey))
        .collect();
    v.push(paths::follow_file(did, other));
    v.push(paths::follow_file(other, did));
    v.push(paths::profile_file(did, rkey, &rev));
    let account = AccountEventKey {
        did,
        kind: "account",
        time: "2024-10-02T15:00:00.000Z",
        handle: None,
        active: Some(false),
        status: Some("deleted"),
    };
    v.push(paths::account_file(&account));
    // The event's time and handle are unvalidated input: never a path piece.
    v.push(paths::account_file(&AccountEventKey {
        kind: "identity",
        time: "../../x/\0",
        handle: Some("../.."),
        active: None,
        status: None,
        ..account
    }));
    v
}

/// `Folder::path` refuses exactly the paths with a segment over 255 bytes or a hidden (dot-first)
/// segment (`None`).
fn build(folder: &Folder, file: &str) -> Result<Option<CachePath>, TestCaseError> {
    let too_long = folder
        .dir()
        .split('/')
        .chain([file])
        .any(|s| s.len() > MAX_NAME_BYTES || s.starts_with('.'));
    match folder.path(file.to_owned()) {
        Ok(p) => {
            prop_assert!(!too_long, "{folder:?} accepted a segment over 255 bytes");
            Ok(Some(p))
        }
        Err(e) => {
            prop_assert!(too_long, "{folder:?} refused {file:?}: {e}");
            Ok(None)
        }
    }
}

/// `resolve` maps the path to `root/<dir>/<file>` with only plain components.
fn check_resolved(w: &CacheWriter, path: &CachePath) -> Result<PathBuf, TestCaseError> {
    let abs = w
        .resolve(path)
        .map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
    prop_assert!(
        abs.starts_with(w.root()),
        "{} outside the root",
        abs.display()
    );
    let rel = abs.strip_prefix(w.root()).unwrap();
    prop_assert!(
        rel.components().all(|c| matches!(c, Component::Normal(_))),
        "{} has a non-plain component",
        rel.display()
    );
    // nothing collapsed or reinterpreted: the relative path is the cache path, segment for segment
    let shown = path.to_string();
    prop_assert_eq!(rel, Path::new(&shown));
    prop_assert_eq!(rel.components().count(), path.dir().split('/').count() + 1);
    Ok(abs)
}

/// Validated identifiers never hold what a path would interpret.
fn check_id_is_path_safe(s: &str) -> Result<(), TestCaseError> {
    prop_assert!(!s.is_empty());
    prop_assert!(!s.contains(['/', '\\', '\0']), "{s:?}");
    prop_assert!(s != "." && s != "..", "{s:?}");
    prop_assert!(s.is_ascii(), "{s:?}");
    Ok(())
}

/// Every (folder, file) path from these strings: checked, and returned with its absolute path.
fn paths_for(
    w: &CacheWriter,
    did: &str,
    rkey: &str,
) -> Result<Vec<(CachePath, PathBuf)>, TestCaseError> {
    let did = match Did::parse(did) {
        Ok(d) => {
            check_id_is_path_safe(d.as_str())?;
            d
        }
        Err(_) => Did::parse(S1).unwrap(),
    };
    let rkey = match RecordKey::parse(rkey) {
        Ok(r) => {
            check_id_is_path_safe(r.as_str())?;
            r
        }
        Err(_) => RecordKey::parse(RKEY).unwrap(),
    };
    let other = Did::parse(A1).unwrap();
    let names = file_names(&did, &other, &rkey);
    let mut out = Vec::new();
    for folder in folders(&did, &rkey) {
        if !matches!(folder, Folder::StudyDelete(_)) {
            prop_assert_eq!(Folder::from_dir(&folder.dir()), Some(folder.clone()));
        }
        for name in &names {
            let Some(path) = build(&folder, name)? else {
                continue;
            };
            for p in [path.to_delete(), path] {
                let abs = check_resolved(w, &p)?;
                out.push((p, abs));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

const HOSTILE: &[&str] = &[
    "..", ".", "/", "\\", "\0", "%2F", "%2f", "%2e%2e", "%00", "%5C", ":", "~", "-", "_", "a", "Z",
    "9", "é", "😀", "\u{202e}", "\u{2215}", "\u{ff0f}", "\u{200b}", " ", "\n", "CON", "nul", "*",
    "?", "|", "\"", "<", ">", "$", "`", "'", "%",
];

fn hostile_piece() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(HOSTILE), 1..12).prop_map(|v| v.concat())
}

fn long(alphabet: &'static str) -> impl Strategy<Value = String> {
    (200usize..2200, any::<u64>()).prop_map(move |(n, seed)| {
        let a = alphabet.as_bytes();
        (0..n)
            .map(|i| a[(seed as usize).wrapping_add(i * 7) % a.len()] as char)
            .collect()
    })
}

fn did_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "did:[a-z]{1,8}:[a-zA-Z0-9._:%-]{1,64}",
        hostile_piece().prop_map(|p| format!("did:plc:{p}")),
        hostile_piece().prop_map(|p| format!("did:web:{p}")),
        hostile_piece(),
        long("a.:%-_").prop_map(|p| format!("did:web:{p}")),
        "did:web:\\.{1,4}",
    ]
}

fn rkey_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9._:~-]{1,24}",
        "\\.{1,5}",
        "[.~:_-]{1,8}",
        hostile_piece(),
        long("a.~:_-"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Path safety
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Resolution only (cheap): every variant's path stays under the root.
    #[test]
    fn every_folder_path_resolves_inside_the_root(did in did_string(), rkey in rkey_string()) {
        let sandbox = Sandbox::in_memory();
        let w = CacheWriter::open(sandbox.root()).unwrap();
        paths_for(&w, &did, &rkey)?;
    }
}

proptest! {
    // Each case writes and fsyncs ~190 files (on tmpfs when available).
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Real writes: every file lands where `resolve` said, and nothing lands outside the sandbox.
    #[test]
    fn written_files_stay_inside_the_sandbox(did in did_string(), rkey in rkey_string()) {
        let sandbox = Sandbox::in_memory();
        let mut w = CacheWriter::open(sandbox.root()).unwrap();
        let paths = paths_for(&w, &did, &rkey)?;
        for (p, _) in &paths {
            w.write(p, p.to_string().as_bytes()).unwrap();
        }
        w.sync().unwrap();
        for (p, abs) in &paths {
            prop_assert_eq!(fs::read_to_string(abs).unwrap(), p.to_string());
        }
        sandbox.assert_contained();
        let mut expected: Vec<PathBuf> = paths.into_iter().map(|(_, abs)| abs).collect();
        expected.sort();
        expected.dedup();
        prop_assert_eq!(files_under(&sandbox.root()), expected);
    }
}

#[test]
fn hostile_identifiers_are_refused_or_stay_inside() {
    let sandbox = Sandbox::in_memory();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let long_did = format!("did:web:{}", "a".repeat(300));
    let long_rkey = "k".repeat(300);
    let dids = [
        "did:plc:..",
        "did:web:...",
        "did:plc:../../etc",
        "did:plc:..%2F..%2Fetc",
        "did:plc:%2e%2e",
        "did:plc:a/b",
        "did:plc:a\\b",
        "did:plc:a\0b",
        "did:plc:é",
        "did:plc:.tmp-1-1",
        "did:plc:-",
        "/did:plc:abc",
        "did:plc:",
        long_did.as_str(),
        S1,
    ];
    let rkeys = [
        ".",
        "..",
        "...",
        "../x",
        "..\\x",
        "a/b",
        "%2F",
        "\0",
        "~",
        ":",
        ".tmp-1-1",
        "self",
        "é",
        long_rkey.as_str(),
        RKEY,
    ];
    let mut accepted = Vec::new();
    for d in dids {
        for r in rkeys {
            let paths = paths_for(&w, d, r).unwrap_or_else(|e| panic!("{d:?} {r:?}: {e}"));
            if Did::parse(d).is_ok() && RecordKey::parse(r).is_ok() {
                accepted.push((d, r));
            }
            for (p, _) in paths {
                w.write(&p, b"{}").unwrap();
            }
            // The writer holds one open file per pending write: keep batches small.
            w.sync().unwrap();
        }
    }
    sandbox.assert_contained();
    // What the identifier rules let through, for the record: the percent and dot forms are
    // plain names (no decoding happens anywhere), the rest never parse.
    for (d, r) in &accepted {
        for bad in ["/", "\\", "\0"] {
            assert!(!d.contains(bad) && !r.contains(bad), "{d:?} {r:?}");
        }
        assert!(*r != "." && *r != "..");
    }
    assert!(accepted.contains(&("did:plc:..", "...")));
    assert!(accepted.contains(&("did:plc:..%2F..%2Fetc", "...")));
    assert!(accepted.contains(&("did:plc:.tmp-1-1", ".tmp-1-1")));
    assert!(RecordKey::parse("%2F").is_err() && Did::parse("did:plc:a/b").is_err());
    // Over-long segments are refused, not truncated.
    let long = Did::parse(&long_did).unwrap();
    assert!(Folder::InNetworkPost(long.clone())
        .path("x.json".into())
        .is_err());
    assert!(Folder::StudyPost
        .path(paths::account_file(&AccountEventKey {
            did: &long,
            kind: "account",
            time: "2024-10-02T15:00:00.000Z",
            handle: None,
            active: Some(true),
            status: None,
        }))
        .is_err());
}

#[test]
fn resolve_refuses_what_validated_identifiers_cannot_produce() {
    // Folder::StudyDelete takes a &'static str and path() any file name: resolve is the last line.
    let sandbox = Sandbox::new();
    let w = CacheWriter::open(sandbox.root()).unwrap();
    let refused = [
        Folder::StudyDelete("..").path("x.json".into()),
        Folder::StudyDelete("../../..").path("x.json".into()),
        Folder::StudyPost.path("/etc/passwd".into()),
        Folder::StudyPost.path("a/b.json".into()),
    ];
    // Dot-first names never even become a CachePath.
    for name in [
        "../x.json".to_owned(),
        "..".into(),
        ".".into(),
        ".hidden.json".into(),
        format!("{TEMP_PREFIX}1-1"),
    ] {
        assert!(Folder::StudyPost.path(name.clone()).is_err(), "{name}");
    }
    for p in refused {
        // Refused when the path is built (dot-first or empty segment) or when it is resolved.
        let Ok(p) = p else { continue };
        assert!(
            matches!(w.resolve(&p), Err(CacheError::Escapes(_))),
            "{p} resolved to {:?}",
            w.resolve(&p)
        );
    }
    // Empty and `.` segments collapse when joined: harmless, the result is still under the root.
    for p in [
        Folder::StudyDelete("/etc").path("x.json".into()),
        Folder::StudyDelete("a/./b").path("x.json".into()),
        Folder::StudyDelete("a//b/").path("x.json".into()),
    ] {
        let Ok(p) = p else { continue };
        match w.resolve(&p) {
            Err(CacheError::Escapes(_)) => {}
            Ok(abs) => {
                let rel = abs.strip_prefix(w.root()).expect("under the root");
                assert!(
                    rel.components().all(|c| matches!(c, Component::Normal(_))),
                    "{p}"
                );
            }
            Err(e) => panic!("{p}: {e}"),
        }
    }
    sandbox.assert_contained();
}

// ---------------------------------------------------------------------------------------------
// Writer semantics
// ---------------------------------------------------------------------------------------------

fn post_path(rkey: &str) -> CachePath {
    let did = Did::parse(S1).unwrap();
    let rkey = RecordKey::parse(rkey).unwrap();
    Folder::StudyPost
        .path(paths::record_file(&did, "post", &rkey))
        .unwrap()
}

fn temp_names(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.starts_with(TEMP_PREFIX))
        .collect()
}

#[test]
fn a_write_is_invisible_until_sync() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let path = post_path(RKEY);
    let target = w.resolve(&path).unwrap();
    let dir = target.parent().unwrap().to_owned();
    let contents = "{\"text\": \"hello\"}".repeat(1000);
    w.write(&path, contents.as_bytes()).unwrap();
    assert!(!target.exists(), "visible before sync");
    assert_eq!(w.pending(), 1);
    // The bytes sit in one temp file in the destination directory, and only there.
    assert_eq!(names(&dir), temp_names(&dir));
    assert_eq!(temp_names(&dir).len(), 1);
    assert_eq!(w.sync().unwrap(), 1);
    assert_eq!(fs::read_to_string(&target).unwrap(), contents);
    assert_eq!(w.pending(), 0);
    assert!(temp_names(&dir).is_empty(), "temp left behind");
    assert_eq!(w.sync().unwrap(), 0, "an empty sync is a no-op");
    sandbox.assert_contained();
}

#[test]
fn rewriting_a_path_replaces_it() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let path = post_path(RKEY);
    let target = w.resolve(&path).unwrap();
    w.write(&path, b"first, and longer than the second")
        .unwrap();
    w.sync().unwrap();
    // Replay of the same event: same path, same bytes; one file, same contents.
    w.write(&path, b"first, and longer than the second")
        .unwrap();
    assert_eq!(
        fs::read(&target).unwrap(),
        b"first, and longer than the second",
        "the old file stays whole until the rename"
    );
    w.sync().unwrap();
    assert_eq!(
        fs::read(&target).unwrap(),
        b"first, and longer than the second"
    );
    // A different version replaces it whole (no leftover tail).
    w.write(&path, b"second").unwrap();
    w.sync().unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"second");
    // Two writes of one path in one batch: the last one wins.
    w.write(&path, b"third").unwrap();
    w.write(&path, b"fourth").unwrap();
    assert_eq!(w.sync().unwrap(), 2);
    assert_eq!(fs::read(&target).unwrap(), b"fourth");
    assert_eq!(files_under(&sandbox.root()), [target]);
    sandbox.assert_contained();
}

#[test]
fn temp_files_are_dot_tmp_and_stale_ones_are_removed() {
    let sandbox = Sandbox::new();
    let paths: Vec<CachePath> = ["3l5jnpb6xyz2a", "3l5jnpb6xyz2b", "3l5jnpb6xyz2c"]
        .into_iter()
        .map(post_path)
        .collect();
    let kept = post_path("3l5jnpb6xyz2z");
    {
        let mut w = CacheWriter::open(sandbox.root()).unwrap();
        w.write(&kept, b"kept").unwrap();
        w.sync().unwrap();
        for p in &paths {
            w.write(p, b"never synced").unwrap();
        }
        let dir = w.resolve(&paths[0]).unwrap().parent().unwrap().to_owned();
        let temps = temp_names(&dir);
        assert_eq!(temps.len(), 3, "{:?}", names(&dir));
        assert!(temps.iter().all(|t| t.starts_with(TEMP_PREFIX)));
        // A killed writer runs no destructor: simulate it, leaving the temps on disk.
        std::mem::forget(w);
    }
    // Leftovers of other writers elsewhere in the tree, and things that must survive.
    let nested = sandbox
        .root()
        .join("in_network_user_activity/create/post/did:plc:x");
    fs::create_dir_all(&nested).unwrap();
    fs::write(nested.join(".tmp-99999-7"), b"stale").unwrap();
    fs::write(nested.join("author_did=x.json"), b"real").unwrap();
    fs::write(nested.join(".tmp"), b"not ours: no dash").unwrap();
    let w = CacheWriter::open(sandbox.root()).unwrap();
    assert_eq!(w.remove_stale_temps().removed, 4);
    let left: Vec<String> = files_under(&sandbox.root())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.starts_with(TEMP_PREFIX)), "{left:?}");
    assert_eq!(left.len(), 3, "{left:?}");
    assert_eq!(fs::read(w.resolve(&kept).unwrap()).unwrap(), b"kept");
    for p in &paths {
        assert!(!w.resolve(p).unwrap().exists());
    }
    assert_eq!(w.remove_stale_temps().removed, 0);
    sandbox.assert_contained();
}

#[test]
fn dropping_a_writer_discards_its_unsynced_temps() {
    let sandbox = Sandbox::new();
    let path = post_path(RKEY);
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    w.write(&path, b"abandoned").unwrap();
    let target = w.resolve(&path).unwrap();
    w.discard_pending();
    assert_eq!(w.pending(), 0);
    w.write(&path, b"dropped").unwrap();
    drop(w);
    assert!(!target.exists());
    assert!(files_under(&sandbox.root()).is_empty());
}

/// True when permission bits bind this process (not root, or root without CAP_DAC_OVERRIDE).
fn permissions_apply(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("probe");
    fs::create_dir(&probe).unwrap();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o555)).unwrap();
    let applies = fs::write(probe.join("x"), b"x").is_err();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_dir_all(&probe).unwrap();
    applies
}

#[test]
fn a_failed_sync_keeps_pending_files_for_the_next_one() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let p: Vec<CachePath> = ["3l5jnpb6xyz2a", "3l5jnpb6xyz2b", "3l5jnpb6xyz2c"]
        .into_iter()
        .map(post_path)
        .collect();
    let t: Vec<PathBuf> = p.iter().map(|p| w.resolve(p).unwrap()).collect();
    for (i, path) in p.iter().enumerate() {
        w.write(path, format!("file {i}").as_bytes()).unwrap();
    }
    // The second target is blocked: a non-empty directory sits where the file goes, so the
    // rename fails (this works as root, unlike permission bits).
    fs::create_dir_all(t[1].join("blocker")).unwrap();
    let err = w.sync().expect_err("rename onto a directory fails");
    assert!(err.is_io(), "{err}");
    assert_eq!(
        fs::read_to_string(&t[0]).unwrap(),
        "file 0",
        "renamed before the failure"
    );
    assert!(t[1].is_dir());
    assert!(!t[2].exists(), "not renamed after the failure");
    assert_eq!(w.pending(), 2, "the failed and later files stay pending");
    // A second sync without a fix fails the same way and loses nothing.
    assert!(w.sync().is_err());
    assert_eq!(w.pending(), 2);
    // Fix it: the next sync completes the batch.
    fs::remove_dir_all(&t[1]).unwrap();
    assert_eq!(w.sync().unwrap(), 2);
    for (i, target) in t.iter().enumerate() {
        assert_eq!(fs::read_to_string(target).unwrap(), format!("file {i}"));
    }
    assert_eq!(w.pending(), 0);
    let dir = t[0].parent().unwrap();
    assert!(temp_names(dir).is_empty());
    sandbox.assert_contained();
}

#[test]
fn a_sync_into_a_read_only_directory_fails_then_recovers() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    if !permissions_apply(w.root()) {
        eprintln!(
            "permission bits do not bind this process (root): covered by the blocked-rename test"
        );
        return;
    }
    let path = post_path(RKEY);
    let target = w.resolve(&path).unwrap();
    w.write(&path, b"pending").unwrap();
    let dir = target.parent().unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).unwrap();
    let result = w.sync();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(result.is_err(), "sync into a read-only directory succeeded");
    assert_eq!(w.pending(), 1);
    assert_eq!(w.sync().unwrap(), 1);
    assert_eq!(fs::read(&target).unwrap(), b"pending");
}

#[test]
fn a_file_where_a_directory_belongs_fails_the_write_not_the_writer() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let path = post_path(RKEY);
    let target = w.resolve(&path).unwrap();
    // `study_user_activity/create` is a file: the directory cannot be created.
    let create = sandbox.root().join("study_user_activity/create");
    fs::create_dir_all(create.parent().unwrap()).unwrap();
    fs::write(&create, b"in the way").unwrap();
    let err = w.write(&path, b"x").expect_err("parent is a file");
    assert!(err.is_io(), "{err}");
    assert_eq!(w.pending(), 0);
    assert_eq!(w.sync().unwrap(), 0);
    fs::remove_file(&create).unwrap();
    w.write(&path, b"x").unwrap();
    assert_eq!(w.sync().unwrap(), 1);
    assert_eq!(fs::read(&target).unwrap(), b"x");
    sandbox.assert_contained();
}

#[test]
fn names_over_255_bytes_are_refused() {
    let did = Did::parse(S1).unwrap();
    // File names: 255 bytes is fine, 256 is not.
    let ok = "a".repeat(MAX_NAME_BYTES);
    let over = "a".repeat(MAX_NAME_BYTES + 1);
    assert!(Folder::StudyPost.path(ok.clone()).is_ok());
    let err = Folder::StudyPost.path(over).unwrap_err();
    assert_eq!(
        err,
        sync_core::paths::NameTooLong::TooLong(MAX_NAME_BYTES + 1)
    );
    // Multi-byte characters count in bytes.
    assert!(Folder::StudyPost.path("é".repeat(128)).is_err());
    // Directory segments: a 255-byte rkey is fine as a folder, 256 is not.
    let rkey_ok = RecordKey::parse(&"k".repeat(MAX_NAME_BYTES)).unwrap();
    let rkey_over = RecordKey::parse(&"k".repeat(MAX_NAME_BYTES + 1)).unwrap();
    assert!(Folder::StudyLike(rkey_ok).path("x.json".into()).is_ok());
    assert_eq!(
        Folder::StudyLike(rkey_over.clone())
            .path("x.json".into())
            .unwrap_err(),
        sync_core::paths::NameTooLong::TooLong(MAX_NAME_BYTES + 1)
    );
    // A long rkey in the file name pushes it over.
    assert!(Folder::StudyPost
        .path(paths::record_file(&did, "post", &rkey_over))
        .is_err());
    // And a 255-byte name really is writable.
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let p = Folder::StudyPost.path(ok).unwrap();
    w.write(&p, b"x").unwrap();
    w.sync().unwrap();
    assert!(w.resolve(&p).unwrap().is_file());
}

#[test]
fn rkeys_starting_with_a_dot_never_become_hidden_folders() {
    // Valid record keys, but as nesting folders they would be invisible to every reader: the
    // leading dot is spelled `%2E` (reversibly), and the file is written where readers look.
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    for (rkey, folder) in [(".x", "%2Ex"), ("...", "%2E.."), (".hidden", "%2Ehidden")] {
        let rkey = RecordKey::parse(rkey).unwrap();
        let path = Folder::StudyLike(rkey.clone())
            .path("f.json".into())
            .unwrap();
        assert_eq!(
            path.dir(),
            format!("study_user_activity/create/like/{folder}")
        );
        assert_eq!(
            Folder::from_dir(path.dir()),
            Some(Folder::StudyLike(rkey)),
            "reversible"
        );
        w.write(&path, b"{}").unwrap();
    }
    w.sync().unwrap();
    let like = sandbox.root().join("study_user_activity/create/like");
    assert_eq!(names(&like), ["%2E..", "%2Ehidden", "%2Ex"]);
    sandbox.assert_contained();
}

#[test]
fn a_folder_removed_by_the_export_is_created_again() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let rkey = RecordKey::parse("3l5jnpb6xyz2k").unwrap();
    let first = Folder::LikeOnUserPost(rkey.clone())
        .path("a.json".into())
        .unwrap();
    w.write(&first, b"{}").unwrap();
    w.sync().unwrap();
    // The export exports and deletes the file, then prunes the empty folder.
    let dir = sandbox.root().join(first.dir());
    std::fs::remove_file(dir.join("a.json")).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    let second = Folder::LikeOnUserPost(rkey).path("b.json".into()).unwrap();
    w.write(&second, b"{}").unwrap();
    w.sync().unwrap();
    assert!(dir.join("b.json").is_file());
}

// ---------------------------------------------------------------------------------------------
// What a flush proves
// ---------------------------------------------------------------------------------------------

/// This process's descriptors open on `dir`, with their `open` flags (from `/proc/self/fdinfo`).
fn descriptors_on(dir: &Path) -> Vec<(String, u32)> {
    let dir = fs::canonicalize(dir).unwrap();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(entry) = entry else { continue };
        let fd = entry.file_name().to_string_lossy().into_owned();
        if fs::read_link(entry.path()).ok().as_deref() != Some(dir.as_path()) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        out.push((fd, flags));
    }
    out
}

#[test]
fn the_cache_root_stays_open_for_the_writers_lifetime() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    let held = descriptors_on(&sandbox.root());
    assert_eq!(held.len(), 1, "one descriptor of the root, held: {held:?}");
    let flags = held[0].1 as i32;
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    assert_ne!(flags & libc::O_DIRECTORY, 0, "O_DIRECTORY");
    assert_ne!(flags & libc::O_CLOEXEC, 0, "O_CLOEXEC");
    for rkey in ["3l5jnpb6xyz2a", "3l5jnpb6xyz2b"] {
        w.write(&post_path(rkey), b"x").unwrap();
        w.sync().unwrap();
    }
    // syncfs ran on that very descriptor: no other was opened (or left open) for it.
    assert_eq!(descriptors_on(&sandbox.root()), held);
    drop(w);
    assert!(descriptors_on(&sandbox.root()).is_empty());
}

#[test]
fn syncfs_mode_flushes_a_batch_with_two_syncfs_and_no_fsync() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open(sandbox.root()).unwrap();
    assert_eq!(
        w.mode(),
        FlushMode::Syncfs,
        "this kernel ({}) has a working syncfs",
        firehose_writer::cache::kernel_release().unwrap_or_default()
    );
    for rkey in ["3l5jnpb6xyz2a", "3l5jnpb6xyz2b", "3l5jnpb6xyz2c"] {
        w.write(&post_path(rkey), b"x").unwrap();
    }
    assert_eq!(w.sync().unwrap(), 3);
    assert_eq!(
        w.stats(),
        FlushStats {
            syncfs: 2,
            file_fsyncs: 0,
            dir_fsyncs: 0
        },
        "data, then directory entries"
    );
    assert_eq!(w.sync().unwrap(), 0);
    assert_eq!(w.stats().syncfs, 2, "an empty barrier flushes nothing");
}

#[test]
fn an_error_from_either_syncfs_is_final_and_nothing_falls_back() {
    // (errors of the coming syncfs calls, whether the files were renamed before the error)
    let cases = [
        (vec![Some(libc::EIO)], false),
        (vec![None, Some(libc::EIO)], true),
        (vec![None, Some(libc::ENOSPC)], true),
    ];
    for (plan, renamed) in cases {
        let sandbox = Sandbox::new();
        let mut w = CacheWriter::open(sandbox.root()).unwrap();
        assert_eq!(w.mode(), FlushMode::Syncfs);
        w.inject_syncfs_errors(&plan);
        let path = post_path(RKEY);
        w.write(&path, b"x").unwrap();
        let err = w.sync().expect_err("a failed syncfs fails the barrier");
        assert!(err.is_flush_failure(), "{plan:?}: {err}");
        assert!(err.to_string().starts_with("syncfs "), "{plan:?}: {err}");
        // Neither per-file nor per-directory fsync was tried in its place: after a writeback
        // error they could succeed without the lost pages.
        assert_eq!(w.stats().file_fsyncs, 0, "{plan:?}");
        assert_eq!(w.stats().dir_fsyncs, 0, "{plan:?}");
        assert_eq!(w.resolve(&path).unwrap().exists(), renamed, "{plan:?}");
    }
}

#[test]
fn per_file_mode_fsyncs_every_file_and_new_directory_entry() {
    let sandbox = Sandbox::new();
    let mut w = CacheWriter::open_with(sandbox.root(), FlushMode::PerFile).unwrap();
    assert_eq!(w.mode(), FlushMode::PerFile);
    for rkey in ["3l5jnpb6xyz2a", "3l5jnpb6xyz2b", "3l5jnpb6xyz2c"] {
        w.write(&post_path(rkey), b"x").unwrap();
    }
    assert_eq!(w.stats().file_fsyncs, 3, "each file as it is written");
    assert_eq!(w.sync().unwrap(), 3);
    // The root, `study_user_activity` and `create` got a new folder; `post` got the files.
    assert_eq!(
        w.stats(),
        FlushStats {
            syncfs: 0,
            file_fsyncs: 3,
            dir_fsyncs: 4
        }
    );
    w.write(&post_path("3l5jnpb6xyz2d"), b"x").unwrap();
    w.sync().unwrap();
    assert_eq!(w.stats().dir_fsyncs, 5, "only `post` this time");
}

/// A file system other than the one holding `dir`'s parent, mounted (tmpfs, when this process
/// may mount) or linked (a folder on /dev/shm) at `dir`; undone on drop.
enum OtherFs {
    Mount(PathBuf),
    /// The linked folder, removed on drop.
    Link {
        _shm: tempfile::TempDir,
    },
}

impl OtherFs {
    fn at(dir: &Path) -> Option<OtherFs> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let parent_dev = fs::metadata(dir.parent().unwrap()).unwrap().dev();
        fs::create_dir(dir).unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"firehose-test".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=16m".as_ptr().cast(),
            )
        };
        if rc == 0 {
            return Some(OtherFs::Mount(dir.to_owned()));
        }
        fs::remove_dir(dir).unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").ok()?;
        if fs::metadata(shm.path()).ok()?.dev() == parent_dev {
            return None;
        }
        std::os::unix::fs::symlink(shm.path(), dir).unwrap();
        Some(OtherFs::Link { _shm: shm })
    }
}

impl Drop for OtherFs {
    fn drop(&mut self) {
        if let OtherFs::Mount(dir) = self {
            use std::os::unix::ffi::OsStrExt;
            let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn a_folder_on_another_file_system_is_fsynced_file_by_file() {
    let sandbox = Sandbox::new();
    let root = sandbox.root();
    fs::create_dir_all(&root).unwrap();
    let Some(other) = OtherFs::at(&root.join("in_network_user_activity")) else {
        eprintln!("skipping: cannot mount here and /dev/shm is on the temp dir's file system");
        return;
    };
    eprintln!(
        "other file system by {}",
        match other {
            OtherFs::Mount(_) => "a tmpfs mount",
            OtherFs::Link { .. } => "a link to /dev/shm",
        }
    );
    let mut w = CacheWriter::open(&root).unwrap();
    assert_eq!(w.mode(), FlushMode::Syncfs);
    let did = Did::parse(A1).unwrap();
    let rkey = RecordKey::parse(RKEY).unwrap();
    let foreign = Folder::InNetworkPost(did.clone())
        .path(paths::record_file(&did, "post", &rkey))
        .unwrap();
    let local = post_path(RKEY);
    w.write(&local, b"on the root's file system").unwrap();
    assert_eq!(w.stats().file_fsyncs, 0, "waits for the barrier's syncfs");
    w.write(&foreign, b"on the other one").unwrap();
    assert_eq!(
        w.stats().file_fsyncs,
        1,
        "fsynced at once: syncfs of the root misses it"
    );
    assert_eq!(w.sync().unwrap(), 2);
    // The other file system's new folders (`create`, `post`, `<did>` in the mount's root and
    // below) and the renamed file's folder are fsynced; nothing on the root's.
    assert_eq!(
        w.stats(),
        FlushStats {
            syncfs: 2,
            file_fsyncs: 1,
            dir_fsyncs: 4
        }
    );
    assert_eq!(
        fs::read(w.resolve(&foreign).unwrap()).unwrap(),
        b"on the other one"
    );
    assert_eq!(
        fs::read(w.resolve(&local).unwrap()).unwrap(),
        b"on the root's file system"
    );
    // A barrier with only files on the other file system needs no syncfs at all.
    let rkey2 = RecordKey::parse("3l5jnpb6xyz2b").unwrap();
    let foreign2 = Folder::InNetworkPost(did.clone())
        .path(paths::record_file(&did, "post", &rkey2))
        .unwrap();
    w.write(&foreign2, b"again").unwrap();
    w.sync().unwrap();
    assert_eq!(
        w.stats(),
        FlushStats {
            syncfs: 2,
            file_fsyncs: 2,
            dir_fsyncs: 5
        }
    );
    drop(w);
    drop(other);
}
