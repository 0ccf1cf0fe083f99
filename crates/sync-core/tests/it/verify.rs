//! Commit verification against data we did not write: every commit of the real relay capture with
//! the DID documents that sign it, tampered variants of one real commit (each must fail with its
//! own reason), `#sync` built from a real signed commit, indigo's edge-case commits, the chain
//! check, and indigo's relay scenarios compared message by message.

use std::collections::{BTreeMap, HashMap};

use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use sync_core::cbor;
use sync_core::chain::{check_commit, check_sync, ChainState, ChainVerdict, Gap};
use sync_core::crypto::PublicKey;
use sync_core::did_doc::parse_did_doc_map;
use sync_core::frame::{capture_frames, decode_frame, Event, SyncEvent};
use sync_core::ids::{Did, Seq, Tid};
use sync_core::validate::{Decision, DropReason, StreamValidator};
use sync_core::verify::{
    prove_ops, rev_is_plausible, verify_commit, verify_sync, Inversion, SignedCommit,
    VerifiedCommit, VerifyOptions,
};

use crate::fixtures;

pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

pub fn capture(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(dir.join("relay-capture/frames.bin")).unwrap();
    capture_frames(&data).map(|f| f.unwrap().to_vec()).collect()
}

pub fn capture_keys(dir: &std::path::Path) -> HashMap<Did, PublicKey> {
    let text = std::fs::read_to_string(dir.join("relay-capture/did_docs.json")).unwrap();
    parse_did_doc_map(&text)
        .unwrap()
        .into_iter()
        .map(|(did, identity)| (did, identity.unwrap().signing_key))
        .collect()
}

/// A frame taken apart for editing: header and body as IPLD, the body's CAR as roots + blocks.
#[derive(Clone)]
pub struct Editable {
    header: Ipld,
    pub body: BTreeMap<String, Ipld>,
    pub roots: Vec<Cid>,
    pub blocks: Vec<(Cid, Vec<u8>)>,
}

pub fn build_car(roots: &[Cid], blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    sync_core::synth::car_with_roots(roots, blocks)
}

impl Editable {
    pub fn from_frame(frame: &[u8]) -> Editable {
        let header_end = cbor::skip_item(frame, 0).unwrap();
        let header: Ipld = serde_ipld_dagcbor::from_slice(&frame[..header_end]).unwrap();
        let Ipld::Map(body) = serde_ipld_dagcbor::from_slice(&frame[header_end..]).unwrap() else {
            panic!("body is a map")
        };
        let Some(Ipld::Bytes(car)) = body.get("blocks") else {
            panic!("frame has blocks")
        };
        let parsed = sync_core::car::CarBlocks::parse(car).unwrap();
        let roots = parsed.roots.clone();
        let blocks = parsed.iter().map(|(c, d)| (*c, d.to_vec())).collect();
        Editable {
            header,
            body,
            roots,
            blocks,
        }
    }

    pub fn to_frame(&self) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert(
            "blocks".into(),
            Ipld::Bytes(build_car(&self.roots, &self.blocks)),
        );
        let mut out = serde_ipld_dagcbor::to_vec(&self.header).unwrap();
        out.extend(serde_ipld_dagcbor::to_vec(&Ipld::Map(body)).unwrap());
        out
    }

    fn block(&self, cid: &Cid) -> &[u8] {
        &self.blocks.iter().find(|(c, _)| c == cid).unwrap().1
    }

    fn replace_block(&mut self, old: &Cid, bytes: Vec<u8>) -> Cid {
        let cid = cbor::cid_for_dag_cbor(&bytes);
        for entry in &mut self.blocks {
            if entry.0 == *old {
                *entry = (cid, bytes.clone());
            }
        }
        cid
    }

    pub fn commit_cid(&self) -> Cid {
        match &self.body["commit"] {
            Ipld::Link(c) => *c,
            other => panic!("commit is a link, got {other:?}"),
        }
    }

    /// The signed commit object as an IPLD map.
    pub fn commit_object(&self) -> BTreeMap<String, Ipld> {
        let Ipld::Map(m) = serde_ipld_dagcbor::from_slice(self.block(&self.commit_cid())).unwrap()
        else {
            panic!("commit object is a map")
        };
        m
    }

    /// Replaces the signed commit object (new CID in the CAR root, the block list and the
    /// envelope's `commit`).
    pub fn set_commit_object(&mut self, object: BTreeMap<String, Ipld>) {
        let bytes = serde_ipld_dagcbor::to_vec(&Ipld::Map(object)).unwrap();
        let old = self.commit_cid();
        let cid = self.replace_block(&old, bytes);
        self.roots = vec![cid];
        self.body.insert("commit".into(), Ipld::Link(cid));
    }

    pub fn ops(&self) -> Vec<BTreeMap<String, Ipld>> {
        let Ipld::List(ops) = &self.body["ops"] else {
            panic!("ops is a list")
        };
        ops.iter()
            .map(|op| match op {
                Ipld::Map(m) => m.clone(),
                _ => panic!("op is a map"),
            })
            .collect()
    }

    pub fn set_ops(&mut self, ops: Vec<BTreeMap<String, Ipld>>) {
        self.body.insert(
            "ops".into(),
            Ipld::List(ops.into_iter().map(Ipld::Map).collect()),
        );
    }
}

