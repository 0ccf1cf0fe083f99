//! The cache writer: atomic, deterministic, durable file writes under one cache root.
//!
//! Every write goes to a temp file in the destination directory; [`CacheWriter::sync`] is the
//! durability barrier the processor runs before it commits a cursor: flush the temp files' data,
//! rename them into place, flush the directory entries. No reader (the export) ever sees a
//! partial file: names appear only by rename.
//!
//! What a flush proves, and why it is done this way:
//! - `syncfs(2)` runs on a descriptor of the cache root that stays open for the writer's
//!   lifetime. The kernel reports a writeback error of the file system once to every descriptor
//!   that was open when it happened (Linux >= 5.8); a descriptor opened per call would miss an
//!   error that happened between two calls, or that another process already saw.
//! - A file whose directory is on another file system than the root (a bind mount inside the
//!   cache) is not covered by `syncfs` on the root: it is fsynced as soon as it is written, and
//!   its directory after the rename.
//! - Only where `syncfs` is unsupported (`ENOSYS`, `EOPNOTSUPP`, `EINVAL`), or cannot report
//!   writeback errors (a kernel older than 5.8, allowed by the operator), is every file fsynced
//!   this way.
//! - Every flush error is final ([`CacheError::is_flush_failure`]): the kernel may have dropped
//!   the pages, so a retry or a fallback could "succeed" without the data ever reaching the disk.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use sync_core::paths::CachePath;
use tracing::{info, warn};

use crate::fault::{self, Point};

/// Prefix of in-flight temp files; readers skip names starting with `.`.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The first kernel whose `syncfs` reports writeback errors (Linux 5.8).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

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

/// How written data is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// `syncfs` on the root's file system twice per barrier; per-file `fsync` only for files on
    /// other file systems.
    Syncfs,
    /// `fsync` of every file and of every directory that got a new entry.
    PerFile,
}

/// What the flushes of a writer's lifetime were (operators' logs, and tests of the barrier).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub syncfs: u64,
    pub file_fsyncs: u64,
    pub dir_fsyncs: u64,
}

/// The flush mode after probing `syncfs` once: unsupported means per-file `fsync`; any other
/// error is a flush failure, not a reason to fall back.
pub fn mode_after_probe(probe: io::Result<()>) -> io::Result<FlushMode> {
    match probe {
        Ok(()) => Ok(FlushMode::Syncfs),
        Err(e) if is_unsupported(&e) => Ok(FlushMode::PerFile),
        Err(e) => Err(e),
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
        )
}

/// `(major, minor)` of a kernel release such as `6.1.0-13-amd64` or `5.8.0`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+', '_']);
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> Option<String> {
    if let Some(fake) = fault::fake_kernel_release() {
        return Some(fake);
    }
    // SAFETY: uname only writes into the zeroed struct we own; its fields are NUL-terminated.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    Some(release.to_string_lossy().into_owned())
}

/// True when `release` is a kernel whose `syncfs` reports writeback errors.
pub fn syncfs_reports_errors(release: &str) -> bool {
    cfg!(target_os = "linux") && parse_kernel_version(release).is_some_and(|v| v >= MIN_KERNEL)
}

/// The start-up check: `Err` (a message for the operator) on a Linux kernel older than 5.8
/// unless `allow_old` is set; with it, the writer flushes every file with `fsync` instead.
pub fn check_kernel(allow_old: bool) -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let release = kernel_release().unwrap_or_else(|| "(unknown)".into());
    if syncfs_reports_errors(&release) {
        return Ok(());
    }
    let (major, minor) = MIN_KERNEL;
    let why = if parse_kernel_version(&release).is_some() {
        format!(
            "kernel {release} is older than {major}.{minor}: its syncfs does not report writeback \
             errors, so a failed disk write could go unnoticed"
        )
    } else {
        format!(
            "kernel release {release:?} is not recognised: syncfs reports writeback errors only \
             since Linux {major}.{minor}, so a failed disk write could go unnoticed"
        )
    };
    if allow_old {
        warn!(kernel = %release, "{why}; --allow-old-kernel is set: every file is fsynced one by one instead (slower)");
        Ok(())
    } else {
        Err(format!(
            "{why}. Upgrade the kernel, or start with --allow-old-kernel \
             (FIREHOSE_ALLOW_OLD_KERNEL=true) to fsync every file one by one instead (slower)"
        ))
    }
}

