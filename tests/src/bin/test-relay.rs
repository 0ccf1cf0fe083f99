//! Serves a firehose capture file as a `com.atproto.sync.subscribeRepos` relay on 127.0.0.1.
//!
//! Usage: `test-relay FRAMES_FILE [--port P] [--window W]`
//!
//! Prints the subscription URL (no query) on the first line of stdout, then serves until
//! interrupted (Ctrl-C / SIGINT) or stdin is closed when `--exit-on-eof` is given.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use workspace_tests::relay::{load_capture, RelayConfig, TestRelay};

const USAGE: &str = "usage: test-relay FRAMES_FILE [--port P] [--window W] [--exit-on-eof]";

struct Args {
    file: PathBuf,
    config: RelayConfig,
    exit_on_eof: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut file = None;
    let mut config = RelayConfig::default();
    let mut exit_on_eof = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--port") => {
                let value = args.next().ok_or("--port needs a value")?;
                config.port = value
                    .to_str()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--port: not a port number")?;
            }
            Some("--window") => {
                let value = args.next().ok_or("--window needs a value")?;
                config.window = Some(
                    value
                        .to_str()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--window: not an integer")?,
                );
            }
            Some("--exit-on-eof") => exit_on_eof = true,
            Some("-h" | "--help") => return Err(String::new()),
            Some(s) if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ if file.is_none() => file = Some(PathBuf::from(arg)),
            _ => return Err("more than one FRAMES_FILE".into()),
        }
    }
    Ok(Args {
        file: file.ok_or("missing FRAMES_FILE")?,
        config,
        exit_on_eof,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("test-relay: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let frames = match load_capture(&args.file) {
        Ok(frames) => frames,
        Err(e) => {
            eprintln!("test-relay: {}: {e}", args.file.display());
            return ExitCode::FAILURE;
        }
    };
    let count = frames.len();
    let relay = match TestRelay::start_with_config(frames, args.config).await {
        Ok(relay) => relay,
        Err(e) => {
            eprintln!("test-relay: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{}", relay.url());
    let _ = stdout.flush();
    eprintln!("test-relay: serving {count} frames");
    if args.exit_on_eof {
        // A detached thread: a blocking task would keep the runtime from shutting down.
        let (closed_tx, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = closed_tx.send(());
        });
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = stdin_closed => {}
        }
    } else {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!(
        "test-relay: {} connections, {} frames sent",
        relay.connections(),
        relay.frames_sent()
    );
    relay.shutdown().await;
    ExitCode::SUCCESS
}
