//! Command-line flags (each with an environment variable) and the validated writer configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

/// Default relay: the Bluesky network relay.
pub const DEFAULT_RELAY: &str = "wss://bsky.network";

/// Follows the atproto firehose and routes study users' records into the JSON cache.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Relay or PDS to follow (ws:// or wss://); the subscribeRepos path is added when missing.
    #[arg(long, env = "FIREHOSE_RELAY", default_value = DEFAULT_RELAY)]
    pub relay: String,

    /// Process this capture file (`[u32 LE length][frame]...`) instead of the socket, then exit.
    #[arg(long, env = "FIREHOSE_REPLAY")]
    pub replay: Option<PathBuf>,

    /// Cache root the routed JSON files are written under.
    #[arg(long, env = "FIREHOSE_CACHE_DIR", default_value = "./__local_cache__")]
    pub cache_dir: PathBuf,

    /// State database (SQLite): cursor, study-post, follow and routed-record indexes.
    #[arg(
        long,
        env = "FIREHOSE_STATE",
        default_value = "./firehose-state.sqlite"
    )]
    pub state: PathBuf,

    /// Study users: a text file of DIDs (one per line, `#` comments) or a CSV/Parquet table with a
    /// `bluesky_user_did` column.
    /// (Required to run the writer; not needed by `inspect`.)
    #[arg(long, env = "FIREHOSE_STUDY_USERS")]
    pub study_users: Option<PathBuf>,

    /// In-network users: a text file of DIDs or the predecessor's social-network table (CSV,
    /// Parquet file or Parquet dataset directory; `follow_did` where
    /// `relationship_to_study_user == "follow"`).
    #[arg(long, env = "FIREHOSE_IN_NETWORK")]
    pub in_network: Option<PathBuf>,

    /// Extra study posts for the study-post index: the predecessor's
    /// `post_uri_to_study_user_did.json` (`{"at://...": "did:..."}`). Loaded at every start.
    #[arg(long, env = "FIREHOSE_STUDY_POSTS")]
    pub study_posts: Option<PathBuf>,

    /// Participants who withdrew their consent: a text file of DIDs (one per line, `#`
    /// comments), reloaded on SIGHUP. Nothing by or about them is routed again; their cache
    /// files and index entries are removed (README, "Consent withdrawal").
    #[arg(long, env = "FIREHOSE_WITHDRAWN", value_name = "FILE")]
    pub withdrawn: Option<PathBuf>,

    /// Treat an `#account` event with status `deleted` of a study user as a consent withdrawal
    /// (kept in the state across restarts). Off by default: a deleted account can come back.
    #[arg(long, env = "FIREHOSE_ACCOUNT_DELETED_IS_WITHDRAWAL")]
    pub account_deleted_is_withdrawal: bool,

    /// Start after this seq instead of the stored cursor. Applied once: the value is recorded in
    /// the state, and a later start with the same value resumes from the stored cursor (so it
    /// may stay in an environment file). A value below the stored cursor forgets the per-repo
    /// revs, so the range is captured again.
    #[arg(long, env = "FIREHOSE_CURSOR")]
    pub cursor: Option<i64>,

    /// Reconnect when no event arrives for this many seconds while the socket is open.
    #[arg(long, env = "FIREHOSE_STALL_TIMEOUT", default_value_t = 60)]
    pub stall_timeout: u64,

    /// What to do when the relay answers FutureCursor: `exit` (non-zero) or `live` (drop the
    /// cursor and tail live: events between the cursor and now are lost).
    #[arg(long, env = "FIREHOSE_ON_FUTURE_CURSOR", value_enum, default_value_t = FutureCursorPolicy::Exit)]
    pub on_future_cursor: FutureCursorPolicy,

    /// Address of the /health and /metrics HTTP endpoint.
    #[arg(long, env = "FIREHOSE_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "FIREHOSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Longest time between durability barriers (fsync + cursor commit), in milliseconds.
    #[arg(long, env = "FIREHOSE_COMMIT_INTERVAL_MS", default_value_t = 500)]
    pub commit_interval_ms: u64,

    /// Longest backoff between reconnects, in seconds.
    #[arg(long, env = "FIREHOSE_MAX_BACKOFF", default_value_t = 60)]
    pub max_backoff: u64,

    /// Start on a Linux kernel older than 5.8, whose syncfs does not report writeback errors:
    /// every cache file is then fsynced one by one (slower). Without it such a kernel is refused.
    #[arg(long, env = "FIREHOSE_ALLOW_OLD_KERNEL")]
    pub allow_old_kernel: bool,

    /// PLC directory did:plc documents are resolved from (did:web documents come from
    /// `https://<host>/.well-known/did.json`).
    #[arg(long, env = "FIREHOSE_PLC_URL", default_value = DEFAULT_PLC_URL)]
    pub plc_url: String,

    /// Which commits are verified (signature, structure, MST inversion) before anything of them
    /// is written: `routed` (every commit of a tracked repo and every commit that produces a
    /// cache file), `all`, or `off`. Default `routed`; under `--replay` `off` unless `--did-docs`
    /// is given.
    #[arg(long, env = "FIREHOSE_VERIFY", value_enum)]
    pub verify: Option<VerifyMode>,

    /// DID documents from a JSON file (DID -> document, the format `inspect --did-docs` reads),
    /// consulted before the network; with it a capture replays verified and offline.
    #[arg(long = "did-docs", env = "FIREHOSE_DID_DOCS", value_name = "FILE")]
    pub did_docs: Option<PathBuf>,

    /// Backfill each study user from their repo the first time the writer sees them (at start or
    /// after a SIGHUP reload): their posts enter the study-post index, their follows the
    /// in-network set. Default `on`; under `--replay` `off`.
    #[arg(long, env = "FIREHOSE_BACKFILL", value_enum)]
    pub backfill: Option<OnOff>,

    /// With backfill: study users' records created at or after this RFC 3339 date or date-time
    /// (UTC when no offset is given) are also written to the cache, like live ones.
    #[arg(long, env = "FIREHOSE_BACKFILL_SINCE", value_name = "DATE")]
    pub backfill_since: Option<String>,

    /// Concurrent repo fetches (getRepo) per PDS host.
    #[arg(long, env = "FIREHOSE_PDS_CONCURRENCY", default_value_t = 4)]
    pub pds_concurrency: usize,

    /// Requests per second per PDS host.
    #[arg(long, env = "FIREHOSE_PDS_RATE", default_value_t = 5.0)]
    pub pds_rate: f64,

    /// DID document lookups per second (PLC directory and did:web hosts together). Each new
    /// DID a verification or repair needs costs one lookup; cached documents cost none.
    #[arg(long, env = "FIREHOSE_PLC_RATE", default_value_t = 10.0)]
    pub plc_rate: f64,

    /// Largest repo fetched for a backfill or resync, in bytes; a larger one fails (counted, not
    /// retried until the next start).
    #[arg(long, env = "FIREHOSE_MAX_REPO_BYTES", default_value_t = DEFAULT_MAX_REPO_BYTES)]
    pub max_repo_bytes: u64,

    /// Longest a whole repo fetch (identity, download, verification) may take, in seconds; one
    /// that takes longer fails (counted as `fetch_deadline`) and is retried with backoff, so a
    /// server that trickles bytes cannot hold a fetch slot forever.
    #[arg(long, env = "FIREHOSE_REPO_FETCH_TIMEOUT", default_value_t = 3600)]
    pub repo_fetch_timeout: u64,
}

