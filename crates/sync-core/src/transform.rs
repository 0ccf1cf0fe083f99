//! Record transforms of `predecessor-data-format.md` §1-§2: atproto records (JSON data model) to the
//! exact cache JSON documents of the predecessor (the 23-key consolidated post with its embed
//! string, Era H likes and follows, the Era S like `record` string), plus a generic document for
//! the record types the predecessor never wrote (reposts, blocks, profiles) and the
//! `synctimestamp` clock format.
//!
//! Inputs are records in the atproto JSON data model (`{"$link": …}` for CID links,
//! `{"$bytes": …}` for bytes, blobs as `{"$type": "blob", "ref": {"$link": …}, …}`) and envelope
//! values (`uri`, `cid`, `author` DID) that were validated upstream.
//!
//! Policy (spec §1.6 and §6 Q3): fields are processed by `$type`, regardless of lexicon validity.
//! A post is rejected only when it is unusable: not an object, `$type` not `app.bsky.feed.post`,
//! `createdAt` or `text` missing or not a string. Unknown facet features, unknown label or embed
//! types, and malformed optional fields are skipped, never a reason to drop the post. The quirks
//! Q1, Q2, Q4, Q5 and Q7 are reproduced for column compatibility.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pyjson::PyJsonWriter;
use crate::records::{self, EmbedType};

/// Collection NSID (and record `$type`) of posts.
pub const POST_NSID: &str = "app.bsky.feed.post";
/// Collection NSID (and record `$type`) of likes.
pub const LIKE_NSID: &str = "app.bsky.feed.like";
/// Collection NSID (and record `$type`) of follows.
pub const FOLLOW_NSID: &str = "app.bsky.graph.follow";
/// `py_type` written for the strongRef inside like records.
const STRONG_REF_NSID: &str = "com.atproto.repo.strongRef";
/// The only member of the post `labels` union.
const SELF_LABELS_TYPE: &str = "com.atproto.label.defs#selfLabels";

const FACET_MENTION: [&str; 2] = [
    "app.bsky.richtext.facet#mention",
    "app.bsky.richtext.facet.mention",
];
const FACET_LINK: [&str; 2] = [
    "app.bsky.richtext.facet#link",
    "app.bsky.richtext.facet.link",
];
const FACET_TAG: [&str; 2] = ["app.bsky.richtext.facet#tag", "app.bsky.richtext.facet.tag"];

/// Why a record cannot be transformed. Only conditions that make the record unusable are errors.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum TransformError {
    /// The record is not a JSON object.
    #[error("record is not a JSON object")]
    NotAnObject,
    /// The record's `$type` is missing, not a string, or not the collection NSID.
    #[error("record $type is {found:?}, expected {expected:?}")]
    WrongType {
        /// The collection NSID the record must carry.
        expected: &'static str,
        /// The `$type` found (`None` when missing or not a string).
        found: Option<String>,
    },
    /// A required field is missing or has the wrong JSON type (path in dotted form).
    #[error("required field {0:?} is missing or has the wrong type")]
    MissingField(&'static str),
}

fn as_object(record: &Value) -> Result<&Map<String, Value>, TransformError> {
    record.as_object().ok_or(TransformError::NotAnObject)
}

/// The record's `$type` must equal the collection NSID exactly (spec §1.1).
fn check_type(obj: &Map<String, Value>, expected: &'static str) -> Result<(), TransformError> {
    match obj.get("$type") {
        Some(Value::String(t)) if t == expected => Ok(()),
        other => Err(TransformError::WrongType {
            expected,
            found: other.and_then(Value::as_str).map(str::to_owned),
        }),
    }
}

fn required_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    name: &'static str,
) -> Result<&'a str, TransformError> {
    obj.get(key)
        .and_then(Value::as_str)
        .ok_or(TransformError::MissingField(name))
}

/// `v[key]` if `v` is an object and the value is a string.
fn get_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The embed type of a union member (shared with quote routing: [`records::embed_type`]).
fn union_type(v: &Value) -> EmbedType {
    records::embed_type(get_str(v, "$type").unwrap_or(""))
}

/// Joins string tokens with a bare `;`; `None` when there is no token.
fn join_tokens<'a>(tokens: impl Iterator<Item = &'a str>) -> Option<String> {
    let mut out: Option<String> = None;
    for token in tokens {
        match out.as_mut() {
            None => out = Some(token.to_owned()),
            Some(s) => {
                s.push(';');
                s.push_str(token);
            }
        }
    }
    out
}

