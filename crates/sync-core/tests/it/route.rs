//! Routing against the worked examples of `predecessor-data-format.md` §3.5 and the new folders
//! of DESIGN.md §5. Frames are real DAG-CBOR frames built by `sync_core::synth` and go through the
//! real decoder.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sync_core::frame::decode_frame;
use sync_core::ids::{AtUri, Did};
use sync_core::paths::Folder;
use sync_core::route::{route_event, Applied, MemoryState, RoutingState, StateUpdate};
use sync_core::synth::{self, OpSpec};

const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const S2: &str = "did:plc:4llrhdclvdlmmynkwsmg5tdc";
const A1: &str = "did:plc:w4xbfzo7kqfes5zb7r6qv3rw";
const A2: &str = "did:plc:q6gjnaw2blty4crticxkmujt";
const A3: &str = "did:plc:ragtjsm2j2vknwkz3zp4oxrd";
const CLOCK: &str = "2024-10-02-14:05:11";
const STUDY_POST: &str = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k";

/// The §3.5 cast: S1, S2 study users; S2 and A1 in-network; S1's 3l5jnpb6xyz2k in the post map.
fn cast() -> MemoryState {
    let mut state = MemoryState::default();
    state
        .study_users
        .extend([S1, S2].map(|d| Did::parse(d).unwrap()));
    state
        .in_network
        .extend([S2, A1].map(|d| Did::parse(d).unwrap()));
    state
        .study_posts
        .insert(STUDY_POST.to_owned(), Did::parse(S1).unwrap());
    state
}

/// Routes `frames` in order (applying state updates between them, as the writer does) and
/// returns every file written: cache-relative path -> contents.
fn run(frames: &[Vec<u8>], state: &mut MemoryState) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for frame in frames {
        let event = decode_frame(frame).expect("test frame decodes");
        let routing = route_event(&event, state, CLOCK);
        assert!(
            routing.dropped.is_empty(),
            "unexpected drops: {:?}",
            routing.dropped
        );
        for update in &routing.updates {
            state.apply(update);
        }
        for file in routing.files {
            files.insert(file.path.to_string(), file.contents);
        }
    }
    files
}

/// Asserts that `frames` routed from `state` write exactly `expected` (paths), and that every
/// file is one JSON document.
fn check(
    frames: &[Vec<u8>],
    state: &mut MemoryState,
    expected: &[&str],
) -> BTreeMap<String, String> {
    let files = run(frames, state);
    let actual: Vec<&str> = files.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = expected.to_vec();
    expected.sort();
    assert_eq!(actual, expected);
    for (path, contents) in &files {
        serde_json::from_str::<Value>(contents).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            contents.is_ascii(),
            "{path} is ASCII-escaped like the predecessor's files"
        );
    }
    files
}

fn post(text: &str) -> Value {
    json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-10-02T14:03:27.512Z", "langs": ["en"]})
}

fn reply(root: &str, parent: &str) -> Value {
    let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
    json!({"$type": "app.bsky.feed.post", "text": "re", "createdAt": "2024-10-02T14:05:10.001Z",
           "reply": {"root": {"uri": root, "cid": cid}, "parent": {"uri": parent, "cid": cid}}})
}

fn like(subject: &str) -> Value {
    json!({"$type": "app.bsky.feed.like", "createdAt": "2024-10-02T14:20:11.093Z",
           "subject": {"uri": subject, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}})
}

fn follow(subject: &str) -> Value {
    json!({"$type": "app.bsky.graph.follow", "createdAt": "2024-10-02T14:25:00.000Z", "subject": subject})
}

fn commit(seq: i64, repo: &str, ops: &[OpSpec]) -> Vec<u8> {
    synth::commit_frame(seq, repo, "3l5jzzzzzzz2a", "2024-10-02T14:05:10.100Z", ops)
}

fn create(collection: &str, rkey: &str, record: Value) -> OpSpec {
    OpSpec::create(collection, rkey, record)
}

const POST: &str = "app.bsky.feed.post";
const LIKE: &str = "app.bsky.feed.like";
const FOLLOW: &str = "app.bsky.graph.follow";
const REPOST: &str = "app.bsky.feed.repost";

// ---- §3.5 worked examples -------------------------------------------------------------------

#[test]
fn ex01_study_user_posts() {
    check(
        &[commit(1, S1, &[create(POST, "3l5jnpb6xyz2k", post("hi"))])],
        &mut cast(),
        &["study_user_activity/create/post/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_post_uri_suffix=3l5jnpb6xyz2k.json"],
    );
}

#[test]
fn ex02_in_network_user_posts() {
    check(
        &[commit(1, A1, &[create(POST, "3l5jqyv2s4k2c", post("Good morning, Bluesky!"))])],
        &mut cast(),
        &["in_network_user_activity/create/post/did:plc:w4xbfzo7kqfes5zb7r6qv3rw/author_did=did:plc:w4xbfzo7kqfes5zb7r6qv3rw_post_uri_suffix=3l5jqyv2s4k2c.json"],
    );
}

#[test]
fn ex03_study_user_who_is_also_in_network_gets_two_files() {
    let files = check(
        &[commit(1, S2, &[create(POST, "3l5k2aaaaaa2a", post("both"))])],
        &mut cast(),
        &[
            "study_user_activity/create/post/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5k2aaaaaa2a.json",
            "in_network_user_activity/create/post/did:plc:4llrhdclvdlmmynkwsmg5tdc/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5k2aaaaaa2a.json",
        ],
    );
    let contents: Vec<&String> = files.values().collect();
    assert_eq!(
        contents[0], contents[1],
        "the same object is written for every decision"
    );
}

