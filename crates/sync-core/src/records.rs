//! Record registry: which collections the service knows, and the few fields routing reads from a
//! raw record block before deciding whether the record is worth a full decode.
//!
//! Most firehose records route nowhere, so routing first deserialises only these borrowed fields
//! (`reply`, `embed` target, `subject`) straight from DAG-CBOR; the full JSON conversion and the
//! predecessor transforms run only for records that produce a file.

use serde::Deserialize;

use crate::ids::Nsid;

pub const POST: &str = "app.bsky.feed.post";
pub const LIKE: &str = "app.bsky.feed.like";
pub const REPOST: &str = "app.bsky.feed.repost";
pub const FOLLOW: &str = "app.bsky.graph.follow";
pub const BLOCK: &str = "app.bsky.graph.block";
pub const PROFILE: &str = "app.bsky.actor.profile";

/// The record types routing knows about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Post,
    Like,
    Repost,
    Follow,
    Block,
    Profile,
}

impl RecordKind {
    pub fn of(collection: &Nsid) -> Option<RecordKind> {
        Some(match collection.as_str() {
            POST => RecordKind::Post,
            LIKE => RecordKind::Like,
            REPOST => RecordKind::Repost,
            FOLLOW => RecordKind::Follow,
            BLOCK => RecordKind::Block,
            PROFILE => RecordKind::Profile,
            _ => return None,
        })
    }

    pub fn nsid(self) -> &'static str {
        match self {
            RecordKind::Post => POST,
            RecordKind::Like => LIKE,
            RecordKind::Repost => REPOST,
            RecordKind::Follow => FOLLOW,
            RecordKind::Block => BLOCK,
            RecordKind::Profile => PROFILE,
        }
    }

    /// The word used in folder and file names (`post`, `like`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Post => "post",
            RecordKind::Like => "like",
            RecordKind::Repost => "repost",
            RecordKind::Follow => "follow",
            RecordKind::Block => "block",
            RecordKind::Profile => "profile",
        }
    }
}

pub const EMBED_IMAGES: &str = "app.bsky.embed.images";
pub const EMBED_EXTERNAL: &str = "app.bsky.embed.external";
pub const EMBED_RECORD: &str = "app.bsky.embed.record";
pub const EMBED_RECORD_WITH_MEDIA: &str = "app.bsky.embed.recordWithMedia";

/// The embed union members the service tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedType {
    Images,
    External,
    /// A quote: `embed.record` is the strongRef of the quoted record.
    Record,
    /// A quote with media: `embed.record.record` is the quoted record's strongRef.
    RecordWithMedia,
    /// Video, unknown or missing.
    Other,
}

/// Classifies an embed (or media) `$type`. `X#main` names the same lexicon definition as `X`
/// and counts the same. This is the one place that decides what an embed is, for both the post's
/// `embed` JSON (`transform`) and quote routing ([`PostView::quoted`], [`PostRefs::from_json`]),
/// so a post can never count as a quote in one and not in the other.
pub fn embed_type(type_: &str) -> EmbedType {
    match type_.strip_suffix("#main").unwrap_or(type_) {
        EMBED_IMAGES => EmbedType::Images,
        EMBED_EXTERNAL => EmbedType::External,
        EMBED_RECORD => EmbedType::Record,
        EMBED_RECORD_WITH_MEDIA => EmbedType::RecordWithMedia,
        _ => EmbedType::Other,
    }
}

#[derive(Deserialize, Debug, Default)]
pub struct StrongRefView<'a> {
    #[serde(borrow, default)]
    pub uri: Option<&'a str>,
}

#[derive(Deserialize, Debug, Default)]
pub struct ReplyView<'a> {
    #[serde(borrow, default)]
    pub root: Option<StrongRefView<'a>>,
    #[serde(borrow, default)]
    pub parent: Option<StrongRefView<'a>>,
}

/// `embed.record` is a strongRef for `app.bsky.embed.record` and `{record: strongRef}` for
/// `recordWithMedia`; both shapes are read and the `$type` decides which one counts.
#[derive(Deserialize, Debug, Default)]
pub struct EmbedRecordView<'a> {
    #[serde(borrow, default)]
    pub uri: Option<&'a str>,
    #[serde(borrow, default)]
    pub record: Option<StrongRefView<'a>>,
}