/// True for the names this writer gives its temp files: `.tmp-<pid>-<counter>`. Other hidden
/// names (batch-export's `.tmp-<name>.partial`, `.exported-*`) are not the writer's to remove.
pub fn is_temp_name(name: &OsStr) -> bool {
    let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest.split_once('-')
        .is_some_and(|(pid, counter)| digits(pid) && digits(counter))
}

/// A written temp file waiting for the barrier. The handle is closed at once (a burst of
/// thousands of files must not exhaust descriptors).
struct Pending {
    temp: PathBuf,
    target: PathBuf,
    /// Already fsynced on its own (per-file mode, or another file system than the root): its
    /// directory must then be fsynced after the rename too.
    fsynced: bool,
}

/// What the start-up cleanup did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub removed: usize,
    /// Folders or files that could not be read or removed (logged; the walk went on).
    pub failed: usize,
}

/// Writes routed files under `root`. Not thread-safe by design: one writer owns the cache.
pub struct CacheWriter {
    root: PathBuf,
    /// The cache root, open for the writer's lifetime: `syncfs` on it reports every writeback
    /// error of its file system since the writer started.
    root_fd: File,
    root_dev: u64,
    mode: FlushMode,
    known_dirs: HashSet<PathBuf>,
    pending: Vec<Pending>,
    /// Directories with new entries that `syncfs` on the root does not cover.
    fsync_dirs: HashSet<PathBuf>,
    temp_counter: u64,
    pid: u32,
    stats: FlushStats,
    logged_foreign: bool,
    /// Test hook: one entry per coming `syncfs` call, an errno to fail with or `None`.
    #[cfg(feature = "fault-injection")]
    injected_syncfs: std::collections::VecDeque<Option<i32>>,
}

