//! Cache-relative paths, built only from fixed folder names and validated identifiers.
//!
//! A [`CachePath`] can only be made by the constructors here, whose inputs are [`Did`],
//! [`RecordKey`] and [`Tid`] values (none can hold `/`, `\`, NUL or be `.`/`..`), so no path
//! routing produces can leave the cache root. Names follow `predecessor-data-format.md` §3.3.
//!
//! A record key may begin with `.` (`.x` is valid), and every reader treats a name beginning with
//! `.` as hidden (the export skips them, as it does the writer's temp files). A record key that
//! becomes a whole path component is therefore written through [`rkey_component`], which spells a
//! leading `.` as `%2E`; `%` never occurs in a valid record key, so the spelling is unambiguous and
//! [`rkey_from_component`] reverses it. In file names the record key never comes first (they all
//! start with a fixed `author_did=` / `follower_did=` / `did=` prefix), so it is written as is.

use std::borrow::Cow;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::ids::{Did, RecordKey, Tid};

/// Longest file or directory name most file systems accept.
pub const MAX_NAME_BYTES: usize = 255;

/// A path relative to the cache root: `/`-separated, never absolute, never with `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CachePath {
    /// Directory part, e.g. `study_user_activity/create/post`.
    dir: String,
    /// File name, e.g. `author_did=did:plc:..._post_uri_suffix=3l5j....json`.
    file: String,
}

/// Why a routed record cannot get a cache path (it is dropped and counted).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum NameTooLong {
    #[error("cache path segment of {0} bytes exceeds {MAX_NAME_BYTES}")]
    TooLong(usize),
    /// A segment starting with `.` would be hidden from every reader. Record keys are encoded
    /// ([`rkey_component`]) and DIDs cannot start with `.`, so only a caller-supplied name can
    /// get here.
    #[error("cache path segment {0:?} would be a hidden name")]
    Hidden(String),
}

impl NameTooLong {
    /// Stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            NameTooLong::TooLong(_) => "name_too_long",
            NameTooLong::Hidden(_) => "hidden_name",
        }
    }
}

impl CachePath {
    fn new(dir: String, file: String) -> Result<Self, NameTooLong> {
        for segment in dir.split('/').chain(std::iter::once(file.as_str())) {
            if segment.len() > MAX_NAME_BYTES {
                return Err(NameTooLong::TooLong(segment.len()));
            }
            if segment.starts_with('.') || segment.is_empty() {
                return Err(NameTooLong::Hidden(segment.chars().take(64).collect()));
            }
        }
        Ok(CachePath { dir, file })
    }

    pub fn dir(&self) -> &str {
        &self.dir
    }

    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// The same file under the `delete` counterpart of its folder (`.../create/...` -> `.../delete/...`).
    pub fn to_delete(&self) -> CachePath {
        let dir = match self.dir.split_once("/create/") {
            Some((head, tail)) => format!("{head}/delete/{tail}"),
            None => self.dir.clone(),
        };
        CachePath {
            dir,
            file: self.file.clone(),
        }
    }
}

impl fmt::Display for CachePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.dir, self.file)
    }
}

/// How a leading `.` of a record key is spelled in a path component.
const ENCODED_DOT: &str = "%2E";

/// A record key as one path component: the key itself, except that a leading `.` (valid in a
/// record key, but a hidden name on disk) is written `%2E`. Ordinary keys are unchanged, so the
/// predecessor's names stay byte-identical.
pub fn rkey_component(rkey: &RecordKey) -> Cow<'_, str> {
    match rkey.as_str().strip_prefix('.') {
        Some(rest) => Cow::Owned(format!("{ENCODED_DOT}{rest}")),
        None => Cow::Borrowed(rkey.as_str()),
    }
}

/// The record key a path component written by [`rkey_component`] stands for (re-validated);
/// `None` for anything [`rkey_component`] cannot have produced (a raw leading `.` included).
pub fn rkey_from_component(component: &str) -> Option<RecordKey> {
    if component.starts_with('.') {
        return None;
    }
    match component.strip_prefix(ENCODED_DOT) {
        Some(rest) => RecordKey::parse(&format!(".{rest}")).ok(),
        None => RecordKey::parse(component).ok(),
    }
}

pub const STUDY: &str = "study_user_activity";
pub const IN_NETWORK: &str = "in_network_user_activity";

