//! Commit verification in the writer: where signing keys come from ([`Identities`]), and the
//! verification stage that checks commits on its own thread ahead of the processor. The checks
//! themselves are `sync_core::verify`; which commits `--verify` requires is the processor's call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sync_core::did_doc::{parse_did_doc_map, AtprotoIdentity};
use sync_core::frame::{commit_repo, decode_frame, Event};
use sync_core::ids::Did;
use sync_core::verify::{verify_commit, VerifiedCommit, VerifyOptions};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Bytes;

use crate::config::VerifyMode;
use crate::processor::Input;
use crate::tracked::SharedMembership;

/// Signing keys and PDS endpoints by DID, for the processor thread.
pub trait Identities: Send + Sync {
    /// The identity of `did`; may wait for the network (bounded by the implementation). The
    /// error is a stable reason label (`no_did_document`, `identity_not_found`...).
    fn identity(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, &'static str>;
    /// The identity if it is at hand without waiting (memory or `--did-docs`), not counted as
    /// a lookup: what verification ahead of the processor uses. The processor still asks
    /// [`Self::identity`] before it trusts a result, so an `#identity` in between is honoured.
    fn peek(&self, did: &Did) -> Option<Arc<AtprotoIdentity>>;
    /// The identity fetched again, bypassing caches (once after a signature failure).
    fn refresh(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, &'static str>;
    /// An `#identity` event: the cached document may be stale.
    fn changed(&self, did: &Did);
}

/// Identities from a `--did-docs` file only: replaying a capture offline. A DID the file does not
/// have is `no_did_document`; a document that does not parse is `bad_did_document`.
#[derive(Debug, Default)]
pub struct StaticIdentities {
    docs: HashMap<Did, Result<Arc<AtprotoIdentity>, &'static str>>,
}

impl StaticIdentities {
    pub fn load(path: &Path) -> Result<StaticIdentities> {
        Ok(StaticIdentities {
            docs: load_did_docs(path)?,
        })
    }
}

/// Reads a DID -> document JSON file (the format of `relay-capture/did_docs.json`). A document
/// that does not parse is kept as its error (commits of that DID fail verification with it).
pub fn load_did_docs(
    path: &Path,
) -> Result<HashMap<Did, Result<Arc<AtprotoIdentity>, &'static str>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading DID documents {}", path.display()))?;
    let map = parse_did_doc_map(&text)
        .with_context(|| format!("parsing DID documents {}", path.display()))?;
    Ok(map
        .into_iter()
        .map(|(did, doc)| (did, doc.map(Arc::new).map_err(|_| "bad_did_document")))
        .collect())
}

impl Identities for StaticIdentities {
    fn identity(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, &'static str> {
        self.docs
            .get(did)
            .cloned()
            .unwrap_or(Err("no_did_document"))
    }

    fn peek(&self, did: &Did) -> Option<Arc<AtprotoIdentity>> {
        self.docs
            .get(did)
            .and_then(|doc| doc.as_ref().ok())
            .cloned()
    }

    fn refresh(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, &'static str> {
        self.identity(did)
    }

    fn changed(&self, _did: &Did) {}
}

/// A commit verified by the stage, and the identity whose key checked it.
#[derive(Debug)]
pub struct Ahead {
    pub(crate) identity: Arc<AtprotoIdentity>,
    pub(crate) result: Result<VerifiedCommit, &'static str>,
}

/// Verification ahead of the processor, on its own thread: it receives the processor's inputs,
/// checks the commits the processor will verify (every commit under `all`, tracked repos'
/// under `routed`) whose key is at hand without waiting, and passes everything on in order,
/// frames as [`Input::Verified`]. Verification is pure and most of a verified commit's cost,
/// so the processor handles one batch while the stage checks the next (the second core).
///
/// The processor still decides: it uses a result only if the key that checked it is still the
/// repo's key when the commit's turn comes (an `#identity` earlier in the stream sends it back
/// through the normal path), and checks in turn whatever was not checked here (a key not yet
/// resolved, a repo that became tracked a moment ago, a stranger's reaction that produces a
/// file). Ends when its input closes or the processor is gone.
pub struct VerifyStage {
    pub mode: VerifyMode,
    pub identities: Arc<dyn Identities>,
    pub membership: Arc<SharedMembership>,
    /// Threads a batch's commits are split between ([`verify_threads`]).
    pub threads: usize,
}

/// Verifying threads for `mode`, at least one and at most 8. Under `all` every commit is
/// verified and verification is the pipeline's bottleneck: one thread per core. Under `routed`
/// only tracked repos' commits are, and the processor (a single thread) needs a core of its
/// own: one per core but one (on 2 cores the stage verifies on its own thread; two threads
/// there were no faster). Measured in BENCHMARKS.md.
pub fn verify_threads(mode: VerifyMode) -> usize {
    threads_for_cores(
        mode,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )
}

fn threads_for_cores(mode: VerifyMode, cores: usize) -> usize {
    match mode {
        VerifyMode::All => cores,
        VerifyMode::Routed | VerifyMode::Off => cores.saturating_sub(1),
    }
    .clamp(1, 8)
}

impl VerifyStage {
    pub fn run(self, mut input: mpsc::Receiver<Input>, processor: mpsc::Sender<Input>) {
        while let Some(item) = input.blocking_recv() {
            let item = match item {
                Input::Frames(frames) => {
                    let ahead = self.check(&frames);
                    Input::Verified(frames, ahead)
                }
                other => other,
            };
            if processor.blocking_send(item).is_err() {
                return;
            }
        }
    }

