//! Builds firehose frames from JSON descriptions: test data, fuzz seeds and benchmark captures.
//!
//! Frames are encoded exactly as a relay sends them (DAG-CBOR header and body, a CAR v1 of
//! blocks with the record blocks addressed by their real CIDs), so tests exercise the real decoder.

use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use crate::cbor;

/// splitmix64: a small seedable generator for reproducible test data and fuzz-style variants
/// (not for anything that must be unpredictable).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; the modulo bias does not matter for test data).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One op of a synthetic commit.
#[derive(Debug, Clone)]
pub enum OpSpec {
    Create {
        collection: String,
        rkey: String,
        record: Value,
    },
    Update {
        collection: String,
        rkey: String,
        record: Value,
    },
    Delete {
        collection: String,
        rkey: String,
    },
}

impl OpSpec {
    /// `(action, collection, rkey, record)`; the record is `None` for deletes.
    fn parts(&self) -> (&'static str, &str, &str, Option<&Value>) {
        match self {
            OpSpec::Create {
                collection,
                rkey,
                record,
            } => ("create", collection, rkey, Some(record)),
            OpSpec::Update {
                collection,
                rkey,
                record,
            } => ("update", collection, rkey, Some(record)),
            OpSpec::Delete { collection, rkey } => ("delete", collection, rkey, None),
        }
    }

    pub fn create(collection: &str, rkey: &str, record: Value) -> Self {
        OpSpec::Create {
            collection: collection.into(),
            rkey: rkey.into(),
            record,
        }
    }
    pub fn update(collection: &str, rkey: &str, record: Value) -> Self {
        OpSpec::Update {
            collection: collection.into(),
            rkey: rkey.into(),
            record,
        }
    }
    pub fn delete(collection: &str, rkey: &str) -> Self {
        OpSpec::Delete {
            collection: collection.into(),
            rkey: rkey.into(),
        }
    }
}

fn ipld(v: &Value) -> Ipld {
    cbor::json_to_ipld(v).expect("synthetic JSON is valid atproto data")
}

fn encode(v: &Ipld) -> Vec<u8> {
    cbor::encode_ipld(v).expect("IPLD encodes")
}

