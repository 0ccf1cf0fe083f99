//! Routing: one decoded event in, the cache files it produces and the index updates it implies out.
//!
//! Pure: the tracked sets and indexes are read through [`RoutingState`]; changes to them are
//! returned as [`StateUpdate`]s for the caller to apply (and persist) before the next event.
//! Rules: `predecessor-data-format.md` §3.4 with the study-era reply rule, plus DESIGN.md §5.

use std::collections::HashMap;
use std::collections::HashSet;

use crate::frame::{AccountEvent, Action, Commit, Event, IdentityEvent, RepoOp};
use crate::ids::{AtUri, Did, RecordKey, Seq};
use crate::paths::{self, AccountEventKey, CachePath, Folder};
use crate::pyjson::PyJsonWriter;
use crate::records::{self, PostRefs, PostView, RecordKind, SubjectDidView, SubjectRefView};
use crate::transform;

/// What routing reads: who is tracked and what was routed before.
pub trait RoutingState {
    fn is_study_user(&self, did: &Did) -> bool;
    /// In the in-network input (the social-network table or a DID list), or the subject of a
    /// study user's follow seen in the stream and not deleted since.
    fn is_in_network(&self, did: &Did) -> bool;
    /// The study user who authored the post `uri` (exact at-URI match, as the predecessor).
    fn study_post_author(&self, uri: &str) -> Option<Did>;
    /// Folders other than the author's own that the record `uri` was routed to earlier
    /// (reactions to study posts, follows of study users, in-network posts), so its delete goes
    /// where its create went, whatever the tracked sets say by the time it is deleted.
    fn routed_folders(&self, uri: &str) -> Vec<Folder>;
}

/// A change routing asks the state store to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateUpdate {
    /// A study user's post: later likes, replies, reposts and quotes of it are routed.
    StudyPost { uri: AtUri, author: Did },
    /// `uri` was routed to a reaction folder: its delete goes to the matching delete folder.
    Routed { uri: AtUri, folder: Folder },
    /// The follow `uri` of the study user `subject` (routed to `followee`, with its
    /// [`StateUpdate::Routed`]): the routed entry's URI names only the follower, so the state
    /// keeps whom it is about, for a consent withdrawal of `subject` to drop both entries.
    FollowOfStudyUser { uri: AtUri, subject: Did },
    /// A study user followed `subject`: it joins the in-network set.
    StudyFollow {
        uri: AtUri,
        follower: Did,
        subject: Did,
    },
    /// A study user deleted the follow `uri`: its subject leaves the in-network set unless another
    /// study user still follows it (or the in-network input lists it). A follow the state never
    /// saw (made before tracking began) has no known subject: see [`Applied::UnknownUnfollow`].
    StudyUnfollow {
        uri: AtUri,
        follower: Did,
        /// Of the commit that deleted the follow, for the record of unknown unfollows.
        seq: Seq,
        time: String,
    },
}

/// What applying a [`StateUpdate`] found that the caller must report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// A [`StateUpdate::StudyUnfollow`] of a follow record the state never saw: made before
    /// tracking began (the in-network input does not carry follow record keys), or replayed
    /// after its unfollow was already applied. Its subject is unknown, so nothing leaves the
    /// in-network set; the state records the unfollow for the operator, and the writer counts
    /// and logs it. (With backfill on, a study user's follows are indexed from their repo.)
    UnknownUnfollow,
}

/// One file to write: a cache-relative path and its whole contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFile {
    pub path: CachePath,
    pub folder: &'static str,
    pub contents: String,
}

/// An op that routing had to drop, with a stable reason label for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub op_index: Option<usize>,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routing {
    pub files: Vec<CacheFile>,
    pub updates: Vec<StateUpdate>,
    pub dropped: Vec<Dropped>,
}

/// Routes one event. `synctimestamp` is the transform clock (`%Y-%m-%d-%H:%M:%S`, UTC).
pub fn route_event(event: &Event<'_>, state: &dyn RoutingState, synctimestamp: &str) -> Routing {
    let mut out = Routing::default();
    match event {
        Event::Commit(commit) => route_commit(commit, state, synctimestamp, &mut out),
        Event::Identity(identity) => route_identity(identity, state, &mut out),
        Event::Account(account) => route_account(account, state, &mut out),
        Event::Sync(_) | Event::Info(_) | Event::Error(_) | Event::Skipped { .. } => {}
    }
    out
}

