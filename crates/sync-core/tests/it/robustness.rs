//! Hostile-input robustness of the frame decoder and everything downstream of it.
//!
//! Every fixture frame (the 150 relay frames, the 4 indigo commits re-encoded as frames, and synth
//! frames of every kind) is truncated at many lengths and bit-flipped at many positions; each
//! variant goes through `decode_frame`, `event_lines`, `route_event` and `record_json` inside
//! `catch_unwind`, and no variant may panic. Bit flips inside a record block must never yield a
//! record. Oversized and pathological variants (frame over 5 MiB, blocks over 2 MB, 201 ops,
//! record over 1 MiB, 100k-deep nesting, 2^63-byte CBOR lengths, huge CAR varints, too many CAR
//! roots) must fail with the right error. Frame-format checks: `prevData` absent/null/link/badly
//! typed, `#sync` blocks (required, size-limited), a CAR repeating a CID with different bytes
//! (rejected) or the same bytes (merged), and record CIDs that are not CIDv1 DAG-CBOR SHA2-256
//! (that op fails with `bad_cid`). A proptest feeds arbitrary bytes and mutations of a valid commit
//! frame. Peak memory on hostile frames is measured by the separate `alloc` test binary.
//!
//! Fixture root: `$SYNC_FIXTURES`, else `<repo>/../shared/fixtures`; the fixture-driven tests
//! skip (with a message) when it is absent, the synth-only ones always run. Counts are sized for
//! a debug build on two cores; `ROBUSTNESS_FULL=1` flips 2,000 positions of every large frame
//! (~330k variants, a few minutes).

use std::collections::{BTreeMap, HashSet};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use proptest::prelude::*;
use serde_json::{json, Value};
use sync_core::car::{CarBlocks, CarError};
use sync_core::cbor::{self, CborError};
use sync_core::frame::{
    capture_frames, decode_frame, Event, FrameError, OpError, MAX_BLOCKS_BYTES, MAX_FRAME_BYTES,
    MAX_OPS, MAX_RECORD_BYTES,
};
use sync_core::ids::Did;
use sync_core::jetstream::event_lines;
use sync_core::route::{route_event, MemoryState};
use sync_core::synth::{self, OpSpec};

const CLOCK: &str = "2024-10-02-14:05:11";
const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const A1: &str = "did:plc:w4xbfzo7kqfes5zb7r6qv3rw";
const REV: &str = "3l5jnpb6xyz2k";
const TIME: &str = "2024-10-02T14:05:11.000Z";
const STUDY_POST: &str = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k";
const SOME_CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";

// Budget knobs (debug build, 2 cores: the whole binary stays under ~20 s).
/// Frames up to this size get every truncation length.
const ALL_PREFIXES_BELOW: usize = 2048;
/// Evenly spaced cut points for larger frames (plus the first and last 64 lengths, plus every
/// structural boundary: header end, CAR header end, each CAR section start/CID end).
const CUT_POINTS: usize = 200;
/// Frames below this size get every byte flipped (two bits of each, all eight below 512 bytes).
const ALL_POSITIONS_BELOW: usize = 2048;
const ALL_BITS_BELOW: usize = 512;
/// Flipped positions in a larger frame, besides every header bit and each record block's CID and
/// data: [`DEEP_FLIP_POSITIONS`] for the indigo commits and every [`DEEP_EVERY`]th relay frame
/// (every frame with `ROBUSTNESS_FULL=1`), [`FLIP_POSITIONS`] for the others. Each variant costs
/// ~0.2 ms in a debug build (decode, render, route, three hash checks per record).
const FLIP_POSITIONS: usize = 300;
const DEEP_FLIP_POSITIONS: usize = 2000;
const DEEP_EVERY: usize = 15;
/// A commit with many ops costs that many times more per variant (the 42-op indigo commit ~7 ms):
/// its spread is capped at `OP_WORK / (1 + ops)`, but never below [`MIN_FLIP_POSITIONS`].
const OP_WORK: usize = 6000;
const MIN_FLIP_POSITIONS: usize = 200;

// ---------------------------------------------------------------------------------------------
// Fixtures and corpus
// ---------------------------------------------------------------------------------------------

use crate::fixtures;

struct Named {
    name: String,
    bytes: Vec<u8>,
}

fn encode(v: &Ipld) -> Vec<u8> {
    cbor::encode_ipld(v).expect("test IPLD encodes")
}

fn ipld(v: &Value) -> Ipld {
    cbor::json_to_ipld(v).expect("test JSON is atproto data")
}

fn raw_frame(header: &Value, body: &Ipld) -> Vec<u8> {
    let mut out = encode(&ipld(header));
    out.extend(encode(body));
    out
}

/// indigo commits are JSON bodies (`$bytes` blocks): re-encoded as a real frame (as decode.rs).
fn indigo_frame(body: &Value) -> Vec<u8> {
    raw_frame(&json!({"op": 1, "t": "#commit"}), &ipld(body))
}

fn post(text: &str) -> Value {
    json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-10-02T14:03:27.512Z"})
}

/// A commit by study user S1 touching every routed record kind (used by synth and proptest).
fn synth_commit() -> Vec<u8> {
    let reply = json!({"$type": "app.bsky.feed.post", "text": "re", "createdAt": TIME,
        "reply": {"root": {"uri": STUDY_POST, "cid": SOME_CID}, "parent": {"uri": STUDY_POST, "cid": SOME_CID}},
        "embed": {"$type": "app.bsky.embed.record", "record": {"uri": STUDY_POST, "cid": SOME_CID}}});
    let subject = json!({"uri": STUDY_POST, "cid": SOME_CID});
    synth::commit_frame(
        7,
        S1,
        REV,
        TIME,
        &[
            OpSpec::create("app.bsky.feed.post", "3l5jnpb6xyz3a", post("hello")),
            OpSpec::create("app.bsky.feed.post", "3l5jnpb6xyz3b", reply),
            OpSpec::create(
                "app.bsky.feed.like",
                "3l5jnpb6xyz3c",
                json!({"$type": "app.bsky.feed.like", "subject": subject, "createdAt": TIME}),
            ),
            OpSpec::create(
                "app.bsky.feed.repost",
                "3l5jnpb6xyz3d",
                json!({"$type": "app.bsky.feed.repost", "subject": subject, "createdAt": TIME}),
            ),
            OpSpec::create(
                "app.bsky.graph.follow",
                "3l5jnpb6xyz3e",
                json!({"$type": "app.bsky.graph.follow", "subject": A1, "createdAt": TIME}),
            ),
            OpSpec::create(
                "app.bsky.graph.block",
                "3l5jnpb6xyz3f",
                json!({"$type": "app.bsky.graph.block", "subject": A1, "createdAt": TIME}),
            ),
            OpSpec::update(
                "app.bsky.actor.profile",
                "self",
                json!({"$type": "app.bsky.actor.profile", "displayName": "S1",
                       "avatar": {"$type": "blob", "ref": {"$link": SOME_CID}, "mimeType": "image/png", "size": 3}}),
            ),
            OpSpec::delete("app.bsky.feed.post", "3l5jnpb6xyz2k"),
            OpSpec::delete("app.bsky.graph.follow", "3l5jnpb6xyz2m"),
        ],
    )
}

fn synth_frames() -> Vec<Named> {
    let sync_body = ipld(&json!({"seq": 9, "did": S1, "rev": REV, "time": TIME,
        "blocks": {"$bytes": ""}}));
    let frames = vec![
        ("synth commit", synth_commit()),
        (
            "synth identity",
            synth::identity_frame(3, S1, Some("alice.example.com"), TIME),
        ),
        (
            "synth account",
            synth::account_frame(4, S1, false, Some("takendown"), TIME),
        ),
        (
            "synth info",
            synth::info_frame(
                "OutdatedCursor",
                Some("cursor is older than the backfill window"),
            ),
        ),
        (
            "synth error",
            synth::error_frame("FutureCursor", Some("cursor in the future")),
        ),
        ("synth unknown", synth::unknown_frame("#labels", 5)),
        ("synth deprecated", synth::unknown_frame("#handle", 6)),
        (
            "synth sync",
            raw_frame(&json!({"op": 1, "t": "#sync"}), &sync_body),
        ),
    ];
    frames
        .into_iter()
        .map(|(name, bytes)| Named {
            name: name.to_owned(),
            bytes,
        })
        .collect()
}

/// The relay frames, the indigo commits and the synth frames (in that order).
fn corpus(dir: &std::path::Path) -> Vec<Named> {
    let mut out = Vec::new();
    let capture = std::fs::read(dir.join("relay-capture/frames.bin")).expect("read frames.bin");
    for (i, frame) in capture_frames(&capture).enumerate() {
        out.push(Named {
            name: format!("relay #{i}"),
            bytes: frame.expect("capture record").to_vec(),
        });
    }
    assert_eq!(out.len(), 150, "relay capture frames");
    let mut indigo: Vec<PathBuf> = std::fs::read_dir(dir.join("indigo-commits"))
        .expect("read indigo-commits")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("firehose_commit_") && n.ends_with(".json")
        })
        .collect();
    indigo.sort();
    assert_eq!(indigo.len(), 4, "indigo commits");
    for path in indigo {
        let body: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        out.push(Named {
            name: format!("indigo {}", path.file_name().unwrap().to_string_lossy()),
            bytes: indigo_frame(&body),
        });
    }
    out.extend(synth_frames());
    out
}

