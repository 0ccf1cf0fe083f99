//! The state side of consent withdrawal: which DIDs are withdrawn (the `--withdrawn` file, and
//! study users whose account deletion counted as a withdrawal), the tracked sets without them,
//! and the purge of every index row for them, written in the commit transaction with the cursor.
//! Rows about them that do not name them (a follow of them routed to `followee` is keyed by the
//! follower's URI) are found through what the state recorded with them (`followee_subjects`).
//!
//! The state never holds a withdrawn DID: an applied purge is recorded in `withdrawn` as a
//! salted hash (the salt is random per state file, in `meta`), so a restart knows it is done and
//! does not walk the cache again. A withdrawal by account deletion (`--account-deleted-is-
//! withdrawal`) is only that hash too: at every (re)load each study user's hash is looked up, so
//! it stays withdrawn while the study-user file lists it; a file withdrawal whose DID leaves the
//! file is forgotten (a later one purges again).
//!
//! Erasure is physical: the connection runs with `secure_delete` (freed bytes are zeroed), a
//! state file that existed before that was on is vacuumed once at its first purge, and after
//! each purge the WAL is checkpointed and truncated, so no older copy of their pages survives
//! in `-wal`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use sync_core::ids::{AtUri, Did, RecordKey};
use sync_core::paths::{rkey_component, Folder};
use tracing::{info, warn};

use super::StateStore;
use crate::withdrawn::{
    record_hash, salted_hash, CacheTargets, Matcher, PurgedRecords, RecordHash, Withdrawn,
};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS withdrawn (hash TEXT PRIMARY KEY, source TEXT NOT NULL, applied_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS withdrawn_records (hash BLOB PRIMARY KEY) WITHOUT ROWID;
";

/// `meta` key of the salt withdrawal hashes are made with (hex).
const META_SALT: &str = "withdrawn_salt";
/// `meta` key present once every delete in the file has zeroed its bytes: set when the file is
/// created by a writer with `secure_delete`, or after the VACUUM of the first purge.
const META_SECURE_DELETE: &str = "secure_delete_since";

/// Why a DID is withdrawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawalSource {
    /// Listed in `--withdrawn`.
    File,
    /// A study user's `#account` event said `deleted` (`--account-deleted-is-withdrawal`).
    AccountDeleted,
}

impl WithdrawalSource {
    fn label(self) -> &'static str {
        match self {
            WithdrawalSource::File => "file",
            WithdrawalSource::AccountDeleted => "account_deleted",
        }
    }

    fn parse(s: &str) -> WithdrawalSource {
        match s {
            "account_deleted" => WithdrawalSource::AccountDeleted,
            _ => WithdrawalSource::File,
        }
    }
}

/// Withdrawal state held in memory.
#[derive(Default)]
pub(super) struct WithdrawnState {
    loaded: bool,
    salt: Vec<u8>,
    /// Every DID withdrawn now (file and account deletions): routing never sees them.
    set: Withdrawn,
    /// Records about withdrawn participants that purges took out of the index
    /// (`withdrawn_records`): their deletes are not routed.
    records: Arc<PurgedRecords>,
    file: HashSet<Did>,
    /// Study users withdrawn by an account deletion (this run, or found by hash at a load).
    account_deleted: HashSet<Did>,
    /// Recorded withdrawals (purge applied): salted hash -> source.
    applied: HashMap<String, WithdrawalSource>,
    /// DIDs both listed as study users and withdrawn that were logged already.
    logged: HashSet<Did>,
    /// Index rows removed by the last purge commit (the processor reports them).
    pub(super) purged_rows: u64,
    /// A checkpoint after a purge could not truncate the WAL yet (a reader held it): retried
    /// after every commit until it does.
    checkpoint_owed: bool,
    /// Likewise for the one-time VACUUM of a file older than `secure_delete`.
    vacuum_owed: bool,
}

/// Withdrawal changes waiting for the next commit.
#[derive(Default)]
pub(super) struct PendingWithdrawn {
    purges: Vec<(Did, String, WithdrawalSource)>,
    /// `uri`s of removed cache files (reactions to them, follows of them): their index rows go.
    uris: HashSet<String>,
    /// Hashes of file withdrawals no longer listed.
    revoked: Vec<String>,
    /// DIDs whose document a fetch that was under way may have cached after their purge.
    identities: Vec<Did>,
    /// URIs of study users' records about them screened since the purge (their deletes are
    /// screened once these are committed as hashes).
    records_about: Vec<String>,
}

