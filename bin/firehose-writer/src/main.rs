//! firehose-writer binary: parses arguments into a validated config and hands it to the library.

use std::process::ExitCode;

use clap::Parser;
use firehose_writer::config::{Args, Command, Config, LogFormat};
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
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

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Inspect {
        frames_file,
        did_docs,
    }) = &args.command
    {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        return match firehose_writer::inspect(frames_file, did_docs.as_deref(), &mut out) {
            Ok(summary) => {
                eprintln!(
                    "{} frames, {} events, {} invalid frames",
                    summary.frames, summary.lines, summary.invalid_frames
                );
                if did_docs.is_some() {
                    eprintln!(
                        "{} commits/syncs verified, {} failed verification",
                        summary.verified, summary.verify_failed
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::SetCursor { cursor, state }) = &args.command {
        return set_cursor(state, *cursor);
    }
    init_logs(args.log_format);
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(firehose_writer::EXIT_USAGE);
        }
    };
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
    let result = runtime.block_on(async {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading tracked sets");
                let _ = reload_tx.try_send(());
            }
        });
        firehose_writer::run(config, shutdown_signal(), Some(reload_rx), |handles| {
            if let Some(addr) = handles.metrics_addr {
                tracing::info!(%addr, "serving /health and /metrics");
            }
        })
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
