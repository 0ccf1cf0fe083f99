//! Loading the tracked sets (study users, in-network users) from operator files.
//!
//! A line or row that is not a valid DID fails start-up with the file and line named: tracking
//! the wrong people silently is worse than not starting.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sync_core::ids::{AtUri, Did};

/// Which table column holds the DIDs when the file is a CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The participant table: column `bluesky_user_did`.
    StudyUsers,
    /// The predecessor's `scraped_user_social_network`: `follow_did` of rows whose
    /// `relationship_to_study_user` is `follow`.
    SocialNetwork,
}

/// Reads a DID set from a text file (one DID per line, `#` comments, blank lines ignored) or a
/// CSV file (by extension `.csv`).
pub fn load_dids(path: &Path, table: Table) -> Result<HashSet<Did>> {
    if path.is_dir() {
        return load_parquet_dataset(path, table);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "csv" => load_csv(path, table),
        "parquet" => {
            let mut dids = HashSet::new();
            load_parquet(path, table, &mut dids)?;
            Ok(dids)
        }
        _ => load_text(path),
    }
}

/// A directory of Parquet files, e.g. the predecessor's `scraped_user_social_network/` dataset
/// (`{cache,active}/partition_date=*/<hex>-0.parquet`): every `*.parquet` below it.
fn load_parquet_dataset(dir: &Path, table: Table) -> Result<HashSet<Did>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
            {
                files.push(path);
            }
        }
    }
    if files.is_empty() {
        bail!("{}: a directory without any .parquet file", dir.display());
    }
    files.sort();
    let mut dids = HashSet::new();
    for file in files {
        load_parquet(&file, table, &mut dids)?;
    }
    Ok(dids)
}

#[cfg(not(feature = "parquet"))]
fn load_parquet(path: &Path, _table: Table, _dids: &mut HashSet<Did>) -> Result<()> {
    bail!(
        "{}: this build has no Parquet support (built without the `parquet` feature); use a text or CSV file",
        path.display()
    )
}

#[cfg(feature = "parquet")]
fn load_parquet(path: &Path, table: Table, dids: &mut HashSet<Did>) -> Result<()> {
    use polars::prelude::{ParquetReader, SerReader};
    let (did_col, relation_col) = match table {
        Table::StudyUsers => ("bluesky_user_did", None),
        Table::SocialNetwork => ("follow_did", Some("relationship_to_study_user")),
    };
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = ParquetReader::new(file);
    let schema = reader
        .schema()
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let names: Vec<String> = schema.iter_names().map(|n| n.to_string()).collect();
    let mut columns = vec![did_col.to_owned()];
    columns.extend(relation_col.map(str::to_owned));
    for c in &columns {
        if !names.contains(c) {
            bail!("{}: no `{c}` column (columns: {names:?})", path.display());
        }
    }
    let df = reader
        .with_columns(Some(columns))
        .finish()
        .with_context(|| format!("{}: reading Parquet", path.display()))?;
    let text = |name: &str| {
        df.column(name)
            .and_then(|c| c.str().cloned())
            .with_context(|| format!("{}: column `{name}` is not a string column", path.display()))
    };
    let values = text(did_col)?;
    let relations = relation_col.map(text).transpose()?;
    for (row, value) in values.iter().enumerate() {
        if let Some(relations) = &relations {
            if relations.get(row) != Some("follow") {
                continue;
            }
        }
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            if table == Table::SocialNetwork {
                continue; // the predecessor skips null follow_did values
            }
            bail!("{}: row {}: empty `{did_col}`", path.display(), row + 1);
        };
        let did = Did::parse(value).with_context(|| {
            format!("{}: row {}: not a DID: {value:?}", path.display(), row + 1)
        })?;
        dids.insert(did);
    }
    Ok(())
}

