//! Arbitrary bytes as one firehose frame: decode, render as Jetstream lines, route against a
//! small study, and decode every record. Nothing may panic, overflow or run away.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sync_core::frame::{decode_frame, Event};
use sync_core::ids::Did;
use sync_core::jetstream::event_lines;
use sync_core::route::{route_event, MemoryState};

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
    if let Event::Commit(commit) = &event {
        for op in commit.ops.iter().flatten() {
            let _ = commit.record_json(op);
        }
    }
});
