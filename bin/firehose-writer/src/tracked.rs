//! Loading the tracked sets (study users, in-network users) from operator files, and [`DidSet`],
//! the compact form they are held in.
//!
//! A line or row that is not a valid DID fails start-up with the file and line named: tracking
//! the wrong people silently is worse than not starting.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sync_core::ids::{AtUri, Did};

/// Bytes of a did:plc identifier decoded: 24 base32 characters carry exactly 120 bits.
const PLC_KEY_LEN: usize = 15;
const PLC_PREFIX: &str = "did:plc:";
type PlcKey = [u8; PLC_KEY_LEN];

/// The 15 bytes a did:plc identifier encodes, or `None` for any other DID (another method, or
/// a did:plc that is not the canonical 24 lowercase base32 characters). The mapping is one to
/// one on the DIDs it accepts, so comparing keys is comparing DIDs.
fn plc_key(did: &str) -> Option<PlcKey> {
    let id = did.strip_prefix(PLC_PREFIX)?;
    // Uppercase input would decode too: refuse it so two different DID strings never share a key.
    if id.len() != 24
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    {
        return None;
    }
    let mut upper = [0u8; 24];
    upper.copy_from_slice(id.as_bytes());
    upper.make_ascii_uppercase();
    let mut key = [0u8; PLC_KEY_LEN];
    match data_encoding::BASE32_NOPAD.decode_mut(&upper, &mut key) {
        Ok(PLC_KEY_LEN) => Some(key),
        _ => None,
    }
}

/// A DID string prepared for [`DidSet::contains_probe`]: a did:plc decoded to its key once. A
/// string that is not a DID is in no set.
pub struct DidProbe<'a> {
    did: &'a str,
    plc: Option<PlcKey>,
}

impl<'a> DidProbe<'a> {
    pub fn new(did: &'a str) -> Self {
        DidProbe {
            did,
            plc: plc_key(did),
        }
    }
}

/// A set of DIDs held compactly: the in-network set has about a million entries, and as
/// `HashSet<Did>` it cost ~80 MB (a heap string plus a hash slot per DID). did:plc DIDs (nearly
/// all of them) are kept as their 15 decoded bytes in one sorted array, with a bucket index on
/// the leading bits so a lookup touches one bucket of a few entries instead of binary-searching
/// the whole array: ~16 bytes per DID. Other methods (did:web) are rare and kept as they are.
///
/// Immutable once built ([`DidSetBuilder`], `collect`, `From<HashSet<Did>>`): the sets are
/// replaced whole on reload, and live follows are tracked beside them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DidSet {
    /// Decoded did:plc identifiers, sorted, without duplicates.
    plc: Vec<PlcKey>,
    /// `plc[index[b]..index[b + 1]]` holds the keys whose leading `bits` bits equal `b`.
    index: Vec<usize>,
    bits: u32,
    other: HashSet<Did>,
}

impl std::fmt::Debug for DidSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DidSet")
            .field("plc", &self.plc.len())
            .field("other", &self.other)
            .finish()
    }
}

/// Leading `bits` bits of a key (at most 24).
fn bucket(key: &PlcKey, bits: u32) -> usize {
    let top = u32::from_be_bytes([0, key[0], key[1], key[2]]);
    (top >> (24 - bits)) as usize
}

impl DidSet {
    pub fn builder() -> DidSetBuilder {
        DidSetBuilder::default()
    }

    pub fn contains(&self, did: &Did) -> bool {
        self.contains_probe(&DidProbe::new(did.as_str()))
    }

    /// [`Self::contains`] for a DID already decoded by [`DidProbe::new`] (asking several sets
    /// about one DID decodes a did:plc once).
    pub fn contains_probe(&self, probe: &DidProbe<'_>) -> bool {
        match &probe.plc {
            Some(key) => self.contains_plc(key),
            None => self.other.contains(probe.did),
        }
    }

    fn contains_plc(&self, key: &PlcKey) -> bool {
        let b = bucket(key, self.bits);
        let bounds = self.index.get(b).zip(self.index.get(b + 1));
        bounds
            .and_then(|(&start, &end)| self.plc.get(start..end))
            .is_some_and(|keys| keys.binary_search(key).is_ok())
    }

    pub fn len(&self) -> usize {
        self.plc.len() + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every DID of the set (did:plc ones rebuilt from their bytes), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Did> + '_ {
        let plc = self.plc.iter().filter_map(|key| {
            let id = data_encoding::BASE32_NOPAD.encode(key).to_ascii_lowercase();
            Did::parse(&format!("{PLC_PREFIX}{id}")).ok()
        });
        plc.chain(self.other.iter().cloned())
    }

