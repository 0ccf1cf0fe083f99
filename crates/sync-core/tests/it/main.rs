//! sync-core integration tests, one binary: decoding conformance, identifier syntax, transforms,
//! routing, robustness against hostile frames, signing keys / DID documents, the MST, commit and
//! repo verification, and relay scenarios.

mod crypto;
mod decode;
mod ids_syntax;
mod mst;
mod repo;
mod robustness;
mod route;
mod transform_examples;
mod verify;

use std::path::PathBuf;

/// The shared fixtures (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo).
fn fixtures_root() -> PathBuf {
    std::env::var_os("SYNC_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/fixtures"
            ))
        })
}

/// The fixtures directory, or `None` (the test then skips) when it is absent and
/// `SYNC_SKIP_FIXTURE_TESTS` is set; absent otherwise is a test failure, so a misconfigured
/// CI cannot pass by skipping.
pub fn fixtures() -> Option<PathBuf> {
    let dir = fixtures_root();
    if dir.join("relay-capture/frames.bin").is_file() {
        Some(dir)
    } else {
        missing_fixtures(&dir)
    }
}

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
