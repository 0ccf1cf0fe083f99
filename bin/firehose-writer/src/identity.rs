//! DID → atproto identity (signing key, PDS endpoint, handle): the `--did-docs` file, an
//! in-memory cache, a durable SQLite cache with a TTL, and did:plc / did:web resolution over
//! the network, with a per-DID negative cache (exponential backoff) and an overall lookup rate
//! limit.
//!
//! API (what the processor and the resync queue call):
//! - [`IdentityResolver::new`]`(client, config, did_docs, state_path)`: one per process; the
//!   resolver is cheap to clone (an `Arc`) and `Send + Sync`.
//! - [`IdentityResolver::cached`]`(&did) -> Option<Arc<AtprotoIdentity>>`: memory only, no I/O,
//!   no lock held across anything slow: the processor's hot path. `None` when the DID is not in
//!   the `--did-docs` file and not in memory with a fresh (within TTL) document.
//! - [`IdentityResolver::resolve`]`(&did).await`: `--did-docs` → memory → SQLite → network.
//!   During a DID's backoff it answers [`IdentityError::Backoff`] at once, without a request.
//! - [`IdentityResolver::refresh`]`(&did).await`: after an `#identity` event, or once after a
//!   signature failure: bypasses the memory, SQLite and negative caches (not `--did-docs`, which
//!   always wins) and fetches the document again, at most once per DID per
//!   [`IdentityConfig::refresh_interval`] (a stream of bad signatures cannot make us hammer the
//!   PLC): inside that window it returns what memory holds without a request.
//! - [`IdentityResolver::invalidate`]`(&did)`: no I/O; the held document stops answering and
//!   the next `resolve` fetches (an `#identity` event handled in the hot path, with the fetch
//!   left to whoever resolves next).
//! - [`IdentityResolver::stats`]: counters ([`IdentityStats`]) for the metrics.
//! - [`IdentityResolver::prune_sqlite`]`(older_than).await`: deletes old SQLite rows (call it
//!   now and then, e.g. daily with a week).
//!
//! Rules chosen here:
//! - The `--did-docs` file is authoritative and never expires: a DID listed there is never
//!   looked up elsewhere, even when its document in the file is invalid (that is an
//!   `invalid_document` error).
//! - A fetched document is fresh for [`IdentityConfig::ttl`] (24 h) from when it was fetched,
//!   in memory and in SQLite alike (the row keeps the fetch time, so a restart does not make a
//!   day-old document new again).
//! - A failed fetch (`not_found`, `network`, `http_status`, `invalid_document`) puts the DID
//!   into backoff: 30 s, doubling per consecutive failure, at most 1 h; a success clears it.
//!   A `not_found` or `invalid_document` answer also forgets the held document (memory and
//!   SQLite): the DID's own directory entry says it has no usable identity now.
//!   When the failure is one the document's owner did not cause (`network`, `http_status`: the
//!   PLC or the host is down) and an expired document is held, that stale document is served
//!   (stale-if-error) and counted in `stale_served`: a PLC outage does not stop verification of
//!   every repo after a day. A `not_found` or `invalid_document` answer never falls back.
//! - Identifiers are checked before any URL is built: did:plc must be 24 base32 characters;
//!   did:web must be a host name (letters, digits, hyphens, dots) with at most a `%3A`-encoded
//!   port; path-based did:web (`:` in the identifier) and any other percent escape are refused
//!   (`invalid_did`); other methods are `unsupported_method`. did:web uses `https://`, except
//!   for a loopback host (`localhost`, 127.0.0.0/8), which uses plain `http://` and is refused
//!   unless [`IdentityConfig::allow_loopback`] (tests, the local end-to-end setup).
//! - A circuit breaker per host (the PLC, each did:web host): after
//!   [`IdentityConfig::breaker_failures`] outage failures in a row (no answer or a 5xx),
//!   lookups of that host fail at once with [`IdentityError::CircuitOpen`] (a held expired
//!   document is still served) for [`IdentityConfig::breaker_cooldown`], doubling per
//!   re-opening up to `backoff_max`; then one request probes the host, and a success closes the
//!   breaker. During a PLC outage the processor therefore stops waiting up to its identity
//!   timeout for every new DID (each such commit is dropped as `identity_circuit_open` and its
//!   tracked repo queued for a resync, as any identity failure) instead of stalling the stream.
//!   A lookup refused by the breaker puts no DID into backoff: it was decided without asking.
//! - Memory holds at most [`IdentityConfig::max_memory_entries`] DIDs; past that, expired ones
//!   and then arbitrary ones are dropped (SQLite keeps them, so a dropped DID costs one read).
//! - Concurrent lookups of one DID share one request.
//! - A SQLite error never fails a lookup: it is logged and the lookup goes on to the network
//!   (reads) or keeps the result in memory only (writes).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Url;
use rusqlite::{Connection, OptionalExtension};
use serde_json::Value;
use sync_core::did_doc::{parse_did_doc_map, parse_did_document, AtprotoIdentity, DidDocError};
use sync_core::ids::Did;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::net::{backoff_delay, check_remote_url, check_url, is_loopback, RateLimiter, UrlError};

/// Identities from a `--did-docs` file (DID → identity, or why its document is unusable).
pub type DidDocMap = HashMap<Did, Result<AtprotoIdentity, DidDocError>>;

/// Default PLC directory.
pub const DEFAULT_PLC_URL: &str = "https://plc.directory";