fn frame(header: Value, body: Ipld) -> Vec<u8> {
    let mut out = encode(&ipld(&header));
    out.extend(encode(&body));
    out
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

/// A CAR v1 file with `root` as its only root and `blocks` in order.
pub fn car(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    car_with_roots(std::slice::from_ref(root), blocks)
}

/// A CAR v1 file with any roots (none, or several, for hostile variants) and `blocks` in order.
pub fn car_with_roots(roots: &[Cid], blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    let mut header = BTreeMap::new();
    header.insert(
        "roots".to_owned(),
        Ipld::List(roots.iter().map(|r| Ipld::Link(*r)).collect()),
    );
    header.insert("version".to_owned(), Ipld::Integer(1));
    let header = encode(&Ipld::Map(header));
    let mut out = Vec::new();
    varint(header.len() as u64, &mut out);
    out.extend(header);
    for (cid, data) in blocks {
        let cid_bytes = cid.to_bytes();
        varint((cid_bytes.len() + data.len()) as u64, &mut out);
        out.extend(cid_bytes);
        out.extend(data);
    }
    out
}

/// A `#commit` frame. The commit block is a stand-in (signatures are not checked by routing).
pub fn commit_frame(seq: i64, repo: &str, rev: &str, time: &str, ops: &[OpSpec]) -> Vec<u8> {
    commit_frame_lacking(seq, repo, rev, time, ops, &[])
}

/// [`commit_frame`] whose CAR lacks the record blocks of the ops with these rkeys (their ops
/// still name the CIDs): a commit a relay or PDS sent incomplete.
pub fn commit_frame_lacking(
    seq: i64,
    repo: &str,
    rev: &str,
    time: &str,
    ops: &[OpSpec],
    missing_rkeys: &[&str],
) -> Vec<u8> {
    let commit_block = encode(&ipld(&json!({"did": repo, "rev": rev, "version": 3})));
    let commit_cid = cbor::cid_for_dag_cbor(&commit_block);
    let mut blocks = vec![(commit_cid, commit_block)];
    let mut op_values = Vec::new();
    for op in ops {
        let (action, collection, rkey, record) = op.parts();
        let mut m = BTreeMap::new();
        m.insert("action".to_owned(), Ipld::String(action.into()));
        m.insert(
            "path".to_owned(),
            Ipld::String(format!("{collection}/{rkey}")),
        );
        match record {
            Some(record) => {
                let block = encode(&ipld(record));
                let cid = cbor::cid_for_dag_cbor(&block);
                m.insert("cid".to_owned(), Ipld::Link(cid));
                if !missing_rkeys.contains(&rkey) {
                    blocks.push((cid, block));
                }
            }
            None => {
                m.insert("cid".to_owned(), Ipld::Null);
            }
        }
        op_values.push(Ipld::Map(m));
    }
    let blocks = car(&commit_cid, &blocks);
    let mut body = BTreeMap::new();
    body.insert("seq".to_owned(), Ipld::Integer(seq.into()));
    body.insert("repo".to_owned(), Ipld::String(repo.into()));
    body.insert("rev".to_owned(), Ipld::String(rev.into()));
    body.insert("since".to_owned(), Ipld::Null);
    body.insert("commit".to_owned(), Ipld::Link(commit_cid));
    body.insert("blocks".to_owned(), Ipld::Bytes(blocks));
    body.insert("ops".to_owned(), Ipld::List(op_values));
    body.insert("blobs".to_owned(), Ipld::List(vec![]));
    body.insert("rebase".to_owned(), Ipld::Bool(false));
    body.insert("tooBig".to_owned(), Ipld::Bool(false));
    body.insert("time".to_owned(), Ipld::String(time.into()));
    frame(json!({"op": 1, "t": "#commit"}), Ipld::Map(body))
}

/// An `#identity` frame.
pub fn identity_frame(seq: i64, did: &str, handle: Option<&str>, time: &str) -> Vec<u8> {
    let mut body = json!({"seq": seq, "did": did, "time": time});
    if let Some(h) = handle {
        body["handle"] = Value::String(h.into());
    }
    frame(json!({"op": 1, "t": "#identity"}), ipld(&body))
}

/// An `#account` frame.
pub fn account_frame(
    seq: i64,
    did: &str,
    active: bool,
    status: Option<&str>,
    time: &str,
) -> Vec<u8> {
    let mut body = json!({"seq": seq, "did": did, "time": time, "active": active});
    if let Some(s) = status {
        body["status"] = Value::String(s.into());
    }
    frame(json!({"op": 1, "t": "#account"}), ipld(&body))
}

/// An `#info` frame (e.g. `OutdatedCursor`).
pub fn info_frame(name: &str, message: Option<&str>) -> Vec<u8> {
    frame(
        json!({"op": 1, "t": "#info"}),
        ipld(&json!({"name": name, "message": message})),
    )
}

/// An error frame (`op = -1`).
pub fn error_frame(error: &str, message: Option<&str>) -> Vec<u8> {
    frame(
        json!({"op": -1}),
        ipld(&json!({"error": error, "message": message})),
    )
}

/// A message of a kind this build does not know, with a `seq`.
pub fn unknown_frame(t: &str, seq: i64) -> Vec<u8> {
    frame(json!({"op": 1, "t": t}), ipld(&json!({"seq": seq})))
}

/// Appends one frame to a capture (`[u32 LE length][frame]`).
pub fn push_capture(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend((frame.len() as u32).to_le_bytes());
    out.extend(frame);
}

/// A capture file from frames.
pub fn capture(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        push_capture(&mut out, f);
    }
    out
}

const BASE32_SORT: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";

/// The DID a looped capture uses for `did` in loop `n`: the last 4 characters of a did:plc are
/// replaced by `n` in base32, so every loop has its own accounts. Other methods are unchanged.
pub fn looped_did(did: &str, n: u32) -> String {
    if !(did.starts_with("did:plc:") && did.len() == 32) || n == 0 {
        return did.to_owned();
    }
    let mut s = did[..28].to_owned();
    for i in (0..4).rev() {
        s.push(BASE32_SORT[((n >> (5 * i)) & 31) as usize] as char);
    }
    s
}

