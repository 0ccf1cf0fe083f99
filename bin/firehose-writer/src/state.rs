//! The state store: one SQLite file (WAL) holding the cursor, per-repo revs, the study-post index,
//! the follow index, the routed-record index (reactions, and in-network posts in their own table;
//! the study user each follow routed to `followee` follows, for a withdrawal purge) and the
//! unfollows of follows it never saw, plus the in-memory views routing reads.
//!
//! Updates are applied in memory at once (routing of the next event must see them) and queued;
//! [`StateStore::commit`] writes them together with the cursor in one transaction, which the
//! processor only calls after the cache files covering that cursor are durable.
//!
//! Operator cursor overrides (`--cursor`, `set-cursor`) are applied here in one transaction with
//! what they imply (a rewind forgets the revs) and recorded in `meta`, so an override left in
//! the environment file is applied once, not on every restart.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use sync_core::ids::{AtUri, Did, Tid};
use sync_core::paths::Folder;
use sync_core::route::{Applied, RoutingState, StateUpdate};
use sync_core::verify::{rev_is_plausible, VerifyOptions};
use tracing::warn;

use crate::tracked::{DidProbe, DidSet, SharedMembership};

mod repair;
mod withdrawn;
pub use repair::{unix_now, WorkItem, WorkKind};
pub use withdrawn::WithdrawalSource;

/// `meta` key of the last cursor override: JSON `{cursor, previous, by, at}`.
pub const META_CURSOR_OVERRIDE: &str = "cursor_override";
/// `meta` key of the `--cursor` / `FIREHOSE_CURSOR` value last applied.
pub const META_CURSOR_FLAG_APPLIED: &str = "cursor_flag_applied";

/// The clock the rev plausibility check runs against.
fn verify_now() -> VerifyOptions {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    VerifyOptions::at(now)
}

/// Who set the cursor, recorded with the override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorSetBy {
    /// `--cursor N` / `FIREHOSE_CURSOR` at start-up.
    Flag,
    /// `firehose-writer set-cursor N`.
    Command,
}

impl CursorSetBy {
    fn label(self) -> &'static str {
        match self {
            CursorSetBy::Flag => "--cursor",
            CursorSetBy::Command => "set-cursor",
        }
    }
}

/// What a cursor override did to the stored cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorChange {
    /// No cursor was stored.
    First,
    /// The stored cursor already had this value.
    Unchanged,
    /// Moved back: the per-repo revs were forgotten, so tracked accounts' events after the new
    /// cursor are captured again instead of being skipped as duplicates.
    Rewound { from: i64 },
    /// Moved forward: events after `from` up to the new cursor will never be captured.
    SkippedForward { from: i64 },
}

/// What [`StateStore::record_rev`] did with a commit's rev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevRecord {
    /// Remembered as the repo's duplicate bound (a tracked repo).
    Remembered,
    /// Not tracked: its events route idempotently by name, the rev is not needed.
    Untracked,
    /// More than 5 minutes ahead of the clock: never a duplicate bound, or every later commit
    /// of the repo would be skipped until the clock caught up.
    FutureRev,
}

fn read_cursor(conn: &Connection) -> Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE key = 'cursor'", [], |r| {
        r.get::<_, String>(0)
    })
    .optional()?
    .map(|v| v.parse::<i64>())
    .transpose()
    .context("stored cursor is not a number")
}

/// An operator's cursor override, and what it changes.
#[derive(Debug, Clone, Copy)]
struct CursorOverride {
    cursor: i64,
    previous: Option<i64>,
    by: CursorSetBy,
}

impl CursorOverride {
    fn change(&self) -> CursorChange {
        match self.previous {
            None => CursorChange::First,
            Some(p) if p == self.cursor => CursorChange::Unchanged,
            Some(p) if self.cursor < p => CursorChange::Rewound { from: p },
            Some(p) => CursorChange::SkippedForward { from: p },
        }
    }

    /// Writes what the override implies inside `tx`: a rewind forgets the per-repo revs (before
    /// any rev of this transaction is written); the override is recorded in `meta`.
    fn write(&self, tx: &rusqlite::Transaction<'_>) -> Result<()> {
        if let CursorChange::Rewound { .. } = self.change() {
            tx.execute("DELETE FROM repo_revs", [])
                .context("clearing the per-repo revs")?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, json_object('cursor', ?2, \
             'previous', ?3, 'by', ?4, 'at', strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
            params![
                META_CURSOR_OVERRIDE,
                self.cursor,
                self.previous,
                self.by.label()
            ],
        )?;
        if self.by == CursorSetBy::Flag {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![META_CURSOR_FLAG_APPLIED, self.cursor.to_string()],
            )?;
        }
        Ok(())
    }
}

fn write_cursor(tx: &rusqlite::Transaction<'_>, cursor: i64) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', ?1)",
        params![cursor.to_string()],
    )?;
    Ok(())
}

