//! Walking the cache, reading and keying its files, quarantining the bad ones and deleting the
//! exported ones.
//!
//! Names starting with `.` are never touched: the writer's `.tmp-*` files, `.export/` (state)
//! and `.quarantine/`. The one exception is a file this export took out of the writer's way to
//! delete it ([`TAKEN_PREFIX`]), which the walk reports under its original name. Only complete
//! files are ever seen, because the writer renames each file into place.

use std::fs::{self, File, ReadDir};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::state::FileKey;
use crate::tables::{classify, Source};

/// Prefix of a file taken out of the writer's way by [`delete_if_same`]:
/// `.exported-<32 hex>-<original name>`. The writer never writes or reads such a name; the walk
/// reports it under the original name, so a take left behind (by a crash, or because the writer
/// had already written a newer file at the original name) is exported or deleted next run.
pub const TAKEN_PREFIX: &str = ".exported-";

/// The first 16 hex digits of the taken names one run creates (the other 16 are random): the
/// run's walk, which lists folders while that run's deletes take files in them, skips its own
/// takes instead of reading them back as files (a take it left behind is read by the next run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeToken(String);

impl TakeToken {
    pub fn new() -> TakeToken {
        let mut hex = uuid::Uuid::new_v4().simple().to_string();
        hex.truncate(16);
        TakeToken(hex)
    }

    fn took(&self, taken_name: &str) -> bool {
        taken_name
            .strip_prefix(TAKEN_PREFIX)
            .is_some_and(|id| id.starts_with(&self.0))
    }
}

impl Default for TakeToken {
    fn default() -> Self {
        TakeToken::new()
    }
}

/// The original name of a taken file, or `None` if `name` is not one.
pub fn original_of_taken(name: &str) -> Option<&str> {
    let (id, original) = name.strip_prefix(TAKEN_PREFIX)?.split_once('-')?;
    let well_formed = id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && !original.is_empty()
        && !original.starts_with('.');
    well_formed.then_some(original)
}

/// A cache file found by the walk.
#[derive(Debug, Clone)]
pub struct FileRef {
    /// Cache-relative directory, `/`-separated.
    pub dir: Arc<str>,
    /// The name the writer gave the file (what keys and table parsing use).
    pub name: String,
    /// The name on disk when it differs from `name` (a taken file, see [`TAKEN_PREFIX`]).
    pub taken: Option<String>,
    /// `None` for a folder that feeds no table.
    pub source: Option<Arc<Source>>,
}

impl FileRef {
    /// Cache-relative path under the writer's name: part of the file's key.
    pub fn rel_path(&self) -> String {
        self.join(&self.name)
    }

    /// Cache-relative path of the file on disk.
    pub fn disk_rel_path(&self) -> String {
        self.join(self.taken.as_deref().unwrap_or(&self.name))
    }

    fn join(&self, name: &str) -> String {
        if self.dir.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{}", self.dir, name)
        }
    }
}

/// Identity of the file that was read: a delete only removes that same file, never a newer one
/// the writer renamed over it in the meantime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

struct Frame {
    dir: Arc<str>,
    source: Option<Arc<Source>>,
    entries: ReadDir,
    /// Files this folder and the folders in it handed out (a folder whose tree handed out none
    /// may be empty now; one that did is pruned only after the batch that deletes them).
    files: u64,
    /// The folder's mtime when the walk entered it (its age for `--clear-cache`).
    modified: Option<std::time::SystemTime>,
}

/// What the walk could not handle: never silently skipped, each is logged and counted, and the
/// run exits "needs a human" (3). The writer only ever writes UTF-8 names, regular files and
/// folders it can read, so each of these means something outside the service touched the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Entries whose name is not UTF-8 (left in place).
    pub non_utf8_names: u64,
    /// Symlinks, FIFOs, sockets, devices (left in place; a symlink is never followed).
    pub non_regular_files: u64,
    /// Folders that could not be listed and entries whose type could not be read.
    pub unreadable: u64,
}

impl Skipped {
    pub fn any(&self) -> bool {
        *self != Skipped::default()
    }
}

