//! Consent withdrawal (issue 11, DESIGN.md §11): the `--withdrawn` list, the rule that decides
//! whether a record or a cache file is "theirs", the screen every event passes before routing,
//! and the removal of their cache files.
//!
//! The rule (README, "Consent withdrawal"): an event of a withdrawn DID (commit, `#identity`,
//! `#account`, `#sync`) is never routed; a record of anyone else that names a withdrawn DID
//! anywhere (a reply, like, repost or quote of their post, a follow or block of them, a mention)
//! is not routed either. In the cache, a file is theirs when its path or its contents name a
//! withdrawn DID (or a URI of one of their posts), or when it lies in the reaction folder of one
//! of their posts (`.../<reaction>/<rkey>/`, deletes included). Naming is a byte match of the
//! whole DID: atproto records (DAG-CBOR) and cache files (ASCII JSON) both hold DIDs as plain
//! bytes, so one pass over the bytes finds every field, known or not.
//!
//! The state side (index rows, the salted-hash record of applied purges) is
//! `state/withdrawn.rs`; the processor glue (when a purge runs, its durability order) is
//! `processor/withdraw.rs`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sync_core::frame::{Action, Event};
use sync_core::ids::Did;
use sync_core::records::RecordKind;
use tracing::warn;

use crate::cache::CacheWriter;

/// Reads a withdrawn-DID file: one DID per line, `#` starts a comment, blank lines ignored.
/// Any other line is an error naming the file and line (the caller keeps the old list).
pub fn load(path: &Path) -> Result<HashSet<Did>> {
    let mut dids = HashSet::new();
    crate::tracked::each_did_line(path, |did| {
        dids.insert(did);
    })?;
    Ok(dids)
}

/// `--withdrawn` as configured: the file's DIDs, or none without the flag.
pub fn load_configured(path: Option<&Path>) -> Result<HashSet<Did>> {
    match path {
        Some(path) => {
            load(path).with_context(|| format!("loading withdrawn DIDs from {}", path.display()))
        }
        None => Ok(HashSet::new()),
    }
}

/// Checks at start that the writer can add to the withdrawn list (`--account-deleted-is-withdrawal`
/// writes there): opened for appending, nothing written.
pub fn check_appendable(path: &Path) -> Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map(drop)
        .with_context(|| {
            format!(
                "--account-deleted-is-withdrawal adds each deleted study account to the withdrawn \
                 list, so batch-export's purge finds them too, but {} cannot be opened for \
                 writing (under the systemd unit only /var/lib/firehose is writable: keep the \
                 list there)",
                path.display()
            )
        })
}

/// Adds `did` to the withdrawn list (an account deletion taken as a withdrawal), unless listed
/// already: appended with a comment saying why and when, then fsynced, before the purge begins,
/// so the list stays the one authority both programs read (batch-export's purge and refusal
/// included). Whether it is listed is read leniently (a line of the operator's that does not
/// parse does not stop this); a write that fails part-way is cut off again, so no half line is
/// left for the next reader. Returns whether it was added.
pub fn append_to_list(path: &Path, did: &Did, seq: Option<i64>, at: &str) -> Result<bool> {
    use std::io::Write;
    let existing = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let listed = String::from_utf8_lossy(&existing).lines().any(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        line == did.as_str()
    });
    if listed {
        return Ok(false);
    }
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        text.push('\n');
    }
    let seq = seq.map_or_else(|| "-".to_owned(), |s| s.to_string());
    text.push_str(&format!(
        "# added by firehose-writer at {at}: account deleted (#account seq {seq}), \
         --account-deleted-is-withdrawal\n{did}\n"
    ));
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} to add a withdrawal", path.display()))?;
    if let Err(e) = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
    {
        // Only what this write may have added is cut (never below what was read, which would
        // pad a file someone shortened meanwhile).
        if file
            .metadata()
            .is_ok_and(|m| m.len() > existing.len() as u64)
        {
            let _ = file
                .set_len(existing.len() as u64)
                .and_then(|()| file.sync_all());
        }
        return Err(e).with_context(|| format!("adding a withdrawal to {}", path.display()));
    }
    Ok(true)
}

