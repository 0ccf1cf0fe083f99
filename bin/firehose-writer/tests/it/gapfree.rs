//! Issue 9's Checks against the official PDS (`tests/pds/driver.mjs gapfree`, its in-memory
//! PLC): the writer resolves identities from that PLC, fetches repos from that PDS (or through
//! the XRPC proxy, when a test gives it `--did-docs` pointing there) and follows the PDS's
//! firehose through the gap proxy (`workspace_tests::gap_proxy`), which can drop or forge
//! frames. Every test is ignored until the writer has the flags (`--plc-url`,
//! `--verify`, `--backfill`, `--backfill-since`, `--did-docs`, `--pds-concurrency`,
//! `--pds-rate`); un-ignore and adjust.
//!
//! The writer starts with `--cursor <ready.last_seq>`: the records made before it started are
//! not in the stream it reads, so only a backfill can know them. Expected cache paths are
//! written out here from the README's folder table, not computed by the writer's code.
//!
//! Needs `tests/setup.sh` (Node 22, `@atproto/dev-env`); `SYNC_SKIP_PDS=1` skips these tests.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::runtime::Runtime;
use workspace_tests::gap_proxy::{forge_commit, Action, Fate, GapProxy, Rule};
use workspace_tests::pds::{toolchain_or_skip, Gapfree, Proc};
use workspace_tests::xrpc_proxy::{did_docs_with_pds, RetryHeaders, Throttle, XrpcProxy, GET_REPO};

use crate::pds::{
    bad_log_lines, cache_files, one_network_at_a_time, read_json, sigterm, spawn_writer,
    wait_cursor,
};

const WAIT: Duration = Duration::from_secs(90);

mod path {
    //! Cache paths, from the README's folder table (`crates/sync-core/src/paths.rs`), written
    //! out here rather than computed by the writer's code.

    const STUDY: &str = "study_user_activity";

    fn record_file(did: &str, kind: &str, rkey: &str) -> String {
        format!("author_did={did}_{kind}_uri_suffix={rkey}.json")
    }

    pub fn study_post(did: &str, rkey: &str) -> String {
        format!("{STUDY}/create/post/{}", record_file(did, "post", rkey))
    }

    pub fn study_like(subject_rkey: &str, did: &str, rkey: &str) -> String {
        format!(
            "{STUDY}/create/like/{subject_rkey}/{}",
            record_file(did, "like", rkey)
        )
    }

    pub fn like_on_user_post(post_rkey: &str, did: &str, rkey: &str) -> String {
        format!(
            "{STUDY}/create/like_on_user_post/{post_rkey}/{}",
            record_file(did, "like", rkey)
        )
    }

    pub fn follower(follower: &str, followee: &str) -> String {
        format!(
            "{STUDY}/create/follow/follower/follower_did={follower}_followee_did={followee}.json"
        )
    }

    pub fn in_network_post(did: &str, rkey: &str) -> String {
        format!(
            "in_network_user_activity/create/post/{did}/{}",
            record_file(did, "post", rkey)
        )
    }

    /// A study user deleted one of their own records.
    pub fn study_delete(did: &str, kind: &str, rkey: &str) -> String {
        format!("{STUDY}/delete/{kind}/{}", record_file(did, kind, rkey))
    }

    /// An `#identity` event of a study user (named by the event: paths.rs `account_file`).
    pub fn identity(did: &str, time: &str, handle: Option<&str>) -> String {
        let did = sync_core::ids::Did::parse(did).unwrap();
        let name = sync_core::paths::account_file(&sync_core::paths::AccountEventKey {
            did: &did,
            kind: "identity",
            time,
            handle,
            active: None,
            status: None,
        });
        format!("{STUDY}/account/{name}")
    }
}

/// One end-to-end run: the `gapfree` network, the gap proxy subscribed to its firehose from
/// the start, and the study-user file (S1, S2).
///
/// Fields drop in declaration order: the driver (its network) and the proxies, the work
/// directory, the runtime, and last the lock that lets the next network start.
struct E2e {
    net: Gapfree,
    proxy: GapProxy,
    work: PathBuf,
    _tmp: Option<TempDir>,
    rt: Runtime,
    _network: MutexGuard<'static, ()>,
}