/// `author_did=<did>_<kind>_uri_suffix=<rkey>.json` (posts, likes and the new record kinds).
pub fn record_file(author: &Did, kind: &str, rkey: &RecordKey) -> String {
    format!(
        "author_did={}_{}_uri_suffix={}.json",
        author.as_str(),
        kind,
        rkey.as_str()
    )
}

/// `follower_did=<did>_followee_did=<did>.json` (the predecessor's follow name: no rkey).
pub fn follow_file(follower: &Did, followee: &Did) -> String {
    format!(
        "follower_did={}_followee_did={}.json",
        follower.as_str(),
        followee.as_str()
    )
}

/// Where one routed record or event goes. Each variant is one cache folder.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Folder {
    /// P1 `study_user_activity/create/post/`
    StudyPost,
    /// P2 `study_user_activity/create/reply_to_user_post/<R>/`
    ReplyToUserPost(RecordKey),
    /// P3 `in_network_user_activity/create/post/<author>/`
    InNetworkPost(Did),
    /// L1 `study_user_activity/create/like/<liked rkey>/`
    StudyLike(RecordKey),
    /// L2 `study_user_activity/create/like_on_user_post/<rkey>/`
    LikeOnUserPost(RecordKey),
    /// F1 `study_user_activity/create/follow/follower/` (the study user follows)
    Follower,
    /// F2 `study_user_activity/create/follow/followee/` (the study user is followed)
    Followee,
    /// `study_user_activity/create/repost/`
    StudyRepost,
    /// `study_user_activity/create/repost_of_user_post/<rkey>/`
    RepostOfUserPost(RecordKey),
    /// `study_user_activity/create/quote_of_user_post/<rkey>/`
    QuoteOfUserPost(RecordKey),
    /// `study_user_activity/create/block/`
    StudyBlock,
    /// `study_user_activity/create/profile/`
    StudyProfile,
    /// `study_user_activity/account/`
    Account,
    /// `study_user_activity/delete/<kind>/`: a study user deleted one of their records.
    StudyDelete(&'static str),
}

impl Folder {
    pub fn dir(&self) -> String {
        match self {
            Folder::StudyPost => format!("{STUDY}/create/post"),
            Folder::ReplyToUserPost(r) => {
                format!("{STUDY}/create/reply_to_user_post/{}", rkey_component(r))
            }
            Folder::InNetworkPost(d) => format!("{IN_NETWORK}/create/post/{}", d.as_str()),
            Folder::StudyLike(r) => format!("{STUDY}/create/like/{}", rkey_component(r)),
            Folder::LikeOnUserPost(r) => {
                format!("{STUDY}/create/like_on_user_post/{}", rkey_component(r))
            }
            Folder::Follower => format!("{STUDY}/create/follow/follower"),
            Folder::Followee => format!("{STUDY}/create/follow/followee"),
            Folder::StudyRepost => format!("{STUDY}/create/repost"),
            Folder::RepostOfUserPost(r) => {
                format!("{STUDY}/create/repost_of_user_post/{}", rkey_component(r))
            }
            Folder::QuoteOfUserPost(r) => {
                format!("{STUDY}/create/quote_of_user_post/{}", rkey_component(r))
            }
            Folder::StudyBlock => format!("{STUDY}/create/block"),
            Folder::StudyProfile => format!("{STUDY}/create/profile"),
            Folder::Account => format!("{STUDY}/account"),
            Folder::StudyDelete(kind) => format!("{STUDY}/delete/{kind}"),
        }
    }

