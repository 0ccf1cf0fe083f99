//! The cache writer: atomic, deterministic, durable file writes under one cache root.
//!
//! This is the one module of the crate that does I/O (std only). Every write goes to a temp file
//! in the destination directory; [`CacheWriter::sync`] is the durability barrier: it fsyncs the
//! temp files, renames them into place and fsyncs every touched directory. The writer calls it
//! before committing a cursor, so the cursor never covers a file that could vanish in a crash,
//! and no reader (the export) ever sees a partial file: names appear only by rename.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use crate::paths::CachePath;

/// Prefix of in-flight temp files; readers skip names starting with `.`.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Known-existing directories are remembered to skip `create_dir_all`; the memo is bounded.
const MAX_KNOWN_DIRS: usize = 4096;

#[derive(thiserror::Error, Debug)]
pub enum CacheError {
    #[error("cache path {0} would leave the cache root")]
    Escapes(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CacheError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        CacheError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// True when retrying later may succeed (disk full, permissions fixed, ...).
    pub fn is_io(&self) -> bool {
        matches!(self, CacheError::Io { .. })
    }

    /// True when the operation is not supported here (e.g. `syncfs` outside Linux).
    fn is_unsupported(&self) -> bool {
        let CacheError::Io { source, .. } = self else {
            return false;
        };
        source.kind() == io::ErrorKind::Unsupported
            || matches!(
                source.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
            )
    }

    /// True when flushing written data failed (`fsync`/`syncfs`): the kernel may have dropped
    /// the pages, so retrying cannot prove the data reached the disk.
    pub fn is_flush_failure(&self) -> bool {
        matches!(
            self,
            CacheError::Io {
                op: "fsync" | "syncfs" | "fsync directory",
                ..
            }
        )
    }
}

/// A written temp file waiting for the barrier. The handle is closed at once (a burst of
/// thousands of files must not exhaust descriptors); the fsync fallback reopens it.
struct Pending {
    temp: PathBuf,
    target: PathBuf,
}

/// Writes routed files under `root`. Not thread-safe by design: one writer owns the cache.
pub struct CacheWriter {
    root: PathBuf,
    known_dirs: HashSet<PathBuf>,
    pending: Vec<Pending>,
    dirty_dirs: HashSet<PathBuf>,
    temp_counter: u64,
    pid: u32,
    /// Test hook: the next this-many flushes fail with EIO (see [`Self::inject_flush_failures`]).
    injected_flush_failures: u32,
}

impl CacheWriter {
    /// Opens (creating if needed) the cache root.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| CacheError::io("create", &root, e))?;
        Ok(CacheWriter {
            root,
            known_dirs: HashSet::new(),
            pending: Vec::new(),
            dirty_dirs: HashSet::new(),
            temp_counter: 0,
            pid: std::process::id(),
            injected_flush_failures: 0,
        })
    }

    /// Makes the next `n` flushes fail with EIO, as a disk whose write-back failed would. Only
    /// for tests of the callers' handling: a real fsync error cannot be provoked without a
    /// faulty block device.
    #[doc(hidden)]
    pub fn inject_flush_failures(&mut self, n: u32) {
        self.injected_flush_failures = n;
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Files written since the last [`sync`](Self::sync) (not yet visible).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Absolute path of a cache path, refusing anything but plain relative components.
    pub fn resolve(&self, path: &CachePath) -> Result<PathBuf, CacheError> {
        let rel = Path::new(path.dir()).join(path.file_name());
        let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
        let file = path.file_name();
        if !plain || file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(CacheError::Escapes(path.to_string()));
        }
        Ok(self.root.join(rel))
    }

    fn ensure_dir(&mut self, dir: &Path) -> Result<(), CacheError> {
        if self.known_dirs.contains(dir) {
            return Ok(());
        }
        // Remember which ancestors are new: their parents must be fsynced for the entry to last.
        let mut missing = Vec::new();
        let mut cur = dir;
        while cur != self.root && !cur.is_dir() {
            missing.push(cur.to_owned());
            match cur.parent() {
                Some(p) => cur = p,
                None => break,
            }
        }
        fs::create_dir_all(dir).map_err(|e| CacheError::io("create directory", dir, e))?;
        for d in missing {
            if let Some(parent) = d.parent() {
                self.dirty_dirs.insert(parent.to_owned());
            }
        }
        if self.known_dirs.len() >= MAX_KNOWN_DIRS {
            self.known_dirs.clear();
        }
        self.known_dirs.insert(dir.to_owned());
        Ok(())
    }