/// Default PLC directory.
pub const DEFAULT_PLC_URL: &str = "https://plc.directory";
/// Default `--max-repo-bytes`: 1 GiB.
pub const DEFAULT_MAX_REPO_BYTES: u64 = 1 << 30;

/// `--verify`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    Off,
    Routed,
    All,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

/// `--backfill-since`: an RFC 3339 date (midnight UTC) or date-time, as Unix microseconds.
pub fn parse_since(value: &str) -> Result<i64> {
    let v = value.trim();
    let full = if v.len() == 10 {
        format!("{v}T00:00:00Z")
    } else {
        v.to_owned()
    };
    sync_core::time::rfc3339_to_unix_micros(&full).with_context(|| {
        format!(
            "{value:?} is not an RFC 3339 date (2024-01-31) or date-time (2024-01-31T12:00:00Z)"
        )
    })
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print every event of a capture file (`[u32 LE length][frame]...`) as one Jetstream-v1
    /// shaped JSON line (commit ops, identity, account; plus sync/info/error/invalid frames).
    Inspect {
        /// A JSON object mapping each DID to its DID document (the format of
        /// relay-capture/did_docs.json): every `#commit` and `#sync` line then gains
        /// `"verify": "ok"` or `"verify": "<reason>"` (signature, commit structure, MST inversion,
        /// future rev against this machine's clock; a DID missing from the file is a reason too).
        #[arg(long, value_name = "FILE")]
        did_docs: Option<PathBuf>,
        /// The capture file, e.g. relay-capture/frames.bin.
        frames_file: PathBuf,
    },
    /// Set the stored cursor of a writer that is not running, once (e.g. to capture a period
    /// again): the next start resumes after N. Below the stored cursor the per-repo revs are
    /// forgotten, so the range is captured again; above it, the events in between are never
    /// captured (a warning says so). Recorded in the state's `meta` table. Refused while a
    /// writer holds the state's lock.
    SetCursor {
        /// The new cursor: the writer resumes with the first event after this seq.
        #[arg(value_parser = clap::value_parser!(i64).range(0..))]
        cursor: i64,
        /// State database (SQLite) of the writer.
        #[arg(
            long,
            env = "FIREHOSE_STATE",
            default_value = "./firehose-state.sqlite"
        )]
        state: PathBuf,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FutureCursorPolicy {
    Exit,
    Live,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where frames come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Full subscribeRepos URL without query.
    Relay(String),
    Replay(PathBuf),
}

