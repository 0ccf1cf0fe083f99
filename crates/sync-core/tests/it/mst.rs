//! MST conformance: the atproto interop vectors (key heights, prefixes, commit proofs, example
//! keys), indigo's known root CIDs, a real repository CAR and real relay commits (inverted to
//! their `prevData`), property tests of shape canonicity and inversion, and hostile nodes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use sync_core::car::CarBlocks;
use sync_core::cbor;
use sync_core::frame::capture_frames;
use sync_core::mst::{
    common_prefix_len, decode_node, encode_node, key_height, walk, BlockSource, EntryData,
    MstError, NodeData, Tree, WalkError,
};

use crate::fixtures;

const EMPTY_ROOT: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
/// The value every interop vector uses.
const CID1: &str = "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454";

fn cid(s: &str) -> Cid {
    Cid::try_from(s).unwrap()
}

/// A distinct value per key (the CID of the key's bytes).
fn value_for(key: &[u8]) -> Cid {
    cbor::cid_for_dag_cbor(key)
}

fn build<K: AsRef<[u8]>>(keys: &[K], value: Cid) -> Tree {
    let mut t = Tree::empty();
    for k in keys {
        assert_eq!(t.insert(k.as_ref(), value).unwrap(), None);
    }
    t
}

fn blocks_of(tree: &mut Tree) -> HashMap<Cid, Vec<u8>> {
    tree.node_blocks().unwrap().into_iter().collect()
}

fn walked<B: BlockSource>(root: Cid, blocks: &B) -> Result<Vec<(Vec<u8>, Cid)>, MstError> {
    let mut out = Vec::new();
    walk(root, blocks, |k, v| {
        out.push((k.to_vec(), v));
        Ok::<(), ()>(())
    })
    .map_err(|e| match e {
        WalkError::Mst(e) => e,
        WalkError::Visit(()) => unreachable!("the visitor never fails"),
    })?;
    Ok(out)
}

fn read_json(rel: &str) -> Option<Value> {
    let dir = fixtures()?;
    Some(serde_json::from_str(&std::fs::read_to_string(dir.join(rel)).unwrap()).unwrap())
}

#[test]
fn key_heights_match_interop_vectors() {
    let Some(cases) = read_json("interop/mst/key_heights.json") else {
        return;
    };
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 9);
    for c in cases {
        let key = c["key"].as_str().unwrap();
        assert_eq!(
            u64::from(key_height(key.as_bytes())),
            c["height"].as_u64().unwrap(),
            "height of {key:?}"
        );
    }
    // indigo's extra vector (a fixture key of the commit proofs)
    assert_eq!(key_height(b"R2/359107"), 2);
}

/// The one-block fast path of `key_height` agrees with the height read off the full digest, at
/// every length around the one-block boundary (55/56 bytes) and beyond it.
#[test]
fn key_height_agrees_with_the_full_digest_at_every_length() {
    use sha2::{Digest, Sha256};
    fn reference(key: &[u8]) -> u32 {
        let digest = Sha256::digest(key);
        let zeros: u32 = digest
            .iter()
            .scan(true, |leading, &b| {
                let z = if *leading { b.leading_zeros() } else { 0 };
                *leading = *leading && b == 0;
                Some(z)
            })
            .sum();
        zeros / 2
    }
    let mut higher = 0;
    for len in 0..=130usize {
        for seed in 0..200u32 {
            let key: Vec<u8> = (0..len)
                .map(|i| {
                    b"abcdefghijklmnopqrstuvwxyz0123456789/."
                        [(i * 7 + seed as usize * 13 + (seed as usize >> 3)) % 38]
                })
                .collect();
            let h = key_height(&key);
            assert_eq!(
                h,
                reference(&key),
                "height of a {len}-byte key, seed {seed}"
            );
            higher += usize::from(h > 0);
        }
    }
    // About a quarter of keys sit above height 0: the comparison saw both kinds.
    assert!(higher > 2_000, "{higher}");
}

#[test]
fn common_prefix_matches_interop_vectors() {
    let Some(cases) = read_json("interop/mst/common_prefix.json") else {
        return;
    };
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 13);
    for c in cases {
        let (l, r) = (c["left"].as_str().unwrap(), c["right"].as_str().unwrap());
        assert_eq!(
            common_prefix_len(l.as_bytes(), r.as_bytes()) as u64,
            c["len"].as_u64().unwrap(),
            "{l:?} vs {r:?}"
        );
    }
    // Bytes, not characters (indigo's wide-character vectors).
    assert_eq!(common_prefix_len("jalapeño".as_bytes(), b"jalapeno"), 6);
    assert_eq!(common_prefix_len("💩abc".as_bytes(), "💩ab".as_bytes()), 6);
}

#[test]
fn empty_and_known_trees_have_the_interop_root_cids() {
    let v = cid(CID1);
    let mut empty = Tree::empty();
    assert_eq!(empty.root_cid().unwrap(), cid(EMPTY_ROOT));
    let blocks = blocks_of(&mut empty);
    assert_eq!(blocks.len(), 1);
    assert_eq!(walked(cid(EMPTY_ROOT), &blocks).unwrap(), vec![]);
    let loaded = Tree::load(cid(EMPTY_ROOT), &blocks).unwrap();
    assert!(loaded.is_empty());
    assert_eq!(loaded.get(b"a/b").unwrap(), None);
    assert_eq!(
        cbor::cid_for_dag_cbor(&encode_node(&NodeData {
            entries: vec![],
            left: None
        })),
        cid(EMPTY_ROOT)
    );
    let cases: [(&[&str], &str); 3] = [
        (
            &["com.example.record/3jqfcqzm3fo2j"],
            "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu",
        ),
        (
            &["com.example.record/3jqfcqzm3fx2j"], // a single height-2 key
            "bafyreih7wfei65pxzhauoibu3ls7jgmkju4bspy4t2ha2qdjnzqvoy33ai",
        ),
        (
            &[
                "com.example.record/3jqfcqzm3fp2j",
                "com.example.record/3jqfcqzm3fr2j",
                "com.example.record/3jqfcqzm3fs2j",
                "com.example.record/3jqfcqzm3ft2j",
                "com.example.record/3jqfcqzm4fc2j",
            ],
            "bafyreicmahysq4n6wfuxo522m6dpiy7z7qzym3dzs756t5n7nfdgccwq7m",
        ),
    ];
    for (keys, root) in cases {
        let mut t = build(keys, v);
        assert_eq!(t.root_cid().unwrap(), cid(root), "{keys:?}");
        let mut rev: Vec<&str> = keys.to_vec();
        rev.reverse();
        assert_eq!(build(&rev, v).root_cid().unwrap(), cid(root));
    }
    // The single-entry node written out by hand (indigo TestManualNode).
    let manual = NodeData {
        entries: vec![EntryData {
            key_suffix: b"com.example.record/3jqfcqzm3fo2j".to_vec(),
            prefix_len: 0,
            right: None,
            value: v,
        }],
        left: None,
    };
    let bytes = encode_node(&manual);
    assert_eq!(
        cbor::cid_for_dag_cbor(&bytes),
        cid("bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu")
    );
    assert_eq!(decode_node(&bytes).unwrap(), manual);
}