impl PendingWithdrawn {
    pub(super) fn purges(&self) -> bool {
        !self.purges.is_empty()
    }
}

/// Called when the state file is opened: deletes zero their bytes from now on; a new file never
/// held unzeroed deleted bytes. What a purge owes after its commit (the one-time VACUUM of a file
/// older than `secure_delete`, the WAL truncation) is only remembered in memory, so a writer
/// killed between the purge's commit and those steps does them here, before anything else runs:
/// the VACUUM when a purge is recorded and the file was never zeroed, the truncation always
/// (the WAL of a killed writer may still hold pages from before the purge).
pub(super) fn on_open(conn: &Connection, new_file: bool) -> Result<()> {
    conn.pragma_update(None, "secure_delete", "ON")
        .context("turning on secure_delete")?;
    if new_file {
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            params![META_SECURE_DELETE],
        )?;
        return Ok(());
    }
    let purged = conn.prepare("SELECT 1 FROM withdrawn")?.exists([])?;
    if purged {
        vacuum_if_old(conn)?;
        let (busy, log, done): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        if busy != 0 {
            warn!(log, done, "the WAL could not be truncated at start (another process holds the state open): retried after the next purge");
        }
    }
    Ok(())
}

/// A file that existed before `secure_delete` was on may hold deleted bytes of theirs in free
/// space: rewritten once, after its first purge (or at the start after a purge whose VACUUM a
/// crash prevented).
fn vacuum_if_old(conn: &Connection) -> Result<()> {
    let zeroed: bool = conn
        .prepare("SELECT 1 FROM meta WHERE key = ?1")?
        .exists(params![META_SECURE_DELETE])?;
    if zeroed {
        return Ok(());
    }
    info!("a withdrawal purge on a state file older than secure_delete: VACUUM (once) so no deleted bytes survive");
    conn.execute_batch("VACUUM")
        .context("vacuuming the state after a withdrawal purge")?;
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        params![META_SECURE_DELETE],
    )?;
    Ok(())
}