/// The consolidated post of spec §1.2: 23 fields, in output order, with the spec's names.
///
/// Deserialising a cache file back into this struct is supported (batch export); the
/// JSON written by [`Post::to_cache_json`] is the byte-exact predecessor format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Post {
    /// Envelope at-URI of the post.
    pub uri: String,
    /// Envelope CID of the record.
    pub cid: String,
    /// Always `None`.
    pub indexed_at: Option<String>,
    /// The repo DID (envelope author).
    pub author_did: String,
    /// Always `None`.
    pub author_handle: Option<String>,
    /// Always `None`.
    pub author_avatar: Option<String>,
    /// Always `None`.
    pub author_display_name: Option<String>,
    /// `record.createdAt`, verbatim.
    pub created_at: String,
    /// `record.text`, verbatim (may be empty).
    pub text: String,
    /// The Python-JSON string of the 6-key embed object (§1.3); see [`embed_json`].
    pub embed: String,
    /// `record.entities[*].value` joined with `;`; `None` if absent or empty.
    pub entities: Option<String>,
    /// Facet tokens (§1.4); `None` if `facets` is absent or `[]`.
    pub facets: Option<String>,
    /// `record.labels.values[*].val` joined with `;`; `Some("")` for `values: []` (Q4); `None` if
    /// `labels` is absent.
    pub labels: Option<String>,
    /// `record.langs` joined with `;`; `None` if absent or empty.
    pub langs: Option<String>,
    /// `record.reply.parent.uri`.
    pub reply_parent: Option<String>,
    /// `record.reply.root.uri`.
    pub reply_root: Option<String>,
    /// `record.tags` joined with `;`; `None` if absent or empty.
    pub tags: Option<String>,
    /// Transform clock, `%Y-%m-%d-%H:%M:%S` UTC (see [`sync_timestamp`]); overwritten at export.
    pub synctimestamp: String,
    /// Always `""`.
    pub url: String,
    /// Always `"firehose"`.
    pub source: String,
    /// Always `None`.
    pub like_count: Option<i64>,
    /// Always `None`.
    pub reply_count: Option<i64>,
    /// Always `None`.
    pub repost_count: Option<i64>,
}

impl Post {
    /// Appends the 23-key cache object (spec §1.2 order) to `w`.
    pub fn write_cache_json(&self, w: &mut PyJsonWriter) {
        w.begin_object()
            .field_str("uri", &self.uri)
            .field_str("cid", &self.cid)
            .field_opt_str("indexed_at", self.indexed_at.as_deref())
            .field_str("author_did", &self.author_did)
            .field_opt_str("author_handle", self.author_handle.as_deref())
            .field_opt_str("author_avatar", self.author_avatar.as_deref())
            .field_opt_str("author_display_name", self.author_display_name.as_deref())
            .field_str("created_at", &self.created_at)
            .field_str("text", &self.text)
            .field_str("embed", &self.embed)
            .field_opt_str("entities", self.entities.as_deref())
            .field_opt_str("facets", self.facets.as_deref())
            .field_opt_str("labels", self.labels.as_deref())
            .field_opt_str("langs", self.langs.as_deref())
            .field_opt_str("reply_parent", self.reply_parent.as_deref())
            .field_opt_str("reply_root", self.reply_root.as_deref())
            .field_opt_str("tags", self.tags.as_deref())
            .field_str("synctimestamp", &self.synctimestamp)
            .field_str("url", &self.url)
            .field_str("source", &self.source)
            .field_opt_i64("like_count", self.like_count)
            .field_opt_i64("reply_count", self.reply_count)
            .field_opt_i64("repost_count", self.repost_count)
            .end_object();
    }

    /// The cache file content: Python `json.dumps` of the 23-key object, one line, ASCII only, no
    /// trailing newline. The `embed` string is escaped a second time, as in the spec's examples.
    pub fn to_cache_json(&self) -> String {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let estimate = 560
            + self.uri.len()
            + self.cid.len()
            + self.author_did.len()
            + self.created_at.len()
            + self.text.len() * 2
            + self.embed.len() * 2
            + opt(&self.entities)
            + opt(&self.facets)
            + opt(&self.labels)
            + opt(&self.langs)
            + opt(&self.reply_parent)
            + opt(&self.reply_root)
            + opt(&self.tags);
        let mut w = PyJsonWriter::with_capacity(estimate);
        self.write_cache_json(&mut w);
        w.into_string()
    }
}

