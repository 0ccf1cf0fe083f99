//! Consent withdrawal (issue 11), the writer's half: nothing by or about a withdrawn study user
//! is routed; a SIGHUP withdrawal removes their cache files and index rows (a byte search of the
//! cache and of every SQLite file finds neither their DID nor their post URIs), leaves every other
//! file byte for byte, and a restart brings nothing back; `--account-deleted-is-withdrawal` on and
//! off. Which file is "theirs" is decided here by the README rule, independently of the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use firehose_writer::config::{Config, Source};
use serde_json::{json, Value};
use sync_core::ids::Tid;
use sync_core::synth::{self, OpSpec};
use workspace_tests::relay::TestRelay;

use crate::writer::{start_writer, start_writer_with_reload, Running};

const WAIT: Duration = Duration::from_secs(30);
/// The participant who withdraws.
const W: &str = "did:plc:w4xbfzo7kqfes5zb7r6qv3rw";
/// Study users who stay.
const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const S2: &str = "did:plc:4llrhdclvdlmmynkwsmg5tdc";
/// Not tracked: reacts to everyone.
const X: &str = "did:plc:q6gjnaw2blty4crticxkmujt";
/// Followed by W only (in-network through W alone).
const C: &str = "did:plc:ragtjsm2j2vknwkz3zp4oxrd";
/// Followed by S1.
const D: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
const CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
const TIME: &str = "2026-03-01T12:00:00.000Z";

const POST: &str = "app.bsky.feed.post";
const LIKE: &str = "app.bsky.feed.like";
const FOLLOW: &str = "app.bsky.graph.follow";
const REPOST: &str = "app.bsky.feed.repost";
const BLOCK: &str = "app.bsky.graph.block";
const PROFILE: &str = "app.bsky.actor.profile";

/// Frames with increasing seqs and revs (a rev per commit, from the clock: never ahead of it).
struct Frames {
    seq: i64,
    base: u64,
}

impl Frames {
    fn new(first_seq: i64) -> Frames {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        Frames {
            seq: first_seq - 1,
            // A minute back, so that a few hundred frames stay behind the clock.
            base: now - 60_000_000,
        }
    }

    fn last(&self) -> i64 {
        self.seq
    }

    /// A fresh record key (a TID).
    fn rkey(&mut self) -> String {
        self.base += 1;
        Tid::from_u64(self.base << 10).to_string()
    }

    fn commit(&mut self, repo: &str, ops: &[OpSpec]) -> Vec<u8> {
        self.seq += 1;
        let rev = self.rkey();
        synth::commit_frame(self.seq, repo, &rev, TIME, ops)
    }

    fn post(&mut self, repo: &str, record: Value) -> (Vec<u8>, String) {
        let rkey = self.rkey();
        let uri = format!("at://{repo}/{POST}/{rkey}");
        (
            self.commit(repo, &[OpSpec::create(POST, &rkey, record)]),
            uri,
        )
    }

    fn text_post(&mut self, repo: &str, text: &str) -> (Vec<u8>, String) {
        self.post(
            repo,
            json!({"$type": POST, "text": text, "createdAt": TIME}),
        )
    }

    fn reply(&mut self, repo: &str, to: &str) -> (Vec<u8>, String) {
        let strong = json!({"uri": to, "cid": CID});
        self.post(
            repo,
            json!({"$type": POST, "text": "re", "createdAt": TIME,
                "reply": {"root": strong, "parent": strong}}),
        )
    }

    fn quote(&mut self, repo: &str, of: &str) -> (Vec<u8>, String) {
        self.post(
            repo,
            json!({"$type": POST, "text": "look", "createdAt": TIME,
                "embed": {"$type": "app.bsky.embed.record", "record": {"uri": of, "cid": CID}}}),
        )
    }

    fn reaction(&mut self, repo: &str, collection: &str, of: &str) -> (Vec<u8>, String) {
        let rkey = self.rkey();
        let record = json!({"$type": collection, "createdAt": TIME,
            "subject": {"uri": of, "cid": CID}});
        let uri = format!("at://{repo}/{collection}/{rkey}");
        (
            self.commit(repo, &[OpSpec::create(collection, &rkey, record)]),
            uri,
        )
    }

    fn follow(&mut self, repo: &str, subject: &str) -> Vec<u8> {
        self.follow_uri(repo, subject).0
    }

    /// A follow and its URI.
    fn follow_uri(&mut self, repo: &str, subject: &str) -> (Vec<u8>, String) {
        let rkey = self.rkey();
        let record = json!({"$type": FOLLOW, "createdAt": TIME, "subject": subject});
        let uri = format!("at://{repo}/{FOLLOW}/{rkey}");
        (
            self.commit(repo, &[OpSpec::create(FOLLOW, &rkey, record)]),
            uri,
        )
    }

    fn delete(&mut self, uri: &str) -> Vec<u8> {
        let mut parts = uri.strip_prefix("at://").unwrap().split('/');
        let (repo, collection, rkey) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        self.commit(repo, &[OpSpec::delete(collection, rkey)])
    }

    fn account(&mut self, did: &str, active: bool, status: Option<&str>) -> Vec<u8> {
        self.seq += 1;
        // Each event at its own time: account files are named by the event.
        let time = format!(
            "2026-03-01T12:{:02}:{:02}.000Z",
            self.seq / 60,
            self.seq % 60
        );
        synth::account_frame(self.seq, did, active, status, &time)
    }
}

fn rkey_of(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap()
}

/// Every cache file, as bytes (dot-folders included: nothing of theirs may hide there).
fn cache_bytes(root: &Path) -> BTreeMap<String, Vec<u8>> {
    crate::support::cache_file_bytes(root)
}

