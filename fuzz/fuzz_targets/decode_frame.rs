//! Arbitrary bytes as one firehose frame: decode, render as Jetstream lines, route against a
//! small study, decode every record, and verify commits and syncs (signed commit object,
//! signature, MST inversion). Nothing may panic, overflow or run away.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sync_core::frame::{decode_frame, Event};
use sync_core::ids::Did;
use sync_core::jetstream::event_lines;
use sync_core::crypto::PublicKey;
use sync_core::route::{route_event, MemoryState};
use sync_core::verify::{prove_ops, verify_commit, verify_commit_block, verify_sync, VerifyOptions};

/// The signing key of the relay capture's first DID: mutated seeds of its commits reach the
/// signature check with a real key; every other DID's commits are verified with it too (and
/// fail), which exercises the failure paths.
fn key() -> &'static PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    KEY.get_or_init(|| {
        PublicKey::from_multikey("zQ3shrc8v5X6ZiANcZxA6JerfT2T4SskeCGxpmtDfMuHF9KRj")
            .expect("a valid multikey")
    })
}

/// Study users and in-network accounts: the synth DIDs and some of the relay capture's, so that
/// mutated seeds keep reaching the routing branches. One study post so replies, likes, reposts
/// and quotes of it route too.
fn state() -> &'static MemoryState {
    static STATE: OnceLock<MemoryState> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut state = MemoryState::default();
        for did in [
            "did:plc:z72i7hdynmk6r22z27h6tvur",
            "did:plc:w4xbfzo7kqfes5zb7r6qv3rw",
            "did:plc:2a7ygipkrbh544aqhcav53oy",
            "did:plc:2c6wev5ei4jzcy4imh5afa35",
        ] {
            let did = Did::parse(did).expect("valid DID");
            state.study_users.insert(did.clone());
            state.in_network.insert(did);
        }
        state.study_posts.insert(
            "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k".to_owned(),
            Did::parse("did:plc:z72i7hdynmk6r22z27h6tvur").expect("valid DID"),
        );
        state
    })
}

fuzz_target!(|data: &[u8]| {
    let event = match decode_frame(data) {
        Ok(event) => event,
        Err(e) => {
            let _ = (e.reason(), e.to_string());
            return;
        }
    };
    let _ = (event.seq(), event.kind());
    for line in event_lines(&event) {
        let _ = line.to_string();
    }
    let routing = route_event(&event, state(), "2024-10-02-14:05:11");
    for file in &routing.files {
        let _ = file.path.to_delete().to_string();
    }
    // A fixed clock (the capture's day) keeps runs reproducible.
    let opts = VerifyOptions::at(1_783_175_954_000_000);
    match &event {
        Event::Commit(commit) => {
            for op in commit.ops.iter().flatten() {
                let _ = commit.record_json(op);
            }
            let _ = verify_commit(commit, key(), &opts).map_err(|e| (e.reason(), e.to_string()));
            // The inversion on its own, reached even when the signature would stop the above.
            if let Some(block) = commit.blocks.get(&commit.commit) {
                if let Ok(signed) =
                    verify_commit_block(&commit.commit, block, &commit.repo, None, None, &opts)
                {
                    let _ = prove_ops(commit, &signed.data).map_err(|e| e.reason());
                }
            }
        }
        Event::Sync(sync) => {
            let _ = verify_sync(sync, key(), &opts).map_err(|e| (e.reason(), e.to_string()));
        }
        _ => {}
    }
});