/// Transforms a post create op into the consolidated post (spec §1.2).
///
/// Errors only when the record is unusable: not an object, `$type` not `app.bsky.feed.post`,
/// `createdAt` or `text` missing or not a string (both are never null in the output).
pub fn transform_post(
    uri: &str,
    cid: &str,
    author: &str,
    record: &Value,
    synctimestamp: &str,
) -> Result<Post, TransformError> {
    let obj = as_object(record)?;
    check_type(obj, POST_NSID)?;
    let created_at = required_str(obj, "createdAt", "createdAt")?;
    let text = required_str(obj, "text", "text")?;
    let reply = obj.get("reply").filter(|r| r.is_object());
    let reply_uri = |which: &str| {
        reply
            .and_then(|r| r.get(which))
            .and_then(|p| get_str(p, "uri"))
            .map(str::to_owned)
    };
    Ok(Post {
        uri: uri.to_owned(),
        cid: cid.to_owned(),
        indexed_at: None,
        author_did: author.to_owned(),
        author_handle: None,
        author_avatar: None,
        author_display_name: None,
        created_at: created_at.to_owned(),
        text: text.to_owned(),
        embed: EmbedSummary::from_embed(obj.get("embed")).to_json(),
        entities: entities(obj.get("entities")),
        facets: facets(obj.get("facets")),
        labels: labels(obj.get("labels")),
        langs: string_list(obj.get("langs")),
        reply_parent: reply_uri("parent"),
        reply_root: reply_uri("root"),
        tags: string_list(obj.get("tags")),
        synctimestamp: synctimestamp.to_owned(),
        url: String::new(),
        source: "firehose".to_owned(),
        like_count: None,
        reply_count: None,
        repost_count: None,
    })
}

/// `langs` / `tags`: the strings of the array joined with `;`; `None` if absent, not an array, or
/// without any string item. Non-string items (invalid records) are skipped.
fn string_list(v: Option<&Value>) -> Option<String> {
    join_tokens(v?.as_array()?.iter().filter_map(Value::as_str))
}

/// `entities[*].value` joined with `;` (`type` and `index` ignored); entities without a string
/// `value` are skipped; `None` if there is none.
fn entities(v: Option<&Value>) -> Option<String> {
    join_tokens(v?.as_array()?.iter().filter_map(|e| get_str(e, "value")))
}

/// Self-labels: `labels.values[*].val` joined with `;`.
///
/// * `labels` absent or `null` → `None`.
/// * `values: []` → `Some("")` (quirk Q4, reproduced).
/// * A `labels` object of another union type (not `com.atproto.label.defs#selfLabels`; a missing
///   `$type` is accepted), or one without a `values` array, is an unknown union member: skipped
///   as `None`, the post is kept (Q3; the predecessor dropped such posts).
/// * Label entries without a string `val` are skipped.
fn labels(v: Option<&Value>) -> Option<String> {
    let obj = v?.as_object()?;
    match obj.get("$type") {
        None => {}
        Some(Value::String(t)) if t == SELF_LABELS_TYPE => {}
        Some(_) => return None,
    }
    let values = obj.get("values")?.as_array()?;
    Some(join_tokens(values.iter().filter_map(|l| get_str(l, "val"))).unwrap_or_default())
}

/// One facet feature's token `(prefix, value)`, or `None` for an unknown feature type or a
/// recognised type without its string field.
fn facet_token(feature: &Value) -> Option<(&'static str, &str)> {
    let t = get_str(feature, "$type")?;
    if FACET_MENTION.contains(&t) {
        Some(("mention:", get_str(feature, "did")?))
    } else if FACET_LINK.contains(&t) {
        Some(("link:", get_str(feature, "uri")?))
    } else if FACET_TAG.iter().any(|tag| tag.eq_ignore_ascii_case(t)) {
        // Only the tag type is compared case-insensitively (spec §1.4). The tag value is kept
        // as written (no `#` added or removed, case kept).
        Some(("tag:", get_str(feature, "tag")?))
    } else {
        None
    }
}

/// Facets (spec §1.4): per facet, its feature tokens joined with `;`; the per-facet strings
/// joined with `;`. `None` if `facets` is absent, not an array, or `[]`.
///
/// A facet contributes a segment whatever its features, so a facet with `features: []` (or
/// without a `features` array) gives an empty segment, as the spec documents
/// (`link:…;mention:…;;tag:…`). Unknown feature types are skipped (Q3 recommendation; the
/// predecessor dropped the whole post), so **a facet whose features are all unknown also gives an
/// empty segment**: that is what the predecessor's join would produce had it skipped the
/// feature, and it keeps the segment count equal to the facet count.
fn facets(v: Option<&Value>) -> Option<String> {
    let facets = v?.as_array()?;
    if facets.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (i, facet) in facets.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        let Some(features) = facet.get("features").and_then(Value::as_array) else {
            continue;
        };
        let mut first = true;
        for (prefix, value) in features.iter().filter_map(facet_token) {
            if !first {
                out.push(';');
            }
            first = false;
            out.push_str(prefix);
            out.push_str(value);
        }
    }
    Some(out)
}

/// `{cid, uri}` of a strongRef (embedded record), borrowed from the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrongRef<'a> {
    /// `cid` (empty if missing).
    pub cid: &'a str,
    /// `uri` (empty if missing).
    pub uri: &'a str,
}

