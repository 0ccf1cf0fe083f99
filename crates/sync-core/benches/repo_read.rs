//! Whole-repo reading (`getRepo` CARs): records/s on the real `relay-capture/repo.car`, looped,
//! and time and peak memory for a synthetic signed repo of 100,000 records read in 64 KiB chunks
//! as an HTTP body would deliver it (measured in a child process, so the generator's memory does
//! not count).
//!
//! `cargo bench -p sync-core --bench repo_read [-- SECONDS] [RECORDS]`

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{fixtures, now_micros, peak_rss_mb};
use sync_core::ids::Did;
use sync_core::repo::{RepoReader, DEFAULT_MAX_REPO_BYTES};
use sync_core::synth::SynthRepo;
use sync_core::verify::VerifyOptions;

const SYNTH_DID: &str = "did:plc:benchbenchbenchbenchbenc";
const SYNTH_SECRET: [u8; 32] = [11; 32];

/// Child mode: read one CAR file in 64 KiB chunks, verify it, print what it cost.
fn read_file(path: &str) {
    let car = std::fs::read(path).expect("the generated CAR");
    let rss_before = peak_rss_mb();
    let key = SynthRepo::new(SYNTH_DID, SYNTH_SECRET).public_key();
    let did = Did::parse(SYNTH_DID).unwrap();
    let start = Instant::now();
    let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
    for chunk in car.chunks(64 * 1024) {
        reader.push(chunk).expect("valid CAR");
    }
    let repo = reader
        .finish(&did, &key, &VerifyOptions::at(now_micros()))
        .expect("verifies");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "synthetic repo: {} records, {:.1} MB CAR, read+verify {:.2} s ({:.0} records/s), \
         record blocks kept {:.1} MB, peak RSS {:.0} MB (of which the CAR file held in memory \
         by this harness {:.0} MB)",
        repo.records.len(),
        car.len() as f64 / 1e6,
        secs,
        repo.records.len() as f64 / secs,
        repo.block_bytes() as f64 / 1e6,
        peak_rss_mb(),
        rss_before
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "read-repo") {
        return read_file(&args[i + 1]);
    }
    let numbers: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let budget = Duration::from_secs(numbers.first().copied().unwrap_or(5));
    let records = numbers.get(1).copied().unwrap_or(100_000);

    let car = std::fs::read(fixtures().join("relay-capture/repo.car"))
        .expect("relay-capture/repo.car (set SYNC_FIXTURES)");
    let did = Did::parse("did:plc:53iucmf5ldftgqyf2ac7hmhd").unwrap();
    let opts = VerifyOptions::at(now_micros());
    let start = Instant::now();
    let (mut n, mut listed) = (0u64, 0usize);
    while start.elapsed() < budget {
        let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
        reader.push(&car).unwrap();
        listed += reader.finish_unsigned(&did, &opts).unwrap().records.len();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "relay-capture/repo.car: {:.0} repos/s, {:.0} records/s ({} records each, no signature: \
         no DID document ships with it)",
        n as f64 / secs,
        listed as f64 / secs,
        listed as u64 / n.max(1)
    );

    let gen_start = Instant::now();
    let mut repo = SynthRepo::new(SYNTH_DID, SYNTH_SECRET);
    for i in 0..records {
        let (collection, record) = match i % 4 {
            0 => (
                "app.bsky.feed.post",
                serde_json::json!({"$type": "app.bsky.feed.post", "text": format!("post number {i} with some text to make it realistic"), "langs": ["en"], "createdAt": "2026-01-01T00:00:00.000Z"}),
            ),
            1 | 2 => (
                "app.bsky.feed.like",
                serde_json::json!({"$type": "app.bsky.feed.like", "subject": {"uri": format!("at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/app.bsky.feed.post/3k{i:011}"), "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}, "createdAt": "2026-01-01T00:00:00.000Z"}),
            ),
            _ => (
                "app.bsky.graph.follow",
                serde_json::json!({"$type": "app.bsky.graph.follow", "subject": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "createdAt": "2026-01-01T00:00:00.000Z"}),
            ),
        };
        repo.put(collection, &format!("3k{i:011}"), record);
    }
    let car = repo.get_repo_car(now_micros());
    let dir = std::env::temp_dir().join(format!("repo_read_bench_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("repo.car");
    std::fs::write(&path, &car).unwrap();
    println!(
        "generated {records} records ({:.1} MB CAR) in {:.1} s",
        car.len() as f64 / 1e6,
        gen_start.elapsed().as_secs_f64()
    );
    drop(repo);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("read-repo")
        .arg(&path)
        .output()
        .expect("child runs");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