    /// Heap bytes held (capacities, not lengths): what the set costs in memory.
    pub fn heap_bytes(&self) -> usize {
        self.plc.capacity() * PLC_KEY_LEN
            + self.index.capacity() * std::mem::size_of::<usize>()
            + self.other.capacity() * (std::mem::size_of::<Did>() + 1)
            + self.other.iter().map(|d| d.as_str().len()).sum::<usize>()
    }
}

/// Collects DIDs for a [`DidSet`]; duplicates are fine.
#[derive(Default)]
pub struct DidSetBuilder {
    plc: Vec<PlcKey>,
    other: HashSet<Did>,
}

impl DidSetBuilder {
    pub fn insert(&mut self, did: Did) {
        match plc_key(did.as_str()) {
            Some(key) => self.plc.push(key),
            None => {
                self.other.insert(did);
            }
        }
    }

    pub fn build(self) -> DidSet {
        let DidSetBuilder { mut plc, other } = self;
        plc.sort_unstable();
        plc.dedup();
        plc.shrink_to_fit();
        // About four keys per bucket: the index costs ~2 bytes per DID and a lookup reads one
        // or two cache lines of keys.
        let bits = (plc.len() / 4).max(1).ilog2().min(24);
        let mut index = vec![0usize; (1 << bits) + 1];
        for key in &plc {
            index[bucket(key, bits) + 1] += 1;
        }
        let mut below = 0;
        for slot in &mut index {
            below += *slot;
            *slot = below;
        }
        DidSet {
            plc,
            index,
            bits,
            other,
        }
    }
}

impl FromIterator<Did> for DidSet {
    fn from_iter<I: IntoIterator<Item = Did>>(iter: I) -> Self {
        let mut builder = DidSet::builder();
        for did in iter {
            builder.insert(did);
        }
        builder.build()
    }
}

impl From<HashSet<Did>> for DidSet {
    fn from(set: HashSet<Did>) -> Self {
        set.into_iter().collect()
    }
}

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
pub fn load_dids(path: &Path, table: Table) -> Result<DidSet> {
    let mut dids = DidSet::builder();
    if path.is_dir() {
        load_parquet_dataset(path, table, &mut dids)?;
        return Ok(dids.build());
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "csv" => load_csv(path, table, &mut dids)?,
        "parquet" => load_parquet(path, table, &mut dids)?,
        _ => load_text(path, &mut dids)?,
    }
    Ok(dids.build())
}

/// A directory of Parquet files, e.g. the predecessor's `scraped_user_social_network/` dataset
/// (`{cache,active}/partition_date=*/<hex>-0.parquet`): every `*.parquet` below it.
fn load_parquet_dataset(dir: &Path, table: Table, dids: &mut DidSetBuilder) -> Result<()> {
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
    for file in files {
        load_parquet(&file, table, dids)?;
    }
    Ok(())
}

#[cfg(not(feature = "parquet"))]
fn load_parquet(path: &Path, _table: Table, _dids: &mut DidSetBuilder) -> Result<()> {
    bail!(
        "{}: this build has no Parquet support (built without the `parquet` feature); use a text or CSV file",
        path.display()
    )
}

#[cfg(feature = "parquet")]
fn load_parquet(path: &Path, table: Table, dids: &mut DidSetBuilder) -> Result<()> {
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

fn load_text(path: &Path, dids: &mut DidSetBuilder) -> Result<()> {
    each_did_line(path, |did| dids.insert(did))
}

/// Calls `each` with every DID of a text file (one per line, `#` comments, blank lines
/// ignored); any other line is an error naming the file and line.
pub fn each_did_line(path: &Path, mut each: impl FnMut(Did)) -> Result<()> {
    use std::io::BufRead;
    // Streamed line by line: a million-DID file never sits in memory next to the set.
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: unreadable line", path.display(), number + 1))?;
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let did = Did::parse(line)
            .with_context(|| format!("{}:{}: not a DID: {line:?}", path.display(), number + 1))?;
        each(did);
    }
    Ok(())
}