fn collect_dids(v: &Value, out: &mut HashSet<Did>) {
    match v {
        Value::String(s) => {
            if let Ok(d) = Did::parse(s) {
                out.insert(d);
            } else if let Some(rest) = s.strip_prefix("at://") {
                if let Ok(d) = Did::parse(rest.split('/').next().unwrap_or("")) {
                    out.insert(d);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_dids(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_dids(x, out)),
        _ => {}
    }
}

/// Every DID of the corpus (event DIDs and DIDs inside records) is a study user and in-network,
/// and the originals are routed once in order so study posts, routed reactions and follows are
/// known: mutated frames then reach every routing branch, deletes of routed records included.
fn primed_state(frames: &[Named]) -> MemoryState {
    let mut dids = HashSet::new();
    for f in frames {
        let Ok(event) = decode_frame(&f.bytes) else {
            continue;
        };
        for line in event_lines(&event) {
            collect_dids(&line, &mut dids);
        }
    }
    let mut state = MemoryState::default();
    state.study_users.extend(dids.iter().cloned());
    state.in_network.extend(dids);
    state
        .study_posts
        .insert(STUDY_POST.to_owned(), Did::parse(S1).unwrap());
    for f in frames {
        let event = decode_frame(&f.bytes).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let routing = route_event(&event, &state, CLOCK);
        for u in &routing.updates {
            state.apply(u);
        }
    }
    state
}

// ---------------------------------------------------------------------------------------------
// The check run on every variant
// ---------------------------------------------------------------------------------------------

/// What one op of a decoded commit gave.
#[derive(Debug)]
struct OpOutcome {
    cid: Option<Cid>,
    /// `Ok(true)`: a record came out; `Ok(false)`: a delete.
    record: Result<bool, OpError>,
}

#[derive(Debug)]
enum Outcome {
    Err(FrameError),
    /// Decoded; for a commit, one entry per op.
    Ok(Vec<OpOutcome>),
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Decodes `frame` and, when it decodes, renders, routes and decodes every record. `Err` is the
/// panic message of whatever panicked.
fn exercise(frame: &[u8], state: &MemoryState) -> Result<Outcome, String> {
    panic::catch_unwind(AssertUnwindSafe(|| match decode_frame(frame) {
        Err(e) => {
            let _ = e.reason();
            let _ = e.to_string();
            Outcome::Err(e)
        }
        Ok(event) => {
            let _ = (event.seq(), event.kind());
            let lines = event_lines(&event);
            for line in &lines {
                let _ = line.to_string();
            }
            let routing = route_event(&event, state, CLOCK);
            for f in &routing.files {
                let _ = f.path.to_delete();
            }
            let mut ops = Vec::new();
            if let Event::Commit(c) = &event {
                for op in &c.ops {
                    ops.push(match op {
                        Ok(op) => OpOutcome {
                            cid: op.cid,
                            record: c.record_json(op).map(|r| r.is_some()),
                        },
                        Err(e) => OpOutcome {
                            cid: None,
                            record: Err(e.clone()),
                        },
                    });
                }
            }
            Outcome::Ok(ops)
        }
    }))
    .map_err(|p| panic_message(p.as_ref()))
}

#[derive(Default)]
struct Tally {
    variants: usize,
    ok: usize,
    err: usize,
    panics: Vec<String>,
    violations: Vec<String>,
}

impl Tally {
    fn run(
        &mut self,
        label: impl Fn() -> String,
        frame: &[u8],
        state: &MemoryState,
    ) -> Option<Outcome> {
        self.variants += 1;
        match exercise(frame, state) {
            Ok(o) => {
                match o {
                    Outcome::Ok(_) => self.ok += 1,
                    Outcome::Err(_) => self.err += 1,
                }
                Some(o)
            }
            Err(msg) => {
                if self.panics.len() < 20 {
                    self.panics.push(format!("{}: {msg}", label()));
                }
                None
            }
        }
    }

    fn violation(&mut self, msg: String) {
        if self.violations.len() < 20 {
            self.violations.push(msg);
        }
    }

    fn finish(self, what: &str, started: Instant) {
        eprintln!(
            "{what}: {} variants ({} decoded, {} rejected) in {:.2?}",
            self.variants,
            self.ok,
            self.err,
            started.elapsed()
        );
        assert!(
            self.panics.is_empty(),
            "{what}: panics:\n{}",
            self.panics.join("\n")
        );
        assert!(
            self.violations.is_empty(),
            "{what}: violations:\n{}",
            self.violations.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Frame layout: where the header, the CAR and the record blocks sit in a frame
// ---------------------------------------------------------------------------------------------

/// A record block addressed by a create/update op, as byte ranges of the frame.
struct RecordRegion {
    cid: Cid,
    /// Start of the section's CID bytes.
    cid_start: usize,
    /// Start (= end of the CID) and end of the block data.
    data: std::ops::Range<usize>,
}

#[derive(Default)]
struct Layout {
    header_end: usize,
    /// The `blocks` byte string's contents, when the frame is a commit.
    car: Option<std::ops::Range<usize>>,
    /// Offsets where a CAR section (length varint) or its CID or data starts.
    boundaries: Vec<usize>,
    records: Vec<RecordRegion>,
    /// Ops of the commit (each variant renders, routes and hash-checks every one of them).
    ops: usize,
}

fn offset_in(frame: &[u8], part: &[u8]) -> usize {
    let off = part.as_ptr() as usize - frame.as_ptr() as usize;
    assert!(off + part.len() <= frame.len(), "borrowed from the frame");
    off
}

fn layout(frame: &[u8]) -> Layout {
    let mut l = Layout {
        header_end: cbor::skip_item(frame, 0).expect("original frame has a header"),
        ..Layout::default()
    };
    let Ok(Event::Commit(c)) = decode_frame(frame) else {
        return l;
    };
    l.ops = c.ops.len();
    let record_cids: HashSet<Cid> = c
        .ops
        .iter()
        .filter_map(|op| op.as_ref().ok())
        .filter(|op| op.action != sync_core::frame::Action::Delete)
        .filter_map(|op| op.cid)
        .collect();
    let mut seen = HashSet::new();
    let mut first = usize::MAX;
    let mut last = 0;
    for (cid, data) in c.blocks.iter() {
        let data_start = offset_in(frame, data);
        let cid_start = data_start - cid.encoded_len();
        first = first.min(cid_start);
        last = last.max(data_start + data.len());
        l.boundaries.extend([cid_start, data_start]);
        // The index merges identical repeats of a block (keeping the first), so `iter` yields
        // each CID once; `seen` stays as a guard.
        if record_cids.contains(cid) && seen.insert(*cid) {
            l.records.push(RecordRegion {
                cid: *cid,
                cid_start,
                data: data_start..data_start + data.len(),
            });
        }
    }
    if first != usize::MAX {
        // The CAR header (varint length + `{roots, version}`) precedes the first section.
        let car_start = car_start(frame, first).unwrap_or(first);
        l.car = Some(car_start..last);
        l.boundaries.push(car_start);
    }
    l
}

/// The start of the `blocks` CAR: a CAR begins with a varint header length then `{roots, version}`;
/// scan back from the first section for the `a2 65 72 6f 6f 74 73` ("roots") map head.
fn car_start(frame: &[u8], first_section: usize) -> Option<usize> {
    let needle = [0xa2, 0x65, b'r', b'o', b'o', b't', b's'];
    let window = &frame[..first_section];
    let at = window.windows(needle.len()).rposition(|w| w == needle)?;
    // one-byte varint in practice (headers are ~58 bytes)
    at.checked_sub(1)
}

// ---------------------------------------------------------------------------------------------
// Deterministic PRNG (splitmix64)
// ---------------------------------------------------------------------------------------------

struct Rng(synth::SplitMix64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
    fn in_range(&mut self, r: &std::ops::Range<usize>) -> usize {
        r.start + self.below(r.end - r.start)
    }
}

// ---------------------------------------------------------------------------------------------
// (a) truncations
// ---------------------------------------------------------------------------------------------

fn cut_points(frame: &[u8], l: &Layout) -> Vec<usize> {
    let n = frame.len();
    if n < ALL_PREFIXES_BELOW {
        return (0..n).collect();
    }
    let mut cuts: Vec<usize> = (0..64).chain(n - 64..n).collect();
    cuts.extend((0..CUT_POINTS).map(|i| i * n / CUT_POINTS));
    for &b in l.boundaries.iter().chain([&l.header_end]) {
        cuts.extend(
            [b.saturating_sub(1), b, b + 1]
                .into_iter()
                .filter(|&c| c < n),
        );
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

#[test]
fn truncated_fixture_frames_never_panic() {
    let Some(dir) = fixtures() else { return };
    let started = Instant::now();
    let frames = corpus(&dir);
    let state = primed_state(&frames);
    let mut tally = Tally::default();
    for f in &frames {
        let l = layout(&f.bytes);
        for cut in cut_points(&f.bytes, &l) {
            let outcome = tally.run(
                || format!("{} truncated to {cut} bytes", f.name),
                &f.bytes[..cut],
                &state,
            );
            // A strict prefix never decodes: the body is one definite-length CBOR item, so any
            // prefix of it is incomplete (a prefix ending at the header leaves an empty body).
            if let Some(Outcome::Ok(_)) = outcome {
                tally.violation(format!("{} truncated to {cut} bytes decoded", f.name));
            }
        }
    }
    tally.finish("truncations", started);
}

// ---------------------------------------------------------------------------------------------
// (b) bit flips
// ---------------------------------------------------------------------------------------------

/// (byte position, bit) pairs to flip in `frame`.
fn flip_points(index: usize, frame: &[u8], l: &Layout, spread: usize) -> Vec<(usize, u8)> {
    let n = frame.len();
    if n < ALL_BITS_BELOW {
        return (0..n).flat_map(|p| (0..8).map(move |b| (p, b))).collect();
    }
    if n < ALL_POSITIONS_BELOW {
        return (0..n)
            .flat_map(|p| [(p, (p % 4) as u8), (p, (p % 4 + 4) as u8)])
            .collect();
    }
    let mut rng = Rng(synth::SplitMix64(0x5eed_0000 ^ index as u64));
    let mut points = Vec::with_capacity(spread + 256);
    // Every header bit.
    points.extend((0..l.header_end).flat_map(|p| (0..8).map(move |b| (p, b))));
    // Every record block: its first CID bytes and some of its data (fewer when there are many).
    let (cid_bytes, data_points) = if l.records.len() > 10 { (2, 3) } else { (6, 8) };
    for r in &l.records {
        for p in r.cid_start..(r.cid_start + cid_bytes).min(r.data.start) {
            points.push((p, rng.below(8) as u8));
        }
        for _ in 0..data_points {
            points.push((rng.in_range(&r.data), rng.below(8) as u8));
        }
    }
    let car = l.car.clone().unwrap_or(0..0);
    let body = l.header_end..n;
    let mut budget = spread;
    // A third evenly spaced over the whole frame.
    let even = budget / 3;
    points.extend((0..even).map(|i| (i * n / even, (i % 8) as u8)));
    budget -= even;
    // The rest random: half in the body outside the CAR (field heads, ops), half in the CAR.
    for i in 0..budget {
        let pos = if i % 2 == 0 || car.is_empty() {
            loop {
                let p = rng.in_range(&body);
                if !car.contains(&p) || car.is_empty() {
                    break p;
                }
            }
        } else {
            rng.in_range(&car)
        };
        points.push((pos, rng.below(8) as u8));
    }
    points
}

/// A flip inside a record block must not give that block's record back.
fn check_record_flip(
    name: &str,
    pos: usize,
    bit: u8,
    l: &Layout,
    outcome: &Outcome,
    tally: &mut Tally,
) -> bool {
    let Some(r) = l
        .records
        .iter()
        .find(|r| (r.cid_start..r.data.end).contains(&pos))
    else {
        return false;
    };
    let in_cid = pos < r.data.start;
    let label = format!(
        "{name} bit {bit} of byte {pos} (record block {}, {})",
        r.cid,
        if in_cid { "CID" } else { "data" }
    );
    match outcome {
        // A flipped CID may no longer parse: the CAR is rejected. Flipped data is opaque to the CAR,
        // unless the block is repeated in the CAR: the flipped copy then conflicts with the other.
        Outcome::Err(FrameError::Car(_)) if in_cid => {}
        Outcome::Err(FrameError::Car(CarError::ConflictingBlock(c))) if *c == r.cid => {}
        Outcome::Err(e) => tally.violation(format!("{label}: frame rejected: {e}")),
        Outcome::Ok(ops) => {
            let mut hit = false;
            for op in ops.iter().filter(|o| o.cid == Some(r.cid)) {
                hit = true;
                let good = match &op.record {
                    Err(OpError::Block(CborError::HashMismatch(_))) => !in_cid,
                    Err(OpError::MissingBlock(_)) => in_cid,
                    _ => false,
                };
                if !good {
                    tally.violation(format!("{label}: op gave {:?}", op.record));
                }
            }
            if !hit {
                tally.violation(format!("{label}: no op references the block any more"));
            }
        }
    }
    true
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.variants += other.variants;
        self.ok += other.ok;
        self.err += other.err;
        for p in other.panics {
            if self.panics.len() < 20 {
                self.panics.push(p);
            }
        }
        for v in other.violations {
            self.violation(v);
        }
    }
}

/// Flips bits of one frame; returns how many flips landed inside a record block.
fn bit_flips_of(
    index: usize,
    f: &Named,
    full: bool,
    state: &MemoryState,
    tally: &mut Tally,
) -> usize {
    let l = layout(&f.bytes);
    let deep = full || !f.name.starts_with("relay") || index.is_multiple_of(DEEP_EVERY);
    let spread = if deep {
        DEEP_FLIP_POSITIONS
    } else {
        FLIP_POSITIONS
    };
    let spread = spread.min(OP_WORK / (1 + l.ops)).max(MIN_FLIP_POSITIONS);
    let mut record_flips = 0;
    let mut buf = Vec::with_capacity(f.bytes.len());
    for (pos, bit) in flip_points(index, &f.bytes, &l, spread) {
        buf.clear();
        buf.extend_from_slice(&f.bytes);
        buf[pos] ^= 1 << bit;
        let Some(outcome) = tally.run(
            || format!("{} with bit {bit} of byte {pos} flipped", f.name),
            &buf,
            state,
        ) else {
            continue;
        };
        if check_record_flip(&f.name, pos, bit, &l, &outcome, tally) {
            record_flips += 1;
        }
    }
    record_flips
}

#[test]
fn bit_flipped_frames_never_panic_nor_yield_a_tampered_record() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    let Some(dir) = fixtures() else { return };
    let started = Instant::now();
    let full = std::env::var_os("ROBUSTNESS_FULL").is_some_and(|v| v != "0");
    let frames = corpus(&dir);
    let state = primed_state(&frames);
    // Costliest frames first (many ops, big), pulled by one worker per core.
    let mut order: Vec<usize> = (0..frames.len()).collect();
    let cost = |i: usize| {
        let ops = match decode_frame(&frames[i].bytes) {
            Ok(Event::Commit(c)) => c.ops.len(),
            _ => 0,
        };
        (1 + ops) * frames[i].bytes.len()
    };
    order.sort_by_cached_key(|&i| std::cmp::Reverse(cost(i)));
    let next = AtomicUsize::new(0);
    let total = Mutex::new((Tally::default(), 0usize));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut tally = Tally::default();
                let mut record_flips = 0;
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&index) = order.get(k) else { break };
                    record_flips += bit_flips_of(index, &frames[index], full, &state, &mut tally);
                }
                let mut total = total.lock().unwrap();
                total.0.merge(tally);
                total.1 += record_flips;
            });
        }
    });
    let (tally, record_flips) = total.into_inner().unwrap();
    eprintln!("bit flips: {record_flips} inside record blocks (full: {full})");
    assert!(record_flips > 2000, "record blocks were flipped");
    tally.finish("bit flips", started);
}

