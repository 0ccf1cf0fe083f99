//! The writer end to end, in-process: replay and relay sources, crash safety, faults.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use firehose_writer::config::{Config, FutureCursorPolicy, Source};
use serde_json::Value;
use workspace_tests::fixtures;

/// Generous: CI machines are shared and a wait only ends early on success.
const WAIT: Duration = Duration::from_secs(30);

/// Every file under `root` (relative path -> contents), temp files excluded.
fn cache_tree(root: &Path) -> BTreeMap<String, String> {
    crate::support::cache_files(root)
}

pub(crate) fn config(
    dir: &Path,
    source: Source,
    study: &[String],
    in_network: &[String],
) -> Config {
    std::fs::write(dir.join("study.txt"), study.join("\n")).unwrap();
    std::fs::write(dir.join("network.txt"), in_network.join("\n")).unwrap();
    Config {
        source,
        cache_dir: dir.join("cache"),
        state: dir.join("state.sqlite"),
        study_users: dir.join("study.txt"),
        in_network: Some(dir.join("network.txt")),
        study_posts: None,
        cursor: None,
        stall_timeout: Duration::from_secs(60),
        on_future_cursor: FutureCursorPolicy::Exit,
        metrics_addr: None,
        commit_interval: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
        ..crate::support::offline_defaults()
    }
}

fn rkey_of(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap()
}

/// The cache file of an `#account` / `#identity` event: named by the event's content, not its
/// seq (`paths::account_file`).
fn account_path(did: &str, kind: &str, e: &Value) -> String {
    let did = sync_core::ids::Did::parse(did).unwrap();
    let key = sync_core::paths::AccountEventKey {
        did: &did,
        kind,
        time: e["time"].as_str().unwrap(),
        handle: e["handle"].as_str(),
        active: (kind == "account").then(|| e["active"].as_bool().unwrap()),
        status: e["status"].as_str(),
    };
    format!(
        "study_user_activity/account/{}",
        sync_core::paths::account_file(&key)
    )
}

/// A study post: seen created in the capture (the predecessor's index), or (issue 9) any post
/// URI whose author is a study user, whatever its age.
fn is_study_post(seen: &HashSet<String>, study: &HashSet<String>, uri: &str) -> bool {
    if seen.contains(uri) {
        return true;
    }
    let Some(rest) = uri.strip_prefix("at://") else {
        return false;
    };
    let mut parts = rest.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(author), Some("app.bsky.feed.post"), Some(rkey), None)
            if study.contains(author) && !rkey.is_empty()
    )
}