fn reason_of(frame: &[u8], key: &PublicKey, opts: &VerifyOptions) -> Result<Inversion, String> {
    let Event::Commit(commit) = decode_frame(frame).unwrap() else {
        panic!("a commit frame")
    };
    verify_commit(&commit, key, opts)
        .map(|v| v.inversion)
        .map_err(|e| e.reason().to_string())
}

#[test]
fn every_commit_of_the_relay_capture_verifies_with_its_did_document() {
    let Some(dir) = fixtures() else { return };
    let keys = capture_keys(&dir);
    let opts = VerifyOptions::at(now_micros());
    let mut proven = 0;
    for frame in capture(&dir) {
        let Event::Commit(commit) = decode_frame(&frame).unwrap() else {
            continue;
        };
        let key = &keys[&commit.repo];
        let verified = verify_commit(&commit, key, &opts)
            .unwrap_or_else(|e| panic!("seq {}: {e} ({})", commit.seq, e.reason()));
        assert_eq!(verified.inversion, Inversion::Proven, "seq {}", commit.seq);
        assert_eq!(verified.commit.did, commit.repo);
        assert_eq!(verified.commit.rev, commit.rev);
        assert_eq!(verified.commit.cid, commit.commit);
        assert_eq!(verified.prev_data, commit.prev_data);
        proven += 1;
    }
    assert_eq!(proven, 148, "the manifest's commit_frames");
}

/// The benchmark stream (`bench-writer --signed`): the capture looped with repos renamed and
/// every commit re-signed for its new repo verifies with the documents the looped capture writes,
/// and each renamed repo's commits chain (`since`) from one to the next.
#[test]
fn a_signed_looped_capture_verifies_and_chains() {
    let Some(dir) = fixtures() else { return };
    let frames = capture(&dir);
    let raw: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let mut looped = sync_core::synth::LoopedCapture::new(&raw, 1).signed();
    let stream: Vec<Vec<u8>> = looped.by_ref().take(raw.len() * 2 + 7).collect();
    let docs = looped.did_documents("https://pds.example");
    let keys: HashMap<Did, PublicKey> = parse_did_doc_map(&docs.to_string())
        .unwrap()
        .into_iter()
        .map(|(did, id)| (did, id.unwrap().signing_key))
        .collect();
    let opts = VerifyOptions::at(now_micros());
    let mut held: HashMap<Did, ChainState> = HashMap::new();
    let mut verified = 0;
    for frame in &stream {
        let Ok(Event::Commit(commit)) = decode_frame(frame) else {
            continue;
        };
        let v = verify_commit(&commit, &keys[&commit.repo], &opts)
            .unwrap_or_else(|e| panic!("seq {}: {}", commit.seq, e.reason()));
        verified += 1;
        match check_commit(held.get(&commit.repo), &v, commit.since) {
            ChainVerdict::First | ChainVerdict::InOrder => {}
            other => panic!("seq {}: {other:?}", commit.seq),
        }
        held.insert(commit.repo.clone(), ChainState::after(&v.commit));
    }
    assert!(verified > 290, "{verified}");
    // Repos appear in every loop under another name: chaining happens within a loop.
    assert!(held.len() > 200, "{}", held.len());
}

/// The first commit of the capture with a create op, as an editable frame, with its key.
fn sample(dir: &std::path::Path) -> (Vec<u8>, Editable, PublicKey) {
    let keys = capture_keys(dir);
    for frame in capture(dir) {
        if let Ok(Event::Commit(c)) = decode_frame(&frame) {
            let has_create = c
                .ops
                .iter()
                .any(|op| op.as_ref().is_ok_and(|op| op.action.as_str() == "create"));
            if has_create && c.ops.len() == 1 {
                let key = keys[&c.repo].clone();
                return (frame.clone(), Editable::from_frame(&frame), key);
            }
        }
    }
    panic!("the capture has a one-op create commit")
}

/// secp256k1's group order n, big-endian: a low-S signature's `s` becomes high-S as `n - s`.
const SECP256K1_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
];

