//! The network layer against real HTTP servers on 127.0.0.1: identity resolution (did:plc from
//! a fake PLC directory, did:web, the `--did-docs` file, the SQLite cache and its TTL, the
//! negative cache, refresh after a key rotation, hostile DIDs) and `getRepo` (a signed synthetic
//! repo verified and listed, bad signature, missing block, 429 pauses, per-host concurrency and
//! rate, retries, the size limit).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use firehose_writer::identity::{
    load_did_docs, IdentityConfig, IdentityError, IdentityInitError, IdentityResolver,
};
use firehose_writer::net::{build_client, HttpConfig, UrlError};
use firehose_writer::pds::{PdsClient, PdsConfig, PdsError};
use futures_util::StreamExt as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sync_core::did_doc::{parse_did_document, AtprotoIdentity};
use sync_core::ids::{Did, Tid};
use sync_core::synth::SynthRepo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ------------------------------------------------------------------------------------------
// A programmable HTTP/1.1 server on 127.0.0.1
// ------------------------------------------------------------------------------------------

/// One canned answer.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Sent in chunks of this size without `Content-Length` (chunked encoding).
    chunked: Option<usize>,
    /// Held this long before answering (counted as in flight).
    delay: Duration,
    /// Sends only this many body bytes, then neither more nor the end (a stalled download).
    stall_after: Option<usize>,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            chunked: None,
            delay: Duration::ZERO,
            stall_after: None,
        }
    }
    fn json(value: &Value) -> Reply {
        Reply {
            body: value.to_string().into_bytes(),
            ..Reply::status(200)
        }
    }
    fn bytes(body: Vec<u8>) -> Reply {
        Reply {
            body,
            ..Reply::status(200)
        }
    }
    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }
    fn chunked(mut self, size: usize) -> Reply {
        self.chunked = Some(size);
        self
    }
    fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
    fn stalled_after(mut self, bytes: usize) -> Reply {
        self.stall_after = Some(bytes);
        self
    }
}

/// A request the server saw.
#[derive(Clone, Debug)]
struct Seen {
    /// Path and query.
    target: String,
    at: Instant,
}

