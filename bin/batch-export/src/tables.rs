//! The table catalogue: which cache folder feeds which Parquet table, each table's explicit schema,
//! and the typed parsing of one cache file into one row of that schema.
//!
//! Schemas are declared once, here ([`TABLES`]). Cache JSON is deserialized into typed structs
//! (serde, no inference): a value of the wrong JSON type is an error (the file is quarantined), so
//! a surprising record can never change a column type.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Physical column types used by the tables (Parquet `BYTE_ARRAY (String)`, `INT64`, `BOOLEAN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColType {
    Str,
    I64,
    Bool,
}

impl ColType {
    pub fn name(self) -> &'static str {
        match self {
            ColType::Str => "string",
            ColType::I64 => "int64",
            ColType::Bool => "bool",
        }
    }
}

/// Every output table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableId {
    StudyPost,
    StudyLike,
    LikeOnUserPost,
    ReplyToUserPost,
    SocialNetwork,
    InNetworkPost,
    StudyRepost,
    RepostOfUserPost,
    QuoteOfUserPost,
    StudyBlock,
    StudyProfile,
    StudyAccount,
    StudyDelete,
    InNetworkDelete,
}

/// One output table: where it goes and its columns, in order.
#[derive(Debug)]
pub struct TableDef {
    pub id: TableId,
    /// Path under the output root; files go to `<path>/active/partition_date=YYYY-MM-DD/`.
    pub path: &'static str,
    pub columns: &'static [(&'static str, ColType)],
}

use ColType::{Bool, Str, I64};

/// The 23 columns of the consolidated post (predecessor-data-format.md §1.2, §4.3, §4.4).
pub const POST_COLUMNS: &[(&str, ColType)] = &[
    ("uri", Str),
    ("cid", Str),
    ("indexed_at", Str),
    ("author_did", Str),
    ("author_handle", Str),
    ("author_avatar", Str),
    ("author_display_name", Str),
    ("created_at", Str),
    ("text", Str),
    ("embed", Str),
    ("entities", Str),
    ("facets", Str),
    ("labels", Str),
    ("langs", Str),
    ("reply_parent", Str),
    ("reply_root", Str),
    ("tags", Str),
    ("synctimestamp", Str),
    ("url", Str),
    ("source", Str),
    ("like_count", I64),
    ("reply_count", I64),
    ("repost_count", I64),
];

/// Era S like tables (§4.3): `record` is the Python-JSON string with `created_at`.
pub const LIKE_COLUMNS: &[(&str, ColType)] = &[
    ("author", Str),
    ("cid", Str),
    ("record", Str),
    ("uri", Str),
    ("synctimestamp", Str),
];

/// `scraped_user_social_network` (§4.5), in the service's `dtypes_map` order.
pub const SOCIAL_NETWORK_COLUMNS: &[(&str, ColType)] = &[
    ("follow_handle", Str),
    ("follow_url", Str),
    ("follow_did", Str),
    ("follower_handle", Str),
    ("follower_url", Str),
    ("follower_did", Str),
    ("insert_timestamp", Str),
    ("relationship_to_study_user", Str),
];

pub const REPOST_COLUMNS: &[(&str, ColType)] = &[
    ("uri", Str),
    ("cid", Str),
    ("author", Str),
    ("subject_uri", Str),
    ("subject_cid", Str),
    ("created_at", Str),
    ("record", Str),
    ("synctimestamp", Str),
];

pub const BLOCK_COLUMNS: &[(&str, ColType)] = &[
    ("uri", Str),
    ("cid", Str),
    ("author", Str),
    ("subject", Str),
    ("created_at", Str),
    ("record", Str),
    ("synctimestamp", Str),
];

pub const PROFILE_COLUMNS: &[(&str, ColType)] = &[
    ("uri", Str),
    ("cid", Str),
    ("author", Str),
    ("rev", Str),
    ("display_name", Str),
    ("description", Str),
    ("created_at", Str),
    ("record", Str),
    ("synctimestamp", Str),
];

pub const ACCOUNT_COLUMNS: &[(&str, ColType)] = &[
    ("did", Str),
    ("kind", Str),
    ("seq", I64),
    ("time", Str),
    ("handle", Str),
    ("active", Bool),
    ("status", Str),
    ("synctimestamp", Str),
];

pub const STUDY_DELETE_COLUMNS: &[(&str, ColType)] = &[
    ("uri", Str),
    ("author", Str),
    ("collection", Str),
    ("rkey", Str),
    ("seq", I64),
    ("rev", Str),
    ("time", Str),
    ("category", Str),
    ("synctimestamp", Str),
];

pub const IN_NETWORK_DELETE_COLUMNS: &[(&str, ColType)] = &[
    ("uri", Str),
    ("author", Str),
    ("collection", Str),
    ("rkey", Str),
    ("seq", I64),
    ("rev", Str),
    ("time", Str),
    ("synctimestamp", Str),
];

