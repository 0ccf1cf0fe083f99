//! Withdrawn participants (`--withdrawn FILE`): the DIDs whose data the export refuses and a
//! purge removes, and the one rule that says what "their data" is.
//!
//! **The rule.** A cache file is theirs when its cache-relative path or its bytes mention a
//! withdrawn DID; a Parquet row is theirs when any of its string columns mentions one. "Mention"
//! is the DID's text followed by a character that cannot continue a DID (anything but
//! `[A-Za-z0-9:%-]`; `.` and `_` end a DID because the writer's file names put them right after
//! one). Every way the data can be theirs goes through their DID: rows they authored (`uri`,
//! `author`, `author_did`, `did`, the file name's `author_did=`), rows about their records (a
//! like's `record` names the liked post's URI, a reply's `reply_root` / `reply_parent`, a quote's
//! `embed`, a repost's `subject_uri`, a delete's `uri`) and rows about them (a follow's
//! `follow_did` / `follower_did`, a block's `subject`, a mention facet). Record URIs with a
//! handle authority (`at://alice.example/...`) do not name the DID and are not recognised.

use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sync_core::ids::Did;

/// The withdrawn DIDs of a run (empty when `--withdrawn` is not given).
#[derive(Clone, Default)]
pub struct Withdrawn {
    dids: Vec<Did>,
    finders: Vec<memchr::memmem::Finder<'static>>,
}

impl std::fmt::Debug for Withdrawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the DIDs themselves: a Debug print of the config must not leak them into logs.
        write!(f, "Withdrawn({} DIDs)", self.dids.len())
    }
}

/// Bytes that can continue a DID (so a DID followed by one of them is another, longer DID).
fn continues_did(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'%' | b'-')
}

impl Withdrawn {
    /// DIDs one per line; blank lines and `#` comments (whole-line or trailing) are skipped.
    /// `source` names the input in errors.
    pub fn parse(text: &str, source: &str) -> Result<Withdrawn> {
        let mut dids = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let did = Did::parse(line)
                .map_err(|e| anyhow::anyhow!("{source}, line {}: not a DID ({e})", i + 1))?;
            dids.push(did);
        }
        dids.sort();
        dids.dedup();
        Ok(Withdrawn::from_dids(dids))
    }

    pub fn from_dids(dids: Vec<Did>) -> Withdrawn {
        let finders = dids
            .iter()
            .map(|d| memchr::memmem::Finder::new(d.as_str().as_bytes()).into_owned())
            .collect();
        Withdrawn { dids, finders }
    }

    /// Reads a withdrawn-DIDs file.
    pub fn load(path: &Path) -> Result<Withdrawn> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the withdrawn list {}", path.display()))?;
        Withdrawn::parse(&text, &path.display().to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.dids.is_empty()
    }

    pub fn len(&self) -> usize {
        self.dids.len()
    }

    pub fn dids(&self) -> &[Did] {
        &self.dids
    }

    /// Whether `bytes` mention any withdrawn DID (the rule in the module docs).
    pub fn mentions(&self, bytes: &[u8]) -> bool {
        self.finders.iter().any(|f| {
            let n = f.needle().len();
            f.find_iter(bytes)
                .any(|at| bytes.get(at + n).is_none_or(|&b| !continues_did(b)))
        })
    }

    /// Whether a cache file (its cache-relative path, then its bytes) is theirs.
    pub fn covers_file(&self, rel_path: &str, bytes: &[u8]) -> bool {
        !self.is_empty() && (self.mentions(rel_path.as_bytes()) || self.mentions(bytes))
    }

    /// The salted hash of each DID (see [`salted_hash`]), sorted.
    pub fn salted_hashes(&self, salt: &str) -> Vec<String> {
        let mut v: Vec<String> = self.dids.iter().map(|d| salted_hash(salt, d)).collect();
        v.sort();
        v
    }
}

/// `sha256(salt || 0x00 || did)` in lowercase hex: what the ledger and the journal keep instead
/// of a DID. The salt is a secret of the state directory (`meta.purge_salt` in
/// `state.sqlite`): without it the hash of a known DID cannot be recomputed from the output.
pub fn salted_hash(salt: &str, did: &Did) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(did.as_str().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";

    #[test]
    fn parses_comments_and_rejects_bad_lines_with_their_number() {
        let w = Withdrawn::parse(
            &format!("# withdrawn\n\n{D}  # asked 2024-10-03\n{D}\n"),
            "f",
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        let err = Withdrawn::parse(&format!("{D}\nnot-a-did\n"), "list.txt").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("list.txt, line 2"), "{msg}");
        assert!(!format!("{w:?}").contains("did:"), "Debug never shows DIDs");
    }

    #[test]
    fn mentions_need_a_whole_did() {
        let w = Withdrawn::parse("did:web:example.com", "f").unwrap();
        assert!(w.mentions(b"at://did:web:example.com/app.bsky.feed.post/x"));
        assert!(w.mentions(b"author_did=did:web:example.com_post_uri_suffix=x.json"));
        assert!(w.mentions(b"\"did:web:example.com\""));
        assert!(w.mentions(b"did:web:example.com"));
        // A longer DID is another account.
        assert!(!w.mentions(b"did:web:example.comm"));
        assert!(!w.mentions(b"did:web:example.com:8080"));
        assert!(!w.mentions(b"did:web:example.co"));
        let p = Withdrawn::parse(D, "f").unwrap();
        assert!(p.covers_file(&format!("x/author_did={D}_post_uri_suffix=a.json"), b"{}"));
        assert!(p.covers_file("x/y.json", format!("{{\"subject\": \"{D}\"}}").as_bytes()));
        assert!(!p.covers_file("x/y.json", b"{\"subject\": \"did:plc:other\"}"));
        assert!(!Withdrawn::default().covers_file(D, D.as_bytes()));
    }

    #[test]
    fn salted_hashes_depend_on_the_salt_and_never_show_the_did() {
        let did = Did::parse(D).unwrap();
        let a = salted_hash("salt-a", &did);
        assert_ne!(a, salted_hash("salt-b", &did));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("z72i7"));
    }
}