impl E2e {
    /// `None` when the PDS toolchain is missing and `SYNC_SKIP_PDS=1`.
    fn start() -> Option<E2e> {
        let toolchain = toolchain_or_skip()?;
        let network = one_network_at_a_time();
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().to_path_buf();
        // SYNC_PDS_KEEP=1 keeps the cache, state and logs for a look afterwards.
        let tmp = if std::env::var("SYNC_PDS_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping {}", work.display());
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        };
        let rt = Runtime::new().unwrap();
        let net = Gapfree::start(&toolchain, &work);
        let proxy = rt
            .block_on(GapProxy::start(&net.ws, Some(0)))
            .expect("subscribe to the PDS");
        // The relay must know the ready seq before the writer asks for it as a cursor.
        assert!(rt.block_on(proxy.wait_for_upstream_seq(net.last_seq, WAIT)));
        std::fs::write(work.join("study.txt"), net.study().join("\n")).unwrap();
        Some(E2e {
            rt,
            net,
            proxy,
            work,
            _tmp: tmp,
            _network: network,
        })
    }

    fn cache(&self) -> PathBuf {
        self.work.join("cache")
    }

    fn state(&self) -> PathBuf {
        self.work.join("state.sqlite")
    }

    fn did(&self, label: &str) -> String {
        self.net.did(label).to_owned()
    }

    fn rkey(&self, name: &str) -> String {
        self.net.record(name).rkey.clone()
    }

    /// Starts the writer on the gap proxy from the ready seq, identities from the PLC,
    /// `--verify routed --backfill on`, plus `extra`; metrics on `metrics_port`.
    fn writer(&self, name: &'static str, metrics_port: u16, extra: &[&str]) -> Proc {
        let plc = self.net.plc_url.as_str();
        let mut args = vec!["--plc-url", plc, "--verify", "routed", "--backfill", "on"];
        args.extend_from_slice(extra);
        self.writer_today(name, metrics_port, &args)
    }

    /// Starts the writer with today's flags only: `--relay` (the gap proxy), `--cursor` (the
    /// ready seq), `--study-users`, plus `extra`.
    fn writer_today(&self, name: &'static str, metrics_port: u16, extra: &[&str]) -> Proc {
        let relay = self.proxy.base_url();
        let cursor = self.net.last_seq.to_string();
        let study = self.work.join("study.txt");
        let mut args: Vec<&OsStr> = vec![
            "--relay".as_ref(),
            relay.as_ref(),
            "--cursor".as_ref(),
            cursor.as_ref(),
            "--study-users".as_ref(),
            study.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        spawn_writer(
            &self.work,
            name,
            &format!("127.0.0.1:{metrics_port}"),
            &args,
        )
    }

    /// Writes `--did-docs` documents for the study users with `endpoint` as their PDS.
    fn did_docs(&self, endpoint: &str) -> PathBuf {
        let (s1, s2) = (self.did("S1"), self.did("S2"));
        let docs = self
            .rt
            .block_on(did_docs_with_pds(&self.net.plc_url, &[&s1, &s2], endpoint))
            .expect("DID documents from the PLC");
        let file = self.work.join("did_docs.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&docs).unwrap()).unwrap();
        file
    }

    /// Waits until every path in `paths` is in the cache (the writer still running).
    fn wait_files(&self, writer: &mut Proc, paths: &[String]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let have = cache_files(&self.cache());
            let missing: Vec<&String> = paths.iter().filter(|p| !have.contains(*p)).collect();
            if missing.is_empty() {
                return;
            }
            assert!(writer.alive(), "the writer exited; missing {missing:?}");
            assert!(
                Instant::now() < deadline,
                "after {WAIT:?} the cache still lacks {missing:?}; it has {have:?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until `cond` holds while the writer runs (fails at once when it exits).
    fn wait_running(&self, writer: &mut Proc, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(writer.alive(), "the writer exited before {what}");
            assert!(Instant::now() < deadline, "no {what} after {WAIT:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the XRPC proxy answered `n` `getRepo` requests with `status`.
    fn wait_get_repos(&self, writer: &mut Proc, xrpc: &XrpcProxy, status: u16, n: usize) {
        self.wait_running(writer, &format!("{n} getRepo answered {status}"), || {
            xrpc.requests_for(GET_REPO)
                .iter()
                .filter(|r| r.status == status)
                .count()
                >= n
        });
    }

    /// Waits for the writer's cursor to reach `seq`, stops it (SIGTERM, exit 0) and returns
    /// the cache's files.
    fn finish(&self, writer: &mut Proc, seq: i64) -> BTreeSet<String> {
        assert!(self
            .rt
            .block_on(self.proxy.wait_for_upstream_seq(seq, WAIT)));
        wait_cursor(writer, &self.state(), seq, WAIT);
        let status = sigterm(writer);
        assert!(status.success(), "writer exit status {status}");
        cache_files(&self.cache())
    }
}

fn set(paths: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    paths.into_iter().collect()
}

/// The value of the first sample on `/metrics` whose line contains every one of `parts`
/// (comments skipped), e.g. `["bad_signature"]`.
fn metric(port: u16, parts: &[&str]) -> Option<f64> {
    let (code, text) = workspace_tests::s3::http(port, "GET", "/metrics").ok()?;
    assert_eq!(code, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The baseline: a writer that trusts its upstream (`--verify off --backfill off`, the first
/// release's behaviour) follows the PDS through the gap proxy from the ready seq, routes what
/// the proxy forwards and never sees the commit it drops: that post is simply missing. With the
/// defaults the next commit reveals the gap and the resync writes it:
/// `a_gap_is_repaired_from_the_repo_with_its_delete`.
#[test]
fn an_unverifying_writer_misses_the_dropped_commit() {
    let Some(mut e2e) = E2e::start() else { return };
    let (s1, a1) = (e2e.did("S1"), e2e.did("A1"));
    let network = e2e.work.join("network.txt");
    std::fs::write(&network, &a1).unwrap();
    let mut writer = e2e.writer_today(
        "writer",
        workspace_tests::s3::free_port(),
        &[
            "--in-network",
            network.to_str().unwrap(),
            "--verify",
            "off",
            "--backfill",
            "off",
        ],
    );
    let first = e2e.net.post("S1", "s1_live", "a live post");
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &first.record.rkey)]);
    e2e.proxy.add_rule(Rule::drop_next_commits(&s1, 1));
    let dropped = e2e.net.post("S1", "s1_dropped", "the relay skips this one");
    let in_network = e2e.net.post("A1", "a1_new", "in-network by the file");
    let after = e2e.net.post("S1", "s1_after", "after the gap");
    let files = e2e.finish(&mut writer, after.commit.seq);
    assert_eq!(
        e2e.proxy
            .dropped()
            .iter()
            .map(|f| f.seq)
            .collect::<Vec<_>>(),
        [Some(dropped.commit.seq)]
    );
    assert_eq!(
        files,
        set([
            path::study_post(&s1, &first.record.rkey),
            path::in_network_post(&a1, &in_network.record.rkey),
            path::study_post(&s1, &after.record.rkey),
        ])
    );
    // Every frame the proxy served reached the writer: one connection, from the ready seq.
    assert_eq!(e2e.proxy.relay().cursors(), [Some(e2e.net.last_seq)]);
    let bad = bad_log_lines(&writer);
    assert!(bad.is_empty(), "writer log:\n{}", bad.join("\n"));
    e2e.net.stop();
}

/// Check 1: accounts with posts, likes and follows exist before the writer first starts. After
/// the start, a like by another account on a study user's old post is routed to
/// `like_on_user_post`; a new post by an account the study user followed before the start is
/// routed to `in_network_user_activity` without any `--in-network` file; with
/// `--backfill-since` the study users' records created since that date are in the cache, and
/// older ones only in the indexes. The study user's unfollow of that pre-start follow (known
/// from the backfill, not from an `--in-network` file) takes the account out of the network.
#[test]
fn backfill_routes_reactions_to_old_posts_and_the_follow_graph() {
    let Some(mut e2e) = E2e::start() else { return };
    let (s1, s2, a1, a2) = (e2e.did("S1"), e2e.did("S2"), e2e.did("A1"), e2e.did("A2"));
    let port = workspace_tests::s3::free_port();
    // s1_old1 (createdAt 2024-01-10) is before the date; s1_old2 (2024-01-11T12:00) after it.
    let mut writer = e2e.writer(
        "writer",
        port,
        &["--backfill-since", "2024-01-11T00:00:00Z"],
    );
    let backfilled = vec![
        path::study_post(&s1, &e2e.rkey("s1_old2")),
        path::study_post(&s1, &e2e.rkey("s1_recent")),
        path::study_like(&e2e.rkey("a1_old"), &s1, &e2e.rkey("s1_like_a1")),
        path::follower(&s1, &a1),
        path::study_post(&s2, &e2e.rkey("s2_post")),
    ];
    // The backfill is done when its files are durable (then S1's follows are known too).
    e2e.wait_files(&mut writer, &backfilled);

    let like = e2e.net.like("A2", "a2_like", "s1_old1");
    let in_network = e2e
        .net
        .post("A1", "a1_new", "A1 is in-network through S1's follow");
    // S1 unfollows A1 (a follow made before the start, known from the backfill): A1 leaves the
    // network at once, so its next post is not routed.
    e2e.net.delete("S1", "s1_follow_a1");
    e2e.net.post(
        "A1",
        "a1_after_unfollow",
        "A1 is out of the network: not routed",
    );
    let outsider = e2e.net.post("A3", "a3_new", "A3 is nobody's: not routed");
    let files = e2e.finish(&mut writer, outsider.commit.seq);

    let mut expected = set(backfilled);
    expected.insert(path::like_on_user_post(
        &e2e.rkey("s1_old1"),
        &a2,
        &like.record.rkey,
    ));
    expected.insert(path::in_network_post(&a1, &in_network.record.rkey));
    expected.insert(path::study_delete(&s1, "follow", &e2e.rkey("s1_follow_a1")));
    assert_eq!(files, expected);
    // The backfilled post is the predecessor's post object of the record in the repo.
    let post = read_json(&e2e.cache(), &path::study_post(&s1, &e2e.rkey("s1_old2")));
    assert_eq!(
        post["uri"].as_str(),
        Some(e2e.net.record("s1_old2").uri.as_str())
    );
    let bad = bad_log_lines(&writer);
    assert!(bad.is_empty(), "writer log:\n{}", bad.join("\n"));
    e2e.net.stop();
}

/// Check 2: the test relay forwards the PDS's frames but drops two commits of a study user (a
/// new post, and the delete of an old post). The next commit reveals the gap; after the
/// resync (`getRepo`, through the XRPC proxy), the missed post's file and the deleted post's
/// delete file are in the cache, once each.
#[test]
fn a_gap_is_repaired_from_the_repo_with_its_delete() {
    let Some(mut e2e) = E2e::start() else { return };
    let s1 = e2e.did("S1");
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    let docs = e2e.did_docs(&xrpc.url());
    let port = workspace_tests::s3::free_port();
    let mut writer = e2e.writer("writer", port, &["--did-docs", docs.to_str().unwrap()]);
    // The backfill of S1 (no files without --backfill-since) indexes s1_old2; a first live
    // commit, once its file is in, shows the writer holds S1's chain.
    e2e.wait_get_repos(&mut writer, &xrpc, 200, 2);
    let before = e2e.net.post("S1", "s1_before_gap", "before the gap");
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &before.record.rkey)]);
    let fetched_before_gap = xrpc.requests_for_did(GET_REPO, &s1).len();

    e2e.proxy.add_rule(Rule::drop_next_commits(&s1, 2));
    let missed = e2e.net.post("S1", "s1_gap_post", "a post the relay skips");
    let deleted = e2e.net.delete("S1", "s1_old2");
    let after = e2e
        .net
        .post("S1", "s1_after_gap", "the commit that reveals the gap");
    let dropped: Vec<Option<String>> = e2e.proxy.dropped().into_iter().map(|f| f.rev).collect();
    assert_eq!(
        dropped,
        [
            Some(missed.commit.rev.clone()),
            Some(deleted.commit.rev.clone())
        ]
    );

    let repaired = [
        path::study_post(&s1, &missed.record.rkey),
        path::study_delete(&s1, "post", &e2e.rkey("s1_old2")),
    ];
    e2e.wait_files(&mut writer, &repaired);
    let files = e2e.finish(&mut writer, after.commit.seq);
    let expected = set([
        path::study_post(&s1, &before.record.rkey),
        path::study_post(&s1, &after.record.rkey),
        repaired[0].clone(),
        repaired[1].clone(),
    ]);
    assert_eq!(files, expected);
    // The resync fetched S1's repo from its PDS (the one in its DID document) after the gap.
    assert!(xrpc.requests_for_did(GET_REPO, &s1).len() > fetched_before_gap);
    let delete = read_json(&e2e.cache(), &repaired[1]);
    assert_eq!(delete["uri"].as_str(), Some(deleted.record.uri.as_str()));
    assert_eq!(delete["collection"].as_str(), Some("app.bsky.feed.post"));
    let post = read_json(&e2e.cache(), &repaired[0]);
    assert_eq!(post["uri"].as_str(), Some(missed.record.uri.as_str()));
    e2e.net.stop();
}

/// What to build, item 3: stream events of a repo that arrive while it is being resynced are
/// not lost. S1's resync `getRepo` is held open by the XRPC proxy while S1 makes another
/// commit; after the release, the missed post, the commit that revealed the gap and the one
/// made during the resync are all in the cache.
#[test]
fn commits_during_a_resync_are_not_lost() {
    let Some(mut e2e) = E2e::start() else { return };
    let s1 = e2e.did("S1");
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    let docs = e2e.did_docs(&xrpc.url());
    let port = workspace_tests::s3::free_port();
    let mut writer = e2e.writer("writer", port, &["--did-docs", docs.to_str().unwrap()]);
    e2e.wait_get_repos(&mut writer, &xrpc, 200, 2);
    let before = e2e.net.post("S1", "s1_before_gap", "before the gap");
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &before.record.rkey)]);

    xrpc.hold(GET_REPO, Some(&s1));
    e2e.proxy.add_rule(Rule::drop_next_commits(&s1, 1));
    let missed = e2e.net.post("S1", "s1_gap_post", "a post the relay skips");
    let reveals = e2e.net.post("S1", "s1_reveals", "reveals the gap");
    // The resync's getRepo is waiting; S1 commits again meanwhile.
    e2e.wait_running(&mut writer, "the resync's getRepo held", || {
        xrpc.holding() >= 1
    });
    // `/health` shows the repair under way (still healthy: a repair is not a stall).
    let (code, body) = workspace_tests::s3::http(port, "GET", "/health").unwrap();
    let json = &body[body.find('{').expect("a JSON body")..=body.rfind('}').unwrap()];
    let health: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["resync_queue_depth"], 1, "{health}");
    assert_eq!(health["repairs_in_flight"], 1, "{health}");
    let during = e2e.net.post("S1", "s1_during", "made during the resync");
    assert!(e2e
        .rt
        .block_on(e2e.proxy.wait_for_upstream_seq(during.commit.seq, WAIT)));
    xrpc.release();
    // The repair is applied when its fetch returns, which may be after the stream (and the
    // cursor) reached the last commit: wait for the repaired post before stopping.
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &missed.record.rkey)]);

    let files = e2e.finish(&mut writer, during.commit.seq);
    let expected =
        set([&before, &missed, &reveals, &during].map(|w| path::study_post(&s1, &w.record.rkey)));
    assert_eq!(files, expected);
    e2e.net.stop();
}