impl<'a> StrongRef<'a> {
    /// A strongRef from an object; missing or non-string fields become `""`. `None` if `v` is
    /// not an object.
    fn from_value(v: Option<&'a Value>) -> Option<Self> {
        let v = v.filter(|v| v.is_object())?;
        Some(Self {
            cid: get_str(v, "cid").unwrap_or(""),
            uri: get_str(v, "uri").unwrap_or(""),
        })
    }
}

/// `{description, title, uri}` of an external link card, borrowed from the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct External<'a> {
    /// `description` (empty if missing).
    pub description: &'a str,
    /// `title` (empty if missing).
    pub title: &'a str,
    /// `uri` (empty if missing).
    pub uri: &'a str,
}

/// The 6-key embed object of spec §1.3, before serialisation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EmbedSummary<'a> {
    /// See the dispatch table of §1.3.
    pub has_image: bool,
    /// Image alts joined with `;`.
    pub image_alt_text: Option<String>,
    /// True for record and recordWithMedia embeds.
    pub has_embedded_record: bool,
    /// The quoted record.
    pub embedded_record: Option<StrongRef<'a>>,
    /// True for external embeds only.
    pub has_external: bool,
    /// The link card.
    pub external: Option<External<'a>>,
}

/// `images[*].alt` joined with `;`, empty alts kept (`"A;"`); `images: []` or missing gives `""`.
/// An image without a string `alt` (invalid) counts as an empty alt.
fn image_alts(images_embed: &Value) -> String {
    let mut out = String::new();
    if let Some(images) = images_embed.get("images").and_then(Value::as_array) {
        for (i, image) in images.iter().enumerate() {
            if i > 0 {
                out.push(';');
            }
            out.push_str(get_str(image, "alt").unwrap_or(""));
        }
    }
    out
}

impl<'a> EmbedSummary<'a> {
    /// The summary of `record.embed`.
    pub fn from_record(record: &'a Value) -> Self {
        Self::from_embed(record.get("embed"))
    }

    /// Dispatch on `embed.$type` exactly as the table of spec §1.3 (`X#main` is accepted as `X`):
    ///
    /// * none / `null` → all false / null;
    /// * images → `has_image`, alts joined (`images: []` → `""`, Q4);
    /// * external → `has_external` and `{description, title, uri}` (missing fields `""`); without
    ///   an `external` object it is treated as unknown;
    /// * record → `has_embedded_record` and `{cid, uri}` of `embed.record`; without a `record`
    ///   object it is treated as unknown;
    /// * recordWithMedia → `has_image` **always true** (Q1); alts of images media, `""` for
    ///   any other media (external, video, unknown, missing); the external media is dropped;
    ///   `{cid, uri}` of `embed.record.record` (if that is not an object, `has_embedded_record` is
    ///   false and `embedded_record` null);
    /// * video (Q2) and any unknown type → all false / null.
    pub fn from_embed(embed: Option<&'a Value>) -> Self {
        let Some(embed) = embed.filter(|e| e.is_object()) else {
            return Self::default();
        };
        match union_type(embed) {
            EmbedType::Images => Self {
                has_image: true,
                image_alt_text: Some(image_alts(embed)),
                ..Self::default()
            },
            EmbedType::External => match embed.get("external").filter(|e| e.is_object()) {
                Some(ext) => Self {
                    has_external: true,
                    external: Some(External {
                        description: get_str(ext, "description").unwrap_or(""),
                        title: get_str(ext, "title").unwrap_or(""),
                        uri: get_str(ext, "uri").unwrap_or(""),
                    }),
                    ..Self::default()
                },
                None => Self::default(),
            },
            EmbedType::Record => match StrongRef::from_value(embed.get("record")) {
                Some(r) => Self {
                    has_embedded_record: true,
                    embedded_record: Some(r),
                    ..Self::default()
                },
                None => Self::default(),
            },
            EmbedType::RecordWithMedia => {
                let alts = match embed.get("media") {
                    Some(media) if union_type(media) == EmbedType::Images => image_alts(media),
                    _ => String::new(),
                };
                let record =
                    StrongRef::from_value(embed.get("record").and_then(|r| r.get("record")));
                Self {
                    has_image: true,
                    image_alt_text: Some(alts),
                    has_embedded_record: record.is_some(),
                    embedded_record: record,
                    has_external: false,
                    external: None,
                }
            }
            EmbedType::Other => Self::default(),
        }
    }