/// Study posts created earlier in the same commit, visible to the commit's later ops.
struct Overlay<'s> {
    state: &'s dyn RoutingState,
    new_posts: Vec<(String, Did)>,
}

impl Overlay<'_> {
    /// The study user who authored the post `uri`: a post URI names its author, so a post of a
    /// study user is recognised at any age with no index (a like on a months-old post is routed);
    /// the index still answers for URIs that name their author by handle, and for posts of users
    /// who have since left the study set, as the predecessor did.
    fn study_post_author(&self, uri: &str) -> Option<Did> {
        if let Some(author) = study_post_uri_author(self.state, uri) {
            return Some(author);
        }
        self.new_posts
            .iter()
            .find(|(u, _)| u == uri)
            .map(|(_, d)| d.clone())
            .or_else(|| self.state.study_post_author(uri))
    }
}

/// `Some(author)` when `uri` is `at://<did>/app.bsky.feed.post/<rkey>` (valid rkey) and the DID
/// is a study user.
fn study_post_uri_author(state: &dyn RoutingState, uri: &str) -> Option<Did> {
    let parsed = AtUri::parse(uri).ok()?;
    if parsed.collection() != Some(records::POST) {
        return None;
    }
    RecordKey::parse(parsed.rkey()?).ok()?;
    let author = parsed.authority_did()?;
    state.is_study_user(&author).then_some(author)
}

/// The rkey of a study post's at-URI, used as a nesting folder.
fn post_rkey(uri: &str) -> Option<RecordKey> {
    let parsed = AtUri::parse(uri).ok()?;
    RecordKey::parse(parsed.rkey()?).ok()
}

fn drop_op(out: &mut Routing, index: usize, reason: &'static str, detail: impl Into<String>) {
    out.dropped.push(Dropped {
        op_index: Some(index),
        reason,
        detail: detail.into(),
    });
}

fn push_file(out: &mut Routing, index: usize, folder: &Folder, file: String, contents: &str) {
    match folder.path(file) {
        Ok(path) => out.files.push(CacheFile {
            path,
            folder: folder.label(),
            contents: contents.to_owned(),
        }),
        Err(e) => drop_op(out, index, e.reason(), e.to_string()),
    }
}

fn route_commit(commit: &Commit<'_>, state: &dyn RoutingState, clock: &str, out: &mut Routing) {
    let mut overlay = Overlay {
        state,
        new_posts: Vec::new(),
    };
    let author_is_study = state.is_study_user(&commit.repo);
    let author_in_network = state.is_in_network(&commit.repo);
    for (index, op) in commit.ops.iter().enumerate() {
        let op = match op {
            Ok(op) => op,
            Err(e) => {
                drop_op(out, index, e.reason(), e.to_string());
                continue;
            }
        };
        let Some(kind) = RecordKind::of(&op.collection) else {
            continue;
        };
        let ctx = OpCtx {
            commit,
            op,
            kind,
            index,
            author_is_study,
            author_in_network,
            clock,
        };
        let result = match op.action {
            Action::Create => ctx.route_create(&mut overlay, out),
            Action::Update if kind == RecordKind::Profile && author_is_study => {
                ctx.route_create(&mut overlay, out)
            }
            Action::Update => Ok(()),
            Action::Delete => {
                ctx.route_delete(state, out);
                Ok(())
            }
        };
        if let Err((reason, detail)) = result {
            drop_op(out, index, reason, detail);
        }
    }
}

