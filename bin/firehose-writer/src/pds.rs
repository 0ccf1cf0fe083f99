//! `com.atproto.sync.getRepo` from a DID's PDS: per-host concurrency and rate limits, 429
//! handling that pauses the whole host, bounded retries with exponential backoff, a size cap,
//! and the body streamed through `iroh-car` into `sync_core::repo::RepoReader`, which
//! hash-checks every block, verifies the signed commit with the identity's key and lists the
//! records.
//!
//! API: [`PdsClient::new`]`(client, config)` (cheap to clone, `Send + Sync`);
//! [`PdsClient::get_repo`]`(&identity).await -> Result<VerifiedRepo, PdsError>`;
//! [`PdsClient::stats`] ([`PdsStats`]). Every [`PdsError`] has a stable
//! [`reason`](PdsError::reason) label; a repo that fails verification carries the core's
//! `RepoError` label (`bad_signature`, `missing_blocks`, ...), [`PdsError::label`] spells it
//! `repo_invalid:<reason>`.
//!
//! Rules:
//! - The PDS is the `#atproto_pds` endpoint of the DID document (never the relay). The URL
//!   policy of `net::check_remote_url` applies: https, or http to a loopback host, and a
//!   loopback host only with [`PdsConfig::allow_loopback`] (a stranger's DID document must not
//!   make the writer call its own services; tests and the local end-to-end setup allow it).
//! - Per host (`host[:port]` of the endpoint): at most [`PdsConfig::concurrency_per_host`]
//!   requests at once (a request holds its slot until its body is read, not while the repo is
//!   verified) and at most [`PdsConfig::rate_per_host`] request starts per second (token
//!   bucket, burst 1).
//! - HTTP 429: the wait is the later of `Retry-After` (seconds or an HTTP date) and
//!   `RateLimit-Reset` (Unix seconds; a small number is taken as seconds from now), 30 s when
//!   neither is given, at least 500 ms. The whole host pauses: no request to it starts before
//!   the time. A wait within [`PdsConfig::max_rate_limit_wait`] (5 min) is slept and the
//!   request retried (at most [`PdsConfig::max_rate_limited`] times); a longer one fails at once
//!   with [`PdsError::RateLimited`] carrying the time to retry, so a durable queue reschedules
//!   the repo instead of holding a worker for hours.
//! - Transient failures (connect errors, timeouts, a body cut off, 5xx, 408) are retried with
//!   exponential backoff (1 s doubling, at most 30 s) up to [`PdsConfig::max_retries`] times,
//!   then the last error is returned. Other statuses fail at once; an XRPC error name the PDS
//!   gives (`RepoNotFound`, `RepoTakendown`, `RepoSuspended`, `RepoDeactivated`) becomes its own
//!   label.
//! - Size: a `Content-Length` over [`PdsConfig::max_repo_bytes`] fails before the body is read;
//!   without one (or with a lying one) the bytes are counted as they arrive and the download
//!   stops at the limit. Both are [`PdsError::TooLarge`].
//! - Timeouts: connect and per-read timeouts come from the shared client (a large repo that
//!   keeps arriving never times out, a stalled one does); the response headers must arrive
//!   within [`PdsConfig::header_timeout`].
//!
//! Why `iroh-car` (the user's design names it for streamed CARs): it splits the async body into
//! blocks and `RepoReader::push_block` checks them; it copies each block twice more than the
//! core's own chunk reader (`RepoReader::push`), which BENCHMARKS.md measured 1–20 % faster on
//! whole repos, a difference the network dwarfs. Two limits of `iroh-car` 0.5 and what covers
//! them: it reads a stream that ends inside a section's length prefix as a clean end (the
//! HTTP layer reports a body shorter than its `Content-Length`, and a missing block fails the
//! MST walk in `finish`), and it accepts sections up to 4 MiB where the core caps them at
//! 2 MiB (`push_block` re-checks the core's limit).
//! The MST walk and signature check (`RepoReader::finish`) run on the blocking pool; block
//! hashing happens as blocks arrive, on the calling task.
//!
//! Memory: `RepoReader` holds every block of the repo until `finish` (and the records after),
//! so one download costs up to [`PdsConfig::max_repo_bytes`] plus its index. The per-host
//! limits do not bound downloads across hosts: the caller (the resync/backfill queue) must
//! bound how many `get_repo` calls run at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::Url;
use sync_core::did_doc::AtprotoIdentity;
use sync_core::repo::{RepoError, RepoReader, VerifiedRepo, DEFAULT_MAX_REPO_BYTES};
use sync_core::verify::VerifyOptions;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::net::{backoff_delay, check_remote_url, host_key, RateLimiter, UrlError};

