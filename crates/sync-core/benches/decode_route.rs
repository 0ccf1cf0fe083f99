//! Decode + route throughput on the real relay capture, looped, single thread.
//!
//! `cargo bench -p sync-core --bench decode_route [-- SECONDS]`
//! Loads 1,000 study users and 1,000,000 in-network DIDs (a slice of each taken from the capture
//! so routing really fires), then measures, in the same run:
//! - `decode+route`: what the writer does per frame (pre-filtered: only routed records are fully
//!   decoded and transformed);
//! - `decode only`: frame + CAR decoding, no routing;
//! - `decode all records to JSON`: the naive approach (every record of every op converted to the
//!   JSON data model, as Jetstream does), for comparison;
//! - `decode+verify+route`: the same with every commit fully verified first (Sync 1.1: commit
//!   object, signature with the DID document's key, MST inversion), keys parsed once as the
//!   writer's identity cache holds them; and the cost of each verification step alone.
//!
//! Reports frames/s, MB/s and the process's peak RSS (VmHWM). `BENCH_ONLY=TEXT` runs only the
//! measurements whose name contains TEXT (to profile one of them, e.g. `BENCH_ONLY=verify`).

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{fixtures, now_micros, peak_rss_mb};
use sync_core::crypto::PublicKey;
use sync_core::did_doc::parse_did_doc_map;
use sync_core::frame::{capture_frames, decode_frame, Event};
use sync_core::ids::Did;
use sync_core::route::{route_event, MemoryState};
use sync_core::verify::{
    prove_ops, verify_commit, verify_commit_block, verify_signed_commit, VerifyOptions,
};

/// A deterministic fake did:plc (24 base32 chars) for index `i`.
fn fake_did(i: u64) -> Did {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    let mut s = String::from("did:plc:");
    for _ in 0..24 {
        s.push(ALPHABET[(x % 32) as usize] as char);
        x = x.rotate_right(5) ^ i.wrapping_add(0x1234_5678);
    }
    Did::parse(&s).expect("fake DID is valid")
}

/// Whether the measurement `name` is wanted (`BENCH_ONLY` unset, or a part of `name`).
fn selected(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| name.contains(only.as_str()))
}