    /// Writes `contents` for `path`; it becomes visible (renamed into place) at the next `sync`.
    pub fn write(&mut self, path: &CachePath, contents: &[u8]) -> Result<(), CacheError> {
        let target = self.resolve(path)?;
        let dir = target
            .parent()
            .expect("resolved path has a parent")
            .to_owned();
        self.ensure_dir(&dir)?;
        self.temp_counter += 1;
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{}", self.pid, self.temp_counter));
        let mut file = match File::create(&temp) {
            Ok(file) => file,
            // The export prunes empty folders (`--clear-cache`): a folder we created earlier
            // may be gone. Forget it and create it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.known_dirs.remove(&dir);
                self.ensure_dir(&dir)?;
                File::create(&temp).map_err(|e| CacheError::io("create", &temp, e))?
            }
            Err(e) => return Err(CacheError::io("create", &temp, e)),
        };
        if let Err(e) = file.write_all(contents) {
            let _ = fs::remove_file(&temp);
            return Err(CacheError::io("write", &temp, e));
        }
        drop(file);
        self.pending.push(Pending { temp, target });
        Ok(())
    }

    /// The durability barrier: every file written so far is fsynced, renamed into place, and its
    /// directory fsynced. On error nothing is lost: pending files stay pending and `sync` can be
    /// called again.
    pub fn sync(&mut self) -> Result<usize, CacheError> {
        if self.pending.is_empty() && self.dirty_dirs.is_empty() {
            return Ok(0);
        }
        if self.injected_flush_failures > 0 && !self.pending.is_empty() {
            self.injected_flush_failures -= 1;
            return Err(CacheError::io(
                "fsync",
                &self.root,
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        // One syncfs flushes every temp file's data at once; per-file fsync is the fallback
        // where syncfs is unavailable. Thousands of files per batch make the difference large
        // (BENCHMARKS.md). Any other syncfs error is a flush failure and is returned: a
        // per-file fsync after it could succeed without the lost pages ever reaching the disk.
        if !self.pending.is_empty() {
            match self.syncfs() {
                Ok(()) => {}
                Err(e) if e.is_unsupported() => {
                    for p in &self.pending {
                        File::open(&p.temp)
                            .and_then(|f| f.sync_data())
                            .map_err(|e| CacheError::io("fsync", &p.temp, e))?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let count = self.pending.len();
        let mut renamed = 0;
        let mut failure = None;
        for p in &self.pending {
            if let Err(e) = fs::rename(&p.temp, &p.target) {
                failure = Some(CacheError::io("rename", &p.target, e));
                break;
            }
            if let Some(dir) = p.target.parent() {
                self.dirty_dirs.insert(dir.to_owned());
            }
            renamed += 1;
        }
        self.pending.drain(..renamed);
        if let Some(e) = failure {
            return Err(e);
        }
        // The renames (directory entries) must be durable too before the cursor moves.
        if self.syncfs().is_ok() {
            self.dirty_dirs.clear();
            return Ok(count);
        }
        let dirs: Vec<PathBuf> = self.dirty_dirs.iter().cloned().collect();
        for dir in dirs {
            let handle = File::open(&dir).map_err(|e| CacheError::io("open directory", &dir, e))?;
            handle
                .sync_all()
                .map_err(|e| CacheError::io("fsync directory", &dir, e))?;
            self.dirty_dirs.remove(&dir);
        }
        Ok(count)
    }

    /// `syncfs(2)` on the file system holding the cache root.
    #[cfg(target_os = "linux")]
    fn syncfs(&self) -> Result<(), CacheError> {
        use std::os::fd::AsRawFd;
        let root = File::open(&self.root).map_err(|e| CacheError::io("open", &self.root, e))?;
        // SAFETY: syncfs only reads the descriptor, which `root` keeps open for the call.
        let rc = unsafe { libc::syncfs(root.as_raw_fd()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(CacheError::io(
                "syncfs",
                &self.root,
                io::Error::last_os_error(),
            ))
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn syncfs(&self) -> Result<(), CacheError> {
        Err(CacheError::io(
            "syncfs",
            &self.root,
            io::Error::from(io::ErrorKind::Unsupported),
        ))
    }

    /// Drops unsynced writes (their temp files are removed); used when a batch is abandoned.
    pub fn discard_pending(&mut self) {
        for p in self.pending.drain(..) {
            let _ = fs::remove_file(&p.temp);
        }
    }

    /// Removes temp files a killed writer left behind in `dir` and below (call at start-up).
    pub fn remove_stale_temps(&self) -> io::Result<usize> {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let ty = entry.file_type()?;
                if ty.is_dir() {
                    stack.push(entry.path());
                } else if ty.is_file()
                    && entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
                {
                    fs::remove_file(entry.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        self.discard_pending();
    }
}
