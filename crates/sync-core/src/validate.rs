//! The accept/drop policy of a verifying firehose consumer, over an in-memory view of each
//! account (active or not, chain state) and the upstream's last seq.
//!
//! This is the decision the writer makes per event, kept pure so that it can be checked message
//! by message against third-party relay scenarios. The writer keeps the same state durably.

use std::collections::HashMap;

use crate::chain::{check_commit, check_sync, ChainState, ChainVerdict, Gap};
use crate::crypto::PublicKey;
use crate::frame::Event;
use crate::ids::Did;
use crate::verify::{verify_commit, verify_sync, Inversion, VerifyError, VerifyOptions};

/// Why an event is dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum DropReason {
    /// Its seq is not above the last seq from this upstream (a replay or a reordering).
    SeqNotIncreasing,
    /// The account is deactivated, deleted, taken down...: its commits are not current data.
    InactiveAccount,
    /// No signing key is known for the repo, so it cannot be verified.
    UnknownIdentity,
    /// Its rev is not newer than the repo's held rev.
    StaleRev,
    /// A commit without `prevData` for a repo whose chain we already hold (strict mode only).
    LegacyCommit,
    /// It failed verification.
    Invalid(VerifyError),
}

impl DropReason {
    /// Short stable label for metrics (`drops{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            DropReason::SeqNotIncreasing => "seq_not_increasing",
            DropReason::InactiveAccount => "inactive_account",
            DropReason::UnknownIdentity => "unknown_identity",
            DropReason::StaleRev => "stale_rev",
            DropReason::LegacyCommit => "legacy_commit",
            DropReason::Invalid(e) => e.reason(),
        }
    }
}

/// The consumer's verdict on one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Pass the event on. `resync` is set when it revealed a gap: the event itself is valid,
    /// but the repo's history since the held state must be repaired from the repo.
    Accept {
        resync: Option<Gap>,
    },
    Drop(DropReason),
}

/// What the validator knows about one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountView {
    /// `None` until an `#account` event says otherwise: unknown accounts are taken as active.
    pub inactive_status: Option<String>,
    pub chain: Option<ChainState>,
}

/// An in-memory verifying consumer of one upstream.
#[derive(Debug, Clone, Default)]
pub struct StreamValidator {
    /// Accept legacy commits (without `prevData`) even when the repo's chain is held.
    pub lenient: bool,
    last_seq: Option<i64>,
    accounts: HashMap<Did, AccountView>,
}

impl StreamValidator {
    pub fn new(lenient: bool) -> Self {
        StreamValidator {
            lenient,
            ..Default::default()
        }
    }

    pub fn account(&self, did: &Did) -> Option<&AccountView> {
        self.accounts.get(did)
    }

    /// Decides on `event`; `key` is the repo's current signing key, if known. Only an accepted
    /// event changes the view (seq, account status, chain state): a forged or broken frame with
    /// an absurd seq or rev cannot block the events after it.
    pub fn check(
        &mut self,
        event: &Event<'_>,
        key: Option<&PublicKey>,
        opts: &VerifyOptions,
    ) -> Decision {
        let seq = event.seq();
        if let (Some(seq), Some(last)) = (seq, self.last_seq) {
            if seq.0 <= last {
                return Decision::Drop(DropReason::SeqNotIncreasing);
            }
        }
        let decision = self.decide(event, key, opts);
        if matches!(decision, Decision::Accept { .. }) {
            if let Some(seq) = seq {
                self.last_seq = Some(seq.0);
            }
        }
        decision
    }

    fn inactive(&self, did: &Did) -> bool {
        self.accounts
            .get(did)
            .is_some_and(|view| view.inactive_status.is_some())
    }

    fn chain(&self, did: &Did) -> Option<ChainState> {
        self.accounts.get(did).and_then(|view| view.chain)
    }

    fn decide(
        &mut self,
        event: &Event<'_>,
        key: Option<&PublicKey>,
        opts: &VerifyOptions,
    ) -> Decision {
        match event {
            Event::Commit(commit) => {
                if self.inactive(&commit.repo) {
                    return Decision::Drop(DropReason::InactiveAccount);
                }
                let held = self.chain(&commit.repo);
                // Cheap before the expensive: a stale rev needs no signature check.
                if held.is_some_and(|held| commit.rev <= held.rev) {
                    return Decision::Drop(DropReason::StaleRev);
                }
                let Some(key) = key else {
                    return Decision::Drop(DropReason::UnknownIdentity);
                };
                let verified = match verify_commit(commit, key, opts) {
                    Ok(v) => v,
                    Err(e) => return Decision::Drop(DropReason::Invalid(e)),
                };
                if verified.inversion == Inversion::Legacy && held.is_some() && !self.lenient {
                    return Decision::Drop(DropReason::LegacyCommit);
                }
                let verdict = check_commit(held.as_ref(), &verified, commit.since);
                if verdict == ChainVerdict::Duplicate {
                    return Decision::Drop(DropReason::StaleRev);
                }
                self.accounts.entry(commit.repo.clone()).or_default().chain =
                    Some(ChainState::after(&verified.commit));
                Decision::Accept {
                    resync: match verdict {
                        ChainVerdict::Gap(gap) => Some(gap),
                        _ => None,
                    },
                }
            }
            Event::Sync(sync) => {
                if self.inactive(&sync.did) {
                    return Decision::Drop(DropReason::InactiveAccount);
                }
                let Some(key) = key else {
                    return Decision::Drop(DropReason::UnknownIdentity);
                };
                let signed = match verify_sync(sync, key, opts) {
                    Ok(s) => s,
                    Err(e) => return Decision::Drop(DropReason::Invalid(e)),
                };
                let verdict = check_sync(self.chain(&sync.did).as_ref(), &signed);
                if verdict == ChainVerdict::Duplicate {
                    return Decision::Drop(DropReason::StaleRev);
                }
                self.accounts.entry(sync.did.clone()).or_default().chain =
                    Some(ChainState::after(&signed));
                Decision::Accept {
                    resync: match verdict {
                        ChainVerdict::Gap(gap) => Some(gap),
                        _ => None,
                    },
                }
            }
            Event::Account(account) => {
                let status = if account.active {
                    None
                } else {
                    Some(
                        account
                            .status
                            .clone()
                            .unwrap_or_else(|| "inactive".to_owned()),
                    )
                };
                // An account never seen and reported active needs no entry.
                if status.is_some() || self.accounts.contains_key(&account.did) {
                    self.accounts
                        .entry(account.did.clone())
                        .or_default()
                        .inactive_status = status;
                }
                Decision::Accept { resync: None }
            }
            Event::Identity(_) | Event::Info(_) | Event::Error(_) | Event::Skipped { .. } => {
                Decision::Accept { resync: None }
            }
        }
    }
}