/// Every folder under `root`, relative (dot-folders included): a folder name may name them too.
fn cache_dirs(root: &Path) -> Vec<String> {
    crate::support::cache_dirs(root)
}

pub(crate) fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The README rule, applied independently: a file is theirs when its path or contents name the
/// DID, or it lies in the reaction folder (`create/` or `delete/`) of one of their posts.
pub(crate) fn is_theirs(path: &str, contents: &[u8], did: &str, post_rkeys: &[&str]) -> bool {
    if path.contains(did) || contains(contents, did) {
        return true;
    }
    let parts: Vec<&str> = path.split('/').collect();
    parts.windows(2).any(|w| {
        [
            "reply_to_user_post",
            "like_on_user_post",
            "repost_of_user_post",
            "quote_of_user_post",
        ]
        .contains(&w[0])
            && post_rkeys.contains(&w[1])
    })
}

/// The state database and its `-wal` / `-shm` companions, as they are on disk now.
pub(crate) fn sqlite_files(state: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let mut p = state.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            std::fs::read(&p).ok().map(|bytes| (p, bytes))
        })
        .collect()
}

/// Fails naming the first place `needles` occur: the cache (every file, names and contents, and
/// every folder name) and the SQLite files.
fn assert_nowhere(cfg: &Config, needles: &[&str]) {
    for (path, bytes) in cache_bytes(&cfg.cache_dir) {
        for n in needles {
            assert!(
                !path.contains(n) && !contains(&bytes, n),
                "cache file {path} still names {n}"
            );
        }
    }
    for dir in cache_dirs(&cfg.cache_dir) {
        for n in needles {
            assert!(!dir.contains(n), "cache folder {dir} still names {n}");
        }
    }
    let files = sqlite_files(&cfg.state);
    assert!(!files.is_empty(), "no state database at {:?}", cfg.state);
    for (path, bytes) in files {
        for n in needles {
            assert!(!contains(&bytes, n), "{} still holds {n}", path.display());
        }
    }
}

fn config(dir: &Path, relay: &TestRelay, study: &[&str]) -> Config {
    std::fs::write(dir.join("study.txt"), study.join("\n")).unwrap();
    std::fs::write(dir.join("withdrawn.txt"), "# nobody yet\n").unwrap();
    Config {
        source: Source::Relay(relay.url()),
        cache_dir: dir.join("cache"),
        state: dir.join("state.sqlite"),
        study_users: dir.join("study.txt"),
        withdrawn: Some(dir.join("withdrawn.txt")),
        cursor: Some(0),
        commit_interval: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        ..crate::support::offline_defaults()
    }
}

/// A writer with `study` as its study users and a reload channel (a send acts as SIGHUP).
async fn reloadable(
    study: &[&str],
) -> (
    TestRelay,
    tempfile::TempDir,
    Config,
    tokio::sync::mpsc::Sender<()>,
    Running,
) {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &relay, study);
    let (reload, reload_rx) = tokio::sync::mpsc::channel(4);
    let writer = start_writer_with_reload(cfg.clone(), Some(reload_rx));
    (relay, tmp, cfg, reload, writer)
}

