//! firehose-writer integration tests, one binary: `inspect` CLI, the cache writer, the writer
//! in-process against the replay file and the test relay (faults), as a process (SIGKILL crash
//! safety, signals, a crash at each step of the durability barrier), and against the official
//! atproto PDS; `/metrics` and `/health` over HTTP; the state an operator manages across restarts.

mod cache;
mod cli;
mod crash;
mod gapfree;
mod machine_loss;
mod metrics;
mod net;
mod pds;
mod process;
mod source;
mod state;
mod withdrawn;
mod writer;

/// Helpers shared by the test modules.
mod support {
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every file under `root` (relative path -> contents). Temp files are included on purpose:
    /// a test that expects none sees them.
    pub fn cache_files(root: &Path) -> BTreeMap<String, String> {
        cache_file_bytes(root)
            .into_iter()
            .map(|(path, bytes)| (path, String::from_utf8(bytes).unwrap()))
            .collect()
    }

    /// [`cache_files`] as bytes (dot-folders included).
    pub fn cache_file_bytes(root: &Path) -> BTreeMap<String, Vec<u8>> {
        tree_entries(root)
            .into_iter()
            .filter(|(_, _, is_dir)| !is_dir)
            .map(|(rel, path, _)| (rel, std::fs::read(&path).unwrap()))
            .collect()
    }

    /// Every folder under `root`, relative (dot-folders included): a folder name may name a DID.
    pub fn cache_dirs(root: &Path) -> Vec<String> {
        tree_entries(root)
            .into_iter()
            .filter(|(_, _, is_dir)| *is_dir)
            .map(|(rel, _, _)| rel)
            .collect()
    }

    /// Every entry under `root` (dot-names included): its path relative to `root`, its path, and
    /// whether it is a folder. An unreadable folder is skipped.
    fn tree_entries(root: &Path) -> Vec<(String, std::path::PathBuf, bool)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                let is_dir = path.is_dir();
                if is_dir {
                    stack.push(path.clone());
                }
                out.push((rel, path, is_dir));
            }
        }
        out
    }

    /// A configuration whose issue-9 machinery is off (no verification, no backfill, no network):
    /// the base for tests of other behaviour that build their frames without signatures. Tests
    /// name every field they care about and take the rest from here.
    pub fn offline_defaults() -> firehose_writer::Config {
        use firehose_writer::config::{FutureCursorPolicy, VerifyMode};
        use std::time::Duration;
        firehose_writer::Config {
            source: firehose_writer::Source::Replay("/nonexistent".into()),
            cache_dir: "/nonexistent".into(),
            state: "/nonexistent".into(),
            study_users: "/nonexistent".into(),
            in_network: None,
            study_posts: None,
            withdrawn: None,
            account_deleted_is_withdrawal: false,
            cursor: None,
            stall_timeout: Duration::from_secs(60),
            on_future_cursor: FutureCursorPolicy::Exit,
            metrics_addr: None,
            commit_interval: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            plc_url: "http://127.0.0.1:9".into(),
            verify: VerifyMode::Off,
            did_docs: None,
            backfill: false,
            backfill_since: None,
            pds_concurrency: 4,
            pds_rate: 5.0,
            plc_rate: 10.0,
            max_repo_bytes: 1 << 30,
            repo_fetch_timeout: Duration::from_secs(3600),
        }
    }

    /// The committed cursor, read from the state database as an operator would.
    pub fn stored_cursor(state: &Path) -> Option<i64> {
        if !state.exists() {
            return None;
        }
        let conn = rusqlite::Connection::open_with_flags(
            state,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok()?;
        conn.query_row("SELECT value FROM meta WHERE key = 'cursor'", [], |r| {
            r.get::<_, String>(0)
        })
        .ok()
        .and_then(|v| v.parse().ok())
    }
}