#[test]
fn trim_top_split_and_higher_layer_vectors() {
    let v = cid(CID1);
    let k = |s: &str| format!("com.example.record/3jqfcqzm{s}");
    // "trims top of tree on delete"
    let keys: Vec<String> = ["3fn2j", "3fo2j", "3fp2j", "3fs2j", "3ft2j", "3fu2j"]
        .iter()
        .map(|s| k(s))
        .collect();
    let mut t = build(&keys, v);
    assert_eq!(t.height(), 1);
    assert_eq!(
        t.root_cid().unwrap(),
        cid("bafyreifnqrwbk6ffmyaz5qtujqrzf5qmxf7cbxvgzktl4e3gabuxbtatv4")
    );
    assert_eq!(t.remove(k("3fs2j").as_bytes()).unwrap(), Some(v));
    assert_eq!(t.height(), 0);
    assert_eq!(
        t.root_cid().unwrap(),
        cid("bafyreie4kjuxbwkhzg2i5dljaswcroeih4dgiqq6pazcmunwt2byd725vi")
    );

    // "handles insertion that splits two layers down"
    let keys: Vec<String> = [
        "3fo2j", "3fp2j", "3fr2j", "3fs2j", "3ft2j", "3fz2j", "4fc2j", "4fd2j", "4ff2j", "4fg2j",
        "4fh2j",
    ]
    .iter()
    .map(|s| k(s))
    .collect();
    let l1 = cid("bafyreiettyludka6fpgp33stwxfuwhkzlur6chs4d2v4nkmq2j3ogpdjem");
    let mut t = build(&keys, v);
    assert_eq!((t.height(), t.root_cid().unwrap()), (1, l1));
    assert_eq!(t.insert(k("3fx2j").as_bytes(), v).unwrap(), None);
    assert_eq!(
        (t.height(), t.root_cid().unwrap()),
        (
            2,
            cid("bafyreid2x5eqs4w4qxvc5jiwda4cien3gw2q6cshofxwnvv7iucrmfohpm")
        )
    );
    assert_eq!(t.remove(k("3fx2j").as_bytes()).unwrap(), Some(v));
    assert_eq!((t.height(), t.root_cid().unwrap()), (1, l1));

    // "handles new layers that are two higher than existing"
    let l0 = cid("bafyreidfcktqnfmykz2ps3dbul35pepleq7kvv526g47xahuz3rqtptmky");
    let l2 = cid("bafyreiavxaxdz7o7rbvr3zg2liox2yww46t7g6hkehx4i4h3lwudly7dhy");
    let mut t = build(&[k("3ft2j"), k("3fz2j")], v);
    assert_eq!((t.height(), t.root_cid().unwrap()), (0, l0));
    t.insert(k("3fx2j").as_bytes(), v).unwrap();
    assert_eq!(t.root_cid().unwrap(), l2);
    t.remove(k("3fx2j").as_bytes()).unwrap();
    assert_eq!((t.height(), t.root_cid().unwrap()), (0, l0));
    t.insert(k("3fx2j").as_bytes(), v).unwrap();
    t.insert(k("4fd2j").as_bytes(), v).unwrap();
    assert_eq!(
        (t.height(), t.root_cid().unwrap()),
        (
            2,
            cid("bafyreig4jv3vuajbsybhyvb7gggvpwh2zszwfyttjrj6qwvcsp24h6popu")
        )
    );
    t.remove(k("4fd2j").as_bytes()).unwrap();
    assert_eq!((t.height(), t.root_cid().unwrap()), (2, l2));
    // Every tree built above reloads from its own blocks into the same root, key set and shape.
    let mut blocks = blocks_of(&mut t);
    let root = t.root_cid().unwrap();
    let mut again = Tree::load(root, &blocks).unwrap();
    assert_eq!(again.root_cid().unwrap(), root);
    assert_eq!(again.height(), 2);
    assert_eq!(walked(root, &blocks).unwrap().len(), 3);
    // A changed value changes the root and changes back.
    assert_eq!(again.insert(k("3ft2j").as_bytes(), l0).unwrap(), Some(v));
    assert_ne!(again.root_cid().unwrap(), root);
    assert_eq!(again.insert(k("3ft2j").as_bytes(), v).unwrap(), Some(l0));
    assert_eq!(again.root_cid().unwrap(), root);
    blocks.clear();
    assert_eq!(
        Tree::load(root, &blocks).unwrap_err(),
        MstError::MissingBlock(root)
    );
}

#[derive(Debug)]
struct ProofCase {
    comment: String,
    leaf: Cid,
    keys: Vec<String>,
    adds: Vec<String>,
    dels: Vec<String>,
    before: Cid,
    after: Cid,
    proof: Vec<Cid>,
}