/// Settings of the resolver.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// PLC directory base URL (`--plc-url`): `https://`, or `http://` to a loopback host.
    pub plc_url: String,
    /// How long a fetched document is used without asking again.
    pub ttl: Duration,
    /// Least time between two [`IdentityResolver::refresh`] fetches of one DID.
    pub refresh_interval: Duration,
    /// First wait after a failed fetch; doubles per consecutive failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Network lookups per second, over all DIDs (token bucket; a value that is not a positive
    /// finite number means no limit). A lookup waits for its token, it never fails for it.
    pub lookups_per_second: f64,
    /// Lookups that may be made at once after a quiet period.
    pub lookup_burst: u32,
    /// Whole request (headers and body) of one document.
    pub request_timeout: Duration,
    /// Largest document accepted (PLC documents are about 1 KiB).
    pub max_document_bytes: usize,
    /// DIDs held in memory (a few hundred bytes each). Past it, expired entries and then
    /// arbitrary ones are dropped; SQLite still has them.
    pub max_memory_entries: usize,
    /// Outage failures in a row (no answer, 5xx) that open a host's circuit breaker.
    pub breaker_failures: u32,
    /// How long an opened breaker refuses lookups before one probe (doubles per re-opening, up
    /// to `backoff_max`).
    pub breaker_cooldown: Duration,
    /// Whether a did:web may name this machine (`localhost`, 127.0.0.0/8, `::1`). Off in
    /// production: a stranger's DID must not make the writer call its own services. Tests and
    /// the local end-to-end setup turn it on (e.g. when `--plc-url` is itself on loopback).
    pub allow_loopback: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            plc_url: DEFAULT_PLC_URL.to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            refresh_interval: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(30),
            backoff_max: Duration::from_secs(3600),
            lookups_per_second: 10.0,
            lookup_burst: 10,
            request_timeout: Duration::from_secs(15),
            max_document_bytes: 256 * 1024,
            max_memory_entries: 250_000,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            allow_loopback: false,
        }
    }
}

/// Why a DID has no identity. Every variant has a stable label ([`IdentityError::reason`]).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("DID document not found (404/410)")]
    NotFound,
    #[error("network error fetching the DID document: {0}")]
    Network(String),
    #[error("HTTP status {0} fetching the DID document")]
    HttpStatus(u16),
    #[error("invalid DID document: {0}")]
    InvalidDocument(#[from] DidDocError),
    #[error("DID document over {0} bytes")]
    DocumentTooLarge(usize),
    #[error("unsupported DID method {0:?} (did:plc and did:web only)")]
    UnsupportedMethod(String),
    #[error("DID cannot be resolved safely: {0}")]
    InvalidDid(String),
    #[error("resolution URL refused: {0}")]
    Url(#[from] UrlError),
    #[error("DID in backoff for {retry_in:?} after: {last}")]
    Backoff {
        retry_in: Duration,
        last: Box<IdentityError>,
    },
    #[error(
        "{host} failed {failures} lookups in a row: not asked for {retry_in:?} (circuit breaker)"
    )]
    CircuitOpen {
        host: String,
        failures: u32,
        retry_in: Duration,
    },
}

impl IdentityError {
    /// Short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::NotFound => "not_found",
            IdentityError::Network(_) => "network",
            IdentityError::HttpStatus(_) => "http_status",
            IdentityError::InvalidDocument(_) | IdentityError::DocumentTooLarge(_) => {
                "invalid_document"
            }
            IdentityError::UnsupportedMethod(_) => "unsupported_method",
            IdentityError::InvalidDid(_) => "invalid_did",
            IdentityError::Url(UrlError::Loopback(_)) => "loopback_refused",
            IdentityError::Url(_) => "insecure_url",
            IdentityError::Backoff { .. } => "backoff",
            IdentityError::CircuitOpen { .. } => "circuit_open",
        }
    }

    /// The failure behind a [`IdentityError::Backoff`] (itself otherwise).
    pub fn root(&self) -> &IdentityError {
        match self {
            IdentityError::Backoff { last, .. } => last.root(),
            other => other,
        }
    }

    /// Whether the DID's owner had no part in it (the directory or host failed): an expired
    /// document may then still be served.
    fn is_outage(&self) -> bool {
        matches!(
            self,
            IdentityError::Network(_)
                | IdentityError::HttpStatus(_)
                | IdentityError::CircuitOpen { .. }
        )
    }

    /// Whether the host itself failed (what the circuit breaker counts): no answer or a server
    /// error. A 4xx about the DID says the host works.
    fn host_failed(&self) -> bool {
        match self {
            IdentityError::Network(_) => true,
            // A 429 is the host pacing us (the lookup rate limit and each DID's backoff
            // answer it), not an outage.
            IdentityError::HttpStatus(status) => *status >= 500,
            _ => false,
        }
    }
}