fn load_csv(path: &Path, table: Table, dids: &mut DidSetBuilder) -> Result<()> {
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
    Ok(())
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
    fn iter_gives_back_every_did_as_given() {
        let dids = [
            "did:plc:z72i7hdynmk6r22z27h6tvur",
            "did:plc:4llrhdclvdlmmynkwsmg5tdc",
            "did:web:example.com",
        ];
        let set: DidSet = dids
            .iter()
            .map(|d| Did::parse(d).unwrap())
            .collect::<HashSet<_>>()
            .into();
        let mut back: Vec<String> = set.iter().map(|d| d.as_str().to_owned()).collect();
        back.sort();
        let mut want: Vec<String> = dids.iter().map(|d| d.to_string()).collect();
        want.sort();
        assert_eq!(back, want);
    }

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
        assert_eq!(set, DidSet::from(expected));
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

    /// Distinct, evenly spread did:plc DIDs (as real ones are: base32 of a hash).
    fn plc_dids(n: u64) -> Vec<Did> {
        let mut rng = sync_core::synth::SplitMix64(7);
        (0..n)
            .map(|_| {
                let bits = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())) >> 8;
                let id: String = (0..24)
                    .map(|i| {
                        b"abcdefghijklmnopqrstuvwxyz234567"[(bits >> (5 * i)) as usize & 31] as char
                    })
                    .collect();
                Did::parse(&format!("did:plc:{id}")).unwrap()
            })
            .collect()
    }

    #[test]
    fn did_set_answers_exactly_for_every_method() {
        let members = plc_dids(10_000);
        let strangers = plc_dids(20_000).split_off(10_000);
        let web = Did::parse("did:web:example.com").unwrap();
        // Not canonical did:plc (upper case, wrong length): kept as strings, never confused with
        // the lowercase DID that decodes to the same bytes.
        let upper = Did::parse(
            &members[0]
                .as_str()
                .to_ascii_uppercase()
                .replace("DID:PLC:", "did:plc:"),
        )
        .unwrap();
        let short = Did::parse("did:plc:abc").unwrap();
        let mut input = members.clone();
        input.extend(members.iter().take(100).cloned()); // duplicates in the input
        input.push(web.clone());
        input.push(short.clone());
        let set: DidSet = input.into_iter().collect();
        assert_eq!(set.len(), members.len() + 2);
        assert!(members.iter().all(|d| set.contains(d)));
        assert!(strangers.iter().all(|d| !set.contains(d)));
        assert!(set.contains(&web) && set.contains(&short));
        assert!(!set.contains(&upper));
        assert!(!set.contains(&Did::parse("did:web:example.org").unwrap()));
        let with_upper: DidSet = [upper.clone()].into_iter().collect();
        assert!(with_upper.contains(&upper) && !with_upper.contains(&members[0]));
        assert!(DidSet::default().is_empty() && !DidSet::default().contains(&web));
        let one: DidSet = [members[1].clone()].into_iter().collect();
        assert!(one.contains(&members[1]) && !one.contains(&members[2]));
    }

    /// The point of `DidSet`: a million in-network DIDs in ~16 MB instead of ~80.
    #[test]
    fn a_million_did_plc_cost_at_most_17_bytes_each() {
        let dids = plc_dids(1_000_000);
        let probe = dids[123_456].clone();
        let set: DidSet = dids.into_iter().collect();
        assert_eq!(set.len(), 1_000_000);
        assert!(set.contains(&probe));
        let per_did = set.heap_bytes() as f64 / set.len() as f64;
        assert!(per_did <= 17.0, "{per_did:.1} bytes per DID");
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

/// Who is tracked (study users and in-network accounts), readable from another thread: the
/// verification stage ahead of the processor asks it which commits the processor will verify.
/// The processor's state store keeps it current (sets replaced on SIGHUP, accounts followed
/// and unfollowed by study users). An answer a moment out of date only moves work: a commit
/// not checked ahead is checked by the processor, one checked needlessly is ignored.
#[derive(Debug, Default)]
pub struct SharedMembership {
    sets: std::sync::RwLock<(std::sync::Arc<DidSet>, std::sync::Arc<DidSet>)>,
    followed: std::sync::RwLock<HashSet<Did>>,
}

impl SharedMembership {
    pub fn new(study: std::sync::Arc<DidSet>, in_network: std::sync::Arc<DidSet>) -> Self {
        SharedMembership {
            sets: std::sync::RwLock::new((study, in_network)),
            followed: Default::default(),
        }
    }

    /// Whether `did` is a study user or in-network.
    pub fn tracked(&self, did: &Did) -> bool {
        self.tracked_str(did.as_str())
    }

    /// [`Self::tracked`] for a DID string not (yet) parsed: the verification stage asks this
    /// of every frame's repo, and most are tracked by no set, so they are never allocated.
    pub fn tracked_str(&self, did: &str) -> bool {
        // A poisoned lock still holds valid sets (they are replaced whole).
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
        let probe = DidProbe::new(did);
        if sets.0.contains_probe(&probe) || sets.1.contains_probe(&probe) {
            return true;
        }
        drop(sets);
        self.followed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(did)
    }

    pub fn replace_sets(&self, study: std::sync::Arc<DidSet>, in_network: std::sync::Arc<DidSet>) {
        *self.sets.write().unwrap_or_else(|p| p.into_inner()) = (study, in_network);
    }

    /// A study user now follows `did` (it was followed by none).
    pub fn followed(&self, did: &Did) {
        self.followed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(did.clone());
    }

    /// Every account study users follow, replacing what was held.
    pub fn replace_followed(&self, followed: HashSet<Did>) {
        *self.followed.write().unwrap_or_else(|p| p.into_inner()) = followed;
    }

    /// No study user follows `did` any more.
    pub fn unfollowed(&self, did: &Did) {
        self.followed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(did);
    }
}