fn proof_cases() -> Option<Vec<ProofCase>> {
    let cases = read_json("interop/firehose/commit-proof-fixtures.json")?;
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    Some(
        cases
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ProofCase {
                comment: c["comment"].as_str().unwrap().to_owned(),
                leaf: cid(c["leafValue"].as_str().unwrap()),
                keys: strs(&c["keys"]),
                adds: strs(&c["adds"]),
                dels: strs(&c["dels"]),
                before: cid(c["rootBeforeCommit"].as_str().unwrap()),
                after: cid(c["rootAfterCommit"].as_str().unwrap()),
                proof: strs(&c["blocksInProof"]).iter().map(|s| cid(s)).collect(),
            })
            .collect(),
    )
}

/// Loads the after-tree from `blocks` and undoes the case's commit: adds are removed, deletes
/// re-inserted. Returns the resulting root.
fn invert_case<B: BlockSource>(case: &ProofCase, blocks: &B) -> Result<Cid, MstError> {
    let mut t = Tree::load(case.after, blocks)?;
    for k in &case.adds {
        assert_eq!(t.remove(k.as_bytes())?, Some(case.leaf), "{}", case.comment);
    }
    for k in &case.dels {
        assert_eq!(t.insert(k.as_bytes(), case.leaf)?, None, "{}", case.comment);
    }
    t.root_cid()
}

#[test]
fn commit_proof_fixtures_forward_and_inverted() {
    let Some(cases) = proof_cases() else { return };
    assert_eq!(cases.len(), 6);
    let mut needed_non_root = 0;
    for case in &cases {
        let name = &case.comment;
        // (a) forward: build the before-tree, apply the commit.
        let mut t = build(&case.keys, case.leaf);
        assert_eq!(t.root_cid().unwrap(), case.before, "{name}: before");
        for k in &case.adds {
            assert_eq!(t.insert(k.as_bytes(), case.leaf).unwrap(), None, "{name}");
        }
        for k in &case.dels {
            assert_eq!(t.remove(k.as_bytes()).unwrap(), Some(case.leaf), "{name}");
        }
        assert_eq!(t.root_cid().unwrap(), case.after, "{name}: after");

        // (b) inversion with exactly the proof blocks.
        let all = blocks_of(&mut t);
        let proof: HashMap<Cid, Vec<u8>> = case
            .proof
            .iter()
            .map(|c| {
                (
                    *c,
                    all.get(c)
                        .expect("proof block is an after-tree node")
                        .clone(),
                )
            })
            .collect();
        assert_eq!(
            proof.len(),
            case.proof.len(),
            "{name}: distinct proof blocks"
        );
        assert_eq!(
            invert_case(case, &proof),
            Ok(case.before),
            "{name}: inverted"
        );
        // The full after-tree inverts the same way.
        assert_eq!(invert_case(case, &all), Ok(case.before), "{name}");

        // Dropping a proof block the inversion uses is a MissingBlock for that block, never a
        // wrong root; blocks it does not use change nothing.
        for dropped in &case.proof {
            let mut fewer = proof.clone();
            fewer.remove(dropped);
            match invert_case(case, &fewer) {
                Ok(root) => assert_eq!(root, case.before, "{name}: without {dropped}"),
                Err(e) => {
                    assert_eq!(e, MstError::MissingBlock(*dropped), "{name}");
                    if *dropped != case.after {
                        needed_non_root += 1;
                    }
                }
            }
        }
        let mut no_root = proof.clone();
        no_root.remove(&case.after);
        assert_eq!(
            invert_case(case, &no_root),
            Err(MstError::MissingBlock(case.after))
        );
    }
    // Splits and merges do need the neighbouring subtrees the proofs carry.
    assert!(needed_non_root >= cases.len(), "{needed_non_root}");
}

#[test]
fn example_keys_build_walk_and_empty_again() {
    let Some(dir) = fixtures() else { return };
    let text = std::fs::read_to_string(dir.join("interop/mst/example_keys.txt")).unwrap();
    let keys: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys.len(), 156);
    let mut t = Tree::empty();
    for k in &keys {
        assert_eq!(
            t.insert(k.as_bytes(), value_for(k.as_bytes())).unwrap(),
            None
        );
    }
    let root = t.root_cid().unwrap();
    let blocks = blocks_of(&mut t);
    let mut expected: Vec<(Vec<u8>, Cid)> = keys
        .iter()
        .map(|k| (k.as_bytes().to_vec(), value_for(k.as_bytes())))
        .collect();
    expected.sort();
    assert_eq!(walked(root, &blocks).unwrap(), expected);
    let loaded = Tree::load(root, &blocks).unwrap();
    for (k, v) in &expected {
        assert_eq!(loaded.get(k).unwrap(), Some(*v));
        assert_eq!(t.get(k).unwrap(), Some(*v));
    }
    assert_eq!(loaded.get(b"A0/000000").unwrap(), None);
    // Removing in a different order than inserting, from the loaded tree.
    let mut loaded = loaded;
    let mut order: Vec<&str> = keys.clone();
    order.sort_by_key(|k| value_for(k.as_bytes()).to_bytes());
    for k in &order {
        assert_eq!(
            loaded.remove(k.as_bytes()).unwrap(),
            Some(value_for(k.as_bytes()))
        );
        assert_eq!(loaded.remove(k.as_bytes()).unwrap(), None);
    }
    assert!(loaded.is_empty());
    assert_eq!(loaded.height(), 0);
    assert_eq!(loaded.root_cid().unwrap(), cid(EMPTY_ROOT));
}

#[derive(Deserialize)]
struct CommitBlock {
    data: Cid,
}