impl CacheWriter {
    /// Opens (creating if needed) the cache root; `syncfs` where the kernel reports its errors,
    /// per-file `fsync` elsewhere.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let syncfs = kernel_release().is_some_and(|r| syncfs_reports_errors(&r));
        let mode = if syncfs {
            FlushMode::Syncfs
        } else {
            FlushMode::PerFile
        };
        Self::open_with(root, mode)
    }

    /// As [`open`](Self::open) with a chosen mode; `Syncfs` still becomes `PerFile` where
    /// `syncfs` turns out to be unsupported.
    pub fn open_with(root: impl Into<PathBuf>, mode: FlushMode) -> Result<Self, CacheError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| CacheError::io("create", &root, e))?;
        // std opens with O_CLOEXEC; O_DIRECTORY refuses a root that is not a directory.
        let root_fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&root)
            .map_err(|e| CacheError::io("open", &root, e))?;
        let root_dev = root_fd
            .metadata()
            .map_err(|e| CacheError::io("stat", &root, e))?
            .dev();
        let mode = match mode {
            FlushMode::PerFile => FlushMode::PerFile,
            FlushMode::Syncfs => mode_after_probe(raw_syncfs(&root_fd))
                .map_err(|e| CacheError::io("syncfs", &root, e))?,
        };
        match mode {
            FlushMode::Syncfs => {
                info!(root = %root.display(), "cache flush: syncfs of the cache root's file system")
            }
            FlushMode::PerFile => {
                warn!(root = %root.display(), "cache flush: syncfs unavailable or unable to report errors here; every file is fsynced one by one (slower)")
            }
        }
        Ok(CacheWriter {
            root,
            root_fd,
            root_dev,
            mode,
            known_dirs: HashSet::new(),
            pending: Vec::new(),
            fsync_dirs: HashSet::new(),
            temp_counter: 0,
            pid: std::process::id(),
            stats: FlushStats::default(),
            logged_foreign: false,
            #[cfg(feature = "fault-injection")]
            injected_syncfs: Default::default(),
        })
    }

    /// Makes the coming `syncfs` calls fail: one entry per call, in order, `Some(errno)` to fail
    /// with it, `None` to run it. Only for tests of the callers' handling: a real writeback
    /// error cannot be provoked without a faulty block device.
    #[cfg(feature = "fault-injection")]
    pub fn inject_syncfs_errors(&mut self, plan: &[Option<i32>]) {
        self.injected_syncfs = plan.iter().copied().collect();
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn mode(&self) -> FlushMode {
        self.mode
    }

    pub fn stats(&self) -> FlushStats {
        self.stats
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

    /// True when an entry in `dir` is not made durable by `syncfs` on the root.
    fn outside_root_fs(&self, dir: &Path) -> Result<bool, CacheError> {
        if self.mode == FlushMode::PerFile {
            return Ok(true);
        }
        let dev = fs::metadata(dir)
            .map_err(|e| CacheError::io("stat", dir, e))?
            .dev();
        Ok(dev != self.root_dev)
    }

    fn ensure_dir(&mut self, dir: &Path) -> Result<(), CacheError> {
        if self.known_dirs.contains(dir) {
            return Ok(());
        }
        // Remember which ancestors are new: their parents must be flushed for the entry to last.
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
                if self.outside_root_fs(parent)? {
                    self.fsync_dirs.insert(parent.to_owned());
                }
            }
        }
        if self.known_dirs.len() >= MAX_KNOWN_DIRS {
            self.known_dirs.clear();
        }
        self.known_dirs.insert(dir.to_owned());
        Ok(())
    }

    /// Writes `contents` for `path`; it becomes visible (renamed into place) at the next `sync`.
    /// A file that `syncfs` on the root would not cover is fsynced here, while its descriptor
    /// is still open: a failure is then a flush failure like a failed `syncfs`.
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
        let fsynced = match self.flush_file_if_needed(&file, &dir) {
            Ok(fsynced) => fsynced,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        drop(file);
        self.pending.push(Pending {
            temp,
            target,
            fsynced,
        });
        Ok(())
    }

    /// fsyncs `file` when `syncfs` on the root does not cover it; returns whether it did.
    fn flush_file_if_needed(&mut self, file: &File, dir: &Path) -> Result<bool, CacheError> {
        let foreign = match self.mode {
            FlushMode::PerFile => false,
            FlushMode::Syncfs => {
                file.metadata()
                    .map_err(|e| CacheError::io("stat", dir, e))?
                    .dev()
                    != self.root_dev
            }
        };
        if self.mode == FlushMode::Syncfs && !foreign {
            return Ok(false);
        }
        if foreign && !self.logged_foreign {
            self.logged_foreign = true;
            info!(dir = %dir.display(), "a cache folder is on another file system than the cache root (a mount inside the cache): files there are fsynced one by one");
        }
        file.sync_data()
            .map_err(|e| CacheError::io("fsync", dir, e))?;
        self.stats.file_fsyncs += 1;
        Ok(true)
    }

    /// The durability barrier: every file written so far is flushed, renamed into place, and
    /// the directory entries flushed. On a rename error nothing is lost: the files not renamed
    /// stay pending and `sync` can be called again. A flush error is final (see the module doc).
    pub fn sync(&mut self) -> Result<usize, CacheError> {
        if self.pending.is_empty() && self.fsync_dirs.is_empty() {
            return Ok(0);
        }
        let count = self.pending.len();
        if count > 0 {
            fault::hit(Point::AfterTempWrite);
            // One syncfs flushes every temp file's data at once; thousands of files per batch
            // make the difference to per-file fsync large (BENCHMARKS.md).
            if self.pending.iter().any(|p| !p.fsynced) {
                self.syncfs()?;
            }
            fault::hit(Point::AfterFirstSyncfs);
        }
        let mut renamed = 0;
        let mut failure = None;
        let mut in_root_fs = false;
        for (i, p) in self.pending.iter().enumerate() {
            if count >= 2 && i == count / 2 {
                fault::hit(Point::MidRename);
            }
            if let Err(e) = fs::rename(&p.temp, &p.target) {
                failure = Some(CacheError::io("rename", &p.target, e));
                break;
            }
            if p.fsynced {
                if let Some(dir) = p.target.parent() {
                    self.fsync_dirs.insert(dir.to_owned());
                }
            } else {
                in_root_fs = true;
            }
            renamed += 1;
        }
        self.pending.drain(..renamed);
        // The renames (directory entries) must be durable too before the cursor moves.
        if in_root_fs {
            self.syncfs()?;
        }
        if count > 0 {
            fault::hit(Point::AfterSecondSyncfs);
        }
        let dirs: Vec<PathBuf> = self.fsync_dirs.iter().cloned().collect();
        for dir in dirs {
            let handle = match File::open(&dir) {
                Ok(handle) => handle,
                // Pruned by the export after it exported (durably) what we renamed there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.fsync_dirs.remove(&dir);
                    continue;
                }
                Err(e) => return Err(CacheError::io("open directory", &dir, e)),
            };
            handle
                .sync_all()
                .map_err(|e| CacheError::io("fsync directory", &dir, e))?;
            self.stats.dir_fsyncs += 1;
            self.fsync_dirs.remove(&dir);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Makes file removals in `dirs` durable (a consent-withdrawal purge, `withdrawn.rs`), by
    /// the same rules as the barrier's renames: one `syncfs` of the root's file system, and an
    /// `fsync` of each folder `syncfs` does not cover (per-file mode, another file system). A
    /// failure is a flush failure: the writer stops and the restart redoes the purge.
    pub fn sync_removals<'d>(
        &mut self,
        dirs: impl IntoIterator<Item = &'d PathBuf>,
    ) -> Result<(), CacheError> {
        let mut synced_root = false;
        for dir in dirs {
            let outside = match self.outside_root_fs(dir) {
                Ok(outside) => outside,
                // Pruned by the export since: nothing of ours is left in it.
                Err(CacheError::Io { ref source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            if !outside {
                if !synced_root {
                    self.syncfs()?;
                    synced_root = true;
                }
                continue;
            }
            let handle = match File::open(dir) {
                Ok(handle) => handle,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io("open directory", dir, e)),
            };
            handle
                .sync_all()
                .map_err(|e| CacheError::io("fsync directory", dir, e))?;
            self.stats.dir_fsyncs += 1;
        }
        Ok(())
    }

    /// `syncfs(2)` on the root's file system, through the descriptor held since `open`.
    fn syncfs(&mut self) -> Result<(), CacheError> {
        #[cfg(feature = "fault-injection")]
        if let Some(Some(errno)) = self.injected_syncfs.pop_front() {
            return Err(CacheError::io(
                "syncfs",
                &self.root,
                io::Error::from_raw_os_error(errno),
            ));
        }
        raw_syncfs(&self.root_fd).map_err(|e| CacheError::io("syncfs", &self.root, e))?;
        self.stats.syncfs += 1;
        Ok(())
    }

    /// Drops unsynced writes (their temp files are removed); used when a batch is abandoned.
    pub fn discard_pending(&mut self) {
        for p in self.pending.drain(..) {
            let _ = fs::remove_file(&p.temp);
        }
    }

    /// Removes the temp files a killed writer left behind (call at start-up, before writing).
    ///
    /// Only this writer's own names are removed ([`is_temp_name`]); folders starting with `.`
    /// (batch-export's `.export/` with its S3 staging files, `.quarantine/`) are never entered;
    /// a folder that vanishes during the walk (the export prunes empty folders) is skipped; any
    /// other folder that cannot be read is logged and skipped, so one bad folder does not keep
    /// the temps elsewhere.
    pub fn remove_stale_temps(&self) -> Cleanup {
        self.remove_stale_temps_with(&mut |_| {})
    }

    /// [`remove_stale_temps`](Self::remove_stale_temps), calling `before_read` with each folder
    /// just before it is listed (tests use it to make a folder vanish mid-walk).
    fn remove_stale_temps_with(&self, before_read: &mut dyn FnMut(&Path)) -> Cleanup {
        let mut cleanup = Cleanup::default();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            before_read(&dir);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    cleanup.failed += 1;
                    warn!(dir = %dir.display(), error = %e, "cannot list a cache folder for stale temp files; skipping it");
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) => {
                        cleanup.failed += 1;
                        warn!(dir = %dir.display(), error = %e, "cannot list a cache folder for stale temp files; skipping the rest of it");
                        break;
                    }
                };
                let name = entry.file_name();
                // file_type does not follow symlinks: a link is never entered nor removed.
                let Ok(ty) = entry.file_type() else { continue };
                if ty.is_dir() {
                    if !name.as_encoded_bytes().starts_with(b".") {
                        stack.push(entry.path());
                    }
                } else if ty.is_file() && is_temp_name(&name) {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => cleanup.removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            cleanup.failed += 1;
                            warn!(path = %entry.path().display(), error = %e, "cannot remove a stale temp file");
                        }
                    }
                }
            }
        }
        cleanup
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        self.discard_pending();
    }
}

