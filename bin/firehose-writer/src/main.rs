//! firehose-writer binary: parses arguments and hands them to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Follows the atproto firehose and routes study users' records into the JSON cache.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every event of a capture file (`[u32 LE length][frame]...`) as one Jetstream-v1
    /// shaped JSON line (commit ops, identity, account; plus sync/info/error/invalid frames).
    Inspect {
        /// The capture file, e.g. relay-capture/frames.bin.
        frames_file: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Command::Inspect { frames_file }) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            firehose_writer::inspect(&frames_file, &mut out).map(|summary| {
                eprintln!(
                    "{} frames, {} events, {} invalid frames",
                    summary.frames, summary.lines, summary.invalid_frames
                );
            })
        }
        None => Err(anyhow::anyhow!(
            "the live writer is not implemented yet; only `firehose-writer inspect FRAMES_FILE` works"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