/// A real repository export: load, walk and rebuild must all agree with the PDS's own tree.
#[test]
fn real_repo_car_walks_loads_and_rebuilds() {
    let Some(dir) = fixtures() else { return };
    let car_bytes = std::fs::read(dir.join("relay-capture/repo.car")).unwrap();
    let car = CarBlocks::parse(&car_bytes).unwrap();
    let commit: CommitBlock =
        serde_ipld_dagcbor::from_slice(car.get(&car.roots[0]).unwrap()).unwrap();
    let info = std::fs::read_to_string(dir.join("relay-capture/repo_expected_commit.txt")).unwrap();
    let data_line = info
        .lines()
        .find_map(|l| l.strip_prefix("Data CID: "))
        .unwrap();
    assert_eq!(commit.data, cid(data_line.trim()));
    let mut expected: Vec<(Vec<u8>, Cid)> =
        std::fs::read_to_string(dir.join("relay-capture/repo_expected_records.tsv"))
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('\t').unwrap();
                (k.as_bytes().to_vec(), cid(v))
            })
            .collect();
    expected.sort();
    assert!(expected.len() > 10);
    assert_eq!(walked(commit.data, &car).unwrap(), expected);

    let mut loaded = Tree::load(commit.data, &car).unwrap();
    assert!(loaded.height() >= 1);
    for (cid, bytes) in loaded.node_blocks().unwrap() {
        assert_eq!(
            car.get(&cid),
            Some(bytes.as_slice()),
            "re-encoded node {cid}"
        );
    }
    let mut rebuilt = Tree::empty();
    for (k, v) in expected.iter().rev() {
        rebuilt.insert(k, *v).unwrap();
    }
    assert_eq!(rebuilt.root_cid().unwrap(), commit.data);
}

#[derive(Deserialize)]
struct FrameHeader {
    op: i64,
    t: Option<String>,
}

#[derive(Deserialize)]
struct RawOp {
    action: String,
    path: String,
    cid: Option<Cid>,
    #[serde(default)]
    prev: Option<Cid>,
}

#[derive(Deserialize)]
struct RawCommit {
    #[serde(with = "serde_bytes")]
    blocks: Vec<u8>,
    ops: Vec<RawOp>,
    #[serde(rename = "prevData", default)]
    prev_data: Option<Cid>,
}

/// The `#commit` frames of the relay capture that carry `prevData`.
fn capture_commits() -> Option<Vec<RawCommit>> {
    let dir = fixtures()?;
    let frames = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    let mut out = Vec::new();
    for frame in capture_frames(&frames) {
        let frame = frame.unwrap();
        let end = cbor::skip_item(frame, 0).unwrap();
        let header: FrameHeader = serde_ipld_dagcbor::from_slice(&frame[..end]).unwrap();
        if header.op != 1 || header.t.as_deref() != Some("#commit") {
            continue;
        }
        let commit: RawCommit = serde_ipld_dagcbor::from_slice(&frame[end..]).unwrap();
        if commit.prev_data.is_some() {
            out.push(commit);
        }
    }
    Some(out)
}

/// Inverts one relay commit against its own CAR; returns the inverted root.
fn invert_commit(commit: &RawCommit, car: &CarBlocks<'_>) -> Result<Cid, MstError> {
    let head: CommitBlock =
        serde_ipld_dagcbor::from_slice(car.get(&car.roots[0]).unwrap()).unwrap();
    let mut t = Tree::load(head.data, car)?;
    for op in commit.ops.iter().rev() {
        let key = op.path.as_bytes();
        match op.action.as_str() {
            "create" => assert_eq!(t.remove(key)?, op.cid),
            "update" => assert_eq!(t.insert(key, op.prev.unwrap())?, op.cid),
            "delete" => assert_eq!(t.insert(key, op.prev.unwrap())?, None),
            other => panic!("action {other}"),
        }
    }
    t.root_cid()
}

/// Real relay commits (sync 1.1) invert, with only the blocks they carry, to their `prevData`.
#[test]
fn relay_commits_invert_to_prev_data() {
    let Some(commits) = capture_commits() else {
        return;
    };
    assert!(
        commits.len() >= 100,
        "{} commits with prevData",
        commits.len()
    );
    for (i, commit) in commits.iter().enumerate() {
        let car = CarBlocks::parse(&commit.blocks).unwrap();
        assert_eq!(
            invert_commit(commit, &car),
            Ok(commit.prev_data.unwrap()),
            "commit #{i}"
        );
    }
}