fn measure(
    name: &str,
    frames: &[&[u8]],
    bytes: usize,
    budget: Duration,
    mut f: impl FnMut(&[u8]) -> usize,
) {
    if !selected(name) {
        return;
    }
    let start = Instant::now();
    let mut loops = 0u64;
    let mut work = 0usize;
    while start.elapsed() < budget {
        for frame in frames {
            work += f(frame);
        }
        loops += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = loops as f64 * frames.len() as f64;
    println!(
        "{name:<28} {:>10.0} frames/s  {:>8.1} MB/s  ({} frames in {secs:.2} s, work {work})",
        n / secs,
        loops as f64 * bytes as f64 / secs / 1e6,
        n as u64
    );
}

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let budget = Duration::from_secs(seconds);
    let data = std::fs::read(fixtures().join("relay-capture/frames.bin"))
        .expect("relay-capture/frames.bin (set SYNC_FIXTURES)");
    let frames: Vec<&[u8]> = capture_frames(&data).map(|f| f.unwrap()).collect();
    let bytes: usize = frames.iter().map(|f| f.len()).sum();

    let mut capture_dids: Vec<Did> = frames
        .iter()
        .filter_map(|f| match decode_frame(f).ok()? {
            Event::Commit(c) => Some(c.repo),
            _ => None,
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    capture_dids.sort();
    let mut state = MemoryState::default();
    // 1,000 study users: 10 authors from the capture + 990 others.
    state
        .study_users
        .extend(capture_dids.iter().take(10).cloned());
    state.study_users.extend((0..990).map(fake_did));
    // 1,000,000 in-network: 40 authors from the capture + the rest.
    state
        .in_network
        .extend(capture_dids.iter().skip(10).take(40).cloned());
    state
        .in_network
        .extend((1_000_000..1_000_000 + 1_000_000 - 40).map(fake_did));
    assert_eq!(state.study_users.len(), 1_000);
    assert_eq!(state.in_network.len(), 1_000_000);
    println!(
        "capture: {} frames, {:.1} KB avg; sets loaded, RSS peak so far {:.0} MB",
        frames.len(),
        bytes as f64 / frames.len() as f64 / 1e3,
        peak_rss_mb()
    );

    let clock = "2026-07-04-14:38:08";
    // Warm the study-post index as a running writer would have it.
    for frame in &frames {
        let event = decode_frame(frame).unwrap();
        for u in route_event(&event, &state, clock).updates {
            state.apply(&u);
        }
    }
    let mut routed_files = 0;
    for frame in &frames {
        routed_files += route_event(&decode_frame(frame).unwrap(), &state, clock)
            .files
            .len();
    }
    println!("routing writes {routed_files} files per pass over the capture");

    measure("decode+route", &frames, bytes, budget, |frame| {
        let event = decode_frame(frame).unwrap();
        let routing = route_event(&event, &state, clock);
        routing.files.len()
    });
    measure(
        "decode only",
        &frames,
        bytes,
        budget,
        |frame| match decode_frame(frame).unwrap() {
            Event::Commit(c) => c.ops.len(),
            _ => 1,
        },
    );
    measure(
        "decode all records to JSON",
        &frames,
        bytes,
        budget,
        |frame| match decode_frame(frame).unwrap() {
            Event::Commit(c) => c
                .ops
                .iter()
                .filter_map(|op| op.as_ref().ok())
                .filter_map(|op| c.record_json(op).ok().flatten())
                .count(),
            _ => 1,
        },
    );

    let docs = std::fs::read_to_string(fixtures().join("relay-capture/did_docs.json"))
        .expect("relay-capture/did_docs.json");
    let keys: std::collections::HashMap<Did, PublicKey> = parse_did_doc_map(&docs)
        .expect("DID documents")
        .into_iter()
        .filter_map(|(did, id)| Some((did, id.ok()?.signing_key)))
        .collect();
    let opts = VerifyOptions::at(now_micros());
    let commits = frames
        .iter()
        .filter(|f| matches!(decode_frame(f), Ok(Event::Commit(_))))
        .count();
    measure("decode+verify+route", &frames, bytes, budget, |frame| {
        let event = decode_frame(frame).unwrap();
        if let Event::Commit(c) = &event {
            verify_commit(c, &keys[&c.repo], &opts).expect("capture commits verify");
        }
        route_event(&event, &state, clock).files.len()
    });
    println!("  ({commits} of {} frames are commits)", frames.len());
    let step = |name: &str, f: &mut dyn FnMut(&sync_core::frame::Commit<'_>)| {
        if !selected(name) {
            return;
        }
        let decoded: Vec<_> = frames
            .iter()
            .filter_map(|f| match decode_frame(f).ok()? {
                Event::Commit(c) => Some(c),
                _ => None,
            })
            .collect();
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget / 2 {
            for c in &decoded {
                f(c);
            }
            n += decoded.len() as u64;
        }
        println!(
            "{name:<28} {:>10.1} us per commit",
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    };
    step("  commit object + signature", &mut |c| {
        verify_signed_commit(&c.blocks, &c.commit, &c.repo, &c.rev, &keys[&c.repo], &opts).unwrap();
    });
    step("  commit object, no signature", &mut |c| {
        let block = c.blocks.get(&c.commit).expect("commit block");
        verify_commit_block(&c.commit, block, &c.repo, Some(&c.rev), None, &opts).unwrap();
    });
    let data_of: std::collections::HashMap<_, _> = frames
        .iter()
        .filter_map(|f| match decode_frame(f).ok()? {
            Event::Commit(c) => Some((
                c.commit,
                verify_commit(&c, &keys[&c.repo], &opts)
                    .unwrap()
                    .commit
                    .data,
            )),
            _ => None,
        })
        .collect();
    step("  MST inversion alone", &mut |c| {
        prove_ops(c, &data_of[&c.commit]).unwrap();
    });
    println!("peak RSS {:.0} MB", peak_rss_mb());
}
