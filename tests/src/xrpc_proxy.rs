//! An HTTP reverse proxy in front of a PDS's XRPC endpoints, for tests of a client's manners:
//! it can answer the first N requests of a method (e.g. `com.atproto.sync.getRepo`) with `429`
//! and `Retry-After` / `RateLimit-Reset` headers, forwards everything else, and records when
//! each request arrived, so a test can assert the client waited as told and did not hammer.
//! Also: a small HTTP/1 GET client ([`http_get`]) and the DID-document helpers a test needs to
//! point a writer at the proxy ([`did_docs_with_pds`]: the real documents from the dev-env
//! PLC with the `#atproto_pds` endpoint rewritten).
//!
//! Real HTTP (hyper's HTTP/1 server and client connections over TCP on 127.0.0.1).
//!
//! ```no_run
//! # async fn demo(pds_url: &str, plc_url: &str, s1: &str) -> std::io::Result<()> {
//! use std::time::Duration;
//! use workspace_tests::xrpc_proxy::{did_docs_with_pds, XrpcProxy, GET_REPO};
//! let proxy = XrpcProxy::start(pds_url).await?;
//! proxy.throttle(GET_REPO, 2, Duration::from_secs(1));
//! let docs = did_docs_with_pds(plc_url, &[s1], &proxy.url()).await?;
//! std::fs::write("did_docs.json", serde_json::to_vec(&docs)?)?;
//! // ... start the writer with `--did-docs did_docs.json` ...
//! let gets = proxy.requests_for(GET_REPO);
//! assert!(gets[2].at >= gets[1].at + Duration::from_secs(1));
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// `com.atproto.sync.getRepo`.
pub const GET_REPO: &str = "com.atproto.sync.getRepo";

/// How long [`http_get`] waits for a whole response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Which headers a 429 carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHeaders {
    /// `Retry-After: <seconds>` only.
    RetryAfter,
    /// `RateLimit-Reset: <Unix seconds>` (with `RateLimit-Limit`, `RateLimit-Remaining: 0`,
    /// `RateLimit-Policy`, as the PDS's own rate limiter sends them) only.
    RateLimitReset,
    /// Both.
    Both,
}

/// Answer the next `count` requests of `nsid` with 429, telling the client to come back after
/// `retry_after`: `Retry-After` is its whole seconds rounded up and `RateLimit-Reset` the Unix
/// second at or after `now + retry_after`, so a client that honours either waits at least
/// `retry_after` (use whole seconds to keep the two equal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    pub nsid: String,
    /// Only requests whose `did` query parameter is this (`None`: any).
    pub did: Option<String>,
    pub count: usize,
    pub retry_after: Duration,
    pub headers: RetryHeaders,
}

/// One request the proxy received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog {
    /// When its head arrived.
    pub at: Instant,
    /// When the proxy had its answer's head (after any hold, and the upstream's answer).
    pub answered: Instant,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The XRPC method (`path` after `/xrpc/`), if it is one.
    pub nsid: Option<String>,
    /// The status the proxy answered (the upstream's, 429 when throttled, 502 when the upstream
    /// could not be reached).
    pub status: u16,
    /// For a 429: the `retry_after` of its [`Throttle`].
    pub retry_after: Option<Duration>,
}

impl RequestLog {
    /// The value of query parameter `name` (not percent-decoded; DIDs need none).
    pub fn param(&self, name: &str) -> Option<String> {
        query_param(self.query.as_deref()?, name)
    }
}

/// A query parameter, percent-decoded (clients encode a DID's `:` as `%3A`).
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct State {
    throttles: Vec<Throttle>,
    /// Held requests wait while a hold matches them: (nsid, did).
    holds: Vec<(String, Option<String>)>,
    /// Requests waiting on a hold now.
    holding: usize,
    requests: Vec<RequestLog>,
}

struct Shared {
    state: Mutex<State>,
    upstream: Upstream,
    /// Bumped after every request is logged, and when a request starts or stops waiting on a
    /// hold or a hold is released (wakes `wait_for` and held requests).
    logged_tx: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.logged_tx.send_modify(|n| *n += 1);
    }
}

fn matches(nsid: &str, did: Option<&str>, req_nsid: Option<&str>, req_did: Option<&str>) -> bool {
    Some(nsid) == req_nsid && did.is_none_or(|d| Some(d) == req_did)
}

/// Where requests go: host and port of an `http://` URL.
#[derive(Debug, Clone)]
struct Upstream {
    host: String,
    port: u16,
}

/// `http://host[:port][/path...]` → (host, port, path and query; `/` when empty).
fn split_url(url: &str) -> io::Result<(String, u16, String)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an http URL: {url}"),
        )
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
        None => (authority, 80),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port, path))
}

/// A running proxy; dropping it stops it (without waiting).
pub struct XrpcProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

