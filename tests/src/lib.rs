//! Support code for the workspace-level end-to-end tests: fixture lookup and binary paths.

use std::path::PathBuf;

/// The shared fixtures directory (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo),
/// or `None` with a printed reason when it is absent.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("SYNC_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: fixtures not found at {} (set SYNC_FIXTURES)",
            dir.display()
        );
        None
    }
}
pub mod relay;
pub mod s3;