#[derive(Default)]
struct ServerState {
    /// Path-and-query → answers in order; the last one repeats. Anything else is a 404.
    routes: Mutex<HashMap<String, VecDeque<Reply>>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct TestServer {
    port: u16,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

impl TestServer {
    async fn start() -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ServerState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { port, state, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers `target` (path and query) with `replies` in order, the last one repeating.
    fn route(&self, target: &str, replies: Vec<Reply>) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(target.to_owned(), replies.into());
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn answer(state: &ServerState, req: Request<Incoming>) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    state.seen.lock().unwrap().push(Seen {
        target: target.clone(),
        at: Instant::now(),
    });
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = {
        let mut routes = state.routes.lock().unwrap();
        match routes.get_mut(&target) {
            Some(queue) if queue.len() > 1 => queue.pop_front().unwrap(),
            Some(queue) => queue.front().cloned().unwrap_or(Reply::status(404)),
            None => Reply::status(404),
        }
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut builder = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        builder = builder.header(*name, value);
    }
    if let Some(n) = reply.stall_after {
        let first: Result<Frame<Bytes>, std::io::Error> =
            Ok(Frame::data(Bytes::copy_from_slice(&reply.body[..n])));
        let stream = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
        return builder
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap();
    }
    let body: Body = match reply.chunked {
        None => Full::new(Bytes::from(reply.body))
            .map_err(|never| match never {})
            .boxed(),
        Some(size) => {
            let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = reply
                .body
                .chunks(size.max(1))
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)))
        }
    };
    builder.body(body).unwrap()
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// A did:plc with a valid 24-character base32 identifier.
fn plc_did(tag: &str) -> String {
    format!("did:plc:{tag:a<24}")
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn client() -> reqwest::Client {
    build_client(&HttpConfig::default()).unwrap()
}

fn config(plc: &str) -> IdentityConfig {
    IdentityConfig {
        plc_url: plc.to_owned(),
        allow_loopback: true,
        ..IdentityConfig::default()
    }
}

/// A resolver whose circuit breaker opens after `failures` and cools down for `cooldown_ms`.
fn breaker_resolver(plc_url: &str, failures: u32, cooldown_ms: u64) -> IdentityResolver {
    let config = IdentityConfig {
        breaker_failures: failures,
        breaker_cooldown: Duration::from_millis(cooldown_ms),
        ..config(plc_url)
    };
    IdentityResolver::new(client(), config, HashMap::new(), None).unwrap()
}

fn resolver(plc: &TestServer, state: Option<&std::path::Path>) -> IdentityResolver {
    IdentityResolver::new(client(), config(&plc.url()), HashMap::new(), state).unwrap()
}

/// A repo with `n` posts and a follow; returns it with its expected `(collection, rkey, cid)`.
fn synth_repo(did: &str, secret: u8, n: usize) -> (SynthRepo, BTreeSet<(String, String, String)>) {
    let mut repo = SynthRepo::new(did, [secret; 32]);
    let mut expected = BTreeSet::new();
    let base = now_micros() - 3_600_000_000;
    for i in 0..n {
        let rkey = Tid::from_u64((base + i as u64) << 10).to_string();
        let cid = repo.put(
            "app.bsky.feed.post",
            &rkey,
            json!({"$type": "app.bsky.feed.post", "text": format!("post {i}"),
                   "createdAt": "2026-03-01T12:00:00.000Z"}),
        );
        expected.insert(("app.bsky.feed.post".into(), rkey, cid.to_string()));
    }
    let cid = repo.put(
        "app.bsky.graph.follow",
        "3kfollow22222",
        json!({"$type": "app.bsky.graph.follow", "subject": plc_did("friend"),
               "createdAt": "2026-03-01T12:00:00.000Z"}),
    );
    expected.insert((
        "app.bsky.graph.follow".into(),
        "3kfollow22222".into(),
        cid.to_string(),
    ));
    (repo, expected)
}

fn identity_of(repo: &SynthRepo, pds: &str) -> AtprotoIdentity {
    parse_did_document(&repo.did(), &repo.did_document(pds)).unwrap()
}

fn get_repo_target(did: &str) -> String {
    format!(
        "/xrpc/com.atproto.sync.getRepo?did={}",
        did.replace(':', "%3A")
    )
}

fn pds_config() -> PdsConfig {
    PdsConfig {
        allow_loopback: true,
        rate_per_host: 1000.0,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        ..PdsConfig::default()
    }
}

fn listed(repo: &sync_core::repo::VerifiedRepo) -> BTreeSet<(String, String, String)> {
    repo.records
        .iter()
        .map(|r| {
            (
                r.collection.as_str().to_owned(),
                r.rkey.as_str().to_owned(),
                r.cid.to_string(),
            )
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Identity
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plc_resolution_is_cached_in_memory_and_sqlite_with_a_ttl() {
    let plc = TestServer::start().await;
    let pds = "https://pds.example.com";
    let did_str = plc_did("alice");
    let (repo, _) = synth_repo(&did_str, 3, 1);
    plc.route(
        &format!("/{did_str}"),
        vec![Reply::json(&repo.did_document(pds))],
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.sqlite");
    let did = Did::parse(&did_str).unwrap();

    let first = resolver(&plc, Some(&state));
    assert!(first.cached(&did).is_none());
    let identity = first.resolve(&did).await.unwrap();
    assert_eq!(identity.signing_key, repo.public_key());
    assert_eq!(identity.pds_endpoint.as_deref(), Some(pds));
    assert_eq!(plc.requests(), 1);
    assert_eq!(plc.seen()[0].target, format!("/{did_str}"));
    // Memory: no second request, and the hot path sees it without I/O.
    first.resolve(&did).await.unwrap();
    assert_eq!(first.cached(&did).unwrap().signing_key, repo.public_key());
    assert_eq!(plc.requests(), 1);
    assert_eq!(first.stats().fetches.load(Ordering::Relaxed), 1);
    assert!(first.stats().hits_memory.load(Ordering::Relaxed) >= 1);

    // A new resolver on the same file (a restart): SQLite answers, no request.
    let second = resolver(&plc, Some(&state));
    assert!(second.cached(&did).is_none(), "memory starts empty");
    assert_eq!(
        second.resolve(&did).await.unwrap().signing_key,
        repo.public_key()
    );
    assert_eq!(plc.requests(), 1);
    assert_eq!(second.stats().hits_sqlite.load(Ordering::Relaxed), 1);
    assert_eq!(second.stats().misses.load(Ordering::Relaxed), 0);

    // The row ages past the 24 h TTL: the next resolver fetches again.
    let conn = rusqlite::Connection::open(&state).unwrap();
    conn.execute(
        "UPDATE identity_cache SET fetched_at = fetched_at - 25 * 3600",
        [],
    )
    .unwrap();
    let third = resolver(&plc, Some(&state));
    third.resolve(&did).await.unwrap();
    assert_eq!(plc.requests(), 2);
    assert_eq!(third.stats().misses.load(Ordering::Relaxed), 1);
    // The fetch rewrote the row with a fresh time: a fourth resolver asks nobody.
    let fourth = resolver(&plc, Some(&state));
    fourth.resolve(&did).await.unwrap();
    assert_eq!(plc.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ttl_expiry_refetches() {
    let plc = TestServer::start().await;
    let did_str = plc_did("ttl");
    let (repo, _) = synth_repo(&did_str, 3, 1);
    plc.route(
        &format!("/{did_str}"),
        vec![Reply::json(&repo.did_document("https://pds.example.com"))],
    );
    let resolver = IdentityResolver::new(
        client(),
        IdentityConfig {
            ttl: Duration::ZERO,
            ..config(&plc.url())
        },
        HashMap::new(),
        None,
    )
    .unwrap();
    let did = Did::parse(&did_str).unwrap();
    resolver.resolve(&did).await.unwrap();
    assert!(resolver.cached(&did).is_none(), "expired at once");
    resolver.resolve(&did).await.unwrap();
    assert_eq!(plc.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_directory_opens_the_circuit_breaker_and_a_probe_closes_it() {
    let plc = TestServer::start().await;
    let did = |tag: &str| Did::parse(&plc_did(tag)).unwrap();
    for tag in ["downa", "downb", "downc", "downd", "late"] {
        plc.route(&format!("/{}", did(tag)), vec![Reply::status(503)]);
    }
    let resolver = breaker_resolver(&plc.url(), 3, 400);
    // Answers about a DID (404) say the directory works: they never open it.
    for tag in ["gonea", "goneb", "gonec", "goned"] {
        assert_eq!(
            resolver.resolve(&did(tag)).await.unwrap_err(),
            IdentityError::NotFound
        );
    }
    assert_eq!(resolver.hosts_refused(), 0);
    // Three server errors in a row open it: the next lookup of another DID fails at once.
    for tag in ["downa", "downb", "downc"] {
        assert_eq!(
            resolver.resolve(&did(tag)).await.unwrap_err(),
            IdentityError::HttpStatus(503)
        );
    }
    assert_eq!(plc.requests(), 7);
    let refused = resolver.resolve(&did("late")).await.unwrap_err();
    assert_eq!(refused.reason(), "circuit_open", "{refused}");
    assert_eq!(plc.requests(), 7, "not asked");
    assert_eq!(resolver.hosts_refused(), 1);
    let stats = resolver.stats();
    assert_eq!(stats.breaker_opened.load(Ordering::Relaxed), 1);
    assert_eq!(stats.errors_circuit_open.load(Ordering::Relaxed), 1);
    // The refused DID was not put into backoff: once the directory works again, it resolves.
    let (repo, _) = synth_repo(&plc_did("late"), 9, 1);
    plc.route(
        &format!("/{}", did("late")),
        vec![Reply::json(&repo.did_document("https://pds.example.com"))],
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let identity = resolver.resolve(&did("late")).await.unwrap();
    assert_eq!(identity.signing_key, repo.public_key());
    assert_eq!(plc.requests(), 8, "one probe");
    assert_eq!(resolver.hosts_refused(), 0, "closed by the answer");
    // Closed means counting from zero again: one more failure is just that failure.
    assert_eq!(
        resolver.resolve(&did("downd")).await.unwrap_err(),
        IdentityError::HttpStatus(503)
    );
    assert_eq!(plc.requests(), 9);
    assert_eq!(resolver.hosts_refused(), 0);
}

/// Lookups let through before the breaker opened that fail after it (repair fetches and the
/// processor run many at once) are the same outage: it opens once, for the first cooldown, not
/// once per late failure for ever longer. A 429 is the host pacing us, not an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_open_the_breaker_once_and_rate_limits_do_not_open_it() {
    let plc = TestServer::start().await;
    let did = |tag: &str| Did::parse(&plc_did(tag)).unwrap();
    let tags = ["conca", "concb", "concc", "concd", "conce", "concf"];
    for tag in tags {
        plc.route(
            &format!("/{}", did(tag)),
            vec![Reply::status(503).delayed(Duration::from_millis(300))],
        );
    }
    let resolver = breaker_resolver(&plc.url(), 3, 500);
    let lookups: Vec<_> = tags
        .iter()
        .map(|tag| {
            let (resolver, did) = (resolver.clone(), did(tag));
            tokio::spawn(async move { resolver.resolve(&did).await })
        })
        .collect();
    for lookup in lookups {
        assert_eq!(
            lookup.await.unwrap().unwrap_err(),
            IdentityError::HttpStatus(503)
        );
    }
    assert_eq!(
        plc.requests(),
        6,
        "all six were let through before it opened"
    );
    assert_eq!(resolver.stats().breaker_opened.load(Ordering::Relaxed), 1);
    // Open for the first cooldown only: a probe goes through after it.
    let (repo, _) = synth_repo(&plc_did("probe"), 7, 1);
    plc.route(
        &format!("/{}", did("probe")),
        vec![Reply::json(&repo.did_document("https://pds.example.com"))],
    );
    tokio::time::sleep(Duration::from_millis(550)).await;
    resolver.resolve(&did("probe")).await.unwrap();
    assert_eq!(resolver.hosts_refused(), 0);

    // Rate-limited answers, however many, leave it closed.
    let paced = TestServer::start().await;
    let resolver = breaker_resolver(&paced.url(), 3, 500);
    for tag in ["pacea", "paceb", "pacec", "paced"] {
        paced.route(&format!("/{}", did(tag)), vec![Reply::status(429)]);
        assert_eq!(
            resolver.resolve(&did(tag)).await.unwrap_err(),
            IdentityError::HttpStatus(429)
        );
    }
    assert_eq!(resolver.hosts_refused(), 0);
    assert_eq!(resolver.stats().breaker_opened.load(Ordering::Relaxed), 0);
    // Nor do they reset the count of real failures between them: 503, 429, 503, 429, 503 opens.
    for (tag, status) in [
        ("mixa", 503),
        ("mixb", 429),
        ("mixc", 503),
        ("mixd", 429),
        ("mixe", 503),
    ] {
        paced.route(&format!("/{}", did(tag)), vec![Reply::status(status)]);
        assert_eq!(
            resolver.resolve(&did(tag)).await.unwrap_err(),
            IdentityError::HttpStatus(status)
        );
    }
    assert_eq!(resolver.hosts_refused(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_opens_the_breaker_again_for_longer() {
    let plc = TestServer::start().await;
    let did = |tag: &str| Did::parse(&plc_did(tag)).unwrap();
    for tag in ["downa", "downb", "probe", "after"] {
        plc.route(&format!("/{}", did(tag)), vec![Reply::status(502)]);
    }
    let resolver = breaker_resolver(&plc.url(), 2, 500);
    for tag in ["downa", "downb"] {
        resolver.resolve(&did(tag)).await.unwrap_err();
    }
    tokio::time::sleep(Duration::from_millis(550)).await;
    // The probe fails: open again, now for twice the cooldown.
    assert_eq!(
        resolver.resolve(&did("probe")).await.unwrap_err(),
        IdentityError::HttpStatus(502)
    );
    assert_eq!(plc.requests(), 3);
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(
        resolver.resolve(&did("after")).await.unwrap_err().reason(),
        "circuit_open",
        "the second cooldown is twice the first"
    );
    assert_eq!(plc.requests(), 3);
    assert_eq!(resolver.stats().breaker_opened.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn did_web_resolves_from_well_known() {
    let web = TestServer::start().await;
    let did_str = format!("did:web:localhost%3A{}", web.port);
    let (repo, _) = synth_repo(&did_str, 5, 1);
    web.route(
        "/.well-known/did.json",
        vec![Reply::json(&repo.did_document("https://pds.example.com"))],
    );
    // The PLC is never asked for a did:web.
    let plc = TestServer::start().await;
    let resolver = resolver(&plc, None);
    let identity = resolver
        .resolve(&Did::parse(&did_str).unwrap())
        .await
        .unwrap();
    assert_eq!(identity.signing_key, repo.public_key());
    assert_eq!(web.requests(), 1);
    assert_eq!(plc.requests(), 0);
    // Not a loopback host: https.
    let url = resolver
        .document_url(&Did::parse("did:web:example.com%3A8443").unwrap())
        .unwrap();
    assert_eq!(
        url.as_str(),
        "https://example.com:8443/.well-known/did.json"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn did_docs_file_wins_without_network() {
    let plc = TestServer::start().await;
    let did_str = plc_did("filed");
    let bad_str = plc_did("badfiled");
    let (in_file, _) = synth_repo(&did_str, 7, 1);
    let (on_plc, _) = synth_repo(&did_str, 8, 1);
    plc.route(
        &format!("/{did_str}"),
        vec![Reply::json(&on_plc.did_document("https://pds.example.com"))],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("did_docs.json");
    let mut map = serde_json::Map::new();
    map.insert(
        did_str.clone(),
        in_file.did_document("https://pds.example.com"),
    );
    map.insert(
        bad_str.clone(),
        json!({"id": bad_str.clone(), "verificationMethod": []}),
    );
    std::fs::write(&file, Value::Object(map).to_string()).unwrap();
    let docs = load_did_docs(&file).unwrap();
    let resolver = IdentityResolver::new(client(), config(&plc.url()), docs, None).unwrap();
    let did = Did::parse(&did_str).unwrap();
    assert_eq!(
        resolver.cached(&did).unwrap().signing_key,
        in_file.public_key()
    );
    assert_eq!(
        resolver.resolve(&did).await.unwrap().signing_key,
        in_file.public_key()
    );
    // Even a refresh keeps to the file.
    assert_eq!(
        resolver.refresh(&did).await.unwrap().signing_key,
        in_file.public_key()
    );
    // A document the file has but cannot use is an error, not a reason to ask the network.
    let bad = resolver.resolve(&Did::parse(&bad_str).unwrap()).await;
    assert_eq!(bad.unwrap_err().reason(), "invalid_document");
    assert_eq!(plc.requests(), 0);
    assert!(resolver.stats().hits_did_docs.load(Ordering::Relaxed) >= 4);
    // A file that is not a DID map fails clearly.
    std::fs::write(&file, "[1, 2]").unwrap();
    assert!(matches!(
        load_did_docs(&file),
        Err(IdentityInitError::DidDocs { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_back_off_without_requests() {
    let plc = TestServer::start().await;
    let missing = Did::parse(&plc_did("missing")).unwrap();
    let broken = Did::parse(&plc_did("broken")).unwrap();
    let garbage = Did::parse(&plc_did("garbage")).unwrap();
    plc.route(&format!("/{broken}"), vec![Reply::status(503)]);
    plc.route(
        &format!("/{garbage}"),
        vec![Reply::bytes(b"{not json".to_vec())],
    );
    let resolver = IdentityResolver::new(
        client(),
        IdentityConfig {
            backoff_initial: Duration::from_millis(300),
            ..config(&plc.url())
        },
        HashMap::new(),
        None,
    )
    .unwrap();

    let err = resolver.resolve(&missing).await.unwrap_err();
    assert_eq!(err, IdentityError::NotFound);
    assert_eq!(err.reason(), "not_found");
    assert_eq!(plc.requests(), 1);
    // In backoff: the cached error at once, no request.
    let again = resolver.resolve(&missing).await.unwrap_err();
    assert_eq!(again.reason(), "backoff");
    assert_eq!(again.root(), &IdentityError::NotFound);
    assert_eq!(plc.requests(), 1);

    assert_eq!(
        resolver.resolve(&broken).await.unwrap_err(),
        IdentityError::HttpStatus(503)
    );
    assert_eq!(
        resolver.resolve(&garbage).await.unwrap_err().reason(),
        "invalid_document"
    );
    assert_eq!(plc.requests(), 3);
    assert_eq!(
        resolver.resolve(&garbage).await.unwrap_err().reason(),
        "backoff"
    );
    assert_eq!(plc.requests(), 3);

    let stats = resolver.stats();
    assert_eq!(stats.errors_not_found.load(Ordering::Relaxed), 1);
    assert_eq!(stats.errors_http_status.load(Ordering::Relaxed), 1);
    assert_eq!(stats.errors_invalid_document.load(Ordering::Relaxed), 1);
    assert_eq!(stats.errors_backoff.load(Ordering::Relaxed), 2);

    // After the backoff the DID is asked again, and a second failure waits longer.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        resolver.resolve(&missing).await.unwrap_err(),
        IdentityError::NotFound
    );
    assert_eq!(plc.requests(), 4);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        resolver.resolve(&missing).await.unwrap_err().reason(),
        "backoff",
        "the second wait is twice the first"
    );
    assert_eq!(plc.requests(), 4);

    // A directory that does not answer at all is a network error.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let offline = IdentityResolver::new(
        client(),
        config(&format!("http://127.0.0.1:{dead}")),
        HashMap::new(),
        None,
    )
    .unwrap();
    assert_eq!(
        offline.resolve(&missing).await.unwrap_err().reason(),
        "network"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_picks_up_a_rotated_key_at_most_once_a_minute() {
    let plc = TestServer::start().await;
    let did_str = plc_did("rotate");
    let (old, _) = synth_repo(&did_str, 3, 1);
    let (new, _) = synth_repo(&did_str, 4, 1);
    let target = format!("/{did_str}");
    plc.route(
        &target,
        vec![Reply::json(&old.did_document("https://pds.example.com"))],
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.sqlite");
    let resolver = resolver(&plc, Some(&state));
    let did = Did::parse(&did_str).unwrap();
    assert_eq!(
        resolver.resolve(&did).await.unwrap().signing_key,
        old.public_key()
    );

    // The PLC now publishes the rotated key; the cache still answers with the old one.
    plc.route(
        &target,
        vec![Reply::json(&new.did_document("https://pds.example.com"))],
    );
    assert_eq!(
        resolver.resolve(&did).await.unwrap().signing_key,
        old.public_key()
    );
    assert_eq!(plc.requests(), 1);

    let refreshed = resolver.refresh(&did).await.unwrap();
    assert_eq!(refreshed.signing_key, new.public_key());
    assert_eq!(plc.requests(), 2);
    assert_eq!(resolver.cached(&did).unwrap().signing_key, new.public_key());
    // A stream of bad signatures: further refreshes within the minute ask nobody.
    for _ in 0..5 {
        assert_eq!(
            resolver.refresh(&did).await.unwrap().signing_key,
            new.public_key()
        );
    }
    assert_eq!(plc.requests(), 2);
    assert_eq!(
        resolver.stats().refreshes_limited.load(Ordering::Relaxed),
        5
    );
    // The refresh reached SQLite too.
    let restarted =
        IdentityResolver::new(client(), config(&plc.url()), HashMap::new(), Some(&state)).unwrap();
    assert_eq!(
        restarted.resolve(&did).await.unwrap().signing_key,
        new.public_key()
    );
    assert_eq!(plc.requests(), 2);

    // `invalidate` (no I/O) after yet another rotation: the hot path stops answering, the
    // next resolve fetches, skipping the SQLite row.
    let (newest, _) = synth_repo(&did_str, 5, 1);
    plc.route(
        &target,
        vec![Reply::json(&newest.did_document("https://pds.example.com"))],
    );
    restarted.invalidate(&did);
    assert_eq!(plc.requests(), 2);
    assert!(restarted.cached(&did).is_none());
    assert_eq!(
        restarted.resolve(&did).await.unwrap().signing_key,
        newest.public_key()
    );
    assert_eq!(plc.requests(), 3);
    assert_eq!(
        restarted.cached(&did).unwrap().signing_key,
        newest.public_key()
    );
    assert_eq!(restarted.memory_entries(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_dids_are_refused_before_any_request() {
    let server = TestServer::start().await;
    let resolver = resolver(&server, None);
    let port = server.port;
    let hostile = [
        // Path characters smuggled through percent escapes or did:web path segments.
        format!("did:web:localhost%3A{port}%2F..%2Fadmin"),
        format!("did:web:localhost%3A{port}:user:alice"),
        "did:web:localhost%2Fetc%2Fpasswd".to_owned(),
        "did:web:..".to_owned(),
        "did:web:localhost%3A0".to_owned(),
        "did:web:localhost%40evil.example".to_owned(),
        // A did:plc that is not 24 base32 characters.
        "did:plc:..%2F..%2Fadmin".to_owned(),
        "did:plc:aaaaaaaaaaaaaaaaaaaaaaa1".to_owned(),
        "did:plc:aaaaaaaaaaaaaaaaaaaaaaaaa".to_owned(),
        "did:plc:AAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
    ];
    for did in &hostile {
        let did = Did::parse(did).expect("syntactically a DID");
        let err = resolver.resolve(&did).await.unwrap_err();
        assert_eq!(err.reason(), "invalid_did", "{did}: {err}");
        let err = resolver.refresh(&did).await.unwrap_err();
        assert_eq!(err.reason(), "invalid_did", "{did}: {err}");
    }
    let err = resolver
        .resolve(&Did::parse("did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "unsupported_method");
    assert_eq!(server.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_refused_off_loopback() {
    let err = IdentityResolver::new(
        client(),
        config("http://plc.example.com"),
        HashMap::new(),
        None,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        IdentityInitError::PlcUrl(UrlError::InsecureHttp(_))
    ));
    // A DID document naming a plain-http PDS off loopback: refused before any connection.
    let (repo, _) = synth_repo(&plc_did("insecure"), 3, 1);
    let pds = PdsClient::new(client(), pds_config());
    let err = pds
        .get_repo(&identity_of(&repo, "http://pds.example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "insecure_url");
    assert_eq!(pds.stats().requests.load(Ordering::Relaxed), 0);
    // By default neither a did:web nor a PDS endpoint may point at this machine.
    let server = TestServer::start().await;
    let strict = PdsClient::new(client(), PdsConfig::default());
    for endpoint in [server.url(), format!("https://localhost:{}", server.port)] {
        let err = strict
            .get_repo(&identity_of(&repo, &endpoint))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PdsError::Url(UrlError::Loopback(_))),
            "{endpoint}: {err}"
        );
        assert_eq!(err.reason(), "loopback_refused");
    }
    let strict = IdentityResolver::new(
        client(),
        IdentityConfig {
            plc_url: server.url(),
            ..IdentityConfig::default()
        },
        HashMap::new(),
        None,
    )
    .unwrap();
    let did = Did::parse(&format!("did:web:localhost%3A{}", server.port)).unwrap();
    let err = strict.resolve(&did).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::Url(UrlError::Loopback(_))),
        "{err}"
    );
    assert_eq!(err.reason(), "loopback_refused");
    assert_eq!(
        strict
            .stats()
            .errors_loopback_refused
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(server.requests(), 0);

    let mut no_pds = identity_of(&repo, "https://pds.example.com");
    no_pds.pds_endpoint = None;
    assert_eq!(pds.get_repo(&no_pds).await.unwrap_err().reason(), "no_pds");
}

// ------------------------------------------------------------------------------------------
// getRepo
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_returns_exactly_the_repos_records() {
    let plc = TestServer::start().await;
    let pds = TestServer::start().await;
    let did_str = plc_did("repo");
    let (mut repo, expected) = synth_repo(&did_str, 3, 200);
    let car = repo.get_repo_car(now_micros());
    plc.route(
        &format!("/{did_str}"),
        vec![Reply::json(&repo.did_document(&pds.url()))],
    );
    // First with Content-Length, then chunked in pieces that cut sections apart.
    pds.route(
        &get_repo_target(&did_str),
        vec![
            Reply::bytes(car.clone()),
            Reply::bytes(car.clone()).chunked(97),
        ],
    );

    // The identity from the fake PLC, the repo from the PDS its document names.
    let resolver = resolver(&plc, None);
    let identity = resolver
        .resolve(&Did::parse(&did_str).unwrap())
        .await
        .unwrap();
    let client = PdsClient::new(client(), pds_config());
    for _ in 0..2 {
        let verified = client.get_repo(&identity).await.unwrap();
        assert!(verified.signature_checked);
        assert_eq!(listed(&verified), expected);
        assert_eq!(verified.records.len(), 201);
        let follow = verified
            .records
            .iter()
            .find(|r| r.collection.as_str() == "app.bsky.graph.follow")
            .unwrap();
        assert_eq!(
            verified.record_json(follow).unwrap()["subject"],
            json!(plc_did("friend"))
        );
    }
    let stats = client.stats();
    assert_eq!(stats.requests.load(Ordering::Relaxed), 2);
    assert_eq!(stats.repos_ok.load(Ordering::Relaxed), 2);
    assert_eq!(stats.bytes.load(Ordering::Relaxed), 2 * car.len() as u64);
    assert!(pds
        .seen()
        .iter()
        .all(|s| s.target == get_repo_target(&did_str)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_signed_by_another_key_is_a_bad_signature() {
    let pds = TestServer::start().await;
    let did_str = plc_did("forged");
    let (mut repo, _) = synth_repo(&did_str, 3, 10);
    let (other, _) = synth_repo(&did_str, 9, 0);
    pds.route(
        &get_repo_target(&did_str),
        vec![Reply::bytes(repo.get_repo_car(now_micros()))],
    );
    let client = PdsClient::new(client(), pds_config());
    let err = client
        .get_repo(&identity_of(&other, &pds.url()))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "bad_signature");
    assert_eq!(err.label(), "repo_invalid:bad_signature");
    assert!(err.is_repo_invalid());
    // Not retried: the bytes will not change.
    assert_eq!(pds.requests(), 1);
    assert_eq!(client.stats().repos_failed.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_missing_a_block_fails() {
    let pds = TestServer::start().await;
    let did_str = plc_did("damaged");
    let (mut repo, expected) = synth_repo(&did_str, 3, 10);
    let (_, _, cid) = expected.iter().next().unwrap();
    let cid = sync_core::ids::CidString::parse(cid)
        .unwrap()
        .to_cid()
        .unwrap();
    pds.route(
        &get_repo_target(&did_str),
        vec![Reply::bytes(repo.get_repo_car_without(now_micros(), &cid))],
    );
    let client = PdsClient::new(client(), pds_config());
    let err = client
        .get_repo(&identity_of(&repo, &pds.url()))
        .await
        .unwrap_err();
    assert!(err.is_repo_invalid(), "{err}");
    assert_eq!(err.reason(), "missing_record");
    assert_eq!(pds.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_429_pauses_the_whole_host_until_retry_after() {
    let pds = TestServer::start().await;
    let (mut first, _) = synth_repo(&plc_did("limited"), 3, 5);
    let (mut second, _) = synth_repo(&plc_did("waiting"), 4, 5);
    pds.route(
        &get_repo_target(first.did().as_str()),
        vec![
            Reply::status(429).header("Retry-After", "1"),
            Reply::bytes(first.get_repo_car(now_micros())),
        ],
    );
    pds.route(
        &get_repo_target(second.did().as_str()),
        vec![Reply::bytes(second.get_repo_car(now_micros()))],
    );
    let client = PdsClient::new(client(), pds_config());
    let first_identity = identity_of(&first, &pds.url());
    let second_identity = identity_of(&second, &pds.url());
    let task = {
        let client = client.clone();
        tokio::spawn(async move { client.get_repo(&first_identity).await })
    };
    // Once the 429 is in, another repo on the same host waits too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.stats().rate_limited.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no 429 seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other = client.get_repo(&second_identity).await;
    assert!(other.is_ok(), "{other:?}");
    assert!(task.await.unwrap().is_ok());

    let seen = pds.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let limited_at = seen[0].at;
    for later in &seen[1..] {
        assert!(
            later.at.duration_since(limited_at) >= Duration::from_secs(1),
            "a request reached the host during its pause: {seen:?}"
        );
    }
    assert_eq!(client.stats().rate_limited.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_long_rate_limit_is_returned_not_slept() {
    let pds = TestServer::start().await;
    let (mut repo, _) = synth_repo(&plc_did("hourly"), 3, 5);
    let reset = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    pds.route(
        &get_repo_target(repo.did().as_str()),
        vec![
            Reply::status(429).header("RateLimit-Reset", &reset.to_string()),
            Reply::bytes(repo.get_repo_car(now_micros())),
        ],
    );
    let client = PdsClient::new(client(), pds_config());
    let identity = identity_of(&repo, &pds.url());
    let err = client.get_repo(&identity).await.unwrap_err();
    let PdsError::RateLimited { retry_after } = err else {
        panic!("{err:?}");
    };
    assert!(retry_after > Duration::from_secs(3000));
    // The host stays paused: the next call fails at once without a request.
    let err = client.get_repo(&identity).await.unwrap_err();
    assert_eq!(err.reason(), "rate_limited");
    assert_eq!(pds.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_never_exceeds_the_per_host_concurrency() {
    let pds = TestServer::start().await;
    let (mut repo, _) = synth_repo(&plc_did("busy"), 3, 5);
    pds.route(
        &get_repo_target(repo.did().as_str()),
        vec![Reply::bytes(repo.get_repo_car(now_micros())).delayed(Duration::from_millis(150))],
    );
    let client = PdsClient::new(
        client(),
        PdsConfig {
            concurrency_per_host: 2,
            ..pds_config()
        },
    );
    let identity = Arc::new(identity_of(&repo, &pds.url()));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let identity = identity.clone();
            tokio::spawn(async move { client.get_repo(&identity).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().is_ok());
    }
    assert_eq!(pds.requests(), 8);
    assert_eq!(pds.max_in_flight(), 2, "limit reached but never exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_starts_at_most_rate_requests_per_second_per_host() {
    let pds = TestServer::start().await;
    let (mut repo, _) = synth_repo(&plc_did("paced"), 3, 2);
    pds.route(
        &get_repo_target(repo.did().as_str()),
        vec![Reply::bytes(repo.get_repo_car(now_micros()))],
    );
    let client = PdsClient::new(
        client(),
        PdsConfig {
            rate_per_host: 4.0,
            ..pds_config()
        },
    );
    let identity = identity_of(&repo, &pds.url());
    for _ in 0..3 {
        client.get_repo(&identity).await.unwrap();
    }
    let seen = pds.seen();
    // 4/s with a burst of one: the third start is at least two intervals after the first.
    assert!(seen[2].at.duration_since(seen[0].at) >= Duration::from_millis(450));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_retries_transient_failures_a_bounded_number_of_times() {
    let pds = TestServer::start().await;
    let (mut flaky, expected) = synth_repo(&plc_did("flaky"), 3, 5);
    let (down, _) = synth_repo(&plc_did("down"), 4, 1);
    let (gone, _) = synth_repo(&plc_did("gone"), 5, 1);
    pds.route(
        &get_repo_target(flaky.did().as_str()),
        vec![
            Reply::status(503),
            Reply::status(502),
            Reply::bytes(flaky.get_repo_car(now_micros())),
        ],
    );
    pds.route(
        &get_repo_target(down.did().as_str()),
        vec![Reply::status(500)],
    );
    let mut not_found = Reply::status(400);
    not_found.body = br#"{"error":"RepoNotFound","message":"Could not find repo"}"#.to_vec();
    pds.route(&get_repo_target(gone.did().as_str()), vec![not_found]);
    let client = PdsClient::new(
        client(),
        PdsConfig {
            max_retries: 2,
            ..pds_config()
        },
    );
    let repo = client
        .get_repo(&identity_of(&flaky, &pds.url()))
        .await
        .unwrap();
    assert_eq!(listed(&repo), expected);
    assert_eq!(client.stats().retries.load(Ordering::Relaxed), 2);

    let err = client
        .get_repo(&identity_of(&down, &pds.url()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        PdsError::HttpStatus {
            status: 500,
            error: None
        }
    );
    let down_requests = pds
        .seen()
        .iter()
        .filter(|s| s.target == get_repo_target(down.did().as_str()))
        .count();
    assert_eq!(down_requests, 3, "one try and two retries");

    let err = client
        .get_repo(&identity_of(&gone, &pds.url()))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "repo_not_found");
    let gone_requests = pds
        .seen()
        .iter()
        .filter(|s| s.target == get_repo_target(gone.did().as_str()))
        .count();
    assert_eq!(gone_requests, 1, "a 4xx is not retried");

    // A PDS that is not there: network errors, retried, then reported.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = client
        .get_repo(&identity_of(&down, &format!("http://127.0.0.1:{dead}")))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "network");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_over_the_size_limit_is_too_large() {
    let pds = TestServer::start().await;
    let (mut sized, _) = synth_repo(&plc_did("sized"), 3, 100);
    let (mut streamed, _) = synth_repo(&plc_did("streamed"), 4, 100);
    let sized_car = sized.get_repo_car(now_micros());
    let streamed_car = streamed.get_repo_car(now_micros());
    pds.route(
        &get_repo_target(sized.did().as_str()),
        vec![Reply::bytes(sized_car.clone())],
    );
    pds.route(
        &get_repo_target(streamed.did().as_str()),
        vec![Reply::bytes(streamed_car.clone()).chunked(512)],
    );
    let limit = 4096u64;
    assert!(sized_car.len() as u64 > limit && streamed_car.len() as u64 > limit);
    let client = PdsClient::new(
        client(),
        PdsConfig {
            max_repo_bytes: limit,
            ..pds_config()
        },
    );
    let err = client
        .get_repo(&identity_of(&sized, &pds.url()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        PdsError::TooLarge {
            limit,
            content_length: Some(sized_car.len() as u64)
        }
    );
    assert_eq!(err.reason(), "too_large");
    let err = client
        .get_repo(&identity_of(&streamed, &pds.url()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        PdsError::TooLarge {
            limit,
            content_length: None
        }
    );
    // Counted while streaming: stopped near the limit, not after the whole body.
    assert!(client.stats().bytes.load(Ordering::Relaxed) <= limit + 512);
    assert_eq!(pds.requests(), 2, "a too-large repo is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_of_one_did_share_one_request() {
    let plc = TestServer::start().await;
    let did_str = plc_did("popular");
    let (repo, _) = synth_repo(&did_str, 3, 1);
    plc.route(
        &format!("/{did_str}"),
        vec![Reply::json(&repo.did_document("https://pds.example.com"))
            .delayed(Duration::from_millis(200))],
    );
    let resolver = resolver(&plc, None);
    let did = Did::parse(&did_str).unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let resolver = resolver.clone();
            let did = did.clone();
            tokio::spawn(async move { resolver.resolve(&did).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().signing_key, repo.public_key());
    }
    assert_eq!(plc.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_rate_limited_overall() {
    let plc = TestServer::start().await;
    let resolver = IdentityResolver::new(
        client(),
        IdentityConfig {
            lookups_per_second: 4.0,
            lookup_burst: 1,
            ..config(&plc.url())
        },
        HashMap::new(),
        None,
    )
    .unwrap();
    for tag in ["one", "two", "three"] {
        let did_str = plc_did(tag);
        let (repo, _) = synth_repo(&did_str, 3, 1);
        plc.route(
            &format!("/{did_str}"),
            vec![Reply::json(&repo.did_document("https://pds.example.com"))],
        );
        resolver
            .resolve(&Did::parse(&did_str).unwrap())
            .await
            .unwrap();
    }
    let seen = plc.seen();
    assert_eq!(seen.len(), 3);
    // 4/s with a burst of one: the third lookup is at least two intervals after the first.
    assert!(seen[2].at.duration_since(seen[0].at) >= Duration::from_millis(450));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_document_is_served_during_an_outage_but_not_after_a_404() {
    let plc = TestServer::start().await;
    let did_str = plc_did("outage");
    let (repo, _) = synth_repo(&did_str, 3, 1);
    let target = format!("/{did_str}");
    plc.route(
        &target,
        vec![Reply::json(&repo.did_document("https://pds.example.com"))],
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.sqlite");
    // TTL zero: every document is expired as soon as it is fetched.
    let resolver = IdentityResolver::new(
        client(),
        IdentityConfig {
            ttl: Duration::ZERO,
            ..config(&plc.url())
        },
        HashMap::new(),
        Some(&state),
    )
    .unwrap();
    let did = Did::parse(&did_str).unwrap();
    resolver.resolve(&did).await.unwrap();

    // The directory fails: the expired document is still the best answer.
    plc.route(&target, vec![Reply::status(502)]);
    assert_eq!(
        resolver.resolve(&did).await.unwrap().signing_key,
        repo.public_key()
    );
    assert_eq!(resolver.stats().stale_served.load(Ordering::Relaxed), 1);
    assert_eq!(
        resolver.stats().errors_http_status.load(Ordering::Relaxed),
        1
    );
    // During the backoff too, without a request.
    assert!(resolver.resolve(&did).await.is_ok());
    assert_eq!(plc.requests(), 2);

    // The directory says the DID is gone: nothing is served any more, from memory or SQLite.
    plc.route(&target, vec![Reply::status(404)]);
    assert_eq!(
        resolver.refresh(&did).await.unwrap_err(),
        IdentityError::NotFound
    );
    assert!(resolver.resolve(&did).await.is_err());
    let rows: i64 = rusqlite::Connection::open(&state)
        .unwrap()
        .query_row("SELECT count(*) FROM identity_cache", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_cache_shares_the_state_file_with_the_state_store() {
    let plc = TestServer::start().await;
    let did_str = plc_did("shared");
    let (repo, _) = synth_repo(&did_str, 3, 1);
    plc.route(
        &format!("/{did_str}"),
        vec![Reply::json(&repo.did_document("https://pds.example.com"))],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let state =
        firehose_writer::state::StateStore::open(&path, Default::default(), Default::default())
            .unwrap();
    let resolver = resolver(&plc, Some(&path));
    resolver
        .resolve(&Did::parse(&did_str).unwrap())
        .await
        .unwrap();
    drop(state);
    // The state store opens the file again with the extra table in it.
    let state =
        firehose_writer::state::StateStore::open(&path, Default::default(), Default::default())
            .unwrap();
    drop(state);
    let restarted = self::resolver(&plc, Some(&path));
    restarted
        .resolve(&Did::parse(&did_str).unwrap())
        .await
        .unwrap();
    assert_eq!(plc.requests(), 1);
    // Pruning drops rows older than asked, and only those.
    assert_eq!(restarted.prune_sqlite(Duration::from_secs(3600)).await, 0);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE identity_cache SET fetched_at = fetched_at - 7200",
            [],
        )
        .unwrap();
    assert_eq!(restarted.prune_sqlite(Duration::from_secs(3600)).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_stack_starts_without_a_process_default_provider() {
    // A TCP server that answers a TLS hello with garbage: the client must fail the handshake
    // with an error (rustls initialised with ring), not panic over two compiled-in providers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let (repo, _) = synth_repo(&plc_did("tls"), 3, 1);
    let client = PdsClient::new(
        client(),
        PdsConfig {
            max_retries: 0,
            ..pds_config()
        },
    );
    let err = client
        .get_repo(&identity_of(&repo, &format!("https://127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "network", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_times_out_and_is_retried() {
    let pds = TestServer::start().await;
    let (mut repo, _) = synth_repo(&plc_did("stalled"), 3, 50);
    let car = repo.get_repo_car(now_micros());
    pds.route(
        &get_repo_target(repo.did().as_str()),
        vec![Reply::bytes(car).stalled_after(100)],
    );
    let http = build_client(&HttpConfig {
        read_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    })
    .unwrap();
    let client = PdsClient::new(
        http,
        PdsConfig {
            max_retries: 1,
            ..pds_config()
        },
    );
    let err = client
        .get_repo(&identity_of(&repo, &pds.url()))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
    assert_eq!(pds.requests(), 2, "one try and one retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_content_length_is_a_network_error() {
    // A raw server: full headers, half the CAR, then the connection closes.
    let (mut repo, _) = synth_repo(&plc_did("truncated"), 3, 50);
    let car = repo.get_repo_car(now_micros());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    {
        let connections = connections.clone();
        let car = car.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    car.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&car[..car.len() / 2]).await;
                let _ = stream.shutdown().await;
            }
        });
    }
    let client = PdsClient::new(
        client(),
        PdsConfig {
            max_retries: 1,
            ..pds_config()
        },
    );
    let err = client
        .get_repo(&identity_of(&repo, &format!("http://127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "network", "{err}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one try and one retry"
    );
}