/// Rewrites real frames into an endless stream of unique events: loop `n` of the capture gets
/// seqs continuing after the previous loop, repos renamed by [`looped_did`] and fresh, increasing
/// revs. Record blocks are untouched (their CIDs stay valid), so decoding does the real work.
pub struct LoopedCapture {
    frames: Vec<Ipld>,
    headers: Vec<Vec<u8>>,
    index: usize,
    loop_index: u32,
    next_seq: i64,
    rev_counter: u64,
    /// With [`Self::signed`]: each renamed repo's last rev (its next commit's `since`), in the
    /// order repos first appeared.
    signed: Option<Vec<(String, Option<String>)>>,
    signed_index: std::collections::HashMap<String, usize>,
}

/// The signing key [`LoopedCapture::signed`] uses for `did`: derived from the DID, so a DID
/// document can be written for it at any time.
pub fn looped_secret(did: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(format!("looped-capture-key:{did}").as_bytes()).into()
}

impl LoopedCapture {
    /// `frames`: the capture's frames; undecodable ones are skipped.
    pub fn new(frames: &[&[u8]], first_seq: i64) -> Self {
        let mut bodies = Vec::new();
        let mut headers = Vec::new();
        for frame in frames {
            let Ok(end) = cbor::skip_item(frame, 0) else {
                continue;
            };
            let Ok(body) = serde_ipld_dagcbor::from_slice::<Ipld>(&frame[end..]) else {
                continue;
            };
            headers.push(frame[..end].to_vec());
            bodies.push(body);
        }
        LoopedCapture {
            frames: bodies,
            headers,
            index: 0,
            loop_index: 0,
            next_seq: first_seq,
            // 2026-01-01 in microseconds, shifted into TID position
            rev_counter: 1_767_225_600_000_000,
            signed: None,
            signed_index: std::collections::HashMap::new(),
        }
    }

    /// Re-signs every `#commit` and `#sync` for its renamed repo (its `did` and new `rev` in the
    /// commit object, signed with [`looped_secret`]) and chains each repo's commits by `since`,
    /// so the stream verifies: the MST data and proofs are the capture's, still valid, since
    /// renaming a repo does not change its tree.
    pub fn signed(mut self) -> Self {
        self.signed = Some(Vec::new());
        self
    }

    /// DID documents (the `--did-docs` format) of every repo the signed stream has named so far,
    /// with `pds` as their PDS endpoint.
    pub fn did_documents(&self, pds: &str) -> Value {
        let mut docs = serde_json::Map::new();
        for (did, _) in self.signed.iter().flatten() {
            let repo = SynthRepo::new(did, looped_secret(did));
            docs.insert(did.clone(), repo.did_document(pds));
        }
        Value::Object(docs)
    }

    /// Replaces the commit block of a renamed `#commit`/`#sync` body with one signed for `did`
    /// at `rev`, and chains `since`.
    fn resign(&mut self, map: &mut BTreeMap<String, Ipld>, did: &str, rev: &str) {
        use sha2::Digest as _;
        let Some(Ipld::Bytes(car_bytes)) = map.get("blocks") else {
            return;
        };
        let Ok(blocks) = crate::car::CarBlocks::parse(car_bytes) else {
            return;
        };
        let Some(root) = blocks.roots.first().copied() else {
            return;
        };
        let Some(Ok(Ipld::Map(mut object))) = blocks
            .get(&root)
            .map(serde_ipld_dagcbor::from_slice::<Ipld>)
        else {
            return;
        };
        object.insert("did".to_owned(), Ipld::String(did.to_owned()));
        object.insert("rev".to_owned(), Ipld::String(rev.to_owned()));
        object.remove("sig");
        let secret =
            secp256k1::SecretKey::from_slice(&looped_secret(did)).expect("a valid secret key");
        let digest: [u8; 32] = sha2::Sha256::digest(encode(&Ipld::Map(object.clone()))).into();
        let signature = signing_context()
            .sign_ecdsa(&secp256k1::Message::from_digest(digest), &secret)
            .serialize_compact();
        object.insert("sig".to_owned(), Ipld::Bytes(signature.to_vec()));
        let block = encode(&Ipld::Map(object));
        let cid = cbor::cid_for_dag_cbor(&block);
        let mut out: Vec<(Cid, Vec<u8>)> = vec![(cid, block)];
        out.extend(
            blocks
                .iter()
                .filter(|(c, _)| **c != root)
                .map(|(c, b)| (*c, b.to_vec())),
        );
        let car_bytes = car(&cid, &out);
        if map.contains_key("commit") {
            map.insert("commit".into(), Ipld::Link(cid));
        }
        map.insert("blocks".into(), Ipld::Bytes(car_bytes));
        let signed = self.signed.get_or_insert_with(Vec::new);
        let slot = *self.signed_index.entry(did.to_owned()).or_insert_with(|| {
            signed.push((did.to_owned(), None));
            signed.len() - 1
        });
        if map.contains_key("since") {
            let since = signed[slot]
                .1
                .clone()
                .map(Ipld::String)
                .unwrap_or(Ipld::Null);
            map.insert("since".into(), since);
        }
        signed[slot].1 = Some(rev.to_owned());
    }
}

