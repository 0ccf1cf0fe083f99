//! Peak heap use of `decode_frame` on hostile frames, measured by a counting global allocator.
//!
//! Its own test binary (not a module of `it`) so the counting allocator is installed only here.
//! Counts are per thread, so the harness running tests in parallel does not blur them, and each
//! measurement resets the peak just before the call: what is reported is the most heap the call
//! held at once. A realloc is counted as allocate-then-free (a moving realloc holds both blocks),
//! so the figures are upper bounds.
//!
//! Every hostile frame must be decoded (or rejected) with a peak of at most [`MAX_AMPLIFICATION`]
//! times its own size: a 5 MiB frame whose `ops` list held 5 million one-byte items once cost ~2 GB
//! because the list was collected before its length was checked. `--nocapture` prints the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use sync_core::car::{CarError, MAX_BLOCKS};
use sync_core::cbor;
use sync_core::frame::{
    decode_frame, Event, FrameError, MAX_BLOCKS_BYTES, MAX_FRAME_BYTES, MAX_OPS,
};
use sync_core::synth::{self, OpSpec};

const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const REV: &str = "3l5jnpb6xyz2k";
const TIME: &str = "2024-10-02T14:05:11.000Z";

/// Most heap a decode may hold at once, as a multiple of the frame's size.
const MAX_AMPLIFICATION: usize = 4;

// ---------------------------------------------------------------------------------------------
// The counting allocator
// ---------------------------------------------------------------------------------------------

struct Counting;

