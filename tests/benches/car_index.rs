//! Commit-CAR reading: `sync_core::car::CarBlocks` (sync, borrowed) against `iroh-car` (async,
//! copies each block), on every commit CAR of the relay capture, same run, same machine.
//! Then whole repos (`getRepo` CARs): `sync_core::repo::RepoReader` fed 64 KiB chunks (as an HTTP
//! body arrives) against `iroh-car` splitting the same stream into blocks for
//! `RepoReader::push_block`; both verify and list the same records.
//!
//! `cargo bench -p workspace-tests --bench car_index [-- SECONDS]`

use std::time::{Duration, Instant};

use sync_core::car::CarBlocks;
use sync_core::frame::{capture_frames, decode_frame, Event};

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let dir = workspace_tests::fixtures().expect("fixtures (set SYNC_FIXTURES)");
    let data = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    // The raw `blocks` bytes of every commit, re-extracted from the frames.
    let cars: Vec<Vec<u8>> = capture_frames(&data)
        .filter_map(|f| match decode_frame(f.unwrap()).ok()? {
            Event::Commit(c) => {
                let mut car = Vec::new();
                let root = c.blocks.roots[0];
                let blocks: Vec<_> = c.blocks.iter().map(|(cid, b)| (*cid, b.to_vec())).collect();
                car.extend(sync_core::synth::car(&root, &blocks));
                Some(car)
            }
            _ => None,
        })
        .collect();
    let bytes: usize = cars.iter().map(Vec::len).sum();
    println!(
        "{} commit CARs, {:.1} KB average",
        cars.len(),
        bytes as f64 / cars.len() as f64 / 1e3
    );
    let budget = Duration::from_secs(seconds);

    let start = Instant::now();
    let (mut n, mut blocks) = (0u64, 0usize);
    while start.elapsed() < budget {
        for car in &cars {
            blocks += CarBlocks::parse(car).unwrap().len();
            n += 1;
        }
    }
    let ours = n as f64 / start.elapsed().as_secs_f64();
    println!("sync_core::car   {ours:>10.0} CARs/s ({blocks} blocks)");

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let start = Instant::now();
    let (mut n, mut blocks) = (0u64, 0usize);
    while start.elapsed() < budget {
        for car in &cars {
            rt.block_on(async {
                let mut reader = iroh_car::CarReader::new(car.as_slice()).await.unwrap();
                while let Some(_block) = reader.next_block().await.unwrap() {
                    blocks += 1;
                }
            });
            n += 1;
        }
    }
    let iroh = n as f64 / start.elapsed().as_secs_f64();
    println!("iroh-car 0.5     {iroh:>10.0} CARs/s ({blocks} blocks)");
    println!("ratio: sync_core::car is {:.1}x iroh-car", ours / iroh);

    repos(&dir, budget, &rt);
}

/// Reads one repo both ways; returns the record count (asserted equal).
fn read_both(
    car: &[u8],
    did: &sync_core::ids::Did,
    key: Option<&sync_core::crypto::PublicKey>,
    rt: &tokio::runtime::Runtime,
    opts: &sync_core::verify::VerifyOptions,
) -> (usize, std::time::Duration, std::time::Duration) {
    use sync_core::repo::{RepoReader, DEFAULT_MAX_REPO_BYTES};
    let finish = |reader: RepoReader| match key {
        Some(key) => reader.finish(did, key, opts).unwrap(),
        None => reader.finish_unsigned(did, opts).unwrap(),
    };
    let start = Instant::now();
    let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
    for chunk in car.chunks(64 * 1024) {
        reader.push(chunk).unwrap();
    }
    let ours = finish(reader);
    let ours_time = start.elapsed();

    let start = Instant::now();
    let theirs = rt.block_on(async {
        let mut car_reader = iroh_car::CarReader::new(car).await.unwrap();
        let mut reader = RepoReader::new(DEFAULT_MAX_REPO_BYTES);
        // iroh-car pins its own `cid` version: convert through bytes.
        let roots = car_reader
            .header()
            .roots()
            .iter()
            .map(|c| ipld_core::cid::Cid::try_from(c.to_bytes()).unwrap())
            .collect();
        reader.set_roots(roots);
        while let Some((cid, block)) = car_reader.next_block().await.unwrap() {
            let cid = ipld_core::cid::Cid::try_from(cid.to_bytes()).unwrap();
            reader.push_block(cid, block).unwrap();
        }
        finish(reader)
    });
    let theirs_time = start.elapsed();
    assert_eq!(ours.records, theirs.records);
    (ours.records.len(), ours_time, theirs_time)
}

fn repos(dir: &std::path::Path, budget: Duration, rt: &tokio::runtime::Runtime) {
    use sync_core::synth::SynthRepo;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let opts = sync_core::verify::VerifyOptions::at(now);
    let car = std::fs::read(dir.join("relay-capture/repo.car")).unwrap();
    let did = sync_core::ids::Did::parse("did:plc:53iucmf5ldftgqyf2ac7hmhd").unwrap();
    let (mut records, mut ours, mut theirs, mut n) = (0, Duration::ZERO, Duration::ZERO, 0u32);
    let start = Instant::now();
    while start.elapsed() < budget {
        let (r, a, b) = read_both(&car, &did, None, rt, &opts);
        records += r;
        ours += a;
        theirs += b;
        n += 1;
    }
    println!(
        "repo.car ({} records, unsigned): RepoReader::push {:.0} records/s, iroh-car + push_block {:.0} records/s",
        records / n as usize,
        records as f64 / ours.as_secs_f64(),
        records as f64 / theirs.as_secs_f64()
    );
    let mut repo = SynthRepo::new("did:plc:benchbenchbenchbenchbenc", [11; 32]);
    for i in 0..20_000u32 {
        repo.put(
            "app.bsky.feed.like",
            &format!("3k{i:011}"),
            serde_json::json!({"$type": "app.bsky.feed.like", "subject": {"uri": format!("at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/app.bsky.feed.post/3k{i:011}"), "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}, "createdAt": "2026-01-01T00:00:00.000Z"}),
        );
    }
    let car = repo.get_repo_car(now);
    let key = repo.public_key();
    let (records, ours, theirs) = read_both(&car, &repo.did(), Some(&key), rt, &opts);
    println!(
        "synthetic {records}-record repo ({:.1} MB, signed): RepoReader::push {:.0} records/s, \
         iroh-car + push_block {:.0} records/s",
        car.len() as f64 / 1e6,
        records as f64 / ours.as_secs_f64(),
        records as f64 / theirs.as_secs_f64()
    );
}