/// What to build, item 2: `OutdatedCursor` marks every tracked repo out of sync. The notice is
/// injected by the gap proxy after the backfill; the study users' repos are fetched again
/// (through the XRPC proxy their documents name). A1, in-network through S1's follow, is
/// tracked too, but its document is not in `--did-docs`: where its resync goes is not checked.
#[test]
fn an_outdated_cursor_resyncs_the_study_users() {
    let Some(mut e2e) = E2e::start() else { return };
    let (s1, s2) = (e2e.did("S1"), e2e.did("S2"));
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    let docs = e2e.did_docs(&xrpc.url());
    let mut writer = e2e.writer(
        "writer",
        workspace_tests::s3::free_port(),
        &["--did-docs", docs.to_str().unwrap()],
    );
    // Backfill done (both repos fetched), and the writer is following the stream.
    e2e.wait_get_repos(&mut writer, &xrpc, 200, 2);
    let live = e2e.net.post("S1", "s1_live", "before the notice");
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &live.record.rkey)]);
    let before = [s1.as_str(), s2.as_str()].map(|d| xrpc.requests_for_did(GET_REPO, d).len());

    e2e.proxy.inject(sync_core::synth::info_frame(
        "OutdatedCursor",
        Some("Requested cursor exceeded limit. Possibly missing events"),
    ));
    e2e.wait_running(
        &mut writer,
        "getRepo of S1 and S2 after OutdatedCursor",
        || {
            [s1.as_str(), s2.as_str()]
                .iter()
                .zip(before)
                .all(|(did, n)| xrpc.requests_for_did(GET_REPO, did).len() > n)
        },
    );
    // Nothing was missed, so the resync writes nothing new.
    let files = e2e.finish(&mut writer, live.commit.seq);
    assert_eq!(files, set([path::study_post(&s1, &live.record.rkey)]));
    e2e.net.stop();
}

