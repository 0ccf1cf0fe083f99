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
            if summary.needs_attention() {
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
