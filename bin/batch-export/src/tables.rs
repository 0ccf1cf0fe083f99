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

/// Folders nested by the rkey of a study post (the nesting level is not part of the table).
const NESTED_BY_RKEY: &[&str] = &[
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
        ["study_user_activity", "delete", rest @ ..] if !rest.is_empty() => {
            let category = if NESTED_BY_RKEY.contains(&rest[0]) {
                if rest.len() != 2 {
                    return None;
                }
                rest[0].to_owned()
            } else {
                rest.join("/")
            };
            Some(Source::StudyDelete { category })
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
    fn opt_str(s: Option<String>) -> Cell {
        s.map_or(Cell::Null, |s| Cell::Str(s.into_boxed_str()))
    }
    fn str(s: impl Into<Box<str>>) -> Cell {
        Cell::Str(s.into())
    }
    fn opt_i64(v: Option<i64>) -> Cell {
        v.map_or(Cell::Null, Cell::I64)
    }
}

/// One parsed cache file: its row and the key rows are de-duplicated by within a run.
#[derive(Debug)]
pub struct Parsed {
    pub table: TableId,
    pub row: Vec<Cell>,
    /// Hash of the table and its natural key (URI; (follow, follower, relationship) for follows).
    pub dedupe: u128,
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

#[derive(Deserialize)]
#[serde(default)]
#[derive(Default)]
struct PostJson {
    uri: Option<String>,
    cid: Option<String>,
    indexed_at: Option<String>,
    author_did: Option<String>,
    author_handle: Option<String>,
    author_avatar: Option<String>,
    author_display_name: Option<String>,
    created_at: Option<String>,
    text: Option<String>,
    embed: Option<String>,
    entities: Option<String>,
    facets: Option<String>,
    labels: Option<String>,
    langs: Option<String>,
    reply_parent: Option<String>,
    reply_root: Option<String>,
    tags: Option<String>,
    url: Option<String>,
    source: Option<String>,
    like_count: Option<i64>,
    reply_count: Option<i64>,
    repost_count: Option<i64>,
}

#[derive(Deserialize)]
struct StrongRefJson {
    cid: String,
    uri: String,
}

#[derive(Deserialize)]
struct LikeRecordObj {
    #[serde(rename = "createdAt", alias = "created_at")]
    created_at: String,
    subject: StrongRefJson,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LikeRecordJson {
    Object(LikeRecordObj),
    /// Era S: already the Python-JSON string.
    String(String),
}

#[derive(Deserialize)]
struct LikeJson {
    uri: String,
    cid: Option<String>,
    author: Option<String>,
    record: LikeRecordJson,
}

#[derive(Deserialize)]
struct FollowJson {
    uri: String,
    follower_did: String,
    followee_did: String,
}

#[derive(Deserialize)]
struct GenericJson {
    uri: String,
    cid: Option<String>,
    author: Option<String>,
    record: serde_json::Value,
}

#[derive(Deserialize)]
struct AccountJson {
    did: String,
    kind: String,
    seq: i64,
    time: Option<String>,
    handle: Option<String>,
    active: Option<bool>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct DeleteJson {
    uri: String,
    author: Option<String>,
    collection: Option<String>,
    rkey: Option<String>,
    seq: Option<i64>,
    rev: Option<String>,
    time: Option<String>,
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

/// Parses one cache file of `source` into a row of its table. `export_ts` is the export clock
/// (`%Y-%m-%d-%H:%M:%S`) that replaces `synctimestamp` / fills `insert_timestamp`.
pub fn parse(
    source: &Source,
    file_name: &str,
    bytes: &[u8],
    export_ts: &str,
) -> Result<Parsed, String> {
    let table = source.table();
    let err = |e: serde_json::Error| format!("invalid JSON for {:?}: {e}", table);
    let ts = || Cell::str(export_ts);
    let (row, dedupe) = match source {
        Source::Post(_) => {
            let p: PostJson = serde_json::from_slice(bytes).map_err(err)?;
            let uri = p.uri.ok_or("post without uri")?;
            let dedupe = dedupe_key(table, &[&uri]);
            let row = vec![
                Cell::str(uri),
                Cell::opt_str(p.cid),
                Cell::opt_str(p.indexed_at),
                Cell::opt_str(p.author_did),
                Cell::opt_str(p.author_handle),
                Cell::opt_str(p.author_avatar),
                Cell::opt_str(p.author_display_name),
                Cell::opt_str(p.created_at),
                Cell::opt_str(p.text),
                Cell::opt_str(p.embed),
                Cell::opt_str(p.entities),
                Cell::opt_str(p.facets),
                Cell::opt_str(p.labels),
                Cell::opt_str(p.langs),
                Cell::opt_str(p.reply_parent),
                Cell::opt_str(p.reply_root),
                Cell::opt_str(p.tags),
                ts(),
                Cell::opt_str(p.url),
                Cell::opt_str(p.source),
                Cell::opt_i64(p.like_count),
                Cell::opt_i64(p.reply_count),
                Cell::opt_i64(p.repost_count),
            ];
            (row, dedupe)
        }
        Source::Like(_) => {
            let l: LikeJson = serde_json::from_slice(bytes).map_err(err)?;
            let record = match l.record {
                LikeRecordJson::Object(r) => sync_core::transform::like_record_string_era_s(
                    &r.created_at,
                    &r.subject.cid,
                    &r.subject.uri,
                ),
                LikeRecordJson::String(s) => s,
            };
            let dedupe = dedupe_key(table, &[&l.uri]);
            let row = vec![
                Cell::opt_str(l.author),
                Cell::opt_str(l.cid),
                Cell::str(record),
                Cell::str(l.uri),
                ts(),
            ];
            (row, dedupe)
        }
        Source::Follow { relationship } => {
            let f: FollowJson = serde_json::from_slice(bytes).map_err(err)?;
            let _ = &f.uri;
            let dedupe = dedupe_key(table, &[&f.followee_did, &f.follower_did, relationship]);
            let row = vec![
                Cell::Null,
                Cell::Null,
                Cell::str(f.followee_did),
                Cell::Null,
                Cell::Null,
                Cell::str(f.follower_did),
                ts(),
                Cell::str(*relationship),
            ];
            (row, dedupe)
        }
        Source::Repost(_) => {
            let g: GenericJson = serde_json::from_slice(bytes).map_err(err)?;
            let dedupe = dedupe_key(table, &[&g.uri]);
            let row = vec![
                Cell::str(g.uri),
                Cell::opt_str(g.cid),
                Cell::opt_str(g.author),
                subject_field(&g.record, "uri")?,
                subject_field(&g.record, "cid")?,
                record_str(&g.record, "createdAt")?,
                Cell::str(sync_core::pyjson::to_py_json(&g.record)),
                ts(),
            ];
            (row, dedupe)
        }
        Source::Block => {
            let g: GenericJson = serde_json::from_slice(bytes).map_err(err)?;
            let dedupe = dedupe_key(table, &[&g.uri]);
            let row = vec![
                Cell::str(g.uri),
                Cell::opt_str(g.cid),
                Cell::opt_str(g.author),
                record_str(&g.record, "subject")?,
                record_str(&g.record, "createdAt")?,
                Cell::str(sync_core::pyjson::to_py_json(&g.record)),
                ts(),
            ];
            (row, dedupe)
        }
        Source::Profile => {
            let g: GenericJson = serde_json::from_slice(bytes).map_err(err)?;
            let rev = rev_from_name(file_name);
            // Profiles are updated in place: every rev is its own row.
            let dedupe = dedupe_key(table, &[&g.uri, rev.unwrap_or("")]);
            let row = vec![
                Cell::str(g.uri),
                Cell::opt_str(g.cid),
                Cell::opt_str(g.author),
                rev.map_or(Cell::Null, Cell::str),
                record_str(&g.record, "displayName")?,
                record_str(&g.record, "description")?,
                record_str(&g.record, "createdAt")?,
                Cell::str(sync_core::pyjson::to_py_json(&g.record)),
                ts(),
            ];
            (row, dedupe)
        }
        Source::Account => {
            let a: AccountJson = serde_json::from_slice(bytes).map_err(err)?;
            // What the writer names the file by: the event, not its seq (a second delivery under
            // another seq is the same event).
            let active = a.active.map(|b| b.to_string());
            let dedupe = dedupe_key(
                table,
                &[
                    &a.did,
                    &a.kind,
                    a.time.as_deref().unwrap_or("\0"),
                    a.handle.as_deref().unwrap_or("\0"),
                    active.as_deref().unwrap_or("\0"),
                    a.status.as_deref().unwrap_or("\0"),
                ],
            );
            let row = vec![
                Cell::str(a.did),
                Cell::str(a.kind),
                Cell::I64(a.seq),
                Cell::opt_str(a.time),
                Cell::opt_str(a.handle),
                a.active.map_or(Cell::Null, Cell::Bool),
                Cell::opt_str(a.status),
                ts(),
            ];
            (row, dedupe)
        }
        Source::StudyDelete { category } => {
            let d: DeleteJson = serde_json::from_slice(bytes).map_err(err)?;
            let dedupe = dedupe_key(table, &[&d.uri, category]);
            let row = vec![
                Cell::str(d.uri),
                Cell::opt_str(d.author),
                Cell::opt_str(d.collection),
                Cell::opt_str(d.rkey),
                Cell::opt_i64(d.seq),
                Cell::opt_str(d.rev),
                Cell::opt_str(d.time),
                Cell::str(category.as_str()),
                ts(),
            ];
            (row, dedupe)
        }
        Source::InNetworkDelete => {
            let d: DeleteJson = serde_json::from_slice(bytes).map_err(err)?;
            let dedupe = dedupe_key(table, &[&d.uri]);
            let row = vec![
                Cell::str(d.uri),
                Cell::opt_str(d.author),
                Cell::opt_str(d.collection),
                Cell::opt_str(d.rkey),
                Cell::opt_i64(d.seq),
                Cell::opt_str(d.rev),
                Cell::opt_str(d.time),
                ts(),
            ];
            (row, dedupe)
        }
    };
    debug_assert_eq!(row.len(), self::table(table).columns.len());
    Ok(Parsed { table, row, dedupe })
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
        assert_eq!(classify("create/post"), None);
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
}