/// The salted hash a withdrawal is recorded under (never the DID itself): hex SHA-256 of the
/// state's salt followed by the DID.
pub fn salted_hash(salt: &[u8], did: &Did) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(did.as_str().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A record about a withdrawn participant that the purge took out of the index (a follow of
/// them, a reaction to their post), as the first 16 bytes of SHA-256 of the state's salt and the
/// record's URI: its delete, which names only its author, is not routed either.
pub type RecordHash = [u8; 16];

pub fn record_hash(salt: &[u8], uri: &str) -> RecordHash {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(uri.as_bytes());
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The purged records' hashes, with the salt they were made with.
#[derive(Clone, Debug, Default)]
pub struct PurgedRecords {
    pub salt: Vec<u8>,
    pub hashes: HashSet<RecordHash>,
}

impl PurgedRecords {
    fn holds(&self, uri: &str) -> bool {
        !self.hashes.is_empty() && self.hashes.contains(&record_hash(&self.salt, uri))
    }
}

/// Bytes that may continue a DID (`did:method:id` allows `[A-Za-z0-9._:%-]`).
fn continues_did(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'%' | b'-')
}

/// Finds whole mentions of a set of strings (withdrawn DIDs, URIs of their posts) in bytes.
#[derive(Clone, Default)]
pub struct Matcher {
    automaton: Option<AhoCorasick>,
    /// Only if the automaton could not be built (size limits): the patterns, searched one by one.
    fallback: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher")
            .field(
                "patterns",
                &self
                    .automaton
                    .as_ref()
                    .map_or(self.fallback.len(), |a| a.patterns_len()),
            )
            .finish()
    }
}

impl Matcher {
    pub fn new<'p>(patterns: impl IntoIterator<Item = &'p str>) -> Matcher {
        let patterns: Vec<&str> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
        if patterns.is_empty() {
            return Matcher::default();
        }
        match AhoCorasick::new(&patterns) {
            Ok(automaton) => Matcher {
                automaton: Some(automaton),
                fallback: Vec::new(),
            },
            // Never silently match nothing: that would route withdrawn data.
            Err(e) => {
                warn!(error = %e, patterns = patterns.len(), "withdrawn-DID matcher falls back to one search per DID");
                Matcher {
                    automaton: None,
                    fallback: patterns.iter().map(|p| p.as_bytes().to_vec()).collect(),
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.automaton.is_none() && self.fallback.is_empty()
    }

    /// True when text (a path, a JSON cache file) holds one of the patterns as a whole: not
    /// followed by a byte that would make it a longer DID (`did:web:example.com` is not named by
    /// `did:web:example.com.evil`), except a trailing `.`/`:` that ends a sentence.
    pub fn mentions(&self, bytes: &[u8]) -> bool {
        self.find(bytes, true)
    }

    /// True when a DAG-CBOR record holds one of the patterns anywhere. No boundary check: the
    /// byte after a string is the next item's header, which may be any byte (`i` opens a
    /// 9-byte key), so a withdrawn `did:web:example.com` also drops a record naming
    /// `did:web:example.com.evil` (erring on the side of the participant; a `did:plc` has a
    /// fixed length and cannot be the prefix of another).
    pub fn mentions_in_record(&self, bytes: &[u8]) -> bool {
        self.find(bytes, false)
    }

    fn find(&self, bytes: &[u8], text: bool) -> bool {
        let whole = |end: usize| {
            if !text {
                return true;
            }
            let next = bytes.get(end).copied();
            let after = bytes.get(end + 1).copied();
            match next {
                None => true,
                Some(b'.' | b':') => !after.is_some_and(|a| a.is_ascii_alphanumeric()),
                Some(b) => !continues_did(b),
            }
        };
        if let Some(automaton) = &self.automaton {
            return automaton
                .find_overlapping_iter(bytes)
                .any(|m| whole(m.end()));
        }
        self.fallback.iter().any(|p| {
            bytes
                .windows(p.len())
                .enumerate()
                .any(|(i, w)| w == p.as_slice() && whole(i + p.len()))
        })
    }
}

/// The withdrawn DIDs in effect, with their matcher.
#[derive(Clone, Debug, Default)]
pub struct Withdrawn {
    dids: HashSet<Did>,
    matcher: Matcher,
    records: Arc<PurgedRecords>,
}

impl Withdrawn {
    pub fn new(dids: HashSet<Did>) -> Withdrawn {
        let matcher = Matcher::new(dids.iter().map(Did::as_str));
        Withdrawn {
            dids,
            matcher,
            records: Arc::default(),
        }
    }

    /// The records about them that were purged (whose deletes are screened too).
    pub fn with_records(mut self, records: Arc<PurgedRecords>) -> Withdrawn {
        self.records = records;
        self
    }

    pub fn contains(&self, did: &Did) -> bool {
        !self.dids.is_empty() && self.dids.contains(did)
    }

    pub fn len(&self) -> usize {
        self.dids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dids.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Did> {
        self.dids.iter()
    }

    /// Whether [`Self::screen`] can drop anything (no withdrawal ever applied: it keeps all).
    pub fn screens_anything(&self) -> bool {
        !self.dids.is_empty() || !self.records.hashes.is_empty()
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// What routing may see of `event`: nothing of a withdrawn DID's events; of anyone else's
    /// commit, the ops whose record does not name a withdrawn DID, and no delete of a record
    /// about them that a purge took out of the index (a study user's unfollow of them names
    /// only the study user, yet says whom they followed to anyone holding the purged record).
    /// Verification still sees the whole commit (the ops are checked against the signed tree),
    /// so the screened commit is a copy used for routing only.
    ///
    /// `study_author`: whether the event's repo is a study user. Only a study user's deletes
    /// are routed without an index entry (into their own `delete/` folders), so only theirs are
    /// checked against the purged records (a hash per delete op).
    pub fn screen<'a>(&self, event: &Event<'a>, study_author: bool) -> Screen<'a> {
        if !self.screens_anything() {
            return Screen::Keep;
        }
        let subject = match event {
            Event::Commit(c) => &c.repo,
            Event::Identity(i) => &i.did,
            Event::Account(a) => &a.did,
            Event::Sync(s) => &s.did,
            _ => return Screen::Keep,
        };
        if self.dids.contains(subject) {
            return Screen::Drop;
        }
        let Event::Commit(commit) = event else {
            return Screen::Keep;
        };
        let names_withdrawn: Vec<usize> = commit
            .ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| {
                let op = op.as_ref().ok()?;
                // Only routed kinds can produce a file.
                RecordKind::of(&op.collection)?;
                if op.action == Action::Delete {
                    if !study_author || self.records.hashes.is_empty() {
                        return None;
                    }
                    // A delete carries no record: only its URI can be about them.
                    let uri = format!("at://{}/{}/{}", commit.repo, op.collection, op.rkey);
                    return self.records.holds(&uri).then_some(i);
                }
                if self.dids.is_empty() {
                    return None;
                }
                // A block that cannot be read is left to routing, which drops the op itself. Not
                // hash-checked: this only decides what is dropped, never what is kept.
                let block = commit.record_block_unhashed(op).ok()??;
                self.matcher.mentions_in_record(block).then_some(i)
            })
            .collect();
        if names_withdrawn.is_empty() {
            return Screen::Keep;
        }
        // A study user's own record about them, screened now: its later delete (routed into the
        // study user's own folder without an index entry) must be screened too.
        let about = if study_author {
            names_withdrawn
                .iter()
                .filter_map(|i| commit.ops.get(*i)?.as_ref().ok())
                .filter(|op| op.action != Action::Delete)
                .map(|op| format!("at://{}/{}/{}", commit.repo, op.collection, op.rkey))
                .collect()
        } else {
            Vec::new()
        };
        let mut screened = commit.clone();
        let mut index = 0;
        screened.ops.retain(|_| {
            let keep = !names_withdrawn.contains(&index);
            index += 1;
            keep
        });
        Screen::Ops {
            event: Box::new(Event::Commit(screened)),
            dropped: names_withdrawn.len(),
            about,
        }
    }
}

/// What [`Withdrawn::screen`] decided.
#[derive(Debug)]
pub enum Screen<'a> {
    /// Nothing withdrawn in it: route as is.
    Keep,
    /// An event of a withdrawn DID: route nothing of it.
    Drop,
    /// Route this copy, without the ops that name a withdrawn DID.
    Ops {
        event: Box<Event<'a>>,
        dropped: usize,
        /// URIs of a study user's own dropped records (whose deletes are screened from now on).
        about: Vec<String>,
    },
}

/// The cache folders (under `create/` and `delete/`) nested by the record key of the study post
/// they react to.
const REACTION_FOLDERS: [&str; 4] = [
    "reply_to_user_post",
    "like_on_user_post",
    "repost_of_user_post",
    "quote_of_user_post",
];

/// What identifies a withdrawn participant's cache files.
pub struct CacheTargets {
    /// Their DIDs, and URIs of their posts that do not contain the DID (a handle authority).
    pub matcher: Matcher,
    /// Folder names (`paths::rkey_component`) of the record keys of their study posts: a file in
    /// `<reaction folder>/<rkey>/` reacts to one of them.
    pub post_rkey_folders: HashSet<String>,
    /// URIs of records of others about them (follows of them, likes and reposts of their
    /// posts): a delete file whose `uri` is one of these is theirs (it names only its author).
    /// Looked up in a set, not added to the matcher: a popular participant has many.
    pub record_uris: HashSet<String>,
}

/// Their cache files, found by [`find_cache_files`] and not removed yet.
#[derive(Debug, Default)]
pub struct Found {
    files: Vec<(PathBuf, PathBuf)>,
    /// Folders whose own name names them (`in_network_user_activity/create/post/<DID>/`),
    /// removed once empty: the cache keeps no name of theirs either.
    named_dirs: Vec<PathBuf>,
    /// The `uri` of each file that has one, so index rows naming it can go too. Committed
    /// before any file is removed: the files are where some of these are learnt.
    pub uris: HashSet<String>,
}

impl Found {
    pub fn files(&self) -> usize {
        self.files.len()
    }
}

/// What [`remove_found`] did.
#[derive(Debug, Default)]
pub struct Removal {
    pub removed: u64,
    /// Folders a file or folder was removed from (their entries must be made durable).
    pub dirs: HashSet<PathBuf>,
}

/// Finds every regular file under the cache root that belongs to the targets (module doc), and
/// the folders named by them. Only files go, and folders of theirs once empty (the export may
/// be reading siblings, and prunes other empty ones itself). Never follows a symlink, never
/// enters a folder or reads a file whose name starts with `.` (batch-export's `.export/` state
/// and its partial files are its own to purge), never leaves the root. A file that vanished
/// meanwhile (the export deleted it) is fine; any other error stops the walk, and the caller
/// retries: a purge is only recorded once every file is gone.
pub fn find_cache_files(cache: &CacheWriter, targets: &CacheTargets) -> Result<Found> {
    let root = cache.root().to_path_buf();
    let mut out = Found::default();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
            };
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let Ok(ty) = entry.file_type() else { continue };
            let path = entry.path();
            if ty.is_dir() {
                if targets.matcher.mentions(name.as_encoded_bytes()) {
                    out.named_dirs.push(path.clone());
                }
                stack.push(path);
                continue;
            }
            if !ty.is_file() {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap_or(&path);
            let in_reaction_folder = || {
                let parent = rel.parent();
                let rkey = parent.and_then(Path::file_name).and_then(|n| n.to_str());
                let kind = parent
                    .and_then(Path::parent)
                    .and_then(Path::file_name)
                    .and_then(|n| n.to_str());
                rkey.is_some_and(|r| targets.post_rkey_folders.contains(r))
                    && kind.is_some_and(|k| REACTION_FOLDERS.contains(&k))
            };
            let contents = match fs::read(&path) {
                Ok(contents) => contents,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let json = serde_json::from_slice::<serde_json::Value>(&contents);
            let uri = json
                .as_ref()
                .ok()
                .and_then(|json| json.get("uri")?.as_str());
            let deletes_a_record_about_them = || {
                !targets.record_uris.is_empty()
                    && rel.to_str().is_some_and(|r| r.contains("delete"))
                    && uri.is_some_and(|uri| targets.record_uris.contains(uri))
            };
            let theirs = targets.matcher.mentions(rel.as_os_str().as_encoded_bytes())
                || in_reaction_folder()
                || targets.matcher.mentions(&contents)
                || deletes_a_record_about_them();
            if !theirs {
                continue;
            }
            match (&json, uri) {
                (_, Some(uri)) => {
                    out.uris.insert(uri.to_owned());
                }
                (Err(e), _) => {
                    warn!(error = %e, "a withdrawn participant's cache file is not JSON (its name is not logged: it names them)")
                }
                (Ok(_), None) => {}
            }
            out.files.push((path, dir.clone()));
        }
    }
    Ok(out)
}