/// The catalogue, in export order.
pub const TABLES: &[TableDef] = &[
    TableDef {
        id: TableId::StudyPost,
        path: "study_user_activity/create/post",
        columns: POST_COLUMNS,
    },
    TableDef {
        id: TableId::StudyLike,
        path: "study_user_activity/create/like",
        columns: LIKE_COLUMNS,
    },
    TableDef {
        id: TableId::LikeOnUserPost,
        path: "study_user_activity/create/like_on_user_post",
        columns: LIKE_COLUMNS,
    },
    TableDef {
        id: TableId::ReplyToUserPost,
        path: "study_user_activity/create/reply_to_user_post",
        columns: POST_COLUMNS,
    },
    TableDef {
        id: TableId::SocialNetwork,
        path: "scraped_user_social_network",
        columns: SOCIAL_NETWORK_COLUMNS,
    },
    TableDef {
        id: TableId::InNetworkPost,
        path: "in_network_user_activity",
        columns: POST_COLUMNS,
    },
    TableDef {
        id: TableId::StudyRepost,
        path: "study_user_activity/create/repost",
        columns: REPOST_COLUMNS,
    },
    TableDef {
        id: TableId::RepostOfUserPost,
        path: "study_user_activity/create/repost_of_user_post",
        columns: REPOST_COLUMNS,
    },
    TableDef {
        id: TableId::QuoteOfUserPost,
        path: "study_user_activity/create/quote_of_user_post",
        columns: POST_COLUMNS,
    },
    TableDef {
        id: TableId::StudyBlock,
        path: "study_user_activity/create/block",
        columns: BLOCK_COLUMNS,
    },
    TableDef {
        id: TableId::StudyProfile,
        path: "study_user_activity/create/profile",
        columns: PROFILE_COLUMNS,
    },
    TableDef {
        id: TableId::StudyAccount,
        path: "study_user_activity/account",
        columns: ACCOUNT_COLUMNS,
    },
    TableDef {
        id: TableId::StudyDelete,
        path: "study_user_activity/delete",
        columns: STUDY_DELETE_COLUMNS,
    },
    TableDef {
        id: TableId::InNetworkDelete,
        path: "in_network_user_activity_delete",
        columns: IN_NETWORK_DELETE_COLUMNS,
    },
];

pub fn table(id: TableId) -> &'static TableDef {
    TABLES
        .iter()
        .find(|t| t.id == id)
        .expect("every TableId is in TABLES")
}

/// How the files of one cache folder are parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A consolidated post object (23 keys).
    Post(TableId),
    /// An Era H like object (or Era S, with `record` already a string).
    Like(TableId),
    /// A follow object; `relationship` is `"follow"` (folder `follower/`) or `"follower"`.
    Follow {
        relationship: &'static str,
    },
    /// Generic record `{uri, cid, author, collection, record}` of a repost.
    Repost(TableId),
    Block,
    Profile,
    Account,
    /// `study_user_activity/delete/<category>/...`.
    StudyDelete {
        category: String,
    },
    /// `in_network_user_activity/delete/post/<did>/`.
    InNetworkDelete,
}

impl Source {
    pub fn table(&self) -> TableId {
        match self {
            Source::Post(t) | Source::Like(t) | Source::Repost(t) => *t,
            Source::Follow { .. } => TableId::SocialNetwork,
            Source::Block => TableId::StudyBlock,
            Source::Profile => TableId::StudyProfile,
            Source::Account => TableId::StudyAccount,
            Source::StudyDelete { .. } => TableId::StudyDelete,
            Source::InNetworkDelete => TableId::InNetworkDelete,
        }
    }

    /// The top-level key whose value may differ between two writes of the same file without the
    /// file meaning anything else, so it is left out of the file's exported key: posts carry an
    /// ingest `synctimestamp` that a writer replay changes; an account event delivered again (by
    /// another relay, after a relay swap) has another `seq` but the same file name.
    pub fn volatile_key(&self) -> Option<&'static str> {
        match self {
            Source::Post(_) => Some("synctimestamp"),
            Source::Account => Some("seq"),
            _ => None,
        }
    }
}

/// The record kinds a study user's own deletes are filed under (`delete/<kind>/`).
const DELETE_KINDS: &[&str] = &["post", "like", "repost", "follow", "block", "profile"];

/// Folders nested by the rkey of a post (the nesting level is not part of the table); `like` is
/// nested by the liked post's rkey.
const NESTED_BY_RKEY: &[&str] = &[
    "like",
    "reply_to_user_post",
    "like_on_user_post",
    "repost_of_user_post",
    "quote_of_user_post",
];

/// Maps a cache-relative directory (`/`-separated) to the table its files feed, or `None` for a
/// folder that holds no exportable files (the skeleton's parents, legacy folders, unknown ones).
pub fn classify(rel_dir: &str) -> Option<Source> {
    let parts: Vec<&str> = rel_dir.split('/').collect();
    match parts.as_slice() {
        ["study_user_activity", "create", "post"] => Some(Source::Post(TableId::StudyPost)),
        ["study_user_activity", "create", "reply_to_user_post", _] => {
            Some(Source::Post(TableId::ReplyToUserPost))
        }
        ["study_user_activity", "create", "quote_of_user_post", _] => {
            Some(Source::Post(TableId::QuoteOfUserPost))
        }
        ["study_user_activity", "create", "like", _] => Some(Source::Like(TableId::StudyLike)),
        ["study_user_activity", "create", "like_on_user_post", _] => {
            Some(Source::Like(TableId::LikeOnUserPost))
        }
        ["study_user_activity", "create", "follow", "follower"] => Some(Source::Follow {
            relationship: "follow",
        }),
        ["study_user_activity", "create", "follow", "followee"] => Some(Source::Follow {
            relationship: "follower",
        }),
        ["study_user_activity", "create", "repost"] => Some(Source::Repost(TableId::StudyRepost)),
        ["study_user_activity", "create", "repost_of_user_post", _] => {
            Some(Source::Repost(TableId::RepostOfUserPost))
        }
        ["study_user_activity", "create", "block"] => Some(Source::Block),
        ["study_user_activity", "create", "profile"] => Some(Source::Profile),
        ["study_user_activity", "account"] => Some(Source::Account),
        // A study user's own delete (`delete/<kind>/`), or the mirror of a routed create folder
        // (`delete/<folder>/<rkey>/`, `delete/follow/followee/`): the category is the folder
        // without its rkey nesting. Any other folder under `delete/` is unknown (exit 3).
        ["study_user_activity", "delete", kind] if DELETE_KINDS.contains(kind) => {
            Some(Source::StudyDelete {
                category: (*kind).to_owned(),
            })
        }
        ["study_user_activity", "delete", nested, _] if NESTED_BY_RKEY.contains(nested) => {
            Some(Source::StudyDelete {
                category: (*nested).to_owned(),
            })
        }
        ["study_user_activity", "delete", "follow", side @ ("follower" | "followee")] => {
            Some(Source::StudyDelete {
                category: format!("follow/{side}"),
            })
        }
        ["in_network_user_activity", "delete", "post", _] => Some(Source::InNetworkDelete),
        ["in_network_user_activity", "create", "post", _] => {
            Some(Source::Post(TableId::InNetworkPost))
        }
        _ => None,
    }
}