/// CPU time of this thread, in seconds (wall time on a shared machine counts other processes).
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best of five batches: CPU µs per call of `f`.
fn best_us(calls_per_batch: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = thread_cpu_secs();
            f();
            (thread_cpu_secs() - start) * 1e6 / calls_per_batch as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Timing of load + inversion (run with `--release -- --ignored --nocapture`).
#[test]
#[ignore]
fn timing_load_and_invert() {
    let Some(cases) = proof_cases() else { return };
    let proofs: Vec<HashMap<Cid, Vec<u8>>> = cases
        .iter()
        .map(|c| {
            let mut t = build(&c.keys, c.leaf);
            for k in &c.adds {
                t.insert(k.as_bytes(), c.leaf).unwrap();
            }
            for k in &c.dels {
                t.remove(k.as_bytes()).unwrap();
            }
            let all = blocks_of(&mut t);
            c.proof.iter().map(|p| (*p, all[p].clone())).collect()
        })
        .collect();
    let rounds = 5_000;
    let per = best_us(rounds * cases.len(), || {
        for _ in 0..rounds {
            for (c, p) in cases.iter().zip(&proofs) {
                assert_eq!(invert_case(c, p), Ok(c.before));
            }
        }
    });
    println!("interop commit proofs: {per:.2} us per load+invert");

    let Some(commits) = capture_commits() else {
        return;
    };
    let cars: Vec<CarBlocks<'_>> = commits
        .iter()
        .map(|c| CarBlocks::parse(&c.blocks).unwrap())
        .collect();
    let heads: Vec<Cid> = cars
        .iter()
        .map(|car| {
            serde_ipld_dagcbor::from_slice::<CommitBlock>(car.get(&car.roots[0]).unwrap())
                .unwrap()
                .data
        })
        .collect();
    let rounds = 500;
    let calls = rounds * commits.len();
    let hash = best_us(calls, || {
        for _ in 0..rounds {
            for car in &cars {
                for (c, b) in car.iter() {
                    std::hint::black_box(cbor::verify_block(c, b).is_ok());
                }
            }
        }
    });
    let load = best_us(calls, || {
        for _ in 0..rounds {
            for (car, h) in cars.iter().zip(&heads) {
                std::hint::black_box(Tree::load(*h, car).unwrap());
            }
        }
    });
    let full = best_us(calls, || {
        for _ in 0..rounds {
            for (c, car) in commits.iter().zip(&cars) {
                assert_eq!(invert_commit(c, car), Ok(c.prev_data.unwrap()));
            }
        }
    });
    let ops: usize = commits.iter().map(|c| c.ops.len()).sum();
    let blocks: usize = cars.iter().map(|c| c.len()).sum();
    let n = commits.len() as f64;
    println!(
        "relay commits ({} commits, {:.2} ops and {:.1} CAR blocks each): \
         hash-check of all blocks {hash:.2} us, Tree::load {load:.2} us, load+invert+root {full:.2} us",
        commits.len(),
        ops as f64 / n,
        blocks as f64 / n,
    );
    let per = best_us(100_000, || {
        for i in 0..100_000u32 {
            std::hint::black_box(key_height(&i.to_le_bytes()));
        }
    });
    println!("key_height: {:.0} ns", per * 1000.0);
}

// ---------------------------------------------------------------------------------------------
// Hostile nodes

fn node(left: Option<Cid>, entries: &[(&[u8], u64, Option<Cid>)]) -> Vec<u8> {
    encode_node(&NodeData {
        left,
        entries: entries
            .iter()
            .map(|(k, p, t)| EntryData {
                key_suffix: k.to_vec(),
                prefix_len: *p,
                right: *t,
                value: cid(CID1),
            })
            .collect(),
    })
}

/// Stores `bytes` under its own CID.
fn put(blocks: &mut HashMap<Cid, Vec<u8>>, bytes: Vec<u8>) -> Cid {
    let c = cbor::cid_for_dag_cbor(&bytes);
    blocks.insert(c, bytes);
    c
}

/// Both entry points reject the tree at `root` with `err`.
fn rejects(root: Cid, blocks: &HashMap<Cid, Vec<u8>>, err: MstError) {
    assert_eq!(Tree::load(root, blocks).unwrap_err(), err, "load");
    assert_eq!(walked(root, blocks).unwrap_err(), err, "walk");
}

/// First key `{prefix}{n}` (n = 0, 1, ...) of the given height.
fn key_of_height(prefix: &str, height: u32) -> String {
    (0u64..)
        .map(|n| format!("{prefix}{n}"))
        .find(|k| key_height(k.as_bytes()) == height)
        .unwrap()
}

#[test]
fn hostile_nodes_are_rejected_with_reasons() {
    let mut b = HashMap::new();
    let blue = b"blue"; // height 1
    assert_eq!(key_height(b"asdf"), 0);
    assert_eq!(key_height(blue), 1);

    let r = put(&mut b, node(None, &[(b"b", 0, None), (b"a", 0, None)]));
    rejects(r, &b, MstError::KeyOrder);
    // A duplicate: "a", then the first byte of "a" and nothing more.
    let r = put(&mut b, node(None, &[(b"a", 0, None), (b"", 1, None)]));
    rejects(r, &b, MstError::KeyOrder);
    let r = put(&mut b, node(None, &[(b"asdf", 0, None), (blue, 0, None)]));
    rejects(r, &b, MstError::HeightMismatch);
    let r = put(&mut b, node(None, &[(b"a", 0, None), (b"b", 5, None)]));
    rejects(
        r,
        &b,
        MstError::BadKey("prefix longer than the previous key"),
    );
    let r = put(
        &mut b,
        node(None, &[(b"a", 0, None), (b"b", u64::MAX, None)]),
    );
    rejects(
        r,
        &b,
        MstError::BadKey("prefix longer than the previous key"),
    );
    let r = put(&mut b, node(None, &[(b"x", 3, None)]));
    rejects(
        r,
        &b,
        MstError::BadKey("prefix longer than the previous key"),
    );
    let r = put(&mut b, node(None, &[(b"", 0, None)]));
    rejects(r, &b, MstError::BadKey("empty key"));
    let long = vec![b'a'; 1025];
    let r = put(&mut b, node(None, &[(&long, 0, None)]));
    rejects(r, &b, MstError::BadKey("key longer than MAX_KEY_LEN"));
    // "ab" then "ac" written with prefix 0: decodable, but not how any writer encodes it.
    let r = put(&mut b, node(None, &[(b"ab", 0, None), (b"ac", 0, None)]));
    rejects(r, &b, MstError::NonCanonical);

    // A height-0 node with a subtree; a child one level too high; an empty child; a bare top.
    let leaf = put(&mut b, node(None, &[(b"asdf", 0, None)]));
    let r = put(&mut b, node(Some(leaf), &[(b"asdf", 0, None)]));
    rejects(r, &b, MstError::HeightMismatch);
    let high = put(&mut b, node(None, &[(b"88bfafc7", 0, None)])); // height 2
    let r = put(&mut b, node(Some(high), &[(blue, 0, None)]));
    rejects(r, &b, MstError::HeightMismatch);
    let empty = put(&mut b, node(None, &[]));
    let r = put(&mut b, node(Some(empty), &[(blue, 0, None)]));
    rejects(r, &b, MstError::EmptyNode);
    let r = put(&mut b, node(Some(leaf), &[]));
    rejects(r, &b, MstError::EmptyNode);
    // A subtree whose keys are not between its neighbours; the same subtree linked twice.
    let z = key_of_height("z", 0);
    let zleaf = put(&mut b, node(None, &[(z.as_bytes(), 0, None)]));
    let r = put(&mut b, node(Some(zleaf), &[(blue, 0, None)]));
    rejects(r, &b, MstError::KeyOrder);
    let a0 = key_of_height("a", 0);
    let a1 = key_of_height("a", 1);
    let c1 = key_of_height("c", 1);
    assert!(a0 < a1, "{a0} {a1}");
    let aleaf = put(&mut b, node(None, &[(a0.as_bytes(), 0, None)]));
    let r = put(
        &mut b,
        node(
            Some(aleaf),
            &[(a1.as_bytes(), 0, Some(aleaf)), (c1.as_bytes(), 0, None)],
        ),
    );
    rejects(r, &b, MstError::KeyOrder);

    // An entry-less node over a missing block, linked from three slots: valid once, not thrice
    // (and not re-read per link).
    let (k1, k2, k3) = (
        key_of_height("p", 2),
        key_of_height("q", 2),
        key_of_height("r", 2),
    );
    let hollow = put(&mut b, node(Some(cbor::cid_for_dag_cbor(b"absent")), &[]));
    let once = put(&mut b, node(None, &[(k1.as_bytes(), 0, Some(hollow))]));
    assert!(Tree::load(once, &b).is_ok());
    let r = put(
        &mut b,
        node(
            None,
            &[
                (k1.as_bytes(), 0, Some(hollow)),
                (k2.as_bytes(), 0, Some(hollow)),
                (k3.as_bytes(), 0, Some(hollow)),
            ],
        ),
    );
    assert_eq!(Tree::load(r, &b).unwrap_err(), MstError::KeyOrder);
    assert!(matches!(walked(r, &b), Err(MstError::MissingBlock(_))));

    // Bytes that are not a node at all.
    let garbage: [&[u8]; 5] = [b"", b"\xff\x00garbage", b"\xa0", b"\x80", &[0x81; 100_000]];
    for g in garbage {
        let r = put(&mut b, g.to_vec());
        let err = Tree::load(r, &b).unwrap_err();
        assert_eq!(err.reason(), "bad_node", "{err}");
        assert_eq!(walked(r, &b).unwrap_err().reason(), "bad_node");
    }
    // Values must be links; fields are exactly e/l and k/p/t/v.
    let ipld_node = |entry: Vec<(&str, Ipld)>, extra: Option<(&str, Ipld)>| {
        let mut e = BTreeMap::new();
        for (k, v) in entry {
            e.insert(k.to_owned(), v);
        }
        let mut m = BTreeMap::new();
        m.insert("e".to_owned(), Ipld::List(vec![Ipld::Map(e)]));
        m.insert("l".to_owned(), Ipld::Null);
        if let Some((k, v)) = extra {
            m.insert(k.to_owned(), v);
        }
        cbor::encode_ipld(&Ipld::Map(m)).unwrap()
    };
    let full = |v: Ipld| {
        vec![
            ("k", Ipld::Bytes(b"asdf".to_vec())),
            ("p", Ipld::Integer(0)),
            ("t", Ipld::Null),
            ("v", v),
        ]
    };
    let ok = put(&mut b, ipld_node(full(Ipld::Link(cid(CID1))), None));
    assert_eq!(walked(ok, &b).unwrap(), vec![(b"asdf".to_vec(), cid(CID1))]);
    let r = put(&mut b, ipld_node(full(Ipld::Integer(5)), None));
    assert_eq!(Tree::load(r, &b).unwrap_err().reason(), "bad_node");
    let r = put(&mut b, ipld_node(full(Ipld::String(CID1.into())), None));
    assert_eq!(Tree::load(r, &b).unwrap_err().reason(), "bad_node");
    let r = put(
        &mut b,
        ipld_node(full(Ipld::Link(cid(CID1))), Some(("x", Ipld::Null))),
    );
    assert_eq!(Tree::load(r, &b).unwrap_err().reason(), "bad_node");
    let mut no_t = full(Ipld::Link(cid(CID1)));
    no_t.retain(|(k, _)| *k != "t");
    let r = put(&mut b, ipld_node(no_t, None));
    assert_eq!(Tree::load(r, &b).unwrap_err(), MstError::NonCanonical);
    let mut wide = ipld_node(full(Ipld::Link(cid(CID1))), None);
    // p = 0 written as a one-byte-argument integer (0x18 0x00) instead of 0x00
    let at = wide
        .windows(3)
        .position(|w| w == [0x61, b'p', 0x00])
        .unwrap();
    wide.splice(at + 2..at + 3, [0x18, 0x00]);
    let r = put(&mut b, wide);
    assert_eq!(
        Tree::load(r, &b).unwrap_err().reason(),
        "non_canonical_node"
    );

    // Links: a block under someone else's CID, a non-DAG-CBOR root, a raw-codec child link.
    let leaf_bytes = b[&leaf].clone();
    let wrong = cbor::cid_for_dag_cbor(b"other");
    b.insert(wrong, leaf_bytes);
    rejects(wrong, &b, MstError::HashMismatch(wrong));
    let raw = Cid::new_v1(cbor::RAW, *leaf.hash());
    b.insert(raw, b[&leaf].clone());
    rejects(raw, &b, MstError::BadLink(raw));
    let r = put(&mut b, node(Some(raw), &[(blue, 0, None)]));
    rejects(r, &b, MstError::BadLink(raw));

    // Tree operations validate keys.
    let mut t = Tree::empty();
    assert_eq!(t.insert(b"", cid(CID1)).unwrap_err().reason(), "bad_key");
    assert_eq!(t.insert(&long, cid(CID1)).unwrap_err().reason(), "bad_key");
    assert_eq!(t.remove(b"").unwrap_err().reason(), "bad_key");
    assert_eq!(t.get(&long).unwrap_err().reason(), "bad_key");
}

#[test]
fn chains_of_empty_nodes_are_bounded_by_the_root_height() {
    let top = key_of_height("top", 5);
    let bottom = key_of_height("a", 0);
    assert!(bottom < top);
    let mut b = HashMap::new();
    // Valid: a height-5 root over four empty intermediate nodes over a height-0 leaf.
    let mut link = put(&mut b, node(None, &[(bottom.as_bytes(), 0, None)]));
    for _ in 0..4 {
        link = put(&mut b, node(Some(link), &[]));
    }
    let root = put(&mut b, node(Some(link), &[(top.as_bytes(), 0, None)]));
    let mut t = Tree::load(root, &b).unwrap();
    assert_eq!(t.height(), 5);
    assert_eq!(t.root_cid().unwrap(), root);
    assert_eq!(t.get(bottom.as_bytes()).unwrap(), Some(cid(CID1)));
    assert_eq!(walked(root, &b).unwrap().len(), 2);
    // The same shape is what inserting the two keys builds.
    assert_eq!(build(&[&top, &bottom], cid(CID1)).root_cid().unwrap(), root);
    // Too long: a chain of 10,000 empty nodes is rejected once it passes height 0, whatever its
    // length (recursion depth is the root height, not the chain length).
    let mut link = put(&mut b, node(None, &[(bottom.as_bytes(), 0, None)]));
    for _ in 0..10_000 {
        link = put(&mut b, node(Some(link), &[]));
    }
    let root = put(&mut b, node(Some(link), &[(top.as_bytes(), 0, None)]));
    rejects(root, &b, MstError::HeightMismatch);
    // Too short: the leaf sits at height 1, where its key does not belong.
    let mut link = put(&mut b, node(None, &[(bottom.as_bytes(), 0, None)]));
    for _ in 0..3 {
        link = put(&mut b, node(Some(link), &[]));
    }
    let root = put(&mut b, node(Some(link), &[(top.as_bytes(), 0, None)]));
    rejects(root, &b, MstError::HeightMismatch);
}

#[test]
fn stubs_make_lookups_and_edits_fail_without_changing_the_tree() {
    let keys: Vec<String> = (0..200)
        .map(|i| format!("app.bsky.feed.post/k{i:04}"))
        .collect();
    let mut full = build(&keys, cid(CID1));
    let root = full.root_cid().unwrap();
    let mut blocks = blocks_of(&mut full);
    assert!(blocks.len() > 10);
    // Keep only the root block: everything below is a stub.
    blocks.retain(|c, _| *c == root);
    let mut t = Tree::load(root, &blocks).unwrap();
    assert_eq!(t.root_cid().unwrap(), root);
    assert!(matches!(
        walked(root, &blocks),
        Err(MstError::MissingBlock(_))
    ));
    assert!(matches!(t.node_blocks(), Err(MstError::MissingBlock(_))));
    let mut missing = 0;
    for k in &keys {
        let kb = k.as_bytes();
        match t.get(kb) {
            Ok(v) => assert_eq!(v, Some(cid(CID1))), // a key in the root node itself
            Err(e) => {
                assert!(matches!(e, MstError::MissingBlock(_)));
                missing += 1;
                assert!(matches!(t.remove(kb), Err(MstError::MissingBlock(_))));
                assert!(matches!(
                    t.insert(kb, value_for(kb)),
                    Err(MstError::MissingBlock(_))
                ));
                assert_eq!(t.root_cid().unwrap(), root, "failed edit changed the tree");
            }
        }
    }
    assert!(missing > 100);
}

// ---------------------------------------------------------------------------------------------
// Properties

fn repo_key() -> impl Strategy<Value = String> {
    // TID-like record keys, and some long ones (keys over 62 bytes are stored differently).
    proptest::string::string_regex(
        "(app\\.bsky\\.feed\\.post|app\\.bsky\\.feed\\.like|com\\.example\\.x)/([a-z2-7]{1,13}|[a-zA-Z0-9:~._-]{30,60})",
    )
    .unwrap()
}

fn key_set(max: usize) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::btree_set(repo_key(), 0..max).prop_map(|s| s.into_iter().collect())
}