    /// Stable label for metrics (`routed_files{folder=...}`): the folder without its nesting key.
    pub fn label(&self) -> &'static str {
        match self {
            Folder::StudyPost => "study/create/post",
            Folder::ReplyToUserPost(_) => "study/create/reply_to_user_post",
            Folder::InNetworkPost(_) => "in_network/create/post",
            Folder::StudyLike(_) => "study/create/like",
            Folder::LikeOnUserPost(_) => "study/create/like_on_user_post",
            Folder::Follower => "study/create/follow/follower",
            Folder::Followee => "study/create/follow/followee",
            Folder::StudyRepost => "study/create/repost",
            Folder::RepostOfUserPost(_) => "study/create/repost_of_user_post",
            Folder::QuoteOfUserPost(_) => "study/create/quote_of_user_post",
            Folder::StudyBlock => "study/create/block",
            Folder::StudyProfile => "study/create/profile",
            Folder::Account => "study/account",
            Folder::StudyDelete(_) => "study/delete",
        }
    }

    /// Parses a directory produced by [`Folder::dir`] back (for folders stored in an index);
    /// every nesting segment is decoded ([`rkey_from_component`]) and re-validated.
    pub fn from_dir(dir: &str) -> Option<Folder> {
        let create = format!("{STUDY}/create/");
        if let Some(rest) = dir.strip_prefix(&create) {
            let (head, tail) = match rest.split_once('/') {
                Some((h, t)) => (h, Some(t)),
                None => (rest, None),
            };
            let rkey = || tail.and_then(rkey_from_component);
            return Some(match (head, tail) {
                ("post", None) => Folder::StudyPost,
                ("reply_to_user_post", Some(_)) => Folder::ReplyToUserPost(rkey()?),
                ("like", Some(_)) => Folder::StudyLike(rkey()?),
                ("like_on_user_post", Some(_)) => Folder::LikeOnUserPost(rkey()?),
                ("follow", Some("follower")) => Folder::Follower,
                ("follow", Some("followee")) => Folder::Followee,
                ("repost", None) => Folder::StudyRepost,
                ("repost_of_user_post", Some(_)) => Folder::RepostOfUserPost(rkey()?),
                ("quote_of_user_post", Some(_)) => Folder::QuoteOfUserPost(rkey()?),
                ("block", None) => Folder::StudyBlock,
                ("profile", None) => Folder::StudyProfile,
                _ => return None,
            });
        }
        if let Some(did) = dir.strip_prefix(&format!("{IN_NETWORK}/create/post/")) {
            return Did::parse(did).ok().map(Folder::InNetworkPost);
        }
        if dir == format!("{STUDY}/account") {
            return Some(Folder::Account);
        }
        None
    }

    pub fn path(&self, file: String) -> Result<CachePath, NameTooLong> {
        CachePath::new(self.dir(), file)
    }
}

/// `author_did=<did>_profile_uri_suffix=<rkey>_rev=<rev>.json`: profiles are updated in place, so
/// the commit rev keeps every version apart (and a replay of the same rev rewrites the same file).
pub fn profile_file(author: &Did, rkey: &RecordKey, rev: &Tid) -> String {
    format!(
        "author_did={}_profile_uri_suffix={}_rev={}.json",
        author.as_str(),
        rkey.as_str(),
        rev.as_str()
    )
}

/// What tells one `#account` / `#identity` event from another: everything the event says
/// except its `seq`. The same event delivered again (by another relay, after a relay swap, or
/// replayed under a new seq) has the same content and gets the same file name, so it rewrites
/// one file instead of becoming a second row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountEventKey<'a> {
    pub did: &'a Did,
    /// `account` or `identity`.
    pub kind: &'a str,
    /// The event's `time`, as sent.
    pub time: &'a str,
    /// `#identity`: the handle, as sent.
    pub handle: Option<&'a str>,
    /// `#account`: `active` (`None` for identity events).
    pub active: Option<bool>,
    /// `#account`: `status`.
    pub status: Option<&'a str>,
}

impl AccountEventKey<'_> {
    /// First 16 lowercase hex digits of the SHA-256 of the compact JSON array
    /// `[did, kind, time, handle, active, status]` (`null` for absent values). Defined on
    /// plain JSON so other tools (the PDS test driver) can compute it too.
    pub fn digest(&self) -> String {
        let array = serde_json::json!([
            self.did.as_str(),
            self.kind,
            self.time,
            self.handle,
            self.active,
            self.status
        ]);
        let hash = Sha256::digest(array.to_string().as_bytes());
        hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The `time` as it goes into a file name: as sent when it looks like a timestamp (only
    /// `[0-9A-Za-z:.+-]`, at most 64 bytes), else `invalid` (the time is unvalidated input; the
    /// digest still covers the exact value, so distinct events stay distinct).
    pub fn name_time(&self) -> &str {
        let safe = !self.time.is_empty()
            && self.time.len() <= 64
            && self
                .time
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'+' | b'-'));
        if safe {
            self.time
        } else {
            "invalid"
        }
    }
}

