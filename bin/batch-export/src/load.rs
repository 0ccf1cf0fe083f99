//! Polars loads the DataFrames of the post-shaped tables (`post`, `reply_to_user_post`,
//! `quote_of_user_post`, `in_network_user_activity`) and, with `BATCH_EXPORT_JSON_READER=polars`,
//! the likes (`like`, `like_on_user_post`): the bytes the walk already read (it keeps each file's identity for the
//! delete) are made NDJSON lines and read per table and batch by Polars' JSON reader (in slices
//! of [`CHUNK_ROWS`] lines) with the explicit schema of `tables.rs`, never inferred.
//!
//! Polars' reader is lenient where the export must not be: a missing key becomes null, a number
//! in a string column becomes text, unknown keys are skipped. So every file is first checked as
//! strictly as the per-file reader reads it (`tables::check`, in the parallel read phase); a file
//! that fails goes to the per-file reader (`tables::parse`), which quarantines it with the reason
//! it has always given. A batch Polars' reader fails on, or returns another number of rows for, is
//! read again file by file.
//!
//! serde stays where Polars cannot express a column: the like `record` (an Era H object turned
//! into the predecessor's Python-style JSON string, `tables::check`), and `synctimestamp` is the
//! export clock, not the file's value. The other tables (follows, reposts, blocks, profiles,
//! accounts, deletes) keep the per-file reader: their columns are derived from nested records,
//! folder names and file names.
//!
//! Which tables Polars loads by default is measured, not assumed (BENCHMARKS.md, issue 10.3):
//! the post tables, where it costs 5 % less CPU and the same wall time within noise. For the
//! likes (three plain columns; the `record` column needs serde anyway) the same-run medians were
//! 2-7 % slower with 20 % more memory, so by default the per-file reader keeps them.
//! `BATCH_EXPORT_JSON_READER` overrides it: `polars` (Polars for the post tables and the likes),
//! `serde` (the per-file reader everywhere); the tests compare the paths' Parquet, the benchmark
//! times them.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context as _, Result};
use polars::prelude::{
    ChunkFull, Column, DataFrame, DataType, IntoColumn, IntoSeries, JsonFormat, JsonReader,
    NewChunkedArray, PlSmallStr, Schema, SerReader, StringChunked,
};

use rayon::prelude::*;

use crate::parquet::build_frame;
use crate::tables::{self, Cell, ColType, Source, TableDef, TableId};

/// Which reader builds the rows of the tables Polars can load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonReaderChoice {
    /// The measured-faster reader per table: Polars for the post tables, the per-file reader
    /// for the likes (the default).
    Auto,
    /// Polars for the post tables and the likes.
    Polars,
    /// The per-file reader for every table.
    Serde,
}

/// The environment variable that selects the reader (`auto`, the default, `polars` or `serde`).
pub const READER_ENV: &str = "BATCH_EXPORT_JSON_READER";

/// The reader of this process (read once).
pub fn reader() -> JsonReaderChoice {
    static CHOICE: OnceLock<JsonReaderChoice> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var(READER_ENV).as_deref() {
        Ok("serde") => JsonReaderChoice::Serde,
        Ok("polars") => JsonReaderChoice::Polars,
        _ => JsonReaderChoice::Auto,
    })
}

/// Whether Polars' JSON reader builds the rows of `source`'s files.
fn by_polars(source: &Source) -> bool {
    match reader() {
        JsonReaderChoice::Serde => false,
        JsonReaderChoice::Polars => tables::json_readable(source),
        JsonReaderChoice::Auto => matches!(source, Source::Post(_)),
    }
}

/// One file's row, before the batch's DataFrame is built.
#[derive(Debug)]
pub enum Row {
    /// Built by the per-file reader.
    Cells(Vec<Cell>),
    /// Checked, left to Polars' JSON reader: the file's bytes, and the like `record` string.
    Json {
        bytes: Vec<u8>,
        record: Option<String>,
    },
}