fn build_valued(keys: &[String]) -> Tree {
    let mut t = Tree::empty();
    for k in keys {
        t.insert(k.as_bytes(), value_for(k.as_bytes())).unwrap();
    }
    t
}

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Update(String),
    Delete(String),
}

/// A before-key set and a commit against it: creates of new keys, updates and deletes of
/// existing ones (each key touched once), in a random order.
fn commit_case() -> impl Strategy<Value = (Vec<String>, Vec<Op>)> {
    (key_set(150), key_set(12)).prop_flat_map(|(before, extra)| {
        let n = before.len();
        let picks = proptest::collection::vec((0..n.max(1), any::<bool>()), 0..8.min(n + 1));
        (Just(before), Just(extra), picks).prop_flat_map(|(before, extra, picks)| {
            let existing: BTreeSet<&String> = before.iter().collect();
            let mut used = BTreeSet::new();
            let mut ops = Vec::new();
            for k in extra.iter().filter(|k| !existing.contains(k)) {
                ops.push(Op::Create(k.clone()));
            }
            for (i, update) in picks {
                if let Some(k) = before.get(i) {
                    if used.insert(k.clone()) {
                        ops.push(if update {
                            Op::Update(k.clone())
                        } else {
                            Op::Delete(k.clone())
                        });
                    }
                }
            }
            (Just(before), Just(ops).prop_shuffle())
        })
    })
}