type OpResult = Result<(), (&'static str, String)>;

struct OpCtx<'c, 'a> {
    commit: &'c Commit<'a>,
    op: &'c RepoOp,
    kind: RecordKind,
    index: usize,
    author_is_study: bool,
    author_in_network: bool,
    clock: &'c str,
}

impl<'a> OpCtx<'_, 'a> {
    fn uri(&self) -> AtUri {
        AtUri::from_parts(&self.commit.repo, &self.op.collection, &self.op.rkey)
    }

    /// The op's record block. A record the repo's resync compares (every routed kind of a study
    /// user, an in-network account's posts) is hash-checked at once: a bad one is a record we
    /// should have had, and its `cid_mismatch` queues the repo's resync under `--verify off`.
    /// Any other is checked only once something is derived from it ([`OpCtx::keep`]): most
    /// records are read for a routing decision and dropped, and hashing them all was a quarter
    /// of the processor's time (BENCHMARKS.md).
    fn block(&self) -> Result<&'a [u8], (&'static str, String)> {
        if self.author_is_study || (self.author_in_network && self.kind == RecordKind::Post) {
            return self.keep();
        }
        match self.commit.record_block_unhashed(self.op) {
            Ok(Some(block)) => Ok(block),
            Ok(None) => Err(("missing_cid", "create op without a record".into())),
            Err(e) => Err((e.reason(), e.to_string())),
        }
    }

    /// The op's record block, hash-checked: called before a file or an index entry is derived
    /// from it (each CID is hashed once per commit).
    fn keep(&self) -> Result<&'a [u8], (&'static str, String)> {
        match self.commit.record_block(self.op) {
            Ok(Some(block)) => Ok(block),
            Ok(None) => Err(("missing_cid", "create op without a record".into())),
            Err(e) => Err((e.reason(), e.to_string())),
        }
    }

    fn view<T: serde::Deserialize<'a>>(
        &self,
        block: &'a [u8],
    ) -> Result<T, (&'static str, String)> {
        crate::cbor::check_depth(block).map_err(|e| ("bad_record", e.to_string()))?;
        records::view(block).map_err(|e| ("bad_record", e.to_string()))
    }

    fn check_type(&self, type_: Option<&str>) -> OpResult {
        if type_ == Some(self.kind.nsid()) {
            Ok(())
        } else {
            Err((
                "wrong_type",
                format!("record $type {:?} in {}", type_, self.kind.nsid()),
            ))
        }
    }

    fn record_json(&self, block: &[u8]) -> Result<serde_json::Value, (&'static str, String)> {
        crate::cbor::decode_to_json(block).map_err(|e| ("bad_record", e.to_string()))
    }

    fn cid(&self) -> String {
        self.op.cid.map(|c| c.to_string()).unwrap_or_default()
    }

    fn route_create(&self, overlay: &mut Overlay<'_>, out: &mut Routing) -> OpResult {
        match self.kind {
            RecordKind::Post => self.route_post(overlay, out),
            RecordKind::Like | RecordKind::Repost => self.route_reaction(overlay, out),
            RecordKind::Follow => self.route_follow(overlay.state, out),
            RecordKind::Block | RecordKind::Profile => {
                if !self.author_is_study {
                    return Ok(());
                }
                let block = self.keep()?;
                let record = self.record_json(block)?;
                self.check_type(record.get("$type").and_then(|t| t.as_str()))?;
                let uri = self.uri();
                let contents = transform::generic_record_cache_json(
                    uri.as_str(),
                    &self.cid(),
                    self.commit.repo.as_str(),
                    self.kind.nsid(),
                    &record,
                );
                let (folder, file) = if self.kind == RecordKind::Block {
                    (
                        Folder::StudyBlock,
                        paths::record_file(&self.commit.repo, "block", &self.op.rkey),
                    )
                } else {
                    (
                        Folder::StudyProfile,
                        paths::profile_file(&self.commit.repo, &self.op.rkey, &self.commit.rev),
                    )
                };
                push_file(out, self.index, &folder, file, &contents);
                Ok(())
            }
        }
    }

    fn route_post(&self, overlay: &mut Overlay<'_>, out: &mut Routing) -> OpResult {
        let author = &self.commit.repo;
        let block = self.block()?;
        let fallback: serde_json::Value;
        let refs = match self.view::<PostView<'_>>(block) {
            Ok(view) => view.refs(),
            // An open union in a shape the view does not expect: read the refs from JSON.
            Err(_) => {
                fallback = self.record_json(block)?;
                PostRefs::from_json(&fallback)
            }
        };
        self.check_type(refs.type_)?;
        let uri = self.uri();
        let mut folders: Vec<Folder> = Vec::new();
        // P1: the study user's own post; it becomes a study post at once (same commit too).
        if self.author_is_study {
            folders.push(Folder::StudyPost);
            out.updates.push(StateUpdate::StudyPost {
                uri: uri.clone(),
                author: author.clone(),
            });
            overlay
                .new_posts
                .push((uri.as_str().to_owned(), author.clone()));
        }
        // P2, rule R: nest under the root if it is a study post, else under the parent.
        let root = refs.reply_root;
        let parent = refs.reply_parent;
        let nest = root
            .filter(|r| overlay.study_post_author(r).is_some())
            .or(parent.filter(|p| overlay.study_post_author(p).is_some()));
        if nest.is_some() {
            // Before anything (a drop included) is said about the op.
            self.keep()?;
        }
        if let Some(study_uri) = nest {
            match post_rkey(study_uri) {
                Some(rkey) => folders.push(Folder::ReplyToUserPost(rkey)),
                None => drop_op(out, self.index, "bad_subject", study_uri),
            }
        }
        // P3: in-network author.
        if self.author_in_network {
            folders.push(Folder::InNetworkPost(author.clone()));
        }
        // Quote of a study post (ours, DESIGN.md §5).
        if let Some(quoted) = refs.quoted {
            if overlay.study_post_author(quoted).is_some() {
                if let Some(rkey) = post_rkey(quoted) {
                    folders.push(Folder::QuoteOfUserPost(rkey));
                }
            }
        }
        if folders.is_empty() {
            return Ok(());
        }
        let block = self.keep()?;
        let record = self.record_json(block)?;
        let post = transform::transform_post(
            uri.as_str(),
            &self.cid(),
            author.as_str(),
            &record,
            self.clock,
        )
        .map_err(|e| ("transform", e.to_string()))?;
        let contents = post.to_cache_json();
        let file = paths::record_file(author, "post", &self.op.rkey);
        for folder in folders {
            // Every folder but the author's own: its delete is routed by this record, not by
            // whether the author is still in the network when the post is deleted.
            if matches!(
                folder,
                Folder::ReplyToUserPost(_) | Folder::QuoteOfUserPost(_) | Folder::InNetworkPost(_)
            ) {
                out.updates.push(StateUpdate::Routed {
                    uri: uri.clone(),
                    folder: folder.clone(),
                });
            }
            push_file(out, self.index, &folder, file.clone(), &contents);
        }
        Ok(())
    }

    /// Likes and reposts: the study author's own folder, and the reaction folder of the study
    /// post the subject points at.
    fn route_reaction(&self, overlay: &Overlay<'_>, out: &mut Routing) -> OpResult {
        let block = self.block()?;
        let view: SubjectRefView<'_> = self.view(block)?;
        self.check_type(view.type_)?;
        let Some(subject) = view.subject_uri() else {
            return Err((
                "bad_subject",
                format!("{} without subject.uri", self.kind.name()),
            ));
        };
        let on_study_post = overlay.study_post_author(subject).is_some();
        if !self.author_is_study && !on_study_post {
            return Ok(());
        }
        let block = self.keep()?;
        let subject_rkey = || post_rkey(subject).ok_or(("bad_subject", subject.to_owned()));
        let uri = self.uri();
        let record = self.record_json(block)?;
        let author = self.commit.repo.as_str();
        let contents = if self.kind == RecordKind::Like {
            transform::like_cache_json(uri.as_str(), &self.cid(), author, &record)
                .map_err(|e| ("transform", e.to_string()))?
        } else {
            transform::generic_record_cache_json(
                uri.as_str(),
                &self.cid(),
                author,
                self.kind.nsid(),
                &record,
            )
        };
        let file = paths::record_file(&self.commit.repo, self.kind.name(), &self.op.rkey);
        if self.author_is_study {
            let own = match self.kind {
                RecordKind::Like => Folder::StudyLike(subject_rkey()?),
                _ => Folder::StudyRepost,
            };
            push_file(out, self.index, &own, file.clone(), &contents);
        }
        if on_study_post {
            let folder = match self.kind {
                RecordKind::Like => Folder::LikeOnUserPost(subject_rkey()?),
                _ => Folder::RepostOfUserPost(subject_rkey()?),
            };
            out.updates.push(StateUpdate::Routed {
                uri,
                folder: folder.clone(),
            });
            push_file(out, self.index, &folder, file, &contents);
        }
        Ok(())
    }

    fn route_follow(&self, state: &dyn RoutingState, out: &mut Routing) -> OpResult {
        let block = self.block()?;
        let view: SubjectDidView<'_> = self.view(block)?;
        self.check_type(view.type_)?;
        let subject = view
            .subject
            .ok_or(("bad_subject", "follow without subject".to_owned()))?;
        let subject = Did::parse(subject).map_err(|e| ("bad_subject", e.to_string()))?;
        let subject_is_study = state.is_study_user(&subject);
        if !self.author_is_study && !subject_is_study {
            return Ok(());
        }
        let block = self.keep()?;
        let uri = self.uri();
        let record = self.record_json(block)?;
        let contents = transform::follow_cache_json(
            uri.as_str(),
            &self.cid(),
            self.commit.repo.as_str(),
            &record,
        )
        .map_err(|e| ("transform", e.to_string()))?;
        let file = paths::follow_file(&self.commit.repo, &subject);
        if self.author_is_study {
            out.updates.push(StateUpdate::StudyFollow {
                uri: uri.clone(),
                follower: self.commit.repo.clone(),
                subject: subject.clone(),
            });
            push_file(out, self.index, &Folder::Follower, file.clone(), &contents);
        }
        if subject_is_study {
            out.updates.push(StateUpdate::Routed {
                uri: uri.clone(),
                folder: Folder::Followee,
            });
            out.updates
                .push(StateUpdate::FollowOfStudyUser { uri, subject });
            push_file(out, self.index, &Folder::Followee, file, &contents);
        }
        Ok(())
    }

    fn route_delete(&self, state: &dyn RoutingState, out: &mut Routing) {
        let uri = self.uri();
        // Where the record went: earlier events (the state) and earlier ops of this commit
        // (their updates are applied after the whole event).
        let mut routed = state.routed_folders(uri.as_str());
        for update in &out.updates {
            if let StateUpdate::Routed { uri: u, folder } = update {
                if u == &uri && !routed.contains(folder) {
                    routed.push(folder.clone());
                }
            }
        }
        let author = &self.commit.repo;
        let file = paths::record_file(author, self.kind.name(), &self.op.rkey);
        let mut contents: Option<String> = None;
        let mut emit = |out: &mut Routing, folder: &Folder, delete_dir: bool| {
            let contents = contents.get_or_insert_with(|| self.delete_json(&uri));
            match folder.path(file.clone()) {
                Ok(path) => out.files.push(CacheFile {
                    path: if delete_dir { path.to_delete() } else { path },
                    folder: if delete_dir {
                        "delete_of_routed"
                    } else {
                        folder.label()
                    },
                    contents: contents.clone(),
                }),
                Err(e) => drop_op(out, self.index, e.reason(), e.to_string()),
            }
        };
        if self.author_is_study {
            emit(out, &Folder::StudyDelete(self.kind.name()), false);
            if self.kind == RecordKind::Follow {
                out.updates.push(StateUpdate::StudyUnfollow {
                    uri: uri.clone(),
                    follower: author.clone(),
                    seq: self.commit.seq,
                    time: self.commit.time.to_owned(),
                });
            }
        }
        for folder in &routed {
            emit(out, folder, true);
        }
    }

    fn delete_json(&self, uri: &AtUri) -> String {
        let mut w = PyJsonWriter::with_capacity(256);
        w.begin_object()
            .field_str("uri", uri.as_str())
            .field_str("author", self.commit.repo.as_str())
            .field_str("collection", self.op.collection.as_str())
            .field_str("rkey", self.op.rkey.as_str())
            .field_i64("seq", self.commit.seq.0)
            .field_str("rev", self.commit.rev.as_str())
            .field_str("time", self.commit.time)
            .end_object();
        w.into_string()
    }
}