/// Why the resolver could not be built.
#[derive(thiserror::Error, Debug)]
pub enum IdentityInitError {
    #[error("--plc-url: {0}")]
    PlcUrl(#[from] UrlError),
    #[error("identity cache in {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("reading DID documents {path}: {message}")]
    DidDocs { path: String, message: String },
}

/// Counters for the metrics (the caller reads them; nothing here resets them).
#[derive(Debug, Default)]
pub struct IdentityStats {
    pub hits_did_docs: AtomicU64,
    pub hits_memory: AtomicU64,
    pub hits_sqlite: AtomicU64,
    /// Lookups that had to go to the network (resolve or refresh).
    pub misses: AtomicU64,
    /// Requests sent.
    pub fetches: AtomicU64,
    /// Refreshes answered from memory because the DID was refreshed too recently.
    pub refreshes_limited: AtomicU64,
    /// Expired documents served because the directory or host was failing.
    pub stale_served: AtomicU64,
    pub errors_not_found: AtomicU64,
    pub errors_network: AtomicU64,
    pub errors_http_status: AtomicU64,
    pub errors_invalid_document: AtomicU64,
    pub errors_unsupported_method: AtomicU64,
    pub errors_invalid_did: AtomicU64,
    pub errors_insecure_url: AtomicU64,
    pub errors_loopback_refused: AtomicU64,
    /// Lookups answered with [`IdentityError::Backoff`] (no request).
    pub errors_backoff: AtomicU64,
    /// Lookups refused by an open circuit breaker (no request).
    pub errors_circuit_open: AtomicU64,
    /// Times a host's breaker opened.
    pub breaker_opened: AtomicU64,
    /// SQLite reads or writes that failed (the lookup went on without the durable cache).
    pub sqlite_errors: AtomicU64,
}

impl IdentityStats {
    fn error(&self, error: &IdentityError) {
        let counter = match error {
            IdentityError::NotFound => &self.errors_not_found,
            IdentityError::Network(_) => &self.errors_network,
            IdentityError::HttpStatus(_) => &self.errors_http_status,
            IdentityError::InvalidDocument(_) | IdentityError::DocumentTooLarge(_) => {
                &self.errors_invalid_document
            }
            IdentityError::UnsupportedMethod(_) => &self.errors_unsupported_method,
            IdentityError::InvalidDid(_) => &self.errors_invalid_did,
            IdentityError::Url(UrlError::Loopback(_)) => &self.errors_loopback_refused,
            IdentityError::Url(_) => &self.errors_insecure_url,
            IdentityError::Backoff { .. } => &self.errors_backoff,
            IdentityError::CircuitOpen { .. } => &self.errors_circuit_open,
        };
        bump(counter);
    }

