//! The writer end to end, in-process: replay and relay sources, crash safety, faults.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use firehose_writer::config::{Config, FutureCursorPolicy, Source};
use serde_json::Value;
use workspace_tests::fixtures;

/// Every file under `root` (relative path -> contents), temp files excluded.
fn cache_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                out.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

fn config(dir: &Path, source: Source, study: &[String], in_network: &[String]) -> Config {
    std::fs::write(dir.join("study.txt"), study.join("\n")).unwrap();
    std::fs::write(dir.join("network.txt"), in_network.join("\n")).unwrap();
    Config {
        source,
        cache_dir: dir.join("cache"),
        state: dir.join("state.sqlite"),
        study_users: dir.join("study.txt"),
        in_network: Some(dir.join("network.txt")),
        cursor: None,
        stall_timeout: Duration::from_secs(60),
        on_future_cursor: FutureCursorPolicy::Exit,
        metrics_addr: None,
        commit_interval: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
    }
}

fn rkey_of(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap()
}

/// The routing rules of predecessor-data-format.md §3.4 (+ DESIGN.md §5), applied to the
/// production Jetstream rendering of the capture: an oracle independent of our decoder and router.
fn expected_from_jetstream(
    lines: &[Value],
    study: &HashSet<String>,
    in_network: &HashSet<String>,
) -> BTreeSet<String> {
    let mut in_network = in_network.clone();
    let mut study_posts: HashSet<String> = HashSet::new();
    let mut files = BTreeSet::new();
    let s = "study_user_activity";
    for line in lines {
        let did = line["did"].as_str().unwrap();
        let is_study = study.contains(did);
        match line["kind"].as_str().unwrap() {
            "identity" | "account" if is_study => {
                let kind = line["kind"].as_str().unwrap();
                let seq = line[kind]["seq"].as_i64().unwrap();
                files.insert(format!("{s}/account/did={did}_{kind}_seq={seq}.json"));
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
                            .filter(|u| study_posts.contains(*u))
                            .or(parent.filter(|u| study_posts.contains(*u)))
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
                        }
                    }
                    ("create", "like") => {
                        let subject = r["subject"]["uri"].as_str().unwrap();
                        if is_study {
                            files.insert(format!("{s}/create/like/{}/{name}", rkey_of(subject)));
                        }
                        if study_posts.contains(subject) {
                            files.insert(format!(
                                "{s}/create/like_on_user_post/{}/{name}",
                                rkey_of(subject)
                            ));
                        }
                    }
                    ("create", "repost") => {
                        if is_study {
                            files.insert(format!("{s}/create/repost/{name}"));
                        }
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
                        if kind == "post" && in_network.contains(did) {
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
    for (path, contents) in &tree {
        let v: Value = serde_json::from_str(contents).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(v.is_object(), "{path}");
    }
    // Replaying again skips everything at or below the stored cursor: nothing changes.
    let again = run_to_end(cfg.clone()).await;
    assert_eq!(
        again.files, 0,
        "a restarted replay skips frames at or below the cursor"
    );
    assert_eq!(cache_tree(&cfg.cache_dir), tree);
}