impl Iterator for LoopedCapture {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.frames.is_empty() {
            return None;
        }
        if self.index == self.frames.len() {
            self.index = 0;
            self.loop_index += 1;
        }
        let mut body = self.frames[self.index].clone();
        let header = self.headers[self.index].clone();
        self.index += 1;
        if let Ipld::Map(map) = &mut body {
            if map.contains_key("seq") {
                map.insert("seq".into(), Ipld::Integer(self.next_seq.into()));
                self.next_seq += 1;
            }
            for key in ["repo", "did"] {
                if let Some(Ipld::String(did)) = map.get(key) {
                    let renamed = looped_did(did, self.loop_index);
                    map.insert(key.into(), Ipld::String(renamed));
                }
            }
            if map.contains_key("rev") {
                self.rev_counter += 1;
                let tid = crate::ids::Tid::from_u64(self.rev_counter << 10);
                map.insert("rev".into(), Ipld::String(tid.as_str().to_owned()));
                let did = ["repo", "did"].iter().find_map(|k| match map.get(*k) {
                    Some(Ipld::String(d)) => Some(d.clone()),
                    _ => None,
                });
                if let (Some(_), Some(did)) = (&self.signed, did) {
                    let mut owned = std::mem::take(map);
                    self.resign(&mut owned, &did, tid.as_str());
                    *map = owned;
                }
            }
        }
        let mut out = header;
        out.extend(encode(&body));
        Some(out)
    }
}

/// A repository with a real MST and a real secp256k1 signing key: it produces signed `#commit`
/// frames (with `prevData`, `since` and the proof blocks a verifier needs) and `getRepo` CARs,
/// so verification, resync and backfill can be tested end to end without a PDS.
pub struct SynthRepo {
    did: crate::ids::Did,
    secret: secp256k1::SecretKey,
    tree: crate::mst::Tree,
    records: std::collections::HashMap<Cid, Vec<u8>>,
    last_rev: Option<crate::ids::Tid>,
    /// The signed commit block of the last commit (or `getRepo`), for CARs.
    last_commit: Option<(Cid, Vec<u8>)>,
    /// The MST root that commit signed.
    last_commit_data: Option<Cid>,
}

fn signing_context() -> &'static secp256k1::Secp256k1<secp256k1::SignOnly> {
    static CONTEXT: std::sync::OnceLock<secp256k1::Secp256k1<secp256k1::SignOnly>> =
        std::sync::OnceLock::new();
    CONTEXT.get_or_init(secp256k1::Secp256k1::signing_only)
}

impl SynthRepo {
    /// `did` must be a valid DID; `secret` a valid secp256k1 secret key (any 32 bytes below the
    /// group order, e.g. `[3; 32]`).
    pub fn new(did: &str, secret: [u8; 32]) -> SynthRepo {
        SynthRepo {
            did: crate::ids::Did::parse(did).expect("a valid synthetic DID"),
            secret: secp256k1::SecretKey::from_slice(&secret).expect("a valid secret key"),
            tree: crate::mst::Tree::empty(),
            records: std::collections::HashMap::new(),
            last_rev: None,
            last_commit: None,
            last_commit_data: None,
        }
    }

    pub fn did(&self) -> crate::ids::Did {
        self.did.clone()
    }

