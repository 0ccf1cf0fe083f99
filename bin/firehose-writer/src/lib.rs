//! firehose-writer library: the long-running writer ([`run`]) and `inspect`, callable in-process.
//!
//! Data flow: source (relay WebSocket or replay file) -> bounded channel -> processor thread
//! (decode, dedupe, route, write, durability barrier, cursor commit). See ARCHITECTURE.md.

pub mod cache;
pub mod config;
mod fault;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod pds;
pub mod processor;
pub mod repair;
pub mod source;
pub mod state;
pub mod tracked;
pub mod verifier;
pub mod withdrawn;

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use sync_core::did_doc::{parse_did_doc_map, AtprotoIdentity, DidDocError};
use sync_core::frame::{capture_frames, decode_frame, Event};
use sync_core::ids::Did;
use sync_core::jetstream::event_lines;
use sync_core::verify::{verify_commit, verify_sync, VerifyOptions};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use cache::CacheWriter;
pub use config::{Args, Config, Source};
pub use metrics::Metrics;
pub use processor::ProcessorSummary;

/// Batches buffered between the socket and the processor (backpressure). A batch holds at most
/// 64 frames or 512 KiB (plus the frame that crossed the limit), so the queue holds ~8 MiB of
/// typical frames and at most ~90 MiB if every batch ended on a 5 MiB frame. With verification
/// on, a second queue of this depth lies between the verification stage and the processor.
pub const CHANNEL_BATCHES: usize = 16;

/// Handles a running writer exposes to its caller (tests read metrics and the HTTP address).
pub struct Handles {
    pub metrics: Arc<Metrics>,
    pub metrics_addr: Option<SocketAddr>,
}

/// An error a restart cannot fix: a human must change the configuration or the input files
/// (the binary exits with [`EXIT_NEEDS_OPERATOR`], which the systemd unit does not restart).
#[derive(Debug)]
pub struct NeedsOperator(pub String);

impl std::fmt::Display for NeedsOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NeedsOperator {}

/// Exit code for invalid arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a [`NeedsOperator`] error.
pub const EXIT_NEEDS_OPERATOR: u8 = 3;

/// The exit code for a failed run: [`EXIT_NEEDS_OPERATOR`] or 1 (a restart may help).
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.chain().any(|c| c.is::<NeedsOperator>()) {
        EXIT_NEEDS_OPERATOR
    } else {
        1
    }
}

/// Loads the study-user and in-network files named by the configuration.
pub fn load_tracked(config: &Config) -> Result<(tracked::DidSet, tracked::DidSet)> {
    let study = tracked::load_dids(&config.study_users, tracked::Table::StudyUsers)
        .with_context(|| format!("loading study users from {}", config.study_users.display()))?;
    let in_network = match &config.in_network {
        Some(path) => tracked::load_dids(path, tracked::Table::SocialNetwork)
            .with_context(|| format!("loading in-network users from {}", path.display()))?,
        None => tracked::DidSet::default(),
    };
    Ok((study, in_network))
}