/// Settings of the client (`--pds-concurrency` and `--pds-rate` map to the first two).
#[derive(Debug, Clone)]
pub struct PdsConfig {
    /// Requests in flight per PDS host (0 is taken as 1).
    pub concurrency_per_host: usize,
    /// Request starts per second per PDS host (a value that is not a positive finite number
    /// means no limit).
    pub rate_per_host: f64,
    /// Largest repo CAR accepted.
    pub max_repo_bytes: u64,
    /// Retries of transient failures per `get_repo`.
    pub max_retries: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// 429 answers waited out per `get_repo` before giving up with `RateLimited`.
    pub max_rate_limited: u32,
    /// Longest 429 wait slept inside `get_repo`; a longer one returns `RateLimited` at once.
    pub max_rate_limit_wait: Duration,
    /// Wait after a 429 that names no time.
    pub default_rate_limit_wait: Duration,
    /// Time to the response headers (the body is bounded by the client's read timeout).
    pub header_timeout: Duration,
    /// Whether a PDS endpoint may point at this machine (see the module documentation).
    pub allow_loopback: bool,
}

impl Default for PdsConfig {
    fn default() -> Self {
        PdsConfig {
            concurrency_per_host: 4,
            rate_per_host: 5.0,
            max_repo_bytes: DEFAULT_MAX_REPO_BYTES,
            max_retries: 4,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            max_rate_limited: 5,
            max_rate_limit_wait: Duration::from_secs(300),
            default_rate_limit_wait: Duration::from_secs(30),
            header_timeout: Duration::from_secs(60),
            allow_loopback: false,
        }
    }
}

/// Least wait after a 429, so a reset time already past cannot make a tight loop.
const MIN_RATE_LIMIT_WAIT: Duration = Duration::from_millis(500);