    /// Appends the 6-key object (nested orders: `cid, uri` and `description, title, uri`).
    pub fn write_json(&self, w: &mut PyJsonWriter) {
        w.begin_object()
            .field_bool("has_image", self.has_image)
            .field_opt_str("image_alt_text", self.image_alt_text.as_deref())
            .field_bool("has_embedded_record", self.has_embedded_record)
            .key("embedded_record");
        match &self.embedded_record {
            Some(r) => {
                w.begin_object()
                    .field_str("cid", r.cid)
                    .field_str("uri", r.uri)
                    .end_object();
            }
            None => {
                w.null();
            }
        }
        w.field_bool("has_external", self.has_external)
            .key("external");
        match &self.external {
            Some(e) => {
                w.begin_object()
                    .field_str("description", e.description)
                    .field_str("title", e.title)
                    .field_str("uri", e.uri)
                    .end_object();
            }
            None => {
                w.null();
            }
        }
        w.end_object();
    }

    /// The Python-JSON string of the 6-key object (the decoded value of the post's `embed`).
    pub fn to_json(&self) -> String {
        let mut w = PyJsonWriter::with_capacity(
            200 + self.image_alt_text.as_ref().map_or(0, String::len)
                + self
                    .embedded_record
                    .map_or(0, |r| r.cid.len() + r.uri.len() + 20)
                + self.external.map_or(0, |e| {
                    e.description.len() + e.title.len() + e.uri.len() + 40
                }),
        );
        self.write_json(&mut w);
        w.into_string()
    }
}

/// The post's `embed` value (§1.3) for a whole post record: the Python-JSON string of the 6-key
/// embed object (the all-false object when there is no embed).
pub fn embed_json(record: &Value) -> String {
    EmbedSummary::from_record(record).to_json()
}

/// The fields of a like record that the cache keeps (spec §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LikeRecord<'a> {
    /// `record.createdAt`.
    pub created_at: &'a str,
    /// `record.subject.uri` (the liked record).
    pub subject_uri: &'a str,
    /// `record.subject.cid`.
    pub subject_cid: &'a str,
}

impl<'a> LikeRecord<'a> {
    /// Checks `$type == app.bsky.feed.like` and requires string `createdAt`, `subject.uri`,
    /// `subject.cid`. Other fields (e.g. `via`) are ignored.
    pub fn parse(record: &'a Value) -> Result<Self, TransformError> {
        let obj = as_object(record)?;
        check_type(obj, LIKE_NSID)?;
        let created_at = required_str(obj, "createdAt", "createdAt")?;
        let subject = obj
            .get("subject")
            .and_then(Value::as_object)
            .ok_or(TransformError::MissingField("subject"))?;
        Ok(Self {
            created_at,
            subject_uri: required_str(subject, "uri", "subject.uri")?,
            subject_cid: required_str(subject, "cid", "subject.cid")?,
        })
    }
}

/// Writes `{"cid", "uri", "py_type": "com.atproto.repo.strongRef"}`.
fn write_like_subject(w: &mut PyJsonWriter, subject_cid: &str, subject_uri: &str) {
    w.begin_object()
        .field_str("cid", subject_cid)
        .field_str("uri", subject_uri)
        .field_str("py_type", STRONG_REF_NSID)
        .end_object();
}

/// The Era H like cache document (spec §2.1): key order `uri, cid, author, record`, with
/// `record = {"createdAt", "subject": {"cid", "uri", "py_type"}, "py_type": "app.bsky.feed.like"}`
/// (a nested object, camelCase `createdAt`, constant `py_type`s).
pub fn like_cache_json(
    uri: &str,
    cid: &str,
    author: &str,
    record: &Value,
) -> Result<String, TransformError> {
    let like = LikeRecord::parse(record)?;
    let mut w = PyJsonWriter::with_capacity(
        200 + uri.len()
            + cid.len()
            + author.len()
            + like.subject_uri.len()
            + like.subject_cid.len(),
    );
    w.begin_object()
        .field_str("uri", uri)
        .field_str("cid", cid)
        .field_str("author", author)
        .key("record")
        .begin_object()
        .field_str("createdAt", like.created_at)
        .key("subject");
    write_like_subject(&mut w, like.subject_cid, like.subject_uri);
    w.field_str("py_type", LIKE_NSID).end_object().end_object();
    Ok(w.into_string())
}

/// The Era S like `record` string (spec §2.1), the value of the Parquet `record` column:
/// `{"created_at": …, "subject": {"cid": …, "uri": …, "py_type": "com.atproto.repo.strongRef"},
/// "py_type": "app.bsky.feed.like"}` in Python JSON (snake_case `created_at`).
pub fn like_record_string_era_s(created_at: &str, subject_cid: &str, subject_uri: &str) -> String {
    let mut w =
        PyJsonWriter::with_capacity(140 + created_at.len() + subject_cid.len() + subject_uri.len());
    w.begin_object()
        .field_str("created_at", created_at)
        .key("subject");
    write_like_subject(&mut w, subject_cid, subject_uri);
    w.field_str("py_type", LIKE_NSID).end_object();
    w.into_string()
}

