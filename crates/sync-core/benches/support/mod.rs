//! What the benchmarks share: the fixture root, the process's peak RSS and the clock.

#![allow(dead_code)] // each bench uses its own subset

/// The shared fixtures (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo).
pub fn fixtures() -> std::path::PathBuf {
    std::env::var_os("SYNC_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures").into())
}

/// Peak resident set size of this process so far (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Now, in Unix microseconds (the verifier's clock).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}
