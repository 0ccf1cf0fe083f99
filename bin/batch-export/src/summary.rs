//! The end-of-run summary: rows per table, files, Parquet files and bytes, seconds; as text or
//! one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::config::{Config, Output};

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct TableSummary {
    pub rows: u64,
    pub parquet_files: u64,
    pub bytes: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub dry_run: bool,
    pub output: String,
    /// Rows (and Parquet files, bytes) per table path.
    pub tables: BTreeMap<String, TableSummary>,
    /// Cache files read (parsed or quarantined).
    pub files_read: u64,
    /// Files whose rows are now in Parquet (including in-run duplicates).
    pub files_exported: u64,
    /// Files already exported earlier (a writer replay, or a run killed before its deletes).
    pub already_exported: u64,
    /// Files by or about a withdrawn participant (`--withdrawn`): not exported, removed from
    /// the cache (not quarantined).
    pub withdrawn_files: u64,
    /// DIDs of `--withdrawn` that no `batch-export purge` has covered yet: rows exported before
    /// they were listed are still in the output (exit 3 until a purge runs).
    pub withdrawn_not_purged: u64,
    /// Files whose row duplicated one already in this run (same URI / follow relationship).
    pub duplicates: u64,
    /// Corrupt or unreadable files moved to `<cache>/.quarantine/`.
    pub quarantined: u64,
    /// Files in folders that feed no table (left in place; exit 3).
    pub files_unrecognised: u64,
    /// Keys in cache files that their table does not know (the file is exported; the key is
    /// not a column). A writer newer than this export, or a hand-edited file.
    pub unknown_keys: u64,
    /// Files that disappeared between listing and reading.
    pub files_gone: u64,
    pub files_deleted: u64,
    /// Exported files that could not be deleted (they stay; known as exported, the next run
    /// deletes them; exit 3).
    pub delete_failed: u64,
    pub parquet_files: u64,
    pub parquet_bytes: u64,
    /// Quarantines that failed (the file stays in place and is read again next run).
    pub quarantine_failed: u64,
    /// Cache entries the walk could not handle (non-UTF-8 names, symlinks and other non-regular
    /// files, unreadable folders): left in place and counted.
    #[serde(flatten)]
    pub skipped: crate::scan::Skipped,
    /// Batches a killed or failed run had committed, published by this run.
    pub batches_rolled_forward: u64,
    /// Batches rebuilt from the output's manifests (`--adopt-output`).
    pub batches_adopted: u64,
    /// Batches older than the key retention whose keys objects this run emptied.
    pub keys_expired_batches: u64,
    pub dirs_pruned: usize,
    pub seconds: f64,
    /// Part of `seconds` spent deleting exported files.
    pub delete_seconds: f64,
    /// Why the run failed (`null` when it succeeded). The counts above are what it did before:
    /// batches committed before the failure are in Parquet and their files are deleted.
    pub error: Option<String>,
}

impl Summary {
    pub fn new(config: &Config) -> Summary {
        Summary {
            dry_run: config.dry_run,
            output: match &config.output {
                Output::Local(p) => p.display().to_string(),
                Output::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            },
            ..Summary::default()
        }
    }

    pub fn table(&mut self, path: &str) -> &mut TableSummary {
        self.tables.entry(path.to_owned()).or_default()
    }

    /// Whether a human should look (exit code 3): corrupt files quarantined, a quarantine that
    /// failed, files in folders that feed no table, exported files that could not be deleted,
    /// or cache entries the walk could not handle.
    pub fn needs_attention(&self) -> bool {
        self.quarantined > 0
            || self.quarantine_failed > 0
            || self.files_unrecognised > 0
            || self.delete_failed > 0
            || self.skipped.any()
    }

    /// The exit code's view: [`Self::needs_attention`], or a withdrawal the output still owes
    /// (which does not make the run's coverage of the cache incomplete).
    pub fn exit_attention(&self) -> bool {
        self.needs_attention() || self.withdrawn_not_purged > 0
    }

    pub fn total_rows(&self) -> u64 {
        self.tables.values().map(|t| t.rows).sum()
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let verb = if self.dry_run {
            "would export (dry run)"
        } else {
            "exported"
        };
        let _ = writeln!(
            s,
            "batch-export: {verb} {} rows to {}",
            self.total_rows(),
            self.output
        );
        for (path, t) in &self.tables {
            let _ = writeln!(
                s,
                "  {path:<48} {:>10} rows {:>4} files {:>12} bytes",
                t.rows, t.parquet_files, t.bytes
            );
        }
        let _ = writeln!(
            s,
            "  files: {} read, {} exported, {} already exported, {} duplicates, {} quarantined, {} deleted; {} unknown keys",
            self.files_read,
            self.files_exported,
            self.already_exported,
            self.duplicates,
            self.quarantined,
            self.files_deleted,
            self.unknown_keys
        );
        if self.withdrawn_files > 0 {
            let _ = writeln!(
                s,
                "  withdrawn participants: {} cache files refused and removed (not exported)",
                self.withdrawn_files
            );
        }
        if self.withdrawn_not_purged > 0 {
            let _ = writeln!(
                s,
                "  withdrawn participants not purged from the output yet: {} (run `batch-export purge` with the same --withdrawn list)",
                self.withdrawn_not_purged
            );
        }
        let _ = writeln!(
            s,
            "  left in place (look at them): {} in folders that feed no table, {} exported but not deleted, {} failed quarantines, {} non-UTF-8 names, {} symlinks or other non-regular files, {} unreadable folders or entries",
            self.files_unrecognised,
            self.delete_failed,
            self.quarantine_failed,
            self.skipped.non_utf8_names,
            self.skipped.non_regular_files,
            self.skipped.unreadable
        );
        let _ = writeln!(
            s,
            "  parquet: {} files, {} bytes; {} batches rolled forward; {} batches adopted; {} folders pruned",
            self.parquet_files,
            self.parquet_bytes,
            self.batches_rolled_forward,
            self.batches_adopted,
            self.dirs_pruned
        );
        let _ = writeln!(
            s,
            "  time: {:.2} s ({:.2} s deleting exported files)",
            self.seconds, self.delete_seconds
        );
        if let Some(e) = &self.error {
            let _ = writeln!(s, "  FAILED after the above: {e}");
        }
        s
    }
}