fn n_minus(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(SECP256K1_N[i]) - i16::from(s[i]) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        out[i] = d as u8;
    }
    out
}

fn sign_with_other_key(unsigned: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let secp = secp256k1::Secp256k1::signing_only();
    let secret = secp256k1::SecretKey::from_slice(&[7u8; 32]).unwrap();
    let digest: [u8; 32] = sha2::Sha256::digest(unsigned).into();
    let msg = secp256k1::Message::from_digest(digest);
    secp.sign_ecdsa(&msg, &secret).serialize_compact().to_vec()
}

#[test]
fn each_tampered_variant_of_a_real_commit_fails_with_its_own_reason() {
    let Some(dir) = fixtures() else { return };
    let (original, editable, key) = sample(&dir);
    let opts = VerifyOptions::at(now_micros());
    assert_eq!(reason_of(&original, &key, &opts), Ok(Inversion::Proven));
    // Re-encoding without changes must give the same bytes, or the edits below would test our
    // encoder instead of the verifier.
    assert_eq!(
        serde_ipld_dagcbor::to_vec(&Ipld::Map(editable.commit_object())).unwrap(),
        editable.block(&editable.commit_cid())
    );
    assert_eq!(
        reason_of(&editable.to_frame(), &key, &opts),
        Ok(Inversion::Proven)
    );

    let sig_of = |e: &Editable| match &e.commit_object()["sig"] {
        Ipld::Bytes(b) => b.clone(),
        _ => panic!("sig is bytes"),
    };
    let with_sig = |sig: Vec<u8>| {
        let mut e = editable.clone();
        let mut object = e.commit_object();
        object.insert("sig".into(), Ipld::Bytes(sig));
        e.set_commit_object(object);
        e.to_frame()
    };

    // A flipped signature byte.
    let mut sig = sig_of(&editable);
    sig[10] ^= 0x01;
    assert_eq!(
        reason_of(&with_sig(sig), &key, &opts),
        Err("bad_signature".into())
    );

    // A valid signature, by another key.
    let mut unsigned = editable.commit_object();
    unsigned.remove("sig");
    let unsigned = serde_ipld_dagcbor::to_vec(&Ipld::Map(unsigned)).unwrap();
    assert_eq!(
        reason_of(&with_sig(sign_with_other_key(&unsigned)), &key, &opts),
        Err("bad_signature".into())
    );

    // The same signature with S replaced by n - S (valid ECDSA, but high-S).
    let sig = sig_of(&editable);
    let mut high = sig[..32].to_vec();
    high.extend(n_minus(&sig[32..]));
    assert_eq!(
        reason_of(&with_sig(high), &key, &opts),
        Err("high_s_signature".into())
    );

    // A record replaced, its CID recomputed (op and block agree; the signed tree does not).
    let mut e = editable.clone();
    let mut ops = e.ops();
    let Some(Ipld::Link(record_cid)) = ops[0].get("cid").cloned() else {
        panic!("create op has a cid")
    };
    let Ipld::Map(mut record) = serde_ipld_dagcbor::from_slice(e.block(&record_cid)).unwrap()
    else {
        panic!("record is a map")
    };
    record.insert("forged".into(), Ipld::String("by a relay".into()));
    let new_cid = e.replace_block(
        &record_cid,
        serde_ipld_dagcbor::to_vec(&Ipld::Map(record)).unwrap(),
    );
    ops[0].insert("cid".into(), Ipld::Link(new_cid));
    e.set_ops(ops);
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("op_mismatch".into())
    );

    // An op removed from the list.
    let mut e = editable.clone();
    e.set_ops(Vec::new());
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("inversion_mismatch".into())
    );

    // prevData changed.
    let mut e = editable.clone();
    e.body.insert(
        "prevData".into(),
        Ipld::Link(cbor::cid_for_dag_cbor(b"\xa0")),
    );
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("inversion_mismatch".into())
    );

    // The envelope names another DID than the signed commit.
    let mut e = editable.clone();
    e.body.insert(
        "repo".into(),
        Ipld::String("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".into()),
    );
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("did_mismatch".into())
    );

    // The envelope names another rev than the signed commit.
    let mut e = editable.clone();
    e.body
        .insert("rev".into(), Ipld::String("2222222222222".into()));
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("rev_mismatch".into())
    );

    // A rev more than five minutes ahead of the verifier's clock; four minutes is tolerated.
    let Event::Commit(c) = decode_frame(&original).unwrap() else {
        unreachable!()
    };
    let rev_time = c.rev.timestamp_micros();
    let early = VerifyOptions::at(rev_time - 6 * 60 * 1_000_000);
    assert_eq!(reason_of(&original, &key, &early), Err("future_rev".into()));
    assert!(!rev_is_plausible(&c.rev, &early));
    let close = VerifyOptions::at(rev_time - 4 * 60 * 1_000_000);
    assert_eq!(reason_of(&original, &key, &close), Ok(Inversion::Proven));

    // A commit block missing from the CAR; a CAR whose root is not the commit.
    let mut e = editable.clone();
    let commit_cid = e.commit_cid();
    e.blocks.retain(|(c, _)| *c != commit_cid);
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("missing_commit_block".into())
    );
    let mut e = editable.clone();
    e.roots = vec![record_cid];
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("car_root_mismatch".into())
    );

    // MST nodes missing: only the commit and the record remain.
    let mut e = editable.clone();
    e.blocks
        .retain(|(c, _)| *c == commit_cid || *c == record_cid);
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("missing_blocks".into())
    );

    // The record block missing.
    let mut e = editable.clone();
    e.blocks.retain(|(c, _)| *c != record_cid);
    assert_eq!(
        reason_of(&e.to_frame(), &key, &opts),
        Err("missing_record_block".into())
    );

    // Without prevData the commit is legacy: reported as such, not as a failure.
    let mut e = editable.clone();
    e.body.remove("prevData");
    assert_eq!(reason_of(&e.to_frame(), &key, &opts), Ok(Inversion::Legacy));
}

