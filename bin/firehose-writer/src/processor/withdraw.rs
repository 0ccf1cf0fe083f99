//! The processor's part of consent withdrawal (`crate::withdrawn`): the screen before routing,
//! account deletions that count as withdrawals, and the purge, in an order that survives a
//! crash at any point:
//!
//! 1. the state stops routing the DID (in memory, at once);
//! 2. a barrier and commit: everything handled before is durable, so the walk sees every file
//!    of theirs and the purge transaction comes after every row of theirs;
//! 3. their cache files are found, and the URIs those files name (records of others about them,
//!    some known only from the files) leave the index and are recorded as salted hashes, in a
//!    commit with the cursor: a crash after the removals cannot lose them;
//! 4. the files are removed, then the emptied folders named by them, and the removals made
//!    durable (`syncfs`);
//! 5. their index rows are deleted and the purge recorded (salted hash) in one transaction with
//!    the cursor; the WAL is then truncated.
//!
//! A crash before 5 leaves the purge unrecorded: the next start (which loads the withdrawn list
//! before handling any frame) does it again, and every step is idempotent.

use std::sync::atomic::Ordering;

use anyhow::Result;
use sync_core::frame::Event;
use sync_core::ids::Did;
use sync_core::route::RoutingState;
use tracing::{error, info, warn};

use super::{cache_error, Processor};
use crate::withdrawn::{find_cache_files, remove_found, Screen};

/// Withdrawal settings of a processor.
#[derive(Debug, Default)]
pub struct Withdrawals {
    /// `--account-deleted-is-withdrawal`.
    pub account_deleted: bool,
    /// `--withdrawn`: where an account deletion taken as a withdrawal is added.
    pub list: Option<std::path::PathBuf>,
    /// Withdrawn DIDs found at start whose purge was never applied.
    pub at_start: Vec<Did>,
}

impl Processor {
    /// Sets what to purge at start and whether an account deletion is a withdrawal.
    pub fn with_withdrawals(mut self, withdrawals: Withdrawals) -> Self {
        self.withdrawals = withdrawals;
        self.metrics
            .withdrawn_dids
            .store(self.state.withdrawn().len() as u64, Ordering::Relaxed);
        self
    }

    /// The purges owed at start, before the first frame.
    pub(super) fn purge_at_start(&mut self) -> Result<()> {
        let dids = std::mem::take(&mut self.withdrawals.at_start);
        self.list_account_deletions();
        self.purge_withdrawn(dids)
    }

    /// Adds an account deletion taken as a withdrawal to the `--withdrawn` file, once: a file
    /// that cannot be written (a full disk, its owner or mode changed, removed) does not stop
    /// the capture or the withdrawal (the state records it by hash), it is logged at error and
    /// shown in `firehose_withdrawn_account_deletions_unlisted`, and tried again at the next
    /// start and reload ([`Self::list_account_deletions`]). True when it is listed now.
    fn add_to_withdrawn_list(&mut self, did: &Did, seq: Option<i64>) -> bool {
        let Some(list) = self.withdrawals.list.clone() else {
            return true;
        };
        let at = super::now_rfc3339();
        match crate::withdrawn::append_to_list(&list, did, seq, &at) {
            Ok(_) => true,
            Err(e) => {
                // The error names the file, never the DID.
                error!(seq, error = %format!("{e:#}"), "an account deletion taken as a withdrawal could not be added to the withdrawn file: the writer keeps them withdrawn, but batch-export cannot purge them until they are listed (tried again at the next start or reload)");
                false
            }
        }
    }

    /// Makes sure every account deletion taken as a withdrawal of a current study user is in
    /// the `--withdrawn` file (after a failed append, or an edit of the file that dropped the
    /// writer's line): at start and after each reload of the study-user file (a SIGHUP sends the
    /// withdrawn list first, then the sets). The gauge counts those still missing.
    pub(super) fn list_account_deletions(&mut self) {
        if !self.withdrawals.account_deleted {
            return;
        }
        let mut unlisted = 0;
        for did in self.state.account_deletions_not_listed() {
            unlisted += u64::from(!self.add_to_withdrawn_list(&did, None));
        }
        self.metrics
            .withdrawn_unlisted
            .store(unlisted, Ordering::Relaxed);
    }

    /// A new `--withdrawn` list (SIGHUP): applied before the tracked sets that come with it.
    pub(super) fn reload_withdrawn(&mut self, dids: std::collections::HashSet<Did>) -> Result<()> {
        let new = self.retry_state("withdrawn list", None, |p| {
            p.state.set_withdrawn(dids.clone())
        })?;
        self.dirty = true;
        self.metrics
            .withdrawn_dids
            .store(self.state.withdrawn().len() as u64, Ordering::Relaxed);
        self.purge_withdrawn(new)
    }