/// Depth-first, streaming walk of the cache (no full listing is held in memory: the stack of
/// open folders is as deep as the cache, and `--clear-cache` remembers only folders whose files
/// are in the current batch).
pub struct Walker {
    stack: Vec<Frame>,
    pub skipped: Skipped,
    /// The cache root and `--clear-cache`'s minimum folder age.
    pruner: Pruner,
    /// Folders the walk left that handed out files: removed, if empty, after the batch holding
    /// those files deleted them ([`Chunk::left`]).
    pending: Vec<(String, Option<std::time::SystemTime>)>,
    pruned: usize,
    /// Takes of the run this walk belongs to: skipped (see [`TakeToken`]).
    own_takes: Option<TakeToken>,
}

impl Walker {
    pub fn new(root: &Path) -> Result<Walker> {
        let entries = fs::read_dir(root).with_context(|| format!("reading {}", root.display()))?;
        Ok(Walker {
            stack: vec![Frame {
                dir: Arc::from(""),
                source: None,
                entries,
                files: 0,
                modified: None,
            }],
            skipped: Skipped::default(),
            pruner: Pruner {
                root: root.to_owned(),
                min_age: None,
            },
            pending: Vec::new(),
            pruned: 0,
            own_takes: None,
        })
    }

    /// Skips the files the run's own deletes take out of the way while the walk lists.
    pub fn skip_takes_of(&mut self, token: &TakeToken) {
        self.own_takes = Some(token.clone());
    }

    /// `--clear-cache`: remove empty nested folders (never the skeleton) not modified for
    /// `min_age_secs` as the walk leaves them.
    pub fn prune_empty_dirs(&mut self, min_age_secs: u64) {
        self.pruner.min_age = Some(std::time::Duration::from_secs(min_age_secs));
    }

    /// Walks on a thread of its own, `batch_files` files ahead of the batch being exported: the
    /// listing (a third of the serial time per batch at a million files, BENCHMARKS.md) overlaps
    /// the batch's parsing, staging and commit instead of adding to them. The walk lists one
    /// chunk of names and waits until it is taken (a rendezvous channel), so besides the
    /// batches being read and exported at most one chunk of names is held.
    pub fn ahead(self, batch_files: usize) -> Result<WalkAhead> {
        let (tx, rx) = std::sync::mpsc::sync_channel(0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pruner = self.pruner.clone();
        let thread = {
            let stop = stop.clone();
            let mut walker = self;
            std::thread::Builder::new()
                .name("cache-walk".into())
                .spawn(move || loop {
                    let files: Vec<FileRef> = walker
                        .by_ref()
                        .take_while(|_| !stop.load(std::sync::atomic::Ordering::Relaxed))
                        .take(batch_files)
                        .collect();
                    let done = files.len() < batch_files;
                    let chunk = Chunk {
                        files,
                        left: std::mem::take(&mut walker.pending),
                        pruned: std::mem::take(&mut walker.pruned),
                        skipped: walker.skipped,
                        done,
                    };
                    if tx.send(chunk).is_err() || done {
                        break;
                    }
                })
                .context("starting the cache walk")?
        };
        Ok(WalkAhead {
            chunks: Some(rx),
            stop,
            thread: Some(thread),
            pruner,
        })
    }

    /// The walk is done with the folder on top of the stack.
    fn leave(&mut self) {
        let Some(frame) = self.stack.pop() else {
            return;
        };
        if self.pruner.min_age.is_none() || !is_prunable(&frame.dir) {
            return;
        }
        if let Some(parent) = self.stack.last_mut() {
            parent.files += frame.files;
        }
        if frame.files == 0 {
            // Empty as listed (a file the writer renamed in since makes rmdir fail: nothing
            // is lost).
            self.pruned += self.pruner.prune([(frame.dir.to_string(), frame.modified)]);
        } else {
            // In leave order, children before their parents: pruned in that order after the
            // batch, a parent emptied by its children's removal goes too.
            self.pending.push((frame.dir.to_string(), frame.modified));
        }
    }
}

/// Removes empty folders old enough for `--clear-cache`.
#[derive(Clone)]
pub struct Pruner {
    root: PathBuf,
    /// `None`: `--clear-cache` is off, nothing is removed.
    min_age: Option<std::time::Duration>,
}

impl Pruner {
    /// Removes each folder (cache-relative) that is empty and old enough; returns how many were.
    pub fn prune(
        &self,
        dirs: impl IntoIterator<Item = (String, Option<std::time::SystemTime>)>,
    ) -> usize {
        dirs.into_iter()
            .filter(|(dir, modified)| {
                self.old_enough(*modified) && fs::remove_dir(self.root.join(dir)).is_ok()
            })
            .count()
    }

