//! Test-only crash points in the durability barrier, compiled in only with the `fault-injection`
//! feature (the writer's integration tests enable it; `cargo build --release` does not).
//!
//! `FIREHOSE_WRITER_FAULT=<point>[@N]` aborts the process (`std::process::abort()`: no
//! destructors, no drain, like a kill) the N-th time (default 1) it reaches that point, so the
//! tests put a crash in each step of the barrier deterministically instead of by a lucky
//! SIGKILL. The points, in barrier order (the first four count only barriers with files to
//! write; `mid-rename` only barriers with at least two, after half of them are renamed):
//!
//! * `after-temp-write`: the batch's temp files are written, nothing flushed;
//! * `after-first-syncfs`: their data is flushed, nothing renamed;
//! * `mid-rename`: half of them are renamed into place;
//! * `after-second-syncfs`: all renamed and the directory entries flushed, state not committed;
//! * `before-state-commit`: cursor, revs and indexes written in the SQLite transaction, which
//!   is not committed;
//! * `after-state-commit`: the transaction is committed.
//!
//! And in a consent-withdrawal purge (`src/processor/withdraw.rs`), in its order:
//!
//! * `withdraw-before-removal`: everything handled before is committed, no file of theirs
//!   removed;
//! * `withdraw-removal`: one more file of theirs removed (`@N`: the N-th), not flushed;
//! * `withdraw-before-record`: every file removed and the removals flushed, the purge (index
//!   rows, the salted hash) not committed;
//! * `withdraw-after-record`: the purge transaction is committed, the WAL not yet truncated.
//!
//! `FIREHOSE_WRITER_FAKE_KERNEL=<release>` makes the writer see that kernel release instead of
//! `uname -r` (tests of the start-up kernel check).
//!
//! Without the feature, [`hit`] is empty and nothing reads the environment.

/// A step of the durability barrier (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    AfterTempWrite,
    AfterFirstSyncfs,
    MidRename,
    AfterSecondSyncfs,
    BeforeStateCommit,
    AfterStateCommit,
    WithdrawBeforeRemoval,
    WithdrawRemoval,
    WithdrawBeforeRecord,
    WithdrawAfterRecord,
}

/// Aborts the process when the configured fault is this point's N-th hit.
#[cfg(feature = "fault-injection")]
pub fn hit(point: Point) {
    imp::hit(point);
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hit(_point: Point) {}

/// Checks the fault configuration at start-up: a typo must not make a crash test silently test
/// nothing.
#[cfg(feature = "fault-injection")]
pub fn check() -> anyhow::Result<()> {
    imp::config().map(|_| ())
}

#[cfg(not(feature = "fault-injection"))]
pub fn check() -> anyhow::Result<()> {
    Ok(())
}

/// The kernel release the tests pretend to run (`None`: the real one).
#[cfg(feature = "fault-injection")]
pub fn fake_kernel_release() -> Option<String> {
    std::env::var(imp::FAKE_KERNEL_ENV).ok()
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fake_kernel_release() -> Option<String> {
    None
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    use anyhow::{anyhow, bail, Result};

    use super::Point;

    pub const ENV: &str = "FIREHOSE_WRITER_FAULT";
    pub const FAKE_KERNEL_ENV: &str = "FIREHOSE_WRITER_FAKE_KERNEL";

    const POINTS: [(&str, Point); 10] = [
        ("after-temp-write", Point::AfterTempWrite),
        ("after-first-syncfs", Point::AfterFirstSyncfs),
        ("mid-rename", Point::MidRename),
        ("after-second-syncfs", Point::AfterSecondSyncfs),
        ("before-state-commit", Point::BeforeStateCommit),
        ("after-state-commit", Point::AfterStateCommit),
        ("withdraw-before-removal", Point::WithdrawBeforeRemoval),
        ("withdraw-removal", Point::WithdrawRemoval),
        ("withdraw-before-record", Point::WithdrawBeforeRecord),
        ("withdraw-after-record", Point::WithdrawAfterRecord),
    ];

    static CONFIG: OnceLock<Result<Option<(Point, u32)>, String>> = OnceLock::new();
    static HITS: [AtomicU32; POINTS.len()] = [const { AtomicU32::new(0) }; POINTS.len()];

    fn parse(value: &str) -> Result<Option<(Point, u32)>> {
        if value.is_empty() {
            return Ok(None);
        }
        let (name, nth) = match value.split_once('@') {
            Some((name, n)) => (
                name,
                n.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    anyhow!("{ENV}={value:?}: the count after @ must be 1 or more")
                })?,
            ),
            None => (value, 1),
        };
        let Some((_, point)) = POINTS.iter().find(|(n, _)| *n == name) else {
            bail!("{ENV}={value:?} is not a known fault point");
        };
        Ok(Some((*point, nth)))
    }

    pub fn config() -> Result<Option<(Point, u32)>> {
        CONFIG
            .get_or_init(|| {
                parse(&std::env::var(ENV).unwrap_or_default()).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| anyhow!(e))
    }

    pub fn hit(point: Point) {
        let Ok(Some((wanted, nth))) = config() else {
            return;
        };
        if wanted != point {
            return;
        }
        let index = POINTS.iter().position(|(_, p)| *p == point).unwrap_or(0);
        if HITS[index].fetch_add(1, Ordering::SeqCst) + 1 == nth {
            eprintln!("firehose-writer: test fault {point:?} (hit {nth}): aborting");
            std::process::abort();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn fault_specs() {
            assert_eq!(parse("").unwrap(), None);
            assert_eq!(parse("mid-rename").unwrap(), Some((Point::MidRename, 1)));
            assert_eq!(
                parse("after-state-commit@3").unwrap(),
                Some((Point::AfterStateCommit, 3))
            );
            for bad in [
                "mid_rename",
                "after-temp-write@0",
                "after-temp-write@x",
                "x@1",
            ] {
                assert!(parse(bad).is_err(), "{bad}");
            }
        }
    }
}