/// The fields of a follow record that the cache keeps (spec §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowRecord<'a> {
    /// `record.createdAt`.
    pub created_at: &'a str,
    /// `record.subject`: the followee DID.
    pub subject: &'a str,
}

impl<'a> FollowRecord<'a> {
    /// Checks `$type == app.bsky.graph.follow` and requires string `createdAt` and `subject`.
    pub fn parse(record: &'a Value) -> Result<Self, TransformError> {
        let obj = as_object(record)?;
        check_type(obj, FOLLOW_NSID)?;
        Ok(Self {
            created_at: required_str(obj, "createdAt", "createdAt")?,
            subject: required_str(obj, "subject", "subject")?,
        })
    }
}

/// The Era H follow cache document (spec §2.2): key order
/// `uri, cid, record, author, follower_did, followee_did`, with
/// `record = {"createdAt", "subject", "py_type": "app.bsky.graph.follow"}`; the follower is the
/// envelope author, the followee `record.subject`.
pub fn follow_cache_json(
    uri: &str,
    cid: &str,
    author: &str,
    record: &Value,
) -> Result<String, TransformError> {
    let follow = FollowRecord::parse(record)?;
    let mut w = PyJsonWriter::with_capacity(
        200 + uri.len() + cid.len() + 2 * author.len() + 2 * follow.subject.len(),
    );
    w.begin_object()
        .field_str("uri", uri)
        .field_str("cid", cid)
        .key("record")
        .begin_object()
        .field_str("createdAt", follow.created_at)
        .field_str("subject", follow.subject)
        .field_str("py_type", FOLLOW_NSID)
        .end_object()
        .field_str("author", author)
        .field_str("follower_did", author)
        .field_str("followee_did", follow.subject)
        .end_object();
    Ok(w.into_string())
}

