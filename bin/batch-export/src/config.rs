//! Command line (every flag also an environment variable, prefix `BATCH_EXPORT_`) and the
//! validated [`Config`] a run works from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

/// Exports the firehose-writer JSON cache to Parquet tables (local or S3), exactly once.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Cache root written by firehose-writer.
    #[arg(
        long,
        env = "BATCH_EXPORT_CACHE_DIR",
        default_value = "./__local_cache__"
    )]
    pub cache_dir: PathBuf,

    /// Output root: a local directory, or `s3://bucket/prefix`.
    #[arg(
        long,
        env = "BATCH_EXPORT_OUTPUT",
        default_value = "./bluesky_research_data"
    )]
    pub output: String,

    /// Where the journal, exported-keys store and lock live (default `<cache-dir>/.export`).
    #[arg(long, env = "BATCH_EXPORT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Parquet compression codec.
    #[arg(long, env = "BATCH_EXPORT_COMPRESSION", value_enum, default_value_t = Compression::Zstd)]
    pub compression: Compression,

    /// Delete exactly the cache files that were exported (`--clear-filepaths false` keeps them;
    /// they are still remembered as exported and not exported again).
    #[arg(long, env = "BATCH_EXPORT_CLEAR_FILEPATHS", action = ArgAction::Set, default_value_t = true)]
    pub clear_filepaths: bool,

    /// Also remove empty cache folders (never a file that was not exported).
    #[arg(long, env = "BATCH_EXPORT_CLEAR_CACHE")]
    pub clear_cache: bool,

    /// With --clear-cache: only folders not modified for this many seconds are removed, so a
    /// folder the writer is about to use is left alone.
    #[arg(long, env = "BATCH_EXPORT_PRUNE_MIN_AGE_SECS", default_value_t = 3600)]
    pub prune_min_age_secs: u64,

    /// Read and count everything, write nothing (no Parquet, no journal, no deletes, no quarantine).
    #[arg(long, env = "BATCH_EXPORT_DRY_RUN")]
    pub dry_run: bool,

    /// Print the end-of-run summary as one JSON object on stdout instead of text.
    #[arg(long, env = "BATCH_EXPORT_JSON")]
    pub json: bool,

    /// Never show a progress bar (it is shown only when stdout is a terminal).
    #[arg(long, env = "BATCH_EXPORT_NO_PROGRESS")]
    pub no_progress: bool,

    /// Cache files per batch: each batch is one Parquet file per table and one journal commit
    /// (bounds memory: peak RSS ~175 MB at 25,000, ~290 MB at 50,000; BENCHMARKS.md).
    #[arg(long, env = "BATCH_EXPORT_BATCH_FILES", default_value_t = 25_000)]
    pub batch_files: usize,

    /// How long the keys of exported files are remembered, so that a file the writer rewrites
    /// when it replays events after a crash is not exported twice (relays replay up to 72 h).
    #[arg(
        long,
        env = "BATCH_EXPORT_DEDUPE_RETENTION_HOURS",
        default_value_t = 168
    )]
    pub dedupe_retention_hours: u64,

    /// Threads of each of the two worker pools, reading the next batch and encoding the
    /// current one (0 = one per core; Polars' own pool: `POLARS_MAX_THREADS`).
    #[arg(long, env = "BATCH_EXPORT_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// S3: custom endpoint URL for S3-compatible stores (e.g. `http://127.0.0.1:9000`).
    #[arg(long, env = "BATCH_EXPORT_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3: region (default: from the AWS config chain, else `us-east-1`).
    #[arg(long, env = "BATCH_EXPORT_S3_REGION")]
    pub s3_region: Option<String>,

    /// S3: path-style addressing (default: on when --s3-endpoint is set).
    #[arg(long, env = "BATCH_EXPORT_S3_PATH_STYLE", action = ArgAction::Set)]
    pub s3_path_style: Option<bool>,

    /// S3: attempts per request (exponential backoff with jitter between them).
    #[arg(long, env = "BATCH_EXPORT_S3_MAX_ATTEMPTS", default_value_t = 5)]
    pub s3_max_attempts: u32,

    /// S3: files larger than this many MiB are uploaded in parts.
    #[arg(
        long,
        env = "BATCH_EXPORT_S3_MULTIPART_THRESHOLD_MIB",
        default_value_t = 64
    )]
    pub s3_multipart_threshold_mib: u64,

    /// S3: multipart part size in MiB (at least 5).
    #[arg(long, env = "BATCH_EXPORT_S3_PART_SIZE_MIB", default_value_t = 16)]
    pub s3_part_size_mib: u64,

    /// S3: when the SDK adds CRC checksums to requests and checks them in answers:
    /// `when-supported` (every upload, the SDK default) or `when-required` (only where the API
    /// requires one), for S3-compatible stores that reject the checksum headers.
    #[arg(long, env = "BATCH_EXPORT_S3_CHECKSUM", value_enum, default_value_t = S3Checksum::WhenSupported)]
    pub s3_checksum: S3Checksum,

    /// S3: server-side encryption of every object written (`aws:kms` with --s3-kms-key-id, or
    /// `AES256`); default: the bucket's own default.
    #[arg(long, env = "BATCH_EXPORT_S3_SSE", value_enum)]
    pub s3_sse: Option<S3Sse>,

    /// S3: the KMS key (id, ARN or alias) for `--s3-sse aws:kms` (default: the account's
    /// `aws/s3` key).
    #[arg(long, env = "BATCH_EXPORT_S3_KMS_KEY_ID")]
    pub s3_kms_key_id: Option<String>,

    /// S3, `purge` only: on a bucket that keeps old object versions, delete the older versions
    /// of every object a purge rewrote (they still hold the withdrawn rows). Needs
    /// `s3:ListBucketVersions` and `s3:DeleteObjectVersion`; without it such a purge exits 3
    /// and says how many old versions are left.
    #[arg(
        long,
        env = "BATCH_EXPORT_S3_DELETE_NONCURRENT_VERSIONS",
        default_value_t = false
    )]
    pub s3_delete_noncurrent_versions: bool,

    /// The writer's state database (read only): its committed cursor, read when the run starts,
    /// is recorded in the output (`_batch_export/resume.json`) when the run ends with nothing
    /// left behind, so a replacement machine knows where to restart the writer
    /// (`batch-export resume-point`).
    #[arg(long, env = "BATCH_EXPORT_WRITER_STATE")]
    pub writer_state: Option<PathBuf>,

    /// Rebuild this state directory's memory (journal, exported keys) from the output's
    /// manifests and take the output's owner marker over: for a state directory that was lost,
    /// restored from a backup, or moved to a new machine (a run refuses such a state with exit 2
    /// and says so).
    #[arg(long, env = "BATCH_EXPORT_ADOPT_OUTPUT", conflicts_with = "dry_run")]
    pub adopt_output: bool,

    /// Withdrawn participants: DIDs one per line (`#` comments). The export refuses every cache
    /// file by or about them (counted, removed from the cache, never exported or quarantined);
    /// `purge` removes their rows from the output and their files from the cache.
    #[arg(long, env = "BATCH_EXPORT_WITHDRAWN")]
    pub withdrawn: Option<PathBuf>,

    /// Log filter (tracing `EnvFilter` syntax; `RUST_LOG` is used when this is unset).
    #[arg(long, env = "BATCH_EXPORT_LOG")]
    pub log: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Prints the writer cursor the output is complete up to (a bare number on stdout, details
    /// on stderr): start a replacement writer with `--cursor` at it, and the export with
    /// `--adopt-output`. Uses --output and the S3 flags.
    ResumePoint,
    /// Applies the --withdrawn list to the output and the cache, exactly once: rewrites every
    /// Parquet file holding their rows without them, removes their cache files, writes a ledger
    /// (`<output>/_batch_export/purges/<id>.json`). Uses the flags of an export run.
    Purge,
    /// Writes a synthetic exported dataset (Parquet files, journal, manifests) of post rows
    /// straight to --output, for the consent-purge benchmark; prints the participant's DID.
    GenOutput {
        /// Rows in total.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Rows per batch (one Parquet file per table per batch).
        #[arg(long, default_value_t = 50_000)]
        batch_rows: usize,
        /// Batches holding rows by or about the participant.
        #[arg(long, default_value_t = 2)]
        participant_batches: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Writes a synthetic cache of realistic post files (for benchmarks).
    GenCache {
        /// Number of post files to write.
        #[arg(long, env = "BATCH_EXPORT_GEN_POSTS", default_value_t = 100_000)]
        posts: usize,
        /// Share of posts by in-network authors (the rest are study users' posts).
        #[arg(long, env = "BATCH_EXPORT_GEN_IN_NETWORK_SHARE", default_value_t = 0.8)]
        in_network_share: f64,
        /// Seed of the generator.
        #[arg(long, env = "BATCH_EXPORT_GEN_SEED", default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum S3Checksum {
    WhenSupported,
    WhenRequired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum S3Sse {
    #[value(name = "aws:kms")]
    AwsKms,
    #[value(name = "AES256")]
    Aes256,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    Snappy,
    Zstd,
    None,
}

/// Test-only fault injection, compiled in only with the `fault-injection` feature (the tests
/// enable it; release builds do not have it): `BATCH_EXPORT_FAULT=after-stage|after-commit|
/// after-publish-one|after-publish|after-manifest|after-take` (an environment variable only; not
/// a flag and deliberately not in the user documentation). The process aborts
/// (`std::process::abort()`: no destructors, no cleanup, like a kill) the first time it reaches
/// that point, which is in the first batch (or the first batch rolled forward), so the tests
/// can put a crash in each window of the exactly-once protocol deterministically:
///
/// * `after-stage`: every table's Parquet file is staged and fsynced, the batch not committed;
/// * `after-commit`: the batch is committed, nothing published;
/// * `after-publish-one`: the first table is published, the others not;
/// * `after-publish`: every table is published, the manifest not written;
/// * `after-manifest`: the manifest is written, the batch not marked published;
/// * `after-take`: the first exported cache file was taken (`.exported-<id>-<name>`), not
///   deleted.
///
/// The purge (`purge-*`, see `purge.rs`):
///
/// * `purge-after-stage`: their cache files are removed and every rewritten Parquet file is
///   staged, the purge not committed;
/// * `purge-after-commit`: the purge is committed, no file replaced;
/// * `purge-after-replace-one`: the first file is replaced, the others not;
/// * `purge-after-replace`: every file is replaced, the manifests not updated;
/// * `purge-after-manifests`: the manifests are updated, the ledger not written;
/// * `purge-after-ledger`: the ledger is written, the purge not marked done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    AfterStage,
    AfterCommit,
    AfterPublishOne,
    AfterPublish,
    AfterManifest,
    AfterTake,
    PurgeAfterCache,
    PurgeAfterStage,
    PurgeAfterCommit,
    PurgeAfterReplaceOne,
    PurgeAfterReplace,
    PurgeAfterManifests,
    PurgeAfterLedger,
}

impl Fault {
    #[cfg(feature = "fault-injection")]
    pub const ENV: &'static str = "BATCH_EXPORT_FAULT";

    #[cfg(feature = "fault-injection")]
    fn from_env() -> Result<Option<Fault>> {
        let Ok(v) = std::env::var(Self::ENV) else {
            return Ok(None);
        };
        Ok(Some(match v.as_str() {
            "" => return Ok(None),
            "after-stage" => Fault::AfterStage,
            "after-commit" => Fault::AfterCommit,
            "after-publish-one" => Fault::AfterPublishOne,
            "after-publish" => Fault::AfterPublish,
            "after-manifest" => Fault::AfterManifest,
            "after-take" => Fault::AfterTake,
            "purge-after-cache" => Fault::PurgeAfterCache,
            "purge-after-stage" => Fault::PurgeAfterStage,
            "purge-after-commit" => Fault::PurgeAfterCommit,
            "purge-after-replace-one" => Fault::PurgeAfterReplaceOne,
            "purge-after-replace" => Fault::PurgeAfterReplace,
            "purge-after-manifests" => Fault::PurgeAfterManifests,
            "purge-after-ledger" => Fault::PurgeAfterLedger,
            // A typo must not make a crash test silently test nothing.
            other => bail!("{}={other:?} is not a known fault point", Self::ENV),
        }))
    }

    #[cfg(not(feature = "fault-injection"))]
    fn from_env() -> Result<Option<Fault>> {
        Ok(None)
    }

    /// Aborts the process if `configured` is `point`.
    #[cfg(feature = "fault-injection")]
    pub fn hit(configured: Option<Fault>, point: Fault) {
        if configured == Some(point) {
            eprintln!("batch-export: test fault {point:?}: aborting");
            std::process::abort();
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline(always)]
    pub fn hit(_configured: Option<Fault>, _point: Fault) {}
}

/// Where Parquet files go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

#[derive(Clone, Debug)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub max_attempts: u32,
    pub multipart_threshold: u64,
    pub part_size: u64,
    pub checksum: S3Checksum,
    pub sse: Option<S3Sse>,
    pub kms_key_id: Option<String>,
    /// `purge`: delete the noncurrent versions of rewritten objects (versioned buckets).
    pub delete_noncurrent_versions: bool,
}

/// A validated run configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    /// A local output is absolute (see [`absolute_output`]).
    pub output: Output,
    /// What the state directory is bound to (see [`output_identity`]).
    pub output_identity: String,
    pub compression: Compression,
    pub clear_filepaths: bool,
    pub clear_cache: bool,
    pub prune_min_age_secs: u64,
    pub dry_run: bool,
    pub adopt_output: bool,
    pub writer_state: Option<PathBuf>,
    pub batch_files: usize,
    pub dedupe_retention_secs: i64,
    pub threads: usize,
    pub s3: S3Options,
    /// Show a progress bar (stdout is a terminal, not `--json`, not `--no-progress`).
    pub progress: bool,
    /// Test-only (see [`Fault`]).
    pub fault: Option<Fault>,
    /// `--withdrawn` (empty without it).
    pub withdrawn: crate::withdrawn::Withdrawn,
}

/// Parses `s3://bucket/prefix` (prefix may be empty; no trailing `/`).
pub fn parse_output(s: &str) -> Result<Output> {
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("--output {s:?}: missing bucket name");
        }
        Ok(Output::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    } else if s.contains("://") {
        bail!("--output {s:?}: only local paths and s3:// are supported")
    } else {
        Ok(Output::Local(PathBuf::from(s)))
    }
}