/// Check 3: a forged commit for a study user (well-formed, signed by another key, in the seq
/// of a commit of an account nobody tracks) writes nothing and is counted as `bad_signature`;
/// a key rotation published on the PLC followed by `#identity` lets later commits verify.
#[test]
fn a_forged_commit_writes_nothing_and_a_rotated_key_verifies() {
    let Some(mut e2e) = E2e::start() else { return };
    let (s1, a3) = (e2e.did("S1"), e2e.did("A3"));
    let port = workspace_tests::s3::free_port();
    let mut writer = e2e.writer("writer", port, &[]);
    let warmup = e2e.net.post("S1", "s1_warmup", "verified with the PLC key");
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &warmup.record.rkey)]);

    // A3's next commit is replaced, in its seq, by a commit of S1 signed by another key.
    let forged_did = s1.clone();
    e2e.proxy
        .add_rule(Rule::replace_next_commit(&a3, move |info| {
            vec![forge_commit(&forged_did, info.seq.unwrap(), "forged")]
        }));
    let carrier = e2e
        .net
        .post("A3", "a3_carrier", "replaced by a forgery in transit");
    let forged_rkey = match &e2e.proxy.replaced()[..] {
        [h] => match &h.fate {
            Fate::Replaced { with, .. } => with[0].ops[0].rsplit('/').next().unwrap().to_owned(),
            other => panic!("{other:?}"),
        },
        other => panic!("replaced: {other:?}"),
    };
    wait_cursor(&mut writer, &e2e.state(), carrier.commit.seq, WAIT);
    assert!(
        metric(port, &["bad_signature"]).is_some_and(|v| v >= 1.0),
        "no bad_signature count on /metrics"
    );

    // The rotation: the PDS signs with a new key, the PLC publishes it, #identity follows.
    let rotation = e2e.net.rotate_key("S1");
    let rotated = e2e.net.post("S1", "s1_rotated", "signed with the new key");
    assert_eq!(rotated.commit.signing_key, rotation.new_key);
    let rotated_file = path::study_post(&s1, &rotated.record.rkey);
    e2e.wait_files(&mut writer, std::slice::from_ref(&rotated_file));
    let files = e2e.finish(&mut writer, rotated.commit.seq);

    let expected = set([
        path::study_post(&s1, &warmup.record.rkey),
        rotated_file,
        path::identity(
            &s1,
            &rotation.identity.time,
            rotation.identity.handle.as_deref(),
        ),
    ]);
    assert_eq!(files, expected);
    assert!(
        !files.iter().any(|f| f.contains(&forged_rkey)),
        "the forged post was written: {files:?}"
    );
    e2e.net.stop();
}