/// One cell of a row, typed by the table schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Str(Box<str>),
    I64(i64),
    Bool(bool),
}

impl Cell {
    fn str(s: impl Into<Box<str>>) -> Cell {
        Cell::Str(s.into())
    }

    fn fits(&self, ty: ColType) -> bool {
        matches!(
            (self, ty),
            (Cell::Null, _)
                | (Cell::Str(_), ColType::Str)
                | (Cell::I64(_), ColType::I64)
                | (Cell::Bool(_), ColType::Bool)
        )
    }
}

/// One parsed cache file: its row and the key rows are de-duplicated by within a run.
#[derive(Debug)]
pub struct Parsed {
    pub table: TableId,
    pub row: Vec<Cell>,
    /// Hash of the table and its natural key (URI; (follow, follower, relationship) for follows).
    pub dedupe: u128,
    /// Keys of the file the table does not know (counted, not exported).
    pub unknown_keys: u64,
}

fn dedupe_key(table: TableId, parts: &[&str]) -> u128 {
    let mut h = Sha256::new();
    h.update([table as u8]);
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

/// The JSON type a cache-file key must have. `Col` values may be `null`; `Any` is kept as JSON
/// (nested records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Col(ColType),
    Any,
}

use Slot::{Any, Col};

/// The keys each kind of cache file must carry, every one of them (a missing key sends the
/// file to quarantine; it never silently becomes `null`). Keys not listed are counted.
pub const LIKE_KEYS: &[(&str, Slot)] = &[
    ("uri", Col(Str)),
    ("cid", Col(Str)),
    ("author", Col(Str)),
    ("record", Any),
];
pub const FOLLOW_KEYS: &[(&str, Slot)] = &[
    ("uri", Col(Str)),
    ("cid", Col(Str)),
    ("record", Any),
    ("author", Col(Str)),
    ("follower_did", Col(Str)),
    ("followee_did", Col(Str)),
];
pub const GENERIC_KEYS: &[(&str, Slot)] = &[
    ("uri", Col(Str)),
    ("cid", Col(Str)),
    ("author", Col(Str)),
    ("collection", Col(Str)),
    ("record", Any),
];
pub const ACCOUNT_KEYS: &[(&str, Slot)] = &[
    ("did", Col(Str)),
    ("kind", Col(Str)),
    ("seq", Col(I64)),
    ("time", Col(Str)),
    ("handle", Col(Str)),
    ("active", Col(Bool)),
    ("status", Col(Str)),
];
pub const DELETE_KEYS: &[(&str, Slot)] = &[
    ("uri", Col(Str)),
    ("author", Col(Str)),
    ("collection", Col(Str)),
    ("rkey", Col(Str)),
    ("seq", Col(I64)),
    ("rev", Col(Str)),
    ("time", Col(Str)),
];

/// A post file's keys: the 23 post columns themselves.
fn post_keys() -> &'static [(&'static str, Slot)] {
    static KEYS: std::sync::OnceLock<Vec<(&'static str, Slot)>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| POST_COLUMNS.iter().map(|(n, t)| (*n, Col(*t))).collect())
}

/// A value read for one key.
#[derive(Debug)]
enum Value1 {
    Cell(Cell),
    Json(serde_json::Value),
    /// Type-checked and dropped (`check`: the column is read again by Polars).
    Checked,
}

/// One cache file's top-level object, read against its key list: every listed key's value,
/// type-checked; unknown keys skipped and counted.
struct Obj {
    keys: &'static [(&'static str, Slot)],
    values: Vec<Option<Value1>>,
    unknown: u64,
}

impl Obj {
    fn parse(keys: &'static [(&'static str, Slot)], bytes: &[u8]) -> Result<Obj, String> {
        Obj::parse_keeping(keys, None, bytes)
    }

    /// [`Obj::parse`], keeping only the values of `keep` (all with `None`): the others are
    /// type-checked exactly as strictly, without being copied.
    fn parse_keeping(
        keys: &'static [(&'static str, Slot)],
        keep: Option<&[&str]>,
        bytes: &[u8],
    ) -> Result<Obj, String> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let obj = ObjSeed(keys, keep)
            .deserialize(&mut de)
            .map_err(|e| format!("invalid JSON: {e}"))?;
        de.end().map_err(|e| format!("invalid JSON: {e}"))?;
        let missing: Vec<&str> = keys
            .iter()
            .zip(&obj.values)
            .filter(|(_, v)| v.is_none())
            .map(|((k, _), _)| *k)
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing required key(s): {}", missing.join(", ")));
        }
        Ok(obj)
    }

    fn index(&self, key: &str) -> usize {
        self.keys
            .iter()
            .position(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{key} is not in the key list"))
    }

    /// The cell of `key` (moved out).
    fn cell(&mut self, key: &str) -> Cell {
        let i = self.index(key);
        self.cell_at(i)
    }

    /// The cell of the `i`th key (moved out).
    fn cell_at(&mut self, i: usize) -> Cell {
        match self.values[i].take() {
            Some(Value1::Cell(c)) => c,
            _ => Cell::Null,
        }
    }

    /// The string of `key`, which must not be null.
    fn required_str(&mut self, key: &str) -> Result<String, String> {
        match self.cell(key) {
            Cell::Str(s) => Ok(s.into_string()),
            _ => Err(format!("{key} is null")),
        }
    }

    fn peek_str(&self, key: &str) -> Option<&str> {
        match &self.values[self.index(key)] {
            Some(Value1::Cell(Cell::Str(s))) => Some(s),
            _ => None,
        }
    }

    fn json(&mut self, key: &str) -> serde_json::Value {
        let i = self.index(key);
        match self.values[i].take() {
            Some(Value1::Json(v)) => v,
            _ => serde_json::Value::Null,
        }
    }
}