thread_local! {
    // `const` and drop-free: no lazy initialisation, no destructor, so the allocator can use them
    // at any point of a thread's life without allocating itself.
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    let _ = CURRENT.try_with(|c| {
        let now = c.get() + bytes as isize;
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    let _ = CURRENT.try_with(|c| c.set(c.get() - bytes as isize));
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most heap (bytes) this thread held at once during it,
/// above what it held when `f` started. The result is kept alive until after the peak is read.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

// ---------------------------------------------------------------------------------------------
// Raw DAG-CBOR building (the hostile lists are built as bytes: as IPLD they would take GBs)
// ---------------------------------------------------------------------------------------------

fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => [vec![m | 25], (n as u16).to_be_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![m | 26], (n as u32).to_be_bytes().to_vec()].concat(),
        _ => [vec![m | 27], n.to_be_bytes().to_vec()].concat(),
    }
}

fn text(s: &str) -> Vec<u8> {
    [head(3, s.len() as u64), s.as_bytes().to_vec()].concat()
}

fn bytes(b: &[u8]) -> Vec<u8> {
    [head(2, b.len() as u64), b.to_vec()].concat()
}

/// A list of `n` copies of the one-byte item `0x00` (the integer 0).
fn zeros(n: usize) -> Vec<u8> {
    let mut v = head(4, n as u64);
    v.resize(v.len() + n, 0x00);
    v
}

fn encode(v: &Ipld) -> Vec<u8> {
    cbor::encode_ipld(v).unwrap()
}

/// A map from already-encoded values, keys in DAG-CBOR canonical order (length, then bytes).
fn map(mut entries: Vec<(&str, Vec<u8>)>) -> Vec<u8> {
    entries.sort_by(|a, b| (a.0.len(), a.0).cmp(&(b.0.len(), b.0)));
    let mut out = head(5, entries.len() as u64);
    for (k, v) in entries {
        out.extend(text(k));
        out.extend(v);
    }
    out
}

fn header(t: &str) -> Vec<u8> {
    map(vec![("op", vec![0x01]), ("t", text(t))])
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn car_header_bytes(roots: &[u8]) -> Vec<u8> {
    let header = map(vec![("roots", roots.to_vec()), ("version", vec![0x01])]);
    let mut out = Vec::new();
    varint(header.len() as u64, &mut out);
    out.extend(header);
    out
}

fn block_of(record: &serde_json::Value) -> (Cid, Vec<u8>) {
    let block = encode(&cbor::json_to_ipld(record).unwrap());
    (cbor::cid_for_dag_cbor(&block), block)
}

fn post(text: &str) -> serde_json::Value {
    serde_json::json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": TIME})
}

/// A `#commit` frame from raw field values; `ops`, `blocks` (a CAR) and `blobs` as given, the
/// other fields valid; `extra` fields are added as they are.
fn commit_frame(ops: Vec<u8>, car: &[u8], blobs: Vec<u8>, extra: Vec<(&str, Vec<u8>)>) -> Vec<u8> {
    let commit = block_of(&serde_json::json!({"did": S1, "rev": REV, "version": 3})).0;
    let mut fields = vec![
        ("seq", vec![0x01]),
        ("repo", text(S1)),
        ("rev", text(REV)),
        ("since", vec![0xf6]),
        ("commit", encode(&Ipld::Link(commit))),
        ("blocks", bytes(car)),
        ("ops", ops),
        ("blobs", blobs),
        ("rebase", vec![0xf4]),
        ("tooBig", vec![0xf4]),
        ("time", text(TIME)),
    ];
    fields.extend(extra);
    [header("#commit"), map(fields)].concat()
}

/// The number of one-byte items that brings a frame built by `build(n)` to `target` bytes
/// (list heads grow with `n`, so the fit is found by adjusting from a first guess).
fn fill_to(target: usize, build: impl Fn(usize) -> Vec<u8>) -> (usize, Vec<u8>) {
    let mut n = target.saturating_sub(build(0).len() + 9);
    loop {
        let frame = build(n);
        match frame.len().cmp(&target) {
            std::cmp::Ordering::Equal => return (n, frame),
            std::cmp::Ordering::Less => n += target - frame.len(),
            std::cmp::Ordering::Greater => n -= frame.len() - target,
        }
    }
}

fn op(action: &str, path: &str, cid: Option<&Cid>) -> Vec<u8> {
    map(vec![
        ("action", text(action)),
        ("path", text(path)),
        ("cid", cid.map_or(vec![0xf6], |c| encode(&Ipld::Link(*c)))),
    ])
}

fn list(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = head(4, items.len() as u64);
    for i in items {
        out.extend(i);
    }
    out
}

/// One valid post, its block in a proper CAR.
fn one_post() -> (Vec<u8>, Vec<u8>) {
    let (cid, block) = block_of(&post("hello"));
    let ops = list(&[op("create", "app.bsky.feed.post/3l5jnpb6xyz3a", Some(&cid))]);
    (ops, synth::car(&cid, &[(cid, block)]))
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

/// Decodes `frame`, checks the outcome, and reports the peak heap of the call.
fn report(name: &str, frame: &[u8], check: impl FnOnce(&Result<Event<'_>, FrameError>)) -> usize {
    let (result, peak) = peak_during(|| decode_frame(frame));
    check(&result);
    let outcome = match &result {
        Ok(e) => format!("Ok({})", e.kind()),
        Err(e) => format!("Err({})", e.reason()),
    };
    eprintln!(
        "{name:<58} frame {:>9} B  peak {:>9} B  ({:.3}x)  {outcome}",
        frame.len(),
        peak,
        peak as f64 / frame.len() as f64
    );
    peak
}

/// [`report`], and the peak must be at most [`MAX_AMPLIFICATION`] times the frame's size.
fn measure(name: &str, frame: &[u8], check: impl FnOnce(&Result<Event<'_>, FrameError>)) -> usize {
    let peak = report(name, frame, check);
    assert!(
        peak <= MAX_AMPLIFICATION * frame.len(),
        "{name}: peak {peak} bytes for a {}-byte frame",
        frame.len()
    );
    peak
}

#[test]
fn the_allocator_counts() {
    // Positive controls: a plain allocation, and a normal commit decode, both show up.
    let (v, peak) = peak_during(|| Vec::<u8>::with_capacity(1 << 20));
    assert!(peak >= 1 << 20, "{peak}");
    drop(v);
    let (v, peak) = peak_during(|| {
        let mut v = Vec::<u64>::new();
        for i in 0..100_000 {
            v.push(i);
        }
        v
    });
    // Growing by doubling holds the old and the new buffer at the moment of a moving realloc.
    assert!(peak >= 100_000 * 8, "{peak}");
    drop(v);

    let frame = synth::commit_frame(
        7,
        S1,
        REV,
        TIME,
        &[
            OpSpec::create("app.bsky.feed.post", "3l5jnpb6xyz3a", post("a")),
            OpSpec::create("app.bsky.feed.post", "3l5jnpb6xyz3b", post("b")),
            OpSpec::delete("app.bsky.feed.post", "3l5jnpb6xyz2k"),
        ],
    );
    // A normal frame is not held to the hostile-frame ratio: tiny frames have fixed overheads.
    let peak = report("control: normal 3-op commit", &frame, |r| {
        assert!(matches!(r, Ok(Event::Commit(c)) if c.ops.len() == 3))
    });
    // At least the ops and the CAR index are on the heap.
    assert!(peak > 3 * std::mem::size_of::<Cid>(), "{peak}");
}

#[test]
fn ops_list_of_millions_of_one_byte_items() {
    let (car_ops, car) = one_post();
    drop(car_ops);
    let (n, frame) = fill_to(MAX_FRAME_BYTES, |n| {
        commit_frame(zeros(n), &car, list(&[]), vec![])
    });
    assert!(n > 5_000_000, "{n}");
    measure(&format!("ops: {n} one-byte items"), &frame, |r| {
        assert_eq!(r.as_ref().err(), Some(&FrameError::TooManyOps(n)))
    });
    // Just over the limit, with real ops: only MAX_OPS + 1 are ever held.
    let ops: Vec<Vec<u8>> = (0..=MAX_OPS)
        .map(|i| {
            op(
                "delete",
                &format!("app.bsky.feed.post/3l5jnpb6x{i:04}"),
                None,
            )
        })
        .collect();
    let frame = commit_frame(list(&ops), &car, list(&[]), vec![]);
    measure("ops: MAX_OPS + 1 real ops", &frame, |r| {
        assert_eq!(r.as_ref().err(), Some(&FrameError::TooManyOps(MAX_OPS + 1)))
    });
}

#[test]
fn ignored_fields_holding_millions_of_items() {
    let (ops, car) = one_post();
    let ok_commit = |r: &Result<Event<'_>, FrameError>| {
        assert!(
            matches!(r, Ok(Event::Commit(c)) if c.ops.len() == 1 && c.ops[0].is_ok()),
            "{r:?}"
        )
    };
    let (n, frame) = fill_to(MAX_FRAME_BYTES, |n| {
        commit_frame(ops.clone(), &car, zeros(n), vec![])
    });
    measure(
        &format!("blobs: {n} one-byte items (ignored)"),
        &frame,
        ok_commit,
    );
    let (n, frame) = fill_to(MAX_FRAME_BYTES, |n| {
        commit_frame(
            ops.clone(),
            &car,
            list(&[]),
            vec![("unknownField", zeros(n))],
        )
    });
    measure(
        &format!("unknown field: {n} one-byte items"),
        &frame,
        ok_commit,
    );

    // MAX_OPS ops, each carrying a large map of unknown fields: skipped inside the op visitor.
    let per_op = (MAX_FRAME_BYTES - 64 * 1024) / MAX_OPS;
    let fields = per_op / 6; // 6 bytes per entry: 4-byte key (text head + 3 chars), 2-byte value
    let junk: Vec<u8> = {
        let mut m = head(5, fields as u64 + 3);
        m.extend(text("action"));
        m.extend(text("create"));
        m.extend(text("path"));
        m.extend(text("app.bsky.feed.post/3l5jnpb6xyz3a"));
        m.extend(text("cid"));
        m.push(0xf6);
        for i in 0..fields {
            m.extend(text(&format!("{:03}", i % 1000)));
            m.extend([0x18, (i % 256) as u8]);
        }
        m
    };
    let frame = commit_frame(list(&vec![junk; MAX_OPS]), &car, list(&[]), vec![]);
    assert!(frame.len() <= MAX_FRAME_BYTES);
    measure(
        &format!("{MAX_OPS} ops with {fields} unknown keys each"),
        &frame,
        |r| {
            assert!(
                matches!(r, Ok(Event::Commit(c)) if c.ops.len() == MAX_OPS),
                "{r:?}"
            )
        },
    );
}

#[test]
fn car_of_hundreds_of_thousands_of_tiny_sections() {
    // The smallest section: length 4, CIDv1 raw with an empty identity digest.
    let tiny_cid = [0x01, 0x55, 0x00, 0x00];
    let root = encode(&Ipld::List(vec![Ipld::Link(
        Cid::read_bytes(&tiny_cid[..]).unwrap(),
    )]));
    let mut car = car_header_bytes(&root);
    while car.len() + 5 <= MAX_BLOCKS_BYTES {
        car.push(0x04);
        car.extend(tiny_cid);
    }
    let sections = (car.len() - car_header_bytes(&root).len()) / 5;
    let frame = commit_frame(list(&[]), &car, list(&[]), vec![]);
    measure(&format!("CAR: {sections} tiny sections"), &frame, |r| {
        assert_eq!(
            r.as_ref().err(),
            Some(&FrameError::Car(CarError::TooManyBlocks))
        )
    });

    // Exactly MAX_BLOCKS distinct tiny sections (2-byte identity digests) is allowed: the blocks
    // (a `Cid` and a slice each) and their 16-byte index entries are the allocation, reserved at
    // their exact size. A small frame, so it is held to that fixed worst case, not to the ratio.
    let mut car = car_header_bytes(&root);
    for i in 0..MAX_BLOCKS {
        car.extend([0x06, 0x01, 0x55, 0x00, 0x02]);
        car.extend((i as u16).to_be_bytes());
    }
    let frame = commit_frame(list(&[]), &car, list(&[]), vec![]);
    let (result, peak) = peak_during(|| decode_frame(&frame));
    assert!(matches!(&result, Ok(Event::Commit(c)) if c.blocks.len() == MAX_BLOCKS));
    let entry = std::mem::size_of::<(Cid, &[u8])>() + std::mem::size_of::<(u64, u32)>();
    eprintln!(
        "{:<58} frame {:>9} B  peak {:>9} B  ({:.3}x; {MAX_BLOCKS} blocks x {entry} B)",
        format!("CAR: exactly MAX_BLOCKS distinct tiny sections"),
        frame.len(),
        peak,
        peak as f64 / frame.len() as f64,
    );
    assert!(peak <= MAX_BLOCKS * entry + 64 * 1024, "{peak}");
}

#[test]
fn car_header_with_a_huge_roots_list() {
    let tiny_link = encode(&Ipld::Link(
        Cid::read_bytes(&[0x01, 0x55, 0x00, 0x00][..]).unwrap(),
    ));
    let n = (MAX_BLOCKS_BYTES - 64) / tiny_link.len();
    let mut roots = head(4, n as u64);
    for _ in 0..n {
        roots.extend(&tiny_link);
    }
    let car = car_header_bytes(&roots);
    let frame = commit_frame(list(&[]), &car, list(&[]), vec![]);
    measure(&format!("CAR header: {n} roots"), &frame, |r| {
        assert_eq!(
            r.as_ref().err(),
            Some(&FrameError::Car(CarError::TooManyRoots(n)))
        )
    });
}

#[test]
fn deeply_nested_values() {
    let (ops, car) = one_post();
    // A body field of ~5 million nested one-element arrays (a 5 MiB frame): rejected by the depth
    // bound before any recursive decoder runs.
    let (depth, frame) = fill_to(MAX_FRAME_BYTES, |n| {
        let mut deep = vec![0x81u8; n];
        deep.push(0xf6);
        commit_frame(ops.clone(), &car, list(&[]), vec![("deep", deep)])
    });
    measure(&format!("body field nested {depth} deep"), &frame, |r| {
        assert!(matches!(r, Err(FrameError::Body { .. })), "{r:?}")
    });

    // A record block nested ~1 million deep: the frame decodes (records are decoded on demand),
    // and decoding the record is refused at MAX_DEPTH, with little memory either way.
    let mut deep_record = vec![0x81u8; 1_000_000];
    deep_record.push(0xf6);
    let cid = cbor::cid_for_dag_cbor(&deep_record);
    let car = synth::car(&cid, &[(cid, deep_record)]);
    let ops = list(&[op("create", "app.bsky.feed.post/3l5jnpb6xyz3a", Some(&cid))]);
    let frame = commit_frame(ops, &car, list(&[]), vec![]);
    measure("record block nested 1,000,000 deep", &frame, |r| {
        assert!(matches!(r, Ok(Event::Commit(_))), "{r:?}")
    });
    let Ok(Event::Commit(c)) = decode_frame(&frame) else {
        unreachable!()
    };
    let op = c.ops[0].as_ref().unwrap();
    let (json, peak) = peak_during(|| c.record_json(op));
    assert!(
        matches!(
            json,
            Err(sync_core::frame::OpError::Block(cbor::CborError::TooDeep))
        ),
        "{json:?}"
    );
    eprintln!("{:<58} peak {peak:>9} B", "  record_json of it");
    assert!(peak <= MAX_AMPLIFICATION * frame.len(), "{peak}");
}

#[test]
fn sync_blocks_are_copied_once() {
    let car = vec![0x42; MAX_BLOCKS_BYTES];
    let body = map(vec![
        ("seq", vec![0x01]),
        ("did", text(S1)),
        ("rev", text(REV)),
        ("time", text(TIME)),
        ("blocks", bytes(&car)),
    ]);
    let frame = [header("#sync"), body].concat();
    let peak = measure("#sync with MAX_BLOCKS_BYTES of blocks", &frame, |r| {
        assert!(matches!(r, Ok(Event::Sync(s)) if s.blocks.len() == MAX_BLOCKS_BYTES))
    });
    assert!(peak < MAX_BLOCKS_BYTES + 64 * 1024, "{peak}");
}

/// A `getRepo` CAR of 200,000 tiny distinct blocks (each a 5-byte DAG-CBOR string with its real
/// CID), pushed in 64 KiB chunks as an HTTP body arrives: the reader keeps every block until the
/// walk, so what it holds is the blocks plus their index, which must stay a small multiple of the
/// CAR (a map of `Cid -> Vec<u8>` took ~9x).
#[test]
fn a_repo_car_of_tiny_blocks_costs_a_small_multiple_of_its_size() {
    let blocks: Vec<(Cid, Vec<u8>)> = (0..200_000u32)
        .map(|i| {
            let block = encode(&Ipld::String(format!("{i:04x}")));
            (cbor::cid_for_dag_cbor(&block), block)
        })
        .collect();
    let car = synth::car(&blocks[0].0, &blocks);
    let (result, peak) = peak_during(|| {
        let mut reader = sync_core::repo::RepoReader::new(1 << 30);
        for chunk in car.chunks(64 * 1024) {
            reader.push(chunk).unwrap();
        }
        reader
    });
    println!(
        "repo CAR of {} tiny blocks, {} bytes: peak {peak} bytes ({:.1}x)",
        blocks.len(),
        car.len(),
        peak as f64 / car.len() as f64
    );
    assert_eq!(result.ignored_blocks(), 0);
    assert!(
        peak <= MAX_AMPLIFICATION * car.len(),
        "peak {peak} for a {}-byte CAR",
        car.len()
    );
    // The reader is dropped outside the measurement: what it held is what was measured.
    drop(result);
}