fn load_text(path: &Path) -> Result<HashSet<Did>> {
    use std::io::BufRead;
    // Streamed line by line: a million-DID file never sits in memory next to the set.
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut dids = HashSet::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: unreadable line", path.display(), number + 1))?;
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let did = Did::parse(line)
            .with_context(|| format!("{}:{}: not a DID: {line:?}", path.display(), number + 1))?;
        dids.insert(did);
    }
    Ok(dids)
}

fn load_csv(path: &Path, table: Table) -> Result<HashSet<Did>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: reading the CSV header", path.display()))?
        .clone();
    let column = |name: &str| -> Result<usize> {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| {
                format!(
                    "{}: no `{name}` column (columns: {:?})",
                    path.display(),
                    headers
                )
            })
    };
    let (did_col, relation_col) = match table {
        Table::StudyUsers => (column("bluesky_user_did")?, None),
        Table::SocialNetwork => (
            column("follow_did")?,
            Some(column("relationship_to_study_user")?),
        ),
    };
    let mut dids = HashSet::new();
    for (index, record) in reader.records().enumerate() {
        // header is line 1
        let line = index + 2;
        let record = record.with_context(|| format!("{}:{line}: bad CSV row", path.display()))?;
        if let Some(col) = relation_col {
            if record.get(col).map(str::trim) != Some("follow") {
                continue;
            }
        }
        let value = record.get(did_col).unwrap_or_default().trim();
        if value.is_empty() && table == Table::SocialNetwork {
            continue; // the predecessor skips null follow_did values
        }
        let did = Did::parse(value)
            .with_context(|| format!("{}:{line}: not a DID: {value:?}", path.display()))?;
        dids.insert(did);
    }
    Ok(dids)
}

/// Study posts already in the cache (`study_user_activity/create/post/*.json`, e.g. written by a
/// previous installation or restored from a backup): `(uri, author_did)` of each readable file.
pub fn study_posts_in_cache(cache_root: &Path) -> Vec<(AtUri, Did)> {
    let dir = cache_root.join("study_user_activity/create/post");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            let uri = AtUri::parse(v.get("uri")?.as_str()?).ok()?;
            let author = Did::parse(v.get("author_did")?.as_str()?).ok()?;
            Some((uri, author))
        })
        .collect()
}