/// `did=<did>_<kind>_time=<time>_event=<16 hex>.json` for `#account` / `#identity` events: named by
/// the event's content ([`AccountEventKey`]), never by its `seq` (which stays inside the JSON).
pub fn account_file(key: &AccountEventKey<'_>) -> String {
    format!(
        "did={}_{}_time={}_event={}.json",
        key.did.as_str(),
        key.kind,
        key.name_time(),
        key.digest()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_round_trip_through_their_directory() {
        let rkey = RecordKey::parse("3l5jnpb6xyz2k").unwrap();
        let did = Did::parse("did:plc:z72i7hdynmk6r22z27h6tvur").unwrap();
        for folder in [
            Folder::StudyPost,
            Folder::ReplyToUserPost(rkey.clone()),
            Folder::InNetworkPost(did),
            Folder::StudyLike(rkey.clone()),
            Folder::LikeOnUserPost(rkey.clone()),
            Folder::Follower,
            Folder::Followee,
            Folder::StudyRepost,
            Folder::RepostOfUserPost(rkey.clone()),
            Folder::QuoteOfUserPost(rkey),
            Folder::StudyBlock,
            Folder::StudyProfile,
            Folder::Account,
        ] {
            assert_eq!(
                Folder::from_dir(&folder.dir()),
                Some(folder.clone()),
                "{folder:?}"
            );
        }
        assert_eq!(
            Folder::from_dir("study_user_activity/create/like_on_user_post/../x"),
            None
        );
        assert_eq!(Folder::from_dir("/etc"), None);
    }

    #[test]
    fn rkeys_with_a_leading_dot_are_encoded_reversibly_and_others_are_untouched() {
        for (rkey, component) in [
            ("3l5jnpb6xyz2k", "3l5jnpb6xyz2k"),
            ("self", "self"),
            ("a.b", "a.b"),
            (".x", "%2Ex"),
            ("...", "%2E.."),
            (".tmp-1-1", "%2Etmp-1-1"),
        ] {
            let rkey = RecordKey::parse(rkey).unwrap();
            assert_eq!(rkey_component(&rkey), component);
            assert_eq!(rkey_from_component(component), Some(rkey.clone()));
            let folder = Folder::LikeOnUserPost(rkey);
            assert!(!folder.dir().split('/').any(|s| s.starts_with('.')));
            assert_eq!(Folder::from_dir(&folder.dir()), Some(folder));
        }
        // Never produced, so never accepted: a raw leading dot, `%` elsewhere, a bad escape.
        for bad in [".x", "%2E", "%2e.x", "a%2Eb", "%2F", "%2E%2E"] {
            assert_eq!(rkey_from_component(bad), None, "{bad}");
        }
    }

    #[test]
    fn account_files_are_named_by_the_event_not_the_seq() {
        let did = Did::parse("did:plc:z72i7hdynmk6r22z27h6tvur").unwrap();
        let key = AccountEventKey {
            did: &did,
            kind: "account",
            time: "2024-10-02T15:00:00.000Z",
            handle: None,
            active: Some(false),
            status: Some("deactivated"),
        };
        let name = account_file(&key);
        assert!(
            name.starts_with(
                "did=did:plc:z72i7hdynmk6r22z27h6tvur_account_time=2024-10-02T15:00:00.000Z_event="
            ),
            "{name}"
        );
        // The digest is SHA-256 of the compact JSON array (reproducible outside Rust).
        let json = r#"["did:plc:z72i7hdynmk6r22z27h6tvur","account","2024-10-02T15:00:00.000Z",null,false,"deactivated"]"#;
        let want: String = Sha256::digest(json.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(name, format!("did=did:plc:z72i7hdynmk6r22z27h6tvur_account_time=2024-10-02T15:00:00.000Z_event={want}.json"));
        // Any field that makes the event distinct changes the name.
        let variants = [
            AccountEventKey {
                active: Some(true),
                ..key
            },
            AccountEventKey {
                status: Some("deleted"),
                ..key
            },
            AccountEventKey {
                status: None,
                ..key
            },
            AccountEventKey {
                time: "2024-10-02T15:00:00.001Z",
                ..key
            },
            AccountEventKey {
                kind: "identity",
                active: None,
                status: None,
                ..key
            },
            AccountEventKey {
                kind: "identity",
                active: None,
                status: None,
                handle: Some("a.example.com"),
                ..key
            },
        ];
        let mut names: std::collections::HashSet<String> =
            variants.iter().map(account_file).collect();
        names.insert(name);
        assert_eq!(names.len(), variants.len() + 1);
        // An unvalidated time never reaches the name as is, but still tells events apart.
        let odd = AccountEventKey {
            time: "../../etc/passwd",
            ..key
        };
        let odd2 = AccountEventKey { time: "/", ..key };
        assert!(account_file(&odd).contains("_time=invalid_"));
        assert_ne!(account_file(&odd), account_file(&odd2));
    }
}
