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
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "csv" => load_csv(path, table),
        "parquet" => bail!(
            "{}: Parquet input is not supported yet; export the DID column to a text file (one DID per line) or CSV",
            path.display()
        ),
        _ => load_text(path),
    }
}

fn load_text(path: &Path) -> Result<HashSet<Did>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut dids = HashSet::new();
    for (number, line) in text.lines().enumerate() {
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