impl Row {
    /// The row of a checked file: its bytes made one NDJSON line here, in the parallel read
    /// phase. In checked JSON a line break can only be whitespace between tokens (inside a
    /// string it is escaped), so a blank keeps the document's meaning.
    fn json(mut bytes: Vec<u8>, record: Option<String>) -> Row {
        if memchr::memchr2(b'\n', b'\r', &bytes).is_some() {
            for b in &mut bytes {
                if matches!(*b, b'\n' | b'\r') {
                    *b = b' ';
                }
            }
        }
        // (No reallocation: the walk reads a file into a buffer one byte longer than it.)
        bytes.push(b'\n');
        Row::Json { bytes, record }
    }
}

/// One cache file read for its table (what `tables::Parsed` is for the per-file reader).
#[derive(Debug)]
pub struct Parsed {
    pub table: TableId,
    pub row: Row,
    pub dedupe: u128,
    pub unknown_keys: u64,
}

/// Reads one cache file of `source`: checked and left to Polars for the tables it loads,
/// otherwise (and whenever the check fails) parsed into cells by the per-file reader, whose
/// error is the reason the file is quarantined for.
pub fn parse(
    source: &Source,
    file_name: &str,
    bytes: Vec<u8>,
    export_ts: &str,
) -> Result<Parsed, String> {
    if by_polars(source) {
        if let Ok(c) = tables::check(source, &bytes) {
            return Ok(Parsed {
                table: c.table,
                row: Row::json(bytes, c.record),
                dedupe: c.dedupe,
                unknown_keys: c.unknown_keys,
            });
        }
    }
    let p = tables::parse(source, file_name, &bytes, export_ts)?;
    Ok(Parsed {
        table: p.table,
        row: Row::Cells(p.row),
        dedupe: p.dedupe,
        unknown_keys: p.unknown_keys,
    })
}

