//! Commit verification in the writer: where signing keys come from ([`Identities`]) and which
//! commits the `--verify` policy checks. The checks themselves are `sync_core::verify`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sync_core::did_doc::{parse_did_doc_map, AtprotoIdentity};
use sync_core::ids::Did;

/// Signing keys and PDS endpoints by DID, for the processor thread.
pub trait Identities: Send {
    /// The identity of `did`; may wait for the network (bounded by the implementation). The
    /// error is a stable reason label (`no_did_document`, `identity_not_found`...).
    fn identity(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, &'static str>;
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

    fn refresh(&self, did: &Did) -> Result<Arc<AtprotoIdentity>, &'static str> {
        self.identity(did)
    }

    fn changed(&self, _did: &Did) {}
}
