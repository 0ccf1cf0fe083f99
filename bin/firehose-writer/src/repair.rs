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

/// Identity failures as stable labels (`identity_<reason>`), for metrics.
pub fn identity_reason(e: &crate::identity::IdentityError) -> &'static str {
    match e.root().reason() {
        "not_found" => "identity_not_found",
        "network" => "identity_network",
        "http_status" => "identity_http_status",
        "invalid_document" => "identity_invalid_document",
        "unsupported_method" => "identity_unsupported_method",
        "invalid_did" => "identity_invalid_did",
        "loopback_refused" => "identity_loopback_refused",
        "circuit_open" => "identity_circuit_open",
        "insecure_url" => "identity_insecure_url",
        _ => "identity_unavailable",
    }
}

fn pds_failure(e: &crate::pds::PdsError) -> RepairFailure {
    let reason = e.reason();
    let permanent = matches!(
        reason,
        "too_large"
            | "no_pds"
            | "insecure_url"
            | "loopback_refused"
            | "repo_not_found"
            | "repo_takendown"
            | "repo_suspended"
    );
    RepairFailure {
        reason,
        message: format!("{e}"),
        permanent,
        retry_after: match e {
            crate::pds::PdsError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        },
    }
}

/// Resolves the DID and fetches its repo, verified; a bad signature is tried once more with
/// the document fetched again (the key may have rotated).
pub async fn fetch(
    resolver: &crate::identity::IdentityResolver,
    pds: &crate::pds::PdsClient,
    did: &Did,
) -> Result<VerifiedRepo, RepairFailure> {
    let identity_failure = |e: crate::identity::IdentityError| RepairFailure {
        reason: identity_reason(&e),
        message: format!("resolving {did}: {e}"),
        permanent: false,
        retry_after: None,
    };
    let identity = resolver.resolve(did).await.map_err(identity_failure)?;
    match pds.get_repo(&identity).await {
        Ok(repo) => Ok(repo),
        Err(e) if e.reason() == "bad_signature" => {
            let fresh = resolver.refresh(did).await.map_err(identity_failure)?;
            if fresh.signing_key == identity.signing_key {
                return Err(pds_failure(&e));
            }
            pds.get_repo(&fresh).await.map_err(|e| pds_failure(&e))
        }
        Err(e) => Err(pds_failure(&e)),
    }
}

/// The fetcher task: one fetch per request, concurrently (the processor bounds how many are
/// out; the PDS client bounds each host), each answer sent back to the processor. Every
/// request gets an answer: a fetch that outlives `deadline` or panics is a failure (retried
/// with backoff), never a repo left "in flight" for the rest of the run.
pub async fn run_fetcher(
    mut requests: tokio::sync::mpsc::UnboundedReceiver<RepairRequest>,
    processor: tokio::sync::mpsc::Sender<crate::processor::Input>,
    resolver: crate::identity::IdentityResolver,
    pds: crate::pds::PdsClient,
    deadline: Duration,
) {
    while let Some(request) = requests.recv().await {
        let (resolver, pds, processor) = (resolver.clone(), pds.clone(), processor.clone());
        tokio::spawn(async move {
            let did = request.did.clone();
            let mut work = tokio::spawn(async move { fetch(&resolver, &pds, &did).await });
            let failure = |reason, message| RepairFailure {
                reason,
                message,
                permanent: false,
                retry_after: None,
            };
            let outcome = match tokio::time::timeout(deadline, &mut work).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => Err(failure(
                    "fetch_failed",
                    format!("the fetch of {} stopped: {e}", request.did),
                )),
                Err(_) => {
                    work.abort();
                    Err(failure(
                        "fetch_deadline",
                        format!(
                            "the fetch of {} took longer than {} s (--repo-fetch-timeout)",
                            request.did,
                            deadline.as_secs()
                        ),
                    ))
                }
            };
            let result = RepairResult {
                did: request.did,
                outcome,
            };
            let _ = processor
                .send(crate::processor::Input::Repaired(Box::new(result)))
                .await;
        });
    }
}

/// [`crate::verifier::Identities`] over the network resolver, for the processor thread: memory
/// hits answer at once; a miss runs the lookup on the runtime and waits for it (bounded), so
/// the frames behind it wait in the bounded channel rather than being verified without a key.
pub struct ResolverIdentities {
    pub resolver: crate::identity::IdentityResolver,
    pub runtime: tokio::runtime::Handle,
    pub timeout: Duration,
}

impl ResolverIdentities {
    fn wait<F>(
        &self,
        lookup: F,
    ) -> Result<std::sync::Arc<sync_core::did_doc::AtprotoIdentity>, &'static str>
    where
        F: std::future::Future<
                Output = Result<
                    std::sync::Arc<sync_core::did_doc::AtprotoIdentity>,
                    crate::identity::IdentityError,
                >,
            > + Send
            + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(lookup.await);
        });
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result.map_err(|e| identity_reason(&e)),
            Err(_) => Err("identity_timeout"),
        }
    }
}

impl crate::verifier::Identities for ResolverIdentities {
    fn identity(
        &self,
        did: &Did,
    ) -> Result<std::sync::Arc<sync_core::did_doc::AtprotoIdentity>, &'static str> {
        if let Some(hit) = self.resolver.cached(did) {
            return Ok(hit);
        }
        let (resolver, did) = (self.resolver.clone(), did.clone());
        self.wait(async move { resolver.resolve(&did).await })
    }

    fn peek(&self, did: &Did) -> Option<std::sync::Arc<sync_core::did_doc::AtprotoIdentity>> {
        self.resolver.peek(did)
    }

    fn refresh(
        &self,
        did: &Did,
    ) -> Result<std::sync::Arc<sync_core::did_doc::AtprotoIdentity>, &'static str> {
        let (resolver, did) = (self.resolver.clone(), did.clone());
        self.wait(async move { resolver.refresh(&did).await })
    }

    fn changed(&self, did: &Did) {
        self.resolver.invalidate(did);
    }
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