    /// What routing may see of `event` (`None`: nothing, the event is dropped). A study user's
    /// account deletion is first turned into a withdrawal when that is configured.
    pub(super) fn screen_withdrawn<'a>(
        &mut self,
        seq: Option<i64>,
        event: &Event<'a>,
    ) -> Result<Option<Screen<'a>>> {
        if let Event::Account(account) = event {
            if self.withdrawals.account_deleted
                && account.status.as_deref() == Some("deleted")
                && self.state.is_study_user(&account.did)
            {
                let did = account.did.clone();
                warn!(seq, "a study user's account was deleted: treated as a consent withdrawal (--account-deleted-is-withdrawal); added to the withdrawn list and purged (run batch-export purge for the exported tables)");
                if !self.add_to_withdrawn_list(&did, seq) {
                    self.metrics
                        .withdrawn_unlisted
                        .fetch_add(1, Ordering::Relaxed);
                }
                let new =
                    self.retry_state("withdrawal", seq, |p| p.state.withdraw_account(&did))?;
                self.metrics
                    .withdrawn_dids
                    .store(self.state.withdrawn().len() as u64, Ordering::Relaxed);
                self.purge_withdrawn(new)?;
            }
        }
        if !self.state.withdrawn().screens_anything() {
            return Ok(Some(Screen::Keep));
        }
        let study_author = event_repo(event).is_some_and(|d| self.state.is_study_user(d));
        let screen = self.state.withdrawn().screen(event, study_author);
        match &screen {
            Screen::Keep => return Ok(Some(Screen::Keep)),
            Screen::Drop => self.metrics.withdrawn_dropped("event", 1),
            Screen::Ops { dropped, about, .. } => {
                self.metrics.withdrawn_dropped("op", *dropped as u64);
                if !about.is_empty() {
                    self.state.remember_records_about_withdrawn(about);
                    self.dirty = true;
                }
            }
        }
        Ok(match screen {
            Screen::Drop => None,
            other => Some(other),
        })
    }

    /// A repaired record routed like a stream event goes through the same screen (`None`:
    /// route nothing of it).
    pub(super) fn screen_repaired<'a>(&self, event: Event<'a>) -> Option<Event<'a>> {
        let study_author = event_repo(&event).is_some_and(|d| self.state.is_study_user(d));
        match self.state.withdrawn().screen(&event, study_author) {
            Screen::Keep => Some(event),
            Screen::Drop => {
                self.metrics.withdrawn_dropped("event", 1);
                None
            }
            Screen::Ops { event, dropped, .. } => {
                self.metrics.withdrawn_dropped("op", dropped as u64);
                Some(*event)
            }
        }
    }

    /// A fetch that was under way when its repo was withdrawn came back: nothing of it is
    /// applied (its queue entry is gone), and the document its lookup may have cached goes.
    pub(super) fn withdrawn_repair(&mut self, did: &Did) -> bool {
        if !self.state.is_withdrawn(did) {
            return false;
        }
        self.in_flight.remove(did);
        self.refetch.remove(did);
        self.metrics
            .repairs_in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
        self.state.forget_identity(did);
        self.dirty = true;
        true
    }

    /// Purges `dids` (module documentation for the order).
    fn purge_withdrawn(&mut self, dids: Vec<Did>) -> Result<()> {
        if dids.is_empty() {
            return Ok(());
        }
        let seq = self.last_seq;
        for did in &dids {
            self.in_flight.remove(did);
            self.refetch.remove(did);
        }
        self.commit()?;
        crate::fault::hit(crate::fault::Point::WithdrawBeforeRemoval);
        let targets = self.retry_state("withdrawn index lookup", seq, |p| {
            p.state.cache_targets(&dids)
        })?;
        let found = self.retry("withdrawal cache walk", seq, |p| {
            find_cache_files(&p.cache, &targets)
        })?;
        if !found.uris.is_empty() {
            self.state.forget_records_of_files(&dids, &found.uris);
            self.dirty = true;
            self.commit()?;
        }
        let removal = self.retry("withdrawal cache purge", seq, |_| remove_found(&found))?;
        self.retry("withdrawal cache flush", seq, |p| {
            p.cache.sync_removals(&removal.dirs).map_err(cache_error)
        })?;
        crate::fault::hit(crate::fault::Point::WithdrawBeforeRecord);
        self.state.record_purge(&dids);
        self.dirty = true;
        self.commit()?;
        let rows = self.state.purged_rows();
        self.metrics
            .withdrawn_files_removed
            .fetch_add(removal.removed, Ordering::Relaxed);
        self.metrics
            .withdrawn_rows_purged
            .fetch_add(rows, Ordering::Relaxed);
        self.metrics
            .withdrawn_dids
            .store(self.state.withdrawn().len() as u64, Ordering::Relaxed);
        self.dispatch_repairs();
        // The DIDs are in the log already (the operator's list); the summary names none.
        info!(
            participants = dids.len(),
            files_removed = removal.removed,
            index_rows = rows,
            cursor = ?self.state.cursor(),
            "consent withdrawal applied: cache files removed, index rows purged with the cursor"
        );
        Ok(())
    }
}

/// The repo a commit is of (the only events with deletes).
fn event_repo<'e>(event: &'e Event<'_>) -> Option<&'e Did> {
    match event {
        Event::Commit(c) => Some(&c.repo),
        _ => None,
    }
}