/// The validated configuration `run` takes.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub cache_dir: PathBuf,
    pub state: PathBuf,
    pub study_users: PathBuf,
    pub in_network: Option<PathBuf>,
    pub study_posts: Option<PathBuf>,
    /// `--withdrawn`.
    pub withdrawn: Option<PathBuf>,
    /// `--account-deleted-is-withdrawal`.
    pub account_deleted_is_withdrawal: bool,
    pub cursor: Option<i64>,
    pub stall_timeout: Duration,
    pub on_future_cursor: FutureCursorPolicy,
    /// `None` disables the HTTP endpoint (tests running many writers).
    pub metrics_addr: Option<SocketAddr>,
    pub commit_interval: Duration,
    pub max_backoff: Duration,
    pub plc_url: String,
    pub verify: VerifyMode,
    pub did_docs: Option<PathBuf>,
    pub backfill: bool,
    /// `--backfill-since`, Unix microseconds.
    pub backfill_since: Option<i64>,
    pub pds_concurrency: usize,
    pub pds_rate: f64,
    pub plc_rate: f64,
    pub max_repo_bytes: u64,
    pub repo_fetch_timeout: Duration,
}

/// `wss://host` -> `wss://host/xrpc/com.atproto.sync.subscribeRepos`.
pub fn subscribe_url(relay: &str) -> Result<String> {
    let relay = relay.trim().trim_end_matches('/');
    if !(relay.starts_with("ws://") || relay.starts_with("wss://")) {
        bail!("relay URL {relay:?} must start with ws:// or wss://");
    }
    if relay.contains('?') {
        bail!("relay URL {relay:?} must not carry a query: the writer sets the cursor itself");
    }
    let host = relay.split("://").nth(1).unwrap_or_default();
    if host.is_empty() {
        bail!("relay URL {relay:?} has no host");
    }
    if relay.ends_with("/xrpc/com.atproto.sync.subscribeRepos") {
        Ok(relay.to_owned())
    } else {
        Ok(format!("{relay}/xrpc/com.atproto.sync.subscribeRepos"))
    }
}