/// Writes `list` as the withdrawn file in `dir`, reloads, and waits for the purge.
async fn withdraw_by_sighup(
    dir: &Path,
    list: &str,
    reload: &tokio::sync::mpsc::Sender<()>,
    writer: &Running,
) -> std::sync::Arc<firehose_writer::metrics::Metrics> {
    std::fs::write(dir.join("withdrawn.txt"), list).unwrap();
    reload.send(()).await.unwrap();
    let metrics = writer.metrics();
    wait_for("the withdrawal purge", || {
        metrics.withdrawn_rows_purged.load(Ordering::Relaxed) > 0
    })
    .await;
    metrics
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn push_all(relay: &TestRelay, writer: &Running, frames: Vec<Vec<u8>>, last: i64) {
    for f in frames {
        relay.push(f);
    }
    assert!(
        writer.wait_for_cursor(last, WAIT).await,
        "cursor never reached {last}"
    );
}

pub(crate) fn withdrawn_rows(state: &Path) -> Vec<(String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn.prepare("SELECT hash, source FROM withdrawn").unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows
}

/// The index a purge leaves that a crash could make it forget: the routed entries and the
/// salted hashes of records about them (whose later deletes are not routed).
pub(crate) fn purge_index(state: &Path) -> (Vec<(String, String)>, Vec<Vec<u8>>) {
    let conn =
        rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let routed = conn
        .prepare("SELECT uri, folder FROM routed ORDER BY uri, folder")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let records = conn
        .prepare("SELECT hash FROM withdrawn_records ORDER BY hash")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (routed, records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_withdrawal_removes_their_files_and_rows_and_nothing_of_theirs_comes_back() {
    let (relay, tmp, cfg, reload, writer) = reloadable(&[S1, S2, W]).await;
    let mut f = Frames::new(1);

    // Before the withdrawal: their data and everyone's reactions to it, next to data that is
    // nobody's business of theirs.
    let mut before = Vec::new();
    let (frame, w_post) = f.text_post(W, "mine");
    before.push(frame);
    let (frame, s1_post) = f.text_post(S1, "s1");
    before.push(frame);
    before.push(f.reaction(X, LIKE, &w_post).0);
    let (frame, x_like_of_w) = f.reaction(X, LIKE, &w_post);
    before.push(frame);
    before.push(f.reaction(X, REPOST, &w_post).0);
    before.push(f.reply(X, &w_post).0);
    before.push(f.reaction(S1, LIKE, &w_post).0);
    before.push(f.quote(S1, &w_post).0);
    before.push(f.reaction(W, LIKE, &s1_post).0);
    before.push(f.reply(W, &s1_post).0);
    before.push(f.follow(W, C));
    before.push(f.follow(X, W));
    before.push(f.follow(W, S1));
    before.push(f.text_post(C, "c, in-network through W only").0);
    before.push(f.account(W, true, None));
    before.push(f.delete(&x_like_of_w));
    // Their repost, quote, block, profile and a delete of their own.
    before.push(f.reaction(W, REPOST, &s1_post).0);
    before.push(f.quote(W, &s1_post).0);
    let rkey = f.rkey();
    let block = json!({"$type": BLOCK, "createdAt": TIME, "subject": X});
    before.push(f.commit(W, &[OpSpec::create(BLOCK, &rkey, block)]));
    let profile = json!({"$type": PROFILE, "displayName": "W"});
    before.push(f.commit(W, &[OpSpec::create(PROFILE, "self", profile)]));
    let (frame, w_gone) = f.text_post(W, "soon deleted");
    before.push(frame);
    before.push(f.delete(&w_gone));
    // Not theirs.
    before.push(f.text_post(S2, "s2").0);
    before.push(f.reaction(X, LIKE, &s1_post).0);
    before.push(f.reply(X, &s1_post).0);
    before.push(f.follow(S1, D));
    before.push(f.text_post(D, "d").0);
    before.push(f.follow(X, S2));
    let last = f.last();
    push_all(&relay, &writer, before, last).await;

    let snapshot = cache_bytes(&cfg.cache_dir);
    let rkeys = [rkey_of(&w_post)];
    let (theirs, others): (BTreeMap<_, _>, BTreeMap<_, _>) = snapshot
        .into_iter()
        .partition(|(path, bytes)| is_theirs(path, bytes, W, &rkeys));
    // The scenario exercises every kind of "theirs" (else the test proves little).
    for folder in [
        "create/post/",
        "like_on_user_post/",
        "repost_of_user_post/",
        "reply_to_user_post/",
        "quote_of_user_post/",
        "delete/like_on_user_post/",
        "create/like/",
        "follow/follower/",
        "follow/followee/",
        "account/",
        "create/repost/",
        "create/block/",
        "create/profile/",
        "delete/post/",
    ] {
        assert!(
            theirs.keys().any(|p| p.contains(folder)),
            "no file of theirs in {folder}: {:?}",
            theirs.keys()
        );
    }
    assert!(others.len() >= 7, "{:?}", others.keys());
    let c_folder = format!("in_network_user_activity/create/post/{C}/");
    assert!(others.keys().any(|p| p.starts_with(&c_folder)));

    // The withdrawal (an unrelated study user's data is untouched).
    let metrics = withdraw_by_sighup(
        tmp.path(),
        &format!("# consent withdrawn 2026-03-01\n{W}\n"),
        &reload,
        &writer,
    )
    .await;
    assert_eq!(metrics.withdrawn_dids.load(Ordering::Relaxed), 1);
    assert_eq!(
        metrics.withdrawn_files_removed.load(Ordering::Relaxed),
        theirs.len() as u64
    );
    assert_eq!(
        cache_bytes(&cfg.cache_dir),
        others,
        "exactly their files are gone; every other file is byte for byte as it was"
    );
    let needles = [W, w_post.as_str()];
    assert_nowhere(&cfg, &needles);

    // After it: nothing by or about them is routed; everyone else still is.
    let mut after = vec![
        f.text_post(W, "still here").0,
        f.reaction(W, LIKE, &s1_post).0,
        f.reaction(X, LIKE, &w_post).0,
        f.reply(X, &w_post).0,
        f.reaction(S1, LIKE, &w_post).0,
        f.quote(S2, &w_post).0,
        f.follow(X, W),
        f.follow(S1, W),
        f.account(W, false, Some("deactivated")),
    ];
    let mention = json!({"$type": POST, "text": "hi @w", "createdAt": TIME,
        "facets": [{"index": {"byteStart": 3, "byteEnd": 5},
            "features": [{"$type": "app.bsky.richtext.facet#mention", "did": W}]}]});
    after.push(f.post(S1, mention).0);
    // C was in the network through W only; D through S1.
    after.push(f.text_post(C, "c again").0);
    let (frame, d_post) = f.text_post(D, "d again");
    after.push(frame);
    let (frame, s1_post2) = f.text_post(S1, "s1 again");
    after.push(frame);
    let last = f.last();
    push_all(&relay, &writer, after, last).await;
    assert_nowhere(&cfg, &needles);
    let now = cache_bytes(&cfg.cache_dir);
    let new: Vec<&String> = now.keys().filter(|p| !others.contains_key(*p)).collect();
    assert_eq!(
        new.len(),
        2,
        "only S1's and D's new posts are routed: {new:?}"
    );
    assert!(new
        .iter()
        .any(|p| p.ends_with(&format!("{}.json", rkey_of(&s1_post2)))));
    assert!(new
        .iter()
        .any(|p| p.contains(D) && p.ends_with(&format!("{}.json", rkey_of(&d_post)))));
    assert!(metrics.withdrawn_drops("event") >= 3);
    assert!(metrics.withdrawn_drops("op") >= 7);
    writer.stop().await.unwrap();
    assert_nowhere(&cfg, &needles);
    assert_eq!(
        withdrawn_rows(&cfg.state).len(),
        1,
        "one salted hash recorded"
    );
    assert!(!withdrawn_rows(&cfg.state)[0].0.contains(W));
    let kept = cache_bytes(&cfg.cache_dir);

    // A restart resurrects nothing and does not purge again.
    let writer = start_writer(Config {
        cursor: None,
        ..cfg.clone()
    });
    let again = vec![
        f.text_post(W, "after restart").0,
        f.reaction(X, LIKE, &w_post).0,
        f.reaction(S1, REPOST, &w_post).0,
    ];
    let last = f.last();
    push_all(&relay, &writer, again, last).await;
    let metrics = writer.metrics();
    assert_eq!(metrics.withdrawn_dids.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.withdrawn_rows_purged.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.withdrawn_files_removed.load(Ordering::Relaxed), 0);
    writer.stop().await.unwrap();
    assert_eq!(cache_bytes(&cfg.cache_dir), kept);
    assert_nowhere(&cfg, &needles);
}

/// A follow of W by someone else is routed to `followee` and indexed under the follower's URI,
/// which does not name W. Once the export has taken its file (gone from the cache), the purge
/// still finds the index entry (the state recorded whom the follow is about): the follower's
/// later unfollow is not routed, and the state holds neither W nor the follow's URI. A follow of
/// a remaining study user by the same account is routed and unrouted as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_of_them_whose_file_was_exported_is_purged_and_its_unfollow_not_routed() {
    let (relay, tmp, cfg, reload, writer) = reloadable(&[S1, W]).await;
    let mut f = Frames::new(1);
    let (frame, w_post) = f.text_post(W, "mine");
    let mut frames = vec![frame];
    let (frame, x_follows_w) = f.follow_uri(X, W);
    frames.push(frame);
    let (frame, x_follows_s1) = f.follow_uri(X, S1);
    frames.push(frame);
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;

    // The export takes the follow's file (and deletes it from the cache).
    let followee = cfg
        .cache_dir
        .join("study_user_activity/create/follow/followee");
    let exported = followee.join(format!("follower_did={X}_followee_did={W}.json"));
    assert!(
        exported.is_file(),
        "{:?}",
        cache_bytes(&cfg.cache_dir).keys()
    );
    std::fs::remove_file(&exported).unwrap();
    assert!(followee
        .join(format!("follower_did={X}_followee_did={S1}.json"))
        .is_file());

    // W withdraws.
    withdraw_by_sighup(tmp.path(), &format!("{W}\n"), &reload, &writer).await;

    // X unfollows both.
    let frames = vec![f.delete(&x_follows_w), f.delete(&x_follows_s1)];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    writer.stop().await.unwrap();
    let deletes = "study_user_activity/delete/follow/followee";
    let delete_of = |uri: &str| {
        format!(
            "{deletes}/author_did={X}_follow_uri_suffix={}.json",
            rkey_of(uri)
        )
    };
    let cache = cache_bytes(&cfg.cache_dir);
    assert!(
        !cache.contains_key(&delete_of(&x_follows_w)),
        "the unfollow of W was routed: {:?}",
        cache.keys()
    );
    assert!(
        cache.contains_key(&delete_of(&x_follows_s1)),
        "the unfollow of S1 is routed: {:?}",
        cache.keys()
    );
    assert_nowhere(&cfg, &[W, w_post.as_str(), x_follows_w.as_str()]);
}

/// A study user's own records about W (a follow of W, a like of W's post) are purged with W;
/// their later deletes name only the study user, yet would tell anyone holding the purged
/// records whom they were about: they are not routed either (the state keeps salted hashes of
/// the purged records' URIs, never the URIs). The study user's other deletes are routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_users_deletes_of_records_about_them_are_not_routed_after_the_purge() {
    let (relay, tmp, cfg, reload, writer) = reloadable(&[S1, W]).await;
    let mut f = Frames::new(1);
    let (frame, w_post) = f.text_post(W, "mine");
    let mut frames = vec![frame];
    let (frame, s1_follows_w) = f.follow_uri(S1, W);
    frames.push(frame);
    let (frame, s1_likes_w) = f.reaction(S1, LIKE, &w_post);
    frames.push(frame);
    let (frame, s1_post) = f.text_post(S1, "own");
    frames.push(frame);
    // An earlier follow of W that S1 deleted before the withdrawal: its delete file names only
    // S1 and the follow's URI.
    let (frame, s1_followed_w) = f.follow_uri(S1, W);
    frames.push(frame);
    frames.push(f.delete(&s1_followed_w));
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    let early_delete = format!(
        "study_user_activity/delete/follow/author_did={S1}_follow_uri_suffix={}.json",
        rkey_of(&s1_followed_w)
    );
    assert!(
        cache_bytes(&cfg.cache_dir).contains_key(&early_delete),
        "{:?}",
        cache_bytes(&cfg.cache_dir).keys()
    );

    let metrics = withdraw_by_sighup(tmp.path(), &format!("{W}\n"), &reload, &writer).await;
    let kept = cache_bytes(&cfg.cache_dir);
    assert!(
        !kept.contains_key(&early_delete),
        "the earlier unfollow of W stays: {:?}",
        kept.keys()
    );

    // A follow of W made after the withdrawal is screened; its unfollow must be too.
    let (frame, s1_follows_w_after) = f.follow_uri(S1, W);
    let last = f.last();
    push_all(&relay, &writer, vec![frame], last).await;
    let frames = vec![
        f.delete(&s1_follows_w),
        f.delete(&s1_likes_w),
        f.delete(&s1_post),
        f.delete(&s1_follows_w_after),
    ];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    writer.stop().await.unwrap();
    let cache = cache_bytes(&cfg.cache_dir);
    let new: Vec<&String> = cache.keys().filter(|p| !kept.contains_key(*p)).collect();
    assert_eq!(
        new,
        [&format!(
            "study_user_activity/delete/post/author_did={S1}_post_uri_suffix={}.json",
            rkey_of(&s1_post)
        )],
        "only the delete of S1's own post"
    );
    // The two deletes, the follow made after the withdrawal and its delete.
    assert_eq!(metrics.withdrawn_drops("op"), 4);
    assert_nowhere(
        &cfg,
        &[
            W,
            w_post.as_str(),
            s1_follows_w.as_str(),
            s1_likes_w.as_str(),
            s1_followed_w.as_str(),
            s1_follows_w_after.as_str(),
        ],
    );
}

/// Runs W's post, a like of it and an account deletion of W through a writer with the flag as
/// given; then restarts it and sends another post of W. Returns the cache after each phase.
async fn account_deletion(
    flag: bool,
) -> (
    tempfile::TempDir,
    Config,
    BTreeMap<String, Vec<u8>>,
    BTreeMap<String, Vec<u8>>,
    String,
) {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &relay, &[S1, W]);
    cfg.account_deleted_is_withdrawal = flag;
    let writer = start_writer(cfg.clone());
    let mut f = Frames::new(1);
    let (p1, w_post) = f.text_post(W, "mine");
    let frames = vec![
        p1,
        f.reaction(X, LIKE, &w_post).0,
        f.text_post(S1, "s1").0,
        f.account(W, false, Some("deleted")),
    ];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    let first = cache_bytes(&cfg.cache_dir);
    writer.stop().await.unwrap();
    // The study-user file still lists them; the withdrawn file does too when the deletion was
    // taken as a withdrawal (the writer added them, for batch-export's purge). An editor that
    // saved an older copy drops that line: the next start adds it again.
    if flag {
        let list = std::fs::read_to_string(cfg.withdrawn.as_ref().unwrap()).unwrap();
        assert!(list.contains(W), "{list}");
        std::fs::write(cfg.withdrawn.as_ref().unwrap(), "# nobody yet\n").unwrap();
    }
    let writer = start_writer(Config {
        cursor: None,
        ..cfg.clone()
    });
    let frames = vec![f.text_post(W, "back").0, f.reaction(X, LIKE, &w_post).0];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    writer.stop().await.unwrap();
    let second = cache_bytes(&cfg.cache_dir);
    (tmp, cfg, first, second, w_post)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_deletion_is_a_withdrawal_only_when_asked() {
    let (_tmp, cfg, first, second, w_post) = account_deletion(true).await;
    assert!(
        first.keys().all(|p| !p.contains(W)),
        "their files are removed: {:?}",
        first.keys()
    );
    assert_eq!(first.len(), 1, "S1's post only: {:?}", first.keys());
    assert_eq!(second, first, "a restart routes nothing of theirs");
    assert_nowhere(&cfg, &[W, w_post.as_str()]);
    let rows = withdrawn_rows(&cfg.state);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "account_deleted");
    // The list both programs read names them once, after the operator's lines, with why.
    let list = std::fs::read_to_string(cfg.withdrawn.as_ref().unwrap()).unwrap();
    let listed = did_lines(&list);
    assert_eq!(listed, vec![W.to_owned()], "{list}");
    assert!(list.starts_with("# nobody yet\n"), "{list}");
    assert!(list.contains("account deleted"), "{list}");
    // batch-export, given the same list, exits 3 until a purge has covered them.
    let (output, export_state) = (_tmp.path().join("out"), _tmp.path().join("export-state"));
    let list_arg = cfg.withdrawn.as_ref().unwrap().to_str().unwrap();
    let export = |extra: &[&str]| batch_export(&cfg.cache_dir, &output, &export_state, extra);
    let o = export(&["--withdrawn", list_arg]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("batch-export purge"));
    let o = export(&["--withdrawn", list_arg, "purge"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = export(&["--withdrawn", list_arg]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let (_tmp, cfg, first, second, _) = account_deletion(false).await;
    let theirs = |tree: &BTreeMap<String, Vec<u8>>| {
        tree.iter()
            .filter(|(p, bytes)| is_theirs(p, bytes, W, &[]))
            .count()
    };
    // Their post, the like of it, the account event.
    assert_eq!(theirs(&first), 3, "{:?}", first.keys());
    assert!(first
        .keys()
        .any(|p| p.contains("study_user_activity/account/")));
    assert_eq!(
        theirs(&second),
        5,
        "still a study user: {:?}",
        second.keys()
    );
    assert!(withdrawn_rows(&cfg.state).is_empty());
    let list = std::fs::read_to_string(cfg.withdrawn.as_ref().unwrap()).unwrap();
    assert!(did_lines(&list).is_empty(), "{list}");
}

/// A withdrawn list the writer cannot add an account deletion to (here a folder put in its
/// place after the start check) stops neither the capture nor the purge; the gauge shows it, and
/// the next start with a writable list adds the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_deletion_the_list_cannot_take_does_not_stop_the_capture() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &relay, &[S1, W]);
    cfg.account_deleted_is_withdrawal = true;
    let port = workspace_tests::s3::free_port();
    cfg.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let list = cfg.withdrawn.clone().unwrap();
    let unlisted = || metric(port, "firehose_withdrawn_account_deletions_unlisted");
    let writer = start_writer(cfg.clone());
    let mut f = Frames::new(1);
    let frames = vec![f.text_post(W, "mine").0];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    // Running (the start check passed): now the list cannot be written.
    std::fs::remove_file(&list).unwrap();
    std::fs::create_dir(&list).unwrap();
    let frames = vec![
        f.account(W, false, Some("deleted")),
        f.text_post(S1, "after").0,
    ];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    assert_eq!(unlisted(), Some(1.0));
    writer.stop().await.unwrap();
    let cache = cache_bytes(&cfg.cache_dir);
    assert!(cache.keys().all(|p| !p.contains(W)), "{:?}", cache.keys());
    assert_eq!(
        cache.len(),
        1,
        "S1's post after the deletion: {:?}",
        cache.keys()
    );

    std::fs::remove_dir(&list).unwrap();
    std::fs::write(&list, "# restored\n").unwrap();
    let writer = start_writer(Config {
        cursor: None,
        ..cfg.clone()
    });
    let frames = vec![f.text_post(S1, "later").0];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    assert_eq!(unlisted(), Some(0.0));
    writer.stop().await.unwrap();
    let text = std::fs::read_to_string(&list).unwrap();
    assert_eq!(did_lines(&text), vec![W.to_owned()], "{text}");
}

/// A state file written before `secure_delete` was on may hold deleted bytes of theirs in free
/// pages: its first purge rewrites it (VACUUM) so that none survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_older_than_secure_delete_is_vacuumed_at_its_first_purge() {
    let relay = TestRelay::start(Vec::new()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &relay, &[S1, W]);
    let writer = start_writer(cfg.clone());
    let mut f = Frames::new(1);
    let frames = vec![f.text_post(W, "mine").0, f.text_post(S1, "s1").0];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    writer.stop().await.unwrap();

    // What an older writer left: a row naming them deleted without zeroing, and no record of
    // secure_delete.
    let lingering = format!("lingering {W}");
    {
        let conn = rusqlite::Connection::open(&cfg.state).unwrap();
        conn.pragma_update(None, "secure_delete", "OFF").unwrap();
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('old_note', ?1)",
            [&lingering],
        )
        .unwrap();
        conn.execute("DELETE FROM meta WHERE key = 'old_note'", [])
            .unwrap();
        conn.execute("DELETE FROM meta WHERE key = 'secure_delete_since'", [])
            .unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    assert!(
        sqlite_files(&cfg.state)
            .iter()
            .any(|(_, bytes)| contains(bytes, &lingering)),
        "the deleted row's bytes are in the file (else this tests nothing)"
    );

    std::fs::write(cfg.withdrawn.as_ref().unwrap(), format!("{W}\n")).unwrap();
    let writer = start_writer(Config {
        cursor: None,
        ..cfg.clone()
    });
    let frames = vec![f.text_post(S1, "after").0];
    let last = f.last();
    push_all(&relay, &writer, frames, last).await;
    writer.stop().await.unwrap();
    assert_nowhere(&cfg, &[W, &lingering]);
}

/// The DIDs a withdrawn list names (comments and blank lines skipped).
fn did_lines(list: &str) -> Vec<String> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// `/metrics` sample value of the line naming `name` (comments skipped), if served.
fn metric(port: u16, name: &str) -> Option<f64> {
    let (code, text) = workspace_tests::s3::http(port, "GET", "/metrics").ok()?;
    (code == 200).then_some(())?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Against the official PDS (the `gapfree` network of `tests/pds/driver.mjs`, its in-memory
/// PLC; the writer with its defaults: verification, identities from the PLC, backfill): two
/// study users, S2 withdrawn by SIGHUP mid-run. Their files and every reaction to them leave the
/// cache, no SQLite file holds their DID or post URIs, S1's files are untouched, and what S2 does
/// and others do to S2's posts afterwards is never routed while S1 still is.
#[test]
fn a_study_user_withdrawn_mid_run_against_the_official_pds() {
    use crate::pds::{one_network_at_a_time, sigterm, spawn_writer, wait_cursor};
    use std::ffi::OsStr;
    use workspace_tests::pds::{toolchain_or_skip, Gapfree};

    let Some(toolchain) = toolchain_or_skip() else {
        return;
    };
    let _network = one_network_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut net = Gapfree::start(&toolchain, work);
    let (s1, s2) = (net.did("S1").to_owned(), net.did("S2").to_owned());
    let study = work.join("study.txt");
    let withdrawn = work.join("withdrawn.txt");
    std::fs::write(&study, net.study().join("\n")).unwrap();
    std::fs::write(&withdrawn, "").unwrap();
    let port = workspace_tests::s3::free_port();
    let cursor = net.last_seq.to_string();
    let plc = net.plc_url.clone();
    let ws = net.ws.clone();
    let args: Vec<&OsStr> = vec![
        "--relay".as_ref(),
        ws.as_ref(),
        "--cursor".as_ref(),
        cursor.as_ref(),
        "--study-users".as_ref(),
        study.as_os_str(),
        "--withdrawn".as_ref(),
        withdrawn.as_os_str(),
        "--plc-url".as_ref(),
        plc.as_ref(),
    ];
    let mut writer = spawn_writer(work, "writer", &format!("127.0.0.1:{port}"), &args);
    let cache = work.join("cache");
    let state = work.join("state.sqlite");
    let wait = Duration::from_secs(90);

    // Both study users backfilled (their posts from before the start are in the index).
    let deadline = std::time::Instant::now() + wait;
    while metric(port, "firehose_repairs_completed_total").unwrap_or(0.0) < 2.0 {
        assert!(writer.alive(), "the writer exited");
        assert!(std::time::Instant::now() < deadline, "no backfills");
        std::thread::sleep(Duration::from_millis(50));
    }
    let p2 = net.post("S2", "s2_live", "S2 live post").record.uri;
    net.like("A1", "a1_likes_s2", "s2_live");
    net.reply("A2", "a2_replies_s2", "s2_live", "reply to S2");
    net.repost("A3", "a3_reposts_s2", "s2_live");
    net.like("S1", "s1_likes_s2", "s2_live");
    net.like("A1", "a1_likes_s2_old", "s2_post");
    net.follow("A1", "a1_follows_s2", "S2");
    // S2 blocks someone, changes handle (#identity) and, followed by S1, posts in S1's network
    // (a study post and an in-network post at once).
    net.block("S2", "s2_blocks_a3", "A3");
    let s2_handle = "s2-renamed-user.test";
    net.handle("S2", s2_handle);
    net.follow("S1", "s1_follows_s2_before", "S2");
    let p2_in_network = net
        .post("S2", "s2_in_network", "S2 post in S1's network")
        .record
        .uri;
    let p1 = net.post("S1", "s1_live", "S1 live post").record.uri;
    net.like("S2", "s2_likes_s1", "s1_live");
    net.like("A1", "a1_likes_s1", "s1_live");
    let last = net.reply("A2", "a2_replies_s1", "s1_live", "reply to S1");
    wait_cursor(&mut writer, &state, last.commit.seq, wait);
    let before = cache_bytes(&cache);
    let s2_posts = [
        p2.as_str(),
        net.record("s2_post").uri.as_str(),
        p2_in_network.as_str(),
    ]
    .map(str::to_owned);
    let rkeys: Vec<&str> = s2_posts.iter().map(|u| rkey_of(u)).collect();
    let (theirs, others): (BTreeMap<_, _>, BTreeMap<_, _>) = before
        .into_iter()
        .partition(|(path, bytes)| is_theirs(path, bytes, &s2, &rkeys));
    assert!(theirs.len() >= 7, "{:?}", theirs.keys());
    for (kind, part) in [
        (
            "their block",
            "study_user_activity/create/block/".to_owned(),
        ),
        (
            "their #identity event",
            "study_user_activity/account/".to_owned(),
        ),
        (
            "their in-network post",
            format!("in_network_user_activity/create/post/{s2}/"),
        ),
    ] {
        assert!(
            theirs.keys().any(|p| p.contains(&part)),
            "{kind} is not in the cache: {:?}",
            theirs.keys()
        );
    }
    assert!(
        others.keys().filter(|p| p.contains(&s1)).count() >= 1 && others.len() >= 3,
        "{:?}",
        others.keys()
    );
    // The study's export so far: a copy of the cache exported to Parquet by batch-export
    // (the copy keeps this test's cache comparisons independent of the export's deletes).
    let export = Export::new(work);
    copy_tree(&cache, &export.cache);
    export.run(&[]);
    let rows_before = export.rows();
    assert!(rows_before.total > 0, "nothing exported");
    // What the rule does not cover, per table: counted and checksummed before the withdrawal.
    let their_uris = [p2.clone(), net.record("s2_post").uri.clone()];
    let needles_before = [s2.as_str(), their_uris[0].as_str(), their_uris[1].as_str()];
    let kept_before = export.rows_without(&needles_before);
    assert!(!kept_before.is_empty());
    assert!(
        !export.string_hits(&[s2.as_str()]).is_empty(),
        "the export holds S2's rows before the withdrawal"
    );

    // S2 withdraws.
    std::fs::write(&withdrawn, format!("{s2}\n")).unwrap();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(writer.pid() as i32, libc::SIGHUP);
    }
    let deadline = std::time::Instant::now() + wait;
    while metric(port, "firehose_withdrawn_index_rows_purged_total").unwrap_or(0.0) <= 0.0 {
        assert!(writer.alive(), "the writer exited");
        assert!(std::time::Instant::now() < deadline, "no purge");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cache_bytes(&cache), others);

    // Afterwards: S2 and reactions to S2 are not routed; S1 is.
    net.post("S2", "s2_after", "S2 after withdrawing");
    net.like("A1", "a1_likes_s2_after", "s2_live");
    net.like("S1", "s1_likes_s2_after", "s2_post");
    net.follow("S1", "s1_follows_s2", "S2");
    let s1_after = net.post("S1", "s1_after", "S1 after");
    let last = net.like("A3", "a3_likes_s1", "s1_after");
    wait_cursor(&mut writer, &state, last.commit.seq, wait);
    let status = sigterm(&mut writer);
    assert!(status.success(), "writer exit status {status}");
    let after = cache_bytes(&cache);
    let new: Vec<&String> = after.keys().filter(|p| !others.contains_key(*p)).collect();
    assert_eq!(
        new.len(),
        2,
        "S1's post and A3's like of it only: {:#?}",
        new.iter()
            .map(|p| (p, String::from_utf8_lossy(&after[*p])))
            .collect::<Vec<_>>()
    );
    assert!(new.iter().all(|p| p.contains(&s1_after.record.rkey)));
    for (path, bytes) in &others {
        assert_eq!(after.get(path), Some(bytes), "{path} changed");
    }
    let mut needles: Vec<&str> = vec![s2.as_str(), s2_handle];
    needles.extend(s2_posts.iter().map(String::as_str));
    let cfg = Config {
        cache_dir: cache.clone(),
        state: state.clone(),
        ..crate::support::offline_defaults()
    };
    assert_nowhere(&cfg, &needles);
    assert!(!p1.is_empty());

    // The export side: `batch-export purge` with the same list removes their rows from every
    // table and their files from its cache; nothing in the output, its cache or its state names
    // them any more, and the rows of others are all still there.
    export.run(&["--withdrawn", withdrawn.to_str().unwrap(), "purge"]);
    let hits = export.string_hits(&needles);
    assert!(hits.is_empty(), "still in the output: {hits:?}");
    let rows_after = export.rows();
    assert!(rows_after.total < rows_before.total);
    assert!(
        rows_after.total > 0,
        "the other participant's rows are gone too"
    );
    // Every row the rule does not cover is still there, unchanged (count and checksum per table).
    assert_eq!(export.rows_without(&needles_before), kept_before);
    for dir in [&export.cache, &export.state, &export.output] {
        for (path, bytes) in cache_bytes(dir) {
            if path.ends_with(".parquet") {
                continue; // compressed: searched through DuckDB above
            }
            for n in &needles {
                assert!(
                    !path.contains(n) && !contains(&bytes, n),
                    "{}/{path} still names {n}",
                    dir.display()
                );
            }
        }
        for folder in cache_dirs(dir) {
            for n in &needles {
                assert!(
                    !folder.contains(n),
                    "folder {}/{folder} still names {n}",
                    dir.display()
                );
            }
        }
    }
    // A later export of their files (a writer that had not reloaded yet) exports nothing of them.
    let replayed: Vec<&String> = theirs.keys().take(3).collect();
    for path in &replayed {
        let target = export.cache.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, &theirs[*path]).unwrap();
    }
    export.run(&["--withdrawn", withdrawn.to_str().unwrap()]);
    let hits = export.string_hits(&needles);
    assert!(hits.is_empty(), "exported after the purge: {hits:?}");
    assert_eq!(export.rows().total, rows_after.total);
    for path in replayed {
        assert!(
            !export.cache.join(path).exists(),
            "{path} left in the cache"
        );
    }
    net.stop();
}

/// A batch-export run over a cache of its own, for the end-to-end withdrawal check.
struct Export {
    cache: PathBuf,
    output: PathBuf,
    state: PathBuf,
}

/// Rows per exported table (from DuckDB) and in all.
#[derive(Debug)]
struct Rows {
    total: u64,
}

/// The batch-export binary beside this test binary (a workspace test run builds it), or
/// `BATCH_EXPORT_TEST_BIN` (as batch-export's own tests take it).
pub(crate) fn batch_export_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BATCH_EXPORT_TEST_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("batch-export");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// Runs batch-export on `cache`, `output` and `state` without a progress line (`extra`: flags
/// and an optional subcommand).
pub(crate) fn batch_export(
    cache: &Path,
    output: &Path,
    state: &Path,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(batch_export_bin())
        .arg("--cache-dir")
        .arg(cache)
        .arg("--output")
        .arg(output)
        .arg("--state-dir")
        .arg(state)
        .arg("--no-progress")
        .args(extra)
        .output()
        .unwrap()
}

impl Export {
    fn new(work: &Path) -> Export {
        Export {
            cache: work.join("export-cache"),
            output: work.join("export-output"),
            state: work.join("export-state"),
        }
    }

    /// Runs batch-export with this cache, output and state (`extra` before or after: flags and
    /// an optional subcommand); it must succeed.
    fn run(&self, extra: &[&str]) {
        let out = batch_export(&self.cache, &self.output, &self.state, extra);
        assert!(
            out.status.success(),
            "batch-export {extra:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// DuckDB over every Parquet file of the output: (file, column, needle) for each string
    /// column holding a needle.
    fn string_hits(&self, needles: &[&str]) -> Vec<String> {
        let out = duckdb(
            r#"
import duckdb, glob, json, sys
root, needles = sys.argv[1], json.loads(sys.argv[2])
con = duckdb.connect()
hits = []
for f in sorted(glob.glob(root + "/**/*.parquet", recursive=True)):
    for name, typ, *_ in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [f]).fetchall():
        if "VARCHAR" not in typ:
            continue
        for n in needles:
            q = f'SELECT count(*) FROM read_parquet(?) WHERE "{name}" LIKE ?'
            if con.execute(q, [f, "%" + n + "%"]).fetchone()[0]:
                hits.append(f"{f} {name} {n}")
print(json.dumps(hits))
"#,
            &[
                self.output.to_str().unwrap(),
                &serde_json::to_string(needles).unwrap(),
            ],
        );
        serde_json::from_str(&out).unwrap()
    }

    /// Per table (the output's top folder): how many rows name none of `needles` in any string
    /// column, and a checksum of those rows (order-independent).
    fn rows_without(&self, needles: &[&str]) -> BTreeMap<String, (u64, String)> {
        let out = duckdb(
            r#"
import duckdb, glob, hashlib, json, os, sys
root, needles = sys.argv[1], json.loads(sys.argv[2])
con = duckdb.connect()
tables = {}
for f in sorted(glob.glob(root + "/**/*.parquet", recursive=True)):
    table = os.path.relpath(f, root).split(os.sep)[0]
    for row in con.execute("SELECT * FROM read_parquet(?)", [f]).fetchall():
        if any(isinstance(v, str) and any(n in v for n in needles) for v in row):
            continue
        tables.setdefault(table, []).append(repr(row))
out = {t: [len(r), hashlib.sha256("\n".join(sorted(r)).encode()).hexdigest()] for t, r in tables.items()}
print(json.dumps(out))
"#,
            &[
                self.output.to_str().unwrap(),
                &serde_json::to_string(needles).unwrap(),
            ],
        );
        serde_json::from_str(&out).unwrap()
    }

    fn rows(&self) -> Rows {
        let out = duckdb(
            r#"
import duckdb, glob, sys
files = sorted(glob.glob(sys.argv[1] + "/**/*.parquet", recursive=True))
con = duckdb.connect()
print(sum(con.execute("SELECT count(*) FROM read_parquet(?)", [f]).fetchone()[0] for f in files))
"#,
            &[self.output.to_str().unwrap()],
        );
        Rows {
            total: out.trim().parse().unwrap(),
        }
    }
}

pub(crate) fn duckdb(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python3 (duckdb from tests/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Copies every file of `from` (dot-folders left out: the writer's own temp names) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    for (path, bytes) in cache_bytes(from) {
        if path.split('/').any(|part| part.starts_with('.')) {
            continue;
        }
        let target = to.join(&path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
}