#[test]
fn a_sync_event_verifies_its_signed_commit() {
    let Some(dir) = fixtures() else { return };
    let (_, editable, key) = sample(&dir);
    let opts = VerifyOptions::at(now_micros());
    let commit_cid = editable.commit_cid();
    let object = editable.commit_object();
    let (Ipld::String(did), Ipld::String(rev)) = (&object["did"], &object["rev"]) else {
        panic!("did and rev are strings")
    };
    let sync = |blocks: Vec<u8>, rev: &str| SyncEvent {
        seq: Seq(1),
        did: Did::parse(did).unwrap(),
        rev: Tid::parse(rev).unwrap(),
        time: "2026-07-04T14:39:14Z".into(),
        blocks,
    };
    let car = build_car(
        &[commit_cid],
        &[(commit_cid, editable.block(&commit_cid).to_vec())],
    );
    let signed = verify_sync(&sync(car.clone(), rev), &key, &opts).unwrap();
    let Ipld::Link(data) = object["data"] else {
        panic!("data is a link")
    };
    assert_eq!(signed.data, data);
    assert_eq!(signed.rev.as_str(), rev);
    assert_eq!(signed.cid, commit_cid);

    let err = |e: sync_core::verify::VerifyError| e.reason();
    assert_eq!(
        verify_sync(&sync(car.clone(), "2222222222222"), &key, &opts).map_err(err),
        Err("rev_mismatch")
    );
    let empty = build_car(&[commit_cid], &[]);
    assert_eq!(
        verify_sync(&sync(empty, rev), &key, &opts).map_err(err),
        Err("missing_commit_block")
    );
    let other_key = capture_keys(&dir)
        .into_values()
        .find(|k| *k != key)
        .unwrap();
    assert_eq!(
        verify_sync(&sync(car, rev), &other_key, &opts).map_err(err),
        Err("bad_signature")
    );
}

