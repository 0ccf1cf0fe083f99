//! firehose-writer integration tests, one binary: `inspect` CLI, the cache writer, the writer
//! in-process against the replay file and the test relay (faults), as a process (SIGKILL crash
//! safety, signals, a crash at each step of the durability barrier), and against the official
//! atproto PDS; `/metrics` and `/health` over HTTP; the state an operator manages across restarts.

mod cache;
mod cli;
mod crash;
mod gapfree;
mod metrics;
mod pds;
mod process;
mod source;
mod state;
mod writer;

/// Helpers shared by the test modules.
mod support {
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every file under `root` (relative path -> contents). Temp files are included on purpose:
    /// a test that expects none sees them.
    pub fn cache_files(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .to_string();
                    out.insert(rel, std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        out
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