/// Cache document for the record types the predecessor never wrote (reposts, blocks, profiles,
/// …; our own format, same Python-JSON style): key order `uri, cid, author, collection, record`.
///
/// `record` is the record itself, unchanged, in the atproto JSON data model (`$type` kept, links
/// as `{"$link": …}`, bytes as `{"$bytes": …}`, blobs as `{"$type": "blob", "ref": …}`), written
/// as a nested object whose keys are in sorted order (`serde_json`'s map order). No field is
/// validated or interpreted here: the caller has already checked the collection.
pub fn generic_record_cache_json(
    uri: &str,
    cid: &str,
    author: &str,
    collection: &str,
    record: &Value,
) -> String {
    let mut w = PyJsonWriter::with_capacity(256 + uri.len() + cid.len() + author.len());
    w.begin_object()
        .field_str("uri", uri)
        .field_str("cid", cid)
        .field_str("author", author)
        .field_str("collection", collection)
        .field_value("record", record)
        .end_object();
    w.into_string()
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) — H. Hinnant's
/// `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats a Unix time (seconds, UTC) as `%Y-%m-%d-%H:%M:%S`, the `synctimestamp` format
/// (spec §1.5), e.g. `1727877808` → `2024-10-02-14:03:28`. The first 10 characters are the
/// `partition_date` (`%Y-%m-%d`). Valid for years 0..=9999, like Python's `strftime`.
pub fn sync_timestamp(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}-{:02}:{:02}:{:02}",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn post(record: Value) -> Result<Post, TransformError> {
        transform_post(
            "at://did:plc:a/app.bsky.feed.post/1",
            "bafy",
            "did:plc:a",
            &record,
            "2024-10-02-14:03:28",
        )
    }

    fn base(extra: Value) -> Value {
        let mut r = json!({"$type": "app.bsky.feed.post", "text": "t", "createdAt": "2024-01-01T00:00:00Z"});
        if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                r.insert(k.clone(), v.clone());
            }
        }
        r
    }

    #[test]
    fn sync_timestamp_known_dates() {
        assert_eq!(sync_timestamp(0), "1970-01-01-00:00:00");
        assert_eq!(sync_timestamp(1_727_877_808), "2024-10-02-14:03:28");
        // Leap day 2024-02-29T23:59:59Z and the following second.
        assert_eq!(sync_timestamp(1_709_251_199), "2024-02-29-23:59:59");
        assert_eq!(sync_timestamp(1_709_251_200), "2024-03-01-00:00:00");
        // 2000-02-29 (400-year leap) and 2100-03-01 (1900/2100 are not leap years).
        assert_eq!(sync_timestamp(951_782_400), "2000-02-29-00:00:00");
        assert_eq!(sync_timestamp(4_107_542_400), "2100-03-01-00:00:00");
        assert_eq!(sync_timestamp(1_735_689_599), "2024-12-31-23:59:59");
        assert_eq!(sync_timestamp(1_735_689_600), "2025-01-01-00:00:00");
        assert_eq!(sync_timestamp(-1), "1969-12-31-23:59:59");
        assert_eq!(sync_timestamp(253_402_300_799), "9999-12-31-23:59:59");
    }

    #[test]
    fn sync_timestamp_matches_day_by_day_walk() {
        // Walk every day from 1970 to 2100 and compare with a naive calendar.
        let mut days: i64 = 0;
        for year in 1970..2100i64 {
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let lens = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            for (m, len) in lens.iter().enumerate() {
                for d in 1..=*len {
                    let want = format!("{year:04}-{:02}-{d:02}-12:34:56", m + 1);
                    assert_eq!(sync_timestamp(days * 86_400 + 45_296), want);
                    days += 1;
                }
            }
        }
    }

    #[test]
    fn errors_only_for_unusable_posts() {
        assert_eq!(post(json!("x")), Err(TransformError::NotAnObject));
        assert_eq!(
            post(json!({"text": "t", "createdAt": "c"})),
            Err(TransformError::WrongType {
                expected: POST_NSID,
                found: None
            })
        );
        assert_eq!(
            post(json!({"$type": "app.bsky.feed.like", "text": "t", "createdAt": "c"})),
            Err(TransformError::WrongType {
                expected: POST_NSID,
                found: Some("app.bsky.feed.like".into())
            })
        );
        assert_eq!(
            post(json!({"$type": "app.bsky.feed.post", "text": "t"})),
            Err(TransformError::MissingField("createdAt"))
        );
        assert_eq!(
            post(json!({"$type": "app.bsky.feed.post", "text": "t", "createdAt": 5})),
            Err(TransformError::MissingField("createdAt"))
        );
        assert_eq!(
            post(json!({"$type": "app.bsky.feed.post", "createdAt": "c"})),
            Err(TransformError::MissingField("text"))
        );
        assert_eq!(
            post(json!({"$type": "app.bsky.feed.post", "text": null, "createdAt": "c"})),
            Err(TransformError::MissingField("text"))
        );
        assert!(post(base(json!({"text": ""}))).is_ok());
    }

    #[test]
    fn empty_lists_and_absent_fields() {
        let p = post(base(
            json!({"langs": [], "tags": [], "entities": [], "facets": []}),
        ))
        .unwrap();
        assert_eq!(
            (p.langs, p.tags, p.entities, p.facets, p.labels),
            (None, None, None, None, None)
        );
        let p = post(base(
            json!({"labels": {"$type": SELF_LABELS_TYPE, "values": []}}),
        ))
        .unwrap();
        assert_eq!(p.labels.as_deref(), Some(""));
        let p = post(base(json!({"labels": null, "reply": null, "embed": null}))).unwrap();
        assert_eq!(p.labels, None);
        assert_eq!(p.reply_root, None);
        assert_eq!(p.embed, embed_json(&json!({})));
    }

    #[test]
    fn joins_keep_order_duplicates_and_separator() {
        let p = post(base(json!({
            "langs": ["en", "de", "en"],
            "tags": ["a;b", "c"],
            "entities": [{"type": "mention", "value": "did:x", "index": {"start": 0, "end": 1}},
                         {"type": "link", "value": "https://e"}],
            "labels": {"$type": SELF_LABELS_TYPE, "values": [{"val": "porn"}, {"val": "porn"}]}
        })))
        .unwrap();
        assert_eq!(p.langs.as_deref(), Some("en;de;en"));
        assert_eq!(p.tags.as_deref(), Some("a;b;c"));
        assert_eq!(p.entities.as_deref(), Some("did:x;https://e"));
        assert_eq!(p.labels.as_deref(), Some("porn;porn"));
    }

    #[test]
    fn unknown_label_union_member_is_skipped_not_dropped() {
        let p = post(base(
            json!({"labels": {"$type": "com.example.labels", "values": [{"val": "x"}]}}),
        ))
        .unwrap();
        assert_eq!(p.labels, None);
        // A missing $type is accepted.
        let p = post(base(json!({"labels": {"values": [{"val": "x"}]}}))).unwrap();
        assert_eq!(p.labels.as_deref(), Some("x"));
    }

    #[test]
    fn facet_type_spellings() {
        let p = post(base(json!({"facets": [
            {"features": [
                {"$type": "app.bsky.richtext.facet.mention", "did": "did:plc:m"},
                {"$type": "app.bsky.richtext.facet.link", "uri": "https://l"},
                {"$type": "APP.bsky.richtext.facet#TAG", "tag": "MixedCase"},
                {"$type": "app.bsky.richtext.facet.Tag", "tag": "#hash"},
                {"$type": "App.bsky.richtext.facet#link", "uri": "https://not-matched"},
                {"$type": "app.bsky.richtext.facet#mention"}
            ]}
        ]})))
        .unwrap();
        assert_eq!(
            p.facets.as_deref(),
            Some("mention:did:plc:m;link:https://l;tag:MixedCase;tag:#hash")
        );
    }

    #[test]
    fn facet_segments() {
        let p = post(base(json!({"facets": [
            {"features": [{"$type": "com.example.unknown"}]},
            {"index": {"byteStart": 0, "byteEnd": 1}},
            {"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "x"}]}
        ]})))
        .unwrap();
        assert_eq!(p.facets.as_deref(), Some(";;tag:x"));
        let p = post(base(json!({"facets": [{"features": []}]}))).unwrap();
        assert_eq!(p.facets.as_deref(), Some(""));
    }

    #[test]
    fn embed_dispatch_edge_cases() {
        let e = |embed: Value| EmbedSummary::from_embed(Some(&embed)).to_json();
        let none = EmbedSummary::default().to_json();
        assert_eq!(
            e(json!({"$type": "app.bsky.embed.video", "alt": "v"})),
            none
        );
        assert_eq!(e(json!({"$type": "com.example.embed"})), none);
        assert_eq!(e(json!({"images": []})), none);
        assert_eq!(e(json!({"$type": "app.bsky.embed.external"})), none);
        assert_eq!(e(json!({"$type": "app.bsky.embed.record"})), none);
        assert_eq!(e(json!("not an object")), none);

        let v = json!({"$type": "app.bsky.embed.images#main", "images": [{"alt": "A"}, {"alt": ""}, {}]});
        let imgs = EmbedSummary::from_embed(Some(&v));
        assert!(imgs.has_image);
        assert_eq!(imgs.image_alt_text.as_deref(), Some("A;;"));

        let v = json!({"$type": "app.bsky.embed.recordWithMedia",
            "media": {"$type": "app.bsky.embed.video", "alt": "v"},
            "record": {"record": {"uri": "at://u", "cid": "c"}}});
        assert_eq!(
            EmbedSummary::from_embed(Some(&v)),
            EmbedSummary {
                has_image: true,
                image_alt_text: Some(String::new()),
                has_embedded_record: true,
                embedded_record: Some(StrongRef {
                    cid: "c",
                    uri: "at://u"
                }),
                has_external: false,
                external: None,
            }
        );
        let v = json!({"$type": "app.bsky.embed.recordWithMedia"});
        let rwm = EmbedSummary::from_embed(Some(&v));
        assert!(rwm.has_image && !rwm.has_embedded_record && rwm.embedded_record.is_none());
        assert_eq!(rwm.image_alt_text.as_deref(), Some(""));
    }

    #[test]
    fn post_round_trips_through_serde() {
        let p = post(base(json!({"langs": ["en"]}))).unwrap();
        let back: Post = serde_json::from_str(&p.to_cache_json()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn like_and_follow_errors() {
        let like = |r: Value| like_cache_json("u", "c", "a", &r);
        assert_eq!(
            like(json!({"$type": LIKE_NSID, "subject": {"uri": "u", "cid": "c"}})),
            Err(TransformError::MissingField("createdAt"))
        );
        assert_eq!(
            like(json!({"$type": LIKE_NSID, "createdAt": "t"})),
            Err(TransformError::MissingField("subject"))
        );
        assert_eq!(
            like(json!({"$type": LIKE_NSID, "createdAt": "t", "subject": {"cid": "c"}})),
            Err(TransformError::MissingField("subject.uri"))
        );
        assert_eq!(
            like(json!({"$type": LIKE_NSID, "createdAt": "t", "subject": {"uri": "u"}})),
            Err(TransformError::MissingField("subject.cid"))
        );
        assert!(matches!(
            like(
                json!({"$type": POST_NSID, "createdAt": "t", "subject": {"uri": "u", "cid": "c"}})
            ),
            Err(TransformError::WrongType { .. })
        ));
        let follow = |r: Value| follow_cache_json("u", "c", "a", &r);
        assert_eq!(
            follow(json!({"$type": FOLLOW_NSID, "createdAt": "t"})),
            Err(TransformError::MissingField("subject"))
        );
        assert_eq!(
            follow(json!({"$type": FOLLOW_NSID, "subject": "did:plc:x"})),
            Err(TransformError::MissingField("createdAt"))
        );
        assert!(
            follow(json!({"$type": FOLLOW_NSID, "createdAt": "t", "subject": "did:plc:x"})).is_ok()
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            TransformError::MissingField("subject.uri").to_string(),
            "required field \"subject.uri\" is missing or has the wrong type"
        );
    }
}