#[test]
fn indigo_edge_case_commits_invert() {
    let Some(dir) = fixtures() else { return };
    // Real commits indigo keeps for MST edge cases (a trimmed top, partial nodes from a bridged
    // PDS, a 41-op commit). No DID documents come with them, so this checks the ops half: the
    // inversion from the signed `data` back to `prevData` (or legacy, without it).
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.join("indigo-commits")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let frame = crate::verify::json_frame("#commit", &json);
        let Event::Commit(commit) = decode_frame(&frame).unwrap() else {
            panic!("{} is a commit", path.display())
        };
        let e = Editable::from_frame(&frame);
        let Ipld::Link(data) = e.commit_object()["data"] else {
            panic!("data is a link")
        };
        // All four are legacy (no prevData): their creates must still be what the signed tree
        // holds, which needs the proof path of every op.
        assert_eq!(commit.prev_data, None);
        assert_eq!(
            prove_ops(&commit, &data),
            Ok(Inversion::Legacy),
            "{}",
            path.display()
        );
        // Inverting the creates (removing them) must either work or stop at a block the commit
        // did not carry (bridged PDSes sent too few); never another error. indigo keeps
        // 4623075231 as the case where removal must trim a partial top: it must work.
        let mut tree = sync_core::mst::Tree::load(data, &commit.blocks).unwrap();
        let mut removal = Ok(());
        for op in commit.ops.iter().rev() {
            let op = op.as_ref().unwrap();
            let key = format!("{}/{}", op.collection.as_str(), op.rkey.as_str());
            if let Err(e) = tree.remove(key.as_bytes()) {
                removal = Err(e);
                break;
            }
        }
        if removal.is_ok() {
            removal = tree.root_cid().map(|_| ());
        }
        if path.to_string_lossy().contains("4623075231") {
            assert_eq!(removal, Ok(()), "{}", path.display());
        } else if let Err(e) = removal {
            assert!(
                matches!(e, sync_core::mst::MstError::MissingBlock(_)),
                "{}: {e}",
                path.display()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// A frame from the JSON form of a message body (`$link`, `$bytes`), as indigo's fixtures hold.
pub fn json_frame(t: &str, body: &serde_json::Value) -> Vec<u8> {
    let header = serde_json::json!({"op": 1, "t": t});
    json_frame_with_header(&header, body)
}

pub fn json_frame_with_header(header: &serde_json::Value, body: &serde_json::Value) -> Vec<u8> {
    let mut out = cbor::encode_ipld(&cbor::json_to_ipld(header).unwrap()).unwrap();
    out.extend(cbor::encode_ipld(&cbor::json_to_ipld(body).unwrap()).unwrap());
    out
}

#[test]
fn indigo_relay_scenarios_accept_and_drop_message_by_message() {
    let Some(dir) = fixtures() else { return };
    let opts = VerifyOptions::at(now_micros());
    let mut scenarios = 0;
    let mut messages = 0;
    for entry in std::fs::read_dir(dir.join("indigo-commits/relay-scenarios")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let scenario: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut keys = HashMap::new();
        for account in scenario["accounts"].as_array().unwrap() {
            let identity = &account["identity"];
            let did = Did::parse(identity["did"].as_str().unwrap()).unwrap();
            let multikey = identity["keys"]["atproto"]["publicKeyMultibase"]
                .as_str()
                .unwrap();
            keys.insert(did, PublicKey::from_multikey(multikey).unwrap());
        }
        let mut validator = StreamValidator::new(scenario["lenient"].as_bool().unwrap());
        for (index, message) in scenario["messages"].as_array().unwrap().iter().enumerate() {
            let frame =
                json_frame_with_header(&message["frame"]["header"], &message["frame"]["body"]);
            // A frame that does not decode (rev_ordering's `3lmxjza3nva00` is not a TID) is
            // dropped by the decoder, before the validator sees it.
            let event = match decode_frame(&frame) {
                Ok(event) => event,
                Err(e) => {
                    assert!(
                        message["drop"].as_bool().unwrap(),
                        "{name} message {index}: {e}"
                    );
                    messages += 1;
                    continue;
                }
            };
            let did = match &event {
                Event::Commit(c) => Some(c.repo.clone()),
                Event::Sync(s) => Some(s.did.clone()),
                _ => None,
            };
            let key = did.as_ref().and_then(|d| keys.get(d));
            let account_did = match &event {
                Event::Account(a) => Some(a.did.clone()),
                _ => None,
            };
            let status_before = account_did
                .as_ref()
                .map(|d| validator.account(d).and_then(|v| v.inactive_status.clone()));
            let decision = validator.check(&event, key, &opts);
            let dropped = matches!(decision, Decision::Drop(_));
            assert_eq!(
                dropped,
                message["drop"].as_bool().unwrap(),
                "{name} message {index}: {decision:?}"
            );
            // `update`: whether the consumer's account state changes (an #account event that
            // moves the status); no scenario here is marked `invalid`.
            let status_after = account_did
                .as_ref()
                .map(|d| validator.account(d).and_then(|v| v.inactive_status.clone()));
            assert_eq!(
                status_before != status_after,
                message["update"].as_bool().unwrap(),
                "{name} message {index}: account status {status_before:?} -> {status_after:?}"
            );
            assert!(
                !message["invalid"].as_bool().unwrap(),
                "{name} message {index}"
            );
            messages += 1;
        }
        scenarios += 1;
    }
    assert_eq!(scenarios, 7);
    assert!(messages >= 30, "{messages} messages");
}

fn verified(rev: &str, data: Cid, prev_data: Option<Cid>) -> VerifiedCommit {
    VerifiedCommit {
        commit: SignedCommit {
            cid: data,
            did: Did::parse("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa").unwrap(),
            rev: Tid::parse(rev).unwrap_or_else(|e| panic!("{rev}: {e}")),
            data,
            prev: None,
        },
        prev_data,
        inversion: if prev_data.is_some() {
            Inversion::Proven
        } else {
            Inversion::Legacy
        },
    }
}

#[test]
fn the_chain_check_classifies_order_duplicates_and_gaps() {
    let (a, b, c) = (
        cbor::cid_for_dag_cbor(b"a"),
        cbor::cid_for_dag_cbor(b"b"),
        cbor::cid_for_dag_cbor(b"c"),
    );
    let held = ChainState {
        rev: Tid::parse("3lmxjza3nva27").unwrap(),
        data: a,
    };
    let next = verified("3lmxjzbfkb522", b, Some(a));
    assert_eq!(check_commit(None, &next, None), ChainVerdict::First);
    assert_eq!(
        check_commit(Some(&held), &next, Some("3lmxjza3nva27")),
        ChainVerdict::InOrder
    );
    // Not newer: equal and older revs are duplicates whatever else they say.
    for rev in ["3lmxjza3nva27", "3lmxjza3nva22"] {
        assert_eq!(
            check_commit(
                Some(&held),
                &verified(rev, b, Some(a)),
                Some("3lmxjza3nva27")
            ),
            ChainVerdict::Duplicate
        );
    }
    assert_eq!(
        check_commit(Some(&held), &next, Some("3lmxjxi3hjn23")),
        ChainVerdict::Gap(Gap::Since)
    );
    assert_eq!(
        check_commit(Some(&held), &next, None),
        ChainVerdict::Gap(Gap::Since)
    );
    assert_eq!(
        check_commit(
            Some(&held),
            &verified("3lmxjzbfkb522", b, Some(c)),
            Some("3lmxjza3nva27")
        ),
        ChainVerdict::Gap(Gap::PrevData)
    );
    // A legacy commit can only be checked by `since`.
    assert_eq!(
        check_commit(
            Some(&held),
            &verified("3lmxjzbfkb522", b, None),
            Some("3lmxjza3nva27")
        ),
        ChainVerdict::InOrder
    );
    let sync = |rev: &str, data| SignedCommit {
        cid: data,
        did: Did::parse("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa").unwrap(),
        rev: Tid::parse(rev).unwrap(),
        data,
        prev: None,
    };
    assert_eq!(
        check_sync(None, &sync("3lmxjzbfkb522", b)),
        ChainVerdict::First
    );
    assert_eq!(
        check_sync(Some(&held), &sync("3lmxjzbfkb522", b)),
        ChainVerdict::Gap(Gap::Sync)
    );
    assert_eq!(
        check_sync(Some(&held), &sync("3lmxjzbfkb522", a)),
        ChainVerdict::InOrder
    );
    assert_eq!(
        check_sync(Some(&held), &sync("3lmxjza3nva27", b)),
        ChainVerdict::Duplicate
    );
}

#[test]
fn consecutive_commits_of_one_repo_in_the_capture_chain_in_order() {
    let Some(dir) = fixtures() else { return };
    let keys = capture_keys(&dir);
    let opts = VerifyOptions::at(now_micros());
    let mut held: HashMap<Did, ChainState> = HashMap::new();
    let (mut in_order, mut first) = (0, 0);
    for frame in capture(&dir) {
        let Event::Commit(commit) = decode_frame(&frame).unwrap() else {
            continue;
        };
        let v = verify_commit(&commit, &keys[&commit.repo], &opts).unwrap();
        match check_commit(held.get(&commit.repo), &v, commit.since) {
            ChainVerdict::First => first += 1,
            ChainVerdict::InOrder => in_order += 1,
            other => panic!("seq {}: {other:?}", commit.seq),
        }
        held.insert(commit.repo.clone(), ChainState::after(&v.commit));
    }
    assert_eq!(first + in_order, 148);
    assert_eq!(first, held.len());
}

#[test]
fn signed_synthetic_commits_verify_and_chain_through_creates_updates_and_deletes() {
    use sync_core::synth::{OpSpec, SynthRepo};
    let mut repo = SynthRepo::new("did:plc:synthsynthsynthsynthsynt", [5u8; 32]);
    let key = repo.public_key();
    let post = |i: u32| serde_json::json!({"$type": "app.bsky.feed.post", "text": format!("post {i}"), "createdAt": "2026-01-01T00:00:00Z"});
    for i in 0..300u32 {
        repo.put("app.bsky.feed.post", &format!("3k{i:011}"), post(i));
    }
    let start = now_micros() - 60_000_000;
    let opts = VerifyOptions::at(now_micros());
    let mut validator = StreamValidator::new(false);
    let mut rng = sync_core::synth::SplitMix64(42);
    for seq in 1..=120i64 {
        let mut ops = Vec::new();
        for _ in 0..=rng.below(4) {
            let i = rng.below(400) as u32;
            let rkey = format!("3k{i:011}");
            if ops.iter().any(|op: &OpSpec| match op {
                OpSpec::Create { rkey: r, .. }
                | OpSpec::Update { rkey: r, .. }
                | OpSpec::Delete { rkey: r, .. } => *r == rkey,
            }) {
                continue;
            }
            let exists = repo.has("app.bsky.feed.post", &rkey);
            ops.push(match (exists, rng.below(2)) {
                (false, _) => OpSpec::create("app.bsky.feed.post", &rkey, post(i + 1000)),
                (true, 0) => OpSpec::update(
                    "app.bsky.feed.post",
                    &rkey,
                    post(i + 2000 + seq as u32 * 1000),
                ),
                (true, _) => OpSpec::delete("app.bsky.feed.post", &rkey),
            });
        }
        let frame = repo.commit(
            seq * 2,
            start + seq as u64 * 1000,
            "2026-01-01T00:00:00Z",
            &ops,
        );
        let event = decode_frame(&frame).unwrap();
        let Event::Commit(commit) = &event else {
            unreachable!()
        };
        assert_eq!(
            verify_commit(commit, &key, &opts).map(|v| v.inversion),
            Ok(Inversion::Proven),
            "seq {seq}: {ops:?}"
        );
        assert_eq!(
            validator.check(&event, Some(&key), &opts),
            Decision::Accept { resync: None },
            "seq {seq}"
        );
        // Replayed under a new seq: a stale rev, dropped before any signature work.
        let mut replay = Editable::from_frame(&frame);
        replay
            .body
            .insert("seq".into(), Ipld::Integer(i128::from(seq) * 2 + 1));
        let replayed = replay.to_frame();
        assert_eq!(
            validator.check(&decode_frame(&replayed).unwrap(), Some(&key), &opts),
            Decision::Drop(DropReason::StaleRev),
            "seq {seq}"
        );
    }
}

type OpMap = BTreeMap<String, Ipld>;

/// The ops list is not covered by the signature: every way a relay could reshape it around a
/// forged record must fail, each with its reason.
#[test]
fn op_lists_that_lie_about_the_signed_tree_fail_with_their_reasons() {
    use sync_core::synth::{OpSpec, SynthRepo};
    let mut repo = SynthRepo::new("did:plc:synthsynthsynthsynthsynt", [6u8; 32]);
    let key = repo.public_key();
    let post = |text: &str| serde_json::json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2026-01-01T00:00:00Z"});
    for i in 0..200u32 {
        repo.put(
            "app.bsky.feed.post",
            &format!("3k{i:011}"),
            post(&format!("old {i}")),
        );
    }
    let opts = VerifyOptions::at(now_micros());
    let frame = repo.commit(
        1,
        now_micros() - 1_000_000,
        "2026-01-01T00:00:00Z",
        &[
            OpSpec::create("app.bsky.feed.post", "3k00000009999", post("new")),
            OpSpec::update("app.bsky.feed.post", "3k00000000005", post("edited")),
            OpSpec::delete("app.bsky.feed.post", "3k00000000007"),
        ],
    );
    let base = Editable::from_frame(&frame);
    let check = |e: &Editable| reason_of(&e.to_frame(), &key, &opts);
    assert_eq!(check(&base), Ok(Inversion::Proven));

    // Order does not matter: the same ops reversed still prove the same tree.
    let mut e = base.clone();
    let mut ops = e.ops();
    ops.reverse();
    e.set_ops(ops);
    assert_eq!(check(&e), Ok(Inversion::Proven));

    let forged = serde_ipld_dagcbor::to_vec(&cbor::json_to_ipld(&post("forged")).unwrap()).unwrap();
    let forged_cid = cbor::cid_for_dag_cbor(&forged);
    let link = |c: Cid| Ipld::Link(c);
    let with_ops = |edit: &dyn Fn(&mut Vec<OpMap>)| {
        let mut e = base.clone();
        e.blocks.push((forged_cid, forged.clone()));
        let mut ops = e.ops();
        edit(&mut ops);
        e.set_ops(ops);
        check(&e)
    };
    let create_cid = match &base.ops()[0]["cid"] {
        Ipld::Link(c) => *c,
        _ => unreachable!(),
    };

    // The create's path updated to a forged record and back: two ops on one path.
    assert_eq!(
        with_ops(&|ops| {
            let mut there = ops[0].clone();
            there.insert("action".into(), Ipld::String("update".into()));
            there.insert("prev".into(), link(create_cid));
            there.insert("cid".into(), link(forged_cid));
            let mut back = there.clone();
            back.insert("prev".into(), link(forged_cid));
            back.insert("cid".into(), link(create_cid));
            ops.push(there);
            ops.push(back);
        }),
        Err("duplicate_op_path".into())
    );
    // A forged record created and deleted again at an unrelated path.
    assert_eq!(
        with_ops(&|ops| {
            let mut create = BTreeMap::new();
            create.insert("action".into(), Ipld::String("create".into()));
            create.insert(
                "path".into(),
                Ipld::String("app.bsky.feed.post/3kforged00000".into()),
            );
            create.insert("cid".into(), link(forged_cid));
            create.insert("prev".into(), Ipld::Null);
            let mut delete = create.clone();
            delete.insert("action".into(), Ipld::String("delete".into()));
            delete.insert("cid".into(), Ipld::Null);
            delete.insert("prev".into(), link(forged_cid));
            ops.push(create);
            ops.push(delete);
        }),
        Err("duplicate_op_path".into())
    );
    // Fields that do not fit the action.
    assert_eq!(
        with_ops(&|ops| {
            ops[0].insert("prev".into(), link(forged_cid));
        }),
        Err("bad_op_shape".into()),
        "a create with prev"
    );
    assert_eq!(
        with_ops(&|ops| {
            let cid = ops[1]["cid"].clone();
            ops[1].insert("prev".into(), cid);
        }),
        Err("bad_op_shape".into()),
        "an update whose prev is its cid"
    );
    assert_eq!(
        with_ops(&|ops| {
            ops[2].insert("cid".into(), link(forged_cid));
        }),
        Err("bad_op_shape".into()),
        "a delete with a cid"
    );
    assert_eq!(
        with_ops(&|ops| {
            ops[1].insert("prev".into(), Ipld::Null);
        }),
        Err("missing_prev".into()),
        "an update without prev in a provable commit"
    );
    // An update claiming another previous record: the tree inverts to another root.
    assert_eq!(
        with_ops(&|ops| {
            ops[1].insert("prev".into(), link(forged_cid));
        }),
        Err("inversion_mismatch".into())
    );
    // A delete of a key the signed tree still holds.
    assert_eq!(
        with_ops(&|ops| {
            ops.push(BTreeMap::from([
                ("action".to_string(), Ipld::String("delete".into())),
                (
                    "path".to_string(),
                    Ipld::String("app.bsky.feed.post/3k00000000011".into()),
                ),
                ("cid".to_string(), Ipld::Null),
                ("prev".to_string(), link(forged_cid)),
            ]));
        }),
        Err("op_mismatch".into())
    );
    // One op of three removed.
    assert_eq!(
        with_ops(&|ops| {
            ops.remove(2);
        }),
        Err("inversion_mismatch".into())
    );
    // The update's record swapped for the forged one (block present, CID consistent).
    assert_eq!(
        with_ops(&|ops| {
            ops[1].insert("cid".into(), link(forged_cid));
        }),
        Err("op_mismatch".into())
    );
}

/// A signed commit has exactly one encoding: a reordered or padded commit block (same
/// signature, new CID) is refused, and so is a commit without its `prev` key.
#[test]
fn non_canonical_commit_blocks_are_refused() {
    let Some(dir) = fixtures() else { return };
    let (_, editable, key) = sample(&dir);
    let opts = VerifyOptions::at(now_micros());
    let block = editable.block(&editable.commit_cid()).to_vec();
    // The commit map's entries, re-emitted with `sig` moved first (still a valid CBOR map).
    let Ipld::Map(object) = serde_ipld_dagcbor::from_slice(&block).unwrap() else {
        unreachable!()
    };
    let mut reordered = vec![0xa0 | object.len() as u8];
    let entry = |k: &str, v: &Ipld| {
        let mut out = serde_ipld_dagcbor::to_vec(&Ipld::String(k.into())).unwrap();
        out.extend(serde_ipld_dagcbor::to_vec(v).unwrap());
        out
    };
    reordered.extend(entry("sig", &object["sig"]));
    for (k, v) in object.iter().filter(|(k, _)| *k != "sig") {
        reordered.extend(entry(k, v));
    }
    assert_ne!(reordered, block);
    let mut without_prev = object.clone();
    without_prev.remove("prev");
    for (name, bytes) in [
        ("reordered", reordered),
        (
            "without prev",
            serde_ipld_dagcbor::to_vec(&Ipld::Map(without_prev)).unwrap(),
        ),
    ] {
        let mut e = editable.clone();
        let old = e.commit_cid();
        let cid = e.replace_block(&old, bytes);
        e.roots = vec![cid];
        e.body.insert("commit".into(), Ipld::Link(cid));
        assert_eq!(
            reason_of(&e.to_frame(), &key, &opts),
            Err("bad_commit_object".into()),
            "{name}"
        );
    }
}