/// One writer per state file: a second one would interleave cursors and delete the first one's
/// temp files at start-up. The lock is held until the returned file is dropped.
fn lock_instance(state: &Path) -> Result<std::fs::File> {
    let mut path = state.to_path_buf().into_os_string();
    path.push(".lock");
    let path = std::path::PathBuf::from(path);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        // A restart cannot take the lock while the other writer runs: exit 3, not a restart loop.
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::Error::new(NeedsOperator(format!(
            "another firehose-writer is running with state {} (lock {} is held): stop it, or give this one its own --state",
            state.display(),
            path.display()
        )))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Seeds the study-post index so reactions to posts made before this state existed are routed:
/// from `--study-posts` (every start) and, when the index is empty, from study posts in the cache.
fn seed_study_posts(state: &mut state::StateStore, config: &Config) -> Result<()> {
    let mut seeded = 0;
    if let Some(path) = &config.study_posts {
        let posts = tracked::load_study_post_map(path)?;
        seeded += state.seed_study_posts(posts)?;
    }
    if state.study_post_count() == 0 {
        seeded += state.seed_study_posts(tracked::study_posts_in_cache(&config.cache_dir))?;
    }
    if seeded > 0 {
        state
            .commit(state.cursor())
            .context("saving the seeded study posts")?;
        info!(seeded, "study-post index seeded");
    }
    Ok(())
}

/// Installs one rustls crypto provider for the process: with both ring and aws-lc compiled into
/// the workspace, rustls cannot pick one by itself and the first `wss://` connect would panic.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the writer until `shutdown` resolves (or the replay file ends), then drains the channel,
/// makes everything durable and commits the cursor. `reload` triggers a reload of the tracked
/// files (SIGHUP in the binary). `on_start` receives the handles once the writer is up.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reload: Option<mpsc::Receiver<()>>,
    on_start: impl FnOnce(Handles),
) -> Result<ProcessorSummary> {
    install_crypto_provider();
    fault::check()?;
    let _instance = lock_instance(&config.state)?;
    let (study, in_network) =
        load_tracked(&config).map_err(|e| anyhow::Error::new(NeedsOperator(format!("{e:#}"))))?;
    info!(
        study_users = study.len(),
        in_network = in_network.len(),
        "tracked sets loaded"
    );
    let withdrawn = withdrawn::load_configured(config.withdrawn.as_deref())
        .map_err(|e| anyhow::Error::new(NeedsOperator(format!("{e:#}"))))?;
    if let (true, Some(list)) = (config.account_deleted_is_withdrawal, &config.withdrawn) {
        withdrawn::check_appendable(list)
            .map_err(|e| anyhow::Error::new(NeedsOperator(format!("{e:#}"))))?;
    }
    let mut state = state::StateStore::open_with_sets(&config.state, study, in_network)?;
    // Before anything reads the sets (seeding, backfills): a withdrawn DID is never tracked.
    let purge_at_start = state.set_withdrawn(withdrawn)?;
    seed_study_posts(&mut state, &config)?;
    let cache = CacheWriter::open(&config.cache_dir)
        .with_context(|| format!("opening cache root {}", config.cache_dir.display()))?;
    let cleanup = cache.remove_stale_temps();
    if cleanup.removed > 0 {
        info!(
            removed = cleanup.removed,
            "removed temp files left by an earlier crash"
        );
    }
    // The `--cursor` value, unless an earlier start applied it already.
    let requested = match config.cursor {
        Some(requested) if apply_cursor_flag(&mut state, requested)? => Some(requested),
        _ => None,
    };
    let start_cursor = requested.or(state.cursor());
    let start_cursor = match &config.source {
        Source::Relay(url) => check_upstream(&mut state, &config, url, start_cursor, requested)?,
        // A capture does not say which relay it came from; its frames at or below the stored
        // cursor are skipped by design, and the stored relay identity stays as it was.
        Source::Replay(_) => start_cursor,
    };
    info!(cursor = ?start_cursor, stored = ?state.cursor(), "starting");

    let metrics = Metrics::new();
    let relay = matches!(config.source, Source::Relay(_));
    metrics.configure_health(
        config.commit_interval,
        relay.then_some(config.stall_timeout),
    );
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    metrics.watch_channel(&tx);
    // Stops serving when `run` returns.
    let server = match config.metrics_addr {
        Some(addr) => Some(http::serve(addr, metrics.clone()).await?),
        None => None,
    };
    on_start(Handles {
        metrics: metrics.clone(),
        metrics_addr: server.as_ref().map(http::Server::local_addr),
    });

    let (verification, repairs) = repair_machinery(&config, &metrics, &tx)?;
    let durable_cursor = Arc::new(AtomicI64::new(-1));
    let stopping = Arc::new(AtomicBool::new(false));
    // Commits are verified on a thread of their own ahead of the processor (see
    // `verifier::VerifyStage`); without verification the processor reads the channel itself.
    let stage = match &verification.identities {
        Some(identities) if verification.mode != config::VerifyMode::Off => {
            Some(verifier::VerifyStage {
                mode: verification.mode,
                identities: identities.clone(),
                membership: state.shared_membership(),
                threads: verifier::verify_threads(verification.mode),
            })
        }
        _ => None,
    };
    let rx = match stage {
        Some(stage) => {
            // As deep as the source's queue: while the processor waits for a barrier (the
            // disk), the stage goes on verifying what the source has read (BENCHMARKS.md).
            let (stage_tx, processor_rx) = mpsc::channel(CHANNEL_BATCHES);
            metrics.watch_channel(&stage_tx);
            std::thread::Builder::new()
                .name("verify".into())
                .spawn(move || stage.run(rx, stage_tx))
                .context("starting the verification thread")?;
            processor_rx
        }
        None => rx,
    };
    let processor = processor::Processor::new(
        cache,
        state,
        metrics.clone(),
        start_cursor,
        config.commit_interval,
        durable_cursor.clone(),
        stopping.clone(),
    )
    .with_withdrawals(processor::Withdrawals {
        account_deleted: config.account_deleted_is_withdrawal,
        list: config.withdrawn.clone(),
        at_start: purge_at_start,
    })
    .with_repairs(verification, repairs);
    // The thread reports its end on a channel the source is raced against: a processor that
    // stops (a failed flush, a panic) ends the run at once, not at the next frame.
    let (processor_tx, mut processor_done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("processor".into())
        .spawn(move || {
            let _ = processor_tx.send(processor.run(rx));
        })
        .context("starting the processor thread")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    {
        let stopping = stopping.clone();
        tokio::spawn(async move {
            shutdown.await;
            info!("shutdown requested: draining in-flight frames");
            stopping.store(true, Ordering::Relaxed);
            let _ = shutdown_tx.send(true);
        });
    }
    // Ticks make sure the cursor is committed on time while frames are scarce.
    {
        let tx = tx.clone();
        let interval = config.commit_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if tx.send(Input::Tick).await.is_err() {
                    return;
                }
            }
        });
    }
    if let Some(mut reload_rx) = reload.take() {
        let tx = tx.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while reload_rx.recv().await.is_some() {
                let cfg = config.clone();
                // Both files or neither: a withdrawn list that does not parse keeps the old one,
                // and the study users with it.
                let load = move || -> Result<_> {
                    let withdrawn = withdrawn::load_configured(cfg.withdrawn.as_deref())?;
                    Ok((load_tracked(&cfg)?, withdrawn))
                };
                match tokio::task::spawn_blocking(load).await {
                    Ok(Ok(((study, in_network), withdrawn))) => {
                        if tx.send(Input::Withdrawn(withdrawn)).await.is_err()
                            || tx.send(Input::Reload(study, in_network)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the current tracked sets")
                    }
                    Err(e) => {
                        metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "reload task failed")
                    }
                }
            }
        });
    }

    let source = async {
        match &config.source {
            Source::Replay(path) => {
                source::replay(path, tx.clone(), metrics.clone(), shutdown_rx).await
            }
            Source::Relay(url) => {
                source::RelaySource {
                    url: url.clone(),
                    start_cursor,
                    stall_timeout: config.stall_timeout,
                    max_backoff: config.max_backoff,
                    on_future_cursor: config.on_future_cursor,
                    metrics: metrics.clone(),
                    durable_cursor,
                    max_message_bytes: source::WS_MAX_MESSAGE,
                }
                .run(tx.clone(), shutdown_rx)
                .await
            }
        }
    };
    let source_result = tokio::select! {
        biased;
        done = &mut processor_done => return Err(processor_stopped(done)),
        result = source => result,
    };
    let _ = tx.send(Input::End).await;
    drop(tx);
    let summary = match processor_done.await {
        Ok(result) => result?,
        Err(_) => return Err(anyhow!("the processor thread panicked")),
    };
    source_result?;
    Ok(summary)
}

