//! The tracked-set representation: `DidSet` against the `HashSet<Did>` it replaced, with the
//! in-network set's size (1,000,000 did:plc DIDs): memory (RSS growth while building), build
//! time, and lookups per second for members and strangers (the writer looks up every commit's
//! repo, and most are strangers). Both sets are probed in the same run, alternately.
//!
//! `cargo bench -p firehose-writer --no-default-features --bench did_set`

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Instant;

use firehose_writer::tracked::DidSet;
use sync_core::ids::Did;
use sync_core::synth::SplitMix64;

const DIDS: usize = 1_000_000;
const PROBES: usize = 2_000_000;
const ROUNDS: usize = 3;

fn random_plc(rng: &mut SplitMix64) -> Did {
    let bits = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())) >> 8;
    let id: String = (0..24)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz234567"[(bits >> (5 * i)) as usize & 31] as char)
        .collect();
    Did::parse(&format!("did:plc:{id}")).expect("valid did:plc")
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Nanoseconds per lookup over `probes`.
fn time_lookups(probes: &[Did], contains: impl Fn(&Did) -> bool) -> f64 {
    let start = Instant::now();
    let hits = probes.iter().filter(|d| contains(d)).count();
    let ns = start.elapsed().as_nanos() as f64 / probes.len() as f64;
    black_box(hits);
    ns
}

fn main() {
    let mut rng = SplitMix64(42);
    let members: Vec<Did> = (0..DIDS).map(|_| random_plc(&mut rng)).collect();
    // Half members, half strangers, in random order.
    let probes: Vec<Did> = (0..PROBES)
        .map(|_| {
            if rng.below(2) == 0 {
                members[rng.below(DIDS as u64) as usize].clone()
            } else {
                random_plc(&mut rng)
            }
        })
        .collect();

    let before = rss_mb();
    let start = Instant::now();
    let compact: DidSet = members.iter().cloned().collect();
    let compact_build = start.elapsed().as_secs_f64();
    let compact_rss = rss_mb() - before;

    let before = rss_mb();
    let start = Instant::now();
    let hashed: HashSet<Did> = members.iter().cloned().collect();
    let hashed_build = start.elapsed().as_secs_f64();
    let hashed_rss = rss_mb() - before;
    drop(members);

    let (mut compact_ns, mut hashed_ns) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        compact_ns.push(time_lookups(&probes, |d| compact.contains(d)));
        hashed_ns.push(time_lookups(&probes, |d| hashed.contains(d)));
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!("{DIDS} did:plc DIDs, {PROBES} lookups (half members) x {ROUNDS} rounds, alternating");
    println!("| set | RSS growth | heap (computed) | build | ns per lookup (best; all rounds) |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| DidSet | {compact_rss:.1} MB | {:.1} MB | {compact_build:.2} s | {:.0}; {compact_ns:.0?} |",
        compact.heap_bytes() as f64 / 1_048_576.0,
        best(&compact_ns)
    );
    println!(
        "| HashSet<Did> | {hashed_rss:.1} MB | – | {hashed_build:.2} s | {:.0}; {hashed_ns:.0?} |",
        best(&hashed_ns)
    );
}