impl Config {
    pub fn from_args(args: &Args) -> Result<Config> {
        let source = match &args.replay {
            Some(path) => Source::Replay(path.clone()),
            None => Source::Relay(subscribe_url(&args.relay).context("invalid --relay")?),
        };
        if args.stall_timeout == 0 {
            bail!("--stall-timeout must be at least 1 second");
        }
        if args.commit_interval_ms == 0 || args.commit_interval_ms > 1000 {
            bail!("--commit-interval-ms must be between 1 and 1000 (the cursor is saved at least once a second)");
        }
        let replay = args.replay.is_some();
        let verify = args.verify.unwrap_or(if replay && args.did_docs.is_none() {
            VerifyMode::Off
        } else {
            VerifyMode::Routed
        });
        let backfill = args
            .backfill
            .unwrap_or(if replay { OnOff::Off } else { OnOff::On })
            == OnOff::On;
        let backfill_since = args
            .backfill_since
            .as_deref()
            .map(parse_since)
            .transpose()
            .context("invalid --backfill-since")?;
        if args.pds_concurrency == 0 {
            bail!("--pds-concurrency must be at least 1");
        }
        if !(args.plc_rate.is_finite() && args.plc_rate > 0.0) {
            bail!("--plc-rate must be a positive number of lookups per second");
        }
        if !(args.pds_rate.is_finite() && args.pds_rate > 0.0) {
            bail!("--pds-rate must be a positive number of requests per second");
        }
        let plc_url = args.plc_url.trim().trim_end_matches('/').to_owned();
        if !(plc_url.starts_with("https://") || plc_url.starts_with("http://")) {
            bail!("--plc-url {plc_url:?} must be an http(s) URL");
        }
        if args.repo_fetch_timeout == 0 {
            bail!("--repo-fetch-timeout must be at least 1 second");
        }
        if let Some(c) = args.cursor {
            if c < 0 {
                bail!("--cursor must not be negative");
            }
        }
        if args.account_deleted_is_withdrawal && args.withdrawn.is_none() {
            bail!(
                "--account-deleted-is-withdrawal needs --withdrawn FILE (FIREHOSE_WITHDRAWN): each \
                 deleted study account is added there, the list batch-export's purge reads"
            );
        }
        Ok(Config {
            source,
            cache_dir: args.cache_dir.clone(),
            state: args.state.clone(),
            study_users: args
                .study_users
                .clone()
                .context("--study-users FILE (or FIREHOSE_STUDY_USERS) is required: the DIDs of the study participants")?,
            in_network: args.in_network.clone(),
            study_posts: args.study_posts.clone(),
            withdrawn: args.withdrawn.clone(),
            account_deleted_is_withdrawal: args.account_deleted_is_withdrawal,
            cursor: args.cursor,
            stall_timeout: Duration::from_secs(args.stall_timeout),
            on_future_cursor: args.on_future_cursor,
            metrics_addr: Some(args.metrics_addr),
            commit_interval: Duration::from_millis(args.commit_interval_ms),
            max_backoff: Duration::from_secs(args.max_backoff.max(1)),
            plc_url,
            verify,
            did_docs: args.did_docs.clone(),
            backfill,
            backfill_since,
            pds_concurrency: args.pds_concurrency,
            pds_rate: args.pds_rate,
            plc_rate: args.plc_rate,
            max_repo_bytes: args.max_repo_bytes,
            repo_fetch_timeout: Duration::from_secs(args.repo_fetch_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backfill_since_takes_dates_and_date_times() {
        assert_eq!(
            parse_since("2024-01-31").unwrap(),
            parse_since("2024-01-31T00:00:00Z").unwrap()
        );
        assert_eq!(
            parse_since("2024-01-31T02:00:00+02:00").unwrap(),
            parse_since("2024-01-31T00:00:00Z").unwrap()
        );
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("2024-13-01").is_err());
    }

    #[test]
    fn an_account_deletion_withdrawal_needs_a_withdrawn_list_to_add_to() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["firehose-writer", "--study-users", "s.txt"];
            argv.extend_from_slice(extra);
            Config::from_args(&Args::try_parse_from(argv).unwrap())
        };
        let err = parse(&["--account-deleted-is-withdrawal"]).unwrap_err();
        assert!(format!("{err:#}").contains("needs --withdrawn"), "{err:#}");
        let cfg = parse(&["--account-deleted-is-withdrawal", "--withdrawn", "w.txt"]).unwrap();
        assert!(cfg.account_deleted_is_withdrawal);
        assert!(!parse(&[]).unwrap().account_deleted_is_withdrawal);
    }

    #[test]
    fn relay_urls() {
        assert_eq!(
            subscribe_url("wss://bsky.network").unwrap(),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            subscribe_url("ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos").unwrap(),
            "ws://127.0.0.1:9/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert!(subscribe_url("https://bsky.network").is_err());
        assert!(subscribe_url("wss://x/?cursor=1").is_err());
        assert!(subscribe_url("wss://").is_err());
    }
}