/// What to build, item 1: an identity is "refreshed on `#identity` and once after a
/// signature failure". The relay loses the `#identity` of S1's key rotation (the gap proxy
/// drops it), so S1's next commit fails with the cached key; one refresh from the PLC gives
/// the new key, and the commit is routed.
#[test]
fn a_rotation_whose_identity_event_is_lost_verifies_after_a_refresh() {
    let Some(mut e2e) = E2e::start() else { return };
    let s1 = e2e.did("S1");
    let mut writer = e2e.writer("writer", workspace_tests::s3::free_port(), &[]);
    let warmup = e2e.net.post("S1", "s1_warmup", "verified with the PLC key");
    e2e.wait_files(&mut writer, &[path::study_post(&s1, &warmup.record.rkey)]);

    let did = s1.clone();
    e2e.proxy.add_rule(Rule::new(
        "drop S1's #identity",
        move |f| f.kind == "identity" && f.did.as_deref() == Some(did.as_str()),
        Action::Drop,
        Some(1),
    ));
    let rotation = e2e.net.rotate_key("S1");
    let rotated = e2e.net.post("S1", "s1_rotated", "signed with the new key");
    assert_eq!(rotated.commit.signing_key, rotation.new_key);
    let files = e2e.finish(&mut writer, rotated.commit.seq);
    assert_eq!(
        e2e.proxy
            .dropped()
            .iter()
            .map(|f| f.seq)
            .collect::<Vec<_>>(),
        [Some(rotation.identity.seq)]
    );
    assert_eq!(
        files,
        set([
            path::study_post(&s1, &warmup.record.rkey),
            path::study_post(&s1, &rotated.record.rkey),
        ])
    );
    e2e.net.stop();
}