    /// Errors by reason label, for a `reason`-labelled counter.
    pub fn errors_by_reason(&self) -> [(&'static str, u64); 10] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("not_found", get(&self.errors_not_found)),
            ("network", get(&self.errors_network)),
            ("http_status", get(&self.errors_http_status)),
            ("invalid_document", get(&self.errors_invalid_document)),
            ("unsupported_method", get(&self.errors_unsupported_method)),
            ("invalid_did", get(&self.errors_invalid_did)),
            ("insecure_url", get(&self.errors_insecure_url)),
            ("loopback_refused", get(&self.errors_loopback_refused)),
            ("backoff", get(&self.errors_backoff)),
            ("circuit_open", get(&self.errors_circuit_open)),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads a `--did-docs` file (the format `inspect --did-docs` reads).
pub fn load_did_docs(path: &Path) -> Result<DidDocMap, IdentityInitError> {
    let err = |message: String| IdentityInitError::DidDocs {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse_did_doc_map(&text).map_err(|e| err(e.to_string()))
}

/// What memory holds for one DID.
#[derive(Debug, Default)]
struct Entry {
    /// The last good identity and when its document was fetched.
    identity: Option<(Arc<AtprotoIdentity>, SystemTime)>,
    /// The current run of failures, if the last fetch failed.
    failure: Option<Failure>,
    /// When the last refresh fetch was made (the per-DID refresh limit).
    last_refresh: Option<Instant>,
    /// Set by [`IdentityResolver::invalidate`]: the held document (memory and SQLite) no longer
    /// answers; the next `resolve` fetches.
    invalidated: bool,
}

#[derive(Debug)]
struct Failure {
    error: IdentityError,
    /// Consecutive failures.
    attempts: u32,
    until: Instant,
}

struct Inner {
    client: reqwest::Client,
    config: IdentityConfig,
    plc: Url,
    did_docs: HashMap<Did, Result<Arc<AtprotoIdentity>, IdentityError>>,
    memory: Mutex<HashMap<Did, Entry>>,
    /// Our own connection to the state file (the state store's belongs to the processor).
    db: Option<Arc<Mutex<Connection>>>,
    limiter: RateLimiter,
    /// One lock per DID being fetched, so concurrent lookups share a request.
    inflight: Mutex<HashMap<Did, Arc<tokio::sync::Mutex<()>>>>,
    /// Circuit breakers by host (entries only for hosts that failed).
    breakers: Mutex<HashMap<String, Breaker>>,
    stats: IdentityStats,
}

/// One host's circuit breaker (see the module documentation).
#[derive(Debug, Default)]
struct Breaker {
    /// Outage failures in a row.
    failures: u32,
    /// Times it opened since the host last answered.
    openings: u32,
    /// Refusing lookups until then; a lookup after it is the probe (and re-arms it, so only one
    /// request probes per cooldown).
    open_until: Option<Instant>,
    /// Bumped at every opening: outcomes of requests admitted before it are not counted.
    generation: u64,
}

impl Breaker {
    /// Open and inside its cooldown at `now`: lookups of the host are refused.
    fn refuses_at(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|u| now < u)
    }
}

/// How a request got past its host's breaker.
#[derive(Debug, Clone, Copy)]
enum Admitted {
    Closed { generation: u64 },
    Probe { generation: u64 },
}

/// Hosts with a breaker held (past it, only open ones are kept).
const MAX_BREAKERS: usize = 10_000;

/// See the module documentation.
#[derive(Clone)]
pub struct IdentityResolver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IdentityResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityResolver")
            .field("plc", &self.inner.plc.as_str())
            .field("did_docs", &self.inner.did_docs.len())
            .field("sqlite", &self.inner.db.is_some())
            .finish()
    }
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS identity_cache (
    did TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    fetched_at INTEGER NOT NULL
)";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere mid-update of a cache map; the map is still a
    // valid map, and losing the process over a cache is worse.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl IdentityResolver {
    /// A resolver using `client` (see `net::build_client`). `did_docs` is the `--did-docs` map
    /// (empty without the flag). With `state_path`, documents are also cached durably in that
    /// SQLite file (table `identity_cache`, created if absent) through a connection of the
    /// resolver's own.
    pub fn new(
        client: reqwest::Client,
        config: IdentityConfig,
        did_docs: DidDocMap,
        state_path: Option<&Path>,
    ) -> Result<IdentityResolver, IdentityInitError> {
        let mut plc = check_url(&config.plc_url)?;
        // `{plc}/{did}`: keep a path prefix, without a trailing slash.
        let trimmed = plc.path().trim_end_matches('/').to_owned();
        plc.set_path(&trimmed);
        let db = state_path
            .map(|path| {
                open_cache(path).map_err(|source| IdentityInitError::Sqlite {
                    path: path.display().to_string(),
                    source,
                })
            })
            .transpose()?
            .map(|c| Arc::new(Mutex::new(c)));
        let did_docs = did_docs
            .into_iter()
            .map(|(did, r)| (did, r.map(Arc::new).map_err(IdentityError::from)))
            .collect();
        Ok(IdentityResolver {
            inner: Arc::new(Inner {
                client,
                limiter: RateLimiter::new(config.lookups_per_second, config.lookup_burst),
                config,
                plc,
                did_docs,
                memory: Mutex::new(HashMap::new()),
                db,
                inflight: Mutex::new(HashMap::new()),
                breakers: Mutex::new(HashMap::new()),
                stats: IdentityStats::default(),
            }),
        })
    }

    pub fn stats(&self) -> &IdentityStats {
        &self.inner.stats
    }

    /// The identity if it is at hand without I/O: from `--did-docs`, or fresh in memory.
    pub fn cached(&self, did: &Did) -> Option<Arc<AtprotoIdentity>> {
        let inner = &*self.inner;
        let (identity, from_docs) = self.held(did)?;
        bump(if from_docs {
            &inner.stats.hits_did_docs
        } else {
            &inner.stats.hits_memory
        });
        Some(identity)
    }

    /// [`Self::cached`] without counting a hit: a look ahead that the processor's own lookup
    /// (counted) follows.
    pub fn peek(&self, did: &Did) -> Option<Arc<AtprotoIdentity>> {
        self.held(did).map(|(identity, _)| identity)
    }

    /// A usable held identity, and whether it came from `--did-docs`.
    fn held(&self, did: &Did) -> Option<(Arc<AtprotoIdentity>, bool)> {
        let inner = &*self.inner;
        if let Some(found) = inner.did_docs.get(did) {
            return found.as_ref().ok().map(|id| (id.clone(), true));
        }
        let memory = lock(&inner.memory);
        let entry = memory.get(did)?;
        let (identity, fetched) = entry.identity.as_ref()?;
        (!entry.invalidated && self.fresh(*fetched)).then(|| (identity.clone(), false))
    }

    /// Marks `did`'s held document as out of date without any I/O (e.g. on an `#identity`
    /// event in the processor's hot path): [`Self::cached`] stops returning it and the next
    /// [`Self::resolve`] fetches, skipping SQLite (a running backoff still applies, and during
    /// an outage the old document may still be served, see the module documentation). A DID
    /// from `--did-docs` is not affected.
    pub fn invalidate(&self, did: &Did) {
        let inner = &*self.inner;
        if inner.did_docs.contains_key(did) {
            return;
        }
        let mut memory = lock(&inner.memory);
        self.entry_mut(&mut memory, did).invalidated = true;
    }

    /// DIDs held in memory (for a gauge).
    pub fn memory_entries(&self) -> usize {
        lock(&self.inner.memory).len()
    }

    /// Resolves `did` through every cache, then the network. See the module documentation.
    pub async fn resolve(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, IdentityError> {
        let inner = &*self.inner;
        if let Some(found) = inner.did_docs.get(did) {
            bump(&inner.stats.hits_did_docs);
            return found.clone();
        }
        if let Some(answer) = self.lookup_memory(did) {
            return answer;
        }
        let _flight = self.single_flight(did).await;
        // Another task may have fetched it while we waited for the DID's lock.
        if let Some(answer) = self.lookup_memory(did) {
            return answer;
        }
        let invalidated = lock(&inner.memory).get(did).is_some_and(|e| e.invalidated);
        if invalidated {
            // The SQLite row is the document `invalidate` was called against.
        } else if let Some(identity) = self.lookup_sqlite(did).await {
            bump(&inner.stats.hits_sqlite);
            return Ok(identity);
        }
        bump(&inner.stats.misses);
        self.fetch_and_store(did).await
    }

    /// Fetches `did`'s document again (after `#identity`, or once after a signature failure),
    /// at most once per DID per `refresh_interval`; see the module documentation.
    pub async fn refresh(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, IdentityError> {
        let inner = &*self.inner;
        if let Some(found) = inner.did_docs.get(did) {
            bump(&inner.stats.hits_did_docs);
            return found.clone();
        }
        let _flight = self.single_flight(did).await;
        {
            let mut memory = lock(&inner.memory);
            let entry = self.entry_mut(&mut memory, did);
            let now = Instant::now();
            if let Some(last) = entry.last_refresh {
                if now.saturating_duration_since(last) < inner.config.refresh_interval {
                    bump(&inner.stats.refreshes_limited);
                    debug!(did = did.as_str(), "identity refresh rate-limited");
                    if let Some((identity, _)) = &entry.identity {
                        return Ok(identity.clone());
                    }
                    if let Some(failure) = &entry.failure {
                        let error = IdentityError::Backoff {
                            retry_in: failure.until.saturating_duration_since(now),
                            last: Box::new(failure.error.clone()),
                        };
                        inner.stats.error(&error);
                        return Err(error);
                    }
                }
            }
            // A refresh its host's open breaker refuses asks nothing: it must not spend the
            // DID's allowance (a key rotation announced meanwhile is fetched once it closes).
            if !self.breaker_refuses(did) {
                entry.last_refresh = Some(now);
            }
        }
        bump(&inner.stats.misses);
        self.fetch_and_store(did).await
    }

    /// Whether `did`'s document host has an open breaker now.
    fn breaker_refuses(&self, did: &Did) -> bool {
        let Some(host) = self
            .document_url(did)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
        else {
            return false;
        };
        let now = Instant::now();
        lock(&self.inner.breakers)
            .get(&host)
            .is_some_and(|b| b.refuses_at(now))
    }

    /// The DID's memory entry, created if absent; makes room first when memory is full.
    fn entry_mut<'m>(&self, memory: &'m mut HashMap<Did, Entry>, did: &Did) -> &'m mut Entry {
        let cap = self.inner.config.max_memory_entries.max(1);
        if memory.len() >= cap && !memory.contains_key(did) {
            let now = Instant::now();
            // First what is worth nothing: expired documents with no running backoff.
            memory.retain(|_, e| {
                e.failure.as_ref().is_some_and(|f| f.until > now)
                    || e.identity.as_ref().is_some_and(|(_, t)| self.fresh(*t))
            });
            // Then arbitrary entries (SQLite still has their documents), a tenth at a time so
            // this does not run on every insert.
            if memory.len() >= cap {
                let drop_n = memory.len() - cap * 9 / 10;
                let victims: Vec<Did> = memory.keys().take(drop_n).cloned().collect();
                for victim in victims {
                    memory.remove(&victim);
                }
            }
        }
        memory.entry(did.clone()).or_default()
    }

    /// Deletes SQLite rows fetched longer than `older_than` ago (the cache would otherwise
    /// grow with every DID ever resolved). Returns how many were deleted; a SQLite failure is
    /// logged and counted, and deletes nothing.
    pub async fn prune_sqlite(&self, older_than: Duration) -> usize {
        let inner = &*self.inner;
        let Some(db) = inner.db.clone() else {
            return 0;
        };
        let cutoff = unix_secs(SystemTime::now()) - older_than.as_secs() as i64;
        let result = tokio::task::spawn_blocking(move || {
            lock(&db).execute("DELETE FROM identity_cache WHERE fetched_at < ?1", [cutoff])
        })
        .await;
        match result {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                bump(&inner.stats.sqlite_errors);
                warn!(error = %e, "identity cache prune failed");
                0
            }
            Err(e) => {
                bump(&inner.stats.sqlite_errors);
                warn!(error = %e, "identity cache prune task failed");
                0
            }
        }
    }