fn new_value(key: &str) -> Cid {
    value_for(format!("{key}#v2").as_bytes())
}

/// Applies `ops` to `t`, checking what each op reports.
fn apply(t: &mut Tree, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Create(k) => assert_eq!(t.insert(k.as_bytes(), new_value(k)).unwrap(), None),
            Op::Update(k) => assert_eq!(
                t.insert(k.as_bytes(), new_value(k)).unwrap(),
                Some(value_for(k.as_bytes()))
            ),
            Op::Delete(k) => assert_eq!(
                t.remove(k.as_bytes()).unwrap(),
                Some(value_for(k.as_bytes()))
            ),
        }
    }
}

/// Undoes `ops` in reverse order on a tree loaded from `blocks`.
fn invert<B: BlockSource>(root: Cid, blocks: &B, ops: &[Op]) -> Result<Cid, MstError> {
    let mut t = Tree::load(root, blocks)?;
    for op in ops.iter().rev() {
        let before = t.root_cid()?;
        let r = match op {
            Op::Create(k) => t
                .remove(k.as_bytes())
                .map(|p| assert_eq!(p, Some(new_value(k)))),
            Op::Update(k) => t
                .insert(k.as_bytes(), value_for(k.as_bytes()))
                .map(|p| assert_eq!(p, Some(new_value(k)))),
            Op::Delete(k) => t
                .insert(k.as_bytes(), value_for(k.as_bytes()))
                .map(|p| assert_eq!(p, None)),
        };
        if let Err(e) = r {
            assert_eq!(
                t.root_cid()?,
                before,
                "a failed op must not change the tree"
            );
            return Err(e);
        }
    }
    t.root_cid()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn insertion_order_does_not_change_the_root(
        (keys, shuffled) in key_set(300).prop_flat_map(|k| (Just(k.clone()), Just(k).prop_shuffle()))
    ) {
        let mut sorted = build_valued(&keys);
        let mut random = build_valued(&shuffled);
        let root = sorted.root_cid().unwrap();
        prop_assert_eq!(random.root_cid().unwrap(), root);
        // The walk yields exactly the key set, in order, and every node reloads.
        let blocks = blocks_of(&mut random);
        let expected: Vec<(Vec<u8>, Cid)> =
            keys.iter().map(|k| (k.as_bytes().to_vec(), value_for(k.as_bytes()))).collect();
        prop_assert_eq!(walked(root, &blocks).unwrap(), expected);
        let mut loaded = Tree::load(root, &blocks).unwrap();
        prop_assert_eq!(loaded.root_cid().unwrap(), root);
        prop_assert_eq!(loaded.height(), sorted.height());
    }

    #[test]
    fn insert_then_remove_restores_the_root(
        (base, extra) in (key_set(200), key_set(40))
            .prop_flat_map(|(b, e)| (Just(b), Just(e).prop_shuffle()))
    ) {
        let mut t = build_valued(&base);
        let root = t.root_cid().unwrap();
        let fresh: Vec<&String> = extra.iter().filter(|k| !base.contains(k)).collect();
        for k in &fresh {
            prop_assert_eq!(t.insert(k.as_bytes(), cid(CID1)).unwrap(), None);
        }
        if !fresh.is_empty() {
            prop_assert_ne!(t.root_cid().unwrap(), root);
        }
        for k in fresh.iter().rev() {
            prop_assert_eq!(t.remove(k.as_bytes()).unwrap(), Some(cid(CID1)));
        }
        prop_assert_eq!(t.root_cid().unwrap(), root);
        // The other way round: remove some base keys, put them back.
        for k in base.iter().step_by(3) {
            t.remove(k.as_bytes()).unwrap();
        }
        for k in base.iter().step_by(3) {
            t.insert(k.as_bytes(), value_for(k.as_bytes())).unwrap();
        }
        prop_assert_eq!(t.root_cid().unwrap(), root);
    }

    #[test]
    fn inverting_a_commit_restores_the_previous_root((before, ops) in commit_case()) {
        let mut t0 = build_valued(&before);
        let root0 = t0.root_cid().unwrap();
        let blocks0 = blocks_of(&mut t0);
        let mut t1 = t0.clone();
        apply(&mut t1, &ops);
        let root1 = t1.root_cid().unwrap();
        let blocks1 = blocks_of(&mut t1);
        // With every after-tree block.
        prop_assert_eq!(invert(root1, &blocks1, &ops), Ok(root0));
        // With only the blocks the commit created (what a diff without proof carries):
        // either the right root or a MissingBlock, never a wrong root.
        if root1 != root0 {
            let diff: HashMap<Cid, Vec<u8>> = blocks1
                .iter()
                .filter(|(c, _)| !blocks0.contains_key(c))
                .map(|(c, b)| (*c, b.clone()))
                .collect();
            match invert(root1, &diff, &ops) {
                Ok(root) => prop_assert_eq!(root, root0),
                Err(e) => prop_assert!(matches!(e, MstError::MissingBlock(_)), "{e}"),
            }
        }
    }

    #[test]
    fn node_encoding_matches_serde(
        left in proptest::option::of(any::<[u8; 8]>()),
        entries in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..40), any::<u64>(), proptest::option::of(any::<[u8; 8]>()), any::<[u8; 8]>()),
            0..20,
        ),
    ) {
        let c = |seed: [u8; 8]| cbor::cid_for_dag_cbor(&seed);
        let nd = NodeData {
            left: left.map(c),
            entries: entries
                .into_iter()
                .map(|(k, p, t, v)| EntryData { key_suffix: k, prefix_len: p, right: t.map(c), value: c(v) })
                .collect(),
        };
        let bytes = encode_node(&nd);
        prop_assert_eq!(&bytes, &serde_ipld_dagcbor::to_vec(&nd).unwrap());
        prop_assert_eq!(decode_node(&bytes).unwrap(), nd);
    }

    /// The strict decoder accepts exactly what the general decoder reads and re-encodes to the
    /// same bytes, on mutations of valid nodes.
    #[test]
    fn strict_decoding_agrees_with_serde_on_mutations(
        seed in key_set(12),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let mut t = build_valued(&seed);
        let mut bytes = t.node_blocks().unwrap().swap_remove(0).1;
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        let general = serde_ipld_dagcbor::from_slice::<NodeData>(&bytes).ok();
        let canonical = general.as_ref().is_some_and(|nd| encode_node(nd) == bytes);
        match decode_node(&bytes) {
            Ok(nd) => {
                prop_assert!(canonical);
                prop_assert_eq!(Some(nd), general);
            }
            Err(MstError::NonCanonical) => prop_assert!(general.is_some() && !canonical),
            Err(e) => {
                prop_assert_eq!(e.reason(), "bad_node");
                prop_assert!(general.is_none());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut b = HashMap::new();
        let r = put(&mut b, bytes.clone());
        let _ = Tree::load(r, &b);
        let _ = walked(r, &b);
        let _ = decode_node(&bytes);
    }
}