/// Verification keys and the backfill/resync fetcher, as the configuration asks.
///
/// A replay without backfill is offline: keys come from `--did-docs` only and nothing is
/// fetched (a resync queued meanwhile waits for a networked run). Otherwise DID documents come
/// from `--did-docs`, then the resolver's caches, then the PLC directory (did:plc) or the DID's
/// host (did:web), and a fetcher task downloads repos from their PDS. Loopback hosts in DID
/// documents (a PDS on this machine) are allowed only when the PLC directory itself is on
/// loopback (a local test network): a stranger's document must not point the writer at its own
/// services.
fn repair_machinery(
    config: &Config,
    metrics: &Arc<Metrics>,
    tx: &mpsc::Sender<Input>,
) -> Result<(processor::Verification, processor::Repairs)> {
    use config::VerifyMode;
    use processor::{Repairs, Verification};
    let offline = matches!(config.source, Source::Replay(_)) && !config.backfill;
    let mut repairs = Repairs {
        requests: None,
        backfill: config.backfill,
        backfill_since: config.backfill_since,
    };
    if offline {
        let identities: Option<Arc<dyn verifier::Identities>> = match (
            &config.did_docs,
            config.verify,
        ) {
            (_, VerifyMode::Off) => None,
            (Some(path), _) => Some(Arc::new(verifier::StaticIdentities::load(path)?)),
            (None, _) => {
                warn!("--verify without --did-docs while replaying offline: every commit that needs verification fails with no_did_document and is dropped");
                Some(Arc::new(verifier::StaticIdentities::default()))
            }
        };
        return Ok((
            Verification {
                mode: config.verify,
                identities,
            },
            repairs,
        ));
    }
    let loopback = url::Url::parse(&config.plc_url)
        .map(|u| net::is_loopback(&u))
        .unwrap_or(false);
    let client =
        net::build_client(&net::HttpConfig::default()).context("building the HTTP client")?;
    let docs = match &config.did_docs {
        Some(path) => identity::load_did_docs(path)
            .map_err(|e| anyhow::Error::new(NeedsOperator(format!("{e:#}"))))?,
        None => Default::default(),
    };
    let resolver = identity::IdentityResolver::new(
        client.clone(),
        identity::IdentityConfig {
            plc_url: config.plc_url.clone(),
            allow_loopback: loopback,
            lookups_per_second: config.plc_rate,
            // Up to a second's worth at once.
            lookup_burst: (config.plc_rate.ceil() as u32).max(1),
            ..Default::default()
        },
        docs,
        Some(&config.state),
    )
    .map_err(|e| anyhow::Error::new(NeedsOperator(format!("{e:#}"))))?;
    {
        let resolver = resolver.clone();
        metrics.watch_identity_hosts_refused(move || resolver.hosts_refused() as u64);
    }
    {
        let resolver = resolver.clone();
        metrics.watch_identity_lookups(move || {
            let s = resolver.stats();
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let mut out = vec![
                ("hit_did_docs", get(&s.hits_did_docs)),
                ("hit_memory", get(&s.hits_memory)),
                ("hit_state", get(&s.hits_sqlite)),
                ("miss", get(&s.misses)),
                ("fetch", get(&s.fetches)),
                ("stale_served", get(&s.stale_served)),
                ("breaker_opened", get(&s.breaker_opened)),
            ];
            out.extend(
                s.errors_by_reason()
                    .into_iter()
                    .map(|(reason, n)| (repair_error_label(reason), n)),
            );
            out
        });
    }
    let pds = pds::PdsClient::new(
        client,
        pds::PdsConfig {
            concurrency_per_host: config.pds_concurrency,
            rate_per_host: config.pds_rate,
            max_repo_bytes: config.max_repo_bytes,
            allow_loopback: loopback,
            ..Default::default()
        },
    );
    let (requests, requests_rx) = tokio::sync::mpsc::unbounded_channel();
    repairs.requests = Some(requests);
    tokio::spawn(repair::run_fetcher(
        requests_rx,
        tx.clone(),
        resolver.clone(),
        pds,
        config.repo_fetch_timeout,
    ));
    let identities: Option<Arc<dyn verifier::Identities>> = (config.verify != VerifyMode::Off)
        .then(|| {
            Arc::new(repair::ResolverIdentities {
                resolver,
                runtime: tokio::runtime::Handle::current(),
                timeout: std::time::Duration::from_secs(30),
            }) as Arc<dyn verifier::Identities>
        });
    Ok((
        Verification {
            mode: config.verify,
            identities,
        },
        repairs,
    ))
}