fn random_salt() -> Result<Vec<u8>> {
    let mut salt = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .context("reading a random salt from /dev/urandom")?;
    Ok(salt)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `[at://<did>/, at://<did>0)`: every URI in `did`'s repo, as a range (no LIKE: a did:web may
/// hold `%` or `_`).
fn repo_range(did: &Did) -> (String, String) {
    (format!("at://{did}/"), format!("at://{did}0"))
}

/// The four reaction folders nested by the record key of one of their posts.
fn reaction_dirs(rkey: RecordKey) -> [String; 4] {
    [
        Folder::ReplyToUserPost(rkey.clone()).dir(),
        Folder::LikeOnUserPost(rkey.clone()).dir(),
        Folder::RepostOfUserPost(rkey.clone()).dir(),
        Folder::QuoteOfUserPost(rkey).dir(),
    ]
}

/// The reaction folders of these posts as a JSON array (for `json_each`); `None` if there are
/// none. One pass over `routed` (keyed by uri first: a lookup by folder is a scan), not one per
/// folder: a participant with thousands of posts must not hold the stream for thousands of
/// scans.
fn reaction_dirs_json(posts: &[String]) -> Option<String> {
    let dirs: Vec<String> = posts
        .iter()
        .filter_map(|u| post_rkey(u))
        .flat_map(reaction_dirs)
        .collect();
    (!dirs.is_empty()).then(|| serde_json::to_string(&dirs).expect("strings serialize"))
}

/// The URIs routed into the folders of `dirs_json` ([`reaction_dirs_json`]).
fn routed_in(conn: &Connection, dirs_json: &str) -> Result<Vec<String>> {
    Ok(conn
        .prepare_cached("SELECT uri FROM routed WHERE folder IN (SELECT value FROM json_each(?1))")?
        .query_map(params![dirs_json], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

fn post_rkey(uri: &str) -> Option<RecordKey> {
    let uri = AtUri::parse(uri).ok()?;
    (uri.collection() == Some(sync_core::records::POST))
        .then(|| RecordKey::parse(uri.rkey()?).ok())
        .flatten()
}

/// Writes the pending withdrawal changes inside the commit's transaction, after every other
/// pending change (so rows of theirs queued in this same commit go too). Returns the number of
/// index rows removed and the hashes of the records about them it took out of the index.
pub(super) fn write_pending(
    state: &WithdrawnState,
    pending: &PendingWithdrawn,
    tx: &Transaction<'_>,
) -> Result<(u64, Vec<RecordHash>)> {
    // Records of others about them (follows of them, reactions to their posts) leave the
    // index here; their deletes must not be routed later (a delete names only its author).
    let mut about_them: HashSet<String> = HashSet::new();
    let identity_cache: bool = tx
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'identity_cache'")?
        .exists([])?;
    let mut rows = 0u64;
    let mut run = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<()> {
        rows += tx
            .prepare_cached(sql)?
            .execute(p)
            .with_context(|| format!("purging a withdrawn DID: {sql}"))? as u64;
        Ok(())
    };
    for did in &pending.identities {
        if identity_cache {
            run(
                "DELETE FROM identity_cache WHERE did = ?1",
                &[&did.as_str()],
            )?;
        }
    }
    for (did, hash, source) in &pending.purges {
        let d = did.as_str();
        let (from, to) = repo_range(did);
        // Reactions to their posts are routed by the post's record key (the folder).
        let posts: Vec<String> = tx
            .prepare_cached(
                "SELECT uri FROM study_posts WHERE author = ?1 OR (uri >= ?2 AND uri < ?3)",
            )?
            .query_map(params![d, from, to], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        // Reactions to their posts, by folder (one pass: `reaction_dirs_json`).
        if let Some(dirs) = reaction_dirs_json(&posts) {
            about_them.extend(routed_in(tx, &dirs)?);
            run(
                "DELETE FROM routed WHERE folder IN (SELECT value FROM json_each(?1))",
                &[&dirs],
            )?;
        }
        run(
            "DELETE FROM study_posts WHERE author = ?1 OR (uri >= ?2 AND uri < ?3)",
            &[&d, &from, &to],
        )?;
        run(
            "DELETE FROM routed WHERE uri >= ?1 AND uri < ?2",
            &[&from, &to],
        )?;
        // Follows of them routed to `followee`: the routed entry's URI names only the follower;
        // the subject row names them, whether or not the follow's cache file is still there
        // (rows written before subjects were recorded have none: they go only with their file,
        // below; a URI whose record was deleted and created again following someone else loses
        // its entry too, erring on their side). Then the subject rows of follows of them and of
        // their own follows.
        for sql in [
            "SELECT uri FROM followee_subjects WHERE subject = ?1",
            "SELECT uri FROM study_follows WHERE subject = ?1",
        ] {
            let follows: Vec<String> = tx
                .prepare_cached(sql)?
                .query_map(params![d], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            about_them.extend(follows);
        }
        run(
            "DELETE FROM routed WHERE folder = ?1 AND uri IN \
             (SELECT uri FROM followee_subjects WHERE subject = ?2)",
            &[&Folder::Followee.dir(), &d],
        )?;
        run(
            "DELETE FROM followee_subjects WHERE subject = ?1 OR (uri >= ?2 AND uri < ?3)",
            &[&d, &from, &to],
        )?;
        run(
            "DELETE FROM in_network_posts WHERE uri >= ?1 AND uri < ?2",
            &[&from, &to],
        )?;
        run("DELETE FROM in_network_post_authors WHERE did = ?1", &[&d])?;
        // Their follows (the accounts only they followed leave the network: the in-network
        // set is recomputed after the commit) and the follows of them.
        run(
            "DELETE FROM study_follows WHERE follower = ?1 OR subject = ?1",
            &[&d],
        )?;
        run(
            "DELETE FROM unknown_unfollows WHERE follower = ?1 OR (uri >= ?2 AND uri < ?3)",
            &[&d, &from, &to],
        )?;
        for table in ["repo_revs", "repo_records", "repo_work", "backfilled"] {
            run(&format!("DELETE FROM {table} WHERE did = ?1"), &[&d])?;
        }
        if identity_cache {
            run("DELETE FROM identity_cache WHERE did = ?1", &[&d])?;
        }
        tx.prepare_cached(
            "INSERT OR REPLACE INTO withdrawn (hash, source, applied_at) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![hash, source.label(), super::repair::unix_now()])?;
    }
    // Records of others about them (a follow of them routed to `followee`, a reaction whose
    // file named them): their own index rows would only route deletes about them. Committed
    // ahead of the purge itself (`forget_records_of_files`).
    for uri in &pending.uris {
        run("DELETE FROM routed WHERE uri = ?1", &[uri])?;
        run("DELETE FROM followee_subjects WHERE uri = ?1", &[uri])?;
        run("DELETE FROM in_network_posts WHERE uri = ?1", &[uri])?;
    }
    about_them.extend(pending.uris.iter().cloned());
    for hash in &pending.revoked {
        tx.prepare_cached("DELETE FROM withdrawn WHERE hash = ?1 AND source = 'file'")?
            .execute(params![hash])?;
    }
    about_them.extend(pending.records_about.iter().cloned());
    // Their own records need no entry: every event of theirs is screened by its repo.
    let theirs: Vec<(String, String)> = pending
        .purges
        .iter()
        .map(|(d, _, _)| repo_range(d))
        .collect();
    let mut hashes = Vec::new();
    let mut insert =
        tx.prepare_cached("INSERT OR IGNORE INTO withdrawn_records (hash) VALUES (?1)")?;
    for uri in &about_them {
        if theirs.iter().any(|(from, to)| uri >= from && uri < to) {
            continue;
        }
        // A profile is updated in place under one URI for ever: a hash would drop every
        // later delete of a study user's profile that once named them.
        if uri.contains("/app.bsky.actor.profile/") {
            continue;
        }
        let hash = record_hash(&state.salt, uri);
        insert.execute(params![&hash[..]])?;
        hashes.push(hash);
    }
    Ok((rows, hashes))
}

impl StateStore {
    fn load_withdrawn(&mut self) -> Result<()> {
        if self.withdrawn.loaded {
            return Ok(());
        }
        let stored: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![META_SALT],
                |r| r.get(0),
            )
            .optional()?;
        let salt = match stored.as_deref().and_then(unhex) {
            Some(salt) if !salt.is_empty() => salt,
            _ => {
                let salt = random_salt()?;
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                    params![META_SALT, hex(&salt)],
                )?;
                salt
            }
        };
        let applied: HashMap<String, WithdrawalSource> = self
            .conn
            .prepare("SELECT hash, source FROM withdrawn")?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .map(|row| row.map(|(h, s)| (h, WithdrawalSource::parse(&s))))
            .collect::<Result<_, _>>()?;
        let hashes: HashSet<RecordHash> = self
            .conn
            .prepare("SELECT hash FROM withdrawn_records")?
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .filter_map(|h| h.ok().and_then(|h| RecordHash::try_from(h.as_slice()).ok()))
            .collect();
        self.withdrawn.records = Arc::new(PurgedRecords {
            salt: salt.clone(),
            hashes,
        });
        self.withdrawn.salt = salt;
        self.withdrawn.applied = applied;
        self.withdrawn.loaded = true;
        Ok(())
    }

    fn withdrawal_hash(&self, did: &Did) -> String {
        salted_hash(&self.withdrawn.salt, did)
    }

    /// Sets the `--withdrawn` list (start, SIGHUP). Routing stops seeing those DIDs at once;
    /// returns the ones whose purge was never applied (the processor purges them). A file
    /// withdrawal no longer listed is forgotten with the next commit.
    pub fn set_withdrawn(&mut self, file: HashSet<Did>) -> Result<Vec<Did>> {
        self.load_withdrawn()?;
        let listed: HashSet<String> = file.iter().map(|d| self.withdrawal_hash(d)).collect();
        let revoked: Vec<String> = self
            .withdrawn
            .applied
            .iter()
            .filter(|(h, s)| **s == WithdrawalSource::File && !listed.contains(*h))
            .map(|(h, _)| h.clone())
            .collect();
        if !revoked.is_empty() {
            warn!(
                count = revoked.len(),
                "withdrawals recorded earlier are no longer in the withdrawn file: those DIDs are routed again if tracked (a later listing purges them again)"
            );
        }
        for hash in revoked {
            self.withdrawn.applied.remove(&hash);
            self.pending.withdrawn.revoked.push(hash);
        }
        self.withdrawn.file = file;
        self.apply_withdrawn_sets();
        Ok(self.withdrawals_to_purge())
    }

    /// A study user's account was deleted and that counts as a withdrawal: withdrawn at once;
    /// returns it when its purge is still to be applied.
    pub fn withdraw_account(&mut self, did: &Did) -> Result<Vec<Did>> {
        self.load_withdrawn()?;
        self.withdrawn.account_deleted.insert(did.clone());
        self.apply_withdrawn_sets();
        Ok(self
            .withdrawals_to_purge()
            .into_iter()
            .filter(|d| d == did)
            .collect())
    }

    /// Account deletions taken as withdrawals (this run's, and earlier ones found again by hash
    /// among the study users) that the `--withdrawn` file, as last read, does not list.
    pub fn account_deletions_not_listed(&self) -> Vec<Did> {
        self.withdrawn
            .account_deleted
            .iter()
            .filter(|d| !self.withdrawn.file.contains(*d))
            .cloned()
            .collect()
    }

    /// A new study-user file (SIGHUP): an account deletion recorded earlier holds while the
    /// file lists the DID (README), so one the operator took out is no longer withdrawn on
    /// that ground (nor written back to the withdrawn list); one whose purge is still to be
    /// recorded stays.
    pub(super) fn forget_account_deletions_not_in(&mut self, study_users: &crate::tracked::DidSet) {
        let applied = &self.withdrawn.applied;
        let salt = &self.withdrawn.salt;
        self.withdrawn
            .account_deleted
            .retain(|d| study_users.contains(d) || !applied.contains_key(&salted_hash(salt, d)));
    }

    /// Withdrawn DIDs whose purge is not recorded (nor pending).
    fn withdrawals_to_purge(&self) -> Vec<Did> {
        self.withdrawn
            .set
            .iter()
            .filter(|d| {
                let hash = self.withdrawal_hash(d);
                !self.withdrawn.applied.contains_key(&hash)
                    && !self
                        .pending
                        .withdrawn
                        .purges
                        .iter()
                        .any(|(_, h, _)| *h == hash)
            })
            .cloned()
            .collect()
    }

    /// Recomputes the withdrawn set and takes it out of everything routing and repairs read:
    /// the tracked sets, the followed accounts, the repair queue.
    pub(super) fn apply_withdrawn_sets(&mut self) {
        if !self.withdrawn.loaded {
            return;
        }
        // Account deletions recorded earlier: found again by hash among the study users.
        let by_account: HashSet<&String> = self
            .withdrawn
            .applied
            .iter()
            .filter(|(_, s)| **s == WithdrawalSource::AccountDeleted)
            .map(|(h, _)| h)
            .collect();
        if !by_account.is_empty() {
            let found: Vec<Did> = self
                .study_users
                .iter()
                .filter(|d| by_account.contains(&self.withdrawal_hash(d)))
                .collect();
            self.withdrawn.account_deleted.extend(found);
        }
        let all: HashSet<Did> = self
            .withdrawn
            .file
            .iter()
            .chain(&self.withdrawn.account_deleted)
            .cloned()
            .collect();
        self.withdrawn.set = Withdrawn::new(all).with_records(self.withdrawn.records.clone());
        let set = &self.withdrawn.set;
        if set.is_empty() {
            return;
        }
        let in_study: Vec<Did> = set
            .iter()
            .filter(|d| self.study_users.contains(d))
            .cloned()
            .collect();
        let newly = in_study
            .iter()
            .filter(|did| self.withdrawn.logged.insert((*did).clone()))
            .count();
        if newly > 0 {
            // Counted, not named: the log outlives the purge.
            info!(
                study_users = newly,
                "study users listed as withdrawn are treated as withdrawn, never routed"
            );
        }
        if !in_study.is_empty() {
            self.study_users = std::sync::Arc::new(
                self.study_users
                    .iter()
                    .filter(|d| !set.contains(d))
                    .collect(),
            );
        }
        if set.iter().any(|d| self.file_in_network.contains(d)) {
            self.file_in_network = std::sync::Arc::new(
                self.file_in_network
                    .iter()
                    .filter(|d| !set.contains(d))
                    .collect(),
            );
        }
        self.followed.retain(|d, _| !set.contains(d));
        let queued: Vec<Did> = self
            .work
            .keys()
            .filter(|d| set.contains(d))
            .cloned()
            .collect();
        for did in queued {
            // Never backfilled nor resynced again; the rows go with the purge (or now, for a
            // withdrawal applied earlier whose DID a resync queued meanwhile).
            self.work.remove(&did);
            self.pending
                .work
                .insert(did.clone(), super::repair::WorkChange::Remove);
        }
        self.backfilled.retain(|d| !set.contains(d));
        self.sync_membership();
    }

    /// A study user's records the screen dropped because they name a withdrawn participant:
    /// their deletes are screened too, once committed (salted hashes, `withdrawn_records`).
    pub fn remember_records_about_withdrawn(&mut self, uris: &[String]) {
        self.pending
            .withdrawn
            .records_about
            .extend(uris.iter().cloned());
    }

    pub fn is_withdrawn(&self, did: &Did) -> bool {
        self.withdrawn.set.contains(did)
    }

    /// The withdrawn DIDs in effect (what the processor screens events with).
    pub fn withdrawn(&self) -> &Withdrawn {
        &self.withdrawn.set
    }

    /// What identifies the cache files of `dids` (and of every other withdrawn DID, in case an
    /// older writer wrote some): their DIDs, the URIs of their study posts that do not name the
    /// DID, and the folder names of those posts' record keys.
    pub fn cache_targets(&self, dids: &[Did]) -> Result<CacheTargets> {
        let mut uris: Vec<String> = Vec::new();
        for did in dids {
            let (from, to) = repo_range(did);
            let rows: Vec<String> = self
                .conn
                .prepare_cached(
                    "SELECT uri FROM study_posts WHERE author = ?1 OR (uri >= ?2 AND uri < ?3)",
                )?
                .query_map(params![did.as_str(), from, to], |r| r.get(0))?
                .collect::<Result<_, _>>()
                .context("reading a withdrawn participant's study posts")?;
            uris.extend(rows);
            uris.extend(
                self.pending
                    .study_posts
                    .iter()
                    .filter(|(_, author)| *author == did)
                    .map(|(u, _)| u.clone()),
            );
        }
        let post_rkey_folders = uris
            .iter()
            .filter_map(|u| post_rkey(u))
            .map(|rkey| rkey_component(&rkey).into_owned())
            .collect();
        // Records of others about them whose delete files name only their author (a study
        // user's unfollow of them or delete of a like of their post, written before the
        // withdrawal): found by the record's URI in the file.
        let mut about: Vec<String> = Vec::new();
        for did in dids {
            // (`study_follows` would not help: an unfollow deletes its row.)
            let rows: Vec<String> = self
                .conn
                .prepare_cached("SELECT uri FROM followee_subjects WHERE subject = ?1")?
                .query_map(params![did.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()
                .context("reading the follows of a withdrawn participant")?;
            about.extend(rows);
        }
        if let Some(dirs) = reaction_dirs_json(&uris) {
            let rows = routed_in(&self.conn, &dirs)
                .context("reading the reactions to a withdrawn participant's posts")?;
            // Only likes and reposts: no other record's content names them (a reply or a
            // quote may be named by a quote of it, a study user's own post that stays).
            about.extend(rows.into_iter().filter(|u| {
                u.contains("/app.bsky.feed.like/") || u.contains("/app.bsky.feed.repost/")
            }));
        }
        let handle_uris: Vec<&String> = uris
            .iter()
            .filter(|u| !dids.iter().any(|d| u.contains(d.as_str())))
            .collect();
        let matcher = Matcher::new(
            self.withdrawn
                .set
                .iter()
                .map(Did::as_str)
                .chain(dids.iter().map(Did::as_str))
                .chain(handle_uris.iter().map(|u| u.as_str())),
        );
        Ok(CacheTargets {
            matcher,
            post_rkey_folders,
            record_uris: about.into_iter().collect(),
        })
    }

    /// Queues, for the next commit, the index rows of the records the cache files of `dids`
    /// name (reactions to them, follows of them: some are known only from those files) and
    /// their salted hashes, so their later deletes are not routed. Committed before the files
    /// are removed; their own records need no entry (every event of theirs is screened).
    pub fn forget_records_of_files(&mut self, dids: &[Did], uris: &HashSet<String>) {
        let theirs: Vec<(String, String)> = dids.iter().map(repo_range).collect();
        self.pending.withdrawn.uris.extend(
            uris.iter()
                .filter(|uri| {
                    !theirs.iter().any(|(from, to)| {
                        uri.as_str() >= from.as_str() && uri.as_str() < to.as_str()
                    })
                })
                .cloned(),
        );
    }

    /// Queues the purge of every index row of `dids` for the next commit (call it once their
    /// cache files are durably gone).
    pub fn record_purge(&mut self, dids: &[Did]) {
        for did in dids {
            let hash = self.withdrawal_hash(did);
            let source = if self.withdrawn.file.contains(did) {
                WithdrawalSource::File
            } else {
                WithdrawalSource::AccountDeleted
            };
            self.pending
                .withdrawn
                .purges
                .push((did.clone(), hash, source));
        }
    }

    /// A fetch of a withdrawn DID that was under way when it was withdrawn came back: its
    /// identity lookup may have cached their document since the purge.
    pub fn forget_identity(&mut self, did: &Did) {
        self.pending.withdrawn.identities.push(did.clone());
    }

    /// Index rows removed by the last commit's purges.
    pub fn purged_rows(&self) -> u64 {
        self.withdrawn.purged_rows
    }

    /// After a commit that purged: recorded in memory, the in-network set recomputed from the
    /// remaining follows, and no copy of the old pages left (VACUUM once for a file older than
    /// `secure_delete`, then a WAL checkpoint that truncates it). The transaction is committed
    /// already, so what fails here is logged and tried again after the next commit.
    pub(super) fn after_commit(
        &mut self,
        purged: &PendingWithdrawn,
        rows: u64,
        records: Vec<RecordHash>,
    ) {
        if !records.is_empty() {
            let mut all = (*self.withdrawn.records).clone();
            all.hashes.extend(records);
            self.withdrawn.records = Arc::new(all);
            let set = std::mem::take(&mut self.withdrawn.set);
            self.withdrawn.set = set.with_records(self.withdrawn.records.clone());
        }
        if purged.purges() {
            self.withdrawn.purged_rows = rows;
            for (_, hash, source) in &purged.purges {
                self.withdrawn.applied.insert(hash.clone(), *source);
            }
            match self.followed_from_db() {
                Ok(followed) => {
                    self.followed = followed;
                    self.sync_membership();
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "recomputing the in-network set after a withdrawal purge failed: accounts only the withdrawn participant followed stay in-network until the next start")
                }
            }
            self.apply_withdrawn_sets();
            self.withdrawn.vacuum_owed = true;
            self.withdrawn.checkpoint_owed = true;
        }
        if self.withdrawn.vacuum_owed {
            match vacuum_if_old(&self.conn) {
                Ok(()) => self.withdrawn.vacuum_owed = false,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "VACUUM after a withdrawal purge failed: retried after the next commit")
                }
            }
        }
        if self.withdrawn.checkpoint_owed {
            let checkpoint = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                });
            match checkpoint {
                Ok((0, _, _)) => self.withdrawn.checkpoint_owed = false,
                Ok((_, log, done)) => {
                    warn!(log, done, "the WAL could not be truncated after a withdrawal purge (a reader holds it): retried after the next commit")
                }
                Err(e) => {
                    warn!(error = %e, "the WAL checkpoint after a withdrawal purge failed: retried after the next commit")
                }
            }
        }
    }

    fn followed_from_db(&self) -> Result<HashMap<Did, u32>> {
        let mut followed: HashMap<Did, u32> = HashMap::new();
        let mut stmt = self.conn.prepare("SELECT subject FROM study_follows")?;
        for subject in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(did) = Did::parse(&subject?) {
                *followed.entry(did).or_default() += 1;
            }
        }
        Ok(followed)
    }
}