    fn old_enough(&self, modified: Option<std::time::SystemTime>) -> bool {
        let Some(min) = self.min_age else {
            return false;
        };
        modified
            .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age >= min)
    }
}

/// One batch's files, listed ahead by [`Walker::ahead`].
pub struct Chunk {
    pub files: Vec<FileRef>,
    /// Folders the walk left while listing these files (their files are in this chunk or an
    /// earlier one): prune them with [`WalkAhead::prune`] once this chunk's batch deleted its
    /// files.
    pub left: Vec<(String, Option<std::time::SystemTime>)>,
    /// Empty folders removed as the walk left them.
    pub pruned: usize,
    /// What the walk could not handle so far (running totals).
    pub skipped: Skipped,
    /// The walk is over: this is the last chunk.
    pub done: bool,
}

/// The walk running ahead on its own thread; stopped and joined when dropped.
pub struct WalkAhead {
    chunks: Option<std::sync::mpsc::Receiver<Chunk>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pruner: Pruner,
}

impl WalkAhead {
    /// The next chunk; `None` once the last one was taken. An error if the walk's thread died
    /// (a bug): a walk cut short must not pass for a finished one.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        let Some(chunks) = self.chunks.as_ref() else {
            return Ok(None);
        };
        match chunks.recv() {
            Ok(chunk) => {
                if chunk.done {
                    self.chunks = None;
                }
                Ok(Some(chunk))
            }
            Err(_) => {
                self.chunks = None;
                let why = match self.thread.take().map(|t| t.join()) {
                    Some(Err(panic)) => crate::panic_message(&*panic),
                    _ => "no reason given".into(),
                };
                anyhow::bail!(
                    "the cache walk stopped before its end ({why}); nothing after it was exported"
                )
            }
        }
    }

    /// Removes the folders a chunk left, if they are empty (and old enough) now.
    pub fn prune(&self, left: Vec<(String, Option<std::time::SystemTime>)>) -> usize {
        self.pruner.prune(left)
    }
}