/// Check 4a: a restart in the middle of a backfill finishes it without duplicates. S2's
/// `getRepo` is answered 429 (Retry-After 60 s) until the writer is stopped; S1's backfill is
/// complete by then and is not fetched again after the restart; S2's completes.
#[test]
fn a_restart_during_backfill_finishes_it_without_duplicates() {
    let Some(mut e2e) = E2e::start() else { return };
    let (s1, s2, a1) = (e2e.did("S1"), e2e.did("S2"), e2e.did("A1"));
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    xrpc.throttle_with(Throttle {
        nsid: GET_REPO.into(),
        did: Some(s2.clone()),
        count: usize::MAX,
        retry_after: Duration::from_secs(60),
        headers: RetryHeaders::Both,
    });
    let docs = e2e.did_docs(&xrpc.url());
    let docs = docs.to_str().unwrap();
    let args = [
        "--did-docs",
        docs,
        "--backfill-since",
        "2024-01-01T00:00:00Z",
    ];
    let s1_files = vec![
        path::study_post(&s1, &e2e.rkey("s1_old1")),
        path::study_post(&s1, &e2e.rkey("s1_old2")),
        path::study_post(&s1, &e2e.rkey("s1_recent")),
        path::study_like(&e2e.rkey("a1_old"), &s1, &e2e.rkey("s1_like_a1")),
        path::follower(&s1, &a1),
    ];
    let s2_files = vec![path::study_post(&s2, &e2e.rkey("s2_post"))];

    let mut first = e2e.writer("writer-1", workspace_tests::s3::free_port(), &args);
    e2e.wait_files(&mut first, &s1_files);
    e2e.wait_get_repos(&mut first, &xrpc, 429, 1);
    // Mid-backfill: S2's repo is still owed.
    let status = sigterm(&mut first);
    assert!(status.success(), "writer exit status {status}");
    assert!(!cache_files(&e2e.cache()).contains(&s2_files[0]));
    let s1_fetches = xrpc.requests_for_did(GET_REPO, &s1).len();
    assert_eq!(s1_fetches, 1, "{:?}", xrpc.requests_for(GET_REPO));

    xrpc.clear_throttles();
    let mut second = e2e.writer("writer-2", workspace_tests::s3::free_port(), &args);
    e2e.wait_files(&mut second, &s2_files);
    // A commit nobody tracks, so the stored cursor has a seq to reach.
    let tick = e2e.net.post("A3", "a3_tick", "moves the cursor");
    let files = e2e.finish(&mut second, tick.commit.seq);
    assert_eq!(files, set(s1_files.into_iter().chain(s2_files)));
    // S1's finished backfill is not redone; S2's is fetched once more and succeeds.
    assert_eq!(xrpc.requests_for_did(GET_REPO, &s1).len(), 1);
    let s2_ok: Vec<u16> = xrpc
        .requests_for_did(GET_REPO, &s2)
        .iter()
        .map(|r| r.status)
        .filter(|&s| s == 200)
        .collect();
    assert_eq!(s2_ok, [200]);
    e2e.net.stop();
}

