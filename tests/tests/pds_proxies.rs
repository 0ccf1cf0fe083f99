//! The gap-free test infrastructure against the official PDS, without the writer: the
//! `gapfree` driver scenario, the gap proxy (drop and forge frames of the PDS's real firehose,
//! as a client of the test relay sees them), the XRPC proxy (429 then forward) with the DID
//! documents pointing at it (and holding a request), a key rotation published on the PLC, and
//! the load commands (more accounts, bulk posts). One network serves every part (a PDS start
//! costs tens of seconds on this machine).
//!
//! Needs `tests/setup.sh` (Node 22, `@atproto/dev-env`); `SYNC_SKIP_PDS=1` skips it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use sync_core::crypto::PublicKey;
use sync_core::did_doc::parse_did_document;
use sync_core::frame::{decode_frame, Event};
use sync_core::ids::Did;
use sync_core::repo::{read_repo, DEFAULT_MAX_REPO_BYTES};
use sync_core::verify::{verify_commit, VerifyOptions};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use workspace_tests::gap_proxy::{forge_commit, Fate, FrameInfo, GapProxy, Rule};
use workspace_tests::pds::{self, Gapfree};
use workspace_tests::relay::frame_seq;
use workspace_tests::xrpc_proxy::{
    did_docs_with_pds, fetch_did_document, http_get, XrpcProxy, GET_REPO,
};

const WAIT: Duration = Duration::from_secs(60);

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A subscriber of the gap proxy's relay: every binary frame it receives, in order.
struct Client {
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    /// Frames received so far, by seq.
    by_seq: BTreeMap<i64, Vec<u8>>,
    /// Seqs in the order received.
    order: Vec<i64>,
}

impl Client {
    async fn connect(url: &str) -> Client {
        let (ws, _) = connect_async(url).await.expect("connect to the gap proxy");
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Binary(b) = msg {
                    if tx.send(b.to_vec()).is_err() {
                        break;
                    }
                }
            }
        });
        Client {
            frames,
            by_seq: BTreeMap::new(),
            order: Vec::new(),
        }
    }

    /// The next frame, whatever it is.
    async fn next(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, self.frames.recv())
            .await
            .expect("no frame")
            .expect("the relay connection ended")
    }

    /// Receives until a frame with seq >= `seq` arrived.
    async fn until_seq(&mut self, seq: i64) {
        while self.order.last().is_none_or(|&s| s < seq) {
            let frame = tokio::time::timeout(WAIT, self.frames.recv())
                .await
                .unwrap_or_else(|_| panic!("no frame up to seq {seq}; got {:?}", self.order))
                .expect("the relay connection ended");
            let s = frame_seq(&frame).expect("frames of the PDS have seqs");
            self.order.push(s);
            self.by_seq.insert(s, frame);
        }
    }
}

/// The `#atproto` key of `did` on the PLC now.
async fn plc_key(plc_url: &str, did: &str) -> PublicKey {
    let doc = fetch_did_document(plc_url, did)
        .await
        .expect("PLC document");
    parse_did_document(&Did::parse(did).unwrap(), &doc)
        .unwrap_or_else(|e| panic!("document of {did}: {e}: {doc}"))
        .signing_key
}

/// `Ok(())` or the verifier's reason for a `#commit` frame.
fn verify(frame: &[u8], key: &PublicKey) -> Result<(), &'static str> {
    let Ok(Event::Commit(commit)) = decode_frame(frame) else {
        panic!("not a commit frame")
    };
    verify_commit(&commit, key, &VerifyOptions::at(now_micros()))
        .map(|_| ())
        .map_err(|e| e.reason())
}

