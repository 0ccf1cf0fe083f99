//! Worked examples of `predecessor-data-format.md` §1.7 (posts and embed strings), §2.1 (likes,
//! Era H and Era S) and §2.2 (follows): our output must equal the spec's output, which is exact
//! Python `json.dumps` output, both as parsed JSON and byte for byte. Plus the §1.4, §1.6 / §6 Q3
//! and Q4 edge cases.
//!
//! The expected strings are copied verbatim from the spec.

use serde_json::{json, Value};
use sync_core::pyjson::{py_str, PyJsonWriter};
use sync_core::transform::{
    embed_json, follow_cache_json, generic_record_cache_json, like_cache_json,
    like_record_string_era_s, sync_timestamp, transform_post, LikeRecord, Post,
};

/// §1.7 Example 1 input (envelope + record).
const EX1_INPUT: &str = r#"{"uri": "at://did:plc:w4xbfzo7kqfes5zb7r6qv3rw/app.bsky.feed.post/3l5jqyv2s4k2c",
 "cid": "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5q5stv7lcmjvvty",
 "author": "did:plc:w4xbfzo7kqfes5zb7r6qv3rw",
 "record": {"$type": "app.bsky.feed.post", "text": "Good morning, Bluesky!",
            "createdAt": "2024-10-02T14:03:27.512Z", "langs": ["en"]}}"#;

/// §1.7 Example 1 output (clock `2024-10-02-14:03:28`).
const EX1_OUTPUT: &str = r#"{"uri": "at://did:plc:w4xbfzo7kqfes5zb7r6qv3rw/app.bsky.feed.post/3l5jqyv2s4k2c", "cid": "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5q5stv7lcmjvvty", "indexed_at": null, "author_did": "did:plc:w4xbfzo7kqfes5zb7r6qv3rw", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:03:27.512Z", "text": "Good morning, Bluesky!", "embed": "{\"has_image\": false, \"image_alt_text\": null, \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}", "entities": null, "facets": null, "labels": null, "langs": "en", "reply_parent": null, "reply_root": null, "tags": null, "synctimestamp": "2024-10-02-14:03:28", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"#;

/// §1.7 Example 2 input.
const EX2_INPUT: &str = r#"{"uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.post/3l5jr4q7m2s2x",
 "cid": "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
 "author": "did:plc:q6gjnaw2blty4crticxkmujt",
 "record": {"$type": "app.bsky.feed.post",
  "text": "Agreed — full report: example.org/report",
  "createdAt": "2024-10-02T14:05:10.001Z", "langs": ["en"],
  "reply": {"root":   {"uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k",
                       "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
            "parent": {"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j",
                       "cid": "bafyreif75yqxyt6g7h3pmvsj3l3e5u7y3wmb2z4y6ahtbbt7b2c5tmb3fu"}},
  "facets": [{"index": {"byteStart": 24, "byteEnd": 42},
              "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.org/report"}]}],
  "embed": {"$type": "app.bsky.embed.images", "images": [
     {"alt": "Bar chart of turnout by région",
      "image": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/jpeg", "size": 399062},
      "aspectRatio": {"width": 1200, "height": 800}},
     {"alt": "",
      "image": {"$type": "blob", "ref": {"$link": "bafkreidtepeeezypyvsk4yi7vmlv3gclpe5aizuerzkj2ok4karm5pgydm"}, "mimeType": "image/png", "size": 81234}}]}}}"#;

/// §1.7 Example 2 output (clock `2024-10-02-14:05:11`).
const EX2_OUTPUT: &str = r#"{"uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.post/3l5jr4q7m2s2x", "cid": "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", "indexed_at": null, "author_did": "did:plc:q6gjnaw2blty4crticxkmujt", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:05:10.001Z", "text": "Agreed \u2014 full report: example.org/report", "embed": "{\"has_image\": true, \"image_alt_text\": \"Bar chart of turnout by r\\u00e9gion;\", \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}", "entities": null, "facets": "link:https://example.org/report", "labels": null, "langs": "en", "reply_parent": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j", "reply_root": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "tags": null, "synctimestamp": "2024-10-02-14:05:11", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"#;