/// The predecessor's `post_uri_to_study_user_did.json` map (`{"at://...": "did:...", ...}`).
pub fn load_study_post_map(path: &Path) -> Result<Vec<(AtUri, Did)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "{}: expected a JSON object {{post uri: study user DID}}",
                path.display()
            )
        })?;
    map.into_iter()
        .map(|(uri, did)| {
            let parsed = AtUri::parse(&uri)
                .with_context(|| format!("{}: bad post URI {uri:?}", path.display()))?;
            let did = did
                .as_str()
                .and_then(|d| Did::parse(d).ok())
                .with_context(|| format!("{}: bad DID for {uri:?}", path.display()))?;
            Ok((parsed, did))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_csv_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("study.txt");
        std::fs::write(&text, "# participants\ndid:plc:z72i7hdynmk6r22z27h6tvur\n\n  did:plc:4llrhdclvdlmmynkwsmg5tdc  # S2\n").unwrap();
        assert_eq!(load_dids(&text, Table::StudyUsers).unwrap().len(), 2);

        let csv = dir.path().join("participants.csv");
        std::fs::write(&csv, "study_user_id,bluesky_user_did,condition\nab,did:plc:z72i7hdynmk6r22z27h6tvur,engagement\n").unwrap();
        assert_eq!(load_dids(&csv, Table::StudyUsers).unwrap().len(), 1);

        let net = dir.path().join("network.csv");
        std::fs::write(&net, "follow_did,follower_did,relationship_to_study_user\ndid:plc:w4xbfzo7kqfes5zb7r6qv3rw,did:plc:z72i7hdynmk6r22z27h6tvur,follow\ndid:plc:z72i7hdynmk6r22z27h6tvur,did:plc:q6gjnaw2blty4crticxkmujt,follower\n,did:plc:z72i7hdynmk6r22z27h6tvur,follow\n").unwrap();
        let set = load_dids(&net, Table::SocialNetwork).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.contains(&Did::parse("did:plc:w4xbfzo7kqfes5zb7r6qv3rw").unwrap()));
    }

    #[cfg(feature = "parquet")]
    #[test]
    fn parquet_tables_and_datasets() {
        use polars::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let write = |path: &Path, mut df: DataFrame| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let file = std::fs::File::create(path).unwrap();
            ParquetWriter::new(file).finish(&mut df).unwrap();
        };
        let participants = dir.path().join("participants.parquet");
        write(
            &participants,
            df!(
                "study_user_id" => ["a", "b"],
                "bluesky_user_did" => ["did:plc:z72i7hdynmk6r22z27h6tvur", "did:plc:4llrhdclvdlmmynkwsmg5tdc"],
                "is_study_user" => [true, false],
            )
            .unwrap(),
        );
        assert_eq!(
            load_dids(&participants, Table::StudyUsers).unwrap().len(),
            2
        );
        // The predecessor's hive-partitioned social network dataset.
        let net = dir.path().join("scraped_user_social_network");
        write(
            &net.join("active/partition_date=2024-10-02/5bf17f8214a449c99df262060b5f3418-0.parquet"),
            df!(
                "follow_did" => [Some("did:plc:w4xbfzo7kqfes5zb7r6qv3rw"), Some("did:plc:z72i7hdynmk6r22z27h6tvur"), None],
                "follower_did" => ["did:plc:z72i7hdynmk6r22z27h6tvur", "did:plc:q6gjnaw2blty4crticxkmujt", "did:plc:z72i7hdynmk6r22z27h6tvur"],
                "relationship_to_study_user" => ["follow", "follower", "follow"],
            )
            .unwrap(),
        );
        write(
            &net.join("cache/partition_date=2024-09-30/00000000000000000000000000000000-0.parquet"),
            df!(
                "follow_did" => ["did:plc:ragtjsm2j2vknwkz3zp4oxrd"],
                "relationship_to_study_user" => ["follow"],
            )
            .unwrap(),
        );
        let set = load_dids(&net, Table::SocialNetwork).unwrap();
        let expected: HashSet<Did> = [
            "did:plc:w4xbfzo7kqfes5zb7r6qv3rw",
            "did:plc:ragtjsm2j2vknwkz3zp4oxrd",
        ]
        .into_iter()
        .map(|d| Did::parse(d).unwrap())
        .collect();
        assert_eq!(set, expected);
        // A table without the column is a clear error.
        let err = format!(
            "{:#}",
            load_dids(&participants, Table::SocialNetwork).unwrap_err()
        );
        assert!(err.contains("no `follow_did` column"), "{err}");
        let bad = dir.path().join("bad.parquet");
        write(
            &bad,
            df!("bluesky_user_did" => ["did:plc:z72i7hdynmk6r22z27h6tvur", "bob"]).unwrap(),
        );
        let err = format!("{:#}", load_dids(&bad, Table::StudyUsers).unwrap_err());
        assert!(err.contains("row 2: not a DID: \"bob\""), "{err}");
    }

    #[test]
    fn a_bad_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("study.txt");
        std::fs::write(
            &text,
            "did:plc:z72i7hdynmk6r22z27h6tvur\nalice.bsky.social\n",
        )
        .unwrap();
        let err = format!("{:#}", load_dids(&text, Table::StudyUsers).unwrap_err());
        assert!(
            err.contains("study.txt:2: not a DID: \"alice.bsky.social\""),
            "{err}"
        );
        let csv = dir.path().join("p.csv");
        std::fs::write(&csv, "handle\nalice\n").unwrap();
        let err = format!("{:#}", load_dids(&csv, Table::StudyUsers).unwrap_err());
        assert!(err.contains("no `bluesky_user_did` column"), "{err}");
    }
}
