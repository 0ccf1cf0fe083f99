//! Cache-relative paths, built only from fixed folder names and validated identifiers.
//!
//! A [`CachePath`] can only be made by the constructors here, whose inputs are [`Did`],
//! [`RecordKey`], [`Tid`] and [`Seq`] values (none can hold `/`, `\`, NUL or be `.`/`..`), so no
//! path routing produces can leave the cache root. Names follow `predecessor-data-format.md` §3.3.

use std::fmt;

use crate::ids::{Did, RecordKey, Seq, Tid};

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
    /// A valid record key may start with `.`; as a folder it would be hidden from every reader.
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
                format!("{STUDY}/create/reply_to_user_post/{}", r.as_str())
            }
            Folder::InNetworkPost(d) => format!("{IN_NETWORK}/create/post/{}", d.as_str()),
            Folder::StudyLike(r) => format!("{STUDY}/create/like/{}", r.as_str()),
            Folder::LikeOnUserPost(r) => format!("{STUDY}/create/like_on_user_post/{}", r.as_str()),
            Folder::Follower => format!("{STUDY}/create/follow/follower"),
            Folder::Followee => format!("{STUDY}/create/follow/followee"),
            Folder::StudyRepost => format!("{STUDY}/create/repost"),
            Folder::RepostOfUserPost(r) => {
                format!("{STUDY}/create/repost_of_user_post/{}", r.as_str())
            }
            Folder::QuoteOfUserPost(r) => {
                format!("{STUDY}/create/quote_of_user_post/{}", r.as_str())
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
    /// every nesting segment is re-validated.
    pub fn from_dir(dir: &str) -> Option<Folder> {
        let create = format!("{STUDY}/create/");
        if let Some(rest) = dir.strip_prefix(&create) {
            let (head, tail) = match rest.split_once('/') {
                Some((h, t)) => (h, Some(t)),
                None => (rest, None),
            };
            let rkey = || tail.and_then(|t| RecordKey::parse(t).ok());
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

/// `did=<did>_seq=<seq>.json` for `#account` / `#identity` events.
pub fn account_file(did: &Did, kind: &str, seq: Seq) -> String {
    format!("did={}_{kind}_seq={}.json", did.as_str(), seq.0)
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
}