/// `{did, kind, seq, time, handle, active, status}`: the seq stays in the file (the name leaves it
/// out, so a second delivery under another seq rewrites the file with the latest one).
fn account_json(key: &AccountEventKey<'_>, seq: Seq) -> String {
    let mut w = PyJsonWriter::with_capacity(256);
    w.begin_object()
        .field_str("did", key.did.as_str())
        .field_str("kind", key.kind)
        .field_i64("seq", seq.0)
        .field_str("time", key.time)
        .field_opt_str("handle", key.handle);
    match key.active {
        Some(a) => w.field_bool("active", a),
        None => w.field_null("active"),
    };
    w.field_opt_str("status", key.status).end_object();
    w.into_string()
}

fn route_identity(identity: &IdentityEvent, state: &dyn RoutingState, out: &mut Routing) {
    if !state.is_study_user(&identity.did) {
        return;
    }
    let key = AccountEventKey {
        did: &identity.did,
        kind: "identity",
        time: &identity.time,
        handle: identity.handle.as_deref(),
        active: None,
        status: None,
    };
    push_event_file(out, &key, identity.seq);
}

fn route_account(account: &AccountEvent, state: &dyn RoutingState, out: &mut Routing) {
    if !state.is_study_user(&account.did) {
        return;
    }
    let key = AccountEventKey {
        did: &account.did,
        kind: "account",
        time: &account.time,
        handle: None,
        active: Some(account.active),
        status: account.status.as_deref(),
    };
    push_event_file(out, &key, account.seq);
}

