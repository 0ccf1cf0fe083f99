//! `gen-cache`: a synthetic cache of realistic post files for benchmarks, made with the same
//! transform the writer uses (`sync_core::transform::transform_post`), so the JSON is byte-for-byte
//! what the writer would produce for such records.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde_json::json;

/// splitmix64, the same sequence as the tests' generator (`sync_core::synth::SplitMix64`, which
/// release builds do not compile), so a seed gives the same cache as before.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (`n > 0`; the modulo bias does not matter for benchmark data).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn base32(&mut self, len: usize) -> String {
        const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        (0..len)
            .map(|_| A[self.below(32) as usize] as char)
            .collect()
    }
}

const WORDS: &[&str] = &[
    "the",
    "study",
    "bluesky",
    "today",
    "morning",
    "data",
    "research",
    "post",
    "thread",
    "news",
    "climate",
    "election",
    "coffee",
    "music",
    "science",
    "open",
    "access",
    "paper",
    "reading",
    "great",
    "think",
    "people",
    "really",
    "new",
    "week",
    "région",
    "café",
    "naïve",
    "😀",
    "🎉",
    "—",
    "https://example.org/a",
    "#science",
    "@alice.bsky.social",
    "and",
    "of",
    "to",
    "a",
    "in",
];

fn did(rng: &mut Rng) -> String {
    format!("did:plc:{}", rng.base32(24))
}

fn tid(rng: &mut Rng) -> String {
    format!("3l{}", rng.base32(11))
}

fn cid(rng: &mut Rng) -> String {
    format!("bafyrei{}", rng.base32(52))
}

fn text(rng: &mut Rng) -> String {
    let n = 3 + rng.below(40) as usize;
    let mut words = Vec::with_capacity(n);
    for _ in 0..n {
        words.push(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    words.join(" ")
}

/// One realistic post record and its cache JSON (a reply, images, a link card, a quote, facets
/// and langs with realistic frequencies).
fn post_json(rng: &mut Rng, author: &str, rkey: &str, others: &[String]) -> Result<String> {
    let mut record = json!({
        "$type": "app.bsky.feed.post",
        "text": text(rng),
        "createdAt": format!("2026-07-04T12:{:02}:{:02}.{:03}Z", rng.below(60), rng.below(60), rng.below(1000)),
        "langs": if rng.chance(80) { json!(["en"]) } else { json!(["de", "en"]) },
    });
    let obj = record.as_object_mut().expect("object");
    let other = &others[rng.below(others.len() as u64) as usize];
    if rng.chance(30) {
        let root = json!({"uri": format!("at://{other}/app.bsky.feed.post/{}", tid(rng)), "cid": cid(rng)});
        obj.insert(
            "reply".into(),
            json!({"root": root.clone(), "parent": root}),
        );
    }
    match rng.below(100) {
        0..=19 => {
            obj.insert(
                "embed".into(),
                json!({"$type": "app.bsky.embed.images", "images": [
                    {"alt": text(rng), "image": {"$type": "blob", "ref": {"$link": cid(rng)}, "mimeType": "image/jpeg", "size": 123456}},
                ]}),
            );
        }
        20..=24 => {
            obj.insert(
                "embed".into(),
                json!({"$type": "app.bsky.embed.external", "external": {
                    "uri": "https://www.example.com/news/article-1", "title": text(rng), "description": text(rng)}}),
            );
        }
        25..=29 => {
            obj.insert(
                "embed".into(),
                json!({"$type": "app.bsky.embed.record", "record": {
                    "uri": format!("at://{other}/app.bsky.feed.post/{}", tid(rng)), "cid": cid(rng)}}),
            );
        }
        _ => {}
    }
    if rng.chance(15) {
        obj.insert(
            "facets".into(),
            json!([{"index": {"byteStart": 0, "byteEnd": 5},
                    "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.org/a"}]}]),
        );
    }
    let uri = format!("at://{author}/app.bsky.feed.post/{rkey}");
    let post = sync_core::transform::transform_post(
        &uri,
        &cid(rng),
        author,
        &record,
        "2026-07-04-12:00:00",
    )
    .map_err(|e| anyhow::anyhow!("transform: {e}"))?;
    Ok(post.to_cache_json())
}

