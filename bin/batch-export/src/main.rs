//! batch-export binary: parse arguments, run, print the summary, exit with a code cron can alert on.

use std::process::ExitCode;

use batch_export::{exit, Args, Command, Config, RunOutcome};
use clap::Parser;

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only on a terminal: cron appends stderr to a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn print_summary(summary: &batch_export::Summary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).expect("summary serializes")
        );
    } else {
        print!("{}", summary.to_text());
    }
}

/// `batch-export resume-point`: the bare cursor on stdout, the details on stderr; exit 1 when
/// the output has none.
/// How long relays keep events to replay (the Bluesky relays: about 72 hours).
const RELAY_REPLAY_HOURS: i64 = 72;

fn resume_point(args: &Args) -> ExitCode {
    let run = || -> anyhow::Result<Option<batch_export::manifest::Resume>> {
        let config = Config::from_args(args)?;
        let sink = batch_export::sink::Sink::new(
            &config.output,
            &config.s3,
            config.state_dir.join("staging"),
        )?;
        batch_export::manifest::read_resume(&sink)
    };
    match run() {
        Ok(Some(r)) => {
            println!("{}", r.writer_cursor);
            eprintln!(
                "resume point: writer cursor {} (upstream {}), recorded at {} after batch {:?}: \
                 start the replacement writer with --cursor {} and the export with --adopt-output",
                r.writer_cursor,
                r.upstream.as_deref().unwrap_or("not recorded"),
                r.at,
                r.last_batch_id,
                r.writer_cursor
            );
            let age_hours = (batch_export::now_secs() - r.at) / 3600;
            if age_hours >= RELAY_REPLAY_HOURS {
                eprintln!(
                    "WARNING: this resume point is {age_hours} hours old, older than a relay's replay \
                     window (about {RELAY_REPLAY_HOURS} h): events between it and the oldest the relay \
                     still holds cannot be replayed, and a writer started at it resumes from the relay's \
                     oldest event. The point moves only after an export run that exits 0 with \
                     --writer-state: see why recent runs did not (exit 3: quarantined or unrecognised \
                     files; no --writer-state in the crontab)"
                );
            }
            ExitCode::from(exit::OK)
        }
        Ok(None) => {
            eprintln!("batch-export resume-point: the output has no resume point (no run with --writer-state has finished cleanly)");
            ExitCode::from(exit::ERROR)
        }
        Err(e) => {
            eprintln!("batch-export resume-point: error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

/// `batch-export purge`: the summary on stdout (text or `--json`); exit 0 done (or another run
/// holds the lock), 1 failed (the next run finishes a committed purge), 2 usage.
fn purge(args: &Args) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("batch-export purge: invalid configuration: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let print = |s: &batch_export::purge::PurgeSummary| {
        if args.json {
            println!("{}", serde_json::to_string(s).expect("summary serializes"));
        } else {
            print!("{}", s.to_text());
        }
    };
    match batch_export::purge::run(&config) {
        Ok(batch_export::purge::PurgeOutcome::Busy { lock }) => {
            eprintln!(
                "batch-export purge: another run holds {}; nothing done (exit 0): run it again",
                lock.display()
            );
            ExitCode::from(exit::OK)
        }
        Ok(batch_export::purge::PurgeOutcome::Done(s)) => {
            print(&s);
            if s.needs_attention() {
                ExitCode::from(exit::QUARANTINED)
            } else {
                ExitCode::from(exit::OK)
            }
        }
        Ok(batch_export::purge::PurgeOutcome::Failed { summary, error }) => {
            print(&summary);
            eprintln!("batch-export purge: error: {error:#}");
            ExitCode::from(exit::ERROR)
        }
        Err(e) if e.chain().any(|c| c.is::<batch_export::UsageError>()) => {
            eprintln!("batch-export purge: invalid configuration: {e:#}");
            ExitCode::from(exit::USAGE)
        }
        Err(e) => {
            eprintln!("batch-export purge: error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log.as_deref());
    if let Some(Command::GenCache {
        posts,
        in_network_share,
        seed,
    }) = &args.command
    {
        return match batch_export::gen::generate(&args.cache_dir, *posts, *in_network_share, *seed)
        {
            Ok(n) => {
                println!("wrote {n} cache files under {}", args.cache_dir.display());
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("batch-export gen-cache: error: {e:#}");
                ExitCode::from(exit::ERROR)
            }
        };
    }
    if let Some(Command::ResumePoint) = &args.command {
        return resume_point(&args);
    }
    if let Some(Command::GenOutput {
        rows,
        batch_rows,
        participant_batches,
        seed,
    }) = &args.command
    {
        let run = || -> anyhow::Result<(String, usize)> {
            let config = Config::from_args(&args)?;
            batch_export::gen::generate_output(
                &config,
                *rows,
                *batch_rows,
                *participant_batches,
                *seed,
            )
        };
        return match run() {
            Ok((did, n)) => {
                println!("{did}");
                eprintln!("wrote {n} exported rows; the participant's DID is on stdout");
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("batch-export gen-output: error: {e:#}");
                ExitCode::from(exit::ERROR)
            }
        };
    }
    if let Some(Command::Purge) = &args.command {
        return purge(&args);
    }
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("batch-export: invalid configuration: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    match batch_export::run(&config) {
        Ok(RunOutcome::Busy { lock }) => {
            eprintln!(
                "batch-export: another run holds {}; nothing to do (exit 0)",
                lock.display()
            );
            ExitCode::from(exit::OK)
        }
        Ok(RunOutcome::Failed { summary, error }) => {
            // What was done before the failure (committed batches stay exported) is worth
            // printing too: `--json` readers get the counts and the `error`.
            print_summary(&summary, args.json);
            eprintln!("batch-export: error: {error:#}");
            ExitCode::from(exit::ERROR)
        }
        Ok(RunOutcome::Done(summary)) => {
            print_summary(&summary, args.json);
            if summary.exit_attention() {
                ExitCode::from(exit::QUARANTINED)
            } else {
                ExitCode::from(exit::OK)
            }
        }
        Err(e) if e.chain().any(|c| c.is::<batch_export::UsageError>()) => {
            eprintln!("batch-export: invalid configuration: {e:#}");
            ExitCode::from(exit::USAGE)
        }
        Err(e) => {
            eprintln!("batch-export: error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