/// A local output as one canonical absolute path: the journal stores final locations, so a
/// relative path would point elsewhere when the next run starts in another directory, and two
/// spellings of one directory (`out`, `./out`, a symlink) must be recognised as one output. The
/// existing part of the path is resolved; the rest (created by the run) is appended.
pub fn absolute_output(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).with_context(|| format!("--output {}", p.display()))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut resolved) => {
                resolved.extend(rest.iter().rev());
                return Ok(resolved);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match (existing.parent(), existing.file_name()) {
                    (Some(parent), Some(name)) => {
                        rest.push(name.to_owned());
                        existing = parent;
                    }
                    // `..` in a part that does not exist yet: keep it as given.
                    _ => return Ok(abs),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("resolving --output {}", p.display())),
        }
    }
}

/// The identity of an output, recorded in the state database on first use: the absolute local
/// path, or `s3://bucket/prefix` plus the endpoint when one is set (the same bucket name on
/// another S3-compatible store is another output).
pub fn output_identity(output: &Output, endpoint: Option<&str>) -> String {
    match output {
        Output::Local(p) => p.display().to_string(),
        Output::S3 { bucket, prefix } => {
            let mut id = format!("s3://{bucket}/{prefix}");
            if let Some(ep) = endpoint {
                id.push_str(&format!(" at {}", ep.trim_end_matches('/')));
            }
            id
        }
    }
}