struct ObjSeed<'k>(&'static [(&'static str, Slot)], Option<&'k [&'k str]>);

/// A key, borrowed from the input when it has no escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The value of `key`, of the JSON type `slot`; kept unless `keep` is false (then a string is
/// type-checked without being copied).
struct SlotSeed(&'static str, Slot, bool);

/// A string (or `null`) that is only type-checked: what `Option<String>` accepts, without the copy.
struct CheckedStr;

impl<'de> Deserialize<'de> for CheckedStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CheckedStr;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, _: &str) -> Result<CheckedStr, E> {
                Ok(CheckedStr)
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for SlotSeed {
    type Value = Value1;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value1, D::Error> {
        use serde::de::Error;
        let (key, slot, keep) = (self.0, self.1, self.2);
        let wrong = |what: &str| D::Error::custom(format!("{key}: {what}"));
        match slot {
            Col(ColType::Str) if !keep => match Option::<CheckedStr>::deserialize(d) {
                Ok(_) => Ok(Value1::Checked),
                Err(e) => Err(wrong(&format!("expected a string or null ({e})"))),
            },
            Any => serde_json::Value::deserialize(d).map(Value1::Json),
            Col(ColType::Str) => match Option::<String>::deserialize(d) {
                Ok(v) => Ok(Value1::Cell(v.map_or(Cell::Null, Cell::str))),
                Err(e) => Err(wrong(&format!("expected a string or null ({e})"))),
            },
            Col(ColType::I64) => match Option::<i64>::deserialize(d) {
                Ok(v) => Ok(Value1::Cell(v.map_or(Cell::Null, Cell::I64))),
                Err(e) => Err(wrong(&format!("expected an integer or null ({e})"))),
            },
            Col(ColType::Bool) => match Option::<bool>::deserialize(d) {
                Ok(v) => Ok(Value1::Cell(v.map_or(Cell::Null, Cell::Bool))),
                Err(e) => Err(wrong(&format!("expected true, false or null ({e})"))),
            },
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for ObjSeed<'_> {
    type Value = Obj;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Obj, D::Error> {
        struct V<'k>(&'static [(&'static str, Slot)], Option<&'k [&'k str]>);
        impl<'de> serde::de::Visitor<'de> for V<'_> {
            type Value = Obj;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Obj, A::Error> {
                use serde::de::Error;
                let keys = self.0;
                let mut obj = Obj {
                    keys,
                    values: keys.iter().map(|_| None).collect(),
                    unknown: 0,
                };
                // The writer writes the keys in the declared order: try the next expected one
                // first (one comparison per key), then look the key up.
                let mut next = 0;
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    let found = match keys.get(next) {
                        Some((name, _)) if *name == k => Some(next),
                        _ => keys.iter().position(|(name, _)| *name == k),
                    };
                    match found {
                        Some(i) => {
                            next = i + 1;
                            if obj.values[i].is_some() {
                                return Err(A::Error::custom(format!("duplicate key {k}")));
                            }
                            let keep = self.1.is_none_or(|keep| keep.contains(&keys[i].0));
                            obj.values[i] =
                                Some(map.next_value_seed(SlotSeed(keys[i].0, keys[i].1, keep))?);
                        }
                        None => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            obj.unknown += 1;
                        }
                    }
                }
                Ok(obj)
            }
        }
        d.deserialize_map(V(self.0, self.1))
    }
}

fn record_str(record: &serde_json::Value, key: &str) -> Result<Cell, String> {
    match record.get(key) {
        None | Some(serde_json::Value::Null) => Ok(Cell::Null),
        Some(serde_json::Value::String(s)) => Ok(Cell::str(s.as_str())),
        Some(other) => Err(format!("record.{key} is not a string: {other}")),
    }
}

fn subject_field(record: &serde_json::Value, key: &str) -> Result<Cell, String> {
    match record.get("subject") {
        Some(subject) => record_str(subject, key),
        None => Ok(Cell::Null),
    }
}

/// `..._rev=<rev>.json` -> `<rev>`.
fn rev_from_name(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".json")?;
    let (_, rev) = stem.rsplit_once("_rev=")?;
    Some(rev)
}

/// The Era S like `record` string (§2.1) from an Era H record object, or the string itself.
fn like_record(record: serde_json::Value) -> Result<String, String> {
    use serde_json::Value;
    match record {
        Value::String(s) => Ok(s),
        Value::Object(o) => {
            let created = o
                .get("createdAt")
                .or_else(|| o.get("created_at"))
                .and_then(Value::as_str)
                .ok_or("record.createdAt is missing or not a string")?;
            let subject = o.get("subject").ok_or("record.subject is missing")?;
            let cid = subject
                .get("cid")
                .and_then(Value::as_str)
                .ok_or("record.subject.cid is missing or not a string")?;
            let uri = subject
                .get("uri")
                .and_then(Value::as_str)
                .ok_or("record.subject.uri is missing or not a string")?;
            Ok(sync_core::transform::like_record_string_era_s(
                created, cid, uri,
            ))
        }
        other => Err(format!("record is neither an object nor a string: {other}")),
    }
}

/// Builds a row of `table` column by column, by name: `cell(index, name)` gives each column's
/// value, which must fit the declared type (`index` is the column's position, which for the
/// post tables is also the position of its key in [`post_keys`]).
fn row_by_name(
    table: TableId,
    mut cell: impl FnMut(usize, &str) -> Result<Cell, String>,
) -> Result<Vec<Cell>, String> {
    self::table(table)
        .columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            let c = cell(i, name)?;
            if c.fits(*ty) {
                Ok(c)
            } else {
                Err(format!("column {name}: {c:?} is not a {}", ty.name()))
            }
        })
        .collect()
}

/// Parses one cache file of `source` into a row of its table. `export_ts` is the export clock
/// (`%Y-%m-%d-%H:%M:%S`) that replaces `synctimestamp` / fills `insert_timestamp`.
pub fn parse(
    source: &Source,
    file_name: &str,
    bytes: &[u8],
    export_ts: &str,
) -> Result<Parsed, String> {
    let table = source.table();
    let ts = || Cell::str(export_ts);
    let unknown;
    let (row, dedupe) = match source {
        Source::Post(_) => {
            let mut o = Obj::parse(post_keys(), bytes)?;
            unknown = o.unknown;
            let uri = o.peek_str("uri").ok_or("uri is null")?;
            let dedupe = dedupe_key(table, &[uri]);
            // The post tables' columns are the post keys, in the same order (`post_keys`).
            let row = row_by_name(table, |i, name| {
                Ok(match name {
                    "synctimestamp" => ts(),
                    _ => o.cell_at(i),
                })
            })?;
            (row, dedupe)
        }
        Source::Like(_) => {
            let mut o = Obj::parse(LIKE_KEYS, bytes)?;
            unknown = o.unknown;
            let uri = o.required_str("uri")?;
            let record = like_record(o.json("record"))?;
            let dedupe = dedupe_key(table, &[&uri]);
            let mut uri = Some(uri);
            let mut record = Some(record);
            let row = row_by_name(table, |_, name| {
                Ok(match name {
                    "uri" => Cell::str(uri.take().unwrap_or_default()),
                    "record" => Cell::str(record.take().unwrap_or_default()),
                    "synctimestamp" => ts(),
                    other => o.cell(other),
                })
            })?;
            (row, dedupe)
        }
        Source::Follow { relationship } => {
            let mut o = Obj::parse(FOLLOW_KEYS, bytes)?;
            unknown = o.unknown;
            o.required_str("uri")?;
            let follower = o.required_str("follower_did")?;
            let followee = o.required_str("followee_did")?;
            let dedupe = dedupe_key(table, &[&followee, &follower, relationship]);
            // §4.5: the followee is `follow_did`, the follower `follower_did`; handles and URLs
            // were never known.
            let row = row_by_name(table, |_, name| {
                Ok(match name {
                    "follow_did" => Cell::str(followee.as_str()),
                    "follower_did" => Cell::str(follower.as_str()),
                    "insert_timestamp" => ts(),
                    "relationship_to_study_user" => Cell::str(*relationship),
                    _ => Cell::Null,
                })
            })?;
            (row, dedupe)
        }
        Source::Repost(_) | Source::Block | Source::Profile => {
            let mut o = Obj::parse(GENERIC_KEYS, bytes)?;
            unknown = o.unknown;
            let uri = o.required_str("uri")?;
            let record = o.json("record");
            let rev = rev_from_name(file_name);
            let dedupe = match source {
                // Profiles are updated in place: every rev is its own row.
                Source::Profile => dedupe_key(table, &[&uri, rev.unwrap_or("")]),
                _ => dedupe_key(table, &[&uri]),
            };
            let mut uri = Some(uri);
            let row = row_by_name(table, |_, name| {
                Ok(match name {
                    "uri" => Cell::str(uri.take().unwrap_or_default()),
                    "cid" | "author" => o.cell(name),
                    "subject_uri" => subject_field(&record, "uri")?,
                    "subject_cid" => subject_field(&record, "cid")?,
                    "subject" => record_str(&record, "subject")?,
                    "created_at" => record_str(&record, "createdAt")?,
                    "display_name" => record_str(&record, "displayName")?,
                    "description" => record_str(&record, "description")?,
                    "rev" => rev.map_or(Cell::Null, Cell::str),
                    "record" => Cell::str(sync_core::pyjson::to_py_json(&record)),
                    "synctimestamp" => ts(),
                    other => return Err(format!("no source for column {other}")),
                })
            })?;
            (row, dedupe)
        }
        Source::Account => {
            let mut o = Obj::parse(ACCOUNT_KEYS, bytes)?;
            unknown = o.unknown;
            // What the writer names the file by: the event, not its seq (a second delivery under
            // another seq is the same event).
            let did = o.peek_str("did").ok_or("did is null")?.to_owned();
            let kind = o.peek_str("kind").ok_or("kind is null")?.to_owned();
            let active = match &o.values[o.index("active")] {
                Some(Value1::Cell(Cell::Bool(b))) => Some(b.to_string()),
                _ => None,
            };
            let dedupe = dedupe_key(
                table,
                &[
                    &did,
                    &kind,
                    o.peek_str("time").unwrap_or("\0"),
                    o.peek_str("handle").unwrap_or("\0"),
                    active.as_deref().unwrap_or("\0"),
                    o.peek_str("status").unwrap_or("\0"),
                ],
            );
            if matches!(o.values[o.index("seq")], Some(Value1::Cell(Cell::Null))) {
                return Err("seq is null".into());
            }
            let row = row_by_name(table, |_, name| {
                Ok(match name {
                    "synctimestamp" => ts(),
                    other => o.cell(other),
                })
            })?;
            (row, dedupe)
        }
        Source::StudyDelete { .. } | Source::InNetworkDelete => {
            let mut o = Obj::parse(DELETE_KEYS, bytes)?;
            unknown = o.unknown;
            let uri = o.peek_str("uri").ok_or("uri is null")?.to_owned();
            let category = match source {
                Source::StudyDelete { category } => Some(category.as_str()),
                _ => None,
            };
            let dedupe = match category {
                Some(c) => dedupe_key(table, &[&uri, c]),
                None => dedupe_key(table, &[&uri]),
            };
            let row = row_by_name(table, |_, name| {
                Ok(match name {
                    "category" => category.map_or(Cell::Null, Cell::str),
                    "synctimestamp" => ts(),
                    other => o.cell(other),
                })
            })?;
            (row, dedupe)
        }
    };
    Ok(Parsed {
        table,
        row,
        dedupe,
        unknown_keys: unknown,
    })
}

/// What [`check`] learnt of a cache file whose columns Polars' JSON reader reads (`load.rs`).
#[derive(Debug)]
pub struct Checked {
    pub table: TableId,
    pub dedupe: u128,
    pub unknown_keys: u64,
    /// The like `record` column (the predecessor's Python-style JSON string), which Polars
    /// cannot derive from the file; `None` for posts.
    pub record: Option<String>,
}

/// The files whose rows Polars' JSON reader can build (`load.rs`): the post-shaped tables and
/// the likes. Every other kind keeps the per-file reader ([`parse`]).
pub fn json_readable(source: &Source) -> bool {
    matches!(source, Source::Post(_) | Source::Like(_))
}

/// The per-file reader's [`Source`] of a table Polars' JSON reader loads (the fallback).
pub fn json_source(table: TableId) -> Option<Source> {
    match table {
        TableId::StudyPost
        | TableId::ReplyToUserPost
        | TableId::QuoteOfUserPost
        | TableId::InNetworkPost => Some(Source::Post(table)),
        TableId::StudyLike | TableId::LikeOnUserPost => Some(Source::Like(table)),
        _ => None,
    }
}

/// Checks a post or like file exactly as [`parse`] reads it (valid JSON object, every required
/// key present once with its JSON type, `uri` not null, a like's `record` convertible; unknown
/// keys counted) without building its row: Polars' JSON reader builds the rows from the same
/// bytes, and that reader fills a missing key with null, turns a number in a string column into
/// text and skips unknown keys, so nothing reaches it that `parse` would not accept. Anything
/// `check` refuses, `parse` decides (it gives the reason the quarantine logs).
pub fn check(source: &Source, bytes: &[u8]) -> Result<Checked, String> {
    let table = source.table();
    match source {
        Source::Post(_) => {
            let o = Obj::parse_keeping(post_keys(), Some(&["uri"]), bytes)?;
            let uri = o.peek_str("uri").ok_or("uri is null")?;
            Ok(Checked {
                table,
                dedupe: dedupe_key(table, &[uri]),
                unknown_keys: o.unknown,
                record: None,
            })
        }
        Source::Like(_) => {
            let mut o = Obj::parse_keeping(LIKE_KEYS, Some(&["uri", "record"]), bytes)?;
            let uri = o.required_str("uri")?;
            let record = like_record(o.json("record"))?;
            Ok(Checked {
                table,
                dedupe: dedupe_key(table, &[&uri]),
                unknown_keys: o.unknown,
                record: Some(record),
            })
        }
        _ => Err(format!(
            "{source:?} files are not read by Polars' JSON reader"
        )),
    }
}

/// The README table of schemas, generated from [`TABLES`] (kept in sync by a test).
pub fn schema_markdown() -> String {
    let mut out = String::from("| table path | columns (name: type, in order) |\n| --- | --- |\n");
    let mut seen: BTreeMap<&str, ()> = BTreeMap::new();
    for t in TABLES {
        if seen.insert(t.path, ()).is_some() {
            continue;
        }
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|(n, ty)| format!("{n}: {}", ty.name()))
            .collect();
        out.push_str(&format!("| `{}` | {} |\n", t.path, cols.join(", ")));
    }
    out
}

/// The per-table reader recipes of `docs/querying.md` (DuckDB, Polars and pyarrow, local and S3;
/// Athena/Glue DDL with partition projection), generated from [`TABLES`] so that the column
/// lists cannot drift from the declared schemas (a test keeps the document in sync).
pub fn querying_markdown() -> String {
    let mut out = String::new();
    for t in TABLES {
        let name = t.path.replace('/', "_");
        let athena_type = |ty: ColType| match ty {
            ColType::Str => "string",
            ColType::I64 => "bigint",
            ColType::Bool => "boolean",
        };
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|(n, ty)| format!("  `{n}` {}", athena_type(*ty)))
            .collect();
        out.push_str(&format!(
            "### `{path}`\n\n\
             ```sql\n\
             -- DuckDB, local output\n\
             SELECT * FROM read_parquet('OUTPUT/{path}/active/*/*.parquet', hive_partitioning = true);\n\
             -- DuckDB, S3 output (httpfs loaded, an S3 secret created: \"S3 set-up\" above)\n\
             SELECT * FROM read_parquet('s3://BUCKET/PREFIX/{path}/active/*/*.parquet', hive_partitioning = true);\n\
             ```\n\n\
             ```python\n\
             import polars as pl, pyarrow.dataset as ds\n\
             df = pl.scan_parquet(\"OUTPUT/{path}/active/**/*.parquet\", hive_partitioning=True).collect()\n\
             table = ds.dataset(\"OUTPUT/{path}/active\", format=\"parquet\", partitioning=\"hive\").to_table()\n\
             # S3 output (S3_OPTIONS and S3_FS: \"S3 set-up\" above)\n\
             df = pl.scan_parquet(\"s3://BUCKET/PREFIX/{path}/active/**/*.parquet\", hive_partitioning=True, storage_options=S3_OPTIONS).collect()\n\
             table = ds.dataset(\"BUCKET/PREFIX/{path}/active\", filesystem=S3_FS, format=\"parquet\", partitioning=\"hive\").to_table()\n\
             ```\n\n\
             ```sql\n\
             -- Athena / Glue\n\
             CREATE EXTERNAL TABLE {name} (\n{cols}\n)\n\
             PARTITIONED BY (`partition_date` string)\n\
             STORED AS PARQUET\n\
             LOCATION 's3://BUCKET/PREFIX/{path}/active/'\n\
             TBLPROPERTIES (\n\
             \x20 'projection.enabled' = 'true',\n\
             \x20 'projection.partition_date.type' = 'date',\n\
             \x20 'projection.partition_date.format' = 'yyyy-MM-dd',\n\
             \x20 'projection.partition_date.range' = '2024-01-01,NOW',\n\
             \x20 'projection.partition_date.interval' = '1',\n\
             \x20 'projection.partition_date.interval.unit' = 'DAYS',\n\
             \x20 'storage.location.template' = 's3://BUCKET/PREFIX/{path}/active/partition_date=${{partition_date}}/'\n\
             );\n\
             ```\n\n",
            path = t.path,
            cols = cols.join(",\n"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_folders() {
        assert_eq!(
            classify("study_user_activity/create/post"),
            Some(Source::Post(TableId::StudyPost))
        );
        assert_eq!(classify("study_user_activity/create/post/x"), None);
        assert_eq!(
            classify("in_network_user_activity/create/post/did:plc:abc"),
            Some(Source::Post(TableId::InNetworkPost))
        );
        assert_eq!(
            classify("study_user_activity/delete/follow/followee"),
            Some(Source::StudyDelete {
                category: "follow/followee".into()
            })
        );
        assert_eq!(
            classify("study_user_activity/delete/like_on_user_post/3l5jnpb6xyz2k"),
            Some(Source::StudyDelete {
                category: "like_on_user_post".into()
            })
        );
        assert_eq!(classify("study_user_activity/delete"), None);
        assert_eq!(classify("study_user_activity/delete/unknown_kind"), None);
        assert_eq!(classify("study_user_activity/delete/post/x"), None);
        assert_eq!(classify("create/post"), None);
    }

    /// The folder -> table mapping ([`classify`]) against every folder the writer's routing
    /// can produce (`sync_core::paths::Folder`, and the `delete/` mirror of each create folder
    /// that a later delete is routed to). The `match`es have no wildcard: a new `Folder`
    /// variant does not compile until it is mapped here.
    #[test]
    fn every_folder_the_writer_routes_to_feeds_its_table() {
        use sync_core::ids::{Did, RecordKey};
        use sync_core::paths::Folder;
        use sync_core::records::RecordKind;
        let did = Did::parse("did:plc:z72i7hdynmk6r22z27h6tvur").unwrap();
        let mut folders = vec![
            Folder::StudyPost,
            Folder::InNetworkPost(did),
            Folder::Follower,
            Folder::Followee,
            Folder::StudyRepost,
            Folder::StudyBlock,
            Folder::StudyProfile,
            Folder::Account,
        ];
        // An ordinary rkey, one that starts with `.` (written `%2E...`) and a literal one.
        for rkey in ["3l5jnpb6xyz2k", ".hidden", "self"] {
            let r = RecordKey::parse(rkey).unwrap();
            folders.extend([
                Folder::ReplyToUserPost(r.clone()),
                Folder::StudyLike(r.clone()),
                Folder::LikeOnUserPost(r.clone()),
                Folder::RepostOfUserPost(r.clone()),
                Folder::QuoteOfUserPost(r),
            ]);
        }
        for kind in [
            RecordKind::Post,
            RecordKind::Like,
            RecordKind::Repost,
            RecordKind::Follow,
            RecordKind::Block,
            RecordKind::Profile,
        ] {
            folders.push(Folder::StudyDelete(kind.name()));
        }
        for folder in &folders {
            let expected = match folder {
                Folder::StudyPost => TableId::StudyPost,
                Folder::ReplyToUserPost(_) => TableId::ReplyToUserPost,
                Folder::InNetworkPost(_) => TableId::InNetworkPost,
                Folder::StudyLike(_) => TableId::StudyLike,
                Folder::LikeOnUserPost(_) => TableId::LikeOnUserPost,
                Folder::Follower | Folder::Followee => TableId::SocialNetwork,
                Folder::StudyRepost => TableId::StudyRepost,
                Folder::RepostOfUserPost(_) => TableId::RepostOfUserPost,
                Folder::QuoteOfUserPost(_) => TableId::QuoteOfUserPost,
                Folder::StudyBlock => TableId::StudyBlock,
                Folder::StudyProfile => TableId::StudyProfile,
                Folder::Account => TableId::StudyAccount,
                Folder::StudyDelete(_) => TableId::StudyDelete,
            };
            let path = folder.path("x.json".into()).unwrap();
            let got = classify(path.dir()).map(|s| s.table());
            assert_eq!(got, Some(expected), "{}", path.dir());
            // Where a delete of a record routed here goes (route.rs: `to_delete`).
            let mirrored = match folder {
                Folder::InNetworkPost(_) => Some(TableId::InNetworkDelete),
                Folder::Account | Folder::StudyDelete(_) => None,
                Folder::StudyPost
                | Folder::ReplyToUserPost(_)
                | Folder::StudyLike(_)
                | Folder::LikeOnUserPost(_)
                | Folder::Follower
                | Folder::Followee
                | Folder::StudyRepost
                | Folder::RepostOfUserPost(_)
                | Folder::QuoteOfUserPost(_)
                | Folder::StudyBlock
                | Folder::StudyProfile => Some(TableId::StudyDelete),
            };
            if let Some(t) = mirrored {
                let del = path.to_delete();
                let src = classify(del.dir());
                assert_eq!(src.as_ref().map(Source::table), Some(t), "{}", del.dir());
                if let Some(Source::StudyDelete { category }) = src {
                    assert!(
                        !category.contains('%') && !category.contains("3l5j") && category != "self",
                        "the category of {} is a folder name, not an rkey: {category}",
                        del.dir()
                    );
                }
            }
        }
    }

    #[test]
    fn rev_from_profile_name() {
        assert_eq!(
            rev_from_name("author_did=did:plc:a_profile_uri_suffix=self_rev=3l5jv2xq4tk2p.json"),
            Some("3l5jv2xq4tk2p")
        );
    }

    #[test]
    fn wrong_type_is_an_error() {
        let src = Source::Post(TableId::StudyPost);
        assert!(parse(
            &src,
            "f.json",
            br#"{"uri": "at://x", "like_count": "7"}"#,
            "t"
        )
        .is_err());
        assert!(parse(&src, "f.json", br#"{"uri": "at://x", "text": 5}"#, "t").is_err());
        assert!(parse(&src, "f.json", br#"{"cid": "x"}"#, "t").is_err());
        assert!(parse(&src, "f.json", b"{\"uri\": \"at", "t").is_err());
    }

    /// A complete post file (all 23 keys), with `edit` applied to its JSON object.
    fn post(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let mut m = serde_json::Map::new();
        for (name, ty) in POST_COLUMNS {
            let v = match ty {
                ColType::I64 => serde_json::Value::Null,
                _ => serde_json::Value::String(format!("{name}-value")),
            };
            m.insert(name.to_string(), v);
        }
        m.insert("url".into(), "".into());
        edit(&mut m);
        serde_json::to_vec(&m).unwrap()
    }

    #[test]
    fn every_required_key_must_be_there_and_unknown_keys_are_counted() {
        let src = Source::Post(TableId::StudyPost);
        let ok = parse(&src, "f.json", &post(|_| {}), "T").unwrap();
        assert_eq!(ok.unknown_keys, 0);
        let cols = POST_COLUMNS;
        let at = |name: &str| cols.iter().position(|(n, _)| *n == name).unwrap();
        assert_eq!(ok.row[at("url")], Cell::str(""));
        assert_eq!(ok.row[at("synctimestamp")], Cell::str("T"));
        assert_eq!(ok.row[at("text")], Cell::str("text-value"));
        // A missing `url` used to become null; it is a bad file now.
        let err = parse(&src, "f.json", &post(|m| drop(m.remove("url"))), "T").unwrap_err();
        assert!(err.contains("missing required key(s): url"), "{err}");
        let err = parse(
            &src,
            "f.json",
            &post(|m| {
                m.remove("like_count");
                m.remove("langs");
            }),
            "T",
        )
        .unwrap_err();
        assert!(err.contains("langs, like_count"), "{err}");
        let extra = parse(
            &src,
            "f.json",
            &post(|m| {
                m.insert("new_field".into(), serde_json::json!({"x": [1, 2]}));
                m.insert("other".into(), 1.into());
            }),
            "T",
        )
        .unwrap();
        assert_eq!(extra.unknown_keys, 2);
        assert_eq!(extra.row, ok.row, "unknown keys change nothing else");
        // Every other kind: one key removed is a bad file.
        type Kind = (Source, &'static [(&'static str, Slot)], &'static str);
        let kinds: &[Kind] = &[
            (
                Source::Like(TableId::StudyLike),
                LIKE_KEYS,
                r#"{"uri": "u", "cid": "c", "author": "a", "record": "r"}"#,
            ),
            (
                Source::Follow {
                    relationship: "follow",
                },
                FOLLOW_KEYS,
                r#"{"uri": "u", "cid": "c", "record": {}, "author": "a", "follower_did": "a", "followee_did": "b"}"#,
            ),
            (
                Source::Block,
                GENERIC_KEYS,
                r#"{"uri": "u", "cid": "c", "author": "a", "collection": "x", "record": {"subject": "s"}}"#,
            ),
            (
                Source::Account,
                ACCOUNT_KEYS,
                r#"{"did": "d", "kind": "account", "seq": 1, "time": "t", "handle": null, "active": false, "status": "deleted"}"#,
            ),
            (
                Source::InNetworkDelete,
                DELETE_KEYS,
                r#"{"uri": "u", "author": "a", "collection": "c", "rkey": "r", "seq": 1, "rev": "v", "time": "t"}"#,
            ),
        ];
        for (src, keys, json) in kinds {
            parse(src, "f.json", json.as_bytes(), "T").unwrap_or_else(|e| panic!("{src:?}: {e}"));
            for (k, _) in *keys {
                let mut v: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(json).unwrap();
                v.remove(*k);
                let err = parse(src, "f.json", &serde_json::to_vec(&v).unwrap(), "T")
                    .expect_err(&format!("{src:?} without {k}"));
                assert!(err.contains(k), "{err}");
            }
        }
    }
}
