//! Support code for the workspace-level end-to-end tests: fixture lookup, the test relay, the
//! official PDS driver (`pds`), and the proxies that put gaps, forgeries and rate limits between
//! the PDS and the writer (`gap_proxy`, `xrpc_proxy`).

use std::path::PathBuf;

/// The shared fixtures directory (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo),
/// or `None` (the test then skips) when it is absent and `SYNC_SKIP_FIXTURE_TESTS` is set;
/// absent otherwise is a test failure, so a misconfigured CI cannot pass by skipping.
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
        missing_fixtures(&dir)
    }
}
pub mod gap_proxy;
pub mod pds;
pub mod procstat;
pub mod relay;
pub mod s3;
pub mod xrpc_proxy;

fn missing_fixtures(dir: &std::path::Path) -> Option<PathBuf> {
    if std::env::var_os("SYNC_SKIP_FIXTURE_TESTS").is_some() {
        eprintln!("skipping: fixtures not found at {}", dir.display());
        return None;
    }
    panic!(
        "fixtures not found at {}: set SYNC_FIXTURES to the shared fixtures directory \
         (or SYNC_SKIP_FIXTURE_TESTS=1 to skip the tests that need them)",
        dir.display()
    )
}