// ---------------------------------------------------------------------------------------------
// (c) oversized and pathological variants
// ---------------------------------------------------------------------------------------------

fn link(cid: &Cid) -> Ipld {
    Ipld::Link(*cid)
}

fn block_of(record: &Value) -> (Cid, Vec<u8>) {
    let block = encode(&ipld(record));
    (cbor::cid_for_dag_cbor(&block), block)
}

fn raw_block(bytes: Vec<u8>) -> (Cid, Vec<u8>) {
    (cbor::cid_for_dag_cbor(&bytes), bytes)
}

fn op(action: &str, path: &str, cid: Option<&Cid>) -> Ipld {
    let mut m = BTreeMap::new();
    m.insert("action".to_owned(), Ipld::String(action.into()));
    m.insert("path".to_owned(), Ipld::String(path.into()));
    m.insert("cid".to_owned(), cid.map_or(Ipld::Null, link));
    Ipld::Map(m)
}

/// A commit frame by S1 with these ops, this CAR and extra body fields.
fn commit_with(ops: Vec<Ipld>, car: Vec<u8>, extra: Vec<(&str, Ipld)>) -> Vec<u8> {
    let commit_block = encode(&ipld(&json!({"did": S1, "rev": REV, "version": 3})));
    let commit_cid = cbor::cid_for_dag_cbor(&commit_block);
    let mut body = BTreeMap::new();
    body.insert("seq".to_owned(), Ipld::Integer(1));
    body.insert("repo".to_owned(), Ipld::String(S1.into()));
    body.insert("rev".to_owned(), Ipld::String(REV.into()));
    body.insert("since".to_owned(), Ipld::Null);
    body.insert("commit".to_owned(), link(&commit_cid));
    body.insert("blocks".to_owned(), Ipld::Bytes(car));
    body.insert("ops".to_owned(), Ipld::List(ops));
    body.insert("blobs".to_owned(), Ipld::List(vec![]));
    body.insert("rebase".to_owned(), Ipld::Bool(false));
    body.insert("tooBig".to_owned(), Ipld::Bool(false));
    body.insert("time".to_owned(), Ipld::String(TIME.into()));
    for (k, v) in extra {
        body.insert(k.to_owned(), v);
    }
    raw_frame(&json!({"op": 1, "t": "#commit"}), &Ipld::Map(body))
}