/// Removes what [`find_cache_files`] found: the files, then the folders named by them that are
/// empty now (deepest first; one still holding something, say a file the export is taking,
/// stays and is tried again by the next purge).
pub fn remove_found(found: &Found) -> Result<Removal> {
    let mut out = Removal::default();
    for (path, dir) in &found.files {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        out.removed += 1;
        out.dirs.insert(dir.clone());
        crate::fault::hit(crate::fault::Point::WithdrawRemoval);
    }
    let mut named: Vec<&PathBuf> = found.named_dirs.iter().collect();
    named.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in named {
        match fs::remove_dir(dir) {
            Ok(()) => {
                out.dirs.remove(dir);
                if let Some(parent) = dir.parent() {
                    out.dirs.insert(parent.to_owned());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_deletion_is_added_to_the_list_once_after_the_operators_lines() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("withdrawn.txt");
        // The operator's last line has no newline: the addition must not join it.
        fs::write(
            &list,
            "# withdrew by email\ndid:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        )
        .unwrap();
        check_appendable(&list).unwrap();
        let did = Did::parse("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb").unwrap();
        let at = "2026-12-03T10:00:00.000Z";
        assert!(append_to_list(&list, &did, Some(42), at).unwrap());
        assert!(
            !append_to_list(&list, &did, Some(43), at).unwrap(),
            "listed already"
        );
        let listed = load(&list).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&did));
        let text = fs::read_to_string(&list).unwrap();
        assert_eq!(text.matches(did.as_str()).count(), 1, "{text}");
        assert!(text.contains("seq 42") && text.contains(at), "{text}");
        let operators = Did::parse("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        assert!(append_to_list(&list, &operators, None, at).is_ok_and(|added| !added));
        // A line of the operator's that does not parse does not stop an addition (the list's
        // readers report it; the writer must not stall on it).
        fs::write(&list, "not a did\n").unwrap();
        assert!(append_to_list(&list, &did, None, at).unwrap());
        assert!(fs::read_to_string(&list)
            .unwrap()
            .ends_with(&format!("{did}\n")));

        let missing = dir.path().join("missing.txt");
        let err = check_appendable(&missing).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot be opened for writing"),
            "{err:#}"
        );
        assert!(check_appendable(dir.path()).is_err(), "a folder is no list");
    }

    #[test]
    fn whole_dids_only() {
        let m = Matcher::new(["did:web:example.com", "did:plc:z72i7hdynmk6r22z27h6tvur"]);
        assert!(m.mentions(br#"{"did": "did:web:example.com"}"#));
        assert!(m.mentions(b"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/x"));
        assert!(m.mentions(b"thanks did:web:example.com. bye"));
        assert!(m.mentions(b"did:web:example.com"));
        assert!(!m.mentions(b"did:web:example.com.evil"));
        assert!(!m.mentions(b"did:web:example.com%3A8080"));
        assert!(!m.mentions(b"did:web:example.co"));
        assert!(!Matcher::new([]).mentions(b"did:web:example.com"));
        // DAG-CBOR: the DID string is followed by the header of the next key (`i`: a text of 9
        // bytes, `createdAt`), which a text boundary check would take for a longer DID.
        let follow =
            b"\xa3e$typeuapp.bsky.graph.followgsubjectx did:plc:z72i7hdynmk6r22z27h6tvuricreatedAt";
        assert!(!m.mentions(follow));
        assert!(m.mentions_in_record(follow));
    }

    #[test]
    fn list_files_name_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.txt");
        fs::write(
            &path,
            "# withdrawn\ndid:plc:z72i7hdynmk6r22z27h6tvur # asked 2026-01-02\n\n",
        )
        .unwrap();
        assert_eq!(load(&path).unwrap().len(), 1);
        fs::write(
            &path,
            "did:plc:z72i7hdynmk6r22z27h6tvur\nalice.bsky.social\n",
        )
        .unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("w.txt:2"), "{e}");
    }

    #[test]
    fn salted_hashes_depend_on_the_salt_and_hide_the_did() {
        let did = Did::parse("did:plc:z72i7hdynmk6r22z27h6tvur").unwrap();
        let a = salted_hash(b"one", &did);
        assert_eq!(a.len(), 64);
        assert_ne!(a, salted_hash(b"two", &did));
        assert!(!a.contains("z72i7"));
    }
}