    fn fresh(&self, fetched: SystemTime) -> bool {
        SystemTime::now()
            .duration_since(fetched)
            .map(|age| age < self.inner.config.ttl)
            // A fetch time in the future (clock stepped back): treat as fresh.
            .unwrap_or(true)
    }

    /// The memory's answer, if it has one: a fresh identity, or the error of a running
    /// backoff (or a stale identity during an outage's backoff). `None`: go further.
    fn lookup_memory(&self, did: &Did) -> Option<Result<Arc<AtprotoIdentity>, IdentityError>> {
        let inner = &*self.inner;
        let memory = lock(&inner.memory);
        let entry = memory.get(did)?;
        if let Some((identity, fetched)) = &entry.identity {
            if !entry.invalidated && self.fresh(*fetched) {
                bump(&inner.stats.hits_memory);
                return Some(Ok(identity.clone()));
            }
        }
        let failure = entry.failure.as_ref()?;
        let now = Instant::now();
        if failure.until <= now {
            return None;
        }
        if let (Some((identity, _)), true) = (&entry.identity, failure.error.is_outage()) {
            bump(&inner.stats.stale_served);
            return Some(Ok(identity.clone()));
        }
        let error = IdentityError::Backoff {
            retry_in: failure.until.saturating_duration_since(now),
            last: Box::new(failure.error.clone()),
        };
        inner.stats.error(&error);
        Some(Err(error))
    }