/// A commit creating one post per block, with the blocks in a proper CAR.
fn commit_of_blocks(blocks: &[(Cid, Vec<u8>)], extra: Vec<(&str, Ipld)>) -> Vec<u8> {
    let ops = blocks
        .iter()
        .enumerate()
        .map(|(i, (cid, _))| {
            op(
                "create",
                &format!("app.bsky.feed.post/3l5jnpb6xy{i:03}"),
                Some(cid),
            )
        })
        .collect();
    let root = blocks
        .first()
        .map_or_else(|| block_of(&json!({})).0, |b| b.0);
    commit_with(ops, synth::car(&root, blocks), extra)
}

fn header_bytes(t: &str) -> Vec<u8> {
    encode(&ipld(&json!({"op": 1, "t": t})))
}

/// Nesting `depth` one-element arrays around `null`.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut v = vec![0x81u8; depth];
    v.push(0xf6);
    v
}

/// Nesting `depth` one-entry maps `{"a": ...}` around `null`.
fn nested_maps(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(depth * 3 + 1);
    for _ in 0..depth {
        v.extend([0xa1, 0x61, b'a']);
    }
    v.push(0xf6);
    v
}

/// `{"seq": 1, <key>: <raw item>}` as a body (map with two text keys, canonical order).
fn body_with_raw(key: &str, raw: &[u8]) -> Vec<u8> {
    let mut v = vec![0xa2, 0x63, b's', b'e', b'q', 0x01];
    v.push(0x60 + key.len() as u8);
    v.extend(key.as_bytes());
    v.extend(raw);
    v
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn car_header(root: &Cid) -> Vec<u8> {
    let mut m = BTreeMap::new();
    m.insert("roots".to_owned(), Ipld::List(vec![link(root)]));
    m.insert("version".to_owned(), Ipld::Integer(1));
    encode(&Ipld::Map(m))
}

type Expect = fn(&Outcome) -> bool;

struct Variant {
    name: String,
    frame: Vec<u8>,
    expect: Expect,
    expected: &'static str,
}

fn variant(
    name: impl Into<String>,
    frame: Vec<u8>,
    expected: &'static str,
    expect: Expect,
) -> Variant {
    Variant {
        name: name.into(),
        frame,
        expect,
        expected,
    }
}

fn all_ops_have_records(o: &Outcome) -> bool {
    matches!(o, Outcome::Ok(ops) if !ops.is_empty() && ops.iter().all(|op| op.record == Ok(true)))
}

fn op_errors(o: &Outcome, want: fn(&OpError) -> bool) -> bool {
    matches!(o, Outcome::Ok(ops) if !ops.is_empty() && ops.iter().all(|op| matches!(&op.record, Err(e) if want(e))))
}

fn oversized_variants() -> Vec<Variant> {
    let mut v = Vec::new();
    let small = block_of(&post("hi"));

    // Frame size limit: exactly at the limit still decodes, one byte over is TooLarge.
    let base = commit_of_blocks(
        std::slice::from_ref(&small),
        vec![("padding", Ipld::Bytes(vec![]))],
    );
    // Grow the padding until the frame is exactly MAX_FRAME_BYTES (head size changes with length).
    let mut pad = MAX_FRAME_BYTES - base.len() - 8;
    let at_limit = loop {
        let f = commit_of_blocks(
            std::slice::from_ref(&small),
            vec![("padding", Ipld::Bytes(vec![0; pad]))],
        );
        match f.len().cmp(&MAX_FRAME_BYTES) {
            std::cmp::Ordering::Equal => break f,
            std::cmp::Ordering::Less => pad += MAX_FRAME_BYTES - f.len(),
            std::cmp::Ordering::Greater => pad -= f.len() - MAX_FRAME_BYTES,
        }
    };
    v.push(variant(
        "frame of exactly MAX_FRAME_BYTES (padding field)",
        at_limit,
        "Ok with its record",
        all_ops_have_records,
    ));
    v.push(variant(
        "frame of MAX_FRAME_BYTES + 1 (padding field)",
        commit_of_blocks(
            std::slice::from_ref(&small),
            vec![("padding", Ipld::Bytes(vec![0; pad + 1]))],
        ),
        "TooLarge",
        |o| matches!(o, Outcome::Err(FrameError::TooLarge(n)) if *n == MAX_FRAME_BYTES + 1),
    ));
    v.push(variant(
        "frame of 6 MiB (padding field)",
        commit_of_blocks(
            std::slice::from_ref(&small),
            vec![("padding", Ipld::Bytes(vec![7; 6 << 20]))],
        ),
        "TooLarge",
        |o| matches!(o, Outcome::Err(FrameError::TooLarge(_))),
    ));
    let mut huge_garbage = header_bytes("#commit");
    huge_garbage.resize(MAX_FRAME_BYTES + 4096, 0xff);
    v.push(variant(
        "frame of 5 MiB + 4 KiB of garbage",
        huge_garbage,
        "TooLarge",
        |o| matches!(o, Outcome::Err(FrameError::TooLarge(_))),
    ));

    // Blocks size limit: a filler block makes the CAR exactly MAX_BLOCKS_BYTES, then one more.
    let car_for = |filler_len: usize| {
        let filler = raw_block(vec![0x42; filler_len]);
        synth::car(&small.0, &[small.clone(), filler])
    };
    let overhead = car_for(1_000_000).len() - 1_000_000;
    let exact = car_for(MAX_BLOCKS_BYTES - overhead);
    assert_eq!(exact.len(), MAX_BLOCKS_BYTES);
    let one_op = || {
        vec![op(
            "create",
            "app.bsky.feed.post/3l5jnpb6xyz3a",
            Some(&small.0),
        )]
    };
    v.push(variant(
        "commit whose blocks are exactly MAX_BLOCKS_BYTES",
        commit_with(one_op(), exact, vec![]),
        "Ok with its record",
        all_ops_have_records,
    ));
    let over = car_for(MAX_BLOCKS_BYTES - overhead + 1);
    assert_eq!(over.len(), MAX_BLOCKS_BYTES + 1);
    v.push(variant(
        "commit whose blocks are MAX_BLOCKS_BYTES + 1",
        commit_with(one_op(), over, vec![]),
        "BlocksTooLarge",
        |o| matches!(o, Outcome::Err(FrameError::BlocksTooLarge(n)) if *n == MAX_BLOCKS_BYTES + 1),
    ));
    v.push(variant(
        "commit whose blocks are 4 MB (frame under 5 MiB)",
        commit_with(one_op(), car_for(4_000_000), vec![]),
        "BlocksTooLarge",
        |o| matches!(o, Outcome::Err(FrameError::BlocksTooLarge(_))),
    ));

    // Op count limit.
    let deletes = |n: usize| -> Vec<OpSpec> {
        (0..n)
            .map(|i| OpSpec::delete("app.bsky.feed.post", &format!("3l5jnpb6x{i:04}")))
            .collect()
    };
    v.push(variant(
        "commit with MAX_OPS (200) ops",
        synth::commit_frame(1, S1, REV, TIME, &deletes(MAX_OPS)),
        "Ok",
        |o| matches!(o, Outcome::Ok(ops) if ops.len() == MAX_OPS && ops.iter().all(|op| op.record == Ok(false))),
    ));
    v.push(variant(
        "commit with 201 ops",
        synth::commit_frame(1, S1, REV, TIME, &deletes(MAX_OPS + 1)),
        "TooManyOps",
        |o| matches!(o, Outcome::Err(FrameError::TooManyOps(201))),
    ));
    v.push(variant(
        "commit with 50000 ops (frame under 5 MiB)",
        synth::commit_frame(1, S1, REV, TIME, &deletes(50_000)),
        "TooManyOps",
        |o| matches!(o, Outcome::Err(FrameError::TooManyOps(50_000))),
    ));
    // One-byte items: the list is counted while decoding, not collected (see tests/alloc.rs).
    v.push(variant(
        "commit whose ops are 1,000,000 zeros",
        commit_with(vec![Ipld::Integer(0); 1_000_000], vec![], vec![]),
        "TooManyOps",
        |o| matches!(o, Outcome::Err(FrameError::TooManyOps(1_000_000))),
    ));
    v.push(variant(
        "commit whose ops are MAX_OPS + 1 nulls",
        commit_with(vec![Ipld::Null; MAX_OPS + 1], vec![], vec![]),
        "TooManyOps",
        |o| matches!(o, Outcome::Err(FrameError::TooManyOps(201))),
    ));

    // Record size limit: the text grows until the block is exactly MAX_RECORD_BYTES.
    let record_of = |len: usize| block_of(&post(&"x".repeat(len)));
    let record_overhead = record_of(100_000).1.len() - 100_000;
    let exact_record = record_of(MAX_RECORD_BYTES - record_overhead);
    assert_eq!(exact_record.1.len(), MAX_RECORD_BYTES);
    v.push(variant(
        "record block of exactly MAX_RECORD_BYTES",
        commit_of_blocks(&[exact_record], vec![]),
        "Ok with its record",
        all_ops_have_records,
    ));
    let big_record = record_of(MAX_RECORD_BYTES - record_overhead + 1);
    assert_eq!(big_record.1.len(), MAX_RECORD_BYTES + 1);
    v.push(variant(
        "record block of MAX_RECORD_BYTES + 1",
        commit_of_blocks(&[big_record], vec![]),
        "op error RecordTooLarge",
        |o| {
            op_errors(
                o,
                |e| matches!(e, OpError::RecordTooLarge(n) if *n == MAX_RECORD_BYTES + 1),
            )
        },
    ));
    v.push(variant(
        "record block of 1.9 MB",
        commit_of_blocks(&[record_of(1_900_000)], vec![]),
        "op error RecordTooLarge",
        |o| op_errors(o, |e| matches!(e, OpError::RecordTooLarge(_))),
    ));

    // Deep nesting: in the header, in the body, in the CAR header and inside record blocks.
    let body_ok = encode(&ipld(&json!({"seq": 1})));
    let mut f = nested_arrays(100_000);
    f.extend(&body_ok);
    v.push(variant(
        "header of 100k nested arrays",
        f,
        "Header error",
        |o| matches!(o, Outcome::Err(FrameError::Header(_))),
    ));
    for (what, raw) in [
        ("arrays", nested_arrays(100_000)),
        ("maps", nested_maps(100_000)),
    ] {
        for t in [
            "#commit",
            "#identity",
            "#account",
            "#sync",
            "#info",
            "#labels",
        ] {
            let mut f = header_bytes(t);
            f.extend(body_with_raw("deep", &raw));
            v.push(variant(
                format!("{t} body with 100k nested {what}"),
                f,
                "Body error",
                |o| matches!(o, Outcome::Err(FrameError::Body { .. })),
            ));
        }
        let mut f = header_bytes("#commit");
        f.extend(&raw);
        v.push(variant(
            format!("commit body that is 100k nested {what}"),
            f,
            "Body error",
            |o| matches!(o, Outcome::Err(FrameError::Body { .. })),
        ));
        let deep_block = raw_block(raw.clone());
        v.push(variant(
            format!("record block of 100k nested {what} (correct CID)"),
            commit_of_blocks(&[deep_block], vec![]),
            "op error TooDeep",
            |o| op_errors(o, |e| matches!(e, OpError::Block(CborError::TooDeep))),
        ));
        let mut car = varint(raw.len() as u64);
        car.extend(&raw);
        v.push(variant(
            format!("CAR header of 100k nested {what}"),
            commit_with(vec![], car, vec![]),
            "Car Header error",
            |o| matches!(o, Outcome::Err(FrameError::Car(CarError::Header(_)))),
        ));
    }

    // A post nested exactly MAX_DEPTH deep decodes; one level more is TooDeep.
    let post_nested = |depth: usize| {
        let mut x = Ipld::Null;
        for _ in 0..depth {
            x = Ipld::List(vec![x]);
        }
        let mut m = BTreeMap::new();
        m.insert(
            "$type".to_owned(),
            Ipld::String("app.bsky.feed.post".into()),
        );
        m.insert("text".to_owned(), Ipld::String("deep".into()));
        m.insert("createdAt".to_owned(), Ipld::String(TIME.into()));
        m.insert("x".to_owned(), x);
        raw_block(encode(&Ipld::Map(m)))
    };
    v.push(variant(
        "post record nested MAX_DEPTH deep",
        commit_of_blocks(&[post_nested(cbor::MAX_DEPTH - 1)], vec![]),
        "Ok with its record",
        all_ops_have_records,
    ));
    v.push(variant(
        "post record nested MAX_DEPTH + 1 deep",
        commit_of_blocks(&[post_nested(cbor::MAX_DEPTH)], vec![]),
        "op error TooDeep",
        |o| op_errors(o, |e| matches!(e, OpError::Block(CborError::TooDeep))),
    ));

    // CBOR heads claiming 2^63 (and 2^64 - 1) bytes or items.
    let huge_heads: [(&str, [u8; 9]); 6] = [
        (
            "byte string of 2^63 bytes",
            [0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            "text string of 2^63 bytes",
            [0x7b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        ),
        ("array of 2^63 items", [0x9b, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ("map of 2^63 entries", [0xbb, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        (
            "byte string of 2^64-1 bytes",
            [0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            "map of 2^64-1 entries",
            [0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
    ];
    for (what, head) in huge_heads {
        let mut raw = head.to_vec();
        raw.extend([0x61, b'a', 0x01]);
        let mut f = head.to_vec();
        f.extend(&body_ok);
        v.push(variant(format!("header: {what}"), f, "Header error", |o| {
            matches!(o, Outcome::Err(FrameError::Header(_)))
        }));
        let mut f = header_bytes("#commit");
        f.extend(body_with_raw("blocks", &raw));
        v.push(variant(
            format!("commit body field: {what}"),
            f,
            "Body error",
            |o| matches!(o, Outcome::Err(FrameError::Body { .. })),
        ));
        let mut f = header_bytes("#commit");
        f.extend(&raw);
        v.push(variant(
            format!("commit body: {what}"),
            f,
            "Body error",
            |o| matches!(o, Outcome::Err(FrameError::Body { .. })),
        ));
        v.push(variant(
            format!("record block: {what} (correct CID)"),
            commit_of_blocks(&[raw_block(raw.clone())], vec![]),
            "op error Truncated",
            |o| op_errors(o, |e| matches!(e, OpError::Block(CborError::Truncated(_)))),
        ));
        let mut car = varint(raw.len() as u64);
        car.extend(&raw);
        v.push(variant(
            format!("CAR header: {what}"),
            commit_with(vec![], car, vec![]),
            "Car Header error",
            |o| matches!(o, Outcome::Err(FrameError::Car(CarError::Header(_)))),
        ));
    }

    // CAR varints claiming huge lengths, and overlong varints.
    let header = car_header(&small.0);
    let section = |len_varint: Vec<u8>| {
        let mut car = varint(header.len() as u64);
        car.extend(&header);
        car.extend(len_varint);
        car.extend(small.0.to_bytes());
        car.extend(&small.1);
        car
    };
    let huge_varints: [(&str, Vec<u8>); 5] = [
        ("2^63", varint(1 << 63)),
        ("2^64-1", varint(u64::MAX)),
        ("2^32", varint(1 << 32)),
        ("frame length + 1", varint(small.1.len() as u64 + 37)),
        (
            "11-byte overlong",
            vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
    ];
    for (what, len) in huge_varints {
        let ops = vec![op(
            "create",
            "app.bsky.feed.post/3l5jnpb6xyz3a",
            Some(&small.0),
        )];
        v.push(variant(
            format!("CAR section varint claiming {what}"),
            commit_with(ops, section(len.clone()), vec![]),
            "Car Truncated/Varint error",
            |o| {
                matches!(
                    o,
                    Outcome::Err(FrameError::Car(
                        CarError::Truncated(_) | CarError::Varint(_)
                    ))
                )
            },
        ));
        let mut car = len;
        car.extend(&header);
        v.push(variant(
            format!("CAR header varint claiming {what}"),
            commit_with(vec![], car, vec![]),
            "Car Truncated/Varint error",
            |o| {
                matches!(
                    o,
                    Outcome::Err(FrameError::Car(
                        CarError::Truncated(_) | CarError::Varint(_)
                    ))
                )
            },
        ));
    }
    // A section whose CID claims a 2^63-byte multihash digest.
    let mut cid = vec![0x01, 0x71, 0x12];
    cid.extend(varint(1 << 63));
    let mut car = varint(header.len() as u64);
    car.extend(&header);
    car.extend(varint(cid.len() as u64 + 4));
    car.extend(&cid);
    car.extend([0xf6; 4]);
    v.push(variant(
        "CAR section CID claiming a 2^63-byte digest",
        commit_with(vec![], car, vec![]),
        "Car Cid error",
        |o| matches!(o, Outcome::Err(FrameError::Car(CarError::Cid(..)))),
    ));
    // 10,001 empty-data sections: over the block-count bound.
    let mut car = varint(header.len() as u64);
    car.extend(&header);
    let cid_bytes = small.0.to_bytes();
    for _ in 0..=sync_core::car::MAX_BLOCKS {
        car.extend(varint(cid_bytes.len() as u64));
        car.extend(&cid_bytes);
    }
    v.push(variant(
        "CAR with MAX_BLOCKS + 1 sections",
        commit_with(vec![], car, vec![]),
        "Car TooManyBlocks",
        |o| matches!(o, Outcome::Err(FrameError::Car(CarError::TooManyBlocks))),
    ));
    // Ops whose record is a CID with an unsupported hash or a link to a block not in the CAR.
    let identity_cid = Cid::new_v1(
        0x71,
        ipld_core::cid::multihash::Multihash::<64>::wrap(0x00, b"hello").unwrap(),
    );
    let mut car = varint(header.len() as u64);
    car.extend(&header);
    let id_bytes = identity_cid.to_bytes();
    car.extend(varint((id_bytes.len() + 1) as u64));
    car.extend(&id_bytes);
    car.push(0xf6);
    v.push(variant(
        "record addressed by an identity-hash CID",
        commit_with(
            vec![op(
                "create",
                "app.bsky.feed.post/3l5jnpb6xyz3a",
                Some(&identity_cid),
            )],
            car,
            vec![],
        ),
        "op error BadCid",
        |o| op_errors(o, |e| matches!(e, OpError::BadCid(_))),
    ));
    // A CAR header listing MAX_ROOTS + 1 roots, and one listing 40,000 (41-byte links, the CAR
    // just under MAX_BLOCKS_BYTES): counted, not collected.
    for n in [sync_core::car::MAX_ROOTS + 1, 40_000] {
        let mut m = BTreeMap::new();
        m.insert("roots".to_owned(), Ipld::List(vec![link(&small.0); n]));
        m.insert("version".to_owned(), Ipld::Integer(1));
        let header = encode(&Ipld::Map(m));
        let mut car = varint(header.len() as u64);
        car.extend(&header);
        v.push(variant(
            format!("CAR header with {n} roots"),
            commit_with(vec![], car, vec![]),
            "Car TooManyRoots",
            |o| {
                matches!(o, Outcome::Err(FrameError::Car(CarError::TooManyRoots(n)))
                    if *n == sync_core::car::MAX_ROOTS + 1 || *n == 40_000)
            },
        ));
    }
    v
}

#[test]
fn oversized_and_pathological_frames_fail_with_the_right_error() {
    let started = Instant::now();
    let mut state = MemoryState::default();
    state.study_users.insert(Did::parse(S1).unwrap());
    state.in_network.insert(Did::parse(S1).unwrap());
    let mut tally = Tally::default();
    let variants = oversized_variants();
    for v in &variants {
        let Some(outcome) = tally.run(|| v.name.clone(), &v.frame, &state) else {
            continue;
        };
        if !(v.expect)(&outcome) {
            let shown = format!("{outcome:?}");
            tally.violation(format!(
                "{} ({} bytes): expected {}, got {}",
                v.name,
                v.frame.len(),
                v.expected,
                &shown[..shown.len().min(300)]
            ));
        }
    }
    // The oversized record is also a routing drop with its stable reason.
    let big = variants
        .iter()
        .find(|v| v.name == "record block of MAX_RECORD_BYTES + 1")
        .unwrap();
    let event = decode_frame(&big.frame).unwrap();
    let routing = route_event(&event, &state, CLOCK);
    assert!(routing.files.is_empty());
    assert_eq!(
        routing.dropped.iter().map(|d| d.reason).collect::<Vec<_>>(),
        ["record_too_large"]
    );
    tally.finish("oversized/pathological", started);
}

#[test]
fn a_badly_typed_op_fails_that_op_only() {
    let (first, first_block) = block_of(&post("first"));
    let (last, last_block) = block_of(&post("last"));
    let good =
        |rkey: &str, cid: &Cid| op("create", &format!("app.bsky.feed.post/{rkey}"), Some(cid));
    let with = |key: &str, value: Ipld| {
        let Ipld::Map(mut m) = good("3l5jnpb6xyb00", &first) else {
            unreachable!()
        };
        m.insert(key.to_owned(), value);
        Ipld::Map(m)
    };
    let without = |key: &str| {
        let Ipld::Map(mut m) = good("3l5jnpb6xyb00", &first) else {
            unreachable!()
        };
        m.remove(key);
        Ipld::Map(m)
    };
    let nested = Ipld::Map(BTreeMap::from([(
        "deep".to_owned(),
        Ipld::List(vec![Ipld::Link(first), Ipld::Null]),
    )]));
    let ops = vec![
        good("3l5jnpb6xya00", &first),
        with("path", Ipld::Integer(5)),
        with("action", Ipld::Bytes(b"create".to_vec())),
        with("cid", Ipld::String(SOME_CID.into())),
        with("prev", Ipld::Bool(true)),
        without("action"),
        without("path"),
        Ipld::Integer(7),
        Ipld::List(vec![Ipld::String("create".into())]),
        Ipld::String("app.bsky.feed.post/3l5jnpb6xyb01".into()),
        Ipld::Null,
        Ipld::Link(first),
        // Unknown fields (even nested ones) are ignored, as a newer relay may add some.
        with("extra", nested),
        good("3l5jnpb6xyz00", &last),
    ];
    let frame = commit_with(
        ops,
        synth::car(&first, &[(first, first_block), (last, last_block)]),
        vec![],
    );
    let event = decode_frame(&frame).expect("the frame itself is well formed");
    let Event::Commit(commit) = &event else {
        panic!("not a commit")
    };
    let shape: Vec<String> = commit
        .ops
        .iter()
        .map(|op| match op {
            Ok(op) => format!("ok {}", op.rkey.as_str()),
            Err(e) => e.to_string(),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "ok 3l5jnpb6xya00",
            "op field `path` is missing or has the wrong type",
            "op field `action` is missing or has the wrong type",
            "op field `cid` is missing or has the wrong type",
            "op field `prev` is missing or has the wrong type",
            "op field `action` is missing or has the wrong type",
            "op field `path` is missing or has the wrong type",
            "op is not a map",
            "op is not a map",
            "op is not a map",
            "op is not a map",
            "op is not a map",
            "ok 3l5jnpb6xyb00",
            "ok 3l5jnpb6xyz00",
        ]
    );

    // Routing captures the good ops of the study user and counts the others.
    let mut state = MemoryState::default();
    state.study_users.insert(Did::parse(S1).unwrap());
    let routing = route_event(&event, &state, CLOCK);
    let mut files: Vec<String> = routing
        .files
        .iter()
        .map(|f| f.path.file_name().to_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for rkey in ["3l5jnpb6xya00", "3l5jnpb6xyb00", "3l5jnpb6xyz00"] {
        assert!(
            files.iter().any(|f| f.contains(rkey)),
            "{rkey} in {files:?}"
        );
    }
    let reasons: Vec<_> = routing.dropped.iter().map(|d| d.reason).collect();
    assert_eq!(reasons, ["bad_op"; 11]);
    let indexes: Vec<_> = routing.dropped.iter().map(|d| d.op_index).collect();
    assert_eq!(indexes, (1..=11).map(Some).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// (d) frame-format checks: prevData, #sync blocks, repeated CAR blocks, record CID format
// ---------------------------------------------------------------------------------------------

fn decoded_commit(frame: &[u8]) -> sync_core::frame::Commit<'_> {
    match decode_frame(frame) {
        Ok(Event::Commit(c)) => c,
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn commit_prev_data_is_optional_and_must_be_a_link() {
    let (cid, block) = block_of(&post("prev"));
    let ops = || vec![op("create", "app.bsky.feed.post/3l5jnpb6xyz3a", Some(&cid))];
    let car = || synth::car(&cid, &[(cid, block.clone())]);
    let prev = block_of(&json!({"l": null, "e": []})).0;

    // Absent (legacy commits, and the synth frames) and null both mean "no prevData".
    let absent = commit_with(ops(), car(), vec![]);
    assert_eq!(decoded_commit(&absent).prev_data, None);
    assert_eq!(decoded_commit(&synth_commit()).prev_data, None);
    let null = commit_with(ops(), car(), vec![("prevData", Ipld::Null)]);
    assert_eq!(decoded_commit(&null).prev_data, None);
    let present = commit_with(ops(), car(), vec![("prevData", link(&prev))]);
    let c = decoded_commit(&present);
    assert_eq!(c.prev_data, Some(prev));
    // The rest of the commit is unaffected.
    assert_eq!(c.ops.len(), 1);
    assert!(c.record_json(c.ops[0].as_ref().unwrap()).unwrap().is_some());

    // A commit-level field of the wrong type is a bad body (as a bad `commit` link is).
    for bad in [
        Ipld::String(prev.to_string()),
        Ipld::Bytes(prev.to_bytes()),
        Ipld::Integer(1),
    ] {
        let frame = commit_with(ops(), car(), vec![("prevData", bad.clone())]);
        let err = decode_frame(&frame).unwrap_err();
        assert!(
            matches!(err, FrameError::Body { kind: "commit", .. }),
            "prevData {bad:?}: {err}"
        );
        assert_eq!(err.reason(), "bad_body");
    }
}

#[test]
fn commit_exposes_its_raw_blocks_bytes() {
    let frame = synth_commit();
    let c = decoded_commit(&frame);
    // Borrowed from the frame, and exactly the CAR the index was built from.
    let range = frame.as_ptr_range();
    assert!(range.contains(&c.blocks_bytes.as_ptr()));
    let reparsed = CarBlocks::parse(c.blocks_bytes).unwrap();
    assert_eq!(reparsed.roots(), c.blocks.roots());
    assert_eq!(c.blocks.roots(), &c.blocks.roots[..]);
    assert_eq!(c.blocks.roots()[0], c.commit);
    assert_eq!(
        reparsed.iter().collect::<Vec<_>>(),
        c.blocks.iter().collect::<Vec<_>>()
    );
}

fn sync_frame(blocks: Option<Ipld>) -> Vec<u8> {
    let mut body = BTreeMap::new();
    body.insert("seq".to_owned(), Ipld::Integer(42));
    body.insert("did".to_owned(), Ipld::String(S1.into()));
    body.insert("rev".to_owned(), Ipld::String(REV.into()));
    body.insert("time".to_owned(), Ipld::String(TIME.into()));
    if let Some(b) = blocks {
        body.insert("blocks".to_owned(), b);
    }
    raw_frame(&json!({"op": 1, "t": "#sync"}), &Ipld::Map(body))
}

#[test]
fn sync_event_carries_its_blocks_within_the_limit() {
    // A #sync CAR: the signed commit block, its CID the first root.
    let commit_block = encode(&ipld(
        &json!({"did": S1, "rev": REV, "version": 3, "data": {"$link": SOME_CID}, "prev": null}),
    ));
    let commit_cid = cbor::cid_for_dag_cbor(&commit_block);
    let car = synth::car(&commit_cid, &[(commit_cid, commit_block.clone())]);
    let frame = sync_frame(Some(Ipld::Bytes(car.clone())));
    let event = decode_frame(&frame).unwrap();
    let Event::Sync(s) = &event else {
        panic!("not a sync: {event:?}")
    };
    assert_eq!((s.seq.0, s.did.as_str(), s.rev.as_str()), (42, S1, REV));
    assert_eq!(s.blocks, car);
    let blocks = CarBlocks::parse(&s.blocks).unwrap();
    assert_eq!(blocks.roots(), [commit_cid]);
    assert_eq!(blocks.get(&commit_cid), Some(&commit_block[..]));
    // Still rendered and routed as before.
    let _ = event_lines(&event);
    let routing = route_event(&event, &small_state(), CLOCK);
    assert!(routing.files.is_empty() && routing.dropped.is_empty());

    // Required by the lexicon: missing (or not bytes) is a bad body.
    for (what, blocks) in [
        ("missing", None),
        ("null", Some(Ipld::Null)),
        ("a string", Some(Ipld::String("car".into()))),
        ("a list", Some(Ipld::List(vec![Ipld::Bytes(car.clone())]))),
    ] {
        let err = decode_frame(&sync_frame(blocks)).unwrap_err();
        assert!(
            matches!(err, FrameError::Body { kind: "sync", .. }),
            "blocks {what}: {err}"
        );
        assert_eq!(err.reason(), "bad_body", "blocks {what}");
    }

    // Same size limit as commit blocks (not parsed here, so any bytes do).
    let at_limit = sync_frame(Some(Ipld::Bytes(vec![0x42; MAX_BLOCKS_BYTES])));
    match decode_frame(&at_limit) {
        Ok(Event::Sync(s)) => assert_eq!(s.blocks.len(), MAX_BLOCKS_BYTES),
        other => panic!("blocks of exactly MAX_BLOCKS_BYTES: {other:?}"),
    }
    let over = sync_frame(Some(Ipld::Bytes(vec![0x42; MAX_BLOCKS_BYTES + 1])));
    let err = decode_frame(&over).unwrap_err();
    assert_eq!(err, FrameError::BlocksTooLarge(MAX_BLOCKS_BYTES + 1));
    assert_eq!(err.reason(), "blocks_too_large");
}

#[test]
fn car_repeating_a_cid_with_other_bytes_fails_identical_repeats_are_merged() {
    let (a, a_block) = block_of(&post("a"));
    let (b, b_block) = block_of(&post("b"));
    let ops = || {
        vec![
            op("create", "app.bsky.feed.post/3l5jnpb6xyz3a", Some(&a)),
            op("create", "app.bsky.feed.post/3l5jnpb6xyz3b", Some(&b)),
        ]
    };

    // Identical repeat (before and after another block): harmless, kept once.
    let car = synth::car(
        &a,
        &[
            (a, a_block.clone()),
            (b, b_block.clone()),
            (a, a_block.clone()),
        ],
    );
    let index = CarBlocks::parse(&car).unwrap();
    assert_eq!(index.len(), 2);
    assert_eq!(index.get(&a), Some(&a_block[..]));
    // The first copy is the one kept (deterministic).
    let first_copy = car
        .windows(a_block.len())
        .position(|w| w == &a_block[..])
        .unwrap();
    assert_eq!(offset_in(&car, index.get(&a).unwrap()), first_copy);
    let frame = commit_with(ops(), car, vec![]);
    let c = decoded_commit(&frame);
    for op in &c.ops {
        assert!(c.record_json(op.as_ref().unwrap()).unwrap().is_some());
    }
    // The same in a CAR large enough to be sorted: repeats kept once, the first copy kept.
    let mut sections: Vec<(Cid, Vec<u8>)> = (0..40).map(|i| block_of(&json!({"f": i}))).collect();
    sections.insert(3, (a, a_block.clone()));
    sections.insert(20, (b, b_block.clone()));
    sections.push((a, a_block.clone()));
    sections.push((b, b_block.clone()));
    let car = synth::car(&a, &sections);
    let index = CarBlocks::parse(&car).unwrap();
    assert_eq!(index.len(), 42);
    let first_copy = car
        .windows(a_block.len())
        .position(|w| w == &a_block[..])
        .unwrap();
    assert_eq!(offset_in(&car, index.get(&a).unwrap()), first_copy);
    assert_eq!(index.get(&b), Some(&b_block[..]));

    // The same CID with other bytes, in either order and either place: the CAR is rejected,
    // naming the CID (first-wins would let the section order decide which record is seen).
    // Small CARs are scanned, larger ones (over 16 blocks) sorted: both paths are covered.
    let forged = encode(&ipld(&post("forged")));
    let mut large: Vec<(Cid, Vec<u8>)> = (0..40).map(|i| block_of(&json!({"f": i}))).collect();
    large.insert(7, (a, a_block.clone()));
    large.push((a, a_block.clone()));
    large.insert(30, (a, forged.clone()));
    for blocks in [
        vec![
            (a, a_block.clone()),
            (b, b_block.clone()),
            (a, forged.clone()),
        ],
        vec![
            (a, forged.clone()),
            (a, a_block.clone()),
            (b, b_block.clone()),
        ],
        vec![
            (b, b_block.clone()),
            (a, a_block.clone()),
            (a, a_block.clone()),
            (a, vec![]),
        ],
        large,
    ] {
        let car = synth::car(&a, &blocks);
        assert_eq!(
            CarBlocks::parse(&car).unwrap_err(),
            CarError::ConflictingBlock(a)
        );
        let err = decode_frame(&commit_with(ops(), car, vec![])).unwrap_err();
        assert_eq!(err, FrameError::Car(CarError::ConflictingBlock(a)));
        assert_eq!(err.reason(), "bad_car");
        assert!(err.to_string().contains(&a.to_string()), "{err}");
    }
}

#[test]
fn car_index_finds_every_block_among_many() {
    // 3,000 distinct blocks, in hash (i.e. random) order, plus some identical repeats.
    let blocks: Vec<(Cid, Vec<u8>)> = (0..3000).map(|i| block_of(&json!({"i": i}))).collect();
    let mut sections = blocks.clone();
    sections.extend(blocks.iter().step_by(7).cloned());
    let car = synth::car(&blocks[0].0, &sections);
    let index = CarBlocks::parse(&car).unwrap();
    assert_eq!(index.len(), blocks.len());
    for (cid, data) in &blocks {
        assert_eq!(index.get(cid), Some(&data[..]), "{cid}");
    }
    assert_eq!(index.get(&block_of(&json!({"i": -1})).0), None);
    // One digest under two codecs: equal index keys, told apart by the whole CID, in a sorted
    // (large) index and a scanned (small) one.
    let (dag, dag_block) = block_of(&json!({"i": 0}));
    let raw = Cid::new_v1(cbor::RAW, *dag.hash());
    assert_eq!(index.get(&raw), None);
    for n in [3, 40] {
        let mut sections = blocks[1..n].to_vec();
        sections.push((raw, b"raw bytes".to_vec()));
        sections.push((dag, dag_block.clone()));
        let car = synth::car(&dag, &sections);
        let index = CarBlocks::parse(&car).unwrap();
        assert_eq!(index.len(), n + 1);
        assert_eq!(index.get(&dag), Some(&dag_block[..]), "{n}");
        assert_eq!(index.get(&raw), Some(&b"raw bytes"[..]), "{n}");
        for (cid, data) in &blocks[1..n] {
            assert_eq!(index.get(cid), Some(&data[..]), "{n}");
        }
        assert_eq!(index.get(&blocks[n].0), None, "{n}");
    }
    // A hostile CAR whose CIDs all share one digest (5,000 codecs): every index key collides, yet
    // parsing stays a sort (no pairwise scan) and each lookup a binary search.
    let colliding: Vec<(Cid, Vec<u8>)> = (0..5000u64)
        .map(|i| {
            (
                Cid::new_v1(0x1000 + i, *dag.hash()),
                i.to_be_bytes().to_vec(),
            )
        })
        .collect();
    let car = synth::car(&dag, &colliding);
    let started = Instant::now();
    let hostile = CarBlocks::parse(&car).unwrap();
    for (cid, data) in &colliding {
        assert_eq!(hostile.get(cid), Some(&data[..]));
    }
    assert_eq!(hostile.get(&dag), None);
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    // `iter` lists each CID once.
    let cids: HashSet<Cid> = index.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        (cids.len(), index.iter().count()),
        (blocks.len(), blocks.len())
    );
    assert_eq!(index.roots(), [blocks[0].0]);
}

/// `block` addressed by a CID of the given version/codec/hash (the digest really is the block's).
fn cid_with(version: u64, codec: u64, hash: u64, block: &[u8]) -> Cid {
    use sha2::Digest as _;
    let digest = match hash {
        0x12 => sha2::Sha256::digest(block).to_vec(),
        0x13 => sha2::Sha512::digest(block).to_vec(),
        _ => unreachable!(),
    };
    let mh = ipld_core::cid::multihash::Multihash::<64>::wrap(hash, &digest).unwrap();
    if version == 0 {
        Cid::new_v0(mh).unwrap()
    } else {
        Cid::new_v1(codec, mh)
    }
}

#[test]
fn non_atproto_record_cids_fail_that_op_only_with_bad_cid() {
    let (good_a, good_a_block) = block_of(&post("first"));
    let (good_b, good_b_block) = block_of(&post("last"));
    let odd_block = encode(&ipld(&post("odd")));
    let v0 = cid_with(0, 0x70, 0x12, &odd_block);
    let raw = cid_with(1, cbor::RAW, 0x12, &odd_block);
    let sha512 = cid_with(1, cbor::DAG_CBOR, 0x13, &odd_block);
    let short = Cid::new_v1(
        cbor::DAG_CBOR,
        ipld_core::cid::multihash::Multihash::<64>::wrap(0x12, &good_a.hash().digest()[..20])
            .unwrap(),
    );
    assert!(cbor::is_atproto_record_cid(&good_a));
    for bad in [v0, raw, sha512, short] {
        assert!(!cbor::is_atproto_record_cid(&bad), "{bad}");
    }
    // Every block is in the CAR under its (odd) CID, so only the CID format can fail the op.
    let car = synth::car(
        &good_a,
        &[
            (good_a, good_a_block),
            (v0, odd_block.clone()),
            (raw, odd_block.clone()),
            (sha512, odd_block.clone()),
            (short, odd_block),
            (good_b, good_b_block),
        ],
    );
    let post_op =
        |rkey: &str, cid: &Cid| op("create", &format!("app.bsky.feed.post/{rkey}"), Some(cid));
    let ops = vec![
        post_op("3l5jnpb6xya00", &good_a),
        post_op("3l5jnpb6xyb00", &v0),
        post_op("3l5jnpb6xyc00", &raw),
        post_op("3l5jnpb6xyd00", &sha512),
        post_op("3l5jnpb6xye00", &short),
        // A delete's cid is not looked at (it should be null).
        op("delete", "app.bsky.feed.post/3l5jnpb6xyf00", Some(&v0)),
        post_op("3l5jnpb6xyz00", &good_b),
    ];
    let frame = commit_with(ops, car, vec![]);
    let event = decode_frame(&frame).expect("the frame itself is well formed");
    let Event::Commit(c) = &event else {
        panic!("not a commit")
    };
    let shape: Vec<String> = c
        .ops
        .iter()
        .map(|op| {
            let op = op.as_ref().expect("ops parse; the CID is checked on fetch");
            match c.record_block(op) {
                Ok(Some(_)) => "record".to_owned(),
                Ok(None) => "delete".to_owned(),
                Err(e) => e.reason().to_owned(),
            }
        })
        .collect();
    assert_eq!(
        shape,
        ["record", "bad_cid", "bad_cid", "bad_cid", "bad_cid", "delete", "record"]
    );
    let err = c.record_block(c.ops[1].as_ref().unwrap()).unwrap_err();
    assert_eq!(err, OpError::BadCid(v0));
    assert!(err.to_string().contains(&v0.to_string()), "{err}");

    // Routing captures the two good posts and drops the four others with `bad_cid`.
    let mut state = MemoryState::default();
    state.study_users.insert(Did::parse(S1).unwrap());
    let routing = route_event(&event, &state, CLOCK);
    let mut files: Vec<String> = routing
        .files
        .iter()
        .map(|f| f.path.file_name().to_owned())
        .filter(|f| f.contains("3l5jnpb6xya00") || f.contains("3l5jnpb6xyz00"))
        .collect();
    files.sort();
    files.dedup();
    assert_eq!(files.len(), 2, "{files:?}");
    let dropped: Vec<_> = routing
        .dropped
        .iter()
        .map(|d| (d.op_index, d.reason))
        .collect();
    assert_eq!(
        dropped,
        (1..=4).map(|i| (Some(i), "bad_cid")).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// proptest: arbitrary bytes and mutations of a valid commit frame
// ---------------------------------------------------------------------------------------------

fn small_state() -> MemoryState {
    let mut state = MemoryState::default();
    for d in [S1, A1] {
        state.study_users.insert(Did::parse(d).unwrap());
        state.in_network.insert(Did::parse(d).unwrap());
    }
    state
        .study_posts
        .insert(STUDY_POST.to_owned(), Did::parse(S1).unwrap());
    state
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
    /// Overwrite with a CBOR head claiming a huge length.
    HugeHead(prop::sample::Index, u8),
    /// Copy a slice of the frame elsewhere (duplicates fields, blocks, CIDs).
    Splice(prop::sample::Index, prop::sample::Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    use prop::sample::Index;
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::sample::select(vec![0x5bu8, 0x7b, 0x9b, 0xbb, 0x9a, 0x5a]))
            .prop_map(|(i, m)| Mutation::HugeHead(i, m)),
        1 => (any::<Index>(), any::<Index>(), 1usize..128)
            .prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    if frame.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, b) => {
            let i = i.index(frame.len());
            frame[i] ^= 1 << b;
        }
        Mutation::Set(i, b) => {
            let i = i.index(frame.len());
            frame[i] = *b;
        }
        Mutation::Insert(i, v) => {
            let i = i.index(frame.len() + 1);
            frame.splice(i..i, v.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let i = i.index(frame.len());
            let end = (i + n).min(frame.len());
            frame.drain(i..end);
        }
        Mutation::Truncate(i) => {
            let i = i.index(frame.len());
            frame.truncate(i);
        }
        Mutation::HugeHead(i, major) => {
            let i = i.index(frame.len());
            let head = [*major, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
            let end = (i + head.len()).min(frame.len());
            frame[i..end].copy_from_slice(&head[..end - i]);
        }
        Mutation::Splice(from, to, n) => {
            let from = from.index(frame.len());
            let end = (from + n).min(frame.len());
            let piece = frame[from..end].to_vec();
            let to = to.index(frame.len() + 1);
            frame.splice(to..to, piece);
        }
    }
}

fn no_panic(frame: &[u8], state: &MemoryState) -> Result<(), TestCaseError> {
    match exercise(frame, state) {
        Ok(_) => Ok(()),
        Err(msg) => Err(TestCaseError::fail(format!(
            "panic on {} bytes {:02x?}: {msg}",
            frame.len(),
            &frame[..frame.len().min(512)]
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        header in prop::sample::select(vec!["", "#commit", "#identity", "#account", "#sync", "#info", "#handle", "error"]),
    ) {
        let state = small_state();
        let mut frame = match header {
            "" => Vec::new(),
            "error" => encode(&ipld(&json!({"op": -1}))),
            t => header_bytes(t),
        };
        frame.extend(bytes);
        no_panic(&frame, &state)?;
    }

    #[test]
    fn mutated_commit_frames_never_panic(mutations in prop::collection::vec(mutation(), 1..8)) {
        let state = small_state();
        let mut frame = synth_commit();
        for m in &mutations {
            apply(&mut frame, m);
        }
        no_panic(&frame, &state)?;
    }
}

#[test]
fn synth_commit_routes_every_kind() {
    // The proptest base frame is only a good base if it decodes and reaches the routing branches.
    let frame = synth_commit();
    let event = decode_frame(&frame).unwrap();
    let Event::Commit(c) = &event else {
        panic!("not a commit")
    };
    assert_eq!(c.ops.len(), 9);
    let routing = route_event(&event, &small_state(), CLOCK);
    assert!(routing.dropped.is_empty(), "{:?}", routing.dropped);
    let folders: HashSet<&str> = routing.files.iter().map(|f| f.folder).collect();
    for want in [
        "study/create/post",
        "study/create/reply_to_user_post",
        "in_network/create/post",
        "study/create/like",
        "study/create/like_on_user_post",
        "study/create/repost",
        "study/create/repost_of_user_post",
        "study/create/quote_of_user_post",
        "study/create/follow/follower",
        "study/create/follow/followee",
        "study/create/block",
        "study/create/profile",
        "study/delete",
    ] {
        assert!(folders.contains(want), "{want} missing from {folders:?}");
    }
}