#[cfg(target_os = "linux")]
fn raw_syncfs(fd: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `fd` keeps open for the call.
    if unsafe { libc::syncfs(fd.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn raw_syncfs(_fd: &File) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"x").unwrap();
    }

    /// Every file under `root`, relative, sorted.
    fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(root).unwrap().to_owned();
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn temp_names_are_exactly_the_writers_own() {
        for ours in [".tmp-1-1", ".tmp-123456-987654321"] {
            assert!(is_temp_name(OsStr::new(ours)), "{ours}");
        }
        for not_ours in [
            ".tmp-",
            ".tmp",
            ".tmp-1",
            ".tmp-1-",
            ".tmp--1",
            ".tmp-1-1.json",
            ".tmp-a-1",
            ".tmp-1-1-1",
            // batch-export's local temp and S3 staging names
            ".tmp-0f3c2a5e9b7d4c1a8e6f2b3c4d5e6f7a-0.parquet.partial",
            ".tmp-writer",
            ".exported-0f3c2a5e-author_did=x.json",
            "author_did=x_post_uri_suffix=y.json",
            "tmp-1-1",
        ] {
            assert!(!is_temp_name(OsStr::new(not_ours)), "{not_ours}");
        }
    }

    #[test]
    fn cleanup_removes_only_the_writers_temps_and_never_enters_dot_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let ours = [
            ".tmp-41-1",
            "study_user_activity/create/post/.tmp-41-2",
            "in_network_user_activity/create/post/did:plc:x/.tmp-99999-7",
        ];
        let kept = [
            "study_user_activity/create/post/author_did=x_post_uri_suffix=y.json",
            // batch-export: its journal folder with S3 staging files, taken files, quarantine
            ".export/staging/.tmp-0f3c2a5e9b7d4c1a8e6f2b3c4d5e6f7a-0.parquet.partial",
            ".export/staging/.tmp-41-3",
            ".export/journal.sqlite",
            ".quarantine/study_user_activity/.tmp-41-4",
            "study_user_activity/create/post/.exported-0f3c2a5e-author_did=x.json",
            "study_user_activity/create/post/.tmp-0f3c2a5e-0.parquet.partial",
            "study_user_activity/create/post/.tmp",
            // a dot-folder deeper down is not entered either
            "study_user_activity/.hidden/.tmp-41-5",
        ];
        for p in ours.iter().chain(&kept) {
            touch(&root.join(p));
        }
        let w = CacheWriter::open(&root).unwrap();
        assert_eq!(
            w.remove_stale_temps(),
            Cleanup {
                removed: 3,
                failed: 0
            }
        );
        let mut expected: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(files(&root), expected);
    }

    #[test]
    fn cleanup_goes_on_past_a_folder_that_vanished() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let gone = root.join("study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k");
        touch(&gone.join("author_did=x_like_uri_suffix=y.json"));
        touch(&root.join("study_user_activity/create/post/.tmp-7-1"));
        touch(&root.join("in_network_user_activity/create/post/did:plc:x/.tmp-7-2"));
        touch(&root.join(".tmp-7-3"));
        let w = CacheWriter::open(&root).unwrap();
        // The export prunes the folder after the walk listed its parent, before it is read.
        let mut vanished = false;
        let cleanup = w.remove_stale_temps_with(&mut |dir| {
            if dir == gone {
                fs::remove_dir_all(dir).unwrap();
                vanished = true;
            }
        });
        assert!(vanished, "the walk reached the folder");
        assert_eq!(
            cleanup,
            Cleanup {
                removed: 3,
                failed: 0
            }
        );
        assert!(files(&root).is_empty(), "{:?}", files(&root));
    }

    #[test]
    fn an_unreadable_folder_is_counted_and_the_walk_goes_on() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let locked = root.join("study_user_activity/create/post");
        touch(&locked.join(".tmp-7-1"));
        touch(&root.join("in_network_user_activity/.tmp-7-2"));
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        let unreadable = fs::read_dir(&locked).is_err();
        let w = CacheWriter::open(&root).unwrap();
        let cleanup = w.remove_stale_temps();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
        if unreadable {
            assert_eq!(
                cleanup,
                Cleanup {
                    removed: 1,
                    failed: 1
                }
            );
        } else {
            // root without CAP_DAC_OVERRIDE limits: the folder reads, both go.
            assert_eq!(cleanup.removed, 2);
        }
        assert!(!root.join("in_network_user_activity/.tmp-7-2").exists());
    }

    #[test]
    fn kernel_versions() {
        for (release, version) in [
            ("5.8.0", (5, 8)),
            ("6.1.0-13-amd64", (6, 1)),
            ("6.18.44-fc-v1045", (6, 18)),
            ("5.10.0-rc1", (5, 10)),
            ("4.19.0+", (4, 19)),
            ("5.15.0_custom", (5, 15)),
            ("5.4rc2", (5, 4)),
        ] {
            assert_eq!(parse_kernel_version(release), Some(version), "{release}");
        }
        for bad in ["", "linux", "5", "5.", ".8", "x.8.0"] {
            assert_eq!(parse_kernel_version(bad), None, "{bad}");
        }
        assert!(syncfs_reports_errors("5.8.0"));
        assert!(syncfs_reports_errors("6.1.0-13-amd64"));
        assert!(syncfs_reports_errors("10.0.0"));
        assert!(!syncfs_reports_errors("5.7.19"));
        assert!(!syncfs_reports_errors("4.19.0-26-amd64"));
        assert!(!syncfs_reports_errors("garbage"));
    }

    #[test]
    fn only_an_unsupported_syncfs_falls_back_to_per_file_fsync() {
        let err = io::Error::from_raw_os_error;
        assert_eq!(mode_after_probe(Ok(())).unwrap(), FlushMode::Syncfs);
        for errno in [libc::ENOSYS, libc::EOPNOTSUPP, libc::EINVAL] {
            assert_eq!(
                mode_after_probe(Err(err(errno))).unwrap(),
                FlushMode::PerFile
            );
        }
        assert_eq!(
            mode_after_probe(Err(io::ErrorKind::Unsupported.into())).unwrap(),
            FlushMode::PerFile
        );
        for errno in [libc::EIO, libc::ENOSPC, libc::EDQUOT, libc::EBADF] {
            let e = mode_after_probe(Err(err(errno))).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(errno));
        }
    }
}