impl Drop for WalkAhead {
    fn drop(&mut self) {
        // A run that stops early (an error) must not leave the walk removing folders behind it.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.chunks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Iterator for Walker {
    type Item = FileRef;

    fn next(&mut self) -> Option<FileRef> {
        loop {
            let frame = self.stack.last_mut()?;
            let entry = match frame.entries.next() {
                None => {
                    self.leave();
                    continue;
                }
                Some(Err(e)) => {
                    self.skipped.unreadable += 1;
                    tracing::warn!(dir = %frame.dir, error = %e, "cannot list a cache folder entry");
                    continue;
                }
                Some(Ok(entry)) => entry,
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                self.skipped.non_utf8_names += 1;
                tracing::warn!(dir = %frame.dir, name = ?name, "left in place: a name that is not UTF-8");
                continue;
            };
            let ty = match entry.file_type() {
                Ok(ty) => ty,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.skipped.unreadable += 1;
                    tracing::warn!(dir = %frame.dir, name, error = %e, "left in place: cannot read the type of a cache entry");
                    continue;
                }
            };
            if name.starts_with('.') {
                let own = self.own_takes.as_ref().is_some_and(|t| t.took(name));
                if let Some(original) = original_of_taken(name).filter(|_| ty.is_file() && !own) {
                    frame.files += 1;
                    return Some(FileRef {
                        dir: frame.dir.clone(),
                        name: original.to_owned(),
                        taken: Some(name.to_owned()),
                        source: frame.source.clone(),
                    });
                }
                continue;
            }
            if ty.is_dir() {
                let dir: Arc<str> = if frame.dir.is_empty() {
                    Arc::from(name)
                } else {
                    Arc::from(format!("{}/{}", frame.dir, name))
                };
                let path = self.pruner.root.join(&*dir);
                match fs::read_dir(&path) {
                    Ok(entries) => {
                        let source = classify(&dir).map(Arc::new);
                        let modified = if self.pruner.min_age.is_some() {
                            fs::metadata(&path).and_then(|m| m.modified()).ok()
                        } else {
                            None
                        };
                        self.stack.push(Frame {
                            dir,
                            source,
                            entries,
                            files: 0,
                            modified,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        self.skipped.unreadable += 1;
                        tracing::warn!(dir = %dir, error = %e, "left in place: cannot read a cache folder");
                    }
                }
            } else if ty.is_file() {
                frame.files += 1;
                return Some(FileRef {
                    dir: frame.dir.clone(),
                    name: name.to_owned(),
                    taken: None,
                    source: frame.source.clone(),
                });
            } else {
                self.skipped.non_regular_files += 1;
                tracing::warn!(dir = %frame.dir, name, kind = ?ty, "left in place: not a regular file (a symlink is never followed)");
            }
        }
    }
}

/// The outcome of reading one file.
pub enum Read1 {
    /// Gone since it was listed (deleted or renamed): nothing to do.
    Gone,
    Ok {
        id: FileId,
        key: FileKey,
        bytes: Vec<u8>,
    },
    Unreadable(String),
}

/// Reads a file and computes its key (`volatile`: see [`file_key`]).
pub fn read_file(root: &Path, f: &FileRef, volatile: Option<&str>) -> Read1 {
    let rel = f.rel_path();
    let path = root.join(f.disk_rel_path());
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Read1::Gone,
        Err(e) => return Read1::Unreadable(format!("open: {e}")),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Read1::Unreadable(format!("stat: {e}")),
    };
    // One read() for the usual case (the file is not growing: the writer renames whole files).
    let len = meta.len() as usize;
    let mut bytes = vec![0u8; len + 1];
    let mut filled = 0;
    loop {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled < bytes.len() {
                    if filled == len {
                        break;
                    }
                    continue;
                }
                bytes.resize(bytes.len() * 2, 0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Read1::Unreadable(format!("read: {e}")),
        }
    }
    bytes.truncate(filled);
    let key = file_key(&rel, &bytes, volatile);
    Read1::Ok {
        id: FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        key,
        bytes,
    }
}

/// Key of a cache file: SHA-256 (first 16 bytes) of its cache-relative path and its contents,
/// with the value of the top-level key `volatile` left out (`synctimestamp` of posts: a writer
/// replay rewrites the same path with the same JSON except that ingest clock; `seq` of account
/// events: a second delivery of the same event comes with another seq).
pub fn file_key(rel_path: &str, bytes: &[u8], volatile: Option<&str>) -> FileKey {
    let mut h = Sha256::new();
    h.update(rel_path.as_bytes());
    h.update([0u8]);
    // In ASCII-escaped JSON a literal `"<key>": ` can only be a key (a `"` inside a string value
    // is always escaped); these keys occur once, at the top level, before any nested object.
    let found = volatile.and_then(|key| {
        let pattern = format!("\"{key}\": ");
        memchr::memmem::find(bytes, pattern.as_bytes()).map(|at| at + pattern.len())
    });
    match found {
        Some(value_start) => {
            // A string value keeps its quotes in the key (posts' keys are unchanged from when
            // only `synctimestamp` was left out, so the exported-keys store stays valid); any
            // other value ends at the next `,` or `}`.
            let (keep_to, end) = if bytes.get(value_start) == Some(&b'"') {
                let open = value_start + 1;
                let close = memchr::memchr(b'"', &bytes[open..]).map_or(bytes.len(), |i| open + i);
                (open, close)
            } else {
                let end = memchr::memchr2(b',', b'}', &bytes[value_start..])
                    .map_or(bytes.len(), |i| value_start + i);
                (value_start, end)
            };
            h.update(&bytes[..keep_to]);
            h.update(&bytes[end..]);
        }
        None => h.update(bytes),
    }
    let d = h.finalize();
    d[..16].try_into().expect("16 bytes")
}

/// Deletes the file at `rel` (a path on disk) if it is still the file that was read. Returns
/// whether it was deleted.
///
/// The writer may rename a newer file over `rel` at any moment (a re-follow has the same name),
/// so "check, then unlink" could delete a file nobody exported. Instead the file is first taken
/// out of the way with one atomic rename; what was taken is checked, and if it is not the file
/// that was read it goes back (unless the writer has already put an even newer one there, in
/// which case it stays under its taken name and the next run exports it).
pub fn delete_if_same(root: &Path, rel: &str, id: FileId) -> io::Result<bool> {
    delete_if_same_with(root, rel, id, &TakeToken::new(), || {})
}

/// [`delete_if_same`] with the run's [`TakeToken`] and a hook run right after the file was
/// taken (tests and the test-only fault hook put a crash or a writer's rename there).
pub fn delete_if_same_with(
    root: &Path,
    rel: &str,
    id: FileId,
    token: &TakeToken,
    after_take: impl FnOnce(),
) -> io::Result<bool> {
    let path = root.join(rel);
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if original_of_taken(name).is_some() {
        // Only this export ever writes a taken name.
        return unlink_if_same(&path, id);
    }
    let mut random = uuid::Uuid::new_v4().simple().to_string();
    random.truncate(16);
    let taken = path.with_file_name(format!("{TAKEN_PREFIX}{}{random}-{name}", token.0));
    match fs::rename(&path, &taken) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        // A name within 43 bytes of NAME_MAX: fall back to check-then-unlink.
        Err(e) if e.kind() == io::ErrorKind::InvalidFilename => return unlink_if_same(&path, id),
        Err(e) => return Err(e),
    }
    after_take();
    let m = fs::symlink_metadata(&taken)?;
    if m.dev() == id.dev && m.ino() == id.ino {
        fs::remove_file(&taken)?;
        return Ok(true);
    }
    // The writer replaced the file after it was read: put the newer file back. A hard link
    // fails rather than overwrite an even newer one.
    match fs::hard_link(&taken, &path) {
        Ok(()) => fs::remove_file(&taken)?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => tracing::info!(
            file = %rel,
            kept = %taken.display(),
            "the writer rewrote this file twice during the export; the middle version is exported next run"
        ),
        Err(e) => return Err(e),
    }
    Ok(false)
}

