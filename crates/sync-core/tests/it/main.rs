//! sync-core integration tests, one binary: decoding conformance, identifier syntax, transforms,
//! routing, robustness against hostile frames, and cache path safety.

mod cache_paths;
mod decode;
mod ids_syntax;
mod robustness;
mod route;
mod transform_examples;

use std::path::PathBuf;

/// The shared fixtures (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo).
pub fn fixtures_root() -> PathBuf {
    std::env::var_os("SYNC_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/fixtures"
            ))
        })
}

/// The fixtures directory, or `None` with a printed reason when it is absent (tests then skip).
pub fn fixtures() -> Option<PathBuf> {
    let dir = fixtures_root();
    if dir.join("relay-capture/frames.bin").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: fixtures not found at {} (set SYNC_FIXTURES)",
            dir.display()
        );
        None
    }
}