/// Writes `posts` post files under `cache`: `in_network_share` of them by ~posts/20 in-network
/// authors (`in_network_user_activity/create/post/<did>/`), the rest by 500 study users
/// (`study_user_activity/create/post/`). Returns the number of files written.
pub fn generate(cache: &Path, posts: usize, in_network_share: f64, seed: u64) -> Result<usize> {
    let mut rng = Rng::new(seed);
    let study: Vec<String> = (0..500).map(|_| did(&mut rng)).collect();
    let in_network: Vec<String> = (0..(posts / 20).max(1)).map(|_| did(&mut rng)).collect();
    let study_dir = cache.join("study_user_activity/create/post");
    fs::create_dir_all(&study_dir).with_context(|| format!("creating {}", study_dir.display()))?;
    for d in &in_network {
        let dir = cache.join("in_network_user_activity/create/post").join(d);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let threshold = (in_network_share.clamp(0.0, 1.0) * 1000.0) as u64;
    (0..posts).into_par_iter().try_for_each(|i| -> Result<()> {
        let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let rkey = tid(&mut rng);
        let (author, dir) = if rng.below(1000) < threshold {
            let a = &in_network[rng.below(in_network.len() as u64) as usize];
            (
                a,
                cache.join("in_network_user_activity/create/post").join(a),
            )
        } else {
            (
                &study[rng.below(study.len() as u64) as usize],
                study_dir.clone(),
            )
        };
        let json = post_json(&mut rng, author, &rkey, &study)?;
        let name = format!("author_did={author}_post_uri_suffix={rkey}.json");
        fs::write(dir.join(&name), json).with_context(|| format!("writing {name}"))?;
        Ok(())
    })?;
    Ok(posts)
}

/// `gen-output`: a synthetic **exported** dataset of `rows` post rows (study users' and
/// in-network posts, as [`generate`] makes them) written straight through the export's commit
/// protocol (staged Parquet, journal commit, publish, manifest), `batch_rows` rows per batch,
/// without a cache: the consent-purge benchmark needs millions of exported rows, which exporting
/// a cache of millions of files would take hours to make on a small machine. One study user (the
/// participant, printed) posts, and is replied to and quoted, only in `participant_batches`
/// batches spread over the run; everyone else everywhere. Returns the participant's DID and the
/// rows written.
pub fn generate_output(
    config: &crate::Config,
    rows: usize,
    batch_rows: usize,
    participant_batches: usize,
    seed: u64,
) -> Result<(String, usize)> {
    use crate::tables::{self, Source, TableId};
    let mut rng = Rng::new(seed);
    let study: Vec<String> = (0..500).map(|_| did(&mut rng)).collect();
    let in_network: Vec<String> = (0..(rows / 20).max(1)).map(|_| did(&mut rng)).collect();
    let participant = study[0].clone();
    let others = &study[1..];
    fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    let mut state = crate::state::State::open(&config.state_dir)?;
    crate::export::check_output_binding(config, &state)?;
    let sink =
        crate::sink::Sink::new(&config.output, &config.s3, config.state_dir.join("staging"))?;
    crate::manifest::reconcile(&sink, &state, &config.state_dir)?;
    let owner = state.ensure_owner_id()?;
    let batches = rows.div_ceil(batch_rows.max(1));
    let theirs: Vec<usize> = (0..participant_batches.min(batches))
        .map(|i| {
            (i * batches) / participant_batches.max(1) + batches / (2 * participant_batches.max(1))
        })
        .collect();
    let export_ts = sync_core::transform::sync_timestamp(crate::now_secs());
    let mut written = 0;
    for b in 0..batches {
        let n = batch_rows.min(rows - written);
        let with_them = theirs.contains(&b);
        let parsed: Vec<tables::Parsed> = (0..n)
            .into_par_iter()
            .map(|i| -> Result<tables::Parsed> {
                let i = written + i;
                let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
                let rkey = tid(&mut rng);
                let targets: &[String] = if with_them { &study } else { others };
                let (author, table) = if rng.below(1000) < 800 {
                    (
                        &in_network[rng.below(in_network.len() as u64) as usize],
                        TableId::InNetworkPost,
                    )
                } else {
                    (
                        &targets[rng.below(targets.len() as u64) as usize],
                        TableId::StudyPost,
                    )
                };
                let json = post_json(&mut rng, author, &rkey, targets)?;
                let name = format!("author_did={author}_post_uri_suffix={rkey}.json");
                tables::parse(&Source::Post(table), &name, json.as_bytes(), &export_ts)
                    .map_err(|e| anyhow::anyhow!("parsing a generated post: {e}"))
            })
            .collect::<Result<_>>()?;
        let mut by_table: std::collections::BTreeMap<TableId, Vec<Vec<tables::Cell>>> =
            Default::default();
        let mut keys = Vec::with_capacity(n);
        for p in parsed {
            keys.push(p.dedupe.to_le_bytes());
            by_table.entry(p.table).or_default().push(p.row);
        }
        let mut outputs = Vec::new();
        for (t, table_rows) in by_table {
            let def = tables::table(t);
            let planned = sink.plan(def.path, &export_ts[..10])?;
            let mut df = crate::parquet::build_frame(def, &table_rows)?;
            let bytes =
                crate::parquet::write_parquet(&mut df, def, &planned.staged, config.compression)?;
            outputs.push(crate::state::BatchOutput {
                table_path: def.path.to_owned(),
                location: planned.location,
                staged: planned.staged,
                rows: table_rows.len() as u64,
                bytes,
            });
        }
        let batch = state.commit(
            &crate::state::NewBatch {
                now: crate::now_secs(),
                outputs: &outputs,
                keys: &keys,
                rows: n as u64,
            },
            config.dedupe_retention_secs,
        )?;
        for o in &batch.outputs {
            sink.publish(&o.staged, &o.location, false)?;
        }
        crate::manifest::write(&sink, &batch, &owner, &state.batch_keys(batch.id)?)?;
        state.mark_published(batch.id)?;
        state.merge_key_runs()?;
        written += n;
        tracing::info!(
            batch = batch.id,
            rows = written,
            participant = with_them,
            "generated"
        );
    }
    Ok((participant, written))
}