#[test]
fn ex04_reply_nests_under_study_root_and_matches_example_2_exactly() {
    // The input of §1.7 Example 2; its output is the spec's, byte for byte, at clock 14:05:11.
    let record = json!({"$type": "app.bsky.feed.post",
        "text": "Agreed \u{2014} full report: example.org/report",
        "createdAt": "2024-10-02T14:05:10.001Z", "langs": ["en"],
        "reply": {"root":   {"uri": STUDY_POST, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
                  "parent": {"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j",
                             "cid": "bafyreif75yqxyt6g7h3pmvsj3l3e5u7y3wmb2z4y6ahtbbt7b2c5tmb3fu"}},
        "facets": [{"index": {"byteStart": 24, "byteEnd": 42},
                    "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.org/report"}]}],
        "embed": {"$type": "app.bsky.embed.images", "images": [
            {"alt": "Bar chart of turnout by r\u{e9}gion",
             "image": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/jpeg", "size": 399062},
             "aspectRatio": {"width": 1200, "height": 800}},
            {"alt": "",
             "image": {"$type": "blob", "ref": {"$link": "bafkreidtepeeezypyvsk4yi7vmlv3gclpe5aizuerzkj2ok4karm5pgydm"}, "mimeType": "image/png", "size": 81234}}]}});
    let frame = commit(1, A2, &[create(POST, "3l5jr4q7m2s2x", record.clone())]);
    let path = "study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k/author_did=did:plc:q6gjnaw2blty4crticxkmujt_post_uri_suffix=3l5jr4q7m2s2x.json";
    let files = check(&[frame], &mut cast(), &[path]);
    // The spec's record CID is of its own encoding; ours is of this block, so compare the rest.
    let ours: Value = serde_json::from_str(&files[path]).unwrap();
    let expected = json!({"uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.post/3l5jr4q7m2s2x", "indexed_at": null, "author_did": "did:plc:q6gjnaw2blty4crticxkmujt", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:05:10.001Z", "text": "Agreed \u{2014} full report: example.org/report", "embed": "{\"has_image\": true, \"image_alt_text\": \"Bar chart of turnout by r\\u00e9gion;\", \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}", "entities": null, "facets": "link:https://example.org/report", "labels": null, "langs": "en", "reply_parent": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j", "reply_root": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "tags": null, "synctimestamp": "2024-10-02-14:05:11", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null});
    let mut without_cid = ours.as_object().unwrap().clone();
    let cid = without_cid.remove("cid").unwrap();
    assert_eq!(Value::Object(without_cid), expected);
    let real_cid = sync_core::cbor::cid_for_dag_cbor(
        &sync_core::cbor::encode_ipld(&sync_core::cbor::json_to_ipld(&record).unwrap()).unwrap(),
    );
    assert_eq!(
        cid,
        Value::String(real_cid.to_string()),
        "cid is the op's record CID"
    );
}

#[test]
fn ex05_reply_nests_under_study_parent_when_root_is_not_a_study_post() {
    let s1_post = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5k7ccccccc2";
    let a3_root = "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j";
    check(
        &[
            commit(1, S1, &[create(POST, "3l5k7ccccccc2", post("earlier in this run"))]),
            commit(2, A3, &[create(POST, "3l5kbbbbbbb2b", reply(a3_root, s1_post))]),
        ],
        &mut cast(),
        &[
            "study_user_activity/create/post/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_post_uri_suffix=3l5k7ccccccc2.json",
            "study_user_activity/create/reply_to_user_post/3l5k7ccccccc2/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kbbbbbbb2b.json",
        ],
    );
}

#[test]
fn ex05b_when_root_and_parent_are_both_study_posts_the_root_wins() {
    let s1_other = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5k7ccccccc2";
    let mut state = cast();
    state
        .study_posts
        .insert(s1_other.into(), Did::parse(S1).unwrap());
    check(
        &[commit(1, A3, &[create(POST, "3l5kbbbbbbb2b", reply(STUDY_POST, s1_other))])],
        &mut state,
        &["study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kbbbbbbb2b.json"],
    );
}

#[test]
fn ex06_like_on_a_study_post() {
    let files = check(
        &[commit(1, A2, &[create(LIKE, "3l5jv2xq4tk2p", like(STUDY_POST))])],
        &mut cast(),
        &["study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did=did:plc:q6gjnaw2blty4crticxkmujt_like_uri_suffix=3l5jv2xq4tk2p.json"],
    );
    let v: Value = serde_json::from_str(files.values().next().unwrap()).unwrap();
    assert_eq!(v["record"]["subject"]["uri"], STUDY_POST);
    assert_eq!(v["author"], A2);
}

#[test]
fn ex07_study_user_likes_another_post() {
    check(
        &[commit(1, S2, &[create(LIKE, "3l5jv3aaaaa2b", like("at://did:plc:w4xbfzo7kqfes5zb7r6qv3rw/app.bsky.feed.post/3l5jqyv2s4k2c"))])],
        &mut cast(),
        &["study_user_activity/create/like/3l5jqyv2s4k2c/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv3aaaaa2b.json"],
    );
}

#[test]
fn ex08_study_user_likes_a_study_post_gets_both_files() {
    check(
        &[commit(1, S2, &[create(LIKE, "3l5jv9zzzzz2c", like(STUDY_POST))])],
        &mut cast(),
        &[
            "study_user_activity/create/like/3l5jnpb6xyz2k/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json",
            "study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json",
        ],
    );
}

#[test]
fn ex09_study_user_follows_someone_who_joins_the_in_network_set() {
    let mut state = cast();
    check(
        &[commit(1, S1, &[create(FOLLOW, "3l5jw7c2bde2s", follow(A2))])],
        &mut state,
        &["study_user_activity/create/follow/follower/follower_did=did:plc:z72i7hdynmk6r22z27h6tvur_followee_did=did:plc:q6gjnaw2blty4crticxkmujt.json"],
    );
    assert!(
        state.is_in_network(&Did::parse(A2).unwrap()),
        "live in-network update (A4)"
    );
}

#[test]
fn ex10_someone_follows_a_study_user() {
    check(
        &[commit(1, A1, &[create(FOLLOW, "3l5jw7c2bde2t", follow(S2))])],
        &mut cast(),
        &["study_user_activity/create/follow/followee/follower_did=did:plc:w4xbfzo7kqfes5zb7r6qv3rw_followee_did=did:plc:4llrhdclvdlmmynkwsmg5tdc.json"],
    );
}

#[test]
fn ex11_study_user_follows_study_user_gets_both_files() {
    let files = check(
        &[commit(1, S1, &[create(FOLLOW, "3l5jw7c2bde2u", follow(S2))])],
        &mut cast(),
        &[
            "study_user_activity/create/follow/follower/follower_did=did:plc:z72i7hdynmk6r22z27h6tvur_followee_did=did:plc:4llrhdclvdlmmynkwsmg5tdc.json",
            "study_user_activity/create/follow/followee/follower_did=did:plc:z72i7hdynmk6r22z27h6tvur_followee_did=did:plc:4llrhdclvdlmmynkwsmg5tdc.json",
        ],
    );
    let contents: Vec<&String> = files.values().collect();
    assert_eq!(contents[0], contents[1], "same name, same content");
}

/// A follow routed to `followee` is indexed under the follower's URI; the study user it follows
/// is recorded with it (a withdrawal of theirs must find the entry once the file is exported).
#[test]
fn a_follow_of_a_study_user_records_whom_it_follows() {
    let mut state = cast();
    let uri = format!("at://{A1}/{FOLLOW}/3l5jw7c2bde2t");
    let frame = commit(1, A1, &[create(FOLLOW, "3l5jw7c2bde2t", follow(S2))]);
    let event = decode_frame(&frame).unwrap();
    let routing = route_event(&event, &state, CLOCK);
    let subjects: Vec<&StateUpdate> = routing
        .updates
        .iter()
        .filter(|u| matches!(u, StateUpdate::FollowOfStudyUser { .. }))
        .collect();
    assert_eq!(
        subjects,
        [&StateUpdate::FollowOfStudyUser {
            uri: AtUri::parse(&uri).unwrap(),
            subject: Did::parse(S2).unwrap(),
        }]
    );
    for update in &routing.updates {
        state.apply(update);
    }
    assert_eq!(state.followee_subjects(&uri), [Did::parse(S2).unwrap()]);
    assert_eq!(state.routed_folders(&uri), [Folder::Followee]);
    // A follow that is not of a study user records nothing.
    let other = format!("at://{A1}/{FOLLOW}/3l5jw7c2bde2v");
    run(
        &[commit(
            2,
            A1,
            &[create(FOLLOW, "3l5jw7c2bde2v", follow(A2))],
        )],
        &mut state,
    );
    assert!(state.followee_subjects(&other).is_empty());
}

#[test]
fn ex12_untracked_activity_and_untracked_deletes_write_nothing() {
    check(
        &[
            commit(
                1,
                A3,
                &[create(POST, "3l5kccccccc2c", post("nobody tracks me"))],
            ),
            commit(
                2,
                A3,
                &[create(
                    LIKE,
                    "3l5kccccccd2c",
                    like("at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5kccccccc2c"),
                )],
            ),
            commit(3, A3, &[OpSpec::delete(POST, "3l5kccccccc2c")]),
            commit(4, A2, &[OpSpec::delete(LIKE, "3l5kzzzzzzz2z")]),
        ],
        &mut cast(),
        &[],
    );
}

#[test]
fn ex13_updates_of_posts_are_not_routed() {
    check(
        &[commit(
            1,
            S1,
            &[OpSpec::update(POST, "3l5jnpb6xyz2k", post("edited"))],
        )],
        &mut cast(),
        &[],
    );
}

// ---- DESIGN.md §5: the new folders ------------------------------------------------------------

#[test]
fn study_users_own_deletes_go_to_delete_by_type() {
    let files = check(
        &[commit(7, S1, &[
            OpSpec::delete(POST, "3l5jnpb6xyz2k"),
            OpSpec::delete(LIKE, "3l5jv2xq4tk2p"),
            OpSpec::delete(FOLLOW, "3l5jw7c2bde2s"),
            OpSpec::delete(REPOST, "3l5jw7c2bde2r"),
            OpSpec::delete("app.bsky.graph.block", "3l5jw7c2bde2b"),
        ])],
        &mut cast(),
        &[
            "study_user_activity/delete/post/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_post_uri_suffix=3l5jnpb6xyz2k.json",
            "study_user_activity/delete/like/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_like_uri_suffix=3l5jv2xq4tk2p.json",
            "study_user_activity/delete/follow/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_follow_uri_suffix=3l5jw7c2bde2s.json",
            "study_user_activity/delete/repost/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_repost_uri_suffix=3l5jw7c2bde2r.json",
            "study_user_activity/delete/block/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_block_uri_suffix=3l5jw7c2bde2b.json",
        ],
    );
    let v: Value = serde_json::from_str(&files["study_user_activity/delete/post/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_post_uri_suffix=3l5jnpb6xyz2k.json"]).unwrap();
    assert_eq!(
        v,
        json!({"uri": STUDY_POST, "author": S1, "collection": POST, "rkey": "3l5jnpb6xyz2k",
               "seq": 7, "rev": "3l5jzzzzzzz2a", "time": "2024-10-02T14:05:10.100Z"})
    );
}

#[test]
fn deletes_of_routed_reactions_mirror_their_folder() {
    let mut state = cast();
    let a3_post = "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j";
    run(
        &[
            commit(1, A2, &[create(LIKE, "3l5jv2xq4tk2p", like(STUDY_POST))]),
            commit(
                2,
                A3,
                &[create(POST, "3l5kbbbbbbb2b", reply(STUDY_POST, a3_post))],
            ),
            commit(3, A3, &[create(FOLLOW, "3l5kfffffff2f", follow(S1))]),
            commit(
                4,
                A1,
                &[create(
                    POST,
                    "3l5jqyv2s4k2c",
                    post("Good morning, Bluesky!"),
                )],
            ),
            commit(
                4,
                A3,
                &[create(
                    REPOST,
                    "3l5krrrrrrr2r",
                    json!({"$type": REPOST, "createdAt": "2024-10-02T14:05:10.001Z", "subject": {"uri": STUDY_POST, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}),
                )],
            ),
        ],
        &mut state,
    );
    check(
        &[
            commit(5, A2, &[OpSpec::delete(LIKE, "3l5jv2xq4tk2p")]),
            commit(6, A3, &[
                OpSpec::delete(POST, "3l5kbbbbbbb2b"),
                OpSpec::delete(FOLLOW, "3l5kfffffff2f"),
                OpSpec::delete(REPOST, "3l5krrrrrrr2r"),
            ]),
            commit(7, A1, &[OpSpec::delete(POST, "3l5jqyv2s4k2c")]),
        ],
        &mut state,
        &[
            "study_user_activity/delete/like_on_user_post/3l5jnpb6xyz2k/author_did=did:plc:q6gjnaw2blty4crticxkmujt_like_uri_suffix=3l5jv2xq4tk2p.json",
            "study_user_activity/delete/reply_to_user_post/3l5jnpb6xyz2k/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kbbbbbbb2b.json",
            "study_user_activity/delete/follow/followee/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_follow_uri_suffix=3l5kfffffff2f.json",
            "study_user_activity/delete/repost_of_user_post/3l5jnpb6xyz2k/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_repost_uri_suffix=3l5krrrrrrr2r.json",
            "in_network_user_activity/delete/post/did:plc:w4xbfzo7kqfes5zb7r6qv3rw/author_did=did:plc:w4xbfzo7kqfes5zb7r6qv3rw_post_uri_suffix=3l5jqyv2s4k2c.json",
        ],
    );
}

#[test]
fn reposts_quotes_blocks_and_profiles() {
    let quote = json!({"$type": POST, "text": "look", "createdAt": "2024-10-02T14:05:10.001Z",
        "embed": {"$type": "app.bsky.embed.recordWithMedia",
                  "record": {"$type": "app.bsky.embed.record", "record": {"uri": STUDY_POST, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}},
                  "media": {"$type": "app.bsky.embed.images", "images": []}}});
    let repost = json!({"$type": REPOST, "createdAt": "2024-10-02T14:05:10.001Z",
        "subject": {"uri": STUDY_POST, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}});
    let profile = json!({"$type": "app.bsky.actor.profile", "displayName": "S1"});
    let files = check(
        &[
            commit(1, A3, &[create(POST, "3l5kqqqqqqq2q", quote)]),
            commit(2, S2, &[create(REPOST, "3l5krrrrrrr2r", repost)]),
            commit(3, S1, &[create("app.bsky.graph.block", "3l5kbbbbbbb2k", json!({"$type": "app.bsky.graph.block", "subject": A3, "createdAt": "2024-10-02T14:05:10.001Z"}))]),
            synth::commit_frame(4, S1, "3l5kaaaaaaa2a", "2024-10-02T14:06:00.000Z", &[create("app.bsky.actor.profile", "self", profile.clone())]),
            synth::commit_frame(5, S1, "3l5kaaaaaab2a", "2024-10-02T14:07:00.000Z", &[OpSpec::update("app.bsky.actor.profile", "self", profile)]),
        ],
        &mut cast(),
        &[
            "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kqqqqqqq2q.json",
            "study_user_activity/create/repost/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_repost_uri_suffix=3l5krrrrrrr2r.json",
            "study_user_activity/create/repost_of_user_post/3l5jnpb6xyz2k/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_repost_uri_suffix=3l5krrrrrrr2r.json",
            "study_user_activity/create/block/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_block_uri_suffix=3l5kbbbbbbb2k.json",
            "study_user_activity/create/profile/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_profile_uri_suffix=self_rev=3l5kaaaaaaa2a.json",
            "study_user_activity/create/profile/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_profile_uri_suffix=self_rev=3l5kaaaaaab2a.json",
        ],
    );
    let quote_file: Value = serde_json::from_str(
        files
            .values()
            .find(|c| c.contains("3l5kqqqqqqq2q"))
            .unwrap(),
    )
    .unwrap();
    assert!(quote_file["embed"]
        .as_str()
        .unwrap()
        .contains("\"has_embedded_record\": true"));
}

/// The account-file name of an event: built independently of `paths.rs` from its documented
/// definition (SHA-256 of the compact JSON array `[did, kind, time, handle, active, status]`).
fn account_path(did: &str, kind: &str, time: &str, rest: Value) -> String {
    use sha2::Digest;
    let mut array = json!([did, kind, time]);
    array
        .as_array_mut()
        .unwrap()
        .extend(rest.as_array().unwrap().iter().cloned());
    let digest: String = sha2::Sha256::digest(array.to_string().as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("study_user_activity/account/did={did}_{kind}_time={time}_event={digest}.json")
}

#[test]
fn account_and_identity_events_of_study_users_only() {
    let account = account_path(
        S1,
        "account",
        "2024-10-02T15:00:00.000Z",
        json!([null, false, "deactivated"]),
    );
    let identity = account_path(
        S1,
        "identity",
        "2024-10-02T15:00:01.000Z",
        json!(["new.example.com", null, null]),
    );
    let files = check(
        &[
            synth::account_frame(
                10,
                S1,
                false,
                Some("deactivated"),
                "2024-10-02T15:00:00.000Z",
            ),
            synth::identity_frame(11, S1, Some("new.example.com"), "2024-10-02T15:00:01.000Z"),
            synth::account_frame(12, A3, false, Some("deleted"), "2024-10-02T15:00:02.000Z"),
        ],
        &mut cast(),
        &[&account, &identity],
    );
    let v: Value = serde_json::from_str(&files[&account]).unwrap();
    assert_eq!(
        v,
        json!({"did": S1, "kind": "account", "seq": 10, "time": "2024-10-02T15:00:00.000Z", "handle": null, "active": false, "status": "deactivated"})
    );
}

/// Issue item 10: an account or identity event delivered again under another seq (a second
/// relay, a relay swap) rewrites the same file; genuinely different events never share one.
/// With the old `..._seq=<seq>.json` names the redelivery was a second file (a second row).
#[test]
fn an_account_event_delivered_twice_is_one_file_keyed_on_the_event() {
    let t = "2024-10-02T15:00:00.000Z";
    let mut state = cast();
    let files = run(
        &[
            synth::account_frame(10, S1, false, Some("deactivated"), t),
            synth::identity_frame(11, S1, Some("s1.example.com"), t),
            // the same two events again, from another relay's sequence
            synth::account_frame(5_000_010, S1, false, Some("deactivated"), t),
            synth::identity_frame(5_000_011, S1, Some("s1.example.com"), t),
            // different events: reactivation at the same instant, another status, another handle
            synth::account_frame(12, S1, true, None, t),
            synth::account_frame(13, S1, false, Some("takendown"), t),
            synth::identity_frame(14, S1, Some("s1.other.example"), t),
            synth::identity_frame(15, S1, None, t),
        ],
        &mut state,
    );
    assert_eq!(files.len(), 6, "{:#?}", files.keys().collect::<Vec<_>>());
    let deactivated = account_path(S1, "account", t, json!([null, false, "deactivated"]));
    let v: Value = serde_json::from_str(&files[&deactivated]).unwrap();
    assert_eq!(
        v["seq"], 5_000_010,
        "the seq stays inside the file (the latest delivery)"
    );
    assert!(files.contains_key(&account_path(
        S1,
        "identity",
        t,
        json!(["s1.example.com", null, null])
    )));
}

#[test]
fn unfollow_removes_from_in_network_unless_another_study_user_follows() {
    let mut state = cast();
    let a3 = Did::parse(A3).unwrap();
    run(
        &[
            commit(1, S1, &[create(FOLLOW, "3l5kf1fffff2f", follow(A3))]),
            commit(2, S2, &[create(FOLLOW, "3l5kf2fffff2f", follow(A3))]),
        ],
        &mut state,
    );
    assert!(state.is_in_network(&a3));
    run(
        &[commit(3, S1, &[OpSpec::delete(FOLLOW, "3l5kf1fffff2f")])],
        &mut state,
    );
    assert!(state.is_in_network(&a3), "S2 still follows A3");
    run(
        &[commit(4, S2, &[OpSpec::delete(FOLLOW, "3l5kf2fffff2f")])],
        &mut state,
    );
    assert!(!state.is_in_network(&a3), "nobody follows A3 any more");
    assert!(state.unknown_unfollows.is_empty());
    // and A3's posts stop being routed
    check(
        &[commit(5, A3, &[create(POST, "3l5kpppppp22p", post("x"))])],
        &mut state,
        &[],
    );
}

#[test]
fn a_bad_op_is_dropped_alone_and_the_rest_of_the_commit_is_routed() {
    let mut state = cast();
    let frame = commit(
        1,
        S1,
        &[
            create(
                POST,
                "3l5kaaaaaaa2a",
                json!({"$type": "app.bsky.feed.like", "text": "wrong $type"}),
            ),
            create(
                POST,
                "3l5kaaaaaab2a",
                json!({"$type": POST, "text": "no createdAt"}),
            ),
            create(POST, "3l5kaaaaaac2a", post("fine")),
        ],
    );
    let event = decode_frame(&frame).unwrap();
    let routing = route_event(&event, &state, CLOCK);
    let reasons: Vec<&str> = routing.dropped.iter().map(|d| d.reason).collect();
    assert_eq!(reasons, ["wrong_type", "transform"]);
    assert_eq!(routing.files.len(), 1);
    assert!(routing.files[0]
        .path
        .to_string()
        .ends_with("3l5kaaaaaac2a.json"));
    for u in &routing.updates {
        state.apply(u);
    }
}

#[test]
fn a_study_post_and_a_reply_to_it_in_the_same_commit() {
    let own = "at://did:plc:4llrhdclvdlmmynkwsmg5tdc/app.bsky.feed.post/3l5kaaaaaaa2a";
    check(
        &[commit(1, S2, &[create(POST, "3l5kaaaaaaa2a", post("thread")), create(POST, "3l5kaaaaaab2a", reply(own, own))])],
        &mut cast(),
        &[
            "study_user_activity/create/post/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaaa2a.json",
            "study_user_activity/create/post/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaab2a.json",
            "in_network_user_activity/create/post/did:plc:4llrhdclvdlmmynkwsmg5tdc/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaaa2a.json",
            "in_network_user_activity/create/post/did:plc:4llrhdclvdlmmynkwsmg5tdc/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaab2a.json",
            "study_user_activity/create/reply_to_user_post/3l5kaaaaaaa2a/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaab2a.json",
        ],
    );
}

#[test]
fn a_post_with_an_unexpected_embed_shape_is_still_routed() {
    // An open-union embed whose `record` is not a map: the fast view cannot read it, the post
    // is routed anyway (own folder and in-network), and its reply refs still count.
    let record = json!({"$type": POST, "text": "new embed kind", "createdAt": "2024-10-02T14:05:10.001Z",
        "embed": {"$type": "app.bsky.embed.somethingNew", "record": "not a map"},
        "reply": {"root": {"uri": STUDY_POST, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
                  "parent": {"uri": STUDY_POST, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}});
    check(
        &[commit(1, S2, &[create(POST, "3l5kaaaaaaa2a", record)])],
        &mut cast(),
        &[
            "study_user_activity/create/post/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaaa2a.json",
            "in_network_user_activity/create/post/did:plc:4llrhdclvdlmmynkwsmg5tdc/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaaa2a.json",
            "study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_post_uri_suffix=3l5kaaaaaaa2a.json",
        ],
    );
}

// ---- review gaps (issue 11b) -------------------------------------------------------------------

/// A quote whose embed `$type` is spelled with `#main` is the same lexicon type: the post's
/// `embed` JSON already counted it as a quote, and routing now agrees (it used to miss it).
#[test]
fn quotes_with_main_suffixed_embed_types_are_routed() {
    let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
    let quote_record = json!({"$type": POST, "text": "q", "createdAt": "2024-10-02T14:05:10.001Z",
        "embed": {"$type": "app.bsky.embed.record#main", "record": {"uri": STUDY_POST, "cid": cid}}});
    let quote_media = json!({"$type": POST, "text": "q", "createdAt": "2024-10-02T14:05:10.001Z",
        "embed": {"$type": "app.bsky.embed.recordWithMedia#main",
                  "record": {"$type": "app.bsky.embed.record#main", "record": {"uri": STUDY_POST, "cid": cid}},
                  "media": {"$type": "app.bsky.embed.images#main", "images": [{"alt": "a"}]}}});
    let files = check(
        &[commit(1, A3, &[create(POST, "3l5kqqqqqqq2q", quote_record), create(POST, "3l5kqqqqqqr2q", quote_media)])],
        &mut cast(),
        &[
            "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kqqqqqqq2q.json",
            "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kqqqqqqr2q.json",
        ],
    );
    for contents in files.values() {
        let v: Value = serde_json::from_str(contents).unwrap();
        let embed: Value = serde_json::from_str(v["embed"].as_str().unwrap()).unwrap();
        assert_eq!(embed["has_embedded_record"], true);
        assert_eq!(embed["embedded_record"]["uri"], STUDY_POST);
    }
}

/// An in-network post's delete follows the post: routed when the post was routed (even if the
/// author has left the network since), not when the author merely is in the network today.
#[test]
fn in_network_post_deletes_follow_what_was_routed_not_todays_membership() {
    let mut state = cast();
    let a1 = Did::parse(A1).unwrap();
    let a3 = Did::parse(A3).unwrap();
    run(
        &[
            commit(
                1,
                A1,
                &[create(POST, "3l5kaaaaaaa2a", post("routed in-network"))],
            ),
            commit(
                2,
                A3,
                &[create(POST, "3l5kbbbbbbb2b", post("before A3 joined"))],
            ),
            // A3 joins the network, A1 leaves it (the operator's file no longer lists it).
            commit(3, S1, &[create(FOLLOW, "3l5kfffffff2f", follow(A3))]),
        ],
        &mut state,
    );
    state.in_network.remove(&a1);
    assert!(!state.is_in_network(&a1) && state.is_in_network(&a3));
    check(
        &[
            commit(4, A1, &[OpSpec::delete(POST, "3l5kaaaaaaa2a")]),
            commit(5, A3, &[OpSpec::delete(POST, "3l5kbbbbbbb2b")]),
            // created and deleted in one commit: the delete sees the create
            commit(6, A3, &[create(POST, "3l5kccccccc2c", post("gone at once")), OpSpec::delete(POST, "3l5kccccccc2c")]),
        ],
        &mut state,
        &[
            "in_network_user_activity/delete/post/did:plc:w4xbfzo7kqfes5zb7r6qv3rw/author_did=did:plc:w4xbfzo7kqfes5zb7r6qv3rw_post_uri_suffix=3l5kaaaaaaa2a.json",
            "in_network_user_activity/create/post/did:plc:ragtjsm2j2vknwkz3zp4oxrd/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kccccccc2c.json",
            "in_network_user_activity/delete/post/did:plc:ragtjsm2j2vknwkz3zp4oxrd/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kccccccc2c.json",
        ],
    );
}

/// A study user deletes a follow made before tracking began: the state never saw the record, so
/// its subject is unknown. The delete file is still written, the account stays (nothing says
/// which one it was), and the unfollow is reported and recorded.
#[test]
fn an_unfollow_of_a_follow_made_before_tracking_is_reported_and_recorded() {
    let mut state = cast();
    let frame = commit(1, S1, &[OpSpec::delete(FOLLOW, "3l4aaaaaaaa2a")]);
    let event = decode_frame(&frame).unwrap();
    let routing = route_event(&event, &state, CLOCK);
    assert_eq!(
        routing.files[0].path.to_string(),
        "study_user_activity/delete/follow/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_follow_uri_suffix=3l4aaaaaaaa2a.json"
    );
    let applied: Vec<Applied> = routing.updates.iter().map(|u| state.apply(u)).collect();
    assert_eq!(applied, [Applied::UnknownUnfollow]);
    assert_eq!(
        state
            .unknown_unfollows
            .iter()
            .map(|u| u.as_str())
            .collect::<Vec<_>>(),
        ["at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.graph.follow/3l4aaaaaaaa2a"]
    );
    for did in [S2, A1] {
        assert!(state.is_in_network(&Did::parse(did).unwrap()));
    }
    // A follow seen in the stream is not unknown.
    let mut applied = Vec::new();
    for frame in [
        commit(2, S1, &[create(FOLLOW, "3l5kfffffff2f", follow(A3))]),
        commit(3, S1, &[OpSpec::delete(FOLLOW, "3l5kfffffff2f")]),
    ] {
        let event = decode_frame(&frame).unwrap();
        for u in &route_event(&event, &state, CLOCK).updates {
            applied.push(state.apply(u));
        }
    }
    assert_eq!(applied, [Applied::Done, Applied::Done]);
    assert!(!state.is_in_network(&Did::parse(A3).unwrap()));
    assert_eq!(state.unknown_unfollows.len(), 1);
}

/// The in-network input is not the stream's to edit: an account it lists stays in-network after
/// a study user follows and unfollows it (the SQLite state always behaved so; the in-memory one
/// used to drop it).
#[test]
fn an_unfollow_never_removes_an_account_the_in_network_input_lists() {
    let mut state = cast();
    let a1 = Did::parse(A1).unwrap();
    run(
        &[
            commit(1, S1, &[create(FOLLOW, "3l5kfffffff2f", follow(A1))]),
            commit(2, S1, &[OpSpec::delete(FOLLOW, "3l5kfffffff2f")]),
        ],
        &mut state,
    );
    assert!(state.is_in_network(&a1));
    check(
        &[commit(3, A1, &[create(POST, "3l5kpppppp22p", post("still routed"))])],
        &mut state,
        &["in_network_user_activity/create/post/did:plc:w4xbfzo7kqfes5zb7r6qv3rw/author_did=did:plc:w4xbfzo7kqfes5zb7r6qv3rw_post_uri_suffix=3l5kpppppp22p.json"],
    );
}

/// A valid record key may begin with `.`; as a nesting folder it is written `%2E...` so that it
/// is not a hidden name (which the export skips). It used to be dropped as `hidden_name`.
#[test]
fn study_posts_whose_rkey_starts_with_a_dot_nest_under_an_encoded_folder() {
    let dot_post = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/.x1";
    let mut state = cast();
    state
        .study_posts
        .insert(dot_post.to_owned(), Did::parse(S1).unwrap());
    let repost = json!({"$type": REPOST, "createdAt": "2024-10-02T14:05:10.001Z",
        "subject": {"uri": dot_post, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}});
    let files = check(
        &[
            commit(1, S2, &[create(LIKE, "3l5jv9zzzzz2c", like(dot_post))]),
            commit(2, A3, &[create(POST, "3l5kbbbbbbb2b", reply(dot_post, dot_post))]),
            commit(3, A2, &[create(REPOST, "3l5krrrrrrr2r", repost)]),
            commit(4, S2, &[OpSpec::delete(LIKE, "3l5jv9zzzzz2c")]),
        ],
        &mut state,
        &[
            "study_user_activity/create/like/%2Ex1/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json",
            "study_user_activity/create/like_on_user_post/%2Ex1/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json",
            "study_user_activity/create/reply_to_user_post/%2Ex1/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5kbbbbbbb2b.json",
            "study_user_activity/create/repost_of_user_post/%2Ex1/author_did=did:plc:q6gjnaw2blty4crticxkmujt_repost_uri_suffix=3l5krrrrrrr2r.json",
            "study_user_activity/delete/like/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json",
            "study_user_activity/delete/like_on_user_post/%2Ex1/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json",
        ],
    );
    let like: Value = serde_json::from_str(&files["study_user_activity/create/like_on_user_post/%2Ex1/author_did=did:plc:4llrhdclvdlmmynkwsmg5tdc_like_uri_suffix=3l5jv9zzzzz2c.json"]).unwrap();
    assert_eq!(
        like["record"]["subject"]["uri"], dot_post,
        "contents keep the real URI"
    );
    // A study user's own post with such a key: its file name keeps the key as is (not first).
    check(
        &[commit(5, S1, &[create(POST, ".y2", post("dot"))])],
        &mut cast(),
        &["study_user_activity/create/post/author_did=did:plc:z72i7hdynmk6r22z27h6tvur_post_uri_suffix=.y2.json"],
    );
}

/// A post URI names its author: reactions to a study user's post that no index has seen (made
/// before tracking began) are routed by that rule; a URI that is not a post, or names an
/// untracked author, is not.
#[test]
fn reactions_to_unindexed_posts_of_study_users_are_routed_by_the_uri_author() {
    let old_post = format!("at://{S1}/app.bsky.feed.post/3jzfcijpj2z2a");
    let not_a_post = format!("at://{S1}/app.bsky.feed.generator/3jzfcijpj2z2a");
    let other_author = format!("at://{A1}/app.bsky.feed.post/3jzfcijpj2z2a");
    check(
        &[
            commit(1, A2, &[create(LIKE, "3l5jv2xq4tk2p", like(&old_post))]),
            commit(2, A3, &[create(POST, "3l5jv2xq4tk3a", reply(&old_post, &old_post))]),
            commit(3, A2, &[create(LIKE, "3l5jv2xq4tk4a", like(&not_a_post))]),
            commit(4, A3, &[create(LIKE, "3l5jv2xq4tk5a", like(&other_author))]),
        ],
        &mut cast(),
        &[
            "study_user_activity/create/like_on_user_post/3jzfcijpj2z2a/author_did=did:plc:q6gjnaw2blty4crticxkmujt_like_uri_suffix=3l5jv2xq4tk2p.json",
            "study_user_activity/create/reply_to_user_post/3jzfcijpj2z2a/author_did=did:plc:ragtjsm2j2vknwkz3zp4oxrd_post_uri_suffix=3l5jv2xq4tk3a.json",
        ],
    );
}

/// `frame` with one record's `createdAt` altered in place: the block still decodes, but no
/// longer hashes to the CID its op names.
fn tampered(frame: Vec<u8>, created_at: &str, forged: &str) -> Vec<u8> {
    assert_eq!(created_at.len(), forged.len());
    let at = frame
        .windows(created_at.len())
        .position(|w| w == created_at.as_bytes())
        .expect("the record is in the frame");
    let mut frame = frame;
    frame[at..at + forged.len()].copy_from_slice(forged.as_bytes());
    frame
}

#[test]
fn a_record_whose_block_does_not_hash_to_its_cid_is_never_kept() {
    let state = cast();
    let other_post = "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jnpb6xyz2k";
    // (drop reasons, files, state updates) of one tampered create by `repo`.
    let route = |repo: &str, collection: &str, record: Value, created_at: &str| {
        // The last digit of the milliseconds, changed.
        let mut forged = created_at.as_bytes().to_vec();
        let digit = forged.len() - 2;
        forged[digit] = if forged[digit] == b'9' {
            b'8'
        } else {
            forged[digit] + 1
        };
        let forged = String::from_utf8(forged).unwrap();
        let frame = tampered(
            commit(
                1,
                repo,
                &[create(collection, "3l5kaaaaaaa2a", record.clone())],
            ),
            created_at,
            &forged,
        );
        let event = decode_frame(&frame).expect("the frame itself is intact");
        let routing = route_event(&event, &state, CLOCK);
        let reasons: Vec<&str> = routing.dropped.iter().map(|d| d.reason).collect();
        // The same op untampered routes (the tampering is what made the difference).
        let clean = commit(1, repo, &[create(collection, "3l5kaaaaaaa2a", record)]);
        let clean = route_event(&decode_frame(&clean).unwrap(), &state, CLOCK);
        assert!(clean.dropped.is_empty(), "{:?}", clean.dropped);
        (
            reasons,
            routing.files.len(),
            routing.updates.len(),
            clean.files.len(),
        )
    };
    let like_at = "2024-10-02T14:20:11.093Z";
    let reply_at = "2024-10-02T14:05:10.001Z";
    let follow_at = "2024-10-02T14:25:00.000Z";
    let post_at = "2024-10-02T14:03:27.512Z";
    let bad = |clean_files| (vec!["cid_mismatch"], 0, 0, clean_files);
    // A stranger's records that would be routed (a like on, a reply to a study post, a follow of
    // a study user) are dropped, each counted once.
    assert_eq!(route(A2, LIKE, like(STUDY_POST), like_at), bad(1));
    assert_eq!(
        route(A2, POST, reply(STUDY_POST, STUDY_POST), reply_at),
        bad(1)
    );
    assert_eq!(route(A2, FOLLOW, follow(S1), follow_at), bad(1));
    // A study user's record is checked whatever it routes to, and so is an in-network account's
    // post: a bad one is a record of theirs the commit should have carried (its repo's resync
    // compares it).
    assert_eq!(route(S1, LIKE, like(other_post), like_at), bad(1));
    assert_eq!(route(A1, POST, post("hello"), post_at), bad(1));
    // Anyone's record that routes nowhere is read only to learn that: nothing kept, nothing
    // counted (an in-network account's like, a stranger's like or post).
    assert_eq!(
        route(A1, LIKE, like(other_post), like_at),
        (vec![], 0, 0, 0)
    );
    assert_eq!(
        route(A2, LIKE, like(other_post), like_at),
        (vec![], 0, 0, 0)
    );
    assert_eq!(route(A2, POST, post("hello"), post_at), (vec![], 0, 0, 0));
}