fn unlink_if_same(path: &Path, id: FileId) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.dev() == id.dev && m.ino() == id.ino => match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Moves a bad file to `<cache>/.quarantine/<rel>` (a free name is chosen if taken) and appends
/// the reason to `<cache>/.quarantine/reasons.log`.
pub fn quarantine(root: &Path, f: &FileRef, id: Option<FileId>, reason: &str) -> Result<PathBuf> {
    let src = root.join(f.disk_rel_path());
    let rel = &f.rel_path();
    if let Some(id) = id {
        let m = fs::symlink_metadata(&src).with_context(|| format!("stat {}", src.display()))?;
        if m.dev() != id.dev || m.ino() != id.ino {
            anyhow::bail!(
                "{} was replaced since it was read; left in place",
                src.display()
            );
        }
    }
    let qroot = root.join(".quarantine");
    let mut dest = qroot.join(rel);
    let mut n = 1;
    while dest.exists() {
        dest = qroot.join(format!("{rel}.{n}"));
        n += 1;
    }
    let parent = dest.parent().expect("has parent");
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    fs::rename(&src, &dest)
        .with_context(|| format!("moving {} to {}", src.display(), dest.display()))?;
    use std::io::Write;
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(qroot.join("reasons.log"))
        .context("opening .quarantine/reasons.log")?;
    let line = format!(
        "{}\t{}\t{}\n",
        sync_core::transform::sync_timestamp(crate::now_secs()),
        dest.strip_prefix(&qroot).unwrap_or(&dest).display(),
        reason.replace(['\n', '\t'], " ")
    );
    log.write_all(line.as_bytes())
        .context("writing .quarantine/reasons.log")?;
    Ok(dest)
}