#[test]
fn gapfree_infrastructure_against_the_official_pds() {
    let Some(toolchain) = pds::toolchain_or_skip() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let rt = Runtime::new().unwrap();
    let mut net = Gapfree::start(&toolchain, work.path());
    let (s1, s2, a1, a2) = (
        net.did("S1").to_owned(),
        net.did("S2").to_owned(),
        net.did("A1").to_owned(),
        net.did("A2").to_owned(),
    );

    // The ready line: the pre-start records, each with the commit that made it.
    for name in [
        "s1_old1",
        "s1_old2",
        "s1_recent",
        "a1_old",
        "s1_like_a1",
        "s1_follow_a1",
        "s2_post",
    ] {
        let r = net.record(name);
        assert!(r.seq <= net.last_seq, "{name}: {r:?}");
        assert_eq!(
            r.uri,
            format!("at://{}/{}/{}", r.author, r.collection, r.rkey)
        );
    }
    assert_eq!(net.record("s1_old1").created_at, "2024-01-10T12:00:00.000Z");
    assert_eq!(
        net.record("s1_follow_a1").collection,
        "app.bsky.graph.follow"
    );
    assert_eq!(net.record("s2_post").author, s2);

    // ---- the gap proxy over the PDS's firehose -------------------------------------------
    let proxy = rt
        .block_on(GapProxy::start(&net.ws, Some(0)))
        .expect("subscribe to the PDS");
    assert!(rt.block_on(proxy.wait_for_upstream_seq(net.last_seq, WAIT)));
    // A live subscriber from after the pre-start records, as a writer started with that cursor.
    let mut live = rt.block_on(Client::connect(
        &proxy.relay().url_with_cursor(net.last_seq),
    ));

    // S1's next commit is dropped (a relay that skipped it); the one after is replaced by a
    // forged commit (another key) in the same seq.
    proxy.add_rule(Rule::drop_next_commits(&s1, 1));
    let dropped = net.post("S1", "s1_gap_post", "a post the relay skips");
    let forged_did = s1.clone();
    proxy.add_rule(Rule::replace_next_commit(&s1, move |info| {
        vec![forge_commit(&forged_did, info.seq.unwrap(), "forged")]
    }));
    let replaced = net.delete("S1", "s1_old2");
    assert!(
        proxy.pending_rules().is_empty(),
        "{:?}",
        proxy.pending_rules()
    );
    let like = net.like("A2", "a2_like", "s1_old1");
    let a1_post = net.post("A1", "a1_new", "in-network through the follow graph");
    let after = net.post("S1", "s1_after_gap", "the commit that reveals the gap");
    assert_eq!(like.commit.repo, a2);
    assert_eq!(a1_post.commit.repo, a1);
    assert_eq!(
        after.commit.since.as_deref(),
        Some(replaced.commit.rev.as_str())
    );
    let last = after.commit.seq;
    rt.block_on(live.until_seq(last));

    // The subscriber got every frame after the cursor but the dropped one, in seq order.
    let expected: Vec<i64> = (net.last_seq + 1..=last)
        .filter(|&s| s != dropped.commit.seq)
        .collect();
    assert_eq!(live.order, expected);
    assert_eq!(
        proxy.dropped(),
        vec![FrameInfo {
            seq: Some(dropped.commit.seq),
            kind: "commit".into(),
            did: Some(s1.clone()),
            rev: Some(dropped.commit.rev.clone()),
            time: Some(dropped.commit.time.clone()),
            ops: vec![format!("create app.bsky.feed.post/{}", dropped.record.rkey)],
        }]
    );
    // The replaced seq carries the forgery: S1's DID, a newer rev, one post, not the delete.
    let forged = FrameInfo::of(&live.by_seq[&replaced.commit.seq]);
    assert!(forged.is_commit_of(&s1), "{forged:?}");
    assert!(forged.rev.as_deref() > Some(replaced.commit.rev.as_str()));
    assert!(forged.ops[0].starts_with("create app.bsky.feed.post/"));
    match &proxy.replaced()[..] {
        [h] => {
            assert_eq!(h.info.seq, Some(replaced.commit.seq));
            assert_eq!(
                h.info.ops,
                vec![format!("delete {}", replaced.commit.ops[0].path)]
            );
            assert!(
                matches!(&h.fate, Fate::Replaced { with, .. } if with == &vec![forged.clone()])
            );
        }
        other => panic!("replaced: {other:?}"),
    }
    // Against S1's PLC key the real commits verify and the forgery is a bad signature.
    let key = rt.block_on(plc_key(&net.plc_url, &s1));
    assert_eq!(key.to_did_key(), net.accounts["S1"].signing_key);
    assert_eq!(verify(&live.by_seq[&after.commit.seq], &key), Ok(()));
    assert_eq!(
        verify(&live.by_seq[&replaced.commit.seq], &key),
        Err("bad_signature")
    );
    // A later subscriber from the same cursor gets the same frames (the relay's replay).
    let mut replay = rt.block_on(Client::connect(
        &proxy.relay().url_with_cursor(net.last_seq),
    ));
    rt.block_on(replay.until_seq(last));
    assert_eq!(replay.order, live.order);
    assert_eq!(replay.by_seq, live.by_seq);

    // ---- the XRPC proxy: 429 twice, then the PDS's answer --------------------------------
    let xrpc = rt.block_on(XrpcProxy::start(&net.pds_url)).unwrap();
    xrpc.throttle(GET_REPO, 2, Duration::from_secs(1));
    let url = format!("{}/xrpc/{GET_REPO}?did={s1}", xrpc.url());
    let mut statuses = Vec::new();
    let car = loop {
        let response = rt.block_on(http_get(&url)).unwrap();
        statuses.push(response.status);
        if response.status != 429 {
            assert_eq!(response.status, 200, "{response:?}");
            break response.body;
        }
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
        let reset: u64 = response.header("ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset * 1_000_000 >= now_micros(), "{response:?}");
        // This test is the client here: it honours Retry-After.
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(statuses, [429, 429, 200]);
    let gets = xrpc.requests_for(GET_REPO);
    assert_eq!(
        gets.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 429, 200]
    );
    assert_eq!(gets[0].param("did").as_deref(), Some(s1.as_str()));
    assert_eq!(gets[0].retry_after, Some(Duration::from_secs(1)));
    for pair in gets.windows(2) {
        assert!(
            pair[1].at >= pair[0].answered + Duration::from_secs(1),
            "{gets:?}"
        );
    }
    // The forwarded answer is S1's real repo: signed by its key, with the records made so far
    // (the delete of s1_old2 included, whatever the proxy showed the subscriber).
    let repo = read_repo(
        &car,
        &Did::parse(&s1).unwrap(),
        &key,
        &VerifyOptions::at(now_micros()),
        DEFAULT_MAX_REPO_BYTES,
    )
    .expect("S1's repo verifies");
    let rkeys: Vec<&str> = repo.records.iter().map(|r| r.rkey.as_str()).collect();
    for name in [
        "s1_old1",
        "s1_recent",
        "s1_gap_post",
        "s1_after_gap",
        "s1_like_a1",
    ] {
        assert!(
            rkeys.contains(&net.record(name).rkey.as_str()),
            "{name}: {rkeys:?}"
        );
    }
    assert!(!rkeys.contains(&net.record("s1_old2").rkey.as_str()));
    // A held request is answered only after the release.
    xrpc.hold(GET_REPO, Some(&s2));
    let held_url = format!("{}/xrpc/{GET_REPO}?did={s2}", xrpc.url());
    let held = rt.spawn(async move { http_get(&held_url).await });
    assert!(rt.block_on(xrpc.wait_for_holding(1, WAIT)));
    assert!(xrpc.requests_for_did(GET_REPO, &s2).is_empty());
    assert!(!held.is_finished());
    xrpc.release();
    let response = rt.block_on(held).unwrap().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(xrpc.holding(), 0);
    assert_eq!(xrpc.requests_for_did(GET_REPO, &s2).len(), 1);
    // The DID documents for --did-docs: real ones, with the proxy as the PDS.
    let docs = rt
        .block_on(did_docs_with_pds(&net.plc_url, &[&s1, &s2], &xrpc.url()))
        .unwrap();
    for did in [&s1, &s2] {
        let id = parse_did_document(&Did::parse(did).unwrap(), &docs[did.as_str()]).unwrap();
        assert_eq!(id.pds_endpoint.as_deref(), Some(xrpc.url().as_str()));
    }

    // ---- a key rotation: on the PLC, an #identity event, later commits signed with it ----
    let rotation = net.rotate_key("S1");
    assert_eq!(rotation.did, s1);
    assert_ne!(rotation.new_key, rotation.old_key);
    assert_eq!(rotation.old_key, net.accounts["S1"].signing_key);
    let new_key = rt.block_on(plc_key(&net.plc_url, &s1));
    assert_eq!(new_key.to_did_key(), rotation.new_key);
    let post = net.post("S1", "s1_rotated", "signed with the new key");
    assert_eq!(post.commit.signing_key, rotation.new_key);
    rt.block_on(live.until_seq(post.commit.seq));
    let identity = FrameInfo::of(&live.by_seq[&rotation.identity.seq]);
    assert_eq!(identity.kind, "identity");
    assert_eq!(identity.did.as_deref(), Some(s1.as_str()));
    let frame = &live.by_seq[&post.commit.seq];
    assert_eq!(verify(frame, &new_key), Ok(()));
    assert_eq!(verify(frame, &key), Err("bad_signature"));

    // An injected frame (an #info notice, no seq) follows what was forwarded.
    proxy.inject(sync_core::synth::info_frame(
        "OutdatedCursor",
        Some("injected by the test"),
    ));
    let notice = rt.block_on(live.next());
    assert_eq!(FrameInfo::of(&notice).kind, "info:OutdatedCursor");
    assert_eq!(proxy.report().last().unwrap().fate, Fate::Injected);
    assert_eq!(proxy.served_seqs().last(), Some(&None));

    // Load for benchmarks: more accounts, and a repo of 250 posts in two commits.
    let more = net.add_accounts("B", 2);
    assert_eq!(more.keys().collect::<Vec<_>>(), ["B1", "B2"]);
    let bulk = net.bulk("B1", 250);
    assert_eq!((bulk.count, bulk.did.as_str()), (250, net.did("B1")));
    assert_eq!(bulk.commit.since.as_deref(), Some(bulk.first_rev.as_str()));
    let car = rt
        .block_on(http_get(&format!(
            "{}/xrpc/{GET_REPO}?did={}",
            net.pds_url, bulk.did
        )))
        .unwrap();
    let b1_key = rt.block_on(plc_key(&net.plc_url, &bulk.did));
    let b1_repo = read_repo(
        &car.body,
        &Did::parse(&bulk.did).unwrap(),
        &b1_key,
        &VerifyOptions::at(now_micros()),
        DEFAULT_MAX_REPO_BYTES,
    )
    .expect("B1's repo verifies");
    assert_eq!(b1_repo.records.len(), 250);

    assert_eq!(proxy.upstream_connections(), 1);
    rt.block_on(xrpc.shutdown());
    rt.block_on(proxy.shutdown());
    net.stop();
}