    /// Holds the DID's fetch lock until the returned guard is dropped.
    async fn single_flight(&self, did: &Did) -> FlightGuard {
        let lock_for_did = lock(&self.inner.inflight)
            .entry(did.clone())
            .or_default()
            .clone();
        let guard = lock_for_did.clone().lock_owned().await;
        FlightGuard {
            inner: self.inner.clone(),
            did: did.clone(),
            _guard: guard,
            lock: lock_for_did,
        }
    }

    /// A fresh row from SQLite, put into memory.
    async fn lookup_sqlite(&self, did: &Did) -> Option<Arc<AtprotoIdentity>> {
        let inner = &*self.inner;
        let db = inner.db.clone()?;
        let key = did.as_str().to_owned();
        let row = tokio::task::spawn_blocking(move || {
            lock(&db)
                .query_row(
                    "SELECT doc, fetched_at FROM identity_cache WHERE did = ?1",
                    [key],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()
        })
        .await;
        let (doc, fetched_at) = match row {
            Ok(Ok(Some(row))) => row,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                bump(&inner.stats.sqlite_errors);
                warn!(did = did.as_str(), error = %e, "identity cache read failed");
                return None;
            }
            Err(e) => {
                bump(&inner.stats.sqlite_errors);
                warn!(did = did.as_str(), error = %e, "identity cache read task failed");
                return None;
            }
        };
        let fetched = UNIX_EPOCH + Duration::from_secs(u64::try_from(fetched_at).unwrap_or(0));
        if !self.fresh(fetched) {
            return None;
        }
        // Parsed again on every load, so a row written by an older parser gets today's rules.
        let identity = serde_json::from_str::<Value>(&doc)
            .map_err(|e| DidDocError::Json(e.to_string()))
            .and_then(|value| parse_did_document(did, &value));
        match identity {
            Ok(identity) => {
                let identity = Arc::new(identity);
                let mut memory = lock(&inner.memory);
                let entry = self.entry_mut(&mut memory, did);
                entry.identity = Some((identity.clone(), fetched));
                Some(identity)
            }
            Err(e) => {
                warn!(did = did.as_str(), error = %e, "identity cache row no longer parses; refetching");
                None
            }
        }
    }