/// The table's DataFrame for this batch: Polars' JSON reader when every row was left to it,
/// otherwise (or when it fails) the per-file reader's cells.
pub fn frame(def: &TableDef, rows: Vec<Row>, export_ts: &str) -> Result<DataFrame> {
    if !rows.is_empty() && rows.iter().all(|r| matches!(r, Row::Json { .. })) {
        match polars_frame(def, &rows, export_ts) {
            Ok(df) => {
                tracing::debug!(
                    table = def.path,
                    rows = df.height(),
                    "loaded by Polars' JSON reader"
                );
                return Ok(df);
            }
            Err(e) => tracing::warn!(
                table = def.path,
                rows = rows.len(),
                error = format!("{e:#}"),
                "Polars' JSON reader failed on this batch; reading its files one by one"
            ),
        }
    }
    let source = tables::json_source(def.id);
    let cells = rows
        .into_iter()
        .map(|r| match r {
            Row::Cells(c) => Ok(c),
            Row::Json { bytes, .. } => {
                let source = source
                    .as_ref()
                    .context("a JSON row in a table Polars does not load")?;
                // The file passed `tables::check`, so the per-file reader accepts it too (a test
                // holds the two to that); if it did not, the batch fails before anything is
                // committed or deleted rather than export a row it cannot vouch for.
                tables::parse(source, "", &bytes, export_ts)
                    .map(|p| p.row)
                    .map_err(|e| {
                        anyhow::anyhow!("{}: a checked file failed to parse: {e}", def.path)
                    })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::debug!(
        table = def.path,
        rows = cells.len(),
        "loaded by the per-file reader"
    );
    build_frame(def, &cells)
}

/// A column of the table that Polars cannot read from the file.
fn derived(def: &TableDef, name: &str) -> bool {
    name == "synctimestamp"
        || (name == "record" && matches!(tables::json_source(def.id), Some(Source::Like(_))))
}

fn dtype(ty: ColType) -> DataType {
    match ty {
        ColType::Str => DataType::String,
        ColType::I64 => DataType::Int64,
        ColType::Bool => DataType::Boolean,
    }
}

/// Lines per read of Polars' JSON reader (a few MB of NDJSON).
const CHUNK_ROWS: usize = 4096;

/// The NDJSON of `rows` read by Polars with the declared schema; `synctimestamp` and the like
/// `record` added, columns in the declared order.
fn polars_frame(def: &TableDef, rows: &[Row], export_ts: &str) -> Result<DataFrame> {
    let n = rows.len();
    let t = std::time::Instant::now();
    let mut lines: Vec<&[u8]> = Vec::with_capacity(n);
    let mut records: Vec<&str> = Vec::new();
    for r in rows {
        let Row::Json { bytes, record } = r else {
            bail!("a row of the per-file reader");
        };
        lines.push(bytes);
        if let Some(record) = record {
            records.push(record);
        }
    }
    let schema: Arc<Schema> = Arc::new(
        def.columns
            .iter()
            .filter(|(name, _)| !derived(def, name))
            .map(|&(name, ty)| (PlSmallStr::from_static(name), dtype(ty)))
            .collect(),
    );
    // Read in slices of CHUNK_ROWS lines, on the worker threads: many small tasks keep both
    // cores busy when one of them is taken by another process (one reader over the whole
    // batch splits it once per core and waits for the slower half), and no buffer of the
    // batch's size is allocated. The slices are stacked in order.
    let parts = lines
        .par_chunks(CHUNK_ROWS)
        .map(|chunk| {
            let mut ndjson = Vec::with_capacity(chunk.iter().map(|l| l.len()).sum());
            for l in chunk {
                ndjson.extend_from_slice(l);
            }
            let part = JsonReader::new(Cursor::new(ndjson))
                .with_json_format(JsonFormat::JsonLines)
                .with_schema(schema.clone())
                .finish()
                .context("Polars' JSON reader")?;
            ensure!(
                part.height() == chunk.len(),
                "Polars' JSON reader returned {} rows for {} files",
                part.height(),
                chunk.len()
            );
            Ok(part)
        })
        .collect::<Result<Vec<DataFrame>>>()?;
    let mut parts = parts.into_iter();
    let mut df = parts.next().context("no rows")?;
    for part in parts {
        df.vstack_mut_owned(part).context("stacking the slices")?;
    }
    ensure!(
        df.height() == n,
        "Polars' JSON reader returned {} rows for {n} files",
        df.height()
    );
    let columns = def
        .columns
        .iter()
        .map(|&(name, ty)| {
            let pname = PlSmallStr::from_static(name);
            Ok(match name {
                "synctimestamp" => StringChunked::full(pname, export_ts, n)
                    .into_series()
                    .into_column(),
                "record" if derived(def, name) => {
                    ensure!(
                        records.len() == n,
                        "{} like records for {n} rows",
                        records.len()
                    );
                    StringChunked::from_slice(pname, &records)
                        .into_series()
                        .into_column()
                }
                _ => {
                    let c = df.column(name).with_context(|| format!("column {name}"))?;
                    ensure!(
                        c.dtype() == &dtype(ty),
                        "column {name}: Polars read {}, not {}",
                        c.dtype(),
                        ty.name()
                    );
                    c.clone()
                }
            })
        })
        .collect::<Result<Vec<Column>>>()?;
    let df = DataFrame::new(n, columns).context("building the DataFrame")?;
    tracing::debug!(
        table = def.path,
        rows = n,
        seconds = t.elapsed().as_secs_f64(),
        "Polars' JSON reader"
    );
    Ok(df)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;
    use serde_json::{json, Value};

    const TS: &str = "2026-12-02-15:04:05";

    /// The shared real fixtures (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo).
    fn fixtures() -> Option<std::path::PathBuf> {
        let dir = std::env::var_os("SYNC_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures").into()
            });
        if dir.is_dir() {
            return Some(dir);
        }
        assert!(
            std::env::var_os("SYNC_SKIP_FIXTURE_TESTS").is_some(),
            "fixtures not found at {}: set SYNC_FIXTURES",
            dir.display()
        );
        None
    }

    /// Cache files the writer's own transform makes of the captured firehose's posts and likes
    /// (`relay-capture/expected_jetstream_v1.jsonl`): `(is_post, cache JSON)`.
    fn captured() -> Vec<(bool, String)> {
        let Some(dir) = fixtures() else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(dir.join("relay-capture/expected_jetstream_v1.jsonl"))
            .expect("relay-capture fixture");
        let mut out = Vec::new();
        for line in text.lines() {
            let e: Value = serde_json::from_str(line).unwrap();
            let c = &e["commit"];
            if e["kind"] != "commit" || c["operation"] != "create" {
                continue;
            }
            let did = e["did"].as_str().unwrap();
            let collection = c["collection"].as_str().unwrap();
            let uri = format!("at://{did}/{collection}/{}", c["rkey"].as_str().unwrap());
            let cid = c["cid"].as_str().unwrap();
            match collection {
                "app.bsky.feed.post" => {
                    let p = sync_core::transform::transform_post(&uri, cid, did, &c["record"], TS)
                        .unwrap();
                    out.push((true, p.to_cache_json()));
                }
                "app.bsky.feed.like" => out.push((
                    false,
                    sync_core::transform::like_cache_json(&uri, cid, did, &c["record"]).unwrap(),
                )),
                _ => {}
            }
        }
        assert!(
            out.iter().filter(|(p, _)| *p).count() >= 10,
            "posts in the capture"
        );
        assert!(
            out.iter().filter(|(p, _)| !*p).count() >= 50,
            "likes in the capture"
        );
        out
    }

    /// Posts with what the capture may lack: counts, every nullable column null, escapes,
    /// line breaks between tokens, unknown keys, a `synctimestamp` of another clock.
    fn edge_posts() -> Vec<String> {
        let full = |i: usize, edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut m = serde_json::Map::new();
            for (name, _) in tables::POST_COLUMNS {
                m.insert(name.to_string(), Value::Null);
            }
            m.insert(
                "uri".into(),
                format!("at://did:plc:x/app.bsky.feed.post/{i}").into(),
            );
            m.insert("url".into(), "".into());
            edit(&mut m);
            serde_json::to_string(&m).unwrap()
        };
        let mut out = vec![
            full(1, &|_| {}),
            full(2, &|m| {
                m.insert("like_count".into(), 7.into());
                m.insert("reply_count".into(), 0.into());
                m.insert("repost_count".into(), json!(-3));
                m.insert(
                    "text".into(),
                    "caf\u{e9} \u{1F600} \"quoted\" back\\slash\nnew\tline \u{0}".into(),
                );
            }),
            full(3, &|m| {
                m.insert("brand_new".into(), json!({"nested": [1, 2, {"x": null}]}));
                m.insert("synctimestamp".into(), "1999-01-01-00:00:00".into());
                m.insert("like_count".into(), json!(i64::MAX));
            }),
        ];
        // Pretty-printed (line breaks between tokens) and Python-style ASCII escapes.
        let pretty: Value = serde_json::from_str(&full(4, &|m| {
            m.insert("text".into(), "line1\nline2 \u{1F389}".into());
        }))
        .unwrap();
        out.push(
            serde_json::to_string_pretty(&pretty)
                .unwrap()
                .replace('\n', "\r\n"),
        );
        out.push(
            r#"{"uri": "at://did:plc:x/app.bsky.feed.post/5", "cid": "c", "indexed_at": null, "author_did": "d", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "t", "text": "\u00e9\ud83d\ude00\u2014", "embed": "{\"a\": 1}", "entities": null, "facets": null, "labels": "", "langs": "en;de", "reply_parent": null, "reply_root": null, "tags": null, "synctimestamp": "x", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"#.to_owned(),
        );
        out
    }

    fn edge_likes() -> Vec<String> {
        vec![
            // Era S: `record` already the Python-style string.
            r#"{"uri": "at://did:plc:a/app.bsky.feed.like/1", "cid": "c1", "author": "did:plc:a", "record": "{\"created_at\": \"2024\", \"subject\": {}}"}"#.to_owned(),
            // Era H with an unknown key and a null cid.
            r#"{"uri": "at://did:plc:a/app.bsky.feed.like/2", "cid": null, "author": "did:plc:a", "record": {"createdAt": "2024-10-02T14:20:11.093Z", "subject": {"cid": "s", "uri": "at://x"}, "py_type": "app.bsky.feed.like"}, "extra": 1}"#.to_owned(),
        ]
    }

    /// Both readers' DataFrames for the same files, and their Parquet bytes.
    fn both(table: TableId, files: &[String]) -> (DataFrame, DataFrame, Vec<u8>, Vec<u8>) {
        let def = tables::table(table);
        let source = tables::json_source(table).unwrap();
        let mut json_rows = Vec::new();
        let mut cell_rows = Vec::new();
        for f in files {
            let c = tables::check(&source, f.as_bytes())
                .unwrap_or_else(|e| panic!("check refused {f}: {e}"));
            let p = tables::parse(&source, "f.json", f.as_bytes(), TS).unwrap();
            assert_eq!(
                (c.dedupe, c.unknown_keys),
                (p.dedupe, p.unknown_keys),
                "{f}"
            );
            json_rows.push(Row::json(f.as_bytes().to_vec(), c.record));
            cell_rows.push(Row::Cells(p.row));
        }
        let polars = polars_frame(def, &json_rows, TS).expect("Polars' JSON reader");
        let serde = frame(def, cell_rows, TS).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |df: &DataFrame, name: &str| {
            let path = dir.path().join(name);
            crate::parquet::write_parquet(&mut df.clone(), def, &path, Compression::Zstd).unwrap();
            std::fs::read(path).unwrap()
        };
        let (a, b) = (write(&polars, "polars"), write(&serde, "serde"));
        (polars, serde, a, b)
    }

    fn assert_same(table: TableId, files: &[String]) {
        let (polars, serde, a, b) = both(table, files);
        assert_eq!(polars.height(), files.len());
        assert_eq!(polars.schema(), serde.schema(), "{table:?}");
        assert!(
            polars.equals_missing(&serde),
            "{table:?}:\n{polars}\n{serde}"
        );
        assert!(a == b, "{table:?}: the Parquet files differ");
    }

    #[test]
    fn polars_and_the_per_file_reader_write_byte_identical_parquet() {
        let captured = captured();
        let posts: Vec<String> = captured
            .iter()
            .filter(|(p, _)| *p)
            .map(|(_, j)| j.clone())
            .chain(edge_posts())
            .collect();
        let likes: Vec<String> = captured
            .iter()
            .filter(|(p, _)| !*p)
            .map(|(_, j)| j.clone())
            .chain(edge_likes())
            .collect();
        for t in [
            TableId::StudyPost,
            TableId::ReplyToUserPost,
            TableId::QuoteOfUserPost,
            TableId::InNetworkPost,
        ] {
            assert_same(t, &posts);
        }
        for t in [TableId::StudyLike, TableId::LikeOnUserPost] {
            assert_same(t, &likes);
        }
        // A column null in every row stays typed (never a null-typed column).
        assert_same(TableId::StudyPost, &edge_posts()[..1]);
        // Several slices of CHUNK_ROWS, each split by Polars across its threads, stacked.
        let many: Vec<String> = (0..10_000)
            .map(|i| posts[i % posts.len()].clone())
            .collect();
        let (polars, _, a, b) = both(TableId::InNetworkPost, &many);
        assert_eq!(polars.height(), 10_000);
        assert!(polars.first_col_n_chunks() > 1);
        assert!(a == b, "the Parquet files of 10,000 rows differ");
    }

    /// What Polars' reader would do to a bad file (null for a missing key, text for a number)
    /// never happens: such a file fails `check`, and `check` accepts only what `parse` accepts,
    /// with the same unknown-key count and de-duplication key.
    #[test]
    fn check_is_as_strict_as_the_per_file_reader() {
        let post_src = Source::Post(TableId::StudyPost);
        let like_src = Source::Like(TableId::StudyLike);
        let base_post: Value = serde_json::from_str(&edge_posts()[1]).unwrap();
        let base_like: Value = serde_json::from_str(&edge_likes()[1]).unwrap();
        let mut cases: Vec<(Source, String)> = Vec::new();
        let replacements = [
            json!(null),
            json!(5),
            json!(-1.5),
            json!(true),
            json!("s"),
            json!([]),
            json!({}),
            json!({"createdAt": 1}),
        ];
        for (src, base) in [(&post_src, &base_post), (&like_src, &base_like)] {
            let obj = base.as_object().unwrap();
            cases.push((src.clone(), base.to_string()));
            for key in obj.keys() {
                let mut m = obj.clone();
                m.remove(key);
                cases.push((src.clone(), Value::Object(m).to_string()));
                for r in &replacements {
                    let mut m = obj.clone();
                    m.insert(key.clone(), r.clone());
                    cases.push((src.clone(), Value::Object(m).to_string()));
                }
                // The key twice.
                let s = base.to_string();
                cases.push((
                    src.clone(),
                    format!("{}, \"{key}\": null}}", &s[..s.len() - 1]),
                ));
            }
            let s = base.to_string();
            for bad in [
                format!("{s} {s}"),
                format!("{s}x"),
                s[..s.len() / 2].to_owned(),
                format!("\u{feff}{s}"),
                "[]".to_owned(),
                "null".to_owned(),
                String::new(),
                s.replace("\"uri\"", "\"u\\u0072i\""),
            ] {
                cases.push((src.clone(), bad));
            }
        }
        let mut accepted = 0;
        for (src, json) in &cases {
            let c = tables::check(src, json.as_bytes());
            let p = tables::parse(src, "f.json", json.as_bytes(), TS);
            match (&c, &p) {
                (Ok(c), Ok(p)) => {
                    accepted += 1;
                    assert_eq!(
                        (c.dedupe, c.unknown_keys),
                        (p.dedupe, p.unknown_keys),
                        "{json}"
                    );
                }
                (Err(_), Err(_)) => {}
                _ => panic!("check and parse disagree on {json}: {c:?} / {p:?}"),
            }
        }
        assert!(
            accepted > 5 && accepted < cases.len() / 2,
            "{accepted} of {}",
            cases.len()
        );
    }

    /// A batch Polars' reader fails on is read again file by file: same frame.
    #[test]
    fn a_batch_polars_fails_on_is_read_file_by_file() {
        let def = tables::table(TableId::StudyPost);
        let good = edge_posts()[1].clone();
        let p = tables::parse(&Source::Post(TableId::StudyPost), "f", good.as_bytes(), TS).unwrap();
        // A checked-looking row whose bytes Polars cannot read (a stand-in for any reader
        // failure): the whole batch falls back, and the result is the per-file reader's.
        let rows = vec![
            Row::json(good.clone().into_bytes(), None),
            Row::json(format!("{good}\n{{oops").into_bytes(), None),
        ];
        assert!(polars_frame(def, &rows, TS).is_err());
        let err = frame(def, rows, TS).unwrap_err();
        assert!(format!("{err:#}").contains("failed to parse"), "{err:#}");
        let rows = vec![
            Row::json(good.clone().into_bytes(), None),
            Row::Cells(p.row.clone()),
        ];
        let df = frame(def, rows, TS).unwrap();
        let want = build_frame(def, &[p.row.clone(), p.row]).unwrap();
        assert!(df.equals_missing(&want));
    }
}