fn push_event_file(out: &mut Routing, key: &AccountEventKey<'_>, seq: Seq) {
    match Folder::Account.path(paths::account_file(key)) {
        Ok(path) => out.files.push(CacheFile {
            path,
            folder: Folder::Account.label(),
            contents: account_json(key, seq),
        }),
        Err(e) => out.dropped.push(Dropped {
            op_index: None,
            reason: e.reason(),
            detail: e.to_string(),
        }),
    }
}

/// An in-memory [`RoutingState`] that applies [`StateUpdate`]s: used by tests, benchmarks and
/// `inspect`; the writer backs the same trait with its database and must behave the same (a
/// writer test runs one event sequence through both).
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    pub study_users: HashSet<Did>,
    /// The in-network input (file or table): these accounts stay in-network whatever the
    /// stream says, as in the writer (its in-network file is reloaded, never edited).
    pub in_network: HashSet<Did>,
    pub study_posts: HashMap<String, Did>,
    pub routed: HashMap<String, Vec<Folder>>,
    /// follow uri -> the study users it follows ([`StateUpdate::FollowOfStudyUser`]; one URI
    /// names one subject unless its record was deleted and created again with another).
    followee_subjects: HashMap<String, Vec<Did>>,
    /// follow uri -> (study user, subject): the study users' follows seen in the stream.
    study_follows: HashMap<String, (Did, Did)>,
    /// How many of `study_follows` point at each subject.
    followed: HashMap<Did, u32>,
    /// Unfollows of follows never seen ([`Applied::UnknownUnfollow`]), in arrival order.
    pub unknown_unfollows: Vec<AtUri>,
}