    /// Fetches the document, then records the outcome in memory (and SQLite on success).
    async fn fetch_and_store(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, IdentityError> {
        let inner = &*self.inner;
        match self.fetch(did).await {
            Ok((identity, doc)) => {
                let identity = Arc::new(identity);
                let now = SystemTime::now();
                {
                    let mut memory = lock(&inner.memory);
                    let entry = self.entry_mut(&mut memory, did);
                    entry.identity = Some((identity.clone(), now));
                    entry.failure = None;
                    entry.invalidated = false;
                }
                self.store(did, doc, unix_secs(now)).await;
                Ok(identity)
            }
            Err(error) => {
                inner.stats.error(&error);
                if matches!(
                    error,
                    IdentityError::UnsupportedMethod(_)
                        | IdentityError::InvalidDid(_)
                        | IdentityError::Url(_)
                ) {
                    // Decided without a request: nothing to back off from.
                    return Err(error);
                }
                if !error.is_outage() {
                    // The document is gone or unusable: a held one (memory or SQLite) must not
                    // answer for the DID any more.
                    self.forget(did).await;
                }
                let mut memory = lock(&inner.memory);
                let entry = self.entry_mut(&mut memory, did);
                if !error.is_outage() {
                    entry.identity = None;
                }
                // Refused by the host's open breaker: the DID was not asked about, so it gets no
                // backoff of its own (a held document still serves, below, as in any outage).
                if !matches!(error, IdentityError::CircuitOpen { .. }) {
                    let attempts = entry.failure.as_ref().map_or(0, |f| f.attempts) + 1;
                    let delay = backoff_delay(
                        inner.config.backoff_initial,
                        inner.config.backoff_max,
                        attempts,
                    );
                    warn!(
                        did = did.as_str(),
                        reason = error.reason(),
                        error = %error,
                        attempts,
                        retry_in_secs = delay.as_secs(),
                        "DID document unavailable"
                    );
                    entry.failure = Some(Failure {
                        error: error.clone(),
                        attempts,
                        until: Instant::now() + delay,
                    });
                }
                if let (Some((identity, _)), true) = (&entry.identity, error.is_outage()) {
                    bump(&inner.stats.stale_served);
                    return Ok(identity.clone());
                }
                Err(error)
            }
        }
    }

    /// Deletes the DID's SQLite row.
    async fn forget(&self, did: &Did) {
        let inner = &*self.inner;
        let Some(db) = inner.db.clone() else {
            return;
        };
        let key = did.as_str().to_owned();
        let result = tokio::task::spawn_blocking(move || {
            lock(&db).execute("DELETE FROM identity_cache WHERE did = ?1", [key])
        })
        .await;
        let error = match result {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        bump(&inner.stats.sqlite_errors);
        warn!(did = did.as_str(), error, "identity cache delete failed");
    }

    async fn store(&self, did: &Did, doc: String, fetched_at: i64) {
        let inner = &*self.inner;
        let Some(db) = inner.db.clone() else {
            return;
        };
        let key = did.as_str().to_owned();
        let result = tokio::task::spawn_blocking(move || {
            lock(&db).execute(
                "INSERT INTO identity_cache (did, doc, fetched_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(did) DO UPDATE SET doc = excluded.doc, fetched_at = excluded.fetched_at",
                rusqlite::params![key, doc, fetched_at],
            )
        })
        .await;
        let error = match result {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        bump(&inner.stats.sqlite_errors);
        warn!(
            did = did.as_str(),
            error, "identity cache write failed (kept in memory)"
        );
    }

    /// Where `did`'s document is, or why we will not ask.
    pub fn document_url(&self, did: &Did) -> Result<Url, IdentityError> {
        match did.method() {
            "plc" => {
                let id = did.method_specific_id();
                let base32 = |b: u8| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b);
                if id.len() != 24 || !id.bytes().all(base32) {
                    return Err(IdentityError::InvalidDid(
                        "did:plc identifier is not 24 base32 characters".into(),
                    ));
                }
                let mut url = self.inner.plc.clone();
                let path = format!("{}/{}", url.path().trim_end_matches('/'), did.as_str());
                url.set_path(&path);
                Ok(url)
            }
            "web" => did_web_url(did.method_specific_id(), self.inner.config.allow_loopback),
            other => Err(IdentityError::UnsupportedMethod(
                other.chars().take(32).collect(),
            )),
        }
    }

    /// One request for `did`'s document: the identity and the document's JSON text.
    async fn fetch(&self, did: &Did) -> Result<(AtprotoIdentity, String), IdentityError> {
        let inner = &*self.inner;
        let url = self.document_url(did)?;
        let host = url.host_str().unwrap_or("").to_owned();
        let admitted = self.breaker_admits(&host)?;
        inner.limiter.acquire().await;
        bump(&inner.stats.fetches);
        let result = self.request(did, url, &host).await;
        self.breaker_record(&host, admitted, result.as_ref().err());
        result
    }

    /// Whether `host`'s breaker lets a request through now (closed, or this is the probe), and
    /// as what: its outcome is counted only for the state it was admitted in.
    fn breaker_admits(&self, host: &str) -> Result<Admitted, IdentityError> {
        let inner = &*self.inner;
        let mut breakers = lock(&inner.breakers);
        let Some(breaker) = breakers.get_mut(host) else {
            return Ok(Admitted::Closed { generation: 0 });
        };
        let Some(until) = breaker.open_until else {
            return Ok(Admitted::Closed {
                generation: breaker.generation,
            });
        };
        let now = Instant::now();
        if now < until {
            return Err(IdentityError::CircuitOpen {
                host: host.to_owned(),
                failures: breaker.failures,
                retry_in: until - now,
            });
        }
        // The probe: the others wait another cooldown while it runs.
        breaker.open_until = Some(now + self.breaker_cooldown(breaker.openings));
        Ok(Admitted::Probe {
            generation: breaker.generation,
        })
    }

    fn breaker_cooldown(&self, openings: u32) -> Duration {
        let config = &self.inner.config;
        backoff_delay(config.breaker_cooldown, config.backoff_max, openings.max(1))
    }

    /// Counts a request's outcome against `host`'s breaker, opening or closing it. A failure
    /// counts only in the state the request was admitted in: requests let through before the
    /// breaker opened (up to 16 repair fetches and the processor's lookups run at once) that
    /// fail after it opened are the same outage, not a failed probe, and must not re-open it
    /// for ever longer; only the probe's failure does.
    fn breaker_record(&self, host: &str, admitted: Admitted, error: Option<&IdentityError>) {
        let inner = &*self.inner;
        let mut breakers = lock(&inner.breakers);
        match error {
            // Neither a failure nor an answer: a 429 (the host pacing us; the rate limit and
            // the DID's backoff deal with it) leaves the breaker as it is.
            Some(IdentityError::HttpStatus(429)) => {}
            Some(e) if e.host_failed() => {
                if breakers.len() >= MAX_BREAKERS && !breakers.contains_key(host) {
                    // did:web hosts are chosen by whoever creates a DID: the closed ones go
                    // first; if they are all open, a new failing host is not tracked.
                    let now = Instant::now();
                    breakers.retain(|_, b| b.refuses_at(now));
                    if breakers.len() >= MAX_BREAKERS {
                        return;
                    }
                }
                let breaker = breakers.entry(host.to_owned()).or_default();
                let reopen = match admitted {
                    Admitted::Probe { generation } => generation == breaker.generation,
                    Admitted::Closed { generation } => {
                        if generation != breaker.generation || breaker.open_until.is_some() {
                            return;
                        }
                        breaker.failures += 1;
                        breaker.failures >= inner.config.breaker_failures.max(1)
                    }
                };
                if reopen {
                    breaker.openings += 1;
                    breaker.generation += 1;
                    let cooldown = self.breaker_cooldown(breaker.openings);
                    breaker.open_until = Some(Instant::now() + cooldown);
                    bump(&inner.stats.breaker_opened);
                    warn!(
                        host,
                        failures = breaker.failures,
                        retry_in_secs = cooldown.as_secs(),
                        "identity lookups of this host fail in a row: not asking it for a while (circuit breaker)"
                    );
                }
            }
            // The host answered (a document, a 404, a bad document): it works.
            _ => {
                if breakers
                    .remove(host)
                    .is_some_and(|b| b.open_until.is_some())
                {
                    tracing::info!(host, "identity lookups of this host work again");
                }
            }
        }
    }

    /// Hosts whose breaker is open now.
    pub fn hosts_refused(&self) -> usize {
        let now = Instant::now();
        lock(&self.inner.breakers)
            .values()
            .filter(|b| b.refuses_at(now))
            .count()
    }

    async fn request(
        &self,
        did: &Did,
        url: Url,
        host: &str,
    ) -> Result<(AtprotoIdentity, String), IdentityError> {
        let inner = &*self.inner;
        debug!(did = did.as_str(), host, "fetching DID document");
        let network = |e: reqwest::Error| IdentityError::Network(error_chain(&e));
        let mut response = inner
            .client
            .get(url)
            .header(
                reqwest::header::ACCEPT,
                "application/did+ld+json, application/json",
            )
            .timeout(inner.config.request_timeout)
            .send()
            .await
            .map_err(network)?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            404 | 410 => return Err(IdentityError::NotFound),
            _ => {
                debug!(
                    did = did.as_str(),
                    host, status, "DID document request failed"
                );
                return Err(IdentityError::HttpStatus(status));
            }
        }
        let max = inner.config.max_document_bytes;
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(IdentityError::DocumentTooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(network)? {
            if body.len() + chunk.len() > max {
                return Err(IdentityError::DocumentTooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| DidDocError::Json(e.to_string()))?;
        let identity = parse_did_document(did, &value)?;
        Ok((identity, value.to_string()))
    }
}

/// Releases a DID's fetch lock and forgets it when nobody else waits for it.
struct FlightGuard {
    inner: Arc<Inner>,
    did: Did,
    _guard: tokio::sync::OwnedMutexGuard<()>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut inflight = lock(&self.inner.inflight);
        // Held by the map, this guard's `lock` and the owned guard: nobody else waits.
        if Arc::strong_count(&self.lock) <= 3 {
            inflight.remove(&self.did);
        }
    }
}

/// The full text of an error and its sources (reqwest's own message is often just "error
/// sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `https://<host>/.well-known/did.json` for a hostname-level did:web (`http://` for loopback
/// hosts, which are refused unless `allow_loopback`). `id` is the method-specific identifier of
/// an already validated DID.
fn did_web_url(id: &str, allow_loopback: bool) -> Result<Url, IdentityError> {
    let invalid = |why: &str| IdentityError::InvalidDid(format!("did:web {why}"));
    if id.contains(':') {
        return Err(invalid("with a path is not supported by atproto"));
    }
    // The only escape allowed is the port separator.
    let (host, port) = match id.find('%') {
        None => (id, None),
        Some(at) => {
            let (host, rest) = id.split_at(at);
            let port = rest
                .get(..3)
                .filter(|p| p.eq_ignore_ascii_case("%3A"))
                .map(|_| &rest[3..])
                .ok_or_else(|| invalid("has a percent escape other than a %3A port"))?;
            let valid = !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
            if !valid {
                return Err(invalid("port is not a number from 1 to 65535"));
            }
            (host, Some(port))
        }
    };
    let host = host.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(invalid("host is not a valid host name"));
    }
    let authority = match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    let mut url = Url::parse(&format!("https://{authority}/.well-known/did.json"))
        .map_err(|_| invalid("does not form a URL"))?;
    // The loopback test is made on what `Url` made of the host (numeric forms normalised).
    if is_loopback(&url) {
        url.set_scheme("http")
            .map_err(|()| invalid("does not form a URL"))?;
    }
    check_remote_url(url.as_str(), allow_loopback)?;
    Ok(url)
}

fn open_cache(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    // The state store (another thread, another connection) writes the same file: wait for its
    // commits instead of failing with SQLITE_BUSY.
    conn.busy_timeout(Duration::from_secs(10))?;
    // Already set by the state store; repeated here so a resolver opened first (tests) still
    // lets readers and the writer work side by side. The setting is persistent and idempotent.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // `secure_delete` is per connection: this one replaces and forgets cached documents (which
    // name their DID) too, so its freed cells are zeroed like the state store's (consent
    // withdrawal erases physically, `state/withdrawn.rs`).
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.execute_batch(CREATE_TABLE)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_web_urls() {
        let ok = |id: &str| did_web_url(id, true).map(|u| u.to_string());
        assert_eq!(
            ok("example.com").unwrap(),
            "https://example.com/.well-known/did.json"
        );
        assert_eq!(
            ok("localhost%3A8080").unwrap(),
            "http://localhost:8080/.well-known/did.json"
        );
        assert_eq!(
            ok("127.0.0.1%3a9").unwrap(),
            "http://127.0.0.1:9/.well-known/did.json"
        );
        assert_eq!(
            ok("Example.COM%3A443").unwrap(),
            "https://example.com/.well-known/did.json"
        );
        for bad in [
            "example.com:user:alice",
            "example.com%2Fpath",
            "example.com%3A",
            "example.com%3A99999",
            "example.com%3A80%2F",
            "..",
            "-bad.example",
            "a..b",
            "%3A80",
        ] {
            assert!(
                matches!(did_web_url(bad, true), Err(IdentityError::InvalidDid(_))),
                "{bad}"
            );
        }
        // Loopback hosts only when allowed.
        for host in [
            "localhost",
            "localhost%3A2583",
            "127.0.0.1",
            "127.0.0.9%3A80",
            "0.0.0.0",
        ] {
            assert!(
                matches!(
                    did_web_url(host, false),
                    Err(IdentityError::Url(UrlError::Loopback(_)))
                ),
                "{host}"
            );
        }
        assert!(did_web_url("example.com", false).is_ok());
    }
}