/// Check 4b: a PDS answering 429 is waited for, not hammered: S1's first two `getRepo` get
/// 429 with `Retry-After: 2`, S2's with `RateLimit-Reset` two seconds ahead; each next
/// request of that repo comes no sooner than that, and each backfill takes exactly three
/// requests.
#[test]
fn a_pds_answering_429_is_waited_for_not_hammered() {
    let Some(mut e2e) = E2e::start() else { return };
    let (s1, s2) = (e2e.did("S1"), e2e.did("S2"));
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    let retry_after = Duration::from_secs(2);
    for (did, headers) in [
        (&s1, RetryHeaders::RetryAfter),
        (&s2, RetryHeaders::RateLimitReset),
    ] {
        xrpc.throttle_with(Throttle {
            nsid: GET_REPO.into(),
            did: Some(did.clone()),
            count: 2,
            retry_after,
            headers,
        });
    }
    let docs = e2e.did_docs(&xrpc.url());
    let mut writer = e2e.writer(
        "writer",
        workspace_tests::s3::free_port(),
        &[
            "--did-docs",
            docs.to_str().unwrap(),
            "--backfill-since",
            "2024-01-01T00:00:00Z",
            "--pds-concurrency",
            "2",
            "--pds-rate",
            "5",
        ],
    );
    e2e.wait_files(
        &mut writer,
        &[
            path::study_post(&s1, &e2e.rkey("s1_recent")),
            path::study_post(&s2, &e2e.rkey("s2_post")),
        ],
    );
    let tick = e2e.net.post("A3", "a3_tick", "moves the cursor");
    let _ = e2e.finish(&mut writer, tick.commit.seq);
    for did in [&s1, &s2] {
        let gets = xrpc.requests_for_did(GET_REPO, did);
        let statuses: Vec<u16> = gets.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [429, 429, 200], "{did}: {gets:?}");
        for pair in gets.windows(2) {
            let waited = pair[1].at.duration_since(pair[0].at);
            assert!(
                waited >= retry_after,
                "{did}: the next getRepo came {waited:?} after a 429 asking for {retry_after:?}"
            );
        }
    }
    e2e.net.stop();
}

/// A PDS that never finishes a `getRepo` (held open by the XRPC proxy) cannot hold a fetch
/// slot forever: after `--repo-fetch-timeout` the fetch fails (`fetch_deadline`), the slot is
/// free again and the repo stays queued for a retry.
#[test]
fn a_fetch_that_outlives_its_deadline_fails_and_frees_its_slot() {
    let Some(e2e) = E2e::start() else { return };
    let s1 = e2e.did("S1");
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    let docs = e2e.did_docs(&xrpc.url());
    xrpc.hold(GET_REPO, Some(&s1));
    let port = workspace_tests::s3::free_port();
    let mut writer = e2e.writer(
        "writer",
        port,
        &[
            "--did-docs",
            docs.to_str().unwrap(),
            "--repo-fetch-timeout",
            "2",
        ],
    );
    e2e.wait_running(&mut writer, "S1's getRepo held", || xrpc.holding() >= 1);
    e2e.wait_running(&mut writer, "a fetch_deadline failure", || {
        metric(port, &["firehose_repair_failures_total", "fetch_deadline"]).unwrap_or(0.0) >= 1.0
    });
    // S2's backfill went through; S1's slot is free and S1 is still queued (backoff).
    e2e.wait_running(&mut writer, "no repair in flight", || {
        let Ok((_, body)) = workspace_tests::s3::http(port, "GET", "/health") else {
            return false;
        };
        let Some(start) = body.find('{') else {
            return false;
        };
        let health: serde_json::Value =
            serde_json::from_str(&body[start..=body.rfind('}').unwrap()]).unwrap();
        health["repairs_in_flight"] == 0 && health["resync_queue_depth"] == 1
    });
    xrpc.release();
    let status = sigterm(&mut writer);
    assert!(status.success(), "{status:?}");
    e2e.net.stop();
}