impl XrpcProxy {
    /// Starts a proxy on 127.0.0.1 (random port) in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> io::Result<XrpcProxy> {
        let (host, port, _) = split_url(upstream)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (logged_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                throttles: Vec::new(),
                holds: Vec::new(),
                holding: 0,
                requests: Vec::new(),
            }),
            upstream: Upstream { host, port },
            logged_tx,
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(XrpcProxy {
            addr,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`: the endpoint to put in DID documents.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers the next `count` requests of `nsid` with 429 and both retry headers.
    pub fn throttle(&self, nsid: &str, count: usize, retry_after: Duration) {
        self.throttle_with(Throttle {
            nsid: nsid.to_owned(),
            did: None,
            count,
            retry_after,
            headers: RetryHeaders::Both,
        });
    }

    /// Adds a throttle (they apply in the order added; the first that matches with requests
    /// left answers).
    pub fn throttle_with(&self, throttle: Throttle) {
        self.shared.lock().throttles.push(throttle);
    }

    /// Removes every throttle: from now on every request is forwarded.
    pub fn clear_throttles(&self) {
        self.shared.lock().throttles.clear();
    }

    /// Holds requests of `nsid` (for `did`, or any) before they are forwarded (or throttled),
    /// until [`XrpcProxy::release`]: e.g. a resync's `getRepo` kept open while the test makes
    /// more commits. [`XrpcProxy::holding`] counts the requests waiting.
    pub fn hold(&self, nsid: &str, did: Option<&str>) {
        self.shared
            .lock()
            .holds
            .push((nsid.to_owned(), did.map(str::to_owned)));
    }

    /// Releases every hold: waiting requests go on, in no particular order.
    pub fn release(&self) {
        self.shared.lock().holds.clear();
        self.shared.bump();
    }

    /// Requests waiting on a hold now.
    pub fn holding(&self) -> usize {
        self.shared.lock().holding
    }

    /// Waits until at least `n` requests wait on a hold; false on timeout.
    pub async fn wait_for_holding(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |state| state.holding >= n).await
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.lock().requests.clone()
    }

    /// The requests of one XRPC method.
    pub fn requests_for(&self, nsid: &str) -> Vec<RequestLog> {
        self.requests()
            .into_iter()
            .filter(|r| r.nsid.as_deref() == Some(nsid))
            .collect()
    }

    /// The requests of one XRPC method for one `did` (query parameter).
    pub fn requests_for_did(&self, nsid: &str, did: &str) -> Vec<RequestLog> {
        self.requests_for(nsid)
            .into_iter()
            .filter(|r| r.param("did").as_deref() == Some(did))
            .collect()
    }

    /// Waits until `cond` holds over the request log; false on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[RequestLog]) -> bool,
    ) -> bool {
        self.wait_until(timeout, |state| cond(&state.requests))
            .await
    }

    async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&State) -> bool) -> bool {
        let mut rx = self.shared.logged_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if cond(&self.shared.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return cond(&self.shared.lock());
            }
        }
    }

    /// Waits until at least `n` requests of `nsid` were answered `status`; false on timeout.
    pub async fn wait_for_status(
        &self,
        nsid: &str,
        status: u16,
        n: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_for(timeout, |log| {
            log.iter()
                .filter(|r| r.nsid.as_deref() == Some(nsid) && r.status == status)
                .count()
                >= n
        })
        .await
    }

    /// Stops accepting and waits until every connection is closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for XrpcProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| serve(req, shared.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

async fn serve(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    let at = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let nsid = path.strip_prefix("/xrpc/").map(str::to_owned);
    let did = query.as_deref().and_then(|q| query_param(q, "did"));
    let held = |state: &State| {
        state
            .holds
            .iter()
            .any(|(n, d)| matches(n, d.as_deref(), nsid.as_deref(), did.as_deref()))
    };
    let mut released = shared.logged_tx.subscribe();
    if held(&shared.lock()) {
        shared.lock().holding += 1;
        shared.bump();
        loop {
            released.borrow_and_update();
            if !held(&shared.lock()) {
                break;
            }
            if released.changed().await.is_err() {
                break;
            }
        }
        shared.lock().holding -= 1;
        shared.bump();
    }
    let throttle = {
        let mut state = shared.lock();
        let found = state.throttles.iter_mut().find(|t| {
            t.count > 0 && matches(&t.nsid, t.did.as_deref(), nsid.as_deref(), did.as_deref())
        });
        found.map(|t| {
            t.count -= 1;
            t.clone()
        })
    };
    let (response, retry_after) = match throttle {
        Some(t) => (too_many_requests(&t), Some(t.retry_after)),
        None => (
            forward(req, &shared.upstream)
                .await
                .unwrap_or_else(|e| bad_gateway(&e)),
            None,
        ),
    };
    let entry = RequestLog {
        at,
        answered: Instant::now(),
        method,
        path,
        query,
        nsid,
        status: response.status().as_u16(),
        retry_after,
    };
    shared.lock().requests.push(entry);
    shared.bump();
    Ok(response)
}

fn too_many_requests(t: &Throttle) -> Response<Body> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let reset = (now + t.retry_after).as_secs_f64().ceil() as u64;
    let retry_secs = t.retry_after.as_secs_f64().ceil() as u64;
    let mut builder = Response::builder()
        .status(StatusCode::TOO_MANY_REQUESTS)
        .header(CONTENT_TYPE, "application/json");
    if matches!(t.headers, RetryHeaders::RetryAfter | RetryHeaders::Both) {
        builder = builder.header("Retry-After", retry_secs.to_string());
    }
    if matches!(t.headers, RetryHeaders::RateLimitReset | RetryHeaders::Both) {
        builder = builder
            .header("RateLimit-Limit", "1")
            .header("RateLimit-Remaining", "0")
            .header("RateLimit-Reset", reset.to_string())
            .header("RateLimit-Policy", "1;w=1");
    }
    builder
        .body(full(
            r#"{"error":"RateLimitExceeded","message":"Rate Limit Exceeded"}"#,
        ))
        .expect("a valid 429 response")
}

fn bad_gateway(e: &io::Error) -> Response<Body> {
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .header(CONTENT_TYPE, "text/plain")
        .body(full(format!("upstream: {e}")))
        .expect("a valid 502 response")
}

/// Sends `req` to the upstream on a new connection and hands its response back as it streams.
async fn forward(req: Request<Incoming>, upstream: &Upstream) -> io::Result<Response<Body>> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path.parse().map_err(io::Error::other)?;
    let authority = format!("{}:{}", upstream.host, upstream.port);
    parts.headers.insert(
        HOST,
        HeaderValue::from_str(&authority).map_err(io::Error::other)?,
    );
    let response = send(
        &upstream.host,
        upstream.port,
        Request::from_parts(parts, body),
    )
    .await?;
    Ok(response.map(BodyExt::boxed))
}

/// One request on a new HTTP/1 connection to `host:port`.
async fn send<B>(host: &str, port: u16, req: Request<B>) -> io::Result<Response<Incoming>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect((host, port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(io::Error::other)
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> io::Result<Value> {
        serde_json::from_slice(&self.body).map_err(io::Error::other)
    }
}

/// `GET url` (`http://` only), the whole body read, within 30 s.
pub async fn http_get(url: &str) -> io::Result<HttpResponse> {
    let (host, port, path) = split_url(url)?;
    let req = Request::get(path.as_str())
        .header(HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(io::Error::other)?;
    let fetch = async {
        let response = send(&host, port, req).await?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(CLIENT_TIMEOUT, fetch)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {url}")))?
}

/// The DID document of `did` from a PLC directory (`GET {plc_url}/{did}`).
pub async fn fetch_did_document(plc_url: &str, did: &str) -> io::Result<Value> {
    let url = format!("{}/{did}", plc_url.trim_end_matches('/'));
    let response = http_get(&url).await?;
    if response.status != 200 {
        return Err(io::Error::other(format!(
            "GET {url}: HTTP {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )));
    }
    response.json()
}

/// Points the document's `#atproto_pds` service at `endpoint`; false when it has none.
pub fn set_pds_endpoint(doc: &mut Value, endpoint: &str) -> bool {
    let Some(services) = doc.get_mut("service").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut found = false;
    for service in services {
        let id = service.get("id").and_then(Value::as_str).unwrap_or("");
        if id == "#atproto_pds" || id.ends_with("#atproto_pds") {
            service["serviceEndpoint"] = Value::String(endpoint.to_owned());
            found = true;
        }
    }
    found
}

/// The real documents of `dids` from the PLC, each with its `#atproto_pds` endpoint set to
/// `endpoint`, as the JSON object (DID → document) `--did-docs` reads.
pub async fn did_docs_with_pds(plc_url: &str, dids: &[&str], endpoint: &str) -> io::Result<Value> {
    let mut map = serde_json::Map::new();
    for did in dids {
        let mut doc = fetch_did_document(plc_url, did).await?;
        if !set_pds_endpoint(&mut doc, endpoint) {
            return Err(io::Error::other(format!(
                "the document of {did} has no #atproto_pds service: {doc}"
            )));
        }
        map.insert((*did).to_owned(), doc);
    }
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://localhost:2583").unwrap(),
            ("localhost".into(), 2583, "/".into())
        );
        assert_eq!(
            split_url("http://127.0.0.1:9/xrpc/x?did=a").unwrap(),
            ("127.0.0.1".into(), 9, "/xrpc/x?did=a".into())
        );
        assert!(split_url("https://x").is_err());
    }

    #[test]
    fn pds_endpoint_rewrite() {
        let mut doc = serde_json::json!({
            "id": "did:plc:x",
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                         "serviceEndpoint": "http://localhost:1"}],
        });
        assert!(set_pds_endpoint(&mut doc, "http://127.0.0.1:2"));
        assert_eq!(doc["service"][0]["serviceEndpoint"], "http://127.0.0.1:2");
        assert!(!set_pds_endpoint(&mut serde_json::json!({}), "x"));
    }
}