/// §1.7 Example 3 input.
const EX3_INPUT: &str = r#"{"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jsz2v4fc2d",
 "cid": "bafyreigyuo3gfqvzpa3t4uqq7rbvkopyv4g4efbgnmgmjznwkmo2w2hr4e",
 "author": "did:plc:ragtjsm2j2vknwkz3zp4oxrd",
 "record": {"$type": "app.bsky.feed.post",
  "text": "Worth reading, @alice.bsky.social #science",
  "createdAt": "2024-10-02T14:07:45.250Z", "langs": ["en", "de"], "tags": ["science", "openaccess"],
  "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "graphic-media"}, {"val": "nudity"}]},
  "facets": [{"index": {"byteStart": 15, "byteEnd": 33}, "features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:z72i7hdynmk6r22z27h6tvur"}]},
             {"index": {"byteStart": 34, "byteEnd": 42}, "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "science"}]}],
  "embed": {"$type": "app.bsky.embed.record",
            "record": {"uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k",
                       "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}}}"#;

/// §1.7 Example 3 output (clock `2024-10-02-14:07:46`).
const EX3_OUTPUT: &str = r#"{"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jsz2v4fc2d", "cid": "bafyreigyuo3gfqvzpa3t4uqq7rbvkopyv4g4efbgnmgmjznwkmo2w2hr4e", "indexed_at": null, "author_did": "did:plc:ragtjsm2j2vknwkz3zp4oxrd", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:07:45.250Z", "text": "Worth reading, @alice.bsky.social #science", "embed": "{\"has_image\": false, \"image_alt_text\": null, \"has_embedded_record\": true, \"embedded_record\": {\"cid\": \"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm\", \"uri\": \"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k\"}, \"has_external\": false, \"external\": null}", "entities": null, "facets": "mention:did:plc:z72i7hdynmk6r22z27h6tvur;tag:science", "labels": "graphic-media;nudity", "langs": "en;de", "reply_parent": null, "reply_root": null, "tags": "science;openaccess", "synctimestamp": "2024-10-02-14:07:46", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"#;

/// §2.1 Era H like cache JSON.
const LIKE_ERA_H_OUTPUT: &str = r#"{"uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p", "cid": "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri", "author": "did:plc:q6gjnaw2blty4crticxkmujt", "record": {"createdAt": "2024-10-02T14:20:11.093Z", "subject": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "py_type": "com.atproto.repo.strongRef"}, "py_type": "app.bsky.feed.like"}}"#;

/// §2.1 Era S like cache JSON (the `record` string reached Parquet).
const LIKE_ERA_S_OUTPUT: &str = r#"{"author": "did:plc:q6gjnaw2blty4crticxkmujt", "cid": "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri", "record": "{\"created_at\": \"2024-10-02T14:20:11.093Z\", \"subject\": {\"cid\": \"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm\", \"uri\": \"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k\", \"py_type\": \"com.atproto.repo.strongRef\"}, \"py_type\": \"app.bsky.feed.like\"}", "uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p"}"#;

/// §2.2 Era H follow cache JSON.
const FOLLOW_ERA_H_OUTPUT: &str = r#"{"uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.graph.follow/3l5jw7c2bde2s", "cid": "bafyreibwn4kwlezxabt2bzpopwfh7lbo56n4xb62wlbm5moqliwl4pzum4", "record": {"createdAt": "2024-10-02T14:25:00.000Z", "subject": "did:plc:q6gjnaw2blty4crticxkmujt", "py_type": "app.bsky.graph.follow"}, "author": "did:plc:z72i7hdynmk6r22z27h6tvur", "follower_did": "did:plc:z72i7hdynmk6r22z27h6tvur", "followee_did": "did:plc:q6gjnaw2blty4crticxkmujt"}"#;

/// Asserts equality as parsed JSON values first (readable diff), then byte for byte.
fn assert_same_json(actual: &str, expected: &str) {
    let a: Value = serde_json::from_str(actual).expect("our output is valid JSON");
    let e: Value = serde_json::from_str(expected).expect("expected output is valid JSON");
    assert_eq!(a, e, "outputs differ as JSON values");
    assert_eq!(actual, expected, "outputs differ byte for byte");
    assert!(actual.is_ascii());
    assert!(!actual.ends_with('\n'));
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is a string"))
}

/// Runs the post transform on a spec input `{"uri", "cid", "author", "record"}`.
fn post_from_input(input: &str, synctimestamp: &str) -> Post {
    let input: Value = serde_json::from_str(input).expect("input is valid JSON");
    transform_post(
        str_field(&input, "uri"),
        str_field(&input, "cid"),
        str_field(&input, "author"),
        &input["record"],
        synctimestamp,
    )
    .expect("post transforms")
}

fn post_record(extra: Value) -> Value {
    let mut record = json!({
        "$type": "app.bsky.feed.post",
        "text": "hello",
        "createdAt": "2024-10-02T14:03:27.512Z",
    });
    let map = record.as_object_mut().expect("object");
    for (k, v) in extra.as_object().expect("object") {
        map.insert(k.clone(), v.clone());
    }
    record
}

fn transform(record: &Value) -> Post {
    transform_post(
        "at://did:plc:w4xbfzo7kqfes5zb7r6qv3rw/app.bsky.feed.post/3l5jqyv2s4k2c",
        "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5q5stv7lcmjvvty",
        "did:plc:w4xbfzo7kqfes5zb7r6qv3rw",
        record,
        "2024-10-02-14:03:28",
    )
    .expect("post is kept")
}

const QUOTED_URI: &str = "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k";
const QUOTED_CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
const NO_EMBED: &str = r#"{"has_image": false, "image_alt_text": null, "has_embedded_record": false, "embedded_record": null, "has_external": false, "external": null}"#;

// ---------------------------------------------------------------------------------------------
// §1.7 worked examples
// ---------------------------------------------------------------------------------------------

#[test]
fn example_1_plain_post_with_langs() {
    // The clock 2024-10-02-14:03:28 is Unix time 1727877808.
    let ts = sync_timestamp(1_727_877_808);
    assert_eq!(ts, "2024-10-02-14:03:28");
    let post = post_from_input(EX1_INPUT, &ts);
    assert_same_json(&post.to_cache_json(), EX1_OUTPUT);
}

#[test]
fn example_2_reply_with_link_facet_and_two_images() {
    let ts = sync_timestamp(1_727_877_808 + 103);
    assert_eq!(ts, "2024-10-02-14:05:11");
    let post = post_from_input(EX2_INPUT, &ts);
    assert_same_json(&post.to_cache_json(), EX2_OUTPUT);

    // Notes of the example: the text parses to the real em dash; the embed string (the Parquet
    // cell) holds the literal six ASCII characters `\u00e9`; the empty second alt gives the `;`.
    let parsed: Value = serde_json::from_str(&post.to_cache_json()).expect("valid");
    assert_eq!(
        parsed["text"],
        "Agreed \u{2014} full report: example.org/report"
    );
    let cell = parsed["embed"].as_str().expect("embed is a string");
    assert_eq!(cell, post.embed);
    assert!(cell.contains(r"by r\u00e9gion;"));
    let embed: Value = serde_json::from_str(cell).expect("embed is JSON");
    assert_eq!(
        embed["image_alt_text"],
        "Bar chart of turnout by r\u{e9}gion;"
    );
}

#[test]
fn example_3_quote_post_with_mention_tag_tags_langs_and_labels() {
    let ts = sync_timestamp(1_727_877_808 + 258);
    assert_eq!(ts, "2024-10-02-14:07:46");
    let post = post_from_input(EX3_INPUT, &ts);
    assert_same_json(&post.to_cache_json(), EX3_OUTPUT);
}

#[test]
fn example_embed_strings_match_post_embed_field() {
    for (input, output) in [
        (EX1_INPUT, EX1_OUTPUT),
        (EX2_INPUT, EX2_OUTPUT),
        (EX3_INPUT, EX3_OUTPUT),
    ] {
        let input: Value = serde_json::from_str(input).expect("valid");
        let output: Value = serde_json::from_str(output).expect("valid");
        assert_eq!(embed_json(&input["record"]), str_field(&output, "embed"));
    }
}

// ---------------------------------------------------------------------------------------------
// §1.7 additional embed strings (shown in the spec as the decoded string value)
// ---------------------------------------------------------------------------------------------

#[test]
fn embed_external_with_quotes_in_title() {
    let record = post_record(json!({"embed": {
        "$type": "app.bsky.embed.external",
        "external": {
            "uri": "https://www.example.com/news/article-1",
            "title": "Headline \"quoted\"",
            "description": "A short description.",
            "thumb": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/jpeg", "size": 1234}
        }
    }}));
    let expected = r#"{"has_image": false, "image_alt_text": null, "has_embedded_record": false, "embedded_record": null, "has_external": true, "external": {"description": "A short description.", "title": "Headline \"quoted\"", "uri": "https://www.example.com/news/article-1"}}"#;
    assert_same_json(&embed_json(&record), expected);

    // In the cache file the embed string is escaped a second time.
    let file = transform(&record).to_cache_json();
    assert!(
        file.contains(r#"\"title\": \"Headline \\\"quoted\\\"\""#),
        "{file}"
    );
    let parsed: Value = serde_json::from_str(&file).expect("valid");
    assert_eq!(parsed["embed"], expected);
}

#[test]
fn embed_record_with_media_two_images() {
    let record = post_record(json!({"embed": {
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {"$type": "app.bsky.embed.record", "record": {"uri": QUOTED_URI, "cid": QUOTED_CID}},
        "media": {"$type": "app.bsky.embed.images", "images": [
            {"alt": "first", "image": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/jpeg", "size": 10}},
            {"alt": "second", "image": {"$type": "blob", "ref": {"$link": "bafkreidtepeeezypyvsk4yi7vmlv3gclpe5aizuerzkj2ok4karm5pgydm"}, "mimeType": "image/png", "size": 20}}
        ]}
    }}));
    // The spec abbreviates the cid as `bafyrei…3hpm`; it is QUOTED_CID.
    let expected = r#"{"has_image": true, "image_alt_text": "first;second", "has_embedded_record": true, "embedded_record": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"}, "has_external": false, "external": null}"#;
    assert_same_json(&embed_json(&record), expected);
}

#[test]
fn embed_record_with_media_external_is_dropped_q1() {
    let record = post_record(json!({"embed": {
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {"$type": "app.bsky.embed.record", "record": {"uri": QUOTED_URI, "cid": QUOTED_CID}},
        "media": {"$type": "app.bsky.embed.external", "external": {
            "uri": "https://www.example.com/news/article-1", "title": "T", "description": "D"}}
    }}));
    // The spec elides the embedded_record as `{…}`; it is the strongRef of `embed.record.record`.
    let expected = r#"{"has_image": true, "image_alt_text": "", "has_embedded_record": true, "embedded_record": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"}, "has_external": false, "external": null}"#;
    assert_same_json(&embed_json(&record), expected);
}

#[test]
fn embed_record_with_media_video_q1() {
    let record = post_record(json!({"embed": {
        "$type": "app.bsky.embed.recordWithMedia",
        "record": {"$type": "app.bsky.embed.record", "record": {"uri": QUOTED_URI, "cid": QUOTED_CID}},
        "media": {"$type": "app.bsky.embed.video", "alt": "a video",
                  "video": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "video/mp4", "size": 1000}}
    }}));
    let expected = r#"{"has_image": true, "image_alt_text": "", "has_embedded_record": true, "embedded_record": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"}, "has_external": false, "external": null}"#;
    assert_same_json(&embed_json(&record), expected);
}

#[test]
fn embed_video_is_the_same_as_no_embed_q2() {
    let record = post_record(json!({"embed": {
        "$type": "app.bsky.embed.video", "alt": "ignored alt",
        "video": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "video/mp4", "size": 1000},
        "aspectRatio": {"width": 16, "height": 9}
    }}));
    assert_same_json(&embed_json(&record), NO_EMBED);
    assert_same_json(&embed_json(&post_record(json!({}))), NO_EMBED);
}

#[test]
fn embed_unknown_type_is_all_false() {
    let record =
        post_record(json!({"embed": {"$type": "com.example.embed.poll", "options": ["a"]}}));
    assert_same_json(&embed_json(&record), NO_EMBED);
    assert_eq!(transform(&record).embed, NO_EMBED);
}

#[test]
fn embed_images_empty_list_q4() {
    let record = post_record(json!({"embed": {"$type": "app.bsky.embed.images", "images": []}}));
    let expected = r#"{"has_image": true, "image_alt_text": "", "has_embedded_record": false, "embedded_record": null, "has_external": false, "external": null}"#;
    assert_same_json(&embed_json(&record), expected);
}

#[test]
fn embed_images_empty_alts_are_kept() {
    let img = |alt: &str| json!({"alt": alt, "image": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/png", "size": 1}});
    let record = post_record(
        json!({"embed": {"$type": "app.bsky.embed.images", "images": [img("A"), img("")]}}),
    );
    assert!(embed_json(&record).contains(r#""image_alt_text": "A;""#));
    let record = post_record(
        json!({"embed": {"$type": "app.bsky.embed.images", "images": [img(""), img("")]}}),
    );
    assert!(embed_json(&record).contains(r#""image_alt_text": ";""#));
}

#[test]
fn embed_astral_alt_text_is_surrogate_escaped_twice() {
    let record = post_record(
        json!({"embed": {"$type": "app.bsky.embed.images", "images": [
        {"alt": "smile \u{1F600}", "image": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/png", "size": 1}}]}}),
    );
    let embed = embed_json(&record);
    assert!(
        embed.contains(r#""image_alt_text": "smile \ud83d\ude00""#),
        "{embed}"
    );
    let file = transform(&record).to_cache_json();
    assert!(
        file.contains(r#"\"image_alt_text\": \"smile \\ud83d\\ude00\""#),
        "{file}"
    );
}

// ---------------------------------------------------------------------------------------------
// §1.4 facets, §1.6 / Q3, Q4, empty lists
// ---------------------------------------------------------------------------------------------

#[test]
fn facets_with_empty_features_give_an_empty_segment() {
    // Produces the §1.4 example shape `link:https://a.example;mention:did:plc:…;;tag:Tag;x`: a facet
    // with a link and a mention, a facet with `features: []`, and a tag whose value contains the
    // unescaped separator (Q5).
    let record = post_record(json!({"facets": [
        {"index": {"byteStart": 0, "byteEnd": 5}, "features": [
            {"$type": "app.bsky.richtext.facet#link", "uri": "https://a.example"},
            {"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:z72i7hdynmk6r22z27h6tvur"}]},
        {"index": {"byteStart": 6, "byteEnd": 7}, "features": []},
        {"index": {"byteStart": 8, "byteEnd": 12}, "features": [
            {"$type": "app.bsky.richtext.facet#tag", "tag": "Tag;x"}]}
    ]}));
    assert_eq!(
        transform(&record).facets.as_deref(),
        Some("link:https://a.example;mention:did:plc:z72i7hdynmk6r22z27h6tvur;;tag:Tag;x")
    );

    // The same string from one facet per feature.
    let record = post_record(json!({"facets": [
        {"features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://a.example"}]},
        {"features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:z72i7hdynmk6r22z27h6tvur"}]},
        {"features": []},
        {"features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "Tag;x"}]}
    ]}));
    assert_eq!(
        transform(&record).facets.as_deref(),
        Some("link:https://a.example;mention:did:plc:z72i7hdynmk6r22z27h6tvur;;tag:Tag;x")
    );
}

#[test]
fn facet_type_alternative_spellings_and_tag_case() {
    let record = post_record(json!({"facets": [{"features": [
        {"$type": "app.bsky.richtext.facet.mention", "did": "did:plc:q6gjnaw2blty4crticxkmujt"},
        {"$type": "app.bsky.richtext.facet.link", "uri": "https://b.example/x"},
        {"$type": "app.bsky.richtext.facet.tag", "tag": "Dot"},
        {"$type": "App.Bsky.Richtext.Facet#TAG", "tag": "UPPER"}
    ]}]}));
    assert_eq!(
        transform(&record).facets.as_deref(),
        Some("mention:did:plc:q6gjnaw2blty4crticxkmujt;link:https://b.example/x;tag:Dot;tag:UPPER")
    );
}

#[test]
fn post_with_labels_and_unknown_facet_feature_is_kept_q3() {
    // The predecessor dropped this post twice over (unknown facet feature → validation fallback;
    // labels in fallback mode → TypeError). We keep it, skip the unknown feature, keep the labels
    // and still process the valid embed.
    let record = post_record(json!({
        "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "graphic-media"}]},
        "facets": [
            {"index": {"byteStart": 0, "byteEnd": 3}, "features": [
                {"$type": "com.example.richtext.facet#highlight", "color": "red"},
                {"$type": "app.bsky.richtext.facet#link", "uri": "https://c.example"}]},
            {"index": {"byteStart": 4, "byteEnd": 6}, "features": [
                {"$type": "com.example.richtext.facet#spoiler"}]},
            {"index": {"byteStart": 7, "byteEnd": 9}, "features": [
                {"$type": "app.bsky.richtext.facet#tag", "tag": "kept"}]}
        ],
        "embed": {"$type": "app.bsky.embed.record", "record": {"uri": QUOTED_URI, "cid": QUOTED_CID}}
    }));
    let post = transform(&record);
    assert_eq!(post.labels.as_deref(), Some("graphic-media"));
    // A facet whose only feature is unknown contributes an empty segment, like `features: []`.
    assert_eq!(
        post.facets.as_deref(),
        Some("link:https://c.example;;tag:kept")
    );
    assert!(post.embed.contains(r#""has_embedded_record": true"#));
}

#[test]
fn post_failing_lexicon_limits_is_kept_q3() {
    // More than 3 langs, more than 8 tags, > 3000 chars of text: the predecessor fell back to the
    // all-false embed; we process by $type.
    let record = post_record(json!({
        "text": "x".repeat(3001),
        "langs": ["en", "de", "fr", "es"],
        "tags": ["a", "b", "c", "d", "e", "f", "g", "h", "i"],
        "embed": {"$type": "app.bsky.embed.images", "images": [{"alt": "kept"}]}
    }));
    let post = transform(&record);
    assert_eq!(post.langs.as_deref(), Some("en;de;fr;es"));
    assert_eq!(post.tags.as_deref(), Some("a;b;c;d;e;f;g;h;i"));
    assert!(post.embed.contains(r#""image_alt_text": "kept""#));
}

#[test]
fn empty_label_values_give_empty_string_q4() {
    let record = post_record(json!({
        "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": []}
    }));
    let post = transform(&record);
    assert_eq!(post.labels.as_deref(), Some(""));
    assert!(post.to_cache_json().contains(r#""labels": "", "#));
    assert_eq!(transform(&post_record(json!({}))).labels, None);
}

#[test]
fn empty_lists_give_null() {
    let record = post_record(json!({"langs": [], "tags": [], "entities": [], "facets": []}));
    let post = transform(&record);
    assert_eq!(post.langs, None);
    assert_eq!(post.tags, None);
    assert_eq!(post.entities, None);
    assert_eq!(post.facets, None);
    let json = post.to_cache_json();
    for key in ["entities", "facets", "labels", "langs", "tags"] {
        assert!(
            json.contains(&format!(r#""{key}": null"#)),
            "{key} in {json}"
        );
    }
}

#[test]
fn entities_values_are_joined() {
    let record = post_record(json!({"entities": [
        {"index": {"start": 0, "end": 4}, "type": "mention", "value": "did:plc:z72i7hdynmk6r22z27h6tvur"},
        {"index": {"start": 5, "end": 9}, "type": "link", "value": "https://d.example"}
    ]}));
    assert_eq!(
        transform(&record).entities.as_deref(),
        Some("did:plc:z72i7hdynmk6r22z27h6tvur;https://d.example")
    );
}

#[test]
fn unusable_posts_are_errors() {
    for record in [
        json!({"$type": "app.bsky.feed.post", "text": "no date"}),
        json!({"$type": "app.bsky.feed.post", "text": "bad date", "createdAt": null}),
        json!({"$type": "app.bsky.feed.post", "createdAt": "2024-10-02T14:03:27.512Z"}),
        json!({"$type": "app.bsky.feed.repost", "text": "t", "createdAt": "2024-10-02T14:03:27.512Z"}),
        json!({"text": "t", "createdAt": "2024-10-02T14:03:27.512Z"}),
        json!(["not", "an", "object"]),
    ] {
        assert!(
            transform_post("at://x", "bafy", "did:plc:x", &record, "ts").is_err(),
            "{record}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// §2.1 likes and §2.2 follows
// ---------------------------------------------------------------------------------------------

const LIKE_URI: &str = "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p";
const LIKE_CID: &str = "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri";
const LIKER: &str = "did:plc:q6gjnaw2blty4crticxkmujt";

fn like_record() -> Value {
    json!({
        "$type": "app.bsky.feed.like",
        "createdAt": "2024-10-02T14:20:11.093Z",
        "subject": {"uri": QUOTED_URI, "cid": QUOTED_CID},
        // Dropped by the transform.
        "via": {"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.repost/3l5jv1aaaaa2a",
                "cid": "bafyreif75yqxyt6g7h3pmvsj3l3e5u7y3wmb2z4y6ahtbbt7b2c5tmb3fu"}
    })
}

#[test]
fn like_era_h_cache_json() {
    let out = like_cache_json(LIKE_URI, LIKE_CID, LIKER, &like_record()).expect("like");
    assert_same_json(&out, LIKE_ERA_H_OUTPUT);
}

#[test]
fn like_era_s_cache_json() {
    let record = like_record();
    let like = LikeRecord::parse(&record).expect("like");
    let record_string =
        like_record_string_era_s(like.created_at, like.subject_cid, like.subject_uri);
    assert_eq!(
        record_string,
        r#"{"created_at": "2024-10-02T14:20:11.093Z", "subject": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "py_type": "com.atproto.repo.strongRef"}, "py_type": "app.bsky.feed.like"}"#
    );
    // The Era S document: key order author, cid, record (a JSON string), uri.
    let mut w = PyJsonWriter::new();
    w.begin_object()
        .field_str("author", LIKER)
        .field_str("cid", LIKE_CID)
        .field_str("record", &record_string)
        .field_str("uri", LIKE_URI)
        .end_object();
    assert_same_json(w.as_str(), LIKE_ERA_S_OUTPUT);
    let parsed: Value = serde_json::from_str(LIKE_ERA_S_OUTPUT).expect("valid");
    assert_eq!(parsed["record"], record_string.as_str());
    // The record string is escaped once more inside the document.
    assert!(w.as_str().contains(&py_str(&record_string)));
}

#[test]
fn follow_era_h_cache_json() {
    let record = json!({
        "$type": "app.bsky.graph.follow",
        "createdAt": "2024-10-02T14:25:00.000Z",
        "subject": "did:plc:q6gjnaw2blty4crticxkmujt"
    });
    let out = follow_cache_json(
        "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.graph.follow/3l5jw7c2bde2s",
        "bafyreibwn4kwlezxabt2bzpopwfh7lbo56n4xb62wlbm5moqliwl4pzum4",
        "did:plc:z72i7hdynmk6r22z27h6tvur",
        &record,
    )
    .expect("follow");
    assert_same_json(&out, FOLLOW_ERA_H_OUTPUT);
}

#[test]
fn like_and_follow_missing_fields_are_errors() {
    let mut like = like_record();
    like.as_object_mut().expect("object").remove("subject");
    assert!(like_cache_json(LIKE_URI, LIKE_CID, LIKER, &like).is_err());
    let mut like = like_record();
    like.as_object_mut().expect("object").remove("createdAt");
    assert!(like_cache_json(LIKE_URI, LIKE_CID, LIKER, &like).is_err());
    let follow = json!({"$type": "app.bsky.graph.follow", "createdAt": "2024-10-02T14:25:00.000Z"});
    assert!(follow_cache_json("at://x", "bafy", LIKER, &follow).is_err());
}

// ---------------------------------------------------------------------------------------------
// Generic documents for the new folders
// ---------------------------------------------------------------------------------------------

#[test]
fn generic_repost_document() {
    let record = json!({
        "$type": "app.bsky.feed.repost",
        "subject": {"uri": QUOTED_URI, "cid": QUOTED_CID},
        "createdAt": "2024-10-02T14:30:00.000Z"
    });
    let out = generic_record_cache_json(
        "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.repost/3l5jx2aaaaa2a",
        "bafyreif75yqxyt6g7h3pmvsj3l3e5u7y3wmb2z4y6ahtbbt7b2c5tmb3fu",
        "did:plc:ragtjsm2j2vknwkz3zp4oxrd",
        "app.bsky.feed.repost",
        &record,
    );
    // Record keys in sorted order (what `json.dumps(d, sort_keys=True)` gives).
    let expected = r#"{"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.repost/3l5jx2aaaaa2a", "cid": "bafyreif75yqxyt6g7h3pmvsj3l3e5u7y3wmb2z4y6ahtbbt7b2c5tmb3fu", "author": "did:plc:ragtjsm2j2vknwkz3zp4oxrd", "collection": "app.bsky.feed.repost", "record": {"$type": "app.bsky.feed.repost", "createdAt": "2024-10-02T14:30:00.000Z", "subject": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"}}}"#;
    assert_same_json(&out, expected);
}

#[test]
fn generic_profile_document_keeps_data_model_form() {
    let record = json!({
        "$type": "app.bsky.actor.profile",
        "displayName": "Zo\u{eb} \u{1F30A}",
        "description": "line1\nline2 \"q\" a/b",
        "avatar": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/jpeg", "size": 399062},
        "pinnedPost": {"uri": QUOTED_URI, "cid": QUOTED_CID},
        "sig": {"$bytes": "AAEC"}
    });
    let out = generic_record_cache_json(
        "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.actor.profile/self",
        "bafyreibwn4kwlezxabt2bzpopwfh7lbo56n4xb62wlbm5moqliwl4pzum4",
        "did:plc:z72i7hdynmk6r22z27h6tvur",
        "app.bsky.actor.profile",
        &record,
    );
    // Checked against python3 `json.dumps(doc)` with the record's keys sorted.
    let expected = r#"{"uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.actor.profile/self", "cid": "bafyreibwn4kwlezxabt2bzpopwfh7lbo56n4xb62wlbm5moqliwl4pzum4", "author": "did:plc:z72i7hdynmk6r22z27h6tvur", "collection": "app.bsky.actor.profile", "record": {"$type": "app.bsky.actor.profile", "avatar": {"$type": "blob", "mimeType": "image/jpeg", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "size": 399062}, "description": "line1\nline2 \"q\" a/b", "displayName": "Zo\u00eb \ud83c\udf0a", "pinnedPost": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"}, "sig": {"$bytes": "AAEC"}}}"#;
    assert_same_json(&out, expected);
    let parsed: Value = serde_json::from_str(&out).expect("valid");
    assert_eq!(parsed["record"], record);
}