/// Whether `--clear-cache` may remove the folder: a nested per-post / per-author folder, never
/// one the writer's skeleton holds.
pub(crate) fn is_prunable(dir: &str) -> bool {
    let skeleton = matches!(
        dir,
        "study_user_activity/create/follow/follower" | "study_user_activity/create/follow/followee"
    ) || dir.split('/').count() <= 3;
    !skeleton
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLLOW: &str = "study_user_activity/create/follow/follower";
    const NAME: &str = "follower_did=did:plc:a_followee_did=did:plc:b.json";

    /// A cache with one follow file; returns its identity as the export read it.
    fn cache_with(contents: &str) -> (tempfile::TempDir, FileId) {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join(FOLLOW)).unwrap();
        let id = replace(tmp.path(), contents);
        (tmp, id)
    }

    /// What the writer does: a whole new file renamed over the old name.
    fn replace(root: &Path, contents: &str) -> FileId {
        let dir = root.join(FOLLOW);
        let tmp = dir.join(".tmp-writer");
        fs::write(&tmp, contents).unwrap();
        fs::rename(&tmp, dir.join(NAME)).unwrap();
        let m = fs::metadata(dir.join(NAME)).unwrap();
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    /// (name on disk, contents) of every file in the follow folder, walked as the export does.
    fn listing(root: &Path) -> Vec<(String, String, String)> {
        let mut out: Vec<_> = Walker::new(root)
            .unwrap()
            .map(|f| {
                let contents = fs::read_to_string(root.join(f.disk_rel_path())).unwrap();
                (f.rel_path(), f.taken.is_some().to_string(), contents)
            })
            .collect();
        out.sort();
        out
    }

    fn rel() -> String {
        format!("{FOLLOW}/{NAME}")
    }

    #[test]
    fn a_folder_holding_only_emptied_folders_is_pruned_after_them() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = "a/b/c/d/e";
        fs::create_dir_all(tmp.path().join(deep)).unwrap();
        fs::create_dir_all(tmp.path().join("a/b/c/empty/inner")).unwrap();
        fs::write(tmp.path().join(deep).join("f.json"), "{}").unwrap();
        let mut walker = Walker::new(tmp.path()).unwrap();
        walker.prune_empty_dirs(0);
        let mut walk = walker.ahead(10).unwrap();
        let chunk = walk.next_chunk().unwrap().expect("one chunk");
        assert!(chunk.done);
        assert_eq!(chunk.files.len(), 1);
        assert_eq!(
            chunk.pruned, 2,
            "the empty folders went as the walk left them"
        );
        // The batch deletes the file, then the folders it left go, innermost first: `d` held
        // no file itself, but it is empty once `e` is gone.
        fs::remove_file(tmp.path().join(deep).join("f.json")).unwrap();
        assert_eq!(walk.prune(chunk.left), 2);
        assert!(!tmp.path().join("a/b/c/d").exists());
        assert!(tmp.path().join("a/b/c").exists(), "the skeleton stays");
    }

    #[test]
    fn the_walk_skips_the_files_its_own_run_takes() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join(FOLLOW)).unwrap();
        let ours = TakeToken::new();
        let dir = tmp.path().join(FOLLOW);
        fs::write(
            dir.join(format!("{TAKEN_PREFIX}{}0123456789abcdef-{NAME}", ours.0)),
            "ours",
        )
        .unwrap();
        let other = format!("{TAKEN_PREFIX}{}-x.json", "f".repeat(32));
        fs::write(dir.join(&other), "an earlier run's").unwrap();
        let mut walker = Walker::new(tmp.path()).unwrap();
        walker.skip_takes_of(&ours);
        let names: Vec<Option<String>> = walker.map(|f| f.taken).collect();
        assert_eq!(names, [Some(other)]);
        // Its takes carry its token.
        let id = replace(tmp.path(), "x");
        let mut seen = None;
        delete_if_same_with(tmp.path(), &rel(), id, &ours, || {
            seen = fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.unwrap().file_name().into_string().ok())
                .find(|n| n.ends_with(NAME) && n != NAME && !n.contains("0123456789abcdef"));
        })
        .unwrap();
        let seen = seen.expect("a take");
        assert!(ours.took(&seen), "{seen}");
        assert_eq!(original_of_taken(&seen), Some(NAME));
    }

    #[test]
    fn a_walk_that_dies_is_an_error_not_an_end() {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(0);
        let thread = std::thread::spawn(move || {
            let _tx = tx;
            panic!("listing exploded");
        });
        let mut walk = WalkAhead {
            chunks: Some(rx),
            stop: Arc::default(),
            thread: Some(thread),
            pruner: Pruner {
                root: PathBuf::from("/nonexistent"),
                min_age: None,
            },
        };
        let err = walk.next_chunk().err().expect("an error");
        assert!(format!("{err:#}").contains("listing exploded"), "{err:#}");
        assert!(walk.next_chunk().unwrap().is_none());
    }

    #[test]
    fn deletes_the_file_that_was_read() {
        let (tmp, id) = cache_with("first");
        assert!(delete_if_same(tmp.path(), &rel(), id).unwrap());
        assert!(listing(tmp.path()).is_empty());
    }

    #[test]
    fn a_file_replaced_before_the_delete_stays() {
        let (tmp, id) = cache_with("first");
        replace(tmp.path(), "second");
        assert!(!delete_if_same(tmp.path(), &rel(), id).unwrap());
        assert_eq!(
            listing(tmp.path()),
            [(rel(), "false".into(), "second".into())]
        );
    }

    #[test]
    fn a_file_replaced_right_after_the_check_stays() {
        // The window "check, then unlink" lost: the writer renames a re-follow in between.
        let (tmp, id) = cache_with("first");
        let root = tmp.path().to_owned();
        let deleted = delete_if_same_with(tmp.path(), &rel(), id, &TakeToken::new(), || {
            replace(&root, "second");
        })
        .unwrap();
        assert!(deleted);
        assert_eq!(
            listing(tmp.path()),
            [(rel(), "false".into(), "second".into())]
        );
    }

    #[test]
    fn a_file_replaced_twice_keeps_both_newer_versions_for_the_next_run() {
        let (tmp, id) = cache_with("first");
        replace(tmp.path(), "second");
        let root = tmp.path().to_owned();
        let deleted = delete_if_same_with(tmp.path(), &rel(), id, &TakeToken::new(), || {
            replace(&root, "third");
        })
        .unwrap();
        assert!(!deleted);
        // "second" waits under a taken name, reported under the writer's name.
        assert_eq!(
            listing(tmp.path()),
            [
                (rel(), "false".into(), "third".into()),
                (rel(), "true".into(), "second".into()),
            ]
        );
        // Next run: the taken file is read and deleted like any other.
        let taken = Walker::new(tmp.path())
            .unwrap()
            .find(|f| f.taken.is_some())
            .unwrap();
        let Read1::Ok { id, key, .. } = read_file(tmp.path(), &taken, None) else {
            panic!("taken file unreadable")
        };
        assert_eq!(
            key,
            file_key(&rel(), b"second", None),
            "keyed by the writer's name"
        );
        assert!(delete_if_same(tmp.path(), &taken.disk_rel_path(), id).unwrap());
        assert_eq!(
            listing(tmp.path()),
            [(rel(), "false".into(), "third".into())]
        );
    }

    #[test]
    fn only_well_formed_taken_names_are_recognised() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            original_of_taken(&format!(".exported-{id}-a.json")),
            Some("a.json")
        );
        for bad in [
            ".exported-a.json".to_owned(),
            format!(".exported-{id}-"),
            format!(".exported-{id}-.hidden"),
            format!(".exported-{}-a.json", &id[1..]),
            format!(".exported-{}-a.json", id.replace('a', "g")),
            format!(".tmp-{id}-a.json"),
        ] {
            assert_eq!(original_of_taken(&bad), None, "{bad}");
        }
    }

    #[test]
    fn key_ignores_synctimestamp_only() {
        let ts = Some("synctimestamp");
        let a = br#"{"uri": "u", "synctimestamp": "2024-10-02-14:03:28", "url": ""}"#;
        let b = br#"{"uri": "u", "synctimestamp": "2024-10-03-01:00:00", "url": ""}"#;
        let c = br#"{"uri": "v", "synctimestamp": "2024-10-03-01:00:00", "url": ""}"#;
        assert_eq!(file_key("p", a, ts), file_key("p", b, ts));
        assert_ne!(file_key("p", a, None), file_key("p", b, None));
        assert_ne!(file_key("p", b, ts), file_key("p", c, ts));
        assert_ne!(file_key("p", a, ts), file_key("q", a, ts));
        // The bytes hashed are those keys have always been made of (they are stored for days).
        let mut h = Sha256::new();
        h.update(b"p\0");
        h.update(br#"{"uri": "u", "synctimestamp": ""#);
        h.update(br#"", "url": ""}"#);
        assert_eq!(file_key("p", a, ts)[..], h.finalize()[..16]);
    }

    #[test]
    fn account_keys_ignore_the_seq_only() {
        let seq = Some("seq");
        let event = |seq: i64, status: &str| {
            format!(
                r#"{{"did": "did:plc:a", "kind": "account", "seq": {seq}, "time": "t", "handle": null, "active": false, "status": "{status}"}}"#
            )
        };
        let k = |bytes: String| file_key("p", bytes.as_bytes(), seq);
        assert_eq!(k(event(10, "deleted")), k(event(5_000_010, "deleted")));
        assert_ne!(k(event(10, "deleted")), k(event(10, "takendown")));
        assert_ne!(
            file_key("p", event(10, "deleted").as_bytes(), None),
            file_key("p", event(11, "deleted").as_bytes(), None)
        );
    }
}
