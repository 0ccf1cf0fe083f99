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

    /// Decides on `event`; `key` is the repo's current signing key, if known. Accepting an event
    /// updates the view (seq, account status, chain state); a dropped event changes nothing
    /// except that a seq, once seen, is never accepted again.
    pub fn check(
        &mut self,
        event: &Event<'_>,
        key: Option<&PublicKey>,
        opts: &VerifyOptions,
    ) -> Decision {
        if let Some(seq) = event.seq() {
            if self.last_seq.is_some_and(|last| seq.0 <= last) {
                return Decision::Drop(DropReason::SeqNotIncreasing);
            }
            self.last_seq = Some(seq.0);
        }
        match event {
            Event::Commit(commit) => {
                let view = self.accounts.entry(commit.repo.clone()).or_default();
                if view.inactive_status.is_some() {
                    return Decision::Drop(DropReason::InactiveAccount);
                }
                // Cheap before the expensive: a stale rev needs no signature check.
                if view.chain.is_some_and(|held| commit.rev <= held.rev) {
                    return Decision::Drop(DropReason::StaleRev);
                }
                let Some(key) = key else {
                    return Decision::Drop(DropReason::UnknownIdentity);
                };
                let verified = match verify_commit(commit, key, opts) {
                    Ok(v) => v,
                    Err(e) => return Decision::Drop(DropReason::Invalid(e)),
                };
                if verified.inversion == Inversion::Legacy && view.chain.is_some() && !self.lenient
                {
                    return Decision::Drop(DropReason::LegacyCommit);
                }
                let verdict = check_commit(view.chain.as_ref(), &verified, commit.since);
                view.chain = Some(ChainState::after(&verified.commit));
                match verdict {
                    ChainVerdict::First | ChainVerdict::InOrder => {
                        Decision::Accept { resync: None }
                    }
                    ChainVerdict::Gap(gap) => Decision::Accept { resync: Some(gap) },
                    ChainVerdict::Duplicate => Decision::Drop(DropReason::StaleRev),
                }
            }
            Event::Sync(sync) => {
                let view = self.accounts.entry(sync.did.clone()).or_default();
                if view.inactive_status.is_some() {
                    return Decision::Drop(DropReason::InactiveAccount);
                }
                let Some(key) = key else {
                    return Decision::Drop(DropReason::UnknownIdentity);
                };
                let signed = match verify_sync(sync, key, opts) {
                    Ok(s) => s,
                    Err(e) => return Decision::Drop(DropReason::Invalid(e)),
                };
                match check_sync(view.chain.as_ref(), &signed) {
                    ChainVerdict::Duplicate => Decision::Drop(DropReason::StaleRev),
                    verdict => {
                        view.chain = Some(ChainState::after(&signed));
                        Decision::Accept {
                            resync: match verdict {
                                ChainVerdict::Gap(gap) => Some(gap),
                                _ => None,
                            },
                        }
                    }
                }
            }
            Event::Account(account) => {
                let view = self.accounts.entry(account.did.clone()).or_default();
                view.inactive_status = if account.active {
                    None
                } else {
                    Some(
                        account
                            .status
                            .clone()
                            .unwrap_or_else(|| "inactive".to_owned()),
                    )
                };
                Decision::Accept { resync: None }
            }
            Event::Identity(_) | Event::Info(_) | Event::Error(_) | Event::Skipped { .. } => {
                Decision::Accept { resync: None }
            }
        }
    }
}