impl Config {
    pub fn from_args(args: &Args) -> Result<Config> {
        let output = match parse_output(&args.output)? {
            Output::Local(p) => Output::Local(absolute_output(&p)?),
            s3 => s3,
        };
        let output_identity = output_identity(&output, args.s3_endpoint.as_deref());
        if args.batch_files == 0 {
            bail!("--batch-files must be at least 1");
        }
        if args.s3_part_size_mib < 5 {
            bail!("--s3-part-size-mib must be at least 5 (S3's minimum part size)");
        }
        if args.s3_kms_key_id.is_some() && args.s3_sse != Some(S3Sse::AwsKms) {
            bail!("--s3-kms-key-id needs --s3-sse aws:kms");
        }
        if args.s3_max_attempts == 0 {
            bail!("--s3-max-attempts must be at least 1");
        }
        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| args.cache_dir.join(".export"));
        let retention = i64::try_from(args.dedupe_retention_hours)
            .ok()
            .and_then(|h| h.checked_mul(3600))
            .context("--dedupe-retention-hours is too large")?;
        // Checked: in a release build an overflow would wrap to a tiny part size or threshold.
        let mib = |v: u64, flag: &str| {
            v.checked_mul(1024 * 1024)
                .with_context(|| format!("{flag} {v} is too large"))
        };
        let multipart_threshold = mib(
            args.s3_multipart_threshold_mib,
            "--s3-multipart-threshold-mib",
        )?;
        let part_size = mib(args.s3_part_size_mib, "--s3-part-size-mib")?;
        use std::io::IsTerminal;
        Ok(Config {
            cache_dir: args.cache_dir.clone(),
            state_dir,
            output,
            output_identity,
            compression: args.compression,
            clear_filepaths: args.clear_filepaths,
            clear_cache: args.clear_cache,
            prune_min_age_secs: args.prune_min_age_secs,
            dry_run: args.dry_run,
            adopt_output: args.adopt_output,
            writer_state: args.writer_state.clone(),
            batch_files: args.batch_files,
            dedupe_retention_secs: retention,
            threads: args.threads,
            s3: S3Options {
                endpoint: args.s3_endpoint.clone(),
                region: args.s3_region.clone(),
                path_style: args.s3_path_style.unwrap_or(args.s3_endpoint.is_some()),
                max_attempts: args.s3_max_attempts,
                multipart_threshold,
                part_size,
                checksum: args.s3_checksum,
                sse: args.s3_sse,
                kms_key_id: args.s3_kms_key_id.clone(),
                delete_noncurrent_versions: args.s3_delete_noncurrent_versions,
            },
            progress: !args.json && !args.no_progress && std::io::stdout().is_terminal(),
            fault: Fault::from_env()?,
            withdrawn: match &args.withdrawn {
                Some(path) => crate::withdrawn::Withdrawn::load(path)?,
                None => crate::withdrawn::Withdrawn::default(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        assert_eq!(
            parse_output("s3://b/p/q/").unwrap(),
            Output::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            parse_output("s3://b").unwrap(),
            Output::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert!(parse_output("s3:///x").is_err());
        assert!(parse_output("gs://x").is_err());
        assert_eq!(parse_output("out").unwrap(), Output::Local("out".into()));
    }

    #[test]
    fn local_outputs_are_absolute_and_canonical() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        let canon = std::fs::canonicalize(&real).unwrap();
        assert_eq!(absolute_output(&tmp.path().join("link")).unwrap(), canon);
        assert_eq!(
            absolute_output(&tmp.path().join("link/not/yet")).unwrap(),
            canon.join("not/yet")
        );
        let rel = absolute_output(Path::new("some/relative/out")).unwrap();
        assert!(
            rel.is_absolute() && rel.ends_with("some/relative/out"),
            "{rel:?}"
        );
        let s3 = parse_output("s3://b/p").unwrap();
        assert_eq!(output_identity(&s3, None), "s3://b/p");
        assert_eq!(
            output_identity(&s3, Some("http://127.0.0.1:9000/")),
            "s3://b/p at http://127.0.0.1:9000"
        );
    }

    #[test]
    fn mib_sizes_that_overflow_are_usage_errors() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["batch-export"];
            argv.extend_from_slice(extra);
            Config::from_args(&Args::try_parse_from(argv).unwrap())
        };
        let huge = u64::MAX.to_string();
        for flag in ["--s3-part-size-mib", "--s3-multipart-threshold-mib"] {
            let err = parse(&[flag, &huge]).unwrap_err();
            assert!(format!("{err:#}").contains("too large"), "{flag}: {err:#}");
        }
        let ok = parse(&["--s3-part-size-mib", "5"]).unwrap();
        assert_eq!(ok.s3.part_size, 5 << 20);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