impl MemoryState {
    pub fn apply(&mut self, update: &StateUpdate) -> Applied {
        match update {
            StateUpdate::StudyPost { uri, author } => {
                self.study_posts
                    .insert(uri.as_str().to_owned(), author.clone());
            }
            StateUpdate::Routed { uri, folder } => {
                let folders = self.routed.entry(uri.as_str().to_owned()).or_default();
                if !folders.contains(folder) {
                    folders.push(folder.clone());
                }
            }
            StateUpdate::FollowOfStudyUser { uri, subject } => {
                let subjects = self
                    .followee_subjects
                    .entry(uri.as_str().to_owned())
                    .or_default();
                if !subjects.contains(subject) {
                    subjects.push(subject.clone());
                }
            }
            StateUpdate::StudyFollow {
                uri,
                follower,
                subject,
            } => {
                let previous = self
                    .study_follows
                    .insert(uri.as_str().to_owned(), (follower.clone(), subject.clone()));
                if let Some((_, old)) = previous {
                    self.unfollow_subject(&old);
                }
                *self.followed.entry(subject.clone()).or_default() += 1;
            }
            StateUpdate::StudyUnfollow { uri, .. } => {
                match self.study_follows.remove(uri.as_str()) {
                    Some((_, subject)) => self.unfollow_subject(&subject),
                    None => {
                        self.unknown_unfollows.push(uri.clone());
                        return Applied::UnknownUnfollow;
                    }
                }
            }
        }
        Applied::Done
    }

    fn unfollow_subject(&mut self, subject: &Did) {
        if let Some(count) = self.followed.get_mut(subject) {
            *count -= 1;
            if *count == 0 {
                self.followed.remove(subject);
            }
        }
    }

    /// The study users the follow `uri` (routed to `followee`) was recorded as following.
    pub fn followee_subjects(&self, uri: &str) -> &[Did] {
        self.followee_subjects
            .get(uri)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The subject of the study follow `uri`, if it was seen and not deleted.
    pub fn study_follow_subject(&self, uri: &str) -> Option<&Did> {
        self.study_follows.get(uri).map(|(_, subject)| subject)
    }
}

impl RoutingState for MemoryState {
    fn is_study_user(&self, did: &Did) -> bool {
        self.study_users.contains(did)
    }
    fn is_in_network(&self, did: &Did) -> bool {
        self.in_network.contains(did) || self.followed.contains_key(did)
    }
    fn study_post_author(&self, uri: &str) -> Option<Did> {
        self.study_posts.get(uri).cloned()
    }
    fn routed_folders(&self, uri: &str) -> Vec<Folder> {
        self.routed.get(uri).cloned().unwrap_or_default()
    }
}