/// Largest error body read from a failed response (for the XRPC error name).
const MAX_ERROR_BODY: usize = 4096;

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum PdsError {
    #[error("DID document names no PDS endpoint")]
    NoPdsEndpoint,
    #[error("PDS endpoint refused: {0}")]
    Url(#[from] UrlError),
    #[error("PDS rate limit: retry in {retry_after:?}")]
    RateLimited { retry_after: Duration },
    #[error("repo exceeds the {limit}-byte limit (Content-Length: {content_length:?})")]
    TooLarge {
        limit: u64,
        content_length: Option<u64>,
    },
    #[error("PDS answered HTTP {status}{}", error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default())]
    HttpStatus { status: u16, error: Option<String> },
    #[error("network error: {0}")]
    Network(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("repo invalid: {0}")]
    Repo(RepoError),
    #[error("internal: {0}")]
    Internal(String),
}

impl PdsError {
    /// Short stable label for metrics: for [`PdsError::Repo`] the core's `RepoError` label.
    pub fn reason(&self) -> &'static str {
        match self {
            PdsError::NoPdsEndpoint => "no_pds",
            PdsError::Url(UrlError::Loopback(_)) => "loopback_refused",
            PdsError::Url(_) => "insecure_url",
            PdsError::RateLimited { .. } => "rate_limited",
            PdsError::TooLarge { .. } => "too_large",
            PdsError::HttpStatus { error, .. } => match error.as_deref() {
                Some("RepoNotFound") => "repo_not_found",
                Some("RepoTakendown") => "repo_takendown",
                Some("RepoSuspended") => "repo_suspended",
                Some("RepoDeactivated") => "repo_deactivated",
                _ => "http_status",
            },
            PdsError::Network(_) => "network",
            PdsError::Timeout(_) => "timeout",
            PdsError::Repo(e) => e.reason(),
            PdsError::Internal(_) => "internal",
        }
    }

    /// [`Self::reason`], with `repo_invalid:` before a verification failure's label.
    pub fn label(&self) -> String {
        match self {
            PdsError::Repo(e) => format!("repo_invalid:{}", e.reason()),
            other => other.reason().to_owned(),
        }
    }

    /// Whether the repo itself failed verification (not the transport).
    pub fn is_repo_invalid(&self) -> bool {
        matches!(self, PdsError::Repo(_))
    }
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct PdsStats {
    /// Requests started.
    pub requests: AtomicU64,
    /// 429 answers.
    pub rate_limited: AtomicU64,
    /// Attempts repeated after a transient failure.
    pub retries: AtomicU64,
    /// Body bytes received.
    pub bytes: AtomicU64,
    /// Repos fetched and verified.
    pub repos_ok: AtomicU64,
    /// `get_repo` calls that returned an error.
    pub repos_failed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One PDS host's limits and pause.
#[derive(Debug)]
struct Host {
    key: String,
    slots: Semaphore,
    starts: RateLimiter,
    paused_until: Mutex<Option<Instant>>,
}

impl Host {
    fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    /// Sleeps out the host's pause, or fails at once when it is longer than `cap`.
    async fn wait_unpaused(&self, cap: Duration) -> Result<(), PdsError> {
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
            let Some(until) = until else {
                return Ok(());
            };
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            if left > cap {
                return Err(PdsError::RateLimited { retry_after: left });
            }
            debug!(
                host = self.key,
                wait_ms = left.as_millis() as u64,
                "PDS host paused"
            );
            tokio::time::sleep_until(until).await;
        }
    }
}

/// How one attempt ended when it did not produce a repo.
enum Failed {
    /// 429: the host is paused for this long.
    RateLimited(Duration),
    /// Worth another attempt after a backoff.
    Transient(PdsError),
    Fatal(PdsError),
}

struct Inner {
    client: reqwest::Client,
    config: PdsConfig,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    stats: PdsStats,
}

/// See the module documentation.
#[derive(Clone)]
pub struct PdsClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdsClient")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl PdsClient {
    pub fn new(client: reqwest::Client, config: PdsConfig) -> PdsClient {
        PdsClient {
            inner: Arc::new(Inner {
                client,
                config,
                hosts: Mutex::new(HashMap::new()),
                stats: PdsStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &PdsStats {
        &self.inner.stats
    }

    fn host(&self, key: String) -> Arc<Host> {
        let config = &self.inner.config;
        self.inner
            .hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Host {
                    key,
                    slots: Semaphore::new(config.concurrency_per_host.max(1)),
                    starts: RateLimiter::new(config.rate_per_host, 1),
                    paused_until: Mutex::new(None),
                })
            })
            .clone()
    }

    /// The `getRepo` URL on `identity`'s PDS.
    pub fn get_repo_url(&self, identity: &AtprotoIdentity) -> Result<Url, PdsError> {
        let endpoint = identity
            .pds_endpoint
            .as_deref()
            .ok_or(PdsError::NoPdsEndpoint)?;
        let mut url = check_remote_url(endpoint, self.inner.config.allow_loopback)?;
        let path = format!(
            "{}/xrpc/com.atproto.sync.getRepo",
            url.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url.query_pairs_mut()
            .append_pair("did", identity.did.as_str());
        Ok(url)
    }

    /// Downloads `identity.did`'s whole repo from its PDS and verifies it against
    /// `identity.signing_key` at this machine's clock. See the module documentation.
    pub async fn get_repo(&self, identity: &AtprotoIdentity) -> Result<VerifiedRepo, PdsError> {
        let result = self.get_repo_inner(identity).await;
        match &result {
            Ok(repo) => {
                bump(&self.inner.stats.repos_ok);
                info!(
                    did = identity.did.as_str(),
                    rev = repo.commit.rev.as_str(),
                    records = repo.records.len(),
                    "repo fetched and verified"
                );
            }
            Err(e) => {
                bump(&self.inner.stats.repos_failed);
                warn!(did = identity.did.as_str(), reason = e.reason(), error = %e, "getRepo failed");
            }
        }
        result
    }

    async fn get_repo_inner(&self, identity: &AtprotoIdentity) -> Result<VerifiedRepo, PdsError> {
        let config = &self.inner.config;
        let url = self.get_repo_url(identity)?;
        let host = self.host(host_key(&url));
        let mut transient = 0u32;
        let mut limited = 0u32;
        loop {
            match self.attempt(&host, &url, identity).await {
                Ok(repo) => return Ok(repo),
                Err(Failed::Fatal(e)) => return Err(e),
                Err(Failed::RateLimited(wait)) => {
                    limited += 1;
                    if limited > config.max_rate_limited || wait > config.max_rate_limit_wait {
                        return Err(PdsError::RateLimited { retry_after: wait });
                    }
                    // The next attempt sleeps out the host's pause before it starts.
                }
                Err(Failed::Transient(e)) => {
                    transient += 1;
                    if transient > config.max_retries {
                        return Err(e);
                    }
                    let delay = backoff_delay(config.retry_initial, config.retry_max, transient);
                    bump(&self.inner.stats.retries);
                    warn!(
                        did = identity.did.as_str(),
                        host = host.key,
                        reason = e.reason(),
                        error = %e,
                        attempt = transient,
                        retry_in_ms = delay.as_millis() as u64,
                        "getRepo failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One request: wait for the host, send, and read the body into a verified repo.
    async fn attempt(
        &self,
        host: &Host,
        url: &Url,
        identity: &AtprotoIdentity,
    ) -> Result<VerifiedRepo, Failed> {
        let inner = &*self.inner;
        let config = &inner.config;
        host.wait_unpaused(config.max_rate_limit_wait)
            .await
            .map_err(Failed::Fatal)?;
        let slot = host
            .slots
            .acquire()
            .await
            .map_err(|e| Failed::Fatal(PdsError::Internal(e.to_string())))?;
        // A 429 may have paused the host while we waited for a slot.
        host.wait_unpaused(config.max_rate_limit_wait)
            .await
            .map_err(Failed::Fatal)?;
        host.starts.acquire().await;
        bump(&inner.stats.requests);
        let did = identity.did.as_str();
        debug!(did, host = host.key, "getRepo request");
        let send = inner
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/vnd.ipld.car")
            .send();
        let response = match tokio::time::timeout(config.header_timeout, send).await {
            Err(_) => {
                return Err(Failed::Transient(PdsError::Timeout(
                    "no response headers".into(),
                )))
            }
            Ok(Err(e)) => return Err(Failed::Transient(transport_error(&e))),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        if status == 429 {
            bump(&inner.stats.rate_limited);
            let wait = rate_limit_wait(response.headers(), config.default_rate_limit_wait);
            host.pause(wait);
            warn!(
                did,
                host = host.key,
                status,
                wait_ms = wait.as_millis() as u64,
                "PDS rate limit; host paused"
            );
            return Err(Failed::RateLimited(wait));
        }
        if status != 200 {
            let error = xrpc_error_name(response).await;
            let e = PdsError::HttpStatus { status, error };
            debug!(did, host = host.key, status, "getRepo status");
            return Err(if status >= 500 || status == 408 {
                Failed::Transient(e)
            } else {
                Failed::Fatal(e)
            });
        }
        let limit = config.max_repo_bytes;
        if let Some(length) = response.content_length().filter(|&n| n > limit) {
            return Err(Failed::Fatal(PdsError::TooLarge {
                limit,
                content_length: Some(length),
            }));
        }
        let reader = self.read_car(response, limit).await?;
        // The host's part is done: verification and the MST walk need no slot of it.
        drop(slot);
        let did = identity.did.clone();
        let key = identity.signing_key.clone();
        let opts = VerifyOptions::at(now_micros());
        tokio::task::spawn_blocking(move || reader.finish(&did, &key, &opts))
            .await
            .map_err(|e| Failed::Fatal(PdsError::Internal(e.to_string())))?
            .map_err(|e| Failed::Fatal(repo_error(e, limit)))
    }

    /// Streams the body through `iroh-car` into a `RepoReader` (every block hash-checked as it
    /// arrives), counting bytes against `limit`.
    async fn read_car(
        &self,
        response: reqwest::Response,
        limit: u64,
    ) -> Result<RepoReader, Failed> {
        let stats = &self.inner.stats;
        // What went wrong below iroh-car, which turns every reader error into a string.
        let over_limit = Arc::new(AtomicBool::new(false));
        let transport: Arc<Mutex<Option<PdsError>>> = Arc::new(Mutex::new(None));
        let mut received = 0u64;
        let body = {
            let over_limit = over_limit.clone();
            let transport = transport.clone();
            response.bytes_stream().map(move |chunk| match chunk {
                Ok(bytes) => {
                    received += bytes.len() as u64;
                    stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if received > limit {
                        over_limit.store(true, Ordering::Relaxed);
                        return Err(std::io::Error::other("repo over the size limit"));
                    }
                    Ok(bytes)
                }
                Err(e) => {
                    let error = transport_error(&e);
                    let message = error.to_string();
                    *transport.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                    Err(std::io::Error::other(message))
                }
            })
        };
        let classify = |e: iroh_car::Error| -> Failed {
            if over_limit.load(Ordering::Relaxed) {
                return Failed::Fatal(PdsError::TooLarge {
                    limit,
                    content_length: None,
                });
            }
            if let Some(error) = transport.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Failed::Transient(error);
            }
            Failed::Fatal(PdsError::Repo(match e {
                iroh_car::Error::LdReadTooLarge(n) => RepoError::SectionTooLarge(n as u64),
                other => RepoError::Header(other.to_string()),
            }))
        };
        let body = tokio_util::io::StreamReader::new(Box::pin(body));
        let mut car = iroh_car::CarReader::new(body).await.map_err(classify)?;
        let mut reader = RepoReader::new(limit);
        reader.set_roots(car.header().roots().to_vec());
        loop {
            match car.next_block().await {
                Ok(Some((cid, block))) => reader
                    .push_block(cid, block)
                    .map_err(|e| Failed::Fatal(repo_error(e, limit)))?,
                Ok(None) => break,
                Err(e) => return Err(classify(e)),
            }
        }
        // A body error at the very end (after the last whole section) still means a cut-off
        // download.
        if let Some(error) = transport.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(Failed::Transient(error));
        }
        Ok(reader)
    }
}

fn repo_error(e: RepoError, limit: u64) -> PdsError {
    match e {
        RepoError::TooLarge(_) => PdsError::TooLarge {
            limit,
            content_length: None,
        },
        other => PdsError::Repo(other),
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A reqwest failure as ours, with its causes (reqwest's own text is often only "error
/// sending request").
fn transport_error(e: &reqwest::Error) -> PdsError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        PdsError::Timeout(message)
    } else {
        PdsError::Network(message)
    }
}

/// The XRPC `error` name of a failed response, if it has a small JSON body with one.
async fn xrpc_error_name(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        if body.len() + chunk.len() > MAX_ERROR_BODY {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let name = value.get("error")?.as_str()?;
    // Echoed into labels and logs: keep it a short identifier.
    (name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| name.to_owned())
}

/// How long a 429 asks us to wait: the later of `Retry-After` and `RateLimit-Reset`.
pub fn rate_limit_wait(headers: &HeaderMap, default: Duration) -> Duration {
    let now = SystemTime::now();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let until_unix = |secs: u64| {
        (UNIX_EPOCH + Duration::from_secs(secs))
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    };
    let retry_after = header("retry-after").and_then(|v| match v.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(v)
            .ok()
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO)),
    });
    // atproto PDSes send Unix seconds; the IETF draft's delta-seconds are small numbers.
    let reset = header("ratelimit-reset")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|v| {
            if v > 1_000_000_000 {
                until_unix(v)
            } else {
                Duration::from_secs(v)
            }
        });
    let wait = match (retry_after, reset) {
        (None, None) => default,
        (a, b) => a.unwrap_or(Duration::ZERO).max(b.unwrap_or(Duration::ZERO)),
    };
    wait.max(MIN_RATE_LIMIT_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn rate_limit_headers() {
        let d = Duration::from_secs(30);
        assert_eq!(rate_limit_wait(&headers(&[]), d), d);
        assert_eq!(
            rate_limit_wait(&headers(&[("retry-after", "7".into())]), d),
            Duration::from_secs(7)
        );
        assert_eq!(
            rate_limit_wait(&headers(&[("retry-after", "0".into())]), d),
            MIN_RATE_LIMIT_WAIT
        );
        let in_a_minute = SystemTime::now() + Duration::from_secs(61);
        let unix = in_a_minute.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let wait = rate_limit_wait(&headers(&[("ratelimit-reset", unix.to_string())]), d);
        assert!(wait > Duration::from_secs(55) && wait <= Duration::from_secs(61));
        let date = httpdate::fmt_http_date(in_a_minute);
        let wait = rate_limit_wait(&headers(&[("retry-after", date)]), d);
        assert!(wait > Duration::from_secs(55) && wait <= Duration::from_secs(61));
        // Both: the later one.
        let wait = rate_limit_wait(
            &headers(&[
                ("retry-after", "2".into()),
                ("ratelimit-reset", unix.to_string()),
            ]),
            d,
        );
        assert!(wait > Duration::from_secs(55));
        // Garbage: the default.
        assert_eq!(
            rate_limit_wait(&headers(&[("retry-after", "soon".into())]), d),
            d
        );
    }
}