    fn wanted(&self, did: &str) -> bool {
        match self.mode {
            VerifyMode::Off => false,
            VerifyMode::All => true,
            VerifyMode::Routed => self.membership.tracked_str(did),
        }
    }

    /// What could be checked ahead in `frames`, by position. The batch's commits are split
    /// between `threads` threads (scoped to the batch: nothing spins or waits between batches).
    pub fn check(&self, frames: &[Bytes]) -> Vec<Option<Ahead>> {
        let mut jobs: Vec<Option<(Event<'_>, Arc<AtprotoIdentity>)>> = frames
            .iter()
            .map(|frame| {
                // Most commits are not verified under `routed`: their repo is read without
                // decoding the frame (its CAR and ops), which the processor does anyway.
                let repo = commit_repo(frame)?;
                if !self.wanted(repo) {
                    return None;
                }
                let repo = Did::parse(repo).ok()?;
                let identity = self.identities.peek(&repo)?;
                let Ok(Event::Commit(c)) = decode_frame(frame) else {
                    return None;
                };
                Some((Event::Commit(c), identity))
            })
            .collect();
        let mut ahead: Vec<Option<Ahead>> = Vec::new();
        ahead.resize_with(frames.len(), || None);
        let count = jobs.iter().filter(|j| j.is_some()).count();
        let threads = self.threads.clamp(1, count.max(1));
        let opts = VerifyOptions::at(now_micros());
        let verify = |jobs: &mut [Option<(Event<'_>, Arc<AtprotoIdentity>)>],
                      out: &mut [Option<Ahead>]| {
            for (job, slot) in jobs.iter_mut().zip(out) {
                if let Some((Event::Commit(c), identity)) = job.take() {
                    let result =
                        verify_commit(&c, &identity.signing_key, &opts).map_err(|e| e.reason());
                    *slot = Some(Ahead { identity, result });
                }
            }
        };
        if threads < 2 {
            verify(&mut jobs, &mut ahead);
            return ahead;
        }
        // Equal shares of the commits to verify, not of the frames.
        let per_thread = count.div_ceil(threads);
        let mut bounds = vec![0];
        let mut seen = 0;
        for (i, job) in jobs.iter().enumerate() {
            if job.is_some() {
                seen += 1;
                if seen % per_thread == 0 && bounds.len() < threads {
                    bounds.push(i + 1);
                }
            }
        }
        bounds.push(jobs.len());
        std::thread::scope(|scope| {
            let mut jobs_rest: &mut [_] = &mut jobs;
            let mut out_rest: &mut [_] = &mut ahead;
            let mut parts = Vec::new();
            for window in bounds.windows(2) {
                let len = window[1] - window[0];
                let (jobs_part, jobs_tail) = std::mem::take(&mut jobs_rest).split_at_mut(len);
                let (out_part, out_tail) = std::mem::take(&mut out_rest).split_at_mut(len);
                jobs_rest = jobs_tail;
                out_rest = out_tail;
                parts.push((jobs_part, out_part));
            }
            let mut parts = parts.into_iter();
            let mine = parts.next();
            for (jobs_part, out_part) in parts {
                let verify = &verify;
                scope.spawn(move || verify(jobs_part, out_part));
            }
            if let Some((jobs_part, out_part)) = mine {
                verify(jobs_part, out_part);
            }
        });
        ahead
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracked::DidSet;

    /// The relay capture verified ahead by one thread and split between three: the same
    /// verdict for every frame, in place.
    #[test]
    fn a_batch_split_between_threads_gets_the_verdicts_of_one_thread() {
        let Some(fixtures) = workspace_tests::fixtures() else {
            return;
        };
        let dir = fixtures.join("relay-capture");
        let data = std::fs::read(dir.join("frames.bin")).unwrap();
        let frames: Vec<Bytes> = sync_core::frame::capture_frames(&data)
            .map(|f| Bytes::copy_from_slice(f.unwrap()))
            .collect();
        let stage = |threads| VerifyStage {
            mode: VerifyMode::All,
            identities: Arc::new(StaticIdentities::load(&dir.join("did_docs.json")).unwrap()),
            membership: Arc::new(SharedMembership::new(
                Arc::new(DidSet::builder().build()),
                Arc::new(DidSet::builder().build()),
            )),
            threads,
        };
        let verdicts = |ahead: Vec<Option<Ahead>>| -> Vec<Option<Result<String, &'static str>>> {
            ahead
                .into_iter()
                .map(|a| a.map(|a| a.result.map(|v| v.commit.rev.to_string())))
                .collect()
        };
        let one = verdicts(stage(1).check(&frames));
        let three = verdicts(stage(3).check(&frames));
        let verified = one.iter().filter(|v| matches!(v, Some(Ok(_)))).count();
        assert!(
            verified > 100,
            "{verified} commits verified of {}",
            frames.len()
        );
        assert_eq!(one, three);
    }

    #[test]
    fn under_routed_the_processor_keeps_a_core_of_its_own() {
        let cores = [1, 2, 3, 4, 9, 64];
        let routed = cores.map(|c| threads_for_cores(VerifyMode::Routed, c));
        assert_eq!(routed, [1, 1, 2, 3, 8, 8]);
        let all = cores.map(|c| threads_for_cores(VerifyMode::All, c));
        assert_eq!(all, [1, 2, 3, 4, 8, 8]);
    }
}
