//! firehose-writer binary: installs the signal handlers, parses arguments into a validated config
//! and hands it to the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use firehose_writer::config::{Args, Command, Config, LogFormat};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::EnvFilter;

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // No ANSI colour codes unless stderr is a terminal (journald, files and pipes get plain text).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The signals the writer acts on. Registered before anything else runs: a signal that arrives
/// during start-up (loading large DID files can take a while) is kept for the running writer
/// instead of killing the process with the default action.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Must be called inside the runtime.
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Resolves at the first SIGTERM or SIGINT (including one received before it was first polled).
async fn shutdown_signal(mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Exit status of a process ended by SIGINT/SIGTERM while it had nothing to drain (`inspect`).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match runtime.block_on(async { Signals::install() }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: installing the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = Args::parse();
    let code = if let Some(Command::Inspect {
        frames_file,
        did_docs,
    }) = &args.command
    {
        inspect(&runtime, signals, frames_file.clone(), did_docs.clone())
    } else if let Some(Command::SetCursor { cursor, state }) = &args.command {
        set_cursor(state, *cursor)
    } else {
        writer(&runtime, signals, &args)
    };
    // Nothing left to wait for: a task still blocked (e.g. on a stuck disk) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// `inspect`: runs to the end of the capture, or exits at once on SIGINT/SIGTERM.
fn inspect(
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
    frames_file: std::path::PathBuf,
    did_docs: Option<std::path::PathBuf>,
) -> ExitCode {
    let has_did_docs = did_docs.is_some();
    let result = runtime.block_on(async move {
        let work = tokio::task::spawn_blocking(move || {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            firehose_writer::inspect(&frames_file, did_docs.as_deref(), &mut out)
        });
        tokio::select! {
            result = work => Some(result),
            _ = shutdown_signal(signals.term, signals.int) => None,
        }
    });
    match result {
        None => {
            eprintln!("interrupted");
            // The blocking reader cannot be cancelled; nothing of it needs saving.
            std::process::exit(EXIT_INTERRUPTED.into());
        }
        Some(Ok(Ok(summary))) => {
            eprintln!(
                "{} frames, {} events, {} invalid frames",
                summary.frames, summary.lines, summary.invalid_frames
            );
            if has_did_docs {
                eprintln!(
                    "{} commits/syncs verified, {} failed verification",
                    summary.verified, summary.verify_failed
                );
            }
            ExitCode::SUCCESS
        }
        Some(Ok(Err(e))) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Some(Err(e)) => {
            eprintln!("error: inspect failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `set-cursor`: an operator's one-shot command, so it talks to the terminal, not the log.
fn set_cursor(state: &std::path::Path, cursor: i64) -> ExitCode {
    use firehose_writer::state::CursorChange;
    match firehose_writer::set_cursor(state, cursor) {
        Ok(change) => {
            match change {
                CursorChange::First | CursorChange::Unchanged => {}
                CursorChange::Rewound { from } => eprintln!(
                    "rewound from {from}: the per-repo revs are forgotten, so tracked accounts' events after {cursor} are captured again"
                ),
                CursorChange::SkippedForward { from } => eprintln!(
                    "warning: {cursor} is ahead of the stored cursor {from}: events after seq {from} up to {cursor} will NEVER be captured"
                ),
            }
            println!(
                "cursor of {} set to {cursor}: the next start resumes after it",
                state.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The long-running writer: SIGTERM/SIGINT drain and stop it, SIGHUP reloads the DID files.
fn writer(runtime: &tokio::runtime::Runtime, signals: Signals, args: &Args) -> ExitCode {
    init_logs(args.log_format);
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(firehose_writer::EXIT_USAGE);
        }
    };
    if let Err(e) = firehose_writer::cache::check_kernel(args.allow_old_kernel) {
        eprintln!("error: {e}");
        return ExitCode::from(firehose_writer::EXIT_NEEDS_OPERATOR);
    }
    let Signals { term, int, mut hup } = signals;
    let result = runtime.block_on(async {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading tracked sets");
                let _ = reload_tx.try_send(());
            }
        });
        firehose_writer::run(
            config,
            shutdown_signal(term, int),
            Some(reload_rx),
            |handles| {
                if let Some(addr) = handles.metrics_addr {
                    tracing::info!(%addr, "serving /health and /metrics");
                }
            },
        )
        .await
    });
    match result {
        Ok(summary) => {
            tracing::info!(?summary, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(firehose_writer::exit_code(&e))
        }
    }
}