/// `error_<reason>` for the identity lookup metric.
fn repair_error_label(reason: &'static str) -> &'static str {
    match reason {
        "not_found" => "error_not_found",
        "network" => "error_network",
        "http_status" => "error_http_status",
        "invalid_document" => "error_invalid_document",
        "unsupported_method" => "error_unsupported_method",
        "invalid_did" => "error_invalid_did",
        "insecure_url" => "error_insecure_url",
        "loopback_refused" => "error_loopback_refused",
        "backoff" => "error_backoff",
        "circuit_open" => "error_circuit_open",
        _ => "error_other",
    }
}

/// The error for a processor that stopped before the source did.
fn processor_stopped(
    done: Result<Result<ProcessorSummary>, tokio::sync::oneshot::error::RecvError>,
) -> anyhow::Error {
    match done {
        Ok(Err(e)) => e.context("the processor stopped; nothing more can be handled"),
        Ok(Ok(_)) => anyhow!("the processor stopped before the source"),
        Err(_) => anyhow!("the processor thread panicked"),
    }
}

/// A cursor means something only to the upstream that assigned it: refuses to start against
/// another one unless the operator said where to start (`requested`: a `--cursor` applied by
/// this start) or allowed a live tail, and records the configured upstream to be stored with the
/// next cursor. Returns the start cursor.
fn check_upstream(
    state: &mut state::StateStore,
    config: &Config,
    url: &str,
    start_cursor: Option<i64>,
    requested: Option<i64>,
) -> Result<Option<i64>> {
    let configured = source::upstream_id(url);
    let mut start_cursor = start_cursor;
    if let (None, Some(cursor)) = (state.upstream(), state.cursor()) {
        // A state from before upstreams were recorded: the best guess is the configured one.
        info!(upstream = %configured, cursor, "the stored cursor has no upstream recorded; taking it as the configured upstream's");
    }
    if let (Some(stored), Some(cursor)) = (state.upstream().map(str::to_owned), state.cursor()) {
        if stored != configured {
            if let Some(requested) = requested {
                warn!(stored = %stored, upstream = %configured, cursor = requested, "another upstream than the stored cursor's: starting from --cursor");
            } else if config.on_future_cursor == config::FutureCursorPolicy::Live {
                tracing::error!(stored = %stored, upstream = %configured, cursor, "the stored cursor belongs to another upstream; --on-future-cursor=live: tailing {configured} live (events since the stored cursor are not captured)");
                start_cursor = None;
            } else {
                return Err(anyhow::Error::new(NeedsOperator(format!(
                    "the stored cursor {cursor} is a seq of {stored}, but --relay is {configured}: seqs of one upstream mean nothing to another. Point --relay back at {stored}, or pass --cursor N (a seq of {configured}) or run `firehose-writer set-cursor N`, or set --on-future-cursor=live to tail {configured} live (events since the stored cursor are not captured)"
                ))));
            }
        }
    }
    state.set_upstream(configured);
    Ok(start_cursor)
}

use processor::Input;

/// `--cursor N` / `FIREHOSE_CURSOR`: applied once (recorded in the state with the first commit),
/// so the value left in an environment file does not rewind every restart. True when applied.
fn apply_cursor_flag(state: &mut state::StateStore, requested: i64) -> Result<bool> {
    use state::CursorChange;
    let stored = state.cursor();
    let change = state
        .apply_cursor_flag(requested)
        .context("applying --cursor")?;
    match change {
        None => info!(
            cursor = requested,
            ?stored,
            "--cursor / FIREHOSE_CURSOR {requested} was already applied by an earlier start: resuming from the stored cursor (use `firehose-writer set-cursor` to apply it again)"
        ),
        Some(CursorChange::First | CursorChange::Unchanged) => {
            info!(cursor = requested, "cursor set by --cursor / FIREHOSE_CURSOR")
        }
        Some(CursorChange::Rewound { from }) => warn!(
            cursor = requested,
            stored = from,
            "rewinding below the stored cursor: tracked accounts' events after it are captured again"
        ),
        Some(CursorChange::SkippedForward { from }) => warn!(
            cursor = requested,
            stored = from,
            "skipping forward past the stored cursor: events after the stored cursor up to this one will NEVER be captured"
        ),
    }
    Ok(change.is_some())
}

/// `firehose-writer set-cursor N`: sets the stored cursor of a writer that is not running (its
/// lock is taken first), in one transaction with what it implies (see [`state::set_cursor`]).
pub fn set_cursor(state_path: &Path, cursor: i64) -> Result<state::CursorChange> {
    // Checked before locking, so a mistyped path leaves no lock file behind.
    if !state_path.is_file() {
        anyhow::bail!(
            "no state database at {} (a first start takes --cursor instead)",
            state_path.display()
        );
    }
    let _instance = lock_instance(state_path)?;
    state::set_cursor(state_path, cursor)
}

/// Counts reported by [`inspect`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InspectSummary {
    pub frames: u64,
    pub lines: u64,
    pub invalid_frames: u64,
    /// `#commit` and `#sync` events that passed verification (only with DID documents).
    pub verified: u64,
    /// `#commit` and `#sync` events that failed it, whatever the reason.
    pub verify_failed: u64,
}