/// The routing rules of predecessor-data-format.md §3.4 (+ DESIGN.md §5, and issue 9's rule that a
/// post URI names its author), applied to the production Jetstream rendering of the capture: an
/// oracle independent of our decoder and router.
fn expected_from_jetstream(
    lines: &[Value],
    study: &HashSet<String>,
    in_network: &HashSet<String>,
) -> BTreeSet<String> {
    let mut in_network = in_network.clone();
    let mut study_posts: HashSet<String> = HashSet::new();
    // In-network posts routed so far: their deletes follow them.
    let mut in_network_posts: HashSet<String> = HashSet::new();
    let mut files = BTreeSet::new();
    let s = "study_user_activity";
    for line in lines {
        let did = line["did"].as_str().unwrap();
        let is_study = study.contains(did);
        match line["kind"].as_str().unwrap() {
            "identity" | "account" if is_study => {
                let kind = line["kind"].as_str().unwrap();
                files.insert(account_path(did, kind, &line[kind]));
            }
            "commit" => {
                let c = &line["commit"];
                let (op, col, rkey) = (
                    c["operation"].as_str().unwrap(),
                    c["collection"].as_str().unwrap(),
                    c["rkey"].as_str().unwrap(),
                );
                let uri = format!("at://{did}/{col}/{rkey}");
                let r = &c["record"];
                let kind = match col {
                    "app.bsky.feed.post" => "post",
                    "app.bsky.feed.like" => "like",
                    "app.bsky.feed.repost" => "repost",
                    "app.bsky.graph.follow" => "follow",
                    "app.bsky.graph.block" => "block",
                    "app.bsky.actor.profile" => "profile",
                    _ => continue,
                };
                let name = format!("author_did={did}_{kind}_uri_suffix={rkey}.json");
                match (op, kind) {
                    ("create", "post") => {
                        if is_study {
                            files.insert(format!("{s}/create/post/{name}"));
                            study_posts.insert(uri.clone());
                        }
                        let root = r["reply"]["root"]["uri"].as_str();
                        let parent = r["reply"]["parent"]["uri"].as_str();
                        if let Some(nest) = root
                            .filter(|u| is_study_post(&study_posts, study, u))
                            .or(parent.filter(|u| is_study_post(&study_posts, study, u)))
                        {
                            files.insert(format!(
                                "{s}/create/reply_to_user_post/{}/{name}",
                                rkey_of(nest)
                            ));
                        }
                        if in_network.contains(did) {
                            files.insert(format!(
                                "in_network_user_activity/create/post/{did}/{name}"
                            ));
                            in_network_posts.insert(uri.clone());
                        }
                    }
                    ("create", "like") => {
                        let subject = r["subject"]["uri"].as_str().unwrap();
                        if is_study {
                            files.insert(format!("{s}/create/like/{}/{name}", rkey_of(subject)));
                        }
                        if is_study_post(&study_posts, study, subject) {
                            files.insert(format!(
                                "{s}/create/like_on_user_post/{}/{name}",
                                rkey_of(subject)
                            ));
                        }
                    }
                    ("create", "repost") if is_study => {
                        files.insert(format!("{s}/create/repost/{name}"));
                    }
                    ("create", "follow") => {
                        let subject = r["subject"].as_str().unwrap();
                        let name = format!("follower_did={did}_followee_did={subject}.json");
                        if is_study {
                            files.insert(format!("{s}/create/follow/follower/{name}"));
                            in_network.insert(subject.to_owned());
                        }
                        if study.contains(subject) {
                            files.insert(format!("{s}/create/follow/followee/{name}"));
                        }
                    }
                    ("create", "block") if is_study => {
                        files.insert(format!("{s}/create/block/{name}"));
                    }
                    ("create" | "update", "profile") if is_study => {
                        let rev = c["rev"].as_str().unwrap();
                        files.insert(format!("{s}/create/profile/author_did={did}_profile_uri_suffix={rkey}_rev={rev}.json"));
                    }
                    ("delete", _) => {
                        if is_study {
                            files.insert(format!("{s}/delete/{kind}/{name}"));
                        }
                        if kind == "post" && in_network_posts.contains(&uri) {
                            files.insert(format!(
                                "in_network_user_activity/delete/post/{did}/{name}"
                            ));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    files
}

/// Checks every cache file's contents against the Jetstream line of the event that produced it
/// (found by `uri`, or by `seq` for account/identity files): the record's own fields must come
/// through unchanged. Independent of our decoder: Jetstream decoded the same frames upstream.
fn assert_contents_match_jetstream(tree: &BTreeMap<String, String>, lines: &[Value]) {
    let mut commits: BTreeMap<String, &Value> = BTreeMap::new();
    let mut by_seq: BTreeMap<i64, &Value> = BTreeMap::new();
    for line in lines {
        let did = line["did"].as_str().unwrap();
        match line["kind"].as_str().unwrap() {
            "commit" => {
                let c = &line["commit"];
                let uri = format!(
                    "at://{did}/{}/{}",
                    c["collection"].as_str().unwrap(),
                    c["rkey"].as_str().unwrap()
                );
                commits.insert(uri, line);
            }
            kind => {
                by_seq.insert(line[kind]["seq"].as_i64().unwrap(), line);
            }
        }
    }
    let opt_str = |v: &Value| v.as_str().map(str::to_owned);
    for (path, contents) in tree {
        let f: Value = serde_json::from_str(contents).unwrap_or_else(|e| panic!("{path}: {e}"));
        let ctx = |what: &str| format!("{path}: {what}");
        if path.starts_with("study_user_activity/account/") {
            let kind = f["kind"].as_str().unwrap();
            let line = by_seq[&f["seq"].as_i64().unwrap()];
            let e = &line[kind];
            assert_eq!(f["did"], line["did"], "{}", ctx("did"));
            assert_eq!(f["time"], e["time"], "{}", ctx("time"));
            if kind == "identity" {
                assert_eq!(
                    opt_str(&f["handle"]),
                    opt_str(&e["handle"]),
                    "{}",
                    ctx("handle")
                );
            } else {
                assert_eq!(f["active"], e["active"], "{}", ctx("active"));
                assert_eq!(
                    opt_str(&f["status"]),
                    opt_str(&e["status"]),
                    "{}",
                    ctx("status")
                );
            }
            continue;
        }
        let uri = f["uri"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no uri"));
        let line = commits
            .get(uri)
            .unwrap_or_else(|| panic!("{path}: no event for {uri}"));
        let did = line["did"].as_str().unwrap();
        let c = &line["commit"];
        let r = &c["record"];
        if path.contains("/delete/") {
            assert_eq!(c["operation"], "delete", "{}", ctx("operation"));
            assert_eq!(f["author"], did, "{}", ctx("author"));
            assert_eq!(f["collection"], c["collection"], "{}", ctx("collection"));
            assert_eq!(f["rkey"], c["rkey"], "{}", ctx("rkey"));
            assert_eq!(f["rev"], c["rev"], "{}", ctx("rev"));
            continue;
        }
        assert_eq!(f["cid"], c["cid"], "{}", ctx("cid"));
        match c["collection"].as_str().unwrap() {
            "app.bsky.feed.post" => {
                assert_eq!(f["author_did"], did, "{}", ctx("author_did"));
                assert_eq!(f["text"], r["text"], "{}", ctx("text"));
                assert_eq!(f["created_at"], r["createdAt"], "{}", ctx("created_at"));
                let joined = r["langs"].as_array().map(|l| {
                    l.iter()
                        .map(|x| x.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join(";")
                });
                assert_eq!(opt_str(&f["langs"]), joined, "{}", ctx("langs"));
                for (key, part) in [("reply_parent", "parent"), ("reply_root", "root")] {
                    assert_eq!(
                        opt_str(&f[key]),
                        opt_str(&r["reply"][part]["uri"]),
                        "{}",
                        ctx(key)
                    );
                }
                let embed: Value = serde_json::from_str(f["embed"].as_str().unwrap()).unwrap();
                let has_image = r["embed"]["$type"] == "app.bsky.embed.images"
                    || r["embed"]["media"]["$type"] == "app.bsky.embed.images";
                assert_eq!(embed["has_image"], has_image, "{}", ctx("embed.has_image"));
            }
            "app.bsky.feed.like" => {
                assert_eq!(f["author"], did, "{}", ctx("author"));
                assert_eq!(
                    f["record"]["createdAt"],
                    r["createdAt"],
                    "{}",
                    ctx("createdAt")
                );
                assert_eq!(
                    f["record"]["subject"]["uri"],
                    r["subject"]["uri"],
                    "{}",
                    ctx("subject.uri")
                );
                assert_eq!(
                    f["record"]["subject"]["cid"],
                    r["subject"]["cid"],
                    "{}",
                    ctx("subject.cid")
                );
            }
            "app.bsky.graph.follow" => {
                assert_eq!(f["follower_did"], did, "{}", ctx("follower_did"));
                assert_eq!(f["followee_did"], r["subject"], "{}", ctx("followee_did"));
                assert_eq!(
                    f["record"]["createdAt"],
                    r["createdAt"],
                    "{}",
                    ctx("createdAt")
                );
            }
            // Reposts, blocks, profiles: the record itself, unchanged.
            _ => {
                assert_eq!(f["author"], did, "{}", ctx("author"));
                assert_eq!(f["record"], *r, "{}", ctx("record"));
            }
        }
    }
}

struct Capture {
    path: PathBuf,
    lines: Vec<Value>,
    dids: Vec<String>,
}

fn relay_capture() -> Option<Capture> {
    let dir = fixtures()?;
    let lines: Vec<Value> =
        std::fs::read_to_string(dir.join("relay-capture/expected_jetstream_v1.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let dids: BTreeSet<String> = lines
        .iter()
        .map(|l| l["did"].as_str().unwrap().to_owned())
        .collect();
    Some(Capture {
        path: dir.join("relay-capture/frames.bin"),
        lines,
        dids: dids.into_iter().collect(),
    })
}

/// Half the capture's DIDs are study users, the other half in-network (every rule fires).
fn split(dids: &[String]) -> (Vec<String>, Vec<String>) {
    let study = dids.iter().step_by(2).cloned().collect();
    let in_network = dids.iter().skip(1).step_by(2).cloned().collect();
    (study, in_network)
}

async fn run_to_end(config: Config) -> firehose_writer::ProcessorSummary {
    firehose_writer::run(config, std::future::pending(), None, |_| {})
        .await
        .expect("writer run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_the_relay_capture_writes_exactly_the_routed_files() {
    let Some(capture) = relay_capture() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (study, in_network) = split(&capture.dids);
    let cfg = config(
        tmp.path(),
        Source::Replay(capture.path.clone()),
        &study,
        &in_network,
    );
    let summary = run_to_end(cfg.clone()).await;
    assert_eq!(summary.frames, 150);
    assert_eq!(
        summary.cursor,
        Some(31527015471),
        "cursor = last seq of the capture"
    );
    let tree = cache_tree(&cfg.cache_dir);
    let expected = expected_from_jetstream(
        &capture.lines,
        &study.iter().cloned().collect(),
        &in_network.iter().cloned().collect(),
    );
    let actual: BTreeSet<String> = tree.keys().cloned().collect();
    assert!(
        expected.len() > 60,
        "the scenario exercises many rules ({} files)",
        expected.len()
    );
    assert_eq!(actual, expected);
    assert_contents_match_jetstream(&tree, &capture.lines);
    // Replaying again skips everything at or below the stored cursor: nothing changes.
    let again = run_to_end(cfg.clone()).await;
    assert_eq!(
        again.files, 0,
        "a restarted replay skips frames at or below the cursor"
    );
    assert_eq!(cache_tree(&cfg.cache_dir), tree);
}

/// The same replay verified (`--verify routed` with the capture's DID documents, offline):
/// every commit that is routed or of a tracked repo is checked, none fails, and the cache is
/// exactly the unverified replay's. Then one tracked repo's commits are verified against
/// another repo's key: they are all dropped as `bad_signature`, and nothing of them is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_replay_of_the_relay_capture_drops_nothing_and_writes_the_same_files() {
    let Some(capture) = relay_capture() else {
        return;
    };
    let did_docs = capture.path.with_file_name("did_docs.json");
    let (study, in_network) = split(&capture.dids);
    let run = |cfg: Config| async move {
        let metrics: Arc<Mutex<Option<Arc<Metrics>>>> = Arc::default();
        let seen = metrics.clone();
        firehose_writer::run(cfg.clone(), std::future::pending(), None, move |h| {
            *seen.lock().unwrap() = Some(h.metrics)
        })
        .await
        .expect("writer run");
        let m = metrics.lock().unwrap().clone().unwrap();
        (cache_tree(&cfg.cache_dir), m)
    };
    let plain = tempfile::tempdir().unwrap();
    let cfg = config(
        plain.path(),
        Source::Replay(capture.path.clone()),
        &study,
        &in_network,
    );
    let (unverified, _) = run(cfg).await;

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        Source::Replay(capture.path.clone()),
        &study,
        &in_network,
    );
    cfg.verify = firehose_writer::config::VerifyMode::Routed;
    cfg.did_docs = Some(did_docs.clone());
    let (verified, metrics) = run(cfg).await;
    // Paths: the contents carry the wall clock (`synctimestamp`).
    let paths = |t: &BTreeMap<String, String>| t.keys().cloned().collect::<BTreeSet<String>>();
    assert_eq!(paths(&verified), paths(&unverified));
    assert!(
        metrics.verified_commits.load(Ordering::Relaxed) >= 100,
        "tracked repos' commits were verified"
    );
    assert_eq!(metrics.verify_failures(), BTreeMap::new());

    // A study user whose document names another account's key.
    let docs: Value = serde_json::from_str(&std::fs::read_to_string(&did_docs).unwrap()).unwrap();
    let victim = study
        .iter()
        .find(|d| {
            let file = verified
                .keys()
                .any(|p| p.contains(&format!("author_did={d}_post")));
            file && docs.get(d.as_str()).is_some()
        })
        .expect("a study user with a post file")
        .clone();
    let other = docs
        .as_object()
        .unwrap()
        .keys()
        .find(|d| **d != victim)
        .unwrap()
        .clone();
    let mut forged = docs.clone();
    // The other account's document, renamed: its key is not the one that signs the victim's repo.
    forged[&victim] =
        serde_json::from_str(&docs[&other].to_string().replace(&other, &victim)).unwrap();
    let forged_path = tmp.path().join("forged_docs.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp2.path(),
        Source::Replay(capture.path.clone()),
        &study,
        &in_network,
    );
    cfg.verify = firehose_writer::config::VerifyMode::Routed;
    cfg.did_docs = Some(forged_path);
    let (tree, metrics) = run(cfg).await;
    assert!(
        metrics
            .verify_failures()
            .get("bad_signature")
            .copied()
            .unwrap_or(0)
            >= 1,
        "{:?}",
        metrics.verify_failures()
    );
    let victims_files = |t: &BTreeMap<String, String>| -> Vec<String> {
        t.keys()
            .filter(|p| p.contains(&format!("author_did={victim}_")))
            .cloned()
            .collect()
    };
    assert!(!victims_files(&verified).is_empty());
    assert_eq!(victims_files(&tree), Vec::<String>::new());
    assert!(
        metrics.resyncs().contains_key("bad_signature"),
        "the study user is queued for a resync"
    );
    // Everyone else's files are untouched.
    let others = |t: &BTreeMap<String, String>| -> BTreeSet<String> {
        t.keys().filter(|p| !p.contains(&victim)).cloned().collect()
    };
    assert_eq!(others(&tree), others(&verified));
}

// ---- against the test relay -------------------------------------------------------------------

use firehose_writer::Metrics;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use sync_core::frame::capture_frames;
use sync_core::synth;
use workspace_tests::relay::{Fault, RelayConfig, TestRelay};

/// A long stream of unique events: the relay capture looped `loops` times (seq, repo and rev
/// rewritten), with the study/in-network split applied to every loop's accounts.
pub(crate) struct Looped {
    pub(crate) frames: Vec<Vec<u8>>,
    pub(crate) study: Vec<String>,
    pub(crate) in_network: Vec<String>,
    pub(crate) last_seq: i64,
}

pub(crate) fn looped(loops: u32) -> Option<Looped> {
    let capture = relay_capture()?;
    let data = std::fs::read(&capture.path).unwrap();
    let raw: Vec<&[u8]> = capture_frames(&data).map(|f| f.unwrap()).collect();
    let frames: Vec<Vec<u8>> = synth::LoopedCapture::new(&raw, 1000)
        .take(raw.len() * loops as usize)
        .collect();
    let (study, in_network) = split(&capture.dids);
    let variants = |dids: &[String]| -> Vec<String> {
        (0..loops)
            .flat_map(|n| dids.iter().map(move |d| synth::looped_did(d, n)))
            .collect()
    };
    Some(Looped {
        last_seq: 1000 + frames.len() as i64 - 1,
        study: variants(&study),
        in_network: variants(&in_network),
        frames,
    })
}

/// Tree contents with the transform clock (`synctimestamp`) removed, for comparing runs.
fn normalized(tree: &BTreeMap<String, String>) -> BTreeMap<String, Value> {
    tree.iter()
        .map(|(k, v)| {
            let mut json: Value =
                serde_json::from_str(v).unwrap_or_else(|e| panic!("{k} is not complete JSON: {e}"));
            if let Some(obj) = json.as_object_mut() {
                obj.remove("synctimestamp");
            }
            (k.clone(), json)
        })
        .collect()
}

/// The reference: the same frames replayed from a file, uninterrupted.
async fn reference_tree(
    frames: &[Vec<u8>],
    study: &[String],
    in_network: &[String],
) -> BTreeMap<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let capture = tmp.path().join("capture.bin");
    std::fs::write(&capture, synth::capture(frames)).unwrap();
    let cfg = config(tmp.path(), Source::Replay(capture), study, in_network);
    run_to_end(cfg.clone()).await;
    cache_tree(&cfg.cache_dir)
}

/// A writer running in-process; also used by the other test modules.
pub(crate) struct Running {
    pub(crate) metrics: Arc<Mutex<Option<Arc<Metrics>>>>,
    pub(crate) stop: tokio::sync::oneshot::Sender<()>,
    pub(crate) task: tokio::task::JoinHandle<anyhow::Result<firehose_writer::ProcessorSummary>>,
}

pub(crate) fn start_writer(cfg: Config) -> Running {
    start_writer_with_reload(cfg, None)
}

/// As [`start_writer`]; a send on `reload` acts as SIGHUP.
pub(crate) fn start_writer_with_reload(
    cfg: Config,
    reload: Option<tokio::sync::mpsc::Receiver<()>>,
) -> Running {
    let metrics = Arc::new(Mutex::new(None));
    let slot = metrics.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(firehose_writer::run(
        cfg,
        async move {
            let _ = stopped.await;
        },
        reload,
        move |h| *slot.lock().unwrap() = Some(h.metrics),
    ));
    Running {
        metrics,
        stop,
        task,
    }
}

impl Running {
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.metrics
            .lock()
            .unwrap()
            .clone()
            .expect("writer started")
    }

    pub(crate) async fn wait_for_cursor(&self, seq: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self
                .metrics
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|m| m.cursor.load(Ordering::Relaxed) >= seq)
            {
                return true;
            }
            if self.task.is_finished() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub(crate) async fn stop(self) -> anyhow::Result<firehose_writer::ProcessorSummary> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

/// A writer configuration following `relay` from cursor 0 with the looped data's tracked sets.
fn relay_config(dir: &Path, relay: &TestRelay, data: &Looped) -> Config {
    let mut cfg = config(
        dir,
        Source::Relay(relay.url()),
        &data.study,
        &data.in_network,
    );
    cfg.cursor = Some(0);
    cfg
}

/// Runs the writer against `relay` from cursor 0 until it has committed `last_seq`, then stops it
/// and checks the cache against the uninterrupted reference.
async fn check_recovers(
    relay: &TestRelay,
    data: &Looped,
    tweak: impl FnOnce(&mut Config),
) -> Arc<Metrics> {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = relay_config(tmp.path(), relay, data);
    tweak(&mut cfg);
    let writer = start_writer(cfg.clone());
    let done = writer
        .wait_for_cursor(data.last_seq, Duration::from_secs(60))
        .await;
    let metrics = writer.metrics();
    let result = writer.stop().await;
    assert!(
        done,
        "writer did not reach seq {} (result {:?}, drops {:?})",
        data.last_seq,
        result.as_ref().err(),
        metrics.drops()
    );
    result.expect("clean stop");
    let reference = reference_tree(&data.frames, &data.study, &data.in_network).await;
    assert!(!reference.is_empty());
    assert_eq!(
        normalized(&cache_tree(&cfg.cache_dir)),
        normalized(&reference)
    );
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_end_to_end_equals_replay() {
    let Some(data) = looped(2) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    assert_eq!(relay.cursors()[0], Some(0));
    assert_eq!(metrics.reconnects.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_reconnects_from_the_cursor() {
    let Some(data) = looped(3) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::DropAfter(170));
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    assert!(metrics.reconnects.load(Ordering::Relaxed) >= 1);
    let cursors = relay.cursors();
    assert!(
        cursors.len() >= 2 && cursors[1].unwrap() > 1000,
        "resumed after handled frames: {cursors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_relay_is_detected_by_the_watchdog() {
    let Some(data) = looped(2) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::StallAfter(100));
    let metrics = check_recovers(&relay, &data, |c| c.stall_timeout = Duration::from_secs(1)).await;
    assert!(metrics.stalls.load(Ordering::Relaxed) >= 1);
    assert!(relay.connections() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_messages_are_dropped_and_counted() {
    let Some(data) = looped(2) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::GarbageAfter(50, 25));
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    let drops: u64 = metrics.drops().values().sum();
    assert!(drops >= 25, "garbage counted: {:?}", metrics.drops());

    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::OversizedAfter(60, 6 * 1024 * 1024));
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    assert_eq!(
        metrics.drops().get("frame_too_large"),
        Some(&1),
        "{:?}",
        metrics.drops()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_are_reassembled() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::Fragment(7));
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    assert!(metrics.drops().is_empty(), "{:?}", metrics.drops());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_too_slow_and_refused_connections_recover() {
    let Some(data) = looped(2) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::ErrorFrame("ConsumerTooSlow".into()));
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    assert!(metrics.reconnects.load(Ordering::Relaxed) >= 1);

    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    relay.set_fault(Fault::RefuseNext(3));
    let metrics = check_recovers(&relay, &data, |c| {
        c.max_backoff = Duration::from_millis(300)
    })
    .await;
    assert!(metrics.reconnects.load(Ordering::Relaxed) >= 3);
    // The refused connects set /health's last_error; events flowing again clear it, so an
    // alert on "last_error stays set" does not fire for a problem that is over.
    assert_eq!(metrics.last_error(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outdated_cursor_is_counted_and_the_rest_captured() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start_with_config(
        data.frames.clone(),
        RelayConfig {
            window: Some(10),
            ..RelayConfig::default()
        },
    )
    .await
    .unwrap();
    let metrics = check_recovers(&relay, &data, |_| {}).await;
    assert_eq!(metrics.outdated_cursor.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_cursor_exits_with_a_clear_error_unless_live_is_allowed() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        Source::Relay(relay.url()),
        &data.study,
        &data.in_network,
    );
    cfg.cursor = Some(data.last_seq + 1_000_000);
    let err = firehose_writer::run(cfg.clone(), std::future::pending(), None, |_| {})
        .await
        .expect_err("FutureCursor must stop the writer");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("FutureCursor") && msg.contains("--on-future-cursor=live"),
        "{msg}"
    );
    assert_eq!(
        firehose_writer::exit_code(&err),
        firehose_writer::EXIT_NEEDS_OPERATOR,
        "systemd must not restart into the same error"
    );

    // live: the cursor is dropped and live events are captured.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        Source::Relay(relay.url()),
        &data.study,
        &data.in_network,
    );
    cfg.cursor = Some(data.last_seq + 1_000_000);
    cfg.on_future_cursor = FutureCursorPolicy::Live;
    let writer = start_writer(cfg);
    // Connection 1 was the first writer's; connection 2 is answered with FutureCursor and
    // only the reconnect without a cursor becomes a subscription. Pushing before its start
    // point is fixed would put the frame before the live tail (as upstream would).
    assert!(
        relay
            .wait_for_subscriptions(1, Duration::from_secs(20))
            .await,
        "reconnected without the cursor"
    );
    assert_eq!(relay.connections(), 3);
    let live = synth::identity_frame(
        data.last_seq + 1,
        &data.study[0],
        Some("live.example.com"),
        "2026-07-04T14:38:07.877Z",
    );
    relay.push(live);
    assert!(
        writer
            .wait_for_cursor(data.last_seq + 1, Duration::from_secs(20))
            .await
    );
    writer.stop().await.unwrap();
    assert_eq!(
        relay.cursors().last().cloned(),
        Some(None),
        "reconnected without a cursor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_old_sets_and_a_good_one_applies() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = relay_config(tmp.path(), &relay, &data);
    let (reload, reload_rx) = tokio::sync::mpsc::channel(4);
    let writer = start_writer_with_reload(cfg.clone(), Some(reload_rx));
    assert!(writer.wait_for_cursor(data.last_seq, WAIT).await);
    let metrics = writer.metrics();
    // Each event at its own time, so that each is its own file (files are named by the event).
    let time = |seq: i64| format!("2026-07-04T15:00:{:02}.000Z", seq - data.last_seq);
    let account_file = |did: &str, seq: i64| {
        cfg.cache_dir.join(account_path(
            did,
            "account",
            &serde_json::json!({"time": time(seq), "active": true}),
        ))
    };
    let newcomer = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    let account = |seq: i64, did: &str| synth::account_frame(seq, did, true, None, &time(seq));

    // A list that does not parse is refused whole: the old study users are still followed.
    let mut study = data.study.clone();
    study.push(newcomer.to_owned());
    study.push("@not-a-did".to_owned());
    std::fs::write(&cfg.study_users, study.join("\n")).unwrap();
    reload.send(()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics.reload_failures.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad reload not reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.reloads.load(Ordering::Relaxed), 0);
    relay.push(account(data.last_seq + 1, &data.study[0]));
    relay.push(account(data.last_seq + 2, newcomer));
    assert!(writer.wait_for_cursor(data.last_seq + 2, WAIT).await);
    assert!(account_file(&data.study[0], data.last_seq + 1).exists());
    assert!(!account_file(newcomer, data.last_seq + 2).exists());

    // The fixed list applies: the newcomer is followed from the next batch on.
    study.pop();
    std::fs::write(&cfg.study_users, study.join("\n")).unwrap();
    reload.send(()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics.reloads.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "good reload not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.push(account(data.last_seq + 3, newcomer));
    assert!(writer.wait_for_cursor(data.last_seq + 3, WAIT).await);
    assert!(account_file(newcomer, data.last_seq + 3).exists());
    assert_eq!(metrics.reload_failures.load(Ordering::Relaxed), 1);
    writer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_cache_blocks_the_cursor_then_recovers_without_loss() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = relay_config(tmp.path(), &relay, &data);
    // A file where the study folder must go: every study write fails (like a full disk would).
    std::fs::create_dir_all(&cfg.cache_dir).unwrap();
    let blocker = cfg.cache_dir.join("study_user_activity");
    std::fs::write(&blocker, "not a directory").unwrap();
    let writer = start_writer(cfg.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while writer
        .metrics
        .lock()
        .unwrap()
        .as_ref()
        .is_none_or(|m| m.write_errors.load(Ordering::Relaxed) == 0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write error seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = writer.metrics();
    assert!(metrics.write_errors.load(Ordering::Relaxed) >= 1);
    assert!(
        metrics.last_error().unwrap().contains("cache write"),
        "{:?}",
        metrics.last_error()
    );
    assert!(
        metrics.cursor.load(Ordering::Relaxed) < data.last_seq,
        "cursor must not pass the failing event"
    );
    assert!(metrics.health_json().contains("cache write"));
    std::fs::remove_file(&blocker).unwrap();
    assert!(
        writer
            .wait_for_cursor(data.last_seq, Duration::from_secs(30))
            .await
    );
    assert_eq!(metrics.last_error(), None, "recovered");
    writer.stop().await.unwrap();
    let reference = reference_tree(&data.frames, &data.study, &data.in_network).await;
    assert_eq!(
        normalized(&cache_tree(&cfg.cache_dir)),
        normalized(&reference)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_upstream_that_answers_pings_is_not_reconnected() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        Source::Relay(relay.url()),
        &["did:plc:z72i7hdynmk6r22z27h6tvur".to_owned()],
        &[],
    );
    // Pings every 500 ms; no event ever arrives, but every ping is answered.
    cfg.stall_timeout = Duration::from_millis(1000);
    cfg.max_backoff = Duration::from_millis(200);
    let writer = start_writer(cfg.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    // Six answered pings span more than two stall timeouts.
    while relay.pings_received() < 6 {
        assert!(tokio::time::Instant::now() < deadline, "no keepalive pings");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = writer.metrics();
    assert_eq!(
        relay.connections(),
        1,
        "a quiet but healthy upstream keeps its connection"
    );
    assert_eq!(metrics.stalls.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.reconnects.load(Ordering::Relaxed), 0);
    writer.stop().await.unwrap();

    // Silent and not answering pings either: the watchdog reconnects.
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    relay.set_fault(Fault::StallAfter(0));
    cfg.source = Source::Relay(relay.url());
    let writer = start_writer(cfg);
    assert!(
        relay.wait_for_subscriptions(2, WAIT).await,
        "never reconnected"
    );
    let metrics = writer.metrics();
    writer.stop().await.unwrap();
    assert_eq!(metrics.stalls.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_post_index_is_seeded_from_a_predecessor_map() {
    let tmp = tempfile::tempdir().unwrap();
    let s1 = "did:plc:z72i7hdynmk6r22z27h6tvur";
    let old_post = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3k2aaaaaaaa2a";
    let like = serde_json::json!({"$type": "app.bsky.feed.like", "createdAt": "2024-10-02T14:20:11.093Z",
        "subject": {"uri": old_post, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}});
    let frame = synth::commit_frame(
        5,
        "did:plc:q6gjnaw2blty4crticxkmujt",
        "3l5jzzzzzzz2a",
        "2024-10-02T14:20:11.100Z",
        &[synth::OpSpec::create(
            "app.bsky.feed.like",
            "3l5jv2xq4tk2p",
            like,
        )],
    );
    let capture = tmp.path().join("capture.bin");
    std::fs::write(&capture, synth::capture(&[frame])).unwrap();
    std::fs::write(
        tmp.path().join("map.json"),
        serde_json::json!({old_post: s1}).to_string(),
    )
    .unwrap();
    let mut cfg = config(tmp.path(), Source::Replay(capture), &[s1.to_owned()], &[]);
    cfg.study_posts = Some(tmp.path().join("map.json"));
    run_to_end(cfg.clone()).await;
    let tree = cache_tree(&cfg.cache_dir);
    assert_eq!(
        tree.keys().collect::<Vec<_>>(),
        ["study_user_activity/create/like_on_user_post/3k2aaaaaaaa2a/author_did=did:plc:q6gjnaw2blty4crticxkmujt_like_uri_suffix=3l5jv2xq4tk2p.json"]
    );
}

/// Issue items 10 and 11b, end to end through the writer: an account event delivered again under
/// a later seq (a relay swap) rewrites its one file; a study user's unfollow of a follow made
/// before tracking began (backfill off here) is counted (`firehose_unknown_unfollows_total`) and
/// recorded in the state's `unknown_unfollows` table for the operator, while a follow seen in
/// the stream and then deleted is not. (With backfill on, such a follow is known: gapfree.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_account_events_and_unknown_unfollows() {
    let tmp = tempfile::tempdir().unwrap();
    let s1 = "did:plc:z72i7hdynmk6r22z27h6tvur";
    let a2 = "did:plc:q6gjnaw2blty4crticxkmujt";
    let t = "2024-10-02T15:00:00.000Z";
    let follow =
        serde_json::json!({"$type": "app.bsky.graph.follow", "createdAt": t, "subject": a2});
    let commit =
        |seq: i64, rev: &str, op: synth::OpSpec| synth::commit_frame(seq, s1, rev, t, &[op]);
    let frames = [
        synth::account_frame(1, s1, false, Some("deactivated"), t),
        synth::identity_frame(2, s1, Some("s1.example.com"), t),
        commit(
            3,
            "3l5jzzzzzzz2a",
            synth::OpSpec::create("app.bsky.graph.follow", "3l5kf1aaaaa2a", follow),
        ),
        commit(
            4,
            "3l5kaaaaaaa2a",
            synth::OpSpec::delete("app.bsky.graph.follow", "3l4aaaaaaaa2a"),
        ),
        commit(
            5,
            "3l5kaaaaaab2a",
            synth::OpSpec::delete("app.bsky.graph.follow", "3l5kf1aaaaa2a"),
        ),
        // the new relay's sequence: the same two events again
        synth::account_frame(9_000_001, s1, false, Some("deactivated"), t),
        synth::identity_frame(9_000_002, s1, Some("s1.example.com"), t),
    ];
    let capture = tmp.path().join("capture.bin");
    std::fs::write(&capture, synth::capture(&frames)).unwrap();
    let cfg = config(tmp.path(), Source::Replay(capture), &[s1.to_owned()], &[]);
    let slot = Arc::new(Mutex::new(None));
    let metrics_slot = slot.clone();
    firehose_writer::run(cfg.clone(), std::future::pending(), None, move |h| {
        *metrics_slot.lock().unwrap() = Some(h.metrics)
    })
    .await
    .unwrap();
    let metrics: Arc<Metrics> = slot.lock().unwrap().clone().unwrap();
    assert_eq!(metrics.unknown_unfollows.load(Ordering::Relaxed), 1);
    assert!(
        firehose_writer::metrics::render(&metrics).contains("firehose_unknown_unfollows_total 1\n")
    );

    let tree = cache_tree(&cfg.cache_dir);
    let account_files: Vec<&String> = tree
        .keys()
        .filter(|p| p.starts_with("study_user_activity/account/"))
        .collect();
    assert_eq!(account_files.len(), 2, "{account_files:?}");
    let account = &tree[&account_path(
        s1,
        "account",
        &serde_json::json!({"time": t, "active": false, "status": "deactivated"}),
    )];
    let account: Value = serde_json::from_str(account).unwrap();
    assert_eq!(account["seq"], 9_000_001, "rewritten by the later delivery");
    // Both unfollows still write their delete file.
    for rkey in ["3l4aaaaaaaa2a", "3l5kf1aaaaa2a"] {
        assert!(tree.contains_key(&format!(
            "study_user_activity/delete/follow/author_did={s1}_follow_uri_suffix={rkey}.json"
        )));
    }
    let conn = rusqlite::Connection::open(&cfg.state).unwrap();
    let recorded: Vec<(String, String, i64, String)> = conn
        .prepare("SELECT uri, follower, seq, time FROM unknown_unfollows")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        recorded,
        [(
            format!("at://{s1}/app.bsky.graph.follow/3l4aaaaaaaa2a"),
            s1.to_owned(),
            4,
            t.to_owned()
        )]
    );
}

/// indigo's relay scenarios mark which messages a relay must drop (stale rev, replayed seq).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_scenarios_drop_exactly_the_flagged_messages() {
    let Some(dir) = fixtures() else { return };
    for (name, expected_files) in [
        (
            "rev_ordering.json",
            vec![
                "study_user_activity/create/like/3llz56wmk522o/author_did=did:plc:44ybard66vv44zksje25o7dz_like_uri_suffix=3lmxjza3h2i27.json".to_owned(),
                "study_user_activity/delete/like/author_did=did:plc:44ybard66vv44zksje25o7dz_like_uri_suffix=3lmxjza3h2i27.json".to_owned(),
            ],
        ),
        (
            "seq_ordering.json",
            vec![
                account_path(
                    "did:plc:44ybard66vv44zksje25o7dz",
                    "identity",
                    &serde_json::json!({"time": "2025-04-01T04:01:30.384Z"}),
                ),
                "study_user_activity/create/like/3llmlwt3tl22o/author_did=did:plc:44ybard66vv44zksje25o7dz_like_uri_suffix=3llpyftcvih2r.json".to_owned(),
            ],
        ),
    ] {
        let scenario: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("indigo-commits/relay-scenarios").join(name)).unwrap(),
        )
        .unwrap();
        let messages = scenario["messages"].as_array().unwrap();
        let frames: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| {
                let mut frame = sync_core::cbor::encode_ipld(&sync_core::cbor::json_to_ipld(&m["frame"]["header"]).unwrap()).unwrap();
                frame.extend(sync_core::cbor::encode_ipld(&sync_core::cbor::json_to_ipld(&m["frame"]["body"]).unwrap()).unwrap());
                frame
            })
            .collect();
        let flagged = messages.iter().filter(|m| m["drop"] == true).count() as u64;
        let tmp = tempfile::tempdir().unwrap();
        let capture = tmp.path().join("capture.bin");
        std::fs::write(&capture, synth::capture(&frames)).unwrap();
        let cfg = config(tmp.path(), Source::Replay(capture), &["did:plc:44ybard66vv44zksje25o7dz".to_owned()], &[]);
        let slot = Arc::new(Mutex::new(None));
        let metrics_slot = slot.clone();
        firehose_writer::run(cfg.clone(), std::future::pending(), None, move |h| {
            *metrics_slot.lock().unwrap() = Some(h.metrics)
        })
        .await
        .unwrap();
        let metrics: Arc<Metrics> = slot.lock().unwrap().clone().unwrap();
        // Stale revs are duplicates, replayed seqs are skipped; rev_ordering's "3lmxjza3nva00" is
        // not even a valid TID (0 is outside base32-sortable) and is dropped as a bad frame.
        let dropped = metrics.duplicates.load(Ordering::Relaxed)
            + metrics.skipped_seq.load(Ordering::Relaxed)
            + metrics.drops().values().sum::<u64>();
        assert_eq!(dropped, flagged, "{name}: dropped messages");
        let tree = cache_tree(&cfg.cache_dir);
        let mut expected_files = expected_files;
        expected_files.sort();
        assert_eq!(tree.keys().map(String::as_str).collect::<Vec<_>>(), expected_files, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_served_over_http() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = relay_config(tmp.path(), &relay, &data);
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let addr = Arc::new(Mutex::new(None));
    let slot = addr.clone();
    let metrics = Arc::new(Mutex::new(None));
    let mslot = metrics.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(firehose_writer::run(
        cfg,
        async move {
            let _ = stopped.await;
        },
        None,
        move |h| {
            *slot.lock().unwrap() = h.metrics_addr;
            *mslot.lock().unwrap() = Some(h.metrics);
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics.lock().unwrap().clone();
        if m.is_some_and(|m| m.cursor.load(Ordering::Relaxed) >= data.last_seq) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = addr.lock().unwrap().unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let health = get("/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body: Value = serde_json::from_str(health.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["connected"], true);
    assert_eq!(body["cursor"], data.last_seq);
    assert!(body["lag_seconds"].as_f64().is_some());
    assert_eq!(body["last_error"], Value::Null);
    let metrics_text = get("/metrics").await;
    for needle in [
        "firehose_frames_total 150",
        "firehose_events_total{kind=\"commit\"} 148",
        "firehose_routed_files_total{folder=\"study/create/post\"}",
        &format!("firehose_cursor {}", data.last_seq),
        "firehose_connected 1",
    ] {
        assert!(
            metrics_text.contains(needle),
            "missing {needle:?} in\n{metrics_text}"
        );
    }
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_connects_use_the_installed_crypto_provider_without_panicking() {
    // A TCP listener that accepts and hangs up: the TLS client config is built and the handshake
    // fails; with two rustls backends compiled in and no provider installed this would panic.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        tmp.path(),
        Source::Relay(format!(
            "wss://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos"
        )),
        &["did:plc:z72i7hdynmk6r22z27h6tvur".to_owned()],
        &[],
    );
    cfg.max_backoff = Duration::from_millis(200);
    let writer = start_writer(cfg);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = writer.metrics();
    assert!(metrics.reconnects.load(Ordering::Relaxed) >= 1);
    assert!(
        metrics.last_error().is_some_and(|e| e.contains("wss://")),
        "{:?}",
        metrics.last_error()
    );
    writer.stop().await.expect("clean stop, no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_on_the_same_state_is_refused() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        Source::Relay(relay.url()),
        &["did:plc:z72i7hdynmk6r22z27h6tvur".to_owned()],
        &[],
    );
    let first = start_writer(cfg.clone());
    // on_start runs after the lock is taken
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while first.metrics.lock().unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first writer did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = firehose_writer::run(cfg, std::future::pending(), None, |_| {})
        .await
        .expect_err("the state is locked");
    assert!(
        format!("{err:#}").contains("another firehose-writer is running"),
        "{err:#}"
    );
    first.stop().await.unwrap();
}

fn did_set(dids: &[String]) -> HashSet<sync_core::ids::Did> {
    dids.iter()
        .map(|d| sync_core::ids::Did::parse(d).unwrap())
        .collect()
}

#[test]
fn a_failed_flush_stops_the_writer_before_the_cursor_moves() {
    // A disk whose write-back failed: the first or the second syncfs of a barrier reports EIO.
    // A retry or a per-file fsync could "succeed" without the lost pages ever reaching the
    // disk, so the writer must stop either way.
    failed_flush_stops_the_writer(&[Some(libc::EIO)]);
    failed_flush_stops_the_writer(&[None, Some(libc::EIO)]);
}

fn failed_flush_stops_the_writer(syncfs_errors: &[Option<i32>]) {
    use firehose_writer::cache::CacheWriter;
    use firehose_writer::processor::{Input, Processor};
    use std::sync::atomic::{AtomicBool, AtomicI64};
    use tokio_tungstenite::tungstenite::Bytes;

    let Some(data) = looped(1) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let state_path = tmp.path().join("state.sqlite");
    let mut cache = CacheWriter::open(&cache_dir).unwrap();
    cache.inject_syncfs_errors(syncfs_errors);
    let state = firehose_writer::state::StateStore::open(
        &state_path,
        did_set(&data.study),
        did_set(&data.in_network),
    )
    .unwrap();
    let metrics = Metrics::new();
    let processor = Processor::new(
        cache,
        state,
        metrics.clone(),
        Some(0),
        Duration::from_millis(10),
        Arc::new(AtomicI64::new(-1)),
        Arc::new(AtomicBool::new(false)),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let frames: Vec<Bytes> = data.frames.iter().cloned().map(Bytes::from).collect();
    tx.try_send(Input::Frames(frames)).unwrap();
    tx.try_send(Input::End).unwrap();
    drop(tx);
    let err = processor
        .run(rx)
        .expect_err("a failed flush must stop the writer");
    let msg = format!("{err:#}");
    assert!(msg.contains("flush") && msg.contains("syncfs"), "{msg}");
    assert!(metrics.last_error().is_some());
    assert_eq!(crate::support::stored_cursor(&state_path), None);
    if syncfs_errors.len() == 1 {
        assert!(
            cache_tree(&cache_dir).is_empty(),
            "nothing renamed into place after the failed flush"
        );
    }

    // The restart replays from the durable cursor (none: from the start) and loses nothing.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let capture = tmp.path().join("capture.bin");
    std::fs::write(&capture, synth::capture(&data.frames)).unwrap();
    let mut cfg = config(
        tmp.path(),
        Source::Replay(capture),
        &data.study,
        &data.in_network,
    );
    cfg.cursor = Some(0);
    rt.block_on(run_to_end(cfg.clone()));
    let expected = rt.block_on(reference_tree(&data.frames, &data.study, &data.in_network));
    assert!(!expected.is_empty());
    assert_eq!(
        normalized(&cache_tree(&cfg.cache_dir)),
        normalized(&expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_with_cursor_captures_tracked_accounts_again() {
    let Some(data) = looped(1) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let capture = tmp.path().join("capture.bin");
    std::fs::write(&capture, synth::capture(&data.frames)).unwrap();
    let cfg = config(
        tmp.path(),
        Source::Replay(capture),
        &data.study,
        &data.in_network,
    );
    run_to_end(cfg.clone()).await;
    let first = cache_tree(&cfg.cache_dir);
    assert!(!first.is_empty());
    // The cache is lost (or restored from an old backup); the operator rewinds.
    std::fs::remove_dir_all(&cfg.cache_dir).unwrap();
    let mut rewind = cfg.clone();
    rewind.cursor = Some(0);
    let summary = run_to_end(rewind).await;
    assert_eq!(summary.cursor, Some(data.last_seq));
    assert_eq!(
        normalized(&cache_tree(&cfg.cache_dir)),
        normalized(&first),
        "every file captured again, none skipped as a duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_slow_before_the_first_commit_resumes_from_the_requested_cursor() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A first run leaves a stored cursor at the end.
    let cfg = relay_config(tmp.path(), &relay, &data);
    let writer = start_writer(cfg.clone());
    assert!(writer.wait_for_cursor(data.last_seq, WAIT).await);
    writer.stop().await.unwrap();
    // Rewind to 1050; the relay drops the writer as too slow before anything is committed.
    relay.set_fault(Fault::ErrorFrame("ConsumerTooSlow".into()));
    let mut rewind = cfg.clone();
    rewind.cursor = Some(1050);
    let writer = start_writer(rewind);
    let subscribed = relay.wait_for_subscriptions(2, WAIT).await;
    writer.stop().await.unwrap();
    let cursors = relay.cursors();
    assert!(subscribed, "{cursors:?}");
    assert_eq!(
        &cursors[cursors.len() - 2..],
        [Some(1050), Some(1050)],
        "the resume point is where this run started, not the stored cursor: {cursors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tail_that_drops_before_anything_is_handled_resumes_after_the_last_frame() {
    use firehose_writer::source::RelaySource;
    use std::sync::atomic::AtomicI64;

    let relay = TestRelay::start(Vec::new()).await.unwrap();
    relay.set_fault(Fault::DropAfter(3));
    let metrics = Metrics::new();
    // No processor: nothing is ever handled, as when the first frames are still queued.
    let source = RelaySource {
        url: relay.url(),
        start_cursor: None,
        stall_timeout: Duration::from_secs(60),
        max_backoff: Duration::from_millis(200),
        on_future_cursor: FutureCursorPolicy::Exit,
        metrics: metrics.clone(),
        durable_cursor: Arc::new(AtomicI64::new(-1)),
        max_message_bytes: firehose_writer::source::WS_MAX_MESSAGE,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(source.run(tx, stopped));
    assert!(relay.wait_for_subscriptions(1, WAIT).await);
    let did = "did:plc:z72i7hdynmk6r22z27h6tvur";
    for seq in 1..=5 {
        relay.push(synth::identity_frame(
            seq,
            did,
            None,
            "2026-07-04T14:38:07.877Z",
        ));
    }
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seqs.len() < 5 {
        let input = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("all five frames arrive")
            .unwrap();
        if let firehose_writer::processor::Input::Frames(frames) = input {
            seqs.extend(
                frames
                    .iter()
                    .map(|f| sync_core::frame::frame_seq(f).unwrap()),
            );
        }
    }
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5],
        "each frame once, none lost to the drop"
    );
    assert_eq!(relay.cursors(), [None, Some(3)]);
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_slow_mid_stream_resumes_from_the_durable_cursor_not_the_handled_one() {
    let Some(data) = looped(2) else { return };
    let (head, tail) = data.frames.split_at(100);
    let relay = TestRelay::start(head.to_vec()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = relay_config(tmp.path(), &relay, &data);
    let writer = start_writer(cfg.clone());
    assert!(writer.wait_for_cursor(1099, WAIT).await);
    writer.stop().await.unwrap();
    // Second run from the stored cursor 1099; no commit before the relay gives up on us (the
    // interval is long), so the durable cursor stays 1099 while 150 more frames are handled.
    for frame in tail {
        relay.push(frame.clone());
    }
    relay.set_fault(Fault::ErrorFrameAfter(150, "ConsumerTooSlow".into()));
    let mut resumed = cfg.clone();
    resumed.cursor = None;
    resumed.commit_interval = Duration::from_secs(3600);
    let writer = start_writer(resumed);
    assert!(relay.wait_for_subscriptions(3, WAIT).await);
    let metrics = writer.metrics();
    let deadline = tokio::time::Instant::now() + WAIT;
    // 150 frames before the error, then 200 from 1099 again: the 150 replayed ones are skipped.
    while metrics.frames.load(Ordering::Relaxed) < 350 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream not finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let summary = writer.stop().await.unwrap();
    assert_eq!(summary.cursor, Some(data.last_seq));
    assert_eq!(metrics.skipped_seq.load(Ordering::Relaxed), 150);
    assert_eq!(
        relay.cursors(),
        [Some(0), Some(1099), Some(1099)],
        "after ConsumerTooSlow the writer resumes from what is durable"
    );
    let expected = reference_tree(&data.frames, &data.study, &data.in_network).await;
    assert_eq!(
        normalized(&cache_tree(&cfg.cache_dir)),
        normalized(&expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pings_are_sent_while_the_relay_is_quiet() {
    let Some(data) = looped(1) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = relay_config(tmp.path(), &relay, &data);
    // Pings go out every min(20 s, stall timeout / 2): every second here.
    cfg.stall_timeout = Duration::from_secs(2);
    let writer = start_writer(cfg);
    assert!(writer.wait_for_cursor(data.last_seq, WAIT).await);
    let before = relay.pings_received();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let sent = relay.pings_received() - before;
    writer.stop().await.unwrap();
    // (Answered pings also keep the quiet connection: the watchdog counts pongs as liveness.)
    assert!(sent >= 2, "{sent} pings in 3.5 s on a quiet connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_disk_slows_reading_instead_of_buffering_the_stream() {
    let Some(data) = looped(60) else { return };
    let relay = TestRelay::start(data.frames.clone()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = relay_config(tmp.path(), &relay, &data);
    // Every study write fails (a file where the folder goes): the processor retries the first
    // one forever, so nothing more is consumed.
    std::fs::create_dir_all(&cfg.cache_dir).unwrap();
    std::fs::write(cfg.cache_dir.join("study_user_activity"), "not a directory").unwrap();
    let writer = start_writer(cfg);
    // Wait until the relay can send no more: the count stops growing.
    let mut last = usize::MAX;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = relay.frames_sent();
        if now == last {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never stopped sending"
        );
        last = now;
    }
    let total = data.frames.len();
    eprintln!("{last} of {total} frames left the relay while the disk was blocked");
    let _ = writer.stop().await; // an error: it stops while the write is still failing
                                 // The bounded channel (16 batches of <= 64 frames) plus the socket buffers hold a few
                                 // thousand frames at most; the rest waits at the relay (TCP backpressure).
    assert!(
        last < total * 2 / 3,
        "{last} of {total} frames were taken off the socket while nothing could be written"
    );
}

/// Keys by DID that change when the processor reports an `#identity`, and count the lookups
/// made ahead of the processor.
struct RotatingIdentities {
    before: Arc<sync_core::did_doc::AtprotoIdentity>,
    after: Arc<sync_core::did_doc::AtprotoIdentity>,
    rotated: std::sync::atomic::AtomicBool,
    peeks: Arc<std::sync::atomic::AtomicUsize>,
}

impl RotatingIdentities {
    fn current(&self) -> Arc<sync_core::did_doc::AtprotoIdentity> {
        if self.rotated.load(Ordering::Relaxed) {
            self.after.clone()
        } else {
            self.before.clone()
        }
    }
}

impl firehose_writer::verifier::Identities for RotatingIdentities {
    fn identity(
        &self,
        _did: &sync_core::ids::Did,
    ) -> Result<Arc<sync_core::did_doc::AtprotoIdentity>, &'static str> {
        Ok(self.current())
    }
    fn peek(&self, _did: &sync_core::ids::Did) -> Option<Arc<sync_core::did_doc::AtprotoIdentity>> {
        self.peeks.fetch_add(1, Ordering::Relaxed);
        Some(self.current())
    }
    fn refresh(
        &self,
        _did: &sync_core::ids::Did,
    ) -> Result<Arc<sync_core::did_doc::AtprotoIdentity>, &'static str> {
        Ok(self.current())
    }
    fn changed(&self, _did: &sync_core::ids::Did) {
        self.rotated.store(true, Ordering::Relaxed);
    }
}

#[test]
fn commits_verified_ahead_of_the_processor_still_honour_a_key_rotation_in_the_same_batch() {
    use firehose_writer::cache::CacheWriter;
    use firehose_writer::config::VerifyMode;
    use firehose_writer::processor::{Input, Processor, Repairs, Verification};
    use firehose_writer::verifier::VerifyStage;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize};
    use sync_core::did_doc::AtprotoIdentity;
    use tokio_tungstenite::tungstenite::Bytes;

    const DID: &str = "did:plc:rotatingkeyaaaaaaaaaaaa";
    const POST: &str = "app.bsky.feed.post";
    let mut repo = synth::SynthRepo::new(DID, [7; 32]);
    let new_key = synth::SynthRepo::new(DID, [9; 32]).public_key();
    let identity = |key| {
        Arc::new(AtprotoIdentity {
            did: repo.did(),
            signing_key: key,
            pds_endpoint: None,
            handle: None,
        })
    };
    let peeks = Arc::new(AtomicUsize::new(0));
    let identities = RotatingIdentities {
        before: identity(repo.public_key()),
        after: identity(new_key),
        rotated: AtomicBool::new(false),
        peeks: peeks.clone(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let post = |text: &str| serde_json::json!({"$type": POST, "text": text, "createdAt": "2026-12-02T10:00:00.000Z"});
    let time = "2026-12-02T10:00:00.000Z";
    // One batch: a commit signed with the old key, the key rotation, then a commit still
    // signed with the old key (a forgery once the key has changed).
    let before = repo.commit(
        1,
        now,
        time,
        &[synth::OpSpec::create(POST, "3lbefore2222a", post("before"))],
    );
    let rotation = synth::identity_frame(2, DID, None, time);
    let stale = repo.commit(
        3,
        now + 1_000,
        time,
        &[synth::OpSpec::create(POST, "3lstale22222a", post("stale"))],
    );
    let frames: Vec<Bytes> = [before, rotation, stale]
        .into_iter()
        .map(Bytes::from)
        .collect();

    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let state_path = tmp.path().join("state.sqlite");
    let state = firehose_writer::state::StateStore::open(
        &state_path,
        did_set(&[DID.to_owned()]),
        HashSet::new(),
    )
    .unwrap();
    let metrics = Metrics::new();
    let identities: Arc<dyn firehose_writer::verifier::Identities> = Arc::new(identities);
    let stage = VerifyStage {
        mode: VerifyMode::Routed,
        identities: identities.clone(),
        membership: state.shared_membership(),
        threads: 2,
    };
    let processor = Processor::new(
        CacheWriter::open(&cache_dir).unwrap(),
        state,
        metrics.clone(),
        Some(0),
        Duration::from_millis(10),
        Arc::new(AtomicI64::new(-1)),
        Arc::new(AtomicBool::new(false)),
    )
    .with_repairs(
        Verification {
            mode: VerifyMode::Routed,
            identities: Some(identities),
        },
        Repairs::default(),
    );
    // The stage checks the whole batch before the processor sees any of it.
    let (tx, stage_rx) = tokio::sync::mpsc::channel(4);
    let (stage_tx, rx) = tokio::sync::mpsc::channel(4);
    tx.try_send(Input::Frames(frames)).unwrap();
    tx.try_send(Input::End).unwrap();
    drop(tx);
    stage.run(stage_rx, stage_tx);
    processor.run(rx).unwrap();

    // Both commits were checked ahead (with the old key, all there was then)...
    assert_eq!(peeks.load(Ordering::Relaxed), 2);
    // ...but only the one made before the rotation is captured.
    let files = cache_tree(&cache_dir);
    assert!(
        files.keys().any(|p| p.contains("3lbefore2222a")),
        "{files:?}"
    );
    assert!(
        !files.keys().any(|p| p.contains("3lstale22222a")),
        "{files:?}"
    );
    assert_eq!(metrics.verify_failures().get("bad_signature"), Some(&1));
    assert_eq!(metrics.verified_commits.load(Ordering::Relaxed), 1);
}