    /// The repo's signing key.
    pub fn public_key(&self) -> crate::crypto::PublicKey {
        let public = secp256k1::PublicKey::from_secret_key(signing_context(), &self.secret);
        crate::crypto::PublicKey::from_compressed(crate::crypto::KeyType::K256, &public.serialize())
            .expect("a secp256k1 public key")
    }

    /// A DID document naming the signing key and `pds` as the PDS endpoint.
    pub fn did_document(&self, pds: &str) -> Value {
        json!({
            "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
            "id": self.did.as_str(),
            "alsoKnownAs": [],
            "verificationMethod": [{
                "id": format!("{}#atproto", self.did.as_str()),
                "type": "Multikey",
                "controller": self.did.as_str(),
                "publicKeyMultibase": self.public_key().to_multikey(),
            }],
            "service": [{
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": pds,
            }],
        })
    }

    /// Sets a record without committing (for building a repo's starting state).
    pub fn put(&mut self, collection: &str, rkey: &str, record: Value) -> Cid {
        let block = encode(&ipld(&record));
        let cid = cbor::cid_for_dag_cbor(&block);
        self.tree
            .insert(format!("{collection}/{rkey}").as_bytes(), cid)
            .expect("a fully loaded synthetic tree");
        self.records.insert(cid, block);
        cid
    }

    /// Whether the repo holds `collection/rkey` now.
    pub fn has(&self, collection: &str, rkey: &str) -> bool {
        self.tree
            .get(format!("{collection}/{rkey}").as_bytes())
            .expect("a fully loaded synthetic tree")
            .is_some()
    }

    /// Removes a record without committing.
    pub fn remove(&mut self, collection: &str, rkey: &str) -> Option<Cid> {
        self.tree
            .remove(format!("{collection}/{rkey}").as_bytes())
            .expect("a fully loaded synthetic tree")
    }

    fn next_rev(&mut self, now_micros: u64) -> crate::ids::Tid {
        let mut value = now_micros << 10;
        if let Some(last) = self.last_rev {
            value = value.max(last.to_u64() + 1);
        }
        let rev = crate::ids::Tid::from_u64(value);
        self.last_rev = Some(rev);
        rev
    }

    /// Signs a commit of the current tree; returns its CID and block.
    fn sign(&mut self, rev: crate::ids::Tid) -> (Cid, Vec<u8>) {
        use sha2::Digest as _;
        let data = self.tree.root_cid().expect("a fully loaded synthetic tree");
        let mut object = BTreeMap::new();
        object.insert("did".to_owned(), Ipld::String(self.did.as_str().to_owned()));
        object.insert("version".to_owned(), Ipld::Integer(3));
        object.insert("data".to_owned(), Ipld::Link(data));
        object.insert("rev".to_owned(), Ipld::String(rev.as_str().to_owned()));
        object.insert("prev".to_owned(), Ipld::Null);
        let unsigned = encode(&Ipld::Map(object.clone()));
        let digest: [u8; 32] = sha2::Sha256::digest(&unsigned).into();
        let signature = signing_context()
            .sign_ecdsa(&secp256k1::Message::from_digest(digest), &self.secret)
            .serialize_compact();
        object.insert("sig".to_owned(), Ipld::Bytes(signature.to_vec()));
        let block = encode(&Ipld::Map(object));
        let cid = cbor::cid_for_dag_cbor(&block);
        self.last_commit = Some((cid, block.clone()));
        self.last_commit_data = Some(data);
        (cid, block)
    }

    /// A `getRepo` CAR of the current state, signed at a rev taken from `now_micros`.
    pub fn get_repo_car(&mut self, now_micros: u64) -> Vec<u8> {
        self.get_repo_car_filtered(now_micros, |_| true)
    }

    /// [`Self::get_repo_car`] without the block `missing` (a damaged export).
    pub fn get_repo_car_without(&mut self, now_micros: u64, missing: &Cid) -> Vec<u8> {
        self.get_repo_car_filtered(now_micros, |cid| cid != missing)
    }