#[derive(Deserialize, Debug, Default)]
pub struct EmbedView<'a> {
    #[serde(rename = "$type", borrow, default)]
    pub type_: Option<&'a str>,
    #[serde(borrow, default)]
    pub record: Option<EmbedRecordView<'a>>,
}

/// The routing-relevant fields of an `app.bsky.feed.post` record.
#[derive(Deserialize, Debug, Default)]
pub struct PostView<'a> {
    #[serde(rename = "$type", borrow, default)]
    pub type_: Option<&'a str>,
    #[serde(borrow, default)]
    pub reply: Option<ReplyView<'a>>,
    #[serde(borrow, default)]
    pub embed: Option<EmbedView<'a>>,
}

impl<'a> PostView<'a> {
    pub fn reply_root(&self) -> Option<&'a str> {
        self.reply.as_ref()?.root.as_ref()?.uri
    }
    pub fn reply_parent(&self) -> Option<&'a str> {
        self.reply.as_ref()?.parent.as_ref()?.uri
    }
    /// The at-URI of the quoted record, for `embed.record` and `embed.recordWithMedia`.
    pub fn quoted(&self) -> Option<&'a str> {
        let embed = self.embed.as_ref()?;
        let record = embed.record.as_ref()?;
        match embed_type(embed.type_?) {
            EmbedType::Record => record.uri,
            EmbedType::RecordWithMedia => record.record.as_ref()?.uri,
            _ => None,
        }
    }
}

/// What routing needs from a post: its `$type`, reply refs and quoted record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PostRefs<'a> {
    pub type_: Option<&'a str>,
    pub reply_root: Option<&'a str>,
    pub reply_parent: Option<&'a str>,
    pub quoted: Option<&'a str>,
}

impl<'a> PostView<'a> {
    pub fn refs(&self) -> PostRefs<'a> {
        PostRefs {
            type_: self.type_,
            reply_root: self.reply_root(),
            reply_parent: self.reply_parent(),
            quoted: self.quoted(),
        }
    }
}

impl<'a> PostRefs<'a> {
    /// The same fields read from the JSON data model: the slow path for posts whose open unions
    /// (e.g. an embed type we do not know) do not fit [`PostView`]'s shapes. Such a post is still
    /// routed by author; only refs that are not where we expect them are missed.
    pub fn from_json(record: &'a serde_json::Value) -> Self {
        let s = |v: &'a serde_json::Value| v.as_str();
        let embed = &record["embed"];
        let quoted = match embed["$type"].as_str().map(embed_type) {
            Some(EmbedType::Record) => s(&embed["record"]["uri"]),
            Some(EmbedType::RecordWithMedia) => s(&embed["record"]["record"]["uri"]),
            _ => None,
        };
        PostRefs {
            type_: s(&record["$type"]),
            reply_root: s(&record["reply"]["root"]["uri"]),
            reply_parent: s(&record["reply"]["parent"]["uri"]),
            quoted,
        }
    }
}

/// The routing-relevant fields of a like or repost (`subject` is a strongRef).
#[derive(Deserialize, Debug, Default)]
pub struct SubjectRefView<'a> {
    #[serde(rename = "$type", borrow, default)]
    pub type_: Option<&'a str>,
    #[serde(borrow, default)]
    pub subject: Option<StrongRefView<'a>>,
}

impl<'a> SubjectRefView<'a> {
    pub fn subject_uri(&self) -> Option<&'a str> {
        self.subject.as_ref()?.uri
    }
}

/// The routing-relevant fields of a follow or block (`subject` is a DID).
#[derive(Deserialize, Debug, Default)]
pub struct SubjectDidView<'a> {
    #[serde(rename = "$type", borrow, default)]
    pub type_: Option<&'a str>,
    #[serde(borrow, default)]
    pub subject: Option<&'a str>,
}

/// Reads a view from a record block; a block of the wrong shape is a decode error.
pub fn view<'a, T: Deserialize<'a>>(block: &'a [u8]) -> Result<T, crate::cbor::CborError> {
    serde_ipld_dagcbor::from_slice(block).map_err(|e| crate::cbor::CborError::Decode(e.to_string()))
}