/// A repo that stops being tracked while it is queued or being fetched is not repaired while
/// untracked: S1 is taken out of the study users (SIGHUP) while its backfill's `getRepo` is
/// held; when the fetch comes back nothing of it is applied (`untracked`) and the entry stays
/// queued, parked. Back in the study-user file (SIGHUP), S1 is fetched and backfilled then.
#[test]
fn a_repair_of_a_repo_no_longer_tracked_is_parked_until_it_is_tracked_again() {
    let Some(e2e) = E2e::start() else { return };
    let (s1, s2) = (e2e.did("S1"), e2e.did("S2"));
    let xrpc = e2e.rt.block_on(XrpcProxy::start(&e2e.net.pds_url)).unwrap();
    let docs = e2e.did_docs(&xrpc.url());
    xrpc.hold(GET_REPO, Some(&s1));
    let port = workspace_tests::s3::free_port();
    let mut writer = e2e.writer("writer", port, &["--did-docs", docs.to_str().unwrap()]);
    e2e.wait_running(&mut writer, "S1's getRepo held", || xrpc.holding() >= 1);
    e2e.wait_running(&mut writer, "S2's backfill applied", || {
        metric(port, &["firehose_repairs_completed_total", "backfill"]).unwrap_or(0.0) >= 1.0
    });
    let reload = |study: &str, reloads: f64, writer: &mut Proc| {
        std::fs::write(e2e.work.join("study.txt"), study).unwrap();
        // SAFETY: signalling the child we started.
        unsafe {
            libc::kill(writer.pid() as i32, libc::SIGHUP);
        }
        e2e.wait_running(writer, "the reload", || {
            metric(port, &["firehose_tracked_set_reloads_total"]).unwrap_or(0.0) >= reloads
        });
    };
    reload(&format!("{s2}\n"), 1.0, &mut writer);
    xrpc.release();
    e2e.wait_running(&mut writer, "S1's repair parked", || {
        metric(port, &["firehose_repair_failures_total", "untracked"]).unwrap_or(0.0) >= 1.0
    });
    let health = || {
        let (_, body) = workspace_tests::s3::http(port, "GET", "/health").ok()?;
        let start = body.find('{')?;
        serde_json::from_str::<serde_json::Value>(&body[start..=body.rfind('}')?]).ok()
    };
    // Parked: not counted in the queue depth, but still queued in the state.
    e2e.wait_running(&mut writer, "nothing in flight, nothing counted", || {
        health().is_some_and(|h| h["repairs_in_flight"] == 0 && h["resync_queue_depth"] == 0)
    });
    let queued = |did: &str| -> bool {
        let c = rusqlite::Connection::open_with_flags(
            e2e.state(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        c.query_row(
            "SELECT count(*) FROM repo_work WHERE did = ?1",
            [did],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            > 0
    };
    // (A dropped entry would leave the state with the next commit, within half a second.)
    std::thread::sleep(Duration::from_secs(2));
    assert!(writer.alive());
    assert!(queued(&s1), "S1's entry left the state");
    assert_eq!(
        metric(port, &["firehose_repairs_completed_total", "backfill"]),
        Some(1.0),
        "S2's backfill only"
    );
    // Tracked again: the parked entry is fetched and applied.
    reload(&format!("{s1}\n{s2}\n"), 2.0, &mut writer);
    e2e.wait_running(&mut writer, "S1's backfill applied", || {
        metric(port, &["firehose_repairs_completed_total", "backfill"]).unwrap_or(0.0) >= 2.0
    });
    e2e.wait_running(&mut writer, "an empty queue", || {
        health().is_some_and(|h| h["repairs_in_flight"] == 0 && h["resync_queue_depth"] == 0)
    });
    let status = sigterm(&mut writer);
    assert!(status.success(), "{status:?}");
    e2e.net.stop();
}