/// `firehose-writer set-cursor`: sets the cursor of an existing state database that no writer
/// holds (the caller holds the lock), in one transaction with what it implies: a rewind forgets
/// the per-repo revs; the override is recorded in `meta`; the stored upstream is forgotten, so
/// the next start takes the cursor as a seq of the upstream it is configured to follow.
pub fn set_cursor(path: &Path, cursor: i64) -> Result<CursorChange> {
    if !path.is_file() {
        anyhow::bail!(
            "no state database at {} (a first start takes --cursor instead)",
            path.display()
        );
    }
    let mut conn = Connection::open(path)
        .with_context(|| format!("opening state database {}", path.display()))?;
    check_schema(&conn, path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let not_a_state = || format!("{} is not a firehose-writer state database", path.display());
    let tx = conn.transaction().context("starting state transaction")?;
    let change = CursorOverride {
        cursor,
        previous: read_cursor(&tx).with_context(not_a_state)?,
        by: CursorSetBy::Command,
    };
    change.write(&tx).with_context(not_a_state)?;
    write_cursor(&tx, cursor)?;
    tx.execute("DELETE FROM meta WHERE key = 'upstream'", [])?;
    tx.commit().context("committing the cursor")?;
    Ok(change.change())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS study_posts (uri TEXT PRIMARY KEY, author TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routed (uri TEXT NOT NULL, folder TEXT NOT NULL, PRIMARY KEY (uri, folder));
CREATE TABLE IF NOT EXISTS followee_subjects (uri TEXT NOT NULL, subject TEXT NOT NULL, PRIMARY KEY (uri, subject)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS followee_subjects_subject ON followee_subjects (subject);
CREATE TABLE IF NOT EXISTS study_follows (uri TEXT PRIMARY KEY, follower TEXT NOT NULL, subject TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS study_follows_subject ON study_follows (subject);
CREATE TABLE IF NOT EXISTS repo_revs (did TEXT PRIMARY KEY, rev TEXT NOT NULL, data TEXT, first_seen INTEGER);
CREATE TABLE IF NOT EXISTS in_network_posts (uri TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS in_network_post_authors (did TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unknown_unfollows (uri TEXT PRIMARY KEY, follower TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repo_records (did TEXT NOT NULL, collection TEXT NOT NULL, rkey TEXT NOT NULL, cid TEXT, rev TEXT, PRIMARY KEY (did, collection, rkey)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repo_work (did TEXT PRIMARY KEY, kind TEXT NOT NULL, reason TEXT NOT NULL, queued_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, not_before INTEGER NOT NULL DEFAULT 0, last_error TEXT, failed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS backfilled (did TEXT PRIMARY KEY, rev TEXT NOT NULL, at INTEGER NOT NULL);
";

/// `PRAGMA user_version` of the schema above. A newer file was written by a newer writer whose
/// data this one could misread or damage. Version 3 records consent withdrawals (`withdrawn`):
/// a writer that does not know them must not open the file and route a withdrawn DID again.
/// Version 4 records the subject of each follow routed to `followee` (`followee_subjects`): a
/// writer that does not would add `followee` rows a withdrawal purge cannot find. Version 5
/// records the purged records about withdrawn participants (`withdrawn_records`, salted
/// hashes): a writer that does not would route their deletes again.
const SCHEMA_VERSION: i64 = 5;

/// Brings a version-1 file to version 2: `repo_revs` gains the chain state's MST root (`data`)
/// and when the repo was first seen. Runs before [`SCHEMA`], in the same start-up.
fn migrate(conn: &Connection, version: i64) -> Result<()> {
    if version >= 2 {
        return Ok(());
    }
    let has_table: bool = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'repo_revs'")?
        .exists([])?;
    if !has_table {
        return Ok(());
    }
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('repo_revs')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (column, ty) in [("data", "TEXT"), ("first_seen", "INTEGER")] {
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE repo_revs ADD COLUMN {column} {ty}"))
                .with_context(|| format!("adding repo_revs.{column}"))?;
        }
    }
    // Repos a version-1 writer tracked were first seen before the upgrade: a resync writes
    // what it missed from now on (what came before was captured by that writer).
    conn.execute(
        "UPDATE repo_revs SET first_seen = ?1 WHERE first_seen IS NULL",
        params![repair::unix_now()],
    )
    .context("dating the repos tracked before the upgrade")?;
    Ok(())
}

/// A version-1 state kept no records per repo (`repo_records`), so a resync could not tell
/// which records routed by that writer were deleted while the stream missed them. Of its
/// indexes only the study users' follows are exact (an unfollow deletes its row); its post
/// indexes keep deleted posts, so seeding them would make the first backfill write a second
/// delete of every post deleted while version 1 ran. The follows are held with
/// [`sync_core::resync::CID_NOT_RECORDED`] and no rev: a resync keeps one if the repo still has
/// it and writes its delete if not. One `INSERT ... SELECT` (nothing held in memory).
fn seed_repo_records(conn: &Connection) -> Result<usize> {
    let seeded = conn.execute(
        "INSERT OR IGNORE INTO repo_records (did, collection, rkey, cid, rev)
         SELECT follower, 'app.bsky.graph.follow',
                substr(uri, length('at://' || follower || '/app.bsky.graph.follow/') + 1), ?1, NULL
         FROM study_follows
         WHERE substr(uri, 1, length('at://' || follower || '/app.bsky.graph.follow/'))
               = 'at://' || follower || '/app.bsky.graph.follow/'
           AND length(uri) > length('at://' || follower || '/app.bsky.graph.follow/')",
        params![sync_core::resync::CID_NOT_RECORDED],
    )?;
    if seeded > 0 {
        tracing::info!(
            records = seeded,
            "state upgrade: the study users' follows routed by the previous writer are held per repo, so a resync can find their deletes"
        );
    }
    Ok(seeded)
}

/// Reads the schema version: a file that is not a readable SQLite database, or one from a newer
/// writer, needs a human (exit 3), not a restart loop.
fn check_schema(conn: &Connection, path: &Path) -> Result<i64> {
    let version: i64 = match conn.query_row("PRAGMA user_version", [], |r| r.get(0)) {
        Ok(v) => v,
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(
                e.code,
                rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
            ) =>
        {
            return Err(anyhow::Error::new(crate::NeedsOperator(format!(
                "state database {} is unreadable ({e}): not a firehose-writer state file, or corrupt. Restore it from a backup or point --state at the right file",
                path.display()
            ))));
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the schema version of {}", path.display()))
        }
    };
    if version > SCHEMA_VERSION {
        return Err(anyhow::Error::new(crate::NeedsOperator(format!(
            "state database {} has schema version {version}, newer than this writer's {SCHEMA_VERSION}: run the newer firehose-writer that wrote it",
            path.display()
        ))));
    }
    Ok(version)
}

fn key_hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Updates not yet committed.
#[derive(Default)]
struct Pending {
    study_posts: HashMap<String, Did>,
    routed: Vec<(String, Folder)>,
    /// (follow uri, study user it follows) of follows routed to `followee`.
    followee_subjects: Vec<(String, Did)>,
    follows: HashMap<String, (Did, Did)>,
    unfollows: Vec<String>,
    /// (follow uri, follower, seq, time) of unfollows whose follow was never seen.
    unknown_unfollows: Vec<(String, Did, i64, String)>,
    revs: HashMap<Did, Tid>,
    /// MST roots of verified commits of tracked repos (the chain state's `data`, with `revs`).
    datas: HashMap<Did, String>,
    /// Per tracked repo, records held, deleted while a repair is pending, or no longer held.
    held: HashMap<(Did, String, String), repair::HeldChange>,
    /// Repos whose deletes seen during a repair are forgotten (the repair is applied).
    purge_tombstones: Vec<Did>,
    /// Backfill/resync queue changes.
    work: HashMap<Did, repair::WorkChange>,
    /// Repos backfilled (with the rev they were backfilled at).
    backfilled: Vec<(Did, Tid)>,
    /// A `--cursor` override, made durable with the first commit (with the rev reset of a
    /// rewind), so a run that ends before committing anything leaves the state as it was.
    cursor_override: Option<CursorOverride>,
    /// Consent-withdrawal purges (`state/withdrawn.rs`), written last.
    withdrawn: withdrawn::PendingWithdrawn,
}

/// The author of `uri` if it is a post URI (`at://<did>/app.bsky.feed.post/<rkey>`).
fn post_author(uri: &str) -> Option<&str> {
    let (author, rest) = uri.strip_prefix("at://")?.split_once('/')?;
    let (collection, _) = rest.split_once('/')?;
    (collection == sync_core::records::POST).then_some(author)
}

pub struct StateStore {
    conn: Connection,
    study_users: Arc<DidSet>,
    file_in_network: Arc<DidSet>,
    /// The same membership for the verification stage's thread.
    shared: Arc<SharedMembership>,
    /// Subjects of study users' live follows, with how many study follows point at each.
    followed: HashMap<Did, u32>,
    /// Hashes of study-post URIs: a miss is certain, a hit is confirmed in the database.
    study_post_hashes: HashSet<u64>,
    /// Hashes of URIs in the reaction part of the routed-record index (`routed`).
    routed_hashes: HashSet<u64>,
    /// Hashes of the DIDs that have in-network posts in `in_network_posts`: a post delete by
    /// anyone else is certainly not one. Per author rather than per post, because in-network
    /// posts are most of what is routed (~1M a day) and their deletes are rare.
    in_network_post_authors: HashSet<u64>,
    /// For duplicate detection: per hash of a tracked repo's DID, the highest rev seen (as u64).
    /// An upper bound for every DID with that hash, so "newer than this" is certain; "not newer"
    /// is confirmed against the exact rev (pending or in SQLite) before an event is skipped.
    /// ~25 bytes per active tracked account instead of ~90 with the DID as key.
    revs: HashMap<u64, u64>,
    pending: Pending,
    cursor: Option<i64>,
    /// The upstream the cursor's seqs belong to (`source::upstream_id`), stored next to it.
    upstream: Option<String>,
    /// A lookup that failed during routing (routing reads through an infallible trait); the
    /// processor takes it and routes the event again.
    lookup_error: std::cell::RefCell<Option<String>>,
    /// The backfill/resync queue (one entry per repo), as committed plus pending changes.
    work: HashMap<Did, repair::WorkItem>,
    /// Study users already backfilled.
    backfilled: HashSet<Did>,
    /// Withdrawn DIDs (consent withdrawal): never routed, never repaired.
    withdrawn: withdrawn::WithdrawnState,
    /// The last DID whose membership was looked up: handling one event asks about its repo
    /// several times (dedupe, routing, verification, held records), and a lookup in a
    /// million-DID set is a cache miss each time.
    membership: std::cell::RefCell<Membership>,
}

/// A remembered membership answer; an empty `did` (no valid DID is empty) remembers nothing.
#[derive(Default)]
struct Membership {
    did: String,
    study: bool,
    in_network: bool,
}

impl StateStore {
    pub fn open(path: &Path, study_users: HashSet<Did>, in_network: HashSet<Did>) -> Result<Self> {
        Self::open_with_sets(path, study_users.into(), in_network.into())
    }

    /// [`open`](Self::open) with the sets in their compact form (what the writer loads).
    pub fn open_with_sets(path: &Path, study_users: DidSet, in_network: DidSet) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating state directory {}", parent.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening state database {}", path.display()))?;
        let version = check_schema(&conn, path)?;
        let new_file = !conn
            .prepare("SELECT 1 FROM sqlite_master")?
            .exists([])
            .with_context(|| format!("reading {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&conn, version)?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating schema in {}", path.display()))?;
        conn.execute_batch(withdrawn::SCHEMA)
            .with_context(|| format!("creating schema in {}", path.display()))?;
        withdrawn::on_open(&conn, new_file)?;
        if version < 2 && !new_file {
            seed_repo_records(&conn)
                .with_context(|| format!("upgrading {}: records held per repo", path.display()))?;
        }
        if version < SCHEMA_VERSION {
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        let upstream = conn
            .query_row("SELECT value FROM meta WHERE key = 'upstream'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?;
        let cursor = read_cursor(&conn)?;
        let (study_users, in_network) = (Arc::new(study_users), Arc::new(in_network));
        let mut store = StateStore {
            conn,
            shared: Arc::new(SharedMembership::new(
                study_users.clone(),
                in_network.clone(),
            )),
            study_users,
            file_in_network: in_network,
            followed: HashMap::new(),
            study_post_hashes: HashSet::new(),
            routed_hashes: HashSet::new(),
            in_network_post_authors: HashSet::new(),
            revs: HashMap::new(),
            pending: Pending::default(),
            cursor,
            upstream,
            lookup_error: std::cell::RefCell::new(None),
            work: HashMap::new(),
            backfilled: HashSet::new(),
            membership: Default::default(),
            withdrawn: Default::default(),
        };
        store.load()?;
        store.load_work()?;
        Ok(store)
    }

    fn load(&mut self) -> Result<()> {
        let mut stmt = self.conn.prepare("SELECT uri FROM study_posts")?;
        for uri in stmt.query_map([], |r| r.get::<_, String>(0))? {
            self.study_post_hashes.insert(key_hash(&uri?));
        }
        let mut stmt = self.conn.prepare("SELECT uri FROM routed")?;
        for uri in stmt.query_map([], |r| r.get::<_, String>(0))? {
            self.routed_hashes.insert(key_hash(&uri?));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT did FROM in_network_post_authors")?;
        for did in stmt.query_map([], |r| r.get::<_, String>(0))? {
            self.in_network_post_authors.insert(key_hash(&did?));
        }
        let mut stmt = self.conn.prepare("SELECT subject FROM study_follows")?;
        for subject in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(did) = Did::parse(&subject?) {
                self.shared.followed(&did);
                *self.followed.entry(did).or_default() += 1;
            }
            self.forget_membership();
        }
        let mut stmt = self.conn.prepare("SELECT did, rev FROM repo_revs")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let now = verify_now();
        let mut future = Vec::new();
        for row in rows {
            let (did, rev) = row?;
            if let Ok(rev) = Tid::parse(&rev) {
                if !rev_is_plausible(&rev, &now) {
                    future.push((did, rev));
                    continue;
                }
                let bound = self.revs.entry(key_hash(&did)).or_insert(0);
                *bound = (*bound).max(rev.to_u64());
            }
        }
        drop(stmt);
        // Stored before future revs were refused: as bounds they would skip every commit of
        // these repos until the clock caught up.
        for (did, rev) in future {
            warn!(repo = %did, rev = %rev, "forgetting a stored rev that is more than 5 minutes ahead of the clock");
            self.conn
                .execute("DELETE FROM repo_revs WHERE did = ?1", params![did])
                .context("forgetting a future rev")?;
        }
        Ok(())
    }

    /// The error of a failed lookup since the last call, if any.
    pub fn take_lookup_error(&self) -> Option<String> {
        self.lookup_error.borrow_mut().take()
    }

    /// The committed cursor (last fully handled seq whose files are durable).
    pub fn cursor(&self) -> Option<i64> {
        self.cursor
    }

    /// The upstream the cursor belongs to: as stored, or as set for the next commit.
    pub fn upstream(&self) -> Option<&str> {
        self.upstream.as_deref()
    }

    /// Sets the upstream stored with every cursor committed from now on. Call it only once the
    /// cursors to be committed are this upstream's.
    pub fn set_upstream(&mut self, upstream: String) {
        self.upstream = Some(upstream);
    }

    /// Number of study posts in the index (committed and pending).
    pub fn study_post_count(&self) -> usize {
        self.study_post_hashes.len()
    }

    /// Adds known study posts (seeding from a predecessor map or the cache); committed with the
    /// next [`commit`](Self::commit).
    pub fn seed_study_posts(
        &mut self,
        posts: impl IntoIterator<Item = (AtUri, Did)>,
    ) -> Result<usize> {
        let mut added = 0;
        for (uri, author) in posts {
            // A withdrawn participant's posts never enter the index again.
            if self.is_withdrawn(&author)
                || uri.authority_did().is_some_and(|d| self.is_withdrawn(&d))
            {
                continue;
            }
            if self.study_post_hashes.insert(key_hash(uri.as_str())) {
                added += 1;
            }
            self.pending.study_posts.insert(uri.into_string(), author);
        }
        Ok(added)
    }

    pub fn study_user_count(&self) -> usize {
        self.study_users.len()
    }

    pub fn in_network_count(&self) -> usize {
        self.file_in_network.len() + self.followed.len()
    }

    /// Replaces the file-loaded sets (SIGHUP); live follows are kept.
    pub fn replace_sets(&mut self, study_users: DidSet, in_network: DidSet) {
        self.forget_account_deletions_not_in(&study_users);
        self.study_users = Arc::new(study_users);
        self.file_in_network = Arc::new(in_network);
        self.apply_withdrawn_sets();
        self.sync_membership();
    }

    /// Brings the verification stage's view and the remembered answer up to date with the
    /// sets and the followed accounts (after a reload or a withdrawal changed them).
    pub(crate) fn sync_membership(&mut self) {
        self.shared
            .replace_sets(self.study_users.clone(), self.file_in_network.clone());
        self.shared
            .replace_followed(self.followed.keys().cloned().collect());
        self.forget_membership();
    }

    /// Who is tracked, for another thread (the verification stage).
    pub fn shared_membership(&self) -> Arc<SharedMembership> {
        self.shared.clone()
    }

    pub fn tracked(&self, did: &Did) -> bool {
        let (study, in_network) = self.membership(did);
        study || in_network
    }

    /// Whether `did` is a study user, and whether it is in-network (remembered for the last DID).
    fn membership(&self, did: &Did) -> (bool, bool) {
        let mut memo = self.membership.borrow_mut();
        if memo.did != did.as_str() {
            let probe = DidProbe::new(did.as_str());
            memo.study = self.study_users.contains_probe(&probe);
            memo.in_network =
                self.file_in_network.contains_probe(&probe) || self.followed.contains_key(did);
            memo.did.clear();
            memo.did.push_str(did.as_str());
        }
        (memo.study, memo.in_network)
    }

    /// Must follow every change of the sets or of the followed accounts.
    fn forget_membership(&self) {
        self.membership.borrow_mut().did.clear();
    }

    /// Applies `--cursor N` / `FIREHOSE_CURSOR` unless this value was applied by an earlier
    /// start (`None`): an override left in the environment file must not rewind every restart
    /// and wipe the duplicate memory each time. A rewind forgets the revs at once in memory (safe:
    /// a replayed event rewrites the same file name and the index updates are idempotent); the
    /// override, the rev reset and the new cursor become durable together with the next
    /// [`commit`](Self::commit), so a run that commits nothing (e.g. the relay refuses the cursor)
    /// changes nothing and the next start applies the value again.
    pub fn apply_cursor_flag(&mut self, cursor: i64) -> Result<Option<CursorChange>> {
        let applied: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![META_CURSOR_FLAG_APPLIED],
                |r| r.get(0),
            )
            .optional()?;
        if applied.and_then(|v| v.parse::<i64>().ok()) == Some(cursor) {
            return Ok(None);
        }
        let change = CursorOverride {
            cursor,
            previous: self.cursor,
            by: CursorSetBy::Flag,
        };
        if let CursorChange::Rewound { .. } = change.change() {
            self.revs.clear();
            self.pending.revs.clear();
        }
        self.pending.cursor_override = Some(change);
        Ok(Some(change.change()))
    }

    /// True when `rev` is not newer than the last rev seen for this (tracked) repo.
    pub fn is_duplicate(&self, did: &Did, rev: &Tid) -> bool {
        let bound = self.revs.get(&key_hash(did.as_str()));
        if bound.is_none_or(|&bound| rev.to_u64() > bound) {
            return false;
        }
        // Probably a duplicate: confirm with this DID's exact rev, so a hash collision can never
        // drop an event. Only replays get here, so the query is rare. If it fails, handle the
        // event: a replayed event rewrites the same file.
        let exact = match self.pending.revs.get(did) {
            Some(rev) => Some(*rev),
            None => self
                .conn
                .prepare_cached("SELECT rev FROM repo_revs WHERE did = ?1")
                .and_then(|mut q| {
                    q.query_row(params![did.as_str()], |r| r.get::<_, String>(0))
                        .optional()
                })
                .ok()
                .flatten()
                .and_then(|r| Tid::parse(&r).ok()),
        };
        exact.is_some_and(|last| *rev <= last)
    }

    fn remember_rev(&mut self, did: &Did, rev: &Tid) {
        let bound = self.revs.entry(key_hash(did.as_str())).or_insert(0);
        *bound = (*bound).max(rev.to_u64());
    }

    /// Remembers the rev of a tracked repo's commit (untracked repos route idempotently by
    /// name), unless it is more than 5 minutes ahead of `opts`' clock.
    pub fn record_rev(&mut self, did: &Did, rev: &Tid, opts: &VerifyOptions) -> RevRecord {
        if !rev_is_plausible(rev, opts) {
            return RevRecord::FutureRev;
        }
        if !self.tracked(did) {
            return RevRecord::Untracked;
        }
        self.remember_rev(did, rev);
        self.pending.revs.insert(did.clone(), *rev);
        // An unverified rev: the MST root it goes with is unknown.
        self.pending.datas.remove(did);
        RevRecord::Remembered
    }

    /// Applies one routing update (visible to routing at once, committed with the next
    /// [`commit`](Self::commit)). Same semantics as [`sync_core::route::MemoryState::apply`].
    pub fn apply(&mut self, update: &StateUpdate) -> Result<Applied> {
        match update {
            StateUpdate::StudyPost { uri, author } => {
                self.study_post_hashes.insert(key_hash(uri.as_str()));
                self.pending
                    .study_posts
                    .insert(uri.as_str().to_owned(), author.clone());
            }
            StateUpdate::Routed { uri, folder } => {
                match folder {
                    Folder::InNetworkPost(author) => self
                        .in_network_post_authors
                        .insert(key_hash(author.as_str())),
                    _ => self.routed_hashes.insert(key_hash(uri.as_str())),
                };
                self.pending
                    .routed
                    .push((uri.as_str().to_owned(), folder.clone()));
            }
            StateUpdate::FollowOfStudyUser { uri, subject } => {
                self.pending
                    .followee_subjects
                    .push((uri.as_str().to_owned(), subject.clone()));
            }
            StateUpdate::StudyFollow {
                uri,
                follower,
                subject,
            } => {
                let previous = self
                    .pending
                    .follows
                    .insert(uri.as_str().to_owned(), (follower.clone(), subject.clone()));
                if previous.is_none() && self.follow_subject_in_db(uri)?.is_none() {
                    let count = self.followed.entry(subject.clone()).or_default();
                    *count += 1;
                    if *count == 1 {
                        self.shared.followed(subject);
                    }
                    self.forget_membership();
                }
            }
            StateUpdate::StudyUnfollow {
                uri,
                follower,
                seq,
                time,
            } => {
                let subject = match self.pending.follows.remove(uri.as_str()) {
                    Some((_, subject)) => Some(subject),
                    None => self.follow_subject_in_db(uri)?,
                };
                let Some(subject) = subject else {
                    // Never seen (made before tracking began): the subject is unknown, so nobody
                    // can leave the in-network set. Recorded for the operator (with backfill on,
                    // a study user's follows are indexed from the repo, so this is rare).
                    self.pending.unknown_unfollows.push((
                        uri.as_str().to_owned(),
                        follower.clone(),
                        seq.0,
                        time.clone(),
                    ));
                    return Ok(Applied::UnknownUnfollow);
                };
                if let Some(count) = self.followed.get_mut(&subject) {
                    *count -= 1;
                    if *count == 0 {
                        self.followed.remove(&subject);
                        self.shared.unfollowed(&subject);
                        self.forget_membership();
                    }
                }
                self.pending.unfollows.push(uri.as_str().to_owned());
            }
        }
        Ok(Applied::Done)
    }

    /// The study users the follow `uri` (routed to `followee`) follows: pending and committed.
    #[cfg(test)]
    fn followee_subjects(&self, uri: &str) -> Vec<Did> {
        let mut subjects: Vec<Did> = self
            .pending
            .followee_subjects
            .iter()
            .filter(|(u, _)| u == uri)
            .map(|(_, d)| d.clone())
            .collect();
        let stored: Vec<String> = self
            .conn
            .prepare("SELECT subject FROM followee_subjects WHERE uri = ?1")
            .unwrap()
            .query_map(params![uri], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for did in stored.iter().filter_map(|s| Did::parse(s).ok()) {
            if !subjects.contains(&did) {
                subjects.push(did);
            }
        }
        subjects
    }

    fn follow_subject_in_db(&self, uri: &AtUri) -> Result<Option<Did>> {
        if self.pending.unfollows.iter().any(|u| u == uri.as_str()) {
            return Ok(None);
        }
        let subject: Option<String> = self
            .conn
            .prepare_cached("SELECT subject FROM study_follows WHERE uri = ?1")?
            .query_row(params![uri.as_str()], |r| r.get(0))
            .optional()?;
        Ok(subject.and_then(|s| Did::parse(&s).ok()))
    }

    /// Writes every queued update and the cursor in one transaction.
    pub fn commit(&mut self, cursor: Option<i64>) -> Result<()> {
        let cursor = cursor.or(self.pending.cursor_override.map(|o| o.cursor));
        let purged_rows;
        let purged_records;
        let tx = self
            .conn
            .transaction()
            .context("starting state transaction")?;
        {
            let mut insert_post = tx.prepare_cached(
                "INSERT OR IGNORE INTO study_posts (uri, author) VALUES (?1, ?2)",
            )?;
            for (uri, author) in &self.pending.study_posts {
                insert_post.execute(params![uri, author.as_str()])?;
            }
            let mut insert_routed =
                tx.prepare_cached("INSERT OR IGNORE INTO routed (uri, folder) VALUES (?1, ?2)")?;
            // The folder of an in-network post follows from its URI: one narrow row per post.
            let mut insert_in_network =
                tx.prepare_cached("INSERT OR IGNORE INTO in_network_posts (uri) VALUES (?1)")?;
            let mut insert_author = tx.prepare_cached(
                "INSERT OR IGNORE INTO in_network_post_authors (did) VALUES (?1)",
            )?;
            for (uri, folder) in &self.pending.routed {
                match folder {
                    Folder::InNetworkPost(author) => {
                        insert_in_network.execute(params![uri])?;
                        insert_author.execute(params![author.as_str()])?;
                    }
                    _ => {
                        insert_routed.execute(params![uri, folder.dir()])?;
                    }
                }
            }
            let mut insert_subject = tx.prepare_cached(
                "INSERT OR IGNORE INTO followee_subjects (uri, subject) VALUES (?1, ?2)",
            )?;
            for (uri, subject) in &self.pending.followee_subjects {
                insert_subject.execute(params![uri, subject.as_str()])?;
            }
            let mut insert_unknown = tx.prepare_cached(
                "INSERT OR REPLACE INTO unknown_unfollows (uri, follower, seq, time) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (uri, follower, seq, time) in &self.pending.unknown_unfollows {
                insert_unknown.execute(params![uri, follower.as_str(), seq, time])?;
            }
            let mut delete_follow =
                tx.prepare_cached("DELETE FROM study_follows WHERE uri = ?1")?;
            for uri in &self.pending.unfollows {
                delete_follow.execute(params![uri])?;
            }
            let mut insert_follow = tx.prepare_cached(
                "INSERT OR REPLACE INTO study_follows (uri, follower, subject) VALUES (?1, ?2, ?3)",
            )?;
            for (uri, (follower, subject)) in &self.pending.follows {
                insert_follow.execute(params![uri, follower.as_str(), subject.as_str()])?;
            }
            // Before the revs: a rewind's reset must not remove the revs recorded since.
            if let Some(cursor_override) = &self.pending.cursor_override {
                cursor_override.write(&tx)?;
            }
            // `data` is kept only with the rev it belongs to: a rev recorded without a verified
            // commit clears it (the chain is then unknown until the next verified commit).
            let mut upsert_rev = tx.prepare_cached(
                "INSERT INTO repo_revs (did, rev, data, first_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (did) DO UPDATE SET rev = excluded.rev, data = excluded.data,
                 first_seen = COALESCE(repo_revs.first_seen, excluded.first_seen)",
            )?;
            let now = repair::unix_now();
            for (did, rev) in &self.pending.revs {
                let data = self.pending.datas.get(did);
                upsert_rev.execute(params![did.as_str(), rev.as_str(), data, now])?;
            }
            repair::write_pending(&self.pending, &tx)?;
            (purged_rows, purged_records) =
                withdrawn::write_pending(&self.withdrawn, &self.pending.withdrawn, &tx)?;
            if let Some(cursor) = cursor {
                write_cursor(&tx, cursor)?;
                if let Some(upstream) = &self.upstream {
                    tx.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('upstream', ?1)",
                        params![upstream],
                    )?;
                }
            }
        }
        crate::fault::hit(crate::fault::Point::BeforeStateCommit);
        tx.commit().context("committing state")?;
        crate::fault::hit(crate::fault::Point::AfterStateCommit);
        let purged = std::mem::take(&mut self.pending.withdrawn);
        if purged.purges() {
            crate::fault::hit(crate::fault::Point::WithdrawAfterRecord);
        }
        self.pending = Pending::default();
        self.work.retain(|_, item| !item.done);
        if cursor.is_some() {
            self.cursor = cursor;
        }
        self.after_commit(&purged, purged_rows, purged_records);
        Ok(())
    }

    fn db_study_post_author(&self, uri: &str) -> Option<Did> {
        let author: Option<String> = self
            .conn
            .prepare_cached("SELECT author FROM study_posts WHERE uri = ?1")
            .and_then(|mut s| s.query_row(params![uri], |r| r.get(0)).optional())
            .unwrap_or_else(|e| {
                *self.lookup_error.borrow_mut() = Some(format!("study-post lookup: {e}"));
                None
            });
        author.and_then(|a| Did::parse(&a).ok())
    }
}

impl RoutingState for StateStore {
    fn is_study_user(&self, did: &Did) -> bool {
        self.membership(did).0
    }

    fn is_in_network(&self, did: &Did) -> bool {
        self.membership(did).1
    }

    fn study_post_author(&self, uri: &str) -> Option<Did> {
        if !self.study_post_hashes.contains(&key_hash(uri)) {
            return None;
        }
        if let Some(author) = self.pending.study_posts.get(uri) {
            return Some(author.clone());
        }
        self.db_study_post_author(uri)
    }

    fn routed_folders(&self, uri: &str) -> Vec<Folder> {
        let reaction = self.routed_hashes.contains(&key_hash(uri));
        let in_network_author = post_author(uri)
            .filter(|author| self.in_network_post_authors.contains(&key_hash(author)));
        if !reaction && in_network_author.is_none() {
            return Vec::new();
        }
        let mut folders: Vec<Folder> = self
            .pending
            .routed
            .iter()
            .filter(|(u, _)| u == uri)
            .map(|(_, f)| f.clone())
            .collect();
        let lookup_error = |what: &str, e: rusqlite::Error| {
            *self.lookup_error.borrow_mut() = Some(format!("{what} lookup: {e}"));
        };
        if reaction {
            let stored: Vec<String> = self
                .conn
                .prepare_cached("SELECT folder FROM routed WHERE uri = ?1")
                .and_then(|mut s| {
                    s.query_map(params![uri], |r| r.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .unwrap_or_else(|e| {
                    lookup_error("routed-record", e);
                    Vec::new()
                });
            for dir in stored {
                if let Some(folder) = Folder::from_dir(&dir) {
                    if !folders.contains(&folder) {
                        folders.push(folder);
                    }
                }
            }
        }
        if let Some(author) = in_network_author.and_then(|a| Did::parse(a).ok()) {
            let folder = Folder::InNetworkPost(author);
            if !folders.contains(&folder) {
                let stored = self
                    .conn
                    .prepare_cached("SELECT 1 FROM in_network_posts WHERE uri = ?1")
                    .and_then(|mut s| s.exists(params![uri]))
                    .unwrap_or_else(|e| {
                        lookup_error("in-network post", e);
                        false
                    });
                if stored {
                    folders.push(folder);
                }
            }
        }
        folders
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::ids::Seq;

    fn did(s: &str) -> Did {
        Did::parse(s).unwrap()
    }

    /// The state database and its `-wal` / `-shm` companions, as they are on disk now.
    fn sqlite_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let file = format!("{}{suffix}", path.display());
                std::fs::read(&file).ok().map(|bytes| (file, bytes))
            })
            .collect()
    }

    #[test]
    fn indexes_survive_a_reopen_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let s1 = did("did:plc:z72i7hdynmk6r22z27h6tvur");
        let a2 = did("did:plc:q6gjnaw2blty4crticxkmujt");
        let post =
            AtUri::parse("at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k")
                .unwrap();
        let follow = AtUri::parse(
            "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.graph.follow/3l5jw7c2bde2s",
        )
        .unwrap();
        let like =
            AtUri::parse("at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p")
                .unwrap();
        // The same updates a batch of events produces, applied before and after a "crash".
        let apply_batch = |store: &mut StateStore| {
            let updates = [
                StateUpdate::StudyPost {
                    uri: post.clone(),
                    author: s1.clone(),
                },
                StateUpdate::StudyFollow {
                    uri: follow.clone(),
                    follower: s1.clone(),
                    subject: a2.clone(),
                },
                StateUpdate::Routed {
                    uri: like.clone(),
                    folder: Folder::LikeOnUserPost(
                        sync_core::ids::RecordKey::parse("3l5jnpb6xyz2k").unwrap(),
                    ),
                },
            ];
            for update in &updates {
                store.apply(update).unwrap();
            }
            store.record_rev(&s1, &Tid::parse("3l5jzzzzzzz2a").unwrap(), &verify_now());
        };
        {
            let mut store = StateStore::open(&path, [s1.clone()].into(), HashSet::new()).unwrap();
            assert_eq!(store.cursor(), None);
            apply_batch(&mut store);
            assert_eq!(
                store.study_post_author(post.as_str()),
                Some(s1.clone()),
                "visible before commit"
            );
            assert!(store.is_in_network(&a2));
            // not committed: a crash here loses nothing the replay will not redo
        }
        {
            let mut store = StateStore::open(&path, [s1.clone()].into(), HashSet::new()).unwrap();
            assert_eq!(store.study_post_author(post.as_str()), None);
            assert!(!store.is_in_network(&a2));
            apply_batch(&mut store);
            store.commit(Some(42)).unwrap();
        }
        let mut store = StateStore::open(&path, [s1.clone()].into(), HashSet::new()).unwrap();
        assert_eq!(store.cursor(), Some(42));
        assert_eq!(store.study_post_author(post.as_str()), Some(s1.clone()));
        assert_eq!(store.routed_folders(like.as_str()).len(), 1);
        assert!(store.is_in_network(&a2));
        assert!(store.is_duplicate(&s1, &Tid::parse("3l5jzzzzzzz2a").unwrap()));
        assert!(!store.is_duplicate(&s1, &Tid::parse("3l5kaaaaaaa2a").unwrap()));
        store
            .apply(&StateUpdate::StudyUnfollow {
                uri: follow,
                follower: s1.clone(),
                seq: Seq(43),
                time: "2024-10-02T15:00:00.000Z".into(),
            })
            .unwrap();
        assert!(
            !store.is_in_network(&a2),
            "unfollowed by the only study user following it"
        );
        store.commit(Some(43)).unwrap();
        let store = StateStore::open(&path, [s1].into(), HashSet::new()).unwrap();
        assert!(!store.is_in_network(&a2));
    }

    #[test]
    fn duplicates_are_confirmed_against_the_exact_rev() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let s1 = did("did:plc:z72i7hdynmk6r22z27h6tvur");
        let s2 = did("did:plc:w4xbfzo7kqfes5zb7r6qv3rw");
        let tid = |s: &str| Tid::parse(s).unwrap();
        let (older, seen, newer) = (
            tid("3l5jzzzzzzz2a"),
            tid("3l5kaaaaaaa2a"),
            tid("3l5kaaaaaab2a"),
        );
        let mut store =
            StateStore::open(&path, [s1.clone(), s2.clone()].into(), HashSet::new()).unwrap();
        assert_eq!(
            store.record_rev(&s1, &seen, &verify_now()),
            RevRecord::Remembered
        );
        assert!(store.is_duplicate(&s1, &older));
        assert!(store.is_duplicate(&s1, &seen));
        assert!(!store.is_duplicate(&s1, &newer));
        assert!(
            !store.is_duplicate(&s2, &older),
            "another repo's rev says nothing"
        );
        store.commit(Some(1)).unwrap();
        // Confirmed from SQLite now (nothing pending), and after a reopen.
        assert!(store.is_duplicate(&s1, &seen));
        drop(store);
        let store =
            StateStore::open(&path, [s1.clone(), s2.clone()].into(), HashSet::new()).unwrap();
        assert!(store.is_duplicate(&s1, &older));
        assert!(!store.is_duplicate(&s1, &newer));
        assert!(!store.is_duplicate(&s2, &seen));
    }

    /// A rev `secs` seconds ahead of (positive) or behind this machine's clock.
    fn rev_at(secs: i64) -> Tid {
        let micros = verify_now().now_micros as i64 + secs * 1_000_000;
        Tid::from_u64((micros as u64) << 10)
    }

    #[test]
    fn a_future_rev_never_becomes_the_duplicate_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let s1 = did("did:plc:z72i7hdynmk6r22z27h6tvur");
        let a1 = did("did:plc:w4xbfzo7kqfes5zb7r6qv3rw");
        let mut store = StateStore::open(&path, [s1.clone()].into(), HashSet::new()).unwrap();
        let (past, future) = (rev_at(-60), rev_at(24 * 3600));
        assert_eq!(
            store.record_rev(&s1, &future, &verify_now()),
            RevRecord::FutureRev
        );
        assert_eq!(
            store.record_rev(&a1, &future, &verify_now()),
            RevRecord::FutureRev,
            "refused for untracked repos too (counted alike)"
        );
        assert!(!store.is_duplicate(&s1, &past));
        // Within the 5-minute tolerance a rev is taken as it is.
        let soon = rev_at(120);
        assert_eq!(
            store.record_rev(&s1, &soon, &verify_now()),
            RevRecord::Remembered
        );
        assert!(store.is_duplicate(&s1, &past));
        assert_eq!(
            store.record_rev(&a1, &past, &verify_now()),
            RevRecord::Untracked
        );
        store.commit(Some(1)).unwrap();
        // A state written before future revs were refused: the bound is forgotten at open.
        store
            .conn
            .execute(
                "UPDATE repo_revs SET rev = ?1 WHERE did = ?2",
                params![future.as_str(), s1.as_str()],
            )
            .unwrap();
        drop(store);
        let store = StateStore::open(&path, [s1.clone()].into(), HashSet::new()).unwrap();
        assert!(!store.is_duplicate(&s1, &past));
        let left: i64 = store
            .conn
            .query_row("SELECT count(*) FROM repo_revs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "deleted from the database too");
    }

    #[test]
    fn a_version_1_state_holds_its_study_users_follows_so_a_resync_finds_their_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let s1 = did("did:plc:z72i7hdynmk6r22z27h6tvur");
        let a1 = did("did:plc:ewvi7nxzyoun6zhxrhs64oiz");
        {
            // What a version-1 writer left: its indexes, no records per repo. Its post indexes
            // keep deleted posts, so only the follows (whose rows unfollows delete) are held.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE repo_revs (did TEXT PRIMARY KEY, rev TEXT NOT NULL);
                 CREATE TABLE study_posts (uri TEXT PRIMARY KEY, author TEXT NOT NULL);
                 CREATE TABLE study_follows (uri TEXT PRIMARY KEY, follower TEXT NOT NULL, subject TEXT NOT NULL);
                 CREATE TABLE in_network_posts (uri TEXT PRIMARY KEY) WITHOUT ROWID;
                 INSERT INTO study_posts VALUES ('at://{s1}/app.bsky.feed.post/3l5jnpb6xyz2k', '{s1}');
                 INSERT INTO study_follows VALUES ('at://{s1}/app.bsky.graph.follow/3l5jv2xq4tk2p', '{s1}', '{a1}');
                 INSERT INTO study_follows VALUES ('at://{a1}/app.bsky.graph.follow/3l5jv2xq4tk2q', '{s1}', '{a1}');
                 INSERT INTO in_network_posts VALUES ('at://{a1}/app.bsky.feed.post/3l5jzzzzzzz2a');
                 PRAGMA user_version = 1;"
            ))
            .unwrap();
        }
        let store = StateStore::open(&path, [s1.clone()].into(), [a1.clone()].into()).unwrap();
        let held = |d: &Did| {
            let mut h: Vec<(String, String, Option<String>, Option<Tid>)> = store
                .held_records(d)
                .unwrap()
                .into_iter()
                .map(|r| {
                    (
                        r.collection.as_str().to_owned(),
                        r.rkey.as_str().to_owned(),
                        r.cid,
                        r.rev,
                    )
                })
                .collect();
            h.sort();
            h
        };
        let unknown = Some(sync_core::resync::CID_NOT_RECORDED.to_owned());
        assert_eq!(
            held(&s1),
            [(
                "app.bsky.graph.follow".into(),
                "3l5jv2xq4tk2p".into(),
                unknown,
                None
            )],
            "the follow, not the post; a row whose URI is not the follower's is skipped"
        );
        assert!(held(&a1).is_empty(), "in-network posts are not seeded");
        drop(store);
        // Once only: a version-2 file is not seeded again (a record deleted since stays gone).
        let store = StateStore::open(&path, [s1.clone()].into(), [a1.clone()].into()).unwrap();
        store
            .conn
            .execute("DELETE FROM repo_records WHERE did = ?1", [s1.as_str()])
            .unwrap();
        drop(store);
        let store = StateStore::open(&path, [s1.clone()].into(), [a1.clone()].into()).unwrap();
        assert!(store.held_records(&s1).unwrap().is_empty());
    }

    #[test]
    fn a_cursor_flag_applies_once_and_a_rewind_forgets_the_revs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let s1 = did("did:plc:z72i7hdynmk6r22z27h6tvur");
        let rev = Tid::parse("3l5kaaaaaaa2a").unwrap();
        let open = || StateStore::open(&path, [s1.clone()].into(), HashSet::new()).unwrap();
        let mut store = open();
        assert_eq!(
            store.apply_cursor_flag(100).unwrap(),
            Some(CursorChange::First)
        );
        store.record_rev(&s1, &rev, &verify_now());
        store.commit(Some(500)).unwrap();
        drop(store);
        // The same value again (the environment file still has it): not applied.
        let mut store = open();
        assert_eq!(store.apply_cursor_flag(100).unwrap(), None);
        assert_eq!(store.cursor(), Some(500));
        assert!(store.is_duplicate(&s1, &rev));
        // A new value is a new decision: a rewind forgets the revs at once in memory...
        assert_eq!(
            store.apply_cursor_flag(200).unwrap(),
            Some(CursorChange::Rewound { from: 500 })
        );
        assert!(!store.is_duplicate(&s1, &rev));
        // ...but durably only with a commit: a run that commits nothing changes nothing.
        drop(store);
        let mut store = open();
        assert_eq!(store.cursor(), Some(500));
        assert!(store.is_duplicate(&s1, &rev));
        assert_eq!(
            store.apply_cursor_flag(200).unwrap(),
            Some(CursorChange::Rewound { from: 500 }),
            "not recorded as applied yet"
        );
        let newer = Tid::parse("3l5kaaaaaab2a").unwrap();
        store.record_rev(&s1, &newer, &verify_now());
        store.commit(None).unwrap();
        assert_eq!(store.cursor(), Some(200), "the override is the cursor");
        drop(store);
        let mut store = open();
        assert_eq!(store.cursor(), Some(200));
        assert!(
            store.is_duplicate(&s1, &newer),
            "revs recorded after the rewind are kept"
        );
        assert_eq!(store.apply_cursor_flag(200).unwrap(), None);
        assert_eq!(
            store.apply_cursor_flag(900).unwrap(),
            Some(CursorChange::SkippedForward { from: 200 })
        );
        store.commit(Some(901)).unwrap();
        let recorded: String = store
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![META_CURSOR_OVERRIDE],
                |r| r.get(0),
            )
            .unwrap();
        let recorded: serde_json::Value = serde_json::from_str(&recorded).unwrap();
        assert_eq!(recorded["cursor"], 900);
        assert_eq!(recorded["previous"], 200);
        assert_eq!(recorded["by"], "--cursor");
        assert!(
            recorded["at"].as_str().unwrap().ends_with('Z'),
            "{recorded}"
        );
        assert_eq!(store.cursor(), Some(901));
    }

    #[test]
    fn an_account_two_study_users_follow_stays_until_both_unfollow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let s1 = did("did:plc:z72i7hdynmk6r22z27h6tvur");
        let s2 = did("did:plc:w4xbfzo7kqfes5zb7r6qv3rw");
        let a = did("did:plc:q6gjnaw2blty4crticxkmujt");
        let follow_of = |by: &Did| {
            AtUri::parse(&format!("at://{by}/app.bsky.graph.follow/3l5jw7c2bde2s")).unwrap()
        };
        let study: HashSet<Did> = [s1.clone(), s2.clone()].into();
        let open = || StateStore::open(&path, study.clone(), HashSet::new()).unwrap();
        let unfollow = |store: &mut StateStore, by: &Did| {
            store
                .apply(&StateUpdate::StudyUnfollow {
                    uri: follow_of(by),
                    follower: by.clone(),
                    seq: Seq(2),
                    time: "2024-10-02T15:00:00.000Z".into(),
                })
                .unwrap();
        };
        {
            let mut store = open();
            for by in [&s1, &s2] {
                store
                    .apply(&StateUpdate::StudyFollow {
                        uri: follow_of(by),
                        follower: by.clone(),
                        subject: a.clone(),
                    })
                    .unwrap();
            }
            // The same follow replayed (after a crash) is not a second follower.
            store
                .apply(&StateUpdate::StudyFollow {
                    uri: follow_of(&s1),
                    follower: s1.clone(),
                    subject: a.clone(),
                })
                .unwrap();
            store.commit(Some(1)).unwrap();
        }
        // The counts are rebuilt from the database on reopen.
        let mut store = open();
        unfollow(&mut store, &s1);
        assert!(
            store.is_in_network(&a),
            "still followed by the other study user"
        );
        store.commit(Some(2)).unwrap();
        drop(store);
        let mut store = open();
        assert!(store.is_in_network(&a));
        // A replayed unfollow of the same record changes nothing.
        unfollow(&mut store, &s1);
        assert!(store.is_in_network(&a));
        unfollow(&mut store, &s2);
        assert!(!store.is_in_network(&a), "nobody follows it any more");
        store.commit(Some(3)).unwrap();
        drop(store);
        assert!(!open().is_in_network(&a));
    }

    mod against_memory_state {
        //! The SQLite store and `MemoryState` (what the sync-core tests and benches route with)
        //! must route alike: the same frames through both, compared after every event.

        use super::*;
        use serde_json::json;
        use sync_core::frame::decode_frame;
        use sync_core::route::{route_event, MemoryState};
        use sync_core::synth::{self, OpSpec};

        const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
        const S2: &str = "did:plc:4llrhdclvdlmmynkwsmg5tdc";
        const A1: &str = "did:plc:w4xbfzo7kqfes5zb7r6qv3rw";
        const A2: &str = "did:plc:q6gjnaw2blty4crticxkmujt";
        const A3: &str = "did:plc:ragtjsm2j2vknwkz3zp4oxrd";
        const FOLLOW: &str = "app.bsky.graph.follow";
        const POST: &str = "app.bsky.feed.post";

        fn follow(rkey: &str, subject: &str) -> OpSpec {
            OpSpec::create(
                FOLLOW,
                rkey,
                json!({"$type": FOLLOW, "createdAt": "2024-10-02T14:25:00.000Z", "subject": subject}),
            )
        }

        fn unfollow(rkey: &str) -> OpSpec {
            OpSpec::delete(FOLLOW, rkey)
        }

        fn post(rkey: &str) -> OpSpec {
            OpSpec::create(
                POST,
                rkey,
                json!({"$type": POST, "text": "t", "createdAt": "2024-10-02T14:03:27.512Z"}),
            )
        }

        fn commit(seq: i64, repo: &str, ops: &[OpSpec]) -> Vec<u8> {
            synth::commit_frame(seq, repo, "3l5jzzzzzzz2a", "2024-10-02T14:05:10.100Z", ops)
        }

        fn dids() -> Vec<Did> {
            [S1, S2, A1, A2, A3].map(did).to_vec()
        }

        /// Routes one frame through both states, applies the updates, and returns (files,
        /// outcomes) for each, asserting they agree.
        fn step(frame: &[u8], memory: &mut MemoryState, store: &mut StateStore) -> Vec<String> {
            let event = decode_frame(frame).unwrap();
            let mem_routing = route_event(&event, memory, "2024-10-02-14:05:11");
            let db_routing = route_event(&event, store, "2024-10-02-14:05:11");
            assert_eq!(store.take_lookup_error(), None);
            let paths = |r: &sync_core::route::Routing| -> Vec<String> {
                r.files.iter().map(|f| f.path.to_string()).collect()
            };
            assert_eq!(paths(&mem_routing), paths(&db_routing), "same files");
            assert_eq!(mem_routing.updates, db_routing.updates, "same updates");
            let mem: Vec<Applied> = mem_routing
                .updates
                .iter()
                .map(|u| memory.apply(u))
                .collect();
            let db: Vec<Applied> = db_routing
                .updates
                .iter()
                .map(|u| store.apply(u).unwrap())
                .collect();
            assert_eq!(mem, db, "same outcomes");
            for d in dids() {
                assert_eq!(
                    memory.is_in_network(&d),
                    store.is_in_network(&d),
                    "in-network disagrees on {d}"
                );
            }
            for update in &db_routing.updates {
                if let StateUpdate::FollowOfStudyUser { uri, .. } = update {
                    let mut mem = memory.followee_subjects(uri.as_str()).to_vec();
                    let mut db = store.followee_subjects(uri.as_str());
                    mem.sort();
                    db.sort();
                    assert_eq!(mem, db, "followee subjects disagree on {uri}");
                }
            }
            paths(&db_routing)
        }

        /// A follow of a study user is routed to `followee` under the follower's URI; once its
        /// file is exported (gone from the cache), only the recorded subject ties the routed
        /// entry to them. A withdrawal purge drops it all the same, so the follower's unfollow
        /// is not routed about them, and the state file holds neither them nor the follow.
        #[test]
        fn a_purge_drops_follows_of_the_withdrawn_user_whose_files_are_gone() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.sqlite");
            // S2 withdraws; S1 stays.
            let study: HashSet<Did> = [did(S1), did(S2)].into();
            let mut memory = MemoryState::default();
            memory.study_users = study.clone();
            let mut store = StateStore::open(&path, study, HashSet::new()).unwrap();
            let uri = |repo: &str, rkey: &str| format!("at://{repo}/{FOLLOW}/{rkey}");
            let (a1_s2, s1_s2, s2_s1, a2_s1) = (
                uri(A1, "3l5kf1aaaaa2a"),
                uri(S1, "3l5kf2aaaaa2a"),
                uri(S2, "3l5kf3aaaaa2a"),
                uri(A2, "3l5kf4aaaaa2a"),
            );
            let frames = [
                commit(1, A1, &[follow("3l5kf1aaaaa2a", S2)]),
                commit(2, S1, &[follow("3l5kf2aaaaa2a", S2)]),
                commit(3, S2, &[follow("3l5kf3aaaaa2a", S1)]),
                commit(4, A2, &[follow("3l5kf4aaaaa2a", S1)]),
            ];
            for frame in &frames {
                let files = step(frame, &mut memory, &mut store);
                assert!(
                    files.iter().any(|f| f.contains("/follow/followee/")),
                    "{files:?}"
                );
            }
            store.commit(Some(4)).unwrap();
            assert_eq!(store.followee_subjects(&a1_s2), [did(S2)]);
            assert_eq!(store.followee_subjects(&s2_s1), [did(S1)]);
            assert_eq!(memory.followee_subjects(&a1_s2), [did(S2)]);

            // Withdrawn after the files were exported: the purge finds no file of theirs.
            assert_eq!(store.set_withdrawn([did(S2)].into()).unwrap(), [did(S2)]);
            store.record_purge(&[did(S2)]);
            store.commit(Some(5)).unwrap();
            assert!(store.purged_rows() > 0);
            for gone in [&a1_s2, &s1_s2, &s2_s1] {
                assert!(store.routed_folders(gone).is_empty(), "{gone} still routed");
                assert!(store.followee_subjects(gone).is_empty(), "{gone}");
            }
            assert_eq!(store.routed_folders(&a2_s1), [Folder::Followee]);
            assert_eq!(store.followee_subjects(&a2_s1), [did(S1)]);

            // A1's unfollow of S2 is routed nowhere; A2's of S1 still mirrors its create.
            let route = |store: &StateStore, frame: &[u8]| -> Vec<String> {
                let event = decode_frame(frame).unwrap();
                let routing = route_event(&event, store, "2024-10-02-14:05:11");
                assert_eq!(store.take_lookup_error(), None);
                routing.files.iter().map(|f| f.path.to_string()).collect()
            };
            let files = route(&store, &commit(6, A1, &[unfollow("3l5kf1aaaaa2a")]));
            assert!(files.is_empty(), "{files:?}");
            let files = route(&store, &commit(7, A2, &[unfollow("3l5kf4aaaaa2a")]));
            assert_eq!(
                files,
                [format!("study_user_activity/delete/follow/followee/author_did={A2}_follow_uri_suffix=3l5kf4aaaaa2a.json")]
            );
            drop(store);
            for (file, bytes) in crate::state::tests::sqlite_bytes(&path) {
                for needle in [S2, a1_s2.as_str(), s1_s2.as_str(), s2_s1.as_str()] {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                        "{file} still holds {needle}"
                    );
                }
            }
        }

        #[test]
        fn unfollows_agree_event_by_event() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.sqlite");
            let study: HashSet<Did> = [did(S1), did(S2)].into();
            let file_in_network: HashSet<Did> = [did(A1)].into();
            let mut memory = MemoryState::default();
            memory.study_users = study.clone();
            memory.in_network = file_in_network.clone();
            let open = || StateStore::open(&path, study.clone(), file_in_network.clone()).unwrap();
            let mut store = open();
            let frames = [
                commit(1, S1, &[follow("3l5kf1aaaaa2a", A2)]),
                commit(2, S2, &[follow("3l5kf2aaaaa2a", A2)]),
                // A1 is listed in the in-network input: a live follow and unfollow keep it.
                commit(3, S1, &[follow("3l5kf3aaaaa2a", A1)]),
                commit(4, S1, &[unfollow("3l5kf3aaaaa2a")]),
                commit(5, S1, &[unfollow("3l5kf1aaaaa2a")]),
            ];
            let later = [
                // a follow made before tracking began: unknown, nothing changes
                commit(6, S1, &[unfollow("3l4aaaaaaaa2a")]),
                commit(7, S2, &[unfollow("3l5kf2aaaaa2a")]),
                // follow and unfollow in one commit
                commit(
                    8,
                    S1,
                    &[follow("3l5kf4aaaaa2a", A3), unfollow("3l5kf4aaaaa2a")],
                ),
                // an unfollow applied once already (a rewind replays it)
                commit(9, S1, &[unfollow("3l5kf1aaaaa2a")]),
                commit(
                    10,
                    S2,
                    &[follow("3l5kf5aaaaa2a", A1), unfollow("3l5kf5aaaaa2a")],
                ),
                commit(11, S2, &[follow("3l5kf6aaaaa2a", A3)]),
            ];
            for frame in &frames {
                step(frame, &mut memory, &mut store);
                store.commit(None).unwrap();
            }
            assert!(store.is_in_network(&did(A2)) && store.is_in_network(&did(A1)));
            // The counts are rebuilt from the database.
            drop(store);
            let mut store = open();
            for frame in &later {
                step(frame, &mut memory, &mut store);
            }
            store.commit(Some(11)).unwrap();
            assert!(!store.is_in_network(&did(A2)), "both follows deleted");
            assert!(store.is_in_network(&did(A1)), "listed in the input");
            assert!(store.is_in_network(&did(A3)));
            let recorded: Vec<(String, String, i64)> = store
                .conn
                .prepare("SELECT uri, follower, seq FROM unknown_unfollows ORDER BY seq")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let uri = |rkey: &str| format!("at://{S1}/{FOLLOW}/{rkey}");
            assert_eq!(
                recorded,
                [
                    (uri("3l4aaaaaaaa2a"), S1.to_owned(), 6),
                    (uri("3l5kf1aaaaa2a"), S1.to_owned(), 9)
                ]
            );
            let memory_unknown: Vec<String> = memory
                .unknown_unfollows
                .iter()
                .map(|u| u.as_str().to_owned())
                .collect();
            assert_eq!(memory_unknown, [uri("3l4aaaaaaaa2a"), uri("3l5kf1aaaaa2a")]);
        }

        /// An in-network post's delete is routed by the post having been routed (kept across a
        /// restart), not by the author being in the network when it is deleted.
        #[test]
        fn in_network_post_deletes_follow_the_routed_index_across_restarts() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.sqlite");
            let study: HashSet<Did> = [did(S1)].into();
            let mut memory = MemoryState::default();
            memory.study_users = study.clone();
            memory.in_network = [did(A1)].into();
            {
                let mut store = StateStore::open(&path, study.clone(), [did(A1)].into()).unwrap();
                let files = step(
                    &commit(1, A1, &[post("3l5kaaaaaaa2a")]),
                    &mut memory,
                    &mut store,
                );
                assert_eq!(files.len(), 1);
                // Routed and deleted before the commit: found among the pending updates.
                let files = step(
                    &commit(2, A1, &[post("3l5kaaaaaab2a")]),
                    &mut memory,
                    &mut store,
                );
                assert_eq!(files.len(), 1);
                let files = step(
                    &commit(3, A1, &[OpSpec::delete(POST, "3l5kaaaaaab2a")]),
                    &mut memory,
                    &mut store,
                );
                assert_eq!(
                    files,
                    [format!("in_network_user_activity/delete/post/{A1}/author_did={A1}_post_uri_suffix=3l5kaaaaaab2a.json")]
                );
                store.commit(Some(3)).unwrap();
            }
            // A1 has left the in-network input, A2 joined it.
            memory.in_network = [did(A2)].into();
            let mut store = StateStore::open(&path, study, [did(A2)].into()).unwrap();
            let files = step(
                &commit(4, A1, &[OpSpec::delete(POST, "3l5kaaaaaaa2a")]),
                &mut memory,
                &mut store,
            );
            assert_eq!(
                files,
                [format!("in_network_user_activity/delete/post/{A1}/author_did={A1}_post_uri_suffix=3l5kaaaaaaa2a.json")]
            );
            // A2's post from before it joined was never routed: its delete is not either.
            let files = step(
                &commit(5, A2, &[OpSpec::delete(POST, "3l5jaaaaaaa2a")]),
                &mut memory,
                &mut store,
            );
            assert!(files.is_empty(), "{files:?}");
            // Another A1 post that was never routed, and a like delete by A1: nothing.
            let files = step(
                &commit(
                    6,
                    A1,
                    &[
                        OpSpec::delete(POST, "3l5kzzzzzzz2z"),
                        OpSpec::delete("app.bsky.feed.like", "3l5kaaaaaaa2a"),
                    ],
                ),
                &mut memory,
                &mut store,
            );
            assert!(files.is_empty(), "{files:?}");
        }
    }
}
