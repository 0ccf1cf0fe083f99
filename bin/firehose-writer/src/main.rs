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
    init_logs(args.log_format);
    let config = match Config::from_args(&args) {
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