    fn get_repo_car_filtered(&mut self, now_micros: u64, keep: impl Fn(&Cid) -> bool) -> Vec<u8> {
        // The last commit still describes the tree unless records were put since: then the
        // export is signed at a new rev, as a PDS would have committed them.
        let root = self.tree.root_cid().expect("a fully loaded synthetic tree");
        let (commit_cid, commit_block) = match &self.last_commit {
            Some((cid, block)) if self.last_commit_data == Some(root) => (*cid, block.clone()),
            _ => {
                let rev = self.next_rev(now_micros);
                self.sign(rev)
            }
        };
        let mut blocks = vec![(commit_cid, commit_block)];
        blocks.extend(
            self.tree
                .node_blocks()
                .expect("a fully loaded synthetic tree"),
        );
        let mut entries = Vec::new();
        crate::mst::walk(
            self.tree.root_cid().expect("a fully loaded synthetic tree"),
            &blocks
                .iter()
                .cloned()
                .collect::<std::collections::HashMap<_, _>>(),
            |_, cid| {
                entries.push(cid);
                Ok::<(), ()>(())
            },
        )
        .expect("a consistent synthetic tree");
        for cid in entries {
            if let Some(block) = self.records.get(&cid) {
                blocks.push((cid, block.clone()));
            }
        }
        blocks.retain(|(cid, _)| keep(cid));
        car(&commit_cid, &blocks)
    }

    /// Applies `ops` as one signed `#commit` frame: `prevData` is the root before, `since` the
    /// previous rev, and `blocks` carry the commit, the new records and every MST node of the new
    /// tree (a superset of the inversion proof; fine for the small repos of tests).
    pub fn commit(&mut self, seq: i64, now_micros: u64, time: &str, ops: &[OpSpec]) -> Vec<u8> {
        let since = self.last_rev;
        let prev_data = self.tree.root_cid().expect("a fully loaded synthetic tree");
        let mut op_values = Vec::new();
        let mut new_blocks = Vec::new();
        for op in ops {
            let (action, collection, rkey, record) = op.parts();
            let path = format!("{collection}/{rkey}");
            let prev = self
                .tree
                .get(path.as_bytes())
                .expect("a fully loaded synthetic tree");
            let mut m = BTreeMap::new();
            m.insert("action".to_owned(), Ipld::String(action.into()));
            m.insert("path".to_owned(), Ipld::String(path.clone()));
            m.insert("prev".to_owned(), prev.map_or(Ipld::Null, Ipld::Link));
            match record {
                Some(record) => {
                    let cid = self.put(collection, rkey, record.clone());
                    new_blocks.push((cid, self.records[&cid].clone()));
                    m.insert("cid".to_owned(), Ipld::Link(cid));
                }
                None => {
                    self.remove(collection, rkey);
                    m.insert("cid".to_owned(), Ipld::Null);
                }
            }
            op_values.push(Ipld::Map(m));
        }
        let rev = self.next_rev(now_micros);
        let (commit_cid, commit_block) = self.sign(rev);
        let mut blocks = vec![(commit_cid, commit_block)];
        blocks.extend(new_blocks);
        blocks.extend(
            self.tree
                .node_blocks()
                .expect("a fully loaded synthetic tree"),
        );
        let mut body = BTreeMap::new();
        body.insert("seq".to_owned(), Ipld::Integer(seq.into()));
        body.insert(
            "repo".to_owned(),
            Ipld::String(self.did.as_str().to_owned()),
        );
        body.insert("rev".to_owned(), Ipld::String(rev.as_str().to_owned()));
        body.insert(
            "since".to_owned(),
            since.map_or(Ipld::Null, |s| Ipld::String(s.as_str().to_owned())),
        );
        body.insert("commit".to_owned(), Ipld::Link(commit_cid));
        body.insert("blocks".to_owned(), Ipld::Bytes(car(&commit_cid, &blocks)));
        body.insert("ops".to_owned(), Ipld::List(op_values));
        body.insert("prevData".to_owned(), Ipld::Link(prev_data));
        body.insert("blobs".to_owned(), Ipld::List(vec![]));
        body.insert("rebase".to_owned(), Ipld::Bool(false));
        body.insert("tooBig".to_owned(), Ipld::Bool(false));
        body.insert("time".to_owned(), Ipld::String(time.into()));
        frame(json!({"op": 1, "t": "#commit"}), Ipld::Map(body))
    }
}
