//! Commit-CAR reading: `sync_core::car::CarBlocks` (sync, borrowed) against `iroh-car` (async,
//! copies each block), on every commit CAR of the relay capture, same run, same machine.
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
}
