//! Backfill and resync fetches: the messages between the processor (which owns the queue and
//! applies repairs) and the fetcher task (which resolves the identity and downloads the repo).

use std::time::Duration;

use sync_core::ids::Did;
use sync_core::repo::VerifiedRepo;

use crate::state::WorkKind;

/// Repo fetches out at once (per-host limits apply inside the fetcher too).
pub const MAX_IN_FLIGHT: usize = 16;

/// The processor asks for a repo.
#[derive(Debug, Clone)]
pub struct RepairRequest {
    pub did: Did,
    pub kind: WorkKind,
}

/// Why a fetch failed.
#[derive(Debug, Clone)]
pub struct RepairFailure {
    /// Stable label for metrics (`identity_not_found`, `rate_limited`, `repo_too_large`...).
    pub reason: &'static str,
    pub message: String,
    /// Retrying cannot help (e.g. a repo over the size limit).
    pub permanent: bool,
    /// The server said when to come back (429).
    pub retry_after: Option<Duration>,
}

/// The fetcher's answer.
#[derive(Debug)]
pub struct RepairResult {
    pub did: Did,
    pub outcome: Result<VerifiedRepo, RepairFailure>,
}

/// Backoff before retrying a failed fetch: 30 s doubling per attempt, at most an hour.
pub fn repair_backoff(attempts: u32) -> Duration {
    let secs = 30u64.saturating_mul(1u64 << attempts.min(7));
    Duration::from_secs(secs.min(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(repair_backoff(0), Duration::from_secs(30));
        assert_eq!(repair_backoff(1), Duration::from_secs(60));
        assert_eq!(repair_backoff(6), Duration::from_secs(1920));
        assert_eq!(repair_backoff(7), Duration::from_secs(3600));
        assert_eq!(repair_backoff(40), Duration::from_secs(3600));
    }
}