/// Identities read from a `--did-docs` file: DID -> signing key, or why there is none.
type IdentityMap = HashMap<Did, Result<AtprotoIdentity, DidDocError>>;

fn load_did_docs(path: &Path) -> Result<IdentityMap> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading DID documents {}", path.display()))?;
    parse_did_doc_map(&text).with_context(|| format!("parsing DID documents {}", path.display()))
}

/// The verdict of one event against the DID documents: `"ok"` or a reason label.
fn verdict(event: &Event<'_>, identities: &IdentityMap, opts: &VerifyOptions) -> Option<String> {
    let did = match event {
        Event::Commit(c) => &c.repo,
        Event::Sync(s) => &s.did,
        _ => return None,
    };
    let key = match identities.get(did) {
        None => return Some("no_did_document".into()),
        Some(Err(e)) => return Some(format!("bad_did_document:{}", e.reason())),
        Some(Ok(identity)) => &identity.signing_key,
    };
    let result = match event {
        Event::Commit(c) => verify_commit(c, key, opts).map(|_| ()),
        Event::Sync(s) => verify_sync(s, key, opts).map(|_| ()),
        _ => return None,
    };
    Some(match result {
        Ok(()) => "ok".into(),
        Err(e) => e.reason().into(),
    })
}

/// Reads a capture (`[u32 LE length][frame]...`) and writes one JSON line per event to `out`.
///
/// A frame that does not decode becomes a `{"kind": "invalid_frame", ...}` line and the rest of
/// the capture is still printed; a truncated capture is an error after everything readable.
/// With `did_docs`, every line of a `#commit` or `#sync` event gains `"verify"`: `"ok"` or the
/// reason it failed (the clock for the future-rev check is this machine's).
pub fn inspect(
    capture: &Path,
    did_docs: Option<&Path>,
    out: &mut dyn Write,
) -> Result<InspectSummary> {
    let identities = did_docs.map(load_did_docs).transpose()?;
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let opts = VerifyOptions::at(now_micros);
    let data =
        std::fs::read(capture).with_context(|| format!("reading capture {}", capture.display()))?;
    let mut summary = InspectSummary::default();
    for (index, frame) in capture_frames(&data).enumerate() {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                out.flush()?;
                return Err(e).with_context(|| {
                    format!(
                        "capture {} is truncated after {} frames",
                        capture.display(),
                        summary.frames
                    )
                });
            }
        };
        summary.frames += 1;
        let lines = match decode_frame(frame) {
            Ok(event) => {
                let mut lines = event_lines(&event);
                if let Some(verdict) = identities
                    .as_ref()
                    .and_then(|ids| verdict(&event, ids, &opts))
                {
                    if verdict == "ok" {
                        summary.verified += 1;
                    } else {
                        summary.verify_failed += 1;
                    }
                    // A commit without ops renders no Jetstream line, but its verdict must
                    // still be visible.
                    if lines.is_empty() {
                        if let Event::Commit(c) = &event {
                            lines.push(serde_json::json!({
                                "did": c.repo.as_str(),
                                "kind": "commit",
                                "seq": c.seq.0,
                                "commit": {"rev": c.rev.as_str(), "ops": 0},
                            }));
                        }
                    }
                    for line in &mut lines {
                        line["verify"] = serde_json::Value::String(verdict.clone());
                    }
                }
                lines
            }
            Err(e) => {
                summary.invalid_frames += 1;
                vec![serde_json::json!({
                    "kind": "invalid_frame",
                    "frame_index": index,
                    "reason": e.reason(),
                    "error": e.to_string(),
                })]
            }
        };
        for line in lines {
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
            summary.lines += 1;
        }
    }
    out.flush()?;
    Ok(summary)
}
