//! batch-export: the firehose-writer JSON cache to Parquet tables, exactly once, local or S3.
//!
//! [`run`] is the whole job; `main.rs` only parses arguments into a [`Config`].

pub mod config;
pub mod export;
pub mod gen;
pub mod keys;
pub mod load;
pub mod manifest;
pub mod parquet;
pub mod purge;
pub mod scan;
pub mod sink;
pub mod state;
pub mod summary;
pub mod tables;
pub mod withdrawn;

pub use config::{Args, Command, Config};
pub use export::{run, RunOutcome};
pub use summary::Summary;

/// Exit codes (documented in README.md).
pub mod exit {
    /// Success, nothing to do, or another run holds the lock.
    pub const OK: u8 = 0;
    /// The run failed; nothing was lost and the next run completes it.
    pub const ERROR: u8 = 1;
    /// Invalid command line or configuration (clap's own code).
    pub const USAGE: u8 = 2;
    /// The run succeeded but a human should look: corrupt cache files quarantined (see
    /// `<cache>/.quarantine/`), files in folders that feed no table, exported files that could
    /// not be deleted, cache entries the walk cannot handle; for `purge`, old object versions
    /// in a versioned S3 bucket that still hold withdrawn rows.
    pub const QUARANTINED: u8 = 3;
}

/// An error of the command line or configuration (exit code [`exit::USAGE`]), e.g. a state
/// directory used with another output than the one it is bound to.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Seconds since the Unix epoch.
/// What a thread that panicked said (the payload of `panic!`), for the run's error.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
