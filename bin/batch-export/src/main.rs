//! batch-export: the JSON cache to Parquet (not implemented yet: see issue 4).

use clap::Parser;

/// Exports the firehose-writer cache to Parquet tables (local or S3), exactly once.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Cache root written by firehose-writer.
    #[arg(long, env = "BATCH_EXPORT_CACHE_DIR", default_value = "./__local_cache__")]
    cache_dir: std::path::PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    eprintln!(
        "batch-export: not implemented yet (cache dir {}); nothing was exported",
        args.cache_dir.display()
    );
    std::process::ExitCode::from(2)
}
