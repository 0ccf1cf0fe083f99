//! batch-export end to end: cache files in, Parquet out, read back by pyarrow; exactly-once under
//! replays, kills and concurrency; S3 against a local moto server.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use sync_core::transform;

const S1: &str = "did:plc:z72i7hdynmk6r22z27h6tvur";
const S2: &str = "did:plc:4llrhdclvdlmmynkwsmg5tdc";
const A1: &str = "did:plc:w4xbfzo7kqfes5zb7r6qv3rw";
const A2: &str = "did:plc:q6gjnaw2blty4crticxkmujt";
const A3: &str = "did:plc:ragtjsm2j2vknwkz3zp4oxrd";
const CLOCK: &str = "2024-10-02-14:03:28";

fn post_json(uri: &str, cid: &str, author: &str, record: Value, clock: &str) -> String {
    transform::transform_post(uri, cid, author, &record, clock)
        .unwrap()
        .to_cache_json()
}

/// predecessor-data-format.md §1.7 Example 1 (in-network author A1).
fn example1() -> String {
    post_json(
        &format!("at://{A1}/app.bsky.feed.post/3l5jqyv2s4k2c"),
        "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5q5stv7lcmjvvty",
        A1,
        json!({"$type": "app.bsky.feed.post", "text": "Good morning, Bluesky!",
               "createdAt": "2024-10-02T14:03:27.512Z", "langs": ["en"]}),
        CLOCK,
    )
}

/// Example 2: a reply (root = S1's study post) with a link facet and two images.
fn example2() -> String {
    post_json(
        &format!("at://{A2}/app.bsky.feed.post/3l5jr4q7m2s2x"),
        "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
        A2,
        json!({"$type": "app.bsky.feed.post",
          "text": "Agreed — full report: example.org/report",
          "createdAt": "2024-10-02T14:05:10.001Z", "langs": ["en"],
          "reply": {"root":   {"uri": format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k"),
                               "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
                    "parent": {"uri": format!("at://{A3}/app.bsky.feed.post/3l5jpkd4abc2j"),
                               "cid": "bafyreif75yqxyt6g7h3pmvsj3l3e5u7y3wmb2z4y6ahtbbt7b2c5tmb3fu"}},
          "facets": [{"index": {"byteStart": 24, "byteEnd": 42},
                      "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.org/report"}]}],
          "embed": {"$type": "app.bsky.embed.images", "images": [
             {"alt": "Bar chart of turnout by région",
              "image": {"$type": "blob", "ref": {"$link": "bafkreiagbvatb77ka6hxsknjqpomcgfo7n3ext6fouzh66rlizt52aok6y"}, "mimeType": "image/jpeg", "size": 399062},
              "aspectRatio": {"width": 1200, "height": 800}},
             {"alt": "",
              "image": {"$type": "blob", "ref": {"$link": "bafkreidtepeeezypyvsk4yi7vmlv3gclpe5aizuerzkj2ok4karm5pgydm"}, "mimeType": "image/png", "size": 81234}}]}}),
        "2024-10-02-14:05:11",
    )
}

/// Example 3: a quote post with mention + tag facets, tags, two langs and self-labels.
fn example3() -> String {
    post_json(
        &format!("at://{A3}/app.bsky.feed.post/3l5jsz2v4fc2d"),
        "bafyreigyuo3gfqvzpa3t4uqq7rbvkopyv4g4efbgnmgmjznwkmo2w2hr4e",
        A3,
        json!({"$type": "app.bsky.feed.post",
          "text": "Worth reading, @alice.bsky.social #science",
          "createdAt": "2024-10-02T14:07:45.250Z", "langs": ["en", "de"], "tags": ["science", "openaccess"],
          "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "graphic-media"}, {"val": "nudity"}]},
          "facets": [{"index": {"byteStart": 15, "byteEnd": 33}, "features": [{"$type": "app.bsky.richtext.facet#mention", "did": S1}]},
                     {"index": {"byteStart": 34, "byteEnd": 42}, "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "science"}]}],
          "embed": {"$type": "app.bsky.embed.record",
                    "record": {"uri": format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k"),
                               "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}}}),
        "2024-10-02-14:07:46",
    )
}

fn study_post(author: &str, rkey: &str, text: &str) -> String {
    post_json(
        &format!("at://{author}/app.bsky.feed.post/{rkey}"),
        "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        author,
        json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-10-02T13:00:00.000Z"}),
        CLOCK,
    )
}

fn post_path(folder: &str, author: &str, rkey: &str) -> String {
    format!("{folder}/author_did={author}_post_uri_suffix={rkey}.json")
}

fn like_json(liker: &str, rkey: &str, subject_uri: &str) -> String {
    transform::like_cache_json(
        &format!("at://{liker}/app.bsky.feed.like/{rkey}"),
        "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri",
        liker,
        &json!({"$type": "app.bsky.feed.like", "createdAt": "2024-10-02T14:20:11.093Z",
                "subject": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": subject_uri}}),
    )
    .unwrap()
}

fn follow_json(follower: &str, followee: &str, rkey: &str) -> String {
    transform::follow_cache_json(
        &format!("at://{follower}/app.bsky.graph.follow/{rkey}"),
        "bafyreibwn4kwlezxabt2bzpopwfh7lbo56n4xb62wlbm5moqliwl4pzum4",
        follower,
        &json!({"$type": "app.bsky.graph.follow", "createdAt": "2024-10-02T14:25:00.000Z", "subject": followee}),
    )
    .unwrap()
}

fn follow_path(dir: &str, follower: &str, followee: &str) -> String {
    format!("study_user_activity/create/follow/{dir}/follower_did={follower}_followee_did={followee}.json")
}

/// The cache JSON as the row pyarrow should read: same values, synctimestamp = export time.
fn expected_post_row(cache_json: &str) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(cache_json).unwrap();
    v.as_object().unwrap().clone().into_iter().collect()
}

fn assert_post_row(row: &BTreeMap<String, Value>, cache_json: &str, partition_date: &str) {
    let mut expected = expected_post_row(cache_json);
    let ts = row["synctimestamp"].clone();
    assert!(is_export_ts(&ts), "synctimestamp {ts}");
    assert_eq!(
        &ts.as_str().unwrap()[..10],
        partition_date,
        "partition_date is the export date"
    );
    expected.insert("synctimestamp".into(), ts);
    assert_eq!(row, &expected);
}

fn one_file_per_table(tables: &Tables) {
    for (t, files) in tables {
        for f in files {
            assert!(
                !f.schema.iter().any(|(n, _)| n == "partition_date"),
                "{t}: partition_date inside the file"
            );
            assert!(
                !f.schema.iter().any(|(_, ty)| ty == "null"),
                "{t}: null-typed column"
            );
        }
    }
}

/// Inputs made with the writer's transform (so a transform and export that agree with each
/// other pass); `spec_worked_examples_literally` checks against the spec's own text.
#[test]
fn post_tables_round_trip_with_worked_examples() {
    let env = Env::new();
    let study = study_post(S1, "3l5jnpb6xyz2k", "a study post");
    let e1 = example1();
    let e2 = example2();
    let e3 = example3();
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study,
    );
    env.write(
        &post_path(
            &format!("in_network_user_activity/create/post/{A1}"),
            A1,
            "3l5jqyv2s4k2c",
        ),
        &e1,
    );
    env.write(
        &post_path(
            "study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k",
            A2,
            "3l5jr4q7m2s2x",
        ),
        &e2,
    );
    env.write(
        &post_path(
            "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k",
            A3,
            "3l5jsz2v4fc2d",
        ),
        &e3,
    );
    let s = env.export_ok(&[]);
    assert_eq!(s["files_exported"], 4);
    assert_eq!(s["files_deleted"], 4);
    assert!(
        env.cache_files().is_empty(),
        "exported files are deleted: {:?}",
        env.cache_files()
    );

    let t = env.read();
    one_file_per_table(&t);
    for table in [
        "study_user_activity/create/post",
        "in_network_user_activity",
        "study_user_activity/create/reply_to_user_post",
        "study_user_activity/create/quote_of_user_post",
    ] {
        assert_eq!(schema(&t, table), expect_schema(POST_SCHEMA), "{table}");
        assert_eq!(
            t[table].len(),
            1,
            "{table}: one file per table and partition"
        );
    }
    let pd = t["in_network_user_activity"][0].partition_date.clone();
    let r = rows(&t, "in_network_user_activity");
    assert_eq!(r.len(), 1);
    assert_post_row(&r[0], &e1, &pd);
    // Spot checks against the literal values of predecessor-data-format.md §1.7.
    assert_eq!(
        r[0]["embed"],
        "{\"has_image\": false, \"image_alt_text\": null, \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}"
    );
    assert_eq!(r[0]["langs"], "en");
    assert_eq!(r[0]["url"], "");
    assert_eq!(r[0]["source"], "firehose");
    assert_eq!(r[0]["like_count"], Value::Null);

    let r = rows(&t, "study_user_activity/create/reply_to_user_post");
    assert_post_row(&r[0], &e2, &pd);
    assert_eq!(
        r[0]["text"],
        "Agreed \u{2014} full report: example.org/report"
    );
    assert_eq!(
        r[0]["embed"],
        "{\"has_image\": true, \"image_alt_text\": \"Bar chart of turnout by r\\u00e9gion;\", \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}"
    );
    assert_eq!(r[0]["facets"], "link:https://example.org/report");
    assert_eq!(
        r[0]["reply_root"],
        format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k")
    );

    let r = rows(&t, "study_user_activity/create/quote_of_user_post");
    assert_post_row(&r[0], &e3, &pd);
    assert_eq!(r[0]["facets"], format!("mention:{S1};tag:science"));
    assert_eq!(r[0]["labels"], "graphic-media;nudity");
    assert_eq!(r[0]["langs"], "en;de");
    assert_eq!(r[0]["tags"], "science;openaccess");

    let r = rows(&t, "study_user_activity/create/post");
    assert_post_row(&r[0], &study, &pd);
}

// ---------------------------------------------------------------------------------------------
// The spec's worked examples, literally: the cache files are the exact JSON text of
// predecessor-data-format.md (§1.7 outputs, §2.1 likes, §2.2 follow), not made with this
// project's transform, and every Parquet cell is compared with the values the spec text gives
// (§1.7, §4.3-§4.5), written out here by hand.

/// §1.7 Example 1 output (clock 2024-10-02-14:03:28), verbatim.
const SPEC_EXAMPLE_1: &str = r##"{"uri": "at://did:plc:w4xbfzo7kqfes5zb7r6qv3rw/app.bsky.feed.post/3l5jqyv2s4k2c", "cid": "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5q5stv7lcmjvvty", "indexed_at": null, "author_did": "did:plc:w4xbfzo7kqfes5zb7r6qv3rw", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:03:27.512Z", "text": "Good morning, Bluesky!", "embed": "{\"has_image\": false, \"image_alt_text\": null, \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}", "entities": null, "facets": null, "labels": null, "langs": "en", "reply_parent": null, "reply_root": null, "tags": null, "synctimestamp": "2024-10-02-14:03:28", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"##;
/// §1.7 Example 2 output (clock 2024-10-02-14:05:11), verbatim.
const SPEC_EXAMPLE_2: &str = r##"{"uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.post/3l5jr4q7m2s2x", "cid": "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", "indexed_at": null, "author_did": "did:plc:q6gjnaw2blty4crticxkmujt", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:05:10.001Z", "text": "Agreed \u2014 full report: example.org/report", "embed": "{\"has_image\": true, \"image_alt_text\": \"Bar chart of turnout by r\\u00e9gion;\", \"has_embedded_record\": false, \"embedded_record\": null, \"has_external\": false, \"external\": null}", "entities": null, "facets": "link:https://example.org/report", "labels": null, "langs": "en", "reply_parent": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j", "reply_root": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "tags": null, "synctimestamp": "2024-10-02-14:05:11", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"##;
/// §1.7 Example 3 output (clock 2024-10-02-14:07:46), verbatim.
const SPEC_EXAMPLE_3: &str = r##"{"uri": "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jsz2v4fc2d", "cid": "bafyreigyuo3gfqvzpa3t4uqq7rbvkopyv4g4efbgnmgmjznwkmo2w2hr4e", "indexed_at": null, "author_did": "did:plc:ragtjsm2j2vknwkz3zp4oxrd", "author_handle": null, "author_avatar": null, "author_display_name": null, "created_at": "2024-10-02T14:07:45.250Z", "text": "Worth reading, @alice.bsky.social #science", "embed": "{\"has_image\": false, \"image_alt_text\": null, \"has_embedded_record\": true, \"embedded_record\": {\"cid\": \"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm\", \"uri\": \"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k\"}, \"has_external\": false, \"external\": null}", "entities": null, "facets": "mention:did:plc:z72i7hdynmk6r22z27h6tvur;tag:science", "labels": "graphic-media;nudity", "langs": "en;de", "reply_parent": null, "reply_root": null, "tags": "science;openaccess", "synctimestamp": "2024-10-02-14:07:46", "url": "", "source": "firehose", "like_count": null, "reply_count": null, "repost_count": null}"##;
/// §2.1 Era H like cache JSON, verbatim.
const SPEC_LIKE_ERA_H: &str = r##"{"uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p", "cid": "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri", "author": "did:plc:q6gjnaw2blty4crticxkmujt", "record": {"createdAt": "2024-10-02T14:20:11.093Z", "subject": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "py_type": "com.atproto.repo.strongRef"}, "py_type": "app.bsky.feed.like"}}"##;
/// §2.1 Era S like cache JSON, verbatim.
const SPEC_LIKE_ERA_S: &str = r##"{"author": "did:plc:q6gjnaw2blty4crticxkmujt", "cid": "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri", "record": "{\"created_at\": \"2024-10-02T14:20:11.093Z\", \"subject\": {\"cid\": \"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm\", \"uri\": \"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k\", \"py_type\": \"com.atproto.repo.strongRef\"}, \"py_type\": \"app.bsky.feed.like\"}", "uri": "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p"}"##;
/// §2.2 Era H follow cache JSON (S1 follows A2), verbatim.
const SPEC_FOLLOW_ERA_H: &str = r##"{"uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.graph.follow/3l5jw7c2bde2s", "cid": "bafyreibwn4kwlezxabt2bzpopwfh7lbo56n4xb62wlbm5moqliwl4pzum4", "record": {"createdAt": "2024-10-02T14:25:00.000Z", "subject": "did:plc:q6gjnaw2blty4crticxkmujt", "py_type": "app.bsky.graph.follow"}, "author": "did:plc:z72i7hdynmk6r22z27h6tvur", "follower_did": "did:plc:z72i7hdynmk6r22z27h6tvur", "followee_did": "did:plc:q6gjnaw2blty4crticxkmujt"}"##;

/// Asserts `row` has exactly the columns of `want`, with those values; `synctimestamp` and
/// `insert_timestamp` (`EXPORT_TIME`) must be the export time, on the partition date.
fn assert_row_is(row: &BTreeMap<String, Value>, want: &[(&str, Value)], partition_date: &str) {
    let got_cols: Vec<&str> = row.keys().map(String::as_str).collect();
    let mut want_cols: Vec<&str> = want.iter().map(|(c, _)| *c).collect();
    want_cols.sort_unstable();
    assert_eq!(got_cols, want_cols, "columns");
    for (col, v) in want {
        if v == &json!("EXPORT_TIME") {
            assert!(is_export_ts(&row[*col]), "{col}: {}", row[*col]);
            assert_eq!(&row[*col].as_str().unwrap()[..10], partition_date, "{col}");
        } else {
            assert_eq!(&row[*col], v, "column {col}");
        }
    }
}

#[test]
fn spec_worked_examples_literally() {
    let env = Env::new();
    env.write(
        &post_path(
            &format!("in_network_user_activity/create/post/{A1}"),
            A1,
            "3l5jqyv2s4k2c",
        ),
        SPEC_EXAMPLE_1,
    );
    env.write(
        &post_path(
            "study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k",
            A2,
            "3l5jr4q7m2s2x",
        ),
        SPEC_EXAMPLE_2,
    );
    env.write(
        &post_path(
            "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k",
            A3,
            "3l5jsz2v4fc2d",
        ),
        SPEC_EXAMPLE_3,
    );
    env.write(
        &format!("study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
        SPEC_LIKE_ERA_H,
    );
    env.write(
        &format!("study_user_activity/create/like/3l5jnpb6xyz2k/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
        SPEC_LIKE_ERA_S,
    );
    // §4.5: a follow file in follower/ gives relationship "follow", in followee/ "follower".
    env.write(&follow_path("follower", S1, A2), SPEC_FOLLOW_ERA_H);
    env.write(&follow_path("followee", S1, A2), SPEC_FOLLOW_ERA_H);
    let s = env.export_ok(&[]);
    assert_eq!(s["files_exported"], 7, "{s}");
    let t = env.read();
    let pd = t["in_network_user_activity"][0].partition_date.clone();
    let null = Value::Null;
    let post = |uri: &str, cid: &str, author: &str, created: &str, text: &str, embed: &str| {
        vec![
            ("uri", json!(uri)),
            ("cid", json!(cid)),
            ("indexed_at", null.clone()),
            ("author_did", json!(author)),
            ("author_handle", null.clone()),
            ("author_avatar", null.clone()),
            ("author_display_name", null.clone()),
            ("created_at", json!(created)),
            ("text", json!(text)),
            ("embed", json!(embed)),
            ("entities", null.clone()),
            ("facets", null.clone()),
            ("labels", null.clone()),
            ("langs", json!("en")),
            ("reply_parent", null.clone()),
            ("reply_root", null.clone()),
            ("tags", null.clone()),
            // §4.2: replaced by the export time.
            ("synctimestamp", json!("EXPORT_TIME")),
            ("url", json!("")),
            ("source", json!("firehose")),
            ("like_count", null.clone()),
            ("reply_count", null.clone()),
            ("repost_count", null.clone()),
        ]
    };
    let set = |row: &mut Vec<(&'static str, Value)>, col: &str, v: Value| {
        row.iter_mut().find(|(c, _)| *c == col).unwrap().1 = v;
    };

    // Example 1 (§4.4: a row of in_network_user_activity).
    let want1 = post(
        "at://did:plc:w4xbfzo7kqfes5zb7r6qv3rw/app.bsky.feed.post/3l5jqyv2s4k2c",
        "bafyreib2rxk3rybk3aobmv5cjuql3bm2twh4jo5uxgf5q5stv7lcmjvvty",
        "did:plc:w4xbfzo7kqfes5zb7r6qv3rw",
        "2024-10-02T14:03:27.512Z",
        "Good morning, Bluesky!",
        r#"{"has_image": false, "image_alt_text": null, "has_embedded_record": false, "embedded_record": null, "has_external": false, "external": null}"#,
    );
    let r = rows(&t, "in_network_user_activity");
    assert_eq!(r.len(), 1);
    assert_row_is(&r[0], &want1, &pd);

    // Example 2: the real em dash in `text`; a literal `\u00e9` inside `embed`.
    let mut want2 = post(
        "at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.post/3l5jr4q7m2s2x",
        "bafyreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
        "did:plc:q6gjnaw2blty4crticxkmujt",
        "2024-10-02T14:05:10.001Z",
        "Agreed \u{2014} full report: example.org/report",
        r#"{"has_image": true, "image_alt_text": "Bar chart of turnout by r\u00e9gion;", "has_embedded_record": false, "embedded_record": null, "has_external": false, "external": null}"#,
    );
    set(
        &mut want2,
        "facets",
        json!("link:https://example.org/report"),
    );
    set(
        &mut want2,
        "reply_parent",
        json!("at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jpkd4abc2j"),
    );
    set(
        &mut want2,
        "reply_root",
        json!("at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"),
    );
    let r = rows(&t, "study_user_activity/create/reply_to_user_post");
    assert_eq!(r.len(), 1);
    assert_row_is(&r[0], &want2, &pd);
    assert!(r[0]["embed"].as_str().unwrap().contains("r\\u00e9gion"));

    // Example 3.
    let mut want3 = post(
        "at://did:plc:ragtjsm2j2vknwkz3zp4oxrd/app.bsky.feed.post/3l5jsz2v4fc2d",
        "bafyreigyuo3gfqvzpa3t4uqq7rbvkopyv4g4efbgnmgmjznwkmo2w2hr4e",
        "did:plc:ragtjsm2j2vknwkz3zp4oxrd",
        "2024-10-02T14:07:45.250Z",
        "Worth reading, @alice.bsky.social #science",
        r#"{"has_image": false, "image_alt_text": null, "has_embedded_record": true, "embedded_record": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k"}, "has_external": false, "external": null}"#,
    );
    set(
        &mut want3,
        "facets",
        json!("mention:did:plc:z72i7hdynmk6r22z27h6tvur;tag:science"),
    );
    set(&mut want3, "labels", json!("graphic-media;nudity"));
    set(&mut want3, "langs", json!("en;de"));
    set(&mut want3, "tags", json!("science;openaccess"));
    let r = rows(&t, "study_user_activity/create/quote_of_user_post");
    assert_eq!(r.len(), 1);
    assert_row_is(&r[0], &want3, &pd);

    // §4.3 like rows: from Era H and from Era S cache JSON alike, `record` is the §2.1 Era S
    // string.
    let want_like = vec![
        ("author", json!("did:plc:q6gjnaw2blty4crticxkmujt")),
        (
            "cid",
            json!("bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri"),
        ),
        (
            "record",
            json!(
                r#"{"created_at": "2024-10-02T14:20:11.093Z", "subject": {"cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "uri": "at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k", "py_type": "com.atproto.repo.strongRef"}, "py_type": "app.bsky.feed.like"}"#
            ),
        ),
        (
            "uri",
            json!("at://did:plc:q6gjnaw2blty4crticxkmujt/app.bsky.feed.like/3l5jv2xq4tk2p"),
        ),
        ("synctimestamp", json!("EXPORT_TIME")),
    ];
    for table in [
        "study_user_activity/create/like_on_user_post",
        "study_user_activity/create/like",
    ] {
        assert_eq!(schema(&t, table), expect_schema(LIKE_SCHEMA), "{table}");
        let r = rows(&t, table);
        assert_eq!(r.len(), 1, "{table}");
        assert_row_is(&r[0], &want_like, &pd);
    }

    // §4.5 social network rows.
    assert_eq!(
        schema(&t, "scraped_user_social_network"),
        expect_schema(SOCIAL_SCHEMA)
    );
    let mut r = rows(&t, "scraped_user_social_network");
    r.sort_by_key(|r| r["relationship_to_study_user"].as_str().unwrap().to_owned());
    assert_eq!(r.len(), 2);
    for (row, relationship) in r.iter().zip(["follow", "follower"]) {
        assert_row_is(
            row,
            &[
                ("follow_handle", null.clone()),
                ("follow_url", null.clone()),
                ("follow_did", json!("did:plc:q6gjnaw2blty4crticxkmujt")),
                ("follower_handle", null.clone()),
                ("follower_url", null.clone()),
                ("follower_did", json!("did:plc:z72i7hdynmk6r22z27h6tvur")),
                ("insert_timestamp", json!("EXPORT_TIME")),
                ("relationship_to_study_user", json!(relationship)),
            ],
            &pd,
        );
    }
    for table in [
        "in_network_user_activity",
        "study_user_activity/create/reply_to_user_post",
        "study_user_activity/create/quote_of_user_post",
    ] {
        assert_eq!(schema(&t, table), expect_schema(POST_SCHEMA), "{table}");
    }
}

#[test]
fn like_tables_round_trip_with_era_s_record() {
    let env = Env::new();
    let subject = format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k");
    // §4.3 example: A2 likes S1's post (like_on_user_post); S2 likes it too (both L1 and L2).
    env.write(
        &format!("study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
        &like_json(A2, "3l5jv2xq4tk2p", &subject),
    );
    let s2_like = like_json(S2, "3l5jv9zzzzz2c", &subject);
    env.write(
        &format!("study_user_activity/create/like/3l5jnpb6xyz2k/author_did={S2}_like_uri_suffix=3l5jv9zzzzz2c.json"),
        &s2_like,
    );
    env.write(
        &format!("study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did={S2}_like_uri_suffix=3l5jv9zzzzz2c.json"),
        &s2_like,
    );
    env.export_ok(&[]);
    let t = env.read();
    one_file_per_table(&t);
    for table in [
        "study_user_activity/create/like",
        "study_user_activity/create/like_on_user_post",
    ] {
        assert_eq!(schema(&t, table), expect_schema(LIKE_SCHEMA), "{table}");
    }
    let r = rows(&t, "study_user_activity/create/like_on_user_post");
    assert_eq!(r.len(), 2);
    let a2 = r.iter().find(|r| r["author"] == A2).expect("A2's like");
    assert_eq!(
        a2["cid"],
        "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri"
    );
    assert_eq!(
        a2["uri"],
        format!("at://{A2}/app.bsky.feed.like/3l5jv2xq4tk2p")
    );
    // The literal Era S `record` string of predecessor-data-format.md §2.1.
    assert_eq!(
        a2["record"],
        "{\"created_at\": \"2024-10-02T14:20:11.093Z\", \"subject\": {\"cid\": \"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm\", \"uri\": \"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l5jnpb6xyz2k\", \"py_type\": \"com.atproto.repo.strongRef\"}, \"py_type\": \"app.bsky.feed.like\"}"
    );
    assert!(is_export_ts(&a2["synctimestamp"]));
    let r = rows(&t, "study_user_activity/create/like");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["author"], S2);
}

#[test]
fn follow_double_case_gives_two_rows() {
    let env = Env::new();
    // §4.5: S1 follows S2 (both study users): the same file in follower/ and followee/.
    let f = follow_json(S1, S2, "3l5jw7c2bde2s");
    env.write(&follow_path("follower", S1, S2), &f);
    env.write(&follow_path("followee", S1, S2), &f);
    // S1 follows A2 (follower/ only); A1 follows S2 (followee/ only).
    env.write(
        &follow_path("follower", S1, A2),
        &follow_json(S1, A2, "3l5jw7c2bde3a"),
    );
    env.write(
        &follow_path("followee", A1, S2),
        &follow_json(A1, S2, "3l5jw7c2bde4b"),
    );
    env.export_ok(&[]);
    let t = env.read();
    assert_eq!(
        schema(&t, "scraped_user_social_network"),
        expect_schema(SOCIAL_SCHEMA)
    );
    let r = rows(&t, "scraped_user_social_network");
    assert_eq!(r.len(), 4);
    let ts = r[0]["insert_timestamp"].clone();
    assert!(is_export_ts(&ts));
    let mut got: Vec<(String, String, String)> = r
        .iter()
        .map(|r| {
            for null in [
                "follow_handle",
                "follow_url",
                "follower_handle",
                "follower_url",
            ] {
                assert_eq!(r[null], Value::Null);
            }
            assert_eq!(r["insert_timestamp"], ts);
            (
                r["follow_did"].as_str().unwrap().into(),
                r["follower_did"].as_str().unwrap().into(),
                r["relationship_to_study_user"].as_str().unwrap().into(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (S2.to_string(), S1.to_string(), "follow".to_string()),
        (S2.to_string(), S1.to_string(), "follower".to_string()),
        (A2.to_string(), S1.to_string(), "follow".to_string()),
        (S2.to_string(), A1.to_string(), "follower".to_string()),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        &ts.as_str().unwrap()[..10],
        t["scraped_user_social_network"][0].partition_date
    );
}

/// Where the writer puts an `#account` / `#identity` event (named by the event, not its seq).
fn account_path(
    did: &str,
    kind: &str,
    time: &str,
    handle: Option<&str>,
    active: Option<bool>,
    status: Option<&str>,
) -> String {
    let did = sync_core::ids::Did::parse(did).unwrap();
    let name = sync_core::paths::account_file(&sync_core::paths::AccountEventKey {
        did: &did,
        kind,
        time,
        handle,
        active,
        status,
    });
    format!("study_user_activity/account/{name}")
}

/// The writer's account JSON for an event delivered with `seq`.
fn account_json(did: &str, seq: i64, time: &str, status: &str) -> String {
    format!(
        "{{\"did\": \"{did}\", \"kind\": \"account\", \"seq\": {seq}, \"time\": \"{time}\", \"handle\": null, \"active\": false, \"status\": \"{status}\"}}"
    )
}

/// Issue item 10: the same account event delivered twice (another relay, a relay swap) is one
/// row: the writer rewrites one file (named by the event), and the export recognises the
/// rewrite under another seq as already exported, across runs and within one.
#[test]
fn an_account_event_delivered_twice_is_one_row() {
    let env = Env::new();
    let t = "2024-10-02T15:00:00.000Z";
    let rel = account_path(S1, "account", t, None, Some(false), Some("deactivated"));
    env.write(&rel, &account_json(S1, 10, t, "deactivated"));
    let s = env.export_ok(&[]);
    assert_eq!(s["files_exported"], 1, "{s}");
    // The second delivery, after the first was exported and deleted: same name, another seq.
    env.write(&rel, &account_json(S1, 5_000_010, t, "deactivated"));
    let s = env.export_ok(&[]);
    assert_eq!(s["already_exported"], 1, "{s}");
    assert_eq!(s["files_exported"], 0, "{s}");
    assert!(!env.exists(&rel));
    // Within one run: a file from before the upgrade (named by seq) and the same event under the
    // new name are one row; a genuinely different event at the same instant is another.
    let t2 = "2024-10-02T16:00:00.000Z";
    env.write(
        &format!("study_user_activity/account/did={S1}_account_seq=20.json"),
        &account_json(S1, 20, t2, "takendown"),
    );
    env.write(
        &account_path(S1, "account", t2, None, Some(false), Some("takendown")),
        &account_json(S1, 5_000_020, t2, "takendown"),
    );
    env.write(
        &account_path(S1, "account", t2, None, Some(false), Some("suspended")),
        &account_json(S1, 21, t2, "suspended"),
    );
    let s = env.export_ok(&[]);
    assert_eq!(s["duplicates"], 1, "{s}");
    let t = env.read();
    let r = rows(&t, "study_user_activity/account");
    let mut statuses: Vec<&str> = r.iter().map(|r| r["status"].as_str().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, ["deactivated", "suspended", "takendown"]);
}

/// Issue item 11b: a study post whose record key begins with `.` (valid). The writer nests its
/// reactions under `%2E...` instead of dropping them as hidden names (which the export would
/// skip); routed by the real router, written by the real cache writer, exported, and the rows
/// carry the original key and URIs.
#[test]
fn reactions_to_a_study_post_whose_rkey_starts_with_a_dot_are_exported() {
    use sync_core::route::{route_event, MemoryState};
    use sync_core::synth::{self, OpSpec};
    let env = Env::new();
    let study_post = format!("at://{S1}/app.bsky.feed.post/.x1");
    let mut state = MemoryState::default();
    state
        .study_users
        .insert(sync_core::ids::Did::parse(S1).unwrap());
    state
        .study_posts
        .insert(study_post.clone(), sync_core::ids::Did::parse(S1).unwrap());
    let like = json!({"$type": "app.bsky.feed.like", "createdAt": "2024-10-02T14:20:11.093Z",
        "subject": {"uri": study_post, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}});
    let frames = [
        synth::commit_frame(
            1,
            A2,
            "3l5jzzzzzzz2a",
            "2024-10-02T14:20:11.100Z",
            &[OpSpec::create("app.bsky.feed.like", "3l5jv2xq4tk2p", like)],
        ),
        synth::commit_frame(
            2,
            A2,
            "3l5kaaaaaaa2a",
            "2024-10-02T14:21:00.000Z",
            &[OpSpec::delete("app.bsky.feed.like", "3l5jv2xq4tk2p")],
        ),
    ];
    for frame in &frames {
        let event = sync_core::frame::decode_frame(frame).unwrap();
        let routing = route_event(&event, &state, CLOCK);
        assert!(routing.dropped.is_empty(), "{:?}", routing.dropped);
        for update in &routing.updates {
            let _ = state.apply(update);
        }
        // Written as the writer's cache writer lays them out (that writer lives in the writer
        // binary; the export only needs the files).
        for file in &routing.files {
            let dir = env.cache.join(file.path.dir());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file.path.file_name()), file.contents.as_bytes()).unwrap();
        }
    }
    let mut files = env.cache_files();
    files.sort();
    assert_eq!(
        files,
        [
            format!("study_user_activity/create/like_on_user_post/%2Ex1/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
            format!("study_user_activity/delete/like_on_user_post/%2Ex1/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
        ]
    );
    let s = env.export_ok(&[]);
    assert_eq!(s["files_exported"], 2, "{s}");
    let t = env.read();
    let r = rows(&t, "study_user_activity/create/like_on_user_post");
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0]["uri"],
        format!("at://{A2}/app.bsky.feed.like/3l5jv2xq4tk2p")
    );
    let record: Value = serde_json::from_str(r[0]["record"].as_str().unwrap()).unwrap();
    assert_eq!(
        record["subject"]["uri"], study_post,
        "the original key, not %2E"
    );
    let r = rows(&t, "study_user_activity/delete");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["category"], "like_on_user_post");
    assert_eq!(
        r[0]["uri"],
        format!("at://{A2}/app.bsky.feed.like/3l5jv2xq4tk2p")
    );
    assert!(env.cache_files().is_empty());
}

fn delete_json(uri: &str, author: &str, collection: &str, rkey: &str, seq: i64) -> String {
    let mut w = sync_core::pyjson::PyJsonWriter::new();
    w.begin_object()
        .field_str("uri", uri)
        .field_str("author", author)
        .field_str("collection", collection)
        .field_str("rkey", rkey)
        .field_i64("seq", seq)
        .field_str("rev", "3l5jzzzzzzz2a")
        .field_str("time", "2024-10-02T15:00:00.000Z")
        .end_object();
    w.into_string()
}

#[test]
fn new_tables_round_trip() {
    let env = Env::new();
    let subject = format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k");
    let repost_record = json!({"$type": "app.bsky.feed.repost", "createdAt": "2024-10-02T14:30:00.000Z",
        "subject": {"uri": subject, "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}});
    let repost = transform::generic_record_cache_json(
        &format!("at://{A2}/app.bsky.feed.repost/3l5k1aaaaaa2a"),
        "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri",
        A2,
        "app.bsky.feed.repost",
        &repost_record,
    );
    env.write(
        &format!("study_user_activity/create/repost_of_user_post/3l5jnpb6xyz2k/author_did={A2}_repost_uri_suffix=3l5k1aaaaaa2a.json"),
        &repost,
    );
    let own_repost = transform::generic_record_cache_json(
        &format!("at://{S1}/app.bsky.feed.repost/3l5k1bbbbbb2b"),
        "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri",
        S1,
        "app.bsky.feed.repost",
        &repost_record,
    );
    env.write(
        &format!("study_user_activity/create/repost/author_did={S1}_repost_uri_suffix=3l5k1bbbbbb2b.json"),
        &own_repost,
    );
    let block = transform::generic_record_cache_json(
        &format!("at://{S1}/app.bsky.graph.block/3l5k2cccccc2c"),
        "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri",
        S1,
        "app.bsky.graph.block",
        &json!({"$type": "app.bsky.graph.block", "createdAt": "2024-10-02T14:31:00.000Z", "subject": A3}),
    );
    env.write(
        &format!(
            "study_user_activity/create/block/author_did={S1}_block_uri_suffix=3l5k2cccccc2c.json"
        ),
        &block,
    );
    let profile = transform::generic_record_cache_json(
        &format!("at://{S1}/app.bsky.actor.profile/self"),
        "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri",
        S1,
        "app.bsky.actor.profile",
        &json!({"$type": "app.bsky.actor.profile", "displayName": "Stüdy Üser", "description": "hi\nthere"}),
    );
    env.write(
        &format!("study_user_activity/create/profile/author_did={S1}_profile_uri_suffix=self_rev=3l5k3dddddd2d.json"),
        &profile,
    );
    let account = format!(
        "{{\"did\": \"{S1}\", \"kind\": \"account\", \"seq\": 31527015322, \"time\": \"2024-10-02T15:00:00.000Z\", \"handle\": null, \"active\": false, \"status\": \"deactivated\"}}"
    );
    env.write(
        &account_path(
            S1,
            "account",
            "2024-10-02T15:00:00.000Z",
            None,
            Some(false),
            Some("deactivated"),
        ),
        &account,
    );
    let identity = format!(
        "{{\"did\": \"{S1}\", \"kind\": \"identity\", \"seq\": 31527015323, \"time\": \"2024-10-02T15:00:01.000Z\", \"handle\": \"s1.example.com\", \"active\": null, \"status\": null}}"
    );
    env.write(
        &account_path(
            S1,
            "identity",
            "2024-10-02T15:00:01.000Z",
            Some("s1.example.com"),
            None,
            None,
        ),
        &identity,
    );
    // Deletes: a study user's own post; an unlike of a study post; an in-network post.
    let post_uri = format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k");
    env.write(
        &format!(
            "study_user_activity/delete/post/author_did={S1}_post_uri_suffix=3l5jnpb6xyz2k.json"
        ),
        &delete_json(&post_uri, S1, "app.bsky.feed.post", "3l5jnpb6xyz2k", 100),
    );
    env.write(
        &format!("study_user_activity/delete/like_on_user_post/3l5jnpb6xyz2k/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
        &delete_json(&format!("at://{A2}/app.bsky.feed.like/3l5jv2xq4tk2p"), A2, "app.bsky.feed.like", "3l5jv2xq4tk2p", 101),
    );
    env.write(
        &format!("study_user_activity/delete/follow/followee/author_did={A1}_follow_uri_suffix=3l5jw7c2bde4b.json"),
        &delete_json(&format!("at://{A1}/app.bsky.graph.follow/3l5jw7c2bde4b"), A1, "app.bsky.graph.follow", "3l5jw7c2bde4b", 102),
    );
    env.write(
        &format!("in_network_user_activity/delete/post/{A1}/author_did={A1}_post_uri_suffix=3l5jqyv2s4k2c.json"),
        &delete_json(&format!("at://{A1}/app.bsky.feed.post/3l5jqyv2s4k2c"), A1, "app.bsky.feed.post", "3l5jqyv2s4k2c", 103),
    );
    let s = env.export_ok(&[]);
    assert_eq!(s["files_exported"], 10, "{s}");
    let t = env.read();
    one_file_per_table(&t);

    // Every schema is the one declared in the catalogue.
    for def in batch_export::tables::TABLES {
        if let Some(files) = t.get(def.path) {
            let want: Vec<(String, String)> = def
                .columns
                .iter()
                .map(|(n, ty)| {
                    (
                        n.to_string(),
                        if ty.name() == "bool" {
                            "bool".into()
                        } else {
                            ty.name().into()
                        },
                    )
                })
                .collect();
            for f in files {
                assert_eq!(f.schema, want, "{}", def.path);
            }
        }
    }
    let r = rows(&t, "study_user_activity/create/repost_of_user_post");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["subject_uri"], subject);
    assert_eq!(r[0]["created_at"], "2024-10-02T14:30:00.000Z");
    assert_eq!(r[0]["author"], A2);
    assert_eq!(
        r[0]["record"],
        sync_core::pyjson::to_py_json(&repost_record)
    );
    assert_eq!(
        rows(&t, "study_user_activity/create/repost")[0]["author"],
        S1
    );
    let r = rows(&t, "study_user_activity/create/block");
    assert_eq!(r[0]["subject"], A3);
    let r = rows(&t, "study_user_activity/create/profile");
    assert_eq!(r[0]["display_name"], "Stüdy Üser");
    assert_eq!(r[0]["description"], "hi\nthere");
    assert_eq!(r[0]["rev"], "3l5k3dddddd2d");
    assert_eq!(r[0]["created_at"], Value::Null);
    let mut r = rows(&t, "study_user_activity/account");
    r.sort_by_key(|r| r["seq"].as_i64());
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["seq"], 31527015322i64);
    assert_eq!(r[0]["active"], false);
    assert_eq!(r[0]["status"], "deactivated");
    assert_eq!(r[1]["handle"], "s1.example.com");
    assert_eq!(r[1]["active"], Value::Null);
    let mut r = rows(&t, "study_user_activity/delete");
    r.sort_by_key(|r| r["seq"].as_i64());
    let cats: Vec<&str> = r.iter().map(|r| r["category"].as_str().unwrap()).collect();
    assert_eq!(cats, ["post", "like_on_user_post", "follow/followee"]);
    assert_eq!(r[0]["uri"], post_uri);
    assert_eq!(r[0]["rev"], "3l5jzzzzzzz2a");
    assert_eq!(r[0]["time"], "2024-10-02T15:00:00.000Z");
    let r = rows(&t, "in_network_user_activity_delete");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["seq"], 103);
}

#[test]
fn a_state_dir_is_bound_to_one_output() {
    let env = Env::new();
    let args = |output: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--cache-dir".into(),
            env.cache.display().to_string(),
            "--output".into(),
            output.into(),
            "--json".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let post = |rkey: &str| {
        let rel = post_path("study_user_activity/create/post", S1, rkey);
        env.write(&rel, &study_post(S1, rkey, rkey));
        rel
    };
    // The first run names the output relative to its working directory.
    post("3l5jnpb6xyz2k");
    let out = command(&args("out", &[]), &[])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let main_out = fs::canonicalize(&env.out).unwrap();
    // The journal holds absolute locations (a relative one would point elsewhere for a run
    // started in another directory).
    let db = env.cache.join(".export/state.sqlite");
    let locations = sqlite_query(&db, "SELECT location || '|' || temp FROM batch_output");
    assert!(!locations.is_empty());
    for l in &locations {
        for p in l.split('|') {
            assert!(p.starts_with(&main_out.display().to_string()), "{l}");
        }
    }
    assert_eq!(
        sqlite_query(&db, "SELECT v FROM meta WHERE k = 'output'"),
        [main_out.display().to_string()]
    );

    // Another output with the same state directory is refused before anything is touched.
    let second = post("3l5jr4q7m2s2x");
    let elsewhere = env.dir.path().join("elsewhere");
    let out = run(&args(elsewhere.to_str().unwrap(), &[]), &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&main_out.display().to_string())
            && err.contains(&elsewhere.display().to_string())
            && err.contains("--state-dir"),
        "names both outputs and the way out: {err}"
    );
    assert!(env.exists(&second), "nothing deleted");
    assert!(!elsewhere.exists(), "nothing written");

    // The same directory spelled another way (absolute, through a symlink) is the same output.
    std::os::unix::fs::symlink(&env.out, env.dir.path().join("out-link")).unwrap();
    let link = env.dir.path().join("out-link");
    let out = run(&args(link.to_str().unwrap(), &[]), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!env.exists(&second));

    // The documented one-off: its own state directory and --clear-filepaths false, so the
    // regular export still gets every file.
    let third = post("3l5jsz2v4fc2d");
    let oneoff_state = env.dir.path().join("oneoff-state");
    let out = run(
        &args(
            elsewhere.to_str().unwrap(),
            &[
                "--state-dir",
                oneoff_state.to_str().unwrap(),
                "--clear-filepaths",
                "false",
            ],
        ),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(env.exists(&third));
    assert_eq!(
        rows(
            &read_parquet_tree(&elsewhere),
            "study_user_activity/create/post"
        )
        .len(),
        1
    );
    env.export_ok(&[]);
    assert!(env.cache_files().is_empty());
    let uris: BTreeSet<String> = rows(&env.read(), "study_user_activity/create/post")
        .iter()
        .map(|r| r["uri"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        uris.len(),
        3,
        "every file reached the main output once: {uris:?}"
    );
}

#[test]
fn readme_documents_every_table_schema() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&batch_export::tables::schema_markdown()),
        "README.md's schema table is stale; paste:\n{}",
        batch_export::tables::schema_markdown()
    );
}

#[test]
fn replays_and_duplicates_are_exported_once() {
    let env = Env::new();
    let rel = post_path(
        &format!("in_network_user_activity/create/post/{A1}"),
        A1,
        "3l5jqyv2s4k2c",
    );
    env.write(&rel, &example1());
    env.export_ok(&[]);
    assert!(!env.exists(&rel));
    // The writer crashed and replays: same path, same record, a new ingest synctimestamp.
    env.write(&rel, &example1().replace(CLOCK, "2024-10-02-15:00:00"));
    let s = env.export_ok(&[]);
    assert_eq!(s["already_exported"], 1, "{s}");
    assert_eq!(s["files_exported"], 0);
    assert!(
        !env.exists(&rel),
        "a replayed file is removed, not exported"
    );
    // An unfollow and a re-follow of the same pair: same file name, a new record (new uri).
    env.write(
        &follow_path("follower", S1, A2),
        &follow_json(S1, A2, "3l5jw7c2bde3a"),
    );
    env.export_ok(&[]);
    env.write(
        &follow_path("follower", S1, A2),
        &follow_json(S1, A2, "3l5kzzzzzzz2z"),
    );
    let s = env.export_ok(&[]);
    assert_eq!(s["files_exported"], 1, "a re-follow is a new event: {s}");
    // Within one run, two files with one URI become one row.
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study_post(S1, "3l5jnpb6xyz2k", "x"),
    );
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k")
            .replace(".json", "_copy.json"),
        &study_post(S1, "3l5jnpb6xyz2k", "x"),
    );
    let s = env.export_ok(&[]);
    assert_eq!(s["duplicates"], 1, "{s}");
    let t = env.read();
    assert_eq!(rows(&t, "in_network_user_activity").len(), 1);
    assert_eq!(rows(&t, "scraped_user_social_network").len(), 2);
    assert_eq!(rows(&t, "study_user_activity/create/post").len(), 1);
    assert!(env.cache_files().is_empty(), "{:?}", env.cache_files());
}

#[test]
fn files_taken_for_deletion_by_an_interrupted_run_are_finished_next_run() {
    // A run takes each exported file out of the writer's way (`.exported-<id>-<name>`) before
    // deleting it; a kill in between leaves the taken file behind. So does a writer that
    // rewrote the same name twice during the delete. The next run must treat it as the file it
    // was: delete it if it was exported, export it if not.
    let env = Env::new();
    let exported = follow_json(S1, A1, "3l5jw7c2bde2s");
    env.write(&follow_path("follower", S1, A1), &exported);
    env.export_ok(&[]);
    assert!(env.cache_files().is_empty());
    let taken = |rel: &str, id: &str| {
        let (dir, name) = rel.rsplit_once('/').unwrap();
        format!("{dir}/.exported-{id}-{name}")
    };
    let already = taken(
        &follow_path("follower", S1, A1),
        "0123456789abcdef0123456789abcdef",
    );
    let pending = taken(
        &follow_path("follower", S1, A2),
        "fedcba9876543210fedcba9876543210",
    );
    env.write(&already, &exported);
    env.write(&pending, &follow_json(S1, A2, "3l5jw7c2bde3a"));
    // Not a taken name (no id): an ordinary hidden file, never touched.
    let stray = "study_user_activity/create/follow/follower/.exported-notes.json";
    env.write(stray, "not data");
    assert_eq!(env.cache_files().len(), 3);
    let s = env.export_ok(&[]);
    assert_eq!(s["already_exported"], 1, "{s}");
    assert_eq!(s["files_exported"], 1, "{s}");
    assert_eq!(env.cache_files(), [stray.to_owned()]);
    let t = env.read();
    let mut got: Vec<String> = rows(&t, "scraped_user_social_network")
        .iter()
        .map(|r| r["follow_did"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let mut want = vec![A1.to_owned(), A2.to_owned()];
    want.sort();
    assert_eq!(
        got, want,
        "each follow exported once, under its original table"
    );
}

#[test]
fn corrupt_files_are_quarantined_once() {
    let env = Env::new();
    let bad = "study_user_activity/create/post/author_did=did:plc:x_post_uri_suffix=1.json";
    let wrong_type = "study_user_activity/create/post/author_did=did:plc:x_post_uri_suffix=2.json";
    env.write(bad, "{\"uri\": \"at://trunc");
    env.write(
        wrong_type,
        "{\"uri\": \"at://x\", \"like_count\": \"seven\"}",
    );
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study_post(S1, "3l5jnpb6xyz2k", "ok"),
    );
    let out = env.export(&[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit 3 = quarantined: {}",
        describe(&out)
    );
    let s = summary(&out);
    assert_eq!(s["quarantined"], 2);
    assert_eq!(s["files_exported"], 1);
    assert!(env.cache.join(".quarantine").join(bad).exists());
    assert!(env.cache.join(".quarantine").join(wrong_type).exists());
    let log = fs::read_to_string(env.cache.join(".quarantine/reasons.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("seven"), "{log}");
    // Not re-read forever: the next run is clean.
    let s = env.export_ok(&[]);
    assert_eq!(s["quarantined"], 0);
    assert_eq!(s["files_read"], 0);
    assert_eq!(
        rows(&env.read(), "study_user_activity/create/post").len(),
        1
    );
}

#[test]
fn entries_the_walk_cannot_handle_are_counted_and_need_a_human() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    let good = post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k");
    env.write(&good, &study_post(S1, "3l5jnpb6xyz2k", "ok"));
    let folder = env.cache.join("study_user_activity/create/post");
    // A name that is not UTF-8.
    let non_utf8 = folder.join(std::ffi::OsStr::from_bytes(
        b"author_did=x_post_uri_suffix=\xff.json",
    ));
    fs::write(&non_utf8, study_post(S1, "3l5jnpb6xyz3a", "latin-1 name")).unwrap();
    // A symlink to a valid post file outside the cache: never followed, never exported.
    let target = env.dir.path().join("outside.json");
    fs::write(&target, study_post(S2, "3l5jnpb6xyz4b", "outside")).unwrap();
    let link = folder.join("author_did=y_post_uri_suffix=3l5jnpb6xyz4b.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    // A folder that cannot be listed. The tests run as root, so permission bits do not stop a
    // read; a path longer than PATH_MAX (4096 bytes) really fails (ENAMETOOLONG) for anyone.
    // It is built one relative step at a time, as only relative paths can reach it.
    let deep = env
        .cache
        .join("study_user_activity/create/like_on_user_post");
    fs::create_dir_all(&deep).unwrap();
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys\nos.chdir(sys.argv[1])\nfor _ in range(17):\n    os.mkdir(sys.argv[2]); os.chdir(sys.argv[2])",
            deep.to_str().unwrap(),
            &"d".repeat(250),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // A quarantine that fails: `.quarantine` is a file, so no folder can be made in it.
    let bad = "study_user_activity/create/post/author_did=z_post_uri_suffix=1.json";
    env.write(bad, "{\"uri\": \"at://trunc");
    fs::write(env.cache.join(".quarantine"), "not a folder").unwrap();

    let out = env.export(&[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "needs a human: {}",
        describe(&out)
    );
    let s = summary(&out);
    assert_eq!(s["non_utf8_names"], 1, "{s}");
    assert_eq!(s["non_regular_files"], 1, "{s}");
    assert_eq!(s["unreadable"], 1, "{s}");
    assert_eq!(s["quarantine_failed"], 1, "{s}");
    assert_eq!(s["quarantined"], 0, "{s}");
    assert_eq!(s["files_exported"], 1, "{s}");
    // All left in place; only the good file exported.
    assert!(non_utf8.exists() && link.symlink_metadata().is_ok() && env.exists(bad));
    assert!(!env.exists(&good));
    let r = rows(&env.read(), "study_user_activity/create/post");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["text"], "ok");

    // The text summary says it too.
    let text = run(
        &[
            "--cache-dir".into(),
            env.cache.display().to_string(),
            "--output".into(),
            env.out.display().to_string(),
        ],
        &[],
    );
    assert_eq!(text.status.code(), Some(3), "{}", describe(&text));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("1 failed quarantines, 1 non-UTF-8 names, 1 symlinks or other non-regular files, 1 unreadable"),
        "{stdout}"
    );

    // Once a human has cleaned up, runs are clean again.
    fs::remove_file(&non_utf8).unwrap();
    fs::remove_file(&link).unwrap();
    fs::remove_file(env.cache.join(".quarantine")).unwrap();
    let status = std::process::Command::new("rm")
        .args(["-rf", deep.join("d".repeat(250)).to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = env.export(&[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the bad file is quarantined now: {}",
        describe(&out)
    );
    assert_eq!(summary(&out)["quarantined"], 1);
    let s = env.export_ok(&[]);
    assert_eq!(s["unreadable"], 0, "{s}");
}

#[test]
fn dry_run_writes_nothing_and_keep_mode_never_reexports() {
    let env = Env::new();
    let rel = post_path(
        &format!("in_network_user_activity/create/post/{A1}"),
        A1,
        "3l5jqyv2s4k2c",
    );
    env.write(&rel, &example1());
    env.write("study_user_activity/create/post/junk.json", "not json");
    let out = env.export(&["--dry-run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let s = summary(&out);
    assert_eq!(s["tables"]["in_network_user_activity"]["rows"], 1);
    assert!(!env.out.exists(), "dry run wrote Parquet");
    assert!(env.exists(&rel) && env.exists("study_user_activity/create/post/junk.json"));
    assert!(!env.cache.join(".export").exists() && !env.cache.join(".quarantine").exists());
    fs::remove_file(env.cache.join("study_user_activity/create/post/junk.json")).unwrap();

    // --clear-filepaths false: exported, kept, and never exported again.
    env.export_ok(&["--clear-filepaths", "false"]);
    assert!(env.exists(&rel));
    let s = env.export_ok(&["--clear-filepaths", "false"]);
    assert_eq!(s["already_exported"], 1);
    assert_eq!(rows(&env.read(), "in_network_user_activity").len(), 1);
    // A later normal run removes it without exporting it again.
    let s = env.export_ok(&[]);
    assert_eq!(s["files_deleted"], 1);
    assert!(!env.exists(&rel));
    assert_eq!(rows(&env.read(), "in_network_user_activity").len(), 1);
}

#[test]
fn clear_cache_prunes_only_empty_old_folders() {
    let env = Env::new();
    let liked = "study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k";
    env.write(
        &format!("{liked}/author_did={A2}_like_uri_suffix=3l5jv2xq4tk2p.json"),
        &like_json(
            A2,
            "3l5jv2xq4tk2p",
            &format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k"),
        ),
    );
    // An unexported file in an unknown folder is never removed (and needs a human: exit 3).
    env.write("somewhere/else/keep.json", "{}");
    let out = env.export(&["--clear-cache", "--prune-min-age-secs", "0"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(summary(&out)["files_unrecognised"], 1);
    assert!(
        !env.cache.join(liked).exists(),
        "empty nested folder pruned"
    );
    assert!(
        env.cache
            .join("study_user_activity/create/like_on_user_post")
            .exists(),
        "skeleton kept"
    );
    assert!(env.exists("somewhere/else/keep.json"));
}

#[test]
fn a_second_run_exits_zero_while_the_lock_is_held() {
    let env = Env::new();
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study_post(S1, "3l5jnpb6xyz2k", "x"),
    );
    fs::create_dir_all(env.cache.join(".export")).unwrap();
    let lock = fs::File::create(env.cache.join(".export/lock")).unwrap();
    lock.try_lock().unwrap();
    let out = env.export(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another run holds"),
        "{}",
        describe(&out)
    );
    assert_eq!(env.cache_files().len(), 1, "nothing exported while locked");
    drop(lock);
    env.export_ok(&[]);
    assert!(env.cache_files().is_empty());
}

#[test]
fn the_cache_lock_also_stops_a_run_with_another_state_dir() {
    // Two runs on one cache with different --state-dir would both delete from it; the lock in
    // the cache itself makes the second one wait its turn like any concurrent run.
    let env = Env::new();
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study_post(S1, "3l5jnpb6xyz2k", "x"),
    );
    let other_state = env.dir.path().join("other-state");
    let extra = ["--state-dir", other_state.to_str().unwrap()];
    let lock = fs::File::create(env.cache.join(".export.lock")).unwrap();
    lock.try_lock().unwrap();
    let out = env.export(&extra);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another run holds") && err.contains(".export.lock"),
        "{}",
        describe(&out)
    );
    assert_eq!(env.cache_files().len(), 1, "nothing exported while locked");
    assert!(!env.out.exists());
    // A dry run takes it too (it exists now).
    let out = env.export(&["--dry-run"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another run holds"),
        "{}",
        describe(&out)
    );
    drop(lock);
    env.export_ok(&extra);
    assert!(env.cache_files().is_empty());
    assert_eq!(
        rows(&env.read(), "study_user_activity/create/post").len(),
        1
    );
}

#[test]
fn gen_cache_takes_its_flags_from_the_environment() {
    let env = Env::new();
    let out = run(
        &["gen-cache".into()],
        &[
            ("BATCH_EXPORT_CACHE_DIR", env.cache.to_str().unwrap()),
            ("BATCH_EXPORT_GEN_POSTS", "7"),
            ("BATCH_EXPORT_GEN_IN_NETWORK_SHARE", "0"),
            ("BATCH_EXPORT_GEN_SEED", "3"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let files = env.cache_files();
    assert_eq!(files.len(), 7, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.starts_with("study_user_activity/create/post/")),
        "in-network share 0: study posts only: {files:?}"
    );
    // The documented command line form.
    let other = env.dir.path().join("cache2");
    let out = run(
        &[
            "--cache-dir".into(),
            other.display().to_string(),
            "gen-cache".into(),
            "--posts".into(),
            "2".into(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(list_files(&other).len(), 2);
}

#[test]
fn env_vars_configure_every_run() {
    let env = Env::new();
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study_post(S1, "3l5jnpb6xyz2k", "x"),
    );
    let out = run(
        &[],
        &[
            ("BATCH_EXPORT_CACHE_DIR", env.cache.to_str().unwrap()),
            ("BATCH_EXPORT_OUTPUT", env.out.to_str().unwrap()),
            ("BATCH_EXPORT_JSON", "true"),
            ("BATCH_EXPORT_COMPRESSION", "snappy"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(summary(&out)["files_exported"], 1);
    assert_eq!(
        rows(&env.read(), "study_user_activity/create/post").len(),
        1
    );
    let out = run(&["--compression".into(), "lz5".into()], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "usage error: {}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Exactly once under kills and concurrency.

/// Simulated writer: new post files (and likes) written atomically, plus replays that rewrite
/// already written paths with a new synctimestamp. Returns every URI written, per table.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<BTreeMap<&'static str, BTreeSet<String>>>>,
}

impl Writer {
    fn start(cache: std::path::PathBuf, files: usize, pause: Duration) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut written: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
            let mut paths: Vec<(String, String)> = Vec::new();
            let mut seed = rand_u64() | 1;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for i in 0..files {
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let rkey = format!("3l{:011}", i);
                let author = [A1, A2, A3][i % 3];
                if i % 4 == 3 {
                    let uri = format!("at://{author}/app.bsky.feed.like/{rkey}");
                    let rel = format!(
                        "study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did={author}_like_uri_suffix={rkey}.json"
                    );
                    write_atomic(
                        &cache,
                        &rel,
                        &like_json(
                            author,
                            &rkey,
                            &format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k"),
                        ),
                    );
                    written
                        .entry("study_user_activity/create/like_on_user_post")
                        .or_default()
                        .insert(uri);
                } else {
                    let uri = format!("at://{author}/app.bsky.feed.post/{rkey}");
                    let rel = post_path(
                        &format!("in_network_user_activity/create/post/{author}"),
                        author,
                        &rkey,
                    );
                    let record = json!({"$type": "app.bsky.feed.post", "text": format!("post {i} é"), "createdAt": "2024-10-02T13:00:00.000Z"});
                    let body = post_json(
                        &uri,
                        "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
                        author,
                        record.clone(),
                        CLOCK,
                    );
                    write_atomic(&cache, &rel, &body);
                    paths.push((rel, body));
                    written
                        .entry("in_network_user_activity")
                        .or_default()
                        .insert(uri);
                }
                // Replays: rewrite an earlier path with a new ingest clock.
                if next() % 3 == 0 && !paths.is_empty() {
                    let (rel, body) = &paths[(next() as usize) % paths.len()];
                    let clock = format!("2024-10-02-15:{:02}:{:02}", next() % 60, next() % 60);
                    write_atomic(&cache, rel, &body.replace(CLOCK, &clock));
                }
                std::thread::sleep(pause);
            }
            written
        });
        Writer {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> BTreeMap<&'static str, BTreeSet<String>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn assert_exactly_once(env: &Env, written: &BTreeMap<&'static str, BTreeSet<String>>) {
    assert_rows_exactly_once(&env.read(), written);
    assert!(
        env.cache_files().is_empty(),
        "left in cache: {:?}",
        env.cache_files()
    );
}

/// Every written URI is a row of its table exactly once, and there are no other rows.
fn assert_rows_exactly_once(t: &Tables, written: &BTreeMap<&'static str, BTreeSet<String>>) {
    for (table, uris) in written {
        let r = rows(t, table);
        let mut seen = BTreeMap::<String, usize>::new();
        for row in &r {
            *seen
                .entry(row["uri"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{table}: rows exported twice: {twice:?}");
        let got: BTreeSet<String> = seen.into_keys().collect();
        let missing: Vec<_> = uris.difference(&got).collect();
        let extra: Vec<_> = got.difference(uris).collect();
        assert!(
            missing.is_empty(),
            "{table}: {} rows missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        assert!(extra.is_empty(), "{table}: unexpected rows {extra:?}");
    }
}

#[test]
fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let env = Env::new();
    let writer = Writer::start(env.cache.clone(), 100_000, Duration::from_micros(300));
    let mut killed = 0;
    let mut completed = 0;
    // Every Parquet file any run published: none may ever disappear.
    let mut ever_published = BTreeSet::new();
    // At least 25 runs, and as many more (up to 100) as it takes for 12 of them to be killed
    // mid-way: on a fast machine more runs finish before their kill time.
    for i in 0..100u64 {
        if i >= 25 && killed >= 12 {
            break;
        }
        let args: Vec<String> = vec![
            "--cache-dir".into(),
            env.cache.display().to_string(),
            "--output".into(),
            env.out.display().to_string(),
            "--json".into(),
            // Small batches: more commit points to be killed around.
            "--batch-files".into(),
            "150".into(),
        ];
        let mut child = command(&args, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = (rand_u64() % 250) + i % 3;
        std::thread::sleep(Duration::from_millis(delay));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(
                    status.success() || status.code() == Some(3),
                    "run failed: {status:?}"
                );
                completed += 1;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                killed += 1;
            }
        }
        let _ = child.wait();
        ever_published.extend(published(&env.out).into_keys());
    }
    let written = writer.finish();
    let s = env.export_ok(&[]);
    eprintln!("killed {killed}, completed {completed}; final run: {s}");
    assert!(
        killed >= 5,
        "too few runs were killed mid-way ({killed}) for the test to mean anything"
    );
    assert!(written.values().map(BTreeSet::len).sum::<usize>() > 500);
    let now = published(&env.out);
    let withdrawn: Vec<_> = ever_published
        .iter()
        .filter(|p| !now.contains_key(*p))
        .collect();
    assert!(
        withdrawn.is_empty(),
        "published, then withdrawn: {withdrawn:?}"
    );
    assert_manifests_cover(&env.out);
    assert_exactly_once(&env, &written);
}

// ---------------------------------------------------------------------------------------------
// Each crash window, hit deterministically with the test-only fault hook (`BATCH_EXPORT_FAULT`,
// see `config::Fault`): a run aborted there, then a normal run that must recover.

/// `n` cache files in two tables (in-network posts and likes on a study post).
fn fill_two_tables(env: &Env, n: usize) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut written: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for i in 0..n {
        let rkey = format!("3l{i:011}");
        let author = [A1, A2, A3][i % 3];
        if i % 2 == 0 {
            let uri = format!("at://{author}/app.bsky.feed.post/{rkey}");
            env.write(
                &post_path(
                    &format!("in_network_user_activity/create/post/{author}"),
                    author,
                    &rkey,
                ),
                &post_json(
                    &uri,
                    "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
                    author,
                    json!({"$type": "app.bsky.feed.post", "text": format!("post {i}"), "createdAt": "2024-10-02T13:00:00.000Z"}),
                    CLOCK,
                ),
            );
            written
                .entry("in_network_user_activity")
                .or_default()
                .insert(uri);
        } else {
            env.write(
                &format!("study_user_activity/create/like_on_user_post/3l5jnpb6xyz2k/author_did={author}_like_uri_suffix={rkey}.json"),
                &like_json(author, &rkey, &format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k")),
            );
            written
                .entry("study_user_activity/create/like_on_user_post")
                .or_default()
                .insert(format!("at://{author}/app.bsky.feed.like/{rkey}"));
        }
    }
    written
}

/// Runs `args` with the fault hook set to `fault` and asserts the process aborted there.
fn run_aborted_at(env: &Env, args: &[String], fault: &str, client_env: &[(&str, &str)]) {
    use std::os::unix::process::ExitStatusExt;
    let mut vars = client_env.to_vec();
    vars.push(("BATCH_EXPORT_FAULT", fault));
    // In the temp dir: an abort may leave a core file in the working directory.
    let out = command(args, &vars)
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(6),
        "expected an abort at {fault}: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("test fault"),
        "{}",
        describe(&out)
    );
}

fn local_args(env: &Env, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--cache-dir".into(),
        env.cache.display().to_string(),
        "--output".into(),
        env.out.display().to_string(),
        "--json".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Output files (relative paths) whose names end in `suffix`, hidden ones included.
fn output_files_ending(env: &Env, suffix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![env.out.clone()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().ends_with(suffix) {
                out.push(p.strip_prefix(&env.out).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Every published Parquet file of a local output (relative path -> bytes). Nothing under
/// `_batch_export/` ends in `.parquet`.
fn published(root: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().ends_with(".parquet") {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                assert!(
                    !rel.starts_with("_batch_export"),
                    "a *.parquet name in the export's own folder: {rel}"
                );
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Every file published before is still there, byte for byte (rows are never withdrawn).
fn assert_nothing_withdrawn(before: &BTreeMap<String, Vec<u8>>, after: &BTreeMap<String, Vec<u8>>) {
    for (path, bytes) in before {
        match after.get(path) {
            None => panic!("{path} was published, then withdrawn"),
            Some(b) => assert!(b == bytes, "{path} was published, then changed"),
        }
    }
}

/// The output's manifests (local): batch id -> (manifest JSON, its keys object's length).
fn manifests(root: &std::path::Path) -> BTreeMap<i64, Value> {
    let dir = root.join("_batch_export/batches");
    let mut out = BTreeMap::new();
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".json") {
            let m: Value = serde_json::from_slice(&fs::read(e.path()).unwrap()).unwrap();
            let keys = fs::read(dir.join(format!("{stem}.keys"))).unwrap();
            assert_eq!(
                keys.len() as u64,
                16 * m["keys"]["count"].as_u64().unwrap(),
                "{name}"
            );
            out.insert(stem.parse().unwrap(), m);
        }
    }
    out
}

/// Every published Parquet file is named by exactly one manifest, and the manifests chain (each
/// names the one before).
fn assert_manifests_cover(root: &std::path::Path) {
    let m = manifests(root);
    let files = published(root);
    let mut named = BTreeSet::new();
    let mut previous: Option<i64> = None;
    for (id, man) in &m {
        assert_eq!(man["batch_id"], *id);
        // (The first manifest may follow batches published without one, by version 1.)
        if previous.is_some() {
            assert_eq!(man["previous_batch_id"].as_i64(), previous, "chain at {id}");
        }
        previous = Some(*id);
        for f in man["files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap().to_owned();
            assert!(
                files.contains_key(&path),
                "manifest {id} names {path}, not in the output"
            );
            assert!(named.insert(path.clone()), "{path} in two manifests");
        }
    }
    let unnamed: Vec<_> = files.keys().filter(|p| !named.contains(*p)).collect();
    assert!(
        unnamed.is_empty(),
        "published files no manifest names: {unnamed:?}"
    );
}

const CRASH_FILES: usize = 30;
const CRASH_BATCH: &[&str] = &["--batch-files", "10"];

/// A run aborted at `fault` in the first batch, then a normal run: nothing published is ever
/// withdrawn, nothing is lost or doubled, every output file is in a manifest. Returns the
/// recovery run's summary and what was published at the crash.
fn crash_and_recover(fault: &str) -> (Value, BTreeMap<String, Vec<u8>>) {
    let env = Env::new();
    let written = fill_two_tables(&env, CRASH_FILES);
    run_aborted_at(&env, &local_args(&env, CRASH_BATCH), fault, &[]);
    let at_crash = published(&env.out);
    let s = env.export_ok(&[]);
    let after = published(&env.out);
    assert_nothing_withdrawn(&at_crash, &after);
    assert_eq!(
        output_files_ending(&env, ".staged"),
        Vec::<String>::new(),
        "staged files are published or removed"
    );
    assert_manifests_cover(&env.out);
    assert_exactly_once(&env, &written);
    (s, at_crash)
}

#[test]
fn crash_after_stage_publishes_nothing_and_exports_again() {
    let env = Env::new();
    fill_two_tables(&env, CRASH_FILES);
    run_aborted_at(&env, &local_args(&env, CRASH_BATCH), "after-stage", &[]);
    // Staged, fsynced, invisible: nothing a `**/*.parquet` glob or a hive reader can see.
    assert!(!output_files_ending(&env, ".staged").is_empty());
    assert!(published(&env.out).is_empty());
    assert_eq!(env.cache_files().len(), CRASH_FILES, "nothing deleted");
    drop(env);
    let (s, at_crash) = crash_and_recover("after-stage");
    assert!(at_crash.is_empty());
    assert_eq!(s["batches_rolled_forward"], 0, "{s}");
    assert_eq!(s["files_exported"], CRASH_FILES, "{s}");
}

#[test]
fn crash_after_commit_is_rolled_forward() {
    let (s, at_crash) = crash_and_recover("after-commit");
    assert!(at_crash.is_empty(), "committed, not yet published");
    assert_eq!(s["batches_rolled_forward"], 1, "{s}");
    assert_eq!(s["already_exported"], 10, "the committed batch: {s}");
    assert_eq!(s["files_exported"], CRASH_FILES - 10, "{s}");
    assert_eq!(s["files_deleted"], CRASH_FILES, "{s}");
}

#[test]
fn crash_between_two_tables_of_a_batch_is_rolled_forward() {
    let (s, at_crash) = crash_and_recover("after-publish-one");
    assert_eq!(
        at_crash.len(),
        1,
        "one table published: {:?}",
        at_crash.keys()
    );
    assert_eq!(s["batches_rolled_forward"], 1, "{s}");
    assert_eq!(s["already_exported"], 10, "{s}");
}

#[test]
fn crash_after_publish_before_the_manifest_is_rolled_forward() {
    let (s, at_crash) = crash_and_recover("after-publish");
    assert!(!at_crash.is_empty());
    assert_eq!(s["batches_rolled_forward"], 1, "{s}");
    assert_eq!(s["already_exported"], 10, "{s}");
}

#[test]
fn crash_after_the_manifest_is_rolled_forward() {
    let (s, at_crash) = crash_and_recover("after-manifest");
    assert!(!at_crash.is_empty());
    assert_eq!(s["batches_rolled_forward"], 1, "{s}");
    assert_eq!(s["already_exported"], 10, "{s}");
}

#[test]
fn crash_between_publish_and_delete_is_finished_next_run() {
    let env = Env::new();
    let written = fill_two_tables(&env, CRASH_FILES);
    run_aborted_at(&env, &local_args(&env, CRASH_BATCH), "after-take", &[]);
    let at_crash = published(&env.out);
    let files = env.cache_files();
    let taken: Vec<&String> = files
        .iter()
        .filter(|f| f.rsplit('/').next().unwrap().starts_with(".exported-"))
        .collect();
    // At least one (the deletes run on several threads).
    assert!(!taken.is_empty(), "{files:?}");
    assert_eq!(files.len(), CRASH_FILES, "the taken file is still there");
    let s = env.export_ok(&[]);
    assert_eq!(s["batches_rolled_forward"], 0, "{s}");
    assert_eq!(
        s["already_exported"], 10,
        "the published batch, taken file included: {s}"
    );
    assert_eq!(s["files_exported"], CRASH_FILES - 10, "{s}");
    for t in taken {
        assert!(!env.cache.join(t).exists(), "{t} finished");
    }
    assert_nothing_withdrawn(&at_crash, &published(&env.out));
    assert_manifests_cover(&env.out);
    assert_exactly_once(&env, &written);
}

#[test]
fn concurrent_exports_and_a_live_writer() {
    let env = Env::new();
    let writer = Writer::start(env.cache.clone(), 3_000, Duration::from_micros(200));
    let args: Vec<String> = vec![
        "--cache-dir".into(),
        env.cache.display().to_string(),
        "--output".into(),
        env.out.display().to_string(),
        "--json".into(),
        "--batch-files".into(),
        "500".into(),
    ];
    let mut busy = 0;
    for _ in 0..6 {
        // Two exports started at once: one runs, the other sees the lock and exits 0.
        let a = command(&args, &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let b = command(&args, &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for out in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
            if String::from_utf8_lossy(&out.stderr).contains("another run holds") {
                busy += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let written = writer.finish();
    env.export_ok(&[]);
    eprintln!("{busy} of 12 runs found the lock held");
    // The overlap this test is about. Not forced (nothing holds a run open on purpose), but
    // reliable: the two runs of a round start within a millisecond and each takes tens of
    // milliseconds (SQLite, a walk, Parquet), so in practice every round overlaps (6 of 12
    // observed); this fails only if all six rounds ran one after the other.
    assert!(busy >= 1, "no two runs overlapped");
    assert_exactly_once(&env, &written);
}

// ---------------------------------------------------------------------------------------------
// S3 (moto server on 127.0.0.1).

const S3_READER: &str = r#"
import os, sys, boto3
endpoint, bucket, dest = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1',
                  aws_access_key_id='testing', aws_secret_access_key='testing')
keys = []
for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket):
    for o in page.get('Contents', []):
        keys.append(o['Key'])
        path = os.path.join(dest, o['Key'])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, o['Key'], path)
print('\n'.join(sorted(keys)))
"#;

/// Lists and downloads every object of `bucket`; returns the keys.
fn download_bucket(endpoint: &str, bucket: &str, dest: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            S3_READER,
            endpoint,
            bucket,
            &dest.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "listing the bucket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Key -> ETag of every object of `bucket`.
fn object_etags(endpoint: &str, bucket: &str) -> BTreeMap<String, String> {
    let script = r#"
import json, sys, boto3
s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',
                  aws_access_key_id='testing', aws_secret_access_key='testing')
out = {}
for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[2]):
    for o in page.get('Contents', []):
        out[o['Key']] = s3.head_object(Bucket=sys.argv[2], Key=o['Key'])['ETag']
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, endpoint, bucket])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn s3_args(env: &Env, endpoint: &str, output: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--cache-dir".into(),
        env.cache.display().to_string(),
        "--output".into(),
        output.into(),
        "--s3-endpoint".into(),
        endpoint.into(),
        "--json".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn fill_examples(env: &Env) {
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k"),
        &study_post(S1, "3l5jnpb6xyz2k", "s3"),
    );
    env.write(
        &post_path(
            &format!("in_network_user_activity/create/post/{A1}"),
            A1,
            "3l5jqyv2s4k2c",
        ),
        &example1(),
    );
    env.write(
        &follow_path("follower", S1, S2),
        &follow_json(S1, S2, "3l5jw7c2bde2s"),
    );
    env.write(
        &follow_path("followee", S1, S2),
        &follow_json(S1, S2, "3l5jw7c2bde2s"),
    );
}

#[test]
fn s3_upload_round_trip_and_multipart() {
    require_pyarrow();
    let server = s3::S3Server::start();
    server.create_bucket("research");
    let env = Env::new();
    fill_examples(&env);
    let out = run(
        &s3_args(&env, &server.endpoint, "s3://research/bluesky/data", &[]),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(summary(&out)["parquet_files"], 3);
    assert!(env.cache_files().is_empty());
    // Multipart path: a Parquet file over 10 MiB (no compression, incompressible text) in
    // 5 MiB parts, so at least two parts are sent and reassembled.
    let mut seed = rand_u64() | 1;
    let big_posts = 26;
    for i in 0..big_posts {
        let text: String = (0..450_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 "
                    [(seed % 63) as usize] as char
            })
            .collect();
        let rkey = format!("3l5k2{i:08}");
        env.write(
            &post_path("study_user_activity/create/post", S2, &rkey),
            &study_post(S2, &rkey, &text),
        );
    }
    let out = run(
        &s3_args(
            &env,
            &server.endpoint,
            "s3://research/bluesky/data",
            &[
                "--compression",
                "none",
                "--s3-multipart-threshold-mib",
                "5",
                "--s3-part-size-mib",
                "5",
                "--log",
                "warn,batch_export::sink=debug",
            ],
        ),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let s = summary(&out);
    assert!(
        s["parquet_bytes"].as_u64().unwrap() > 10 << 20,
        "the Parquet file must exceed two parts: {s}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parts: Vec<u64> = stderr
        .lines()
        .filter(|l| l.contains("multipart upload completed"))
        .map(|l| {
            let at = l.find("parts=").expect("parts field") + "parts=".len();
            l[at..].split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(parts.len(), 1, "one multipart upload: {stderr}");
    assert!(parts[0] >= 2, "sent in {} parts: {stderr}", parts[0]);
    // The store agrees: a multipart object's ETag ends in -<number of parts>.
    let etags = object_etags(&server.endpoint, "research");
    let big: Vec<&String> = etags.values().filter(|e| e.contains('-')).collect();
    assert_eq!(big.len(), 1, "one multipart object: {etags:?}");
    assert!(
        big[0]
            .trim_matches('"')
            .ends_with(&format!("-{}", parts[0])),
        "ETag {} of a {}-part upload",
        big[0],
        parts[0]
    );

    let dest = env.dir.path().join("downloaded");
    let keys = download_bucket(&server.endpoint, "research", &dest);
    let parquet: Vec<&String> = keys.iter().filter(|k| k.ends_with(".parquet")).collect();
    assert_eq!(parquet.len(), 4, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.starts_with("bluesky/data/")
            && (k.ends_with("-0.parquet") || k.starts_with("bluesky/data/_batch_export/"))),
        "{keys:?}"
    );
    assert_manifests_cover(&dest.join("bluesky/data"));
    assert!(
        !server.requests().iter().any(|r| r.is_delete_object()),
        "no DeleteObject"
    );
    let t = read_parquet_tree(&dest.join("bluesky/data"));
    assert_eq!(
        schema(&t, "study_user_activity/create/post"),
        expect_schema(POST_SCHEMA)
    );
    let posts = rows(&t, "study_user_activity/create/post");
    assert_eq!(posts.len(), 1 + big_posts);
    assert_eq!(
        posts
            .iter()
            .filter(|r| r["text"].as_str().unwrap().len() == 450_000)
            .count(),
        big_posts,
        "every row of the multipart object read back whole"
    );
    assert_eq!(rows(&t, "scraped_user_social_network").len(), 2);
    let r = rows(&t, "in_network_user_activity");
    assert_eq!(r[0]["text"], "Good morning, Bluesky!");
}

#[test]
fn s3_every_crash_window_rolls_forward_and_never_sends_delete_object() {
    require_pyarrow();
    let server = s3::S3Server::start();
    for fault in [
        "after-stage",
        "after-commit",
        "after-publish-one",
        "after-publish",
        "after-manifest",
        "after-take",
    ] {
        let bucket = format!("crash-{fault}");
        server.create_bucket(&bucket);
        let env = Env::new();
        let written = fill_two_tables(&env, CRASH_FILES);
        let args = s3_args(
            &env,
            &server.endpoint,
            &format!("s3://{bucket}/x"),
            CRASH_BATCH,
        );
        run_aborted_at(&env, &args, fault, s3::CLIENT_ENV);
        let at_crash = object_etags(&server.endpoint, &bucket);
        if fault == "after-stage" || fault == "after-commit" {
            assert!(
                !at_crash.keys().any(|k| k.ends_with(".parquet")),
                "{fault}: nothing published yet: {at_crash:?}"
            );
        }
        let out = run(&args, s3::CLIENT_ENV);
        assert_eq!(out.status.code(), Some(0), "{fault}: {}", describe(&out));
        let rolled = summary(&out)["batches_rolled_forward"].as_u64().unwrap();
        let committed_at_crash = !matches!(fault, "after-stage" | "after-take");
        assert_eq!(rolled, u64::from(committed_at_crash), "{fault}");
        // Every object there at the crash is still there, unchanged (a roll-forward rewrites a
        // manifest with the same bytes, and never re-uploads a finished Parquet file).
        let after = object_etags(&server.endpoint, &bucket);
        for (key, etag) in &at_crash {
            assert_eq!(
                after.get(key),
                Some(etag),
                "{fault}: {key} withdrawn or changed"
            );
        }
        assert!(env.cache_files().is_empty(), "{fault}");
        let dest = env.dir.path().join("downloaded");
        download_bucket(&server.endpoint, &bucket, &dest);
        assert_rows_exactly_once(&read_parquet_tree(&dest.join("x")), &written);
        assert_manifests_cover(&dest.join("x"));
    }
    let requests = server.requests();
    assert!(
        requests.iter().filter(|r| r.method == "PUT").count() > 20,
        "the server logged the uploads: {requests:?}"
    );
    let deletes: Vec<_> = requests.iter().filter(|r| r.is_delete_object()).collect();
    assert!(deletes.is_empty(), "DeleteObject sent: {deletes:?}");
}

#[test]
fn s3_unreachable_or_failing_leaves_the_cache_untouched() {
    require_pyarrow();
    let env = Env::new();
    fill_examples(&env);
    let before = env.cache_files();
    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", s3::free_port());
    // Its own state directory: a state directory is bound to its output, endpoint included.
    let dead_state = env.dir.path().join("dead-state");
    let out = run(
        &s3_args(
            &env,
            &dead,
            "s3://research/x",
            &[
                "--s3-max-attempts",
                "2",
                "--state-dir",
                dead_state.to_str().unwrap(),
            ],
        ),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cache is untouched"),
        "{}",
        describe(&out)
    );
    assert_eq!(env.cache_files(), before);

    // The server answers with errors (no such bucket) mid-run.
    let server = s3::S3Server::start();
    let out = run(
        &s3_args(
            &env,
            &server.endpoint,
            "s3://research/x",
            &["--s3-max-attempts", "2"],
        ),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(env.cache_files(), before);

    // Fixed: the next run exports everything, exactly once.
    server.create_bucket("research");
    let out = run(
        &s3_args(&env, &server.endpoint, "s3://research/x", &[]),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(env.cache_files().is_empty());
    let dest = env.dir.path().join("downloaded");
    let keys = download_bucket(&server.endpoint, "research", &dest);
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(".parquet")).count(),
        3,
        "{keys:?}"
    );
    let t = read_parquet_tree(&dest.join("x"));
    assert_eq!(rows(&t, "scraped_user_social_network").len(), 2);
    assert_eq!(rows(&t, "in_network_user_activity").len(), 1);
    assert_eq!(rows(&t, "study_user_activity/create/post").len(), 1);
}

#[test]
fn s3_failing_mid_run_then_next_run_completes_exactly_once() {
    require_pyarrow();
    let server = s3::S3Server::start();
    server.create_bucket("research");
    let env = Env::new();
    let mut written = BTreeSet::new();
    for i in 0..12 {
        let rkey = format!("3l5k{i:09}");
        env.write(
            &post_path(
                &format!("in_network_user_activity/create/post/{A1}"),
                A1,
                &rkey,
            ),
            &study_post(A1, &rkey, &format!("post {i}")),
        );
        written.insert(format!("at://{A1}/app.bsky.feed.post/{rkey}"));
    }
    // One file per batch: the first batches are uploaded and committed, then S3 starts failing.
    let proxy = FlakyProxy::start(server.port, 40_000);
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let out = run(
        &s3_args(
            &env,
            &endpoint,
            "s3://research/x",
            &["--batch-files", "1", "--s3-max-attempts", "2"],
        ),
        s3::CLIENT_ENV,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the proxy should have broken mid-run: {}",
        describe(&out)
    );
    let left = env.cache_files().len();
    assert!(
        left > 0 && left < 12,
        "some batches committed before the failure, some not: {left} left"
    );
    // The failed run still reports what it committed, and why it stopped.
    let s = summary(&out);
    assert_eq!(s["files_exported"], 12 - left as u64, "{s}");
    assert_eq!(s["files_deleted"], 12 - left as u64, "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap_or("")
            .contains("committed but not yet published"),
        "{s}"
    );
    // S3 is back (at the same endpoint): the next run publishes the committed batch (roll
    // forward) and exports the rest.
    proxy.heal();
    let out = run(
        &s3_args(&env, &endpoint, "s3://research/x", &[]),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        summary(&out)["batches_rolled_forward"],
        1,
        "the failed batch is rolled forward"
    );
    assert!(!server.requests().iter().any(|r| r.is_delete_object()));
    assert_eq!(summary(&out)["error"], Value::Null);
    assert!(env.cache_files().is_empty());
    let dest = env.dir.path().join("downloaded");
    download_bucket(&server.endpoint, "research", &dest);
    let t = read_parquet_tree(&dest.join("x"));
    let r = rows(&t, "in_network_user_activity");
    let got: Vec<String> = r
        .iter()
        .map(|r| r["uri"].as_str().unwrap().to_owned())
        .collect();
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), unique.len(), "a row was exported twice");
    assert_eq!(unique, written);
}

// ---------------------------------------------------------------------------------------------
// The export's memory travels with the output: a state directory that is lost, restored from a
// backup or foreign is refused (exit 2) and recovered with --adopt-output.

/// Writes `n` study posts with rkeys numbered from `from`; returns (cache path, URI) of each.
fn study_posts(env: &Env, from: usize, n: usize) -> Vec<(String, String)> {
    (from..from + n)
        .map(|i| {
            let rkey = format!("3l6a{i:09}");
            let rel = post_path("study_user_activity/create/post", S1, &rkey);
            env.write(&rel, &study_post(S1, &rkey, &format!("post {i}")));
            (rel, format!("at://{S1}/app.bsky.feed.post/{rkey}"))
        })
        .collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Every URI of `posts` is a row of the study post table exactly once, and nothing else is.
fn assert_posts_once(env: &Env, posts: &[(String, String)]) {
    let mut written: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    written.insert(
        "study_user_activity/create/post",
        posts.iter().map(|(_, u)| u.clone()).collect(),
    );
    assert_exactly_once(env, &written);
    assert_manifests_cover(&env.out);
}

/// A refused run: exit 2, the message says `what` and names the way out, and nothing changed.
fn assert_refused(env: &Env, args: &[&str], what: &str) {
    let before_out = published(&env.out);
    let before_cache = env.cache_files();
    let out = env.export(args);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(what), "says {what:?}: {err}");
    assert!(err.contains("--adopt-output"), "names the way out: {err}");
    assert_eq!(published(&env.out), before_out, "nothing published");
    assert_eq!(env.cache_files(), before_cache, "nothing deleted");
}

#[test]
fn a_lost_state_directory_is_refused_then_adopted() {
    let env = Env::new();
    let mut posts = study_posts(&env, 0, 5);
    let replayed = posts[2].clone();
    let replay_json = fs::read_to_string(env.cache.join(&replayed.0)).unwrap();
    env.export_ok(&["--batch-files", "2"]);
    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    // Meanwhile: new files, and the writer replayed (rewrote) an exported one.
    posts.extend(study_posts(&env, 100, 3));
    env.write(
        &replayed.0,
        &replay_json.replace("2024-10-02-14:03:28", "2024-10-03-09:00:00"),
    );
    assert_refused(&env, &[], "behind the output");
    let s = env.export_ok(&["--adopt-output"]);
    assert_eq!(s["batches_adopted"], 3, "{s}");
    assert_eq!(
        s["already_exported"], 1,
        "the replay is known from the manifests: {s}"
    );
    assert_eq!(s["files_exported"], 3, "{s}");
    assert_posts_once(&env, &posts);
    // Adopted for good: the next run needs no flag.
    posts.extend(study_posts(&env, 200, 1));
    env.export_ok(&[]);
    assert_posts_once(&env, &posts);
}

#[test]
fn a_restored_state_directory_is_refused_then_adopted() {
    let env = Env::new();
    let mut posts = study_posts(&env, 0, 3);
    env.export_ok(&[]);
    let backup = env.dir.path().join("state-backup");
    copy_dir(&env.cache.join(".export"), &backup);
    let later = study_posts(&env, 100, 3);
    let replay_json = fs::read_to_string(env.cache.join(&later[0].0)).unwrap();
    posts.extend(later.clone());
    env.export_ok(&[]);
    // The state directory is restored from the backup taken before the second batch.
    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    fs::rename(&backup, env.cache.join(".export")).unwrap();
    posts.extend(study_posts(&env, 200, 2));
    env.write(&later[0].0, &replay_json);
    assert_refused(&env, &[], "behind the output");
    let s = env.export_ok(&["--adopt-output"]);
    assert_eq!(s["batches_adopted"], 2, "{s}");
    assert_eq!(s["already_exported"], 1, "{s}");
    assert_posts_once(&env, &posts);
}

#[test]
fn an_output_behind_its_state_directory_is_refused() {
    let env = Env::new();
    study_posts(&env, 0, 3);
    env.export_ok(&[]);
    let old_copy = env.dir.path().join("out-copy");
    copy_dir(&env.out, &old_copy);
    study_posts(&env, 100, 3);
    env.export_ok(&[]);
    // The output is restored from the older copy: the second batch's rows are gone from it.
    fs::remove_dir_all(&env.out).unwrap();
    fs::rename(&old_copy, &env.out).unwrap();
    study_posts(&env, 200, 1);
    assert_refused(&env, &[], "ahead of the output");
}

#[test]
fn a_second_exporter_on_one_output_is_refused() {
    let env = Env::new();
    study_posts(&env, 0, 2);
    env.export_ok(&[]);
    study_posts(&env, 100, 2);
    let other = env.dir.path().join("other-state");
    assert_refused(
        &env,
        &["--state-dir", other.to_str().unwrap()],
        "another exporter",
    );
    let marker: Value =
        serde_json::from_slice(&fs::read(env.out.join("_batch_export/owner.json")).unwrap())
            .unwrap();
    assert!(
        marker["state_dir"].as_str().unwrap().ends_with(".export"),
        "{marker}"
    );
}

#[test]
fn a_file_missing_a_required_key_is_quarantined_and_unknown_keys_are_counted() {
    let env = Env::new();
    // A post without `url` (it used to become a null `url`; the predecessor's is always "").
    let full: Value = serde_json::from_str(&study_post(S1, "3l5jnpb6xyz2k", "no url")).unwrap();
    let mut no_url = full.as_object().unwrap().clone();
    no_url.remove("url");
    let missing = post_path("study_user_activity/create/post", S1, "3l5jnpb6xyz2k");
    env.write(&missing, &serde_json::to_string(&no_url).unwrap());
    // A post with two keys this export does not know: exported, the keys counted.
    let mut extra: Value = serde_json::from_str(&study_post(S1, "3l5jr4q7m2s2x", "extra")).unwrap();
    extra["brand_new"] = json!({"x": 1});
    extra["another"] = json!(null);
    env.write(
        &post_path("study_user_activity/create/post", S1, "3l5jr4q7m2s2x"),
        &serde_json::to_string(&extra).unwrap(),
    );
    let out = env.export(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let s = summary(&out);
    assert_eq!(s["quarantined"], 1, "{s}");
    assert_eq!(s["unknown_keys"], 2, "{s}");
    assert_eq!(s["files_exported"], 1, "{s}");
    assert!(env.cache.join(".quarantine").join(&missing).exists());
    let log = fs::read_to_string(env.cache.join(".quarantine/reasons.log")).unwrap();
    assert!(log.contains("missing required key(s): url"), "{log}");
    let r = rows(&env.read(), "study_user_activity/create/post");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["url"], "", "{:?}", r[0]);
}

/// `chattr +i` (immutable: not even root can rename or unlink it) for the life of the guard.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: std::path::PathBuf) -> Option<Immutable> {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Immutable(path))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn an_exported_file_that_cannot_be_deleted_needs_a_human() {
    let env = Env::new();
    let posts = study_posts(&env, 0, 3);
    // The only way to make a delete fail for root: an immutable file (ext4/xfs/btrfs).
    let Some(guard) = Immutable::set(env.cache.join(&posts[1].0)) else {
        eprintln!("skipping: chattr +i is not supported here (file system or capability)");
        return;
    };
    let out = env.export(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let s = summary(&out);
    assert_eq!(s["delete_failed"], 1, "{s}");
    assert_eq!(s["files_deleted"], 2, "{s}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"delete_failed\":1"));
    drop(guard);
    // Known as exported: the next run deletes it without exporting it again.
    let s = env.export_ok(&[]);
    assert_eq!(s["already_exported"], 1, "{s}");
    assert_eq!(s["files_deleted"], 1, "{s}");
    assert_posts_once(&env, &posts);
}

#[test]
fn s3_checksum_and_encryption_options_reach_the_store() {
    require_pyarrow();
    let server = s3::S3Server::start();
    server.create_bucket("opts");
    let env = Env::new();
    fill_examples(&env);
    let out = run(
        &s3_args(&env, &server.endpoint, "s3://opts/x", &[]),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let parquet_puts = |from: usize| -> Vec<s3::Request> {
        server.requests()[from..]
            .iter()
            .filter(|r| r.method == "PUT" && r.path.ends_with(".parquet"))
            .cloned()
            .collect()
    };
    let first = parquet_puts(0);
    assert_eq!(first.len(), 3, "{first:?}");
    // The SDK's default: a CRC checksum with every upload.
    assert!(
        first.iter().all(|r| r.headers.contains("checksum")),
        "{first:?}"
    );
    let seen = server.requests().len();
    env.write(
        &post_path("study_user_activity/create/post", S2, "3l5jr4q7m2s2x"),
        &study_post(S2, "3l5jr4q7m2s2x", "second"),
    );
    let out = run(
        &s3_args(
            &env,
            &server.endpoint,
            "s3://opts/x",
            &[
                "--s3-checksum",
                "when-required",
                "--s3-sse",
                "aws:kms",
                "--s3-kms-key-id",
                "alias/research-export",
            ],
        ),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let second = parquet_puts(seen);
    assert_eq!(second.len(), 1, "{second:?}");
    let h = &second[0].headers;
    assert!(!h.contains("checksum"), "no checksum header: {h}");
    assert!(h.contains("x-amz-server-side-encryption=aws:kms"), "{h}");
    assert!(
        h.contains("x-amz-server-side-encryption-aws-kms-key-id=alias/research-export"),
        "{h}"
    );
    let dest = env.dir.path().join("downloaded");
    download_bucket(&server.endpoint, "opts", &dest);
    assert_eq!(
        rows(
            &read_parquet_tree(&dest.join("x")),
            "study_user_activity/create/post"
        )
        .len(),
        2
    );
    // A KMS key without aws:kms is a usage error.
    let out = run(
        &s3_args(
            &env,
            &server.endpoint,
            "s3://opts/x",
            &["--s3-kms-key-id", "k"],
        ),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn s3s_fs_round_trip_and_crash_windows() {
    // The same protocol against a second, independent S3 implementation: what moto tolerates
    // is not what production code may rely on.
    require_pyarrow();
    let root = tempfile::tempdir().unwrap();
    let server = s3::S3sFs::start(root.path());
    for fault in [
        None,
        Some("after-commit"),
        Some("after-publish-one"),
        Some("after-manifest"),
    ] {
        let bucket = format!("s3s-{}", fault.unwrap_or("plain"));
        server.create_bucket(&bucket);
        let env = Env::new();
        let written = fill_two_tables(&env, CRASH_FILES);
        let args = s3_args(
            &env,
            &server.endpoint,
            &format!("s3://{bucket}/x"),
            CRASH_BATCH,
        );
        let mut at_crash = BTreeMap::new();
        if let Some(fault) = fault {
            run_aborted_at(&env, &args, fault, s3::CLIENT_ENV);
            at_crash = object_etags(&server.endpoint, &bucket);
        }
        let out = run(&args, s3::CLIENT_ENV);
        assert_eq!(out.status.code(), Some(0), "{fault:?}: {}", describe(&out));
        assert_eq!(
            summary(&out)["batches_rolled_forward"],
            u64::from(fault.is_some()),
            "{fault:?}"
        );
        let after = object_etags(&server.endpoint, &bucket);
        for (key, etag) in &at_crash {
            assert_eq!(
                after.get(key),
                Some(etag),
                "{fault:?}: {key} withdrawn or changed"
            );
        }
        assert!(env.cache_files().is_empty(), "{fault:?}");
        let dest = env.dir.path().join("downloaded");
        download_bucket(&server.endpoint, &bucket, &dest);
        assert_rows_exactly_once(&read_parquet_tree(&dest.join("x")), &written);
        assert_manifests_cover(&dest.join("x"));
        // A second exporter is refused here too (the owner marker is read back).
        let other = env.dir.path().join("other-state");
        let mut second = args.clone();
        second.extend(["--state-dir".to_owned(), other.display().to_string()]);
        let out = run(&second, s3::CLIENT_ENV);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    }
}

#[test]
fn a_journal_of_the_previous_protocol_is_upgraded_or_refused() {
    // A version-1 journal (published before committing): its committed batches count as
    // published, and a batch it left `writing` (possibly published) is refused, never deleted.
    let env = Env::new();
    let posts = study_posts(&env, 0, 2);
    let state = env.cache.join(".export");
    fs::create_dir_all(&state).unwrap();
    let v1 = "CREATE TABLE batch (id INTEGER PRIMARY KEY, started_at INTEGER NOT NULL, state TEXT NOT NULL, files INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE batch_output (batch_id INTEGER NOT NULL, table_path TEXT NOT NULL, location TEXT NOT NULL, temp TEXT NOT NULL, rows INTEGER NOT NULL);
        CREATE TABLE exported (key BLOB PRIMARY KEY, batch_id INTEGER NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
        INSERT INTO batch VALUES (1, 100, 'committed', 1, 1);
        INSERT INTO batch VALUES (2, 200, 'writing', 0, 0);";
    let db = state.join("state.sqlite");
    let exec = |sql: &str| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()",
                db.to_str().unwrap(),
                sql,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    };
    exec(v1);
    let out = env.export(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("older batch-export"),
        "{}",
        describe(&out)
    );
    assert_eq!(env.cache_files().len(), 2, "nothing deleted");
    // What the older version's own run would do: roll its batch back.
    exec("UPDATE batch SET state = 'rolled_back' WHERE id = 2");
    env.export_ok(&[]);
    assert_eq!(
        sqlite_query(&db, "SELECT id, state FROM batch ORDER BY id"),
        ["1|published", "2|rolled_back", "3|published"]
    );
    assert_posts_once(&env, &posts);
}

// ---------------------------------------------------------------------------------------------
// Readers: docs/querying.md's recipes, generated from the declared schemas, run by DuckDB.

const QUERYING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/querying.md");

#[test]
fn querying_doc_has_a_recipe_and_ddl_for_every_declared_table() {
    let generated = batch_export::tables::querying_markdown();
    if std::env::var_os("BATCH_EXPORT_BLESS_DOCS").is_some() {
        let doc = fs::read_to_string(QUERYING).unwrap();
        let start = doc.find("<!-- generated -->").unwrap() + "<!-- generated -->\n".len();
        let end = doc.find("<!-- /generated -->").unwrap();
        fs::write(
            QUERYING,
            format!("{}{generated}{}", &doc[..start], &doc[end..]),
        )
        .unwrap();
    }
    let doc = fs::read_to_string(QUERYING).unwrap();
    assert!(
        doc.contains(&generated),
        "docs/querying.md is stale: run this test with BATCH_EXPORT_BLESS_DOCS=1"
    );
    // Every DDL column list is the table's declared schema, in order.
    for t in batch_export::tables::TABLES {
        let name = t.path.replace('/', "_");
        let at = doc
            .find(&format!("CREATE EXTERNAL TABLE {name} ("))
            .unwrap_or_else(|| panic!("no DDL for {}", t.path));
        let body = &doc[at..];
        let body = &body[body.find('(').unwrap() + 1..body.find("\n)").unwrap()];
        let cols: Vec<(String, String)> = body
            .split(",\n")
            .map(|c| {
                let mut p = c.split_whitespace();
                let n = p.next().unwrap().trim_matches('`').to_owned();
                (n, p.next().unwrap().to_owned())
            })
            .collect();
        assert_eq!(
            cols,
            declared_as(t, ["string", "bigint", "boolean"]),
            "{}",
            t.path
        );
    }
}

#[test]
fn duckdb_recipes_read_every_exported_table_with_typed_columns() {
    require_recipe_readers();
    let env = Env::new();
    fill_two_tables(&env, 20);
    fill_examples(&env);
    let s = env.export_ok(&[]);
    let out = env.out.display().to_string();
    assert_eq!(check_recipes(&s, &RecipeTarget::Local(&out)), 4, "{s}");
}

/// The recipes of every table: the consent dataset (every kind of record a study produces) and
/// the in-network posts and follows of the examples, exported locally and read back by each
/// reader's recipe.
#[test]
fn recipes_read_every_table_with_typed_columns() {
    require_recipe_readers();
    let env = Env::new();
    consent_dataset(&env, 0);
    fill_examples(&env);
    // What neither holds: a study user's own repost and block, an in-network post's delete.
    let cid = "bafyreihus4wvodsdmhsschvb57dn7qsl6wxanu5fv6httkq2njd7zqadri";
    let subject = format!("at://{A1}/app.bsky.feed.post/3l5jqyv2s4k2c");
    env.write(
        &format!("study_user_activity/create/repost/author_did={S2}_repost_uri_suffix=3l5k1rrrrrr2r.json"),
        &transform::generic_record_cache_json(
            &format!("at://{S2}/app.bsky.feed.repost/3l5k1rrrrrr2r"),
            cid,
            S2,
            "app.bsky.feed.repost",
            &json!({"$type": "app.bsky.feed.repost", "createdAt": "2024-10-02T14:30:00.000Z",
                "subject": {"uri": subject, "cid": cid}}),
        ),
    );
    env.write(
        &format!("study_user_activity/create/block/author_did={S2}_block_uri_suffix=3l5k2bbbbbb2b.json"),
        &transform::generic_record_cache_json(
            &format!("at://{S2}/app.bsky.graph.block/3l5k2bbbbbb2b"),
            cid,
            S2,
            "app.bsky.graph.block",
            &json!({"$type": "app.bsky.graph.block", "createdAt": "2024-10-02T14:31:00.000Z", "subject": A3}),
        ),
    );
    env.write(
        &format!("in_network_user_activity/delete/post/{A1}/author_did={A1}_post_uri_suffix=3l5jqyv2s4k2c.json"),
        &delete_json(&subject, A1, "app.bsky.feed.post", "3l5jqyv2s4k2c", 103),
    );
    let s = env.export_ok(&[]);
    let out = env.out.display().to_string();
    let exported: Vec<&str> = batch_export::tables::TABLES
        .iter()
        .filter(|t| s["tables"][t.path]["rows"].as_u64().is_some())
        .map(|t| t.path)
        .collect();
    let missing: Vec<&str> = batch_export::tables::TABLES
        .iter()
        .map(|t| t.path)
        .filter(|p| !exported.contains(p))
        .collect();
    assert!(
        missing.is_empty(),
        "tables the dataset does not reach: {missing:?}"
    );
    assert_eq!(
        check_recipes(&s, &RecipeTarget::Local(&out)),
        batch_export::tables::TABLES.len()
    );
}

#[test]
fn s3_recipes_read_every_exported_table_with_typed_columns() {
    require_recipe_readers();
    let server = s3::S3Server::start();
    server.create_bucket("research");
    let env = Env::new();
    fill_two_tables(&env, 20);
    fill_examples(&env);
    let out = run(
        &s3_args(&env, &server.endpoint, "s3://research/bluesky/data", &[]),
        s3::CLIENT_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let s = summary(&out);
    let ran = check_recipes(
        &s,
        &RecipeTarget::S3 {
            endpoint: &server.endpoint,
            bucket_prefix: "research/bluesky/data",
        },
    );
    assert_eq!(ran, 4, "{s}");
}

fn require_recipe_readers() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import duckdb, polars, pyarrow"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "duckdb, polars or pyarrow is not installed for python3 (pip install -r tests/requirements.txt)"
    );
}

/// Where the recipes of docs/querying.md are pointed: `OUTPUT`, or `BUCKET/PREFIX` on a local
/// S3 server (the set-up the document gives for an S3-compatible store, plain HTTP).
enum RecipeTarget<'a> {
    Local(&'a str),
    S3 {
        endpoint: &'a str,
        bucket_prefix: &'a str,
    },
}

/// DuckDB with `httpfs` loaded from the PyPI package `duckdb-extension-httpfs` (the offline
/// set-up of docs/querying.md) and a secret for the local server; `S3_OPTIONS` and `S3_FS` for
/// the Polars and pyarrow recipes.
const S3_RECIPE_SETUP: &str = r#"
import os, duckdb, pyarrow.fs, duckdb_extension_httpfs
ENDPOINT = os.environ['RECIPE_S3_ENDPOINT']
HOST = ENDPOINT.split('://', 1)[1]
ext = os.path.join(os.path.dirname(duckdb_extension_httpfs.__file__), 'extensions',
                   'v' + duckdb.__version__, 'httpfs.duckdb_extension')
con.execute("SET autoinstall_known_extensions = false")
con.execute(f"LOAD '{ext}'")
con.execute(f"""CREATE SECRET (TYPE s3, KEY_ID 'testing', SECRET 'testing', REGION 'us-east-1',
                ENDPOINT '{HOST}', URL_STYLE 'path', USE_SSL false)""")
S3_OPTIONS = {"aws_endpoint_url": ENDPOINT, "aws_allow_http": "true", "aws_access_key_id": "testing",
              "aws_secret_access_key": "testing", "aws_region": "us-east-1"}
S3_FS = pyarrow.fs.S3FileSystem(endpoint_override=ENDPOINT, access_key="testing",
                                secret_key="testing", region="us-east-1")
"#;

/// Runs the DuckDB, Polars and pyarrow recipes of docs/querying.md for every table the export
/// summary `s` reports rows for, against `target`, and checks each reader's row count and
/// column types against the declared schema.
fn check_recipes(s: &Value, target: &RecipeTarget<'_>) -> usize {
    let doc = fs::read_to_string(QUERYING).unwrap();
    // How each reader's recipe line starts (DuckDB and Polars name a URL, pyarrow a path on
    // its filesystem), the placeholder to fill, and what the script runs first.
    let (placeholder, value, url, path, setup, endpoint) = match target {
        RecipeTarget::Local(out) => ("OUTPUT", *out, "OUTPUT/", "OUTPUT/", "", ""),
        RecipeTarget::S3 {
            endpoint,
            bucket_prefix,
        } => (
            "BUCKET/PREFIX",
            *bucket_prefix,
            "s3://BUCKET/PREFIX/",
            "BUCKET/PREFIX/",
            S3_RECIPE_SETUP,
            *endpoint,
        ),
    };
    let mut ran = 0;
    for t in batch_export::tables::TABLES {
        let Some(rows) = s["tables"][t.path]["rows"].as_u64() else {
            continue;
        };
        let line = |start: &str| {
            doc.lines()
                .find(|l| l.starts_with(start) && l.contains(&format!("/{}/active", t.path)))
                .unwrap_or_else(|| panic!("no `{start}` recipe for {}", t.path))
                .replace(placeholder, value)
        };
        let duckdb = line(&format!("SELECT * FROM read_parquet('{url}"));
        let polars = line(&format!("df = pl.scan_parquet(\"{url}"));
        let pyarrow = line(&format!("table = ds.dataset(\"{path}"));
        let script = format!(
            r#"
import json, sys, duckdb, polars as pl, pyarrow.dataset as ds
con = duckdb.connect()
{setup}
sql = sys.argv[1].rstrip(';')
cols = [(r[0], r[1]) for r in con.execute('DESCRIBE ' + sql).fetchall()]
n = con.execute('SELECT count(*) FROM (' + sql + ')').fetchone()[0]
{polars}
{pyarrow}
print(json.dumps({{
    'duckdb': cols, 'duckdb_rows': n,
    'polars': [[n, str(t)] for n, t in df.schema.items()], 'polars_rows': df.height,
    'pyarrow': [[f.name, str(f.type)] for f in table.schema], 'pyarrow_rows': table.num_rows,
}}))
"#
        );
        let ran_script = std::process::Command::new("python3")
            .args(["-c", &script, &duckdb])
            .env("RECIPE_S3_ENDPOINT", endpoint)
            .output()
            .unwrap();
        assert!(
            ran_script.status.success(),
            "{}: {} (pip install -r tests/requirements.txt)",
            t.path,
            describe(&ran_script)
        );
        let v: Value = serde_json::from_slice(&ran_script.stdout).unwrap();
        for (reader, types, partition) in [
            ("duckdb", ["VARCHAR", "BIGINT", "BOOLEAN"], "DATE"),
            ("polars", ["String", "Int64", "Boolean"], "Date"),
            ("pyarrow", ["string", "int64", "bool"], "string"),
        ] {
            assert_eq!(
                v[format!("{reader}_rows")].as_u64(),
                Some(rows),
                "{}: {reader}",
                t.path
            );
            let got = name_type_pairs(&v[reader]);
            // The hive partition column comes last, typed as docs/querying.md says: a date in
            // DuckDB and Polars, a string in pyarrow.
            let (part, declared) = got.split_last().expect("columns");
            assert_eq!(
                (part.0.as_str(), part.1.as_str()),
                ("partition_date", partition),
                "{reader}: {got:?}"
            );
            assert_eq!(
                declared,
                declared_as(t, types).as_slice(),
                "{}: {reader}",
                t.path
            );
        }
        ran += 1;
    }
    ran
}

/// The table's declared columns with each type named as a reader names it: `names` for
/// string, int64 and boolean columns.
fn declared_as(t: &batch_export::tables::TableDef, names: [&str; 3]) -> Vec<(String, String)> {
    t.columns
        .iter()
        .map(|(n, ty)| {
            let i = match ty.name() {
                "string" => 0,
                "int64" => 1,
                _ => 2,
            };
            (n.to_string(), names[i].to_owned())
        })
        .collect()
}

/// `[[name, type], ...]` as a reader script printed it.
fn name_type_pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c[0].as_str().unwrap().to_owned(),
                c[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Machine loss: the output records where a replacement writer may resume.

/// Writes `cursor` (and the upstream `bsky.network`) into a writer state database at `path`,
/// as the writer commits them: what `--writer-state` reads.
fn set_writer_cursor(path: &std::path::Path, cursor: i64) {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute('CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)')\nc.execute(\"INSERT OR REPLACE INTO meta VALUES ('cursor', ?)\", (sys.argv[2],))\nc.execute(\"INSERT OR REPLACE INTO meta VALUES ('upstream', 'bsky.network')\")\nc.commit()",
            path.to_str().unwrap(),
            &cursor.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn the_resume_point_moves_only_after_a_clean_run_and_survives_the_state() {
    let env = Env::new();
    let writer_state = env.dir.path().join("firehose-state.sqlite");
    let set_cursor = |cursor: i64| set_writer_cursor(&writer_state, cursor);
    let resume_point = || {
        let out = run(
            &[
                "--output".to_owned(),
                env.out.display().to_string(),
                "resume-point".to_owned(),
            ],
            &[],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let ws = ["--writer-state", writer_state.to_str().unwrap()];
    assert_eq!(resume_point().0, Some(1), "no resume point yet");
    set_cursor(1_000);
    let mut posts = study_posts(&env, 0, 3);
    env.export_ok(&ws);
    assert_eq!(resume_point(), (Some(0), "1000".to_owned()));
    // A run that leaves a file behind (exit 3) does not move it.
    set_cursor(2_000);
    env.write("somewhere/else/x.json", "{}");
    posts.extend(study_posts(&env, 100, 2));
    let out = env.export(&ws);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(resume_point(), (Some(0), "1000".to_owned()));
    fs::remove_file(env.cache.join("somewhere/else/x.json")).unwrap();
    env.export_ok(&ws);
    assert_eq!(resume_point(), (Some(0), "2000".to_owned()));
    // The machine is lost with its export state: the replacement adopts the output and the
    // resume point is still read from the output.
    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    posts.extend(study_posts(&env, 200, 2));
    env.export_ok(&["--adopt-output"]);
    assert_eq!(resume_point(), (Some(0), "2000".to_owned()));
    assert_posts_once(&env, &posts);
    // A point older than a relay's replay window is still printed, with a warning that says so.
    let resume_file = env.out.join("_batch_export/resume.json");
    let resume: Value = serde_json::from_slice(&fs::read(&resume_file).unwrap()).unwrap();
    let warning = |resume_point_at: i64| {
        let mut r = resume.clone();
        r["at"] = resume_point_at.into();
        fs::write(&resume_file, serde_json::to_vec(&r).unwrap()).unwrap();
        let out = run(
            &[
                "--output".to_owned(),
                env.out.display().to_string(),
                "resume-point".to_owned(),
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2000");
        String::from_utf8_lossy(&out.stderr).contains("WARNING")
    };
    let now = resume["at"].as_i64().unwrap();
    assert!(!warning(now - 71 * 3600), "a point within the window");
    assert!(warning(now - 4 * 24 * 3600), "a point four days old");
}

// ---------------------------------------------------------------------------------------------
// Consent withdrawal (issue 11): `--withdrawn` and `batch-export purge`.

/// The withdrawn participant (S1) and the one who stays (S2).
const GONE: &str = S1;
const STAYS: &str = S2;
const GONE_POST: &str = "3l5jnpb6xyz2k";
const STAYS_POST: &str = "3l5jmmmmmmm2m";

/// Record URIs of the withdrawn participant the dataset holds.
fn gone_uris() -> Vec<String> {
    vec![
        format!("at://{GONE}/app.bsky.feed.post/{GONE_POST}"),
        format!("at://{GONE}/app.bsky.feed.like/3l5jgonelike2"),
        format!("at://{GONE}/app.bsky.graph.follow/3l5jgonefol2a"),
        format!("at://{GONE}/app.bsky.actor.profile/self"),
    ]
}

/// Cache files of two study users and the accounts around them: GONE's own records of every
/// kind, and others' records about GONE (a like, a reply whose root is GONE's post, a reply
/// whose parent is GONE's post, a repost, a quote with a mention, a follow of GONE), next to the
/// same kinds for STAYS and rows that concern nobody. `tag` makes record keys unique per call.
fn consent_dataset(env: &Env, tag: u32) {
    let k = |base: &str| format!("{}{tag}", &base[..base.len() - 1]);
    let gone_post_uri = format!("at://{GONE}/app.bsky.feed.post/{GONE_POST}");
    let stays_post_uri = format!("at://{STAYS}/app.bsky.feed.post/{STAYS_POST}");
    let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
    if tag == 0 {
        env.write(
            &post_path("study_user_activity/create/post", GONE, GONE_POST),
            &study_post(GONE, GONE_POST, "mine, withdrawn later"),
        );
        env.write(
            &post_path("study_user_activity/create/post", STAYS, STAYS_POST),
            &study_post(STAYS, STAYS_POST, "mine, staying"),
        );
        // GONE's own like, follow, profile, account event and delete.
        env.write(
            &format!("study_user_activity/create/like/3l5jqyv2s4k2c/author_did={GONE}_like_uri_suffix=3l5jgonelike2.json"),
            &like_json(GONE, "3l5jgonelike2", &format!("at://{A1}/app.bsky.feed.post/3l5jqyv2s4k2c")),
        );
        env.write(
            &follow_path("follower", GONE, A1),
            &follow_json(GONE, A1, "3l5jgonefol2a"),
        );
        env.write(
            &format!("study_user_activity/create/profile/author_did={GONE}_profile_uri_suffix=self_rev=3l5k3dddddd2d.json"),
            &transform::generic_record_cache_json(
                &format!("at://{GONE}/app.bsky.actor.profile/self"),
                cid,
                GONE,
                "app.bsky.actor.profile",
                &json!({"$type": "app.bsky.actor.profile", "displayName": "Gone"}),
            ),
        );
        let t = "2024-10-02T15:00:00.000Z";
        env.write(
            &account_path(GONE, "account", t, None, Some(false), Some("deactivated")),
            &account_json(GONE, 10, t, "deactivated"),
        );
        env.write(
            &account_path(STAYS, "account", t, None, Some(false), Some("deactivated")),
            &account_json(STAYS, 11, t, "deactivated"),
        );
        env.write(
            &format!("study_user_activity/delete/post/author_did={GONE}_post_uri_suffix=3l5jolddddd2d.json"),
            &delete_json(&format!("at://{GONE}/app.bsky.feed.post/3l5jolddddd2d"), GONE, "app.bsky.feed.post", "3l5jolddddd2d", 100),
        );
        env.write(
            &format!("study_user_activity/delete/post/author_did={STAYS}_post_uri_suffix=3l5jolddddd2e.json"),
            &delete_json(&format!("at://{STAYS}/app.bsky.feed.post/3l5jolddddd2e"), STAYS, "app.bsky.feed.post", "3l5jolddddd2e", 101),
        );
        // Follows: someone follows GONE; STAYS follows someone.
        env.write(
            &follow_path("followee", A2, GONE),
            &follow_json(A2, GONE, "3l5ja2folgon2"),
        );
        env.write(
            &follow_path("follower", STAYS, A1),
            &follow_json(STAYS, A1, "3l5jstayfol2a"),
        );
    }
    for (study, post_rkey, post_uri) in [
        (GONE, GONE_POST, &gone_post_uri),
        (STAYS, STAYS_POST, &stays_post_uri),
    ] {
        // A like of the study post.
        let like = k("3l5jlikeaaaa2");
        env.write(
            &format!("study_user_activity/create/like_on_user_post/{post_rkey}/author_did={A1}_like_uri_suffix={like}.json"),
            &like_json(A1, &like, post_uri),
        );
        // A reply whose root is the study post, and one whose parent is (root elsewhere).
        let reply = k("3l5jreplyaaa2");
        env.write(
            &post_path(&format!("study_user_activity/create/reply_to_user_post/{post_rkey}"), A2, &reply),
            &post_json(
                &format!("at://{A2}/app.bsky.feed.post/{reply}"),
                cid,
                A2,
                json!({"$type": "app.bsky.feed.post", "text": "a reply", "createdAt": "2024-10-02T14:05:10.001Z",
                       "reply": {"root": {"uri": post_uri, "cid": cid}, "parent": {"uri": post_uri, "cid": cid}}}),
                CLOCK,
            ),
        );
        let reply2 = k("3l5jreplybbb2");
        env.write(
            &post_path(&format!("study_user_activity/create/reply_to_user_post/{post_rkey}"), A3, &reply2),
            &post_json(
                &format!("at://{A3}/app.bsky.feed.post/{reply2}"),
                cid,
                A3,
                json!({"$type": "app.bsky.feed.post", "text": "a reply deeper down", "createdAt": "2024-10-02T14:06:10.001Z",
                       "reply": {"root": {"uri": format!("at://{A1}/app.bsky.feed.post/3l5jqyv2s4k2c"), "cid": cid},
                                 "parent": {"uri": post_uri, "cid": cid}}}),
                CLOCK,
            ),
        );
        // A repost and a quote (with a mention) of the study post.
        let repost = k("3l5jrepost0a2");
        env.write(
            &format!("study_user_activity/create/repost_of_user_post/{post_rkey}/author_did={A2}_repost_uri_suffix={repost}.json"),
            &transform::generic_record_cache_json(
                &format!("at://{A2}/app.bsky.feed.repost/{repost}"),
                cid,
                A2,
                "app.bsky.feed.repost",
                &json!({"$type": "app.bsky.feed.repost", "createdAt": "2024-10-02T14:30:00.000Z",
                        "subject": {"uri": post_uri, "cid": cid}}),
            ),
        );
        let quote = k("3l5jquote0aa2");
        env.write(
            &post_path(&format!("study_user_activity/create/quote_of_user_post/{post_rkey}"), A3, &quote),
            &post_json(
                &format!("at://{A3}/app.bsky.feed.post/{quote}"),
                cid,
                A3,
                json!({"$type": "app.bsky.feed.post", "text": "look at this, @someone", "createdAt": "2024-10-02T14:07:45.250Z",
                       "facets": [{"index": {"byteStart": 13, "byteEnd": 21}, "features": [{"$type": "app.bsky.richtext.facet#mention", "did": study}]}],
                       "embed": {"$type": "app.bsky.embed.record", "record": {"uri": post_uri, "cid": cid}}}),
                CLOCK,
            ),
        );
    }
    // Posts that concern nobody.
    for i in 0..3u32 {
        let rkey = format!("3l5jinnet{i}{tag:03}");
        env.write(
            &post_path(&format!("in_network_user_activity/create/post/{A1}"), A1, &rkey),
            &post_json(
                &format!("at://{A1}/app.bsky.feed.post/{rkey}"),
                cid,
                A1,
                json!({"$type": "app.bsky.feed.post", "text": format!("nobody's business {i}"), "createdAt": "2024-10-02T13:00:00.000Z"}),
                CLOCK,
            ),
        );
    }
}

/// Per table (path up to `/active/`): rows, a checksum of all rows, and rows / checksum of the
/// rows that mention none of `needles` in any string column, counted by DuckDB over every
/// Parquet file of the output (`hits`: rows where some VARCHAR column contains a needle).
const DUCKDB_AUDIT: &str = r#"
import duckdb, hashlib, json, os, re, sys
root, needles = sys.argv[1], json.loads(sys.argv[2])
files = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in filenames:
        if name.endswith('.parquet'):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            m = re.fullmatch(r'(.+)/active/partition_date=[0-9-]+/[0-9a-f]{32}-0\.parquet', rel)
            if not m:
                raise SystemExit('unexpected Parquet path: ' + rel)
            files.setdefault(m.group(1), []).append(os.path.join(dirpath, name))
con = duckdb.connect()
out = {}
for table, paths in sorted(files.items()):
    src = "read_parquet(" + repr(sorted(paths)) + ")"
    cols = con.execute('DESCRIBE SELECT * FROM ' + src).fetchall()
    strings = [c[0] for c in cols if c[1] == 'VARCHAR']
    hit_sql = ' OR '.join('contains(coalesce("%s", \'\'), ?)' % c for c in strings for _ in needles) or 'false'
    params = [n for _ in strings for n in needles]
    hits = con.execute('SELECT count(*) FROM ' + src + ' WHERE ' + hit_sql, params).fetchone()[0]
    rows = con.execute('SELECT * FROM ' + src).fetchall()
    def h(rs):
        return hashlib.sha256('\n'.join(sorted(json.dumps(list(r), default=str) for r in rs)).encode()).hexdigest()
    clean = [r for r in rows if not any(isinstance(v, str) and any(n in v for n in needles) for v in r)]
    out[table] = {'rows': len(rows), 'hits': hits, 'checksum': h(rows),
                  'clean_rows': len(clean), 'clean_checksum': h(clean)}
print(json.dumps(out))
"#;

fn duckdb_audit(root: &std::path::Path, needles: &[String]) -> BTreeMap<String, Value> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            DUCKDB_AUDIT,
            &root.display().to_string(),
            &serde_json::to_string(needles).unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "duckdb audit (pip install -r tests/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<BTreeMap<String, Value>>(&out.stdout).unwrap()
}

fn gone_needles() -> Vec<String> {
    let mut n = vec![GONE.to_owned()];
    n.extend(gone_uris());
    n
}

/// Every table that had rows of GONE: the issue's minimum list, each in at least one table.
const TABLES_WITH_GONE: &[&str] = &[
    "study_user_activity/create/post",
    "study_user_activity/create/like",
    "study_user_activity/create/like_on_user_post",
    "study_user_activity/create/reply_to_user_post",
    "study_user_activity/create/repost_of_user_post",
    "study_user_activity/create/quote_of_user_post",
    "study_user_activity/create/profile",
    "study_user_activity/account",
    "study_user_activity/delete",
    "scraped_user_social_network",
];

/// Files and folders under `root` (hidden ones included) whose name or bytes contain a needle.
fn byte_search(root: &std::path::Path, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if needles.iter().any(|n| name.contains(n.as_str())) {
                found.push(format!("name: {}", p.display()));
            }
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = fs::read(&p) {
                for n in needles {
                    if memchr_find(&bytes, n.as_bytes()) {
                        found.push(format!("bytes of {}: {n}", p.display()));
                    }
                }
            }
        }
    }
    found
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn withdrawn_file(env: &Env) -> String {
    let p = env.dir.path().join("withdrawn.txt");
    fs::write(&p, format!("# withdrew 2024-10-03\n{GONE}\n")).unwrap();
    p.display().to_string()
}

/// The two-export state every purge test starts from: a first export of both users' data (with
/// a corrupt file of GONE, quarantined), a second export of STAYS-only data (its Parquet files
/// hold no row of GONE), and a file of GONE still in the cache.
fn exported_consent_dataset(env: &Env, extra: &[&str]) {
    consent_dataset(env, 0);
    env.write(
        &post_path("study_user_activity/create/post", GONE, "3l5jbroken2a"),
        "{not json",
    );
    let out = run(&local_or(env, extra), &[]);
    assert_eq!(out.status.code(), Some(3), "quarantine: {}", describe(&out));
    for i in 0..3u32 {
        let rkey = format!("3l5jsecond{i}2");
        env.write(
            &post_path("study_user_activity/create/post", STAYS, &rkey),
            &study_post(STAYS, &rkey, "second export"),
        );
    }
    let out = run(&local_or(env, extra), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // Not exported yet when the participant withdraws.
    env.write(
        &post_path("study_user_activity/create/post", GONE, "3l5jlatepost2"),
        &study_post(GONE, "3l5jlatepost2", "late"),
    );
}

/// Local args, or `extra` as given when it starts with `--output` (the S3 tests).
fn local_or(env: &Env, extra: &[&str]) -> Vec<String> {
    if extra.first() == Some(&"--output") {
        let mut v: Vec<String> = vec![
            "--cache-dir".into(),
            env.cache.display().to_string(),
            "--json".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    } else {
        local_args(env, extra)
    }
}

/// Asserts that what the purge promised holds in `out_root` (a local output or a downloaded
/// bucket) against the audit taken before the purge.
fn assert_purged(out_root: &std::path::Path, before: &BTreeMap<String, Value>, what: &str) {
    let after = duckdb_audit(out_root, &gone_needles());
    for (table, b) in before {
        let a = &after[table];
        assert_eq!(a["hits"], 0, "{what}: {table} still mentions GONE: {a}");
        assert_eq!(
            a["rows"], b["clean_rows"],
            "{what}: {table} row count: {a} vs {b}"
        );
        assert_eq!(
            a["checksum"], b["clean_checksum"],
            "{what}: {table}: the other rows changed"
        );
    }
    assert_eq!(after.len(), before.len(), "{what}: tables");
    let found = byte_search(out_root, &gone_needles());
    assert!(found.is_empty(), "{what}: {found:?}");
    // The manifests agree with the files: rows and bytes as rewritten, every file named once.
    assert_manifests_cover(out_root);
    let files = published(out_root);
    let tables = read_parquet_tree(out_root);
    let rows_of: BTreeMap<String, u64> = tables
        .values()
        .flatten()
        .map(|f| (f.path.clone(), f.rows.len() as u64))
        .collect();
    let purges: Vec<_> = fs::read_dir(out_root.join("_batch_export/purges"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(purges.len(), 1, "{what}: exactly one ledger: {purges:?}");
    let ledger: Value = serde_json::from_slice(&fs::read(&purges[0]).unwrap()).unwrap();
    let purge_id = ledger["purge_id"].as_str().unwrap();
    // The commit time, in Unix seconds: not before the purge began (the id's prefix) and not in
    // the future.
    let committed_at = ledger["committed_at"].as_i64().unwrap();
    let began: i64 = purge_id.split('-').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        began > now - 3600 && began <= committed_at && committed_at <= now,
        "{what}: {ledger}"
    );
    for (_, m) in manifests(out_root) {
        let mut total = 0;
        for f in m["files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            assert_eq!(
                f["rows"].as_u64(),
                rows_of.get(path).copied(),
                "{what}: {path}"
            );
            assert_eq!(
                f["bytes"].as_u64(),
                Some(files[path].len() as u64),
                "{what}: {path}"
            );
            total += f["rows"].as_u64().unwrap();
        }
        assert_eq!(m["rows"].as_u64(), Some(total), "{what}");
        let rewritten_here = ledger["files_rewritten"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| {
                m["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|g| g["path"] == f["path"])
            });
        let names_purge = m["purges"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == purge_id));
        assert_eq!(
            rewritten_here, names_purge,
            "{what}: manifest {}",
            m["batch_id"]
        );
    }
    // The ledger: hashes only, rows removed per table as the audit counted them.
    let hashes = ledger["did_hashes"].as_array().unwrap();
    assert_eq!(hashes.len(), 1);
    assert_eq!(hashes[0].as_str().unwrap().len(), 64);
    for (table, b) in before {
        let removed = b["rows"].as_u64().unwrap() - b["clean_rows"].as_u64().unwrap();
        assert_eq!(
            ledger["rows_removed"][table].as_u64().unwrap_or(0),
            removed,
            "{what}: ledger rows removed from {table}"
        );
    }
}

/// The local end-to-end purge: DuckDB over every string column of every table, byte search of
/// the output, the cache (with the export's state and quarantine) and nothing else changed.
#[test]
fn purge_removes_a_withdrawn_participant_everywhere_and_nothing_else() {
    let env = Env::new();
    exported_consent_dataset(&env, &[]);
    let before = duckdb_audit(&env.out, &gone_needles());
    for t in TABLES_WITH_GONE {
        let b = &before[*t];
        assert!(
            b["hits"].as_u64().unwrap() > 0 && b["clean_rows"] != b["rows"],
            "the dataset has rows of GONE in {t}: {b}"
        );
    }
    assert!(before
        .values()
        .any(|b| b["clean_rows"].as_u64().unwrap() > 0));
    // The quarantine holds GONE's corrupt file, and the cache one unexported file of theirs.
    assert!(!byte_search(&env.cache.join(".quarantine"), &gone_needles()).is_empty());
    let files_before = published(&env.out);
    let stays_cache_file = post_path("study_user_activity/create/post", STAYS, "3l5jstaycache");
    env.write(
        &stays_cache_file,
        &study_post(STAYS, "3l5jstaycache", "not exported yet"),
    );

    let withdrawn = withdrawn_file(&env);
    let mut args = local_args(&env, &["--withdrawn", &withdrawn]);
    args.push("purge".into());
    let out = run(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let s = summary(&out);
    assert!(s["purge_id"].is_string(), "{s}");
    assert_eq!(s["cache_files_removed"], 1, "{s}");
    assert_eq!(s["quarantine_files_removed"], 1, "{s}");
    assert_eq!(s["dids_new"], 1, "{s}");
    assert_purged(&env.out, &before, "local purge");

    // Only files that held their rows were rewritten; the rest are byte for byte the same.
    let files_after = published(&env.out);
    assert_eq!(
        files_before.keys().collect::<Vec<_>>(),
        files_after.keys().collect::<Vec<_>>()
    );
    let untouched = files_before
        .iter()
        .filter(|(path, bytes)| files_after[*path] == **bytes)
        .count();
    assert_eq!(
        s["files_rewritten"].as_u64().unwrap() as usize + untouched,
        files_before.len(),
        "{s}"
    );
    assert!(
        untouched >= 2,
        "the second export's files are untouched: {s}"
    );
    let rewritten: BTreeSet<String> = serde_json::from_slice::<Value>(
        &fs::read(env.out.join(format!(
            "_batch_export/purges/{}.json",
            s["purge_id"].as_str().unwrap()
        )))
        .unwrap(),
    )
    .unwrap()["files_rewritten"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect();
    for (path, bytes) in &files_before {
        assert_eq!(
            files_after[path] != *bytes,
            rewritten.contains(path),
            "{path}: rewritten exactly when the ledger says so"
        );
    }

    // The cache (the export's state directory and the quarantine included) no longer holds
    // GONE's DID or record URIs, in names or bytes; STAYS's unexported file is still there.
    let found = byte_search(&env.cache, &gone_needles());
    assert!(found.is_empty(), "{found:?}");
    assert!(env.exists(&stays_cache_file));
    let reasons = fs::read_to_string(env.cache.join(".quarantine/reasons.log")).unwrap_or_default();
    assert!(!reasons.contains(GONE), "{reasons}");
    // (That the state database erases physically is a unit test of `State`: a pragma read
    // from another connection would report that connection's setting, not the export's.)

    // The text summary (no --json) of a purge that finds nothing left says so.
    let text_args: Vec<String> = args.iter().filter(|a| *a != "--json").cloned().collect();
    let out = run(&text_args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("batch-export purge: 1 withdrawn DIDs (0 new) applied to ")
            && text.contains("nothing to purge")
            && text.contains("0 rewritten (0 bytes), 0 rows removed"),
        "{text}"
    );

    // The start-up check against the output still passes, and a second purge is a no-op.
    let s2 = env.export_ok(&["--withdrawn", &withdrawn]);
    assert_eq!(s2["files_exported"], 1, "STAYS's file: {s2}");
    let out = run(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let again = summary(&out);
    assert!(
        again["purge_id"].is_null(),
        "nothing left to purge: {again}"
    );
    assert_eq!(again["files_rewritten"], 0, "{again}");
}

/// A cache file by or about a withdrawn participant that appears later (a writer that had not
/// reloaded yet) exports nothing, is counted and removed (never quarantined); an export without
/// the list after a purge is refused.
#[test]
fn later_files_of_a_withdrawn_participant_are_refused_counted_and_removed() {
    let env = Env::new();
    consent_dataset(&env, 0);
    let withdrawn = withdrawn_file(&env);
    // A corrupt file of theirs is removed too, not quarantined (that would keep it).
    env.write(
        &post_path("study_user_activity/create/post", GONE, "3l5jbroken2a"),
        "{not json",
    );
    // Listed but not purged yet: the run refuses their files and exits 3 until a purge has
    // taken the rows exported before they were listed.
    let o = env.export(&["--withdrawn", &withdrawn]);
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    let s = summary(&o);
    assert_eq!(s["withdrawn_not_purged"], 1, "{s}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("batch-export purge"),
        "{}",
        describe(&o)
    );
    // GONE's own 7 files, 5 about GONE's post, the corrupt one.
    assert_eq!(s["withdrawn_files"], 13, "{s}");
    assert_eq!(s["files_exported"], 12, "{s}");
    assert_eq!(s["quarantined"], 0, "{s}");
    let out = env.out.clone();
    let audit = duckdb_audit(&out, &gone_needles());
    for (t, a) in &audit {
        assert_eq!(a["hits"], 0, "{t}: {a}");
    }
    assert!(audit["study_user_activity/create/post"]["rows"].as_u64() == Some(1));
    assert!(byte_search(&env.cache, &gone_needles()).is_empty());
    // Purge (records the DID), then a replay of their events.
    let mut args = local_args(&env, &["--withdrawn", &withdrawn]);
    args.push("purge".into());
    let o = run(&args, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    consent_dataset(&env, 1);
    let s = env.export_ok(&["--withdrawn", &withdrawn]);
    assert_eq!(s["withdrawn_not_purged"], 0, "{s}");
    assert_eq!(
        s["withdrawn_files"], 5,
        "the like, replies, repost, quote of GONE's post: {s}"
    );
    assert_eq!(
        s["files_exported"].as_u64().unwrap(),
        5 + 3,
        "STAYS's + nobody's: {s}"
    );
    assert!(duckdb_audit(&env.out, &gone_needles())
        .values()
        .all(|a| a["hits"] == 0));
    assert!(byte_search(&env.cache, &gone_needles()).is_empty());
    // Without the list, the export refuses to run (their data would come back).
    consent_dataset(&env, 2);
    let o = env.export(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--withdrawn"),
        "{}",
        describe(&o)
    );
    // A list with an invalid line is a usage error naming the line.
    let bad = env.dir.path().join("bad.txt");
    fs::write(&bad, format!("{GONE}\nnot a did\n")).unwrap();
    let o = env.export(&["--withdrawn", &bad.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("line 2"),
        "{}",
        describe(&o)
    );
}

/// A lost state directory forgets which DIDs were purged (and the salt of their hashes): the
/// output's purge ledgers make `--adopt-output` insist on the withdrawn list, which the adopted
/// state then requires on every run, as the lost one did.
#[test]
fn adopting_an_output_with_purges_requires_the_withdrawn_list_and_keeps_requiring_it() {
    let env = Env::new();
    exported_consent_dataset(&env, &[]);
    let withdrawn = withdrawn_file(&env);
    let mut args = local_args(&env, &["--withdrawn", &withdrawn]);
    args.push("purge".into());
    let o = run(&args, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let before = published(&env.out);

    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    consent_dataset(&env, 1);
    let o = env.export(&["--adopt-output"]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("purge ledger") && stderr.contains("--withdrawn"),
        "{stderr}"
    );
    assert_eq!(
        published(&env.out),
        before,
        "a refused adoption changes nothing"
    );

    // Adopted: the list cannot be checked against the lost salt, so its DIDs count as not
    // purged (exit 3) until a purge runs; a DID added to the list after the last purge (say an
    // account deletion the writer recorded just before the machine was lost) is not missed.
    let o = env.export(&["--adopt-output", "--withdrawn", &withdrawn]);
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    let s = summary(&o);
    assert_eq!(s["withdrawn_not_purged"], 1, "{s}");
    assert_eq!(s["withdrawn_files"], 5, "their reactions replayed: {s}");
    assert!(duckdb_audit(&env.out, &gone_needles())
        .values()
        .all(|a| a["hits"] == 0));
    let mut purge = local_args(&env, &["--withdrawn", &withdrawn]);
    purge.push("purge".into());
    let o = run(&purge, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let s = env.export_ok(&["--withdrawn", &withdrawn]);
    assert_eq!(s["withdrawn_not_purged"], 0, "{s}");
    // The adopted state keeps the guard: a run without the list is refused.
    consent_dataset(&env, 2);
    let o = env.export(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not in --withdrawn"),
        "{}",
        describe(&o)
    );
}

/// Parquet files no manifest names (published before manifests existed, after a state upgrade
/// from version 1, or the predecessor's files in the same folders) are purged too; a Parquet
/// file in a folder of no known table stops the purge before anything changes.
#[test]
fn purge_rewrites_parquet_files_no_manifest_names_and_refuses_unknown_ones() {
    let env = Env::new();
    exported_consent_dataset(&env, &[]);
    let legacy_dir = "active/partition_date=2024-01-01";
    let mut legacy = Vec::new();
    for (i, (rel, bytes)) in published(&env.out).into_iter().enumerate() {
        let table = rel.split("/active/").next().unwrap().to_owned();
        let copy = format!("{table}/{legacy_dir}/{i:032x}-0.parquet");
        fs::create_dir_all(env.out.join(&copy).parent().unwrap()).unwrap();
        fs::write(env.out.join(&copy), bytes).unwrap();
        legacy.push(copy);
    }
    let unknown = env
        .out
        .join(format!("other_tool/{legacy_dir}/{:032x}-0.parquet", 7));
    fs::create_dir_all(unknown.parent().unwrap()).unwrap();
    fs::copy(env.out.join(&legacy[0]), &unknown).unwrap();
    let withdrawn = withdrawn_file(&env);
    let mut purge = local_args(&env, &["--withdrawn", &withdrawn]);
    purge.push("purge".into());

    let files = published(&env.out);
    let o = run(&purge, &[]);
    assert_ne!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no table folder this version knows"),
        "{}",
        describe(&o)
    );
    assert_eq!(published(&env.out), files, "nothing purged");

    fs::remove_dir_all(env.out.join("other_tool")).unwrap();
    let before = duckdb_audit(&env.out, &gone_needles());
    let o = run(&purge, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let after = duckdb_audit(&env.out, &gone_needles());
    for (table, a) in &after {
        let b = &before[table];
        assert_eq!(a["hits"], 0, "{table}: {a}");
        assert_eq!(a["clean_rows"], b["clean_rows"], "{table}");
        assert_eq!(a["clean_checksum"], b["clean_checksum"], "{table}");
    }
    let now = published(&env.out);
    let rewritten_legacy = legacy.iter().filter(|l| now[*l] != files[*l]).count();
    assert!(
        rewritten_legacy >= 5,
        "the copies holding GONE's rows were rewritten: {rewritten_legacy} of {}",
        legacy.len()
    );
}

/// A cache entry the purge cannot read (here a symlink, which is never followed) could hold
/// their data: the purge stops before anything changes, and goes through once it is gone.
#[test]
fn purge_stops_on_a_cache_entry_it_cannot_read() {
    let env = Env::new();
    exported_consent_dataset(&env, &[]);
    let link = env
        .cache
        .join("study_user_activity/create/post/elsewhere.json");
    std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
    let withdrawn = withdrawn_file(&env);
    let mut purge = local_args(&env, &["--withdrawn", &withdrawn]);
    purge.push("purge".into());
    let files = published(&env.out);
    let o = run(&purge, &[]);
    assert_ne!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot vouch for what it did not read"),
        "{}",
        describe(&o)
    );
    assert_eq!(published(&env.out), files, "nothing purged");
    assert!(
        !byte_search(&env.cache, &gone_needles()).is_empty(),
        "their late file is still in the cache"
    );
    fs::remove_file(&link).unwrap();
    let o = run(&purge, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(byte_search(&env.cache, &gone_needles()).is_empty());
}

const PURGE_FAULTS: &[&str] = &[
    "purge-after-cache",
    "purge-after-stage",
    "purge-after-commit",
    "purge-after-replace-one",
    "purge-after-replace",
    "purge-after-manifests",
    "purge-after-ledger",
];

/// A purge killed at each step is finished by the next run, a `purge` or an export (before the
/// commit point an export, which must be given the list; after it alternately an export and a
/// purge). Every Parquet file is whole at the crash
/// (the old or the new version), and afterwards nothing of GONE remains, nothing else changed,
/// one ledger.
#[test]
fn a_purge_killed_at_each_step_is_finished_by_the_next_run() {
    for (i, fault) in PURGE_FAULTS.iter().enumerate() {
        let env = Env::new();
        exported_consent_dataset(&env, &[]);
        let before = duckdb_audit(&env.out, &gone_needles());
        let withdrawn = withdrawn_file(&env);
        let mut purge = local_args(&env, &["--withdrawn", &withdrawn]);
        purge.push("purge".into());
        run_aborted_at(&env, &purge, fault, &[]);
        // Readable, old or new, at the crash.
        let at_crash = duckdb_audit(&env.out, &gone_needles());
        assert_eq!(at_crash.len(), before.len(), "{fault}");
        let before_commit = matches!(*fault, "purge-after-cache" | "purge-after-stage");
        if before_commit {
            // Before the commit point: their DIDs are guarded already, so an export without
            // the list is refused (it would export their replayed files)...
            let o = env.export(&[]);
            assert_eq!(o.status.code(), Some(2), "{fault}: {}", describe(&o));
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("not in --withdrawn"),
                "{}",
                describe(&o)
            );
        }
        // ... and an export with it finishes the purge as well as a purge run does.
        let next = if before_commit || i % 2 == 1 {
            local_args(&env, &["--withdrawn", &withdrawn])
        } else {
            purge.clone()
        };
        let out = run(&next, &[]);
        assert_eq!(out.status.code(), Some(0), "{fault}: {}", describe(&out));
        assert_purged(&env.out, &before, fault);
        assert!(
            byte_search(&env.cache, &gone_needles()).is_empty(),
            "{fault}"
        );
        // And the run after that changes nothing.
        let files = published(&env.out);
        let out = run(&purge, &[]);
        assert_eq!(out.status.code(), Some(0), "{fault}: {}", describe(&out));
        assert_eq!(published(&env.out), files, "{fault}");
    }
}

/// The same on the test S3 server (moto): the purge replaces objects with a PUT of the same key
/// and never sends DeleteObject; objects without their rows keep their ETag.
#[test]
fn s3_purge_is_finished_after_a_crash_at_each_step_and_never_deletes() {
    require_pyarrow();
    let server = s3::S3Server::start();
    for fault in std::iter::once("none").chain(PURGE_FAULTS.iter().copied()) {
        let bucket = format!("purge-{fault}");
        server.create_bucket(&bucket);
        let env = Env::new();
        let output = format!("s3://{bucket}/x");
        let export = |extra: &[&str]| s3_args(&env, &server.endpoint, &output, extra);
        // Export both users' data, then STAYS-only data.
        consent_dataset(&env, 0);
        let out = run(&export(&[]), s3::CLIENT_ENV);
        assert_eq!(out.status.code(), Some(0), "{fault}: {}", describe(&out));
        for i in 0..3u32 {
            let rkey = format!("3l5jsecond{i}2");
            env.write(
                &post_path("study_user_activity/create/post", STAYS, &rkey),
                &study_post(STAYS, &rkey, "second export"),
            );
        }
        let out = run(&export(&[]), s3::CLIENT_ENV);
        assert_eq!(out.status.code(), Some(0), "{fault}: {}", describe(&out));
        let dest = env.dir.path().join("before");
        download_bucket(&server.endpoint, &bucket, &dest);
        let before = duckdb_audit(&dest.join("x"), &gone_needles());
        let etags = object_etags(&server.endpoint, &bucket);
        let withdrawn = withdrawn_file(&env);
        let purge = export(&["--withdrawn", &withdrawn, "purge"]);
        if fault != "none" {
            let mut vars = s3::CLIENT_ENV.to_vec();
            vars.push(("BATCH_EXPORT_FAULT", fault));
            let o = command(&purge, &vars)
                .current_dir(env.dir.path())
                .output()
                .unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(o.status.signal(), Some(6), "{fault}: {}", describe(&o));
        }
        let next = if matches!(fault, "purge-after-cache" | "purge-after-stage")
            || fault.ends_with("one")
            || fault == "none"
        {
            purge.clone()
        } else {
            export(&["--withdrawn", &withdrawn])
        };
        let out = run(&next, s3::CLIENT_ENV);
        assert_eq!(out.status.code(), Some(0), "{fault}: {}", describe(&out));
        let dest = env.dir.path().join("after");
        download_bucket(&server.endpoint, &bucket, &dest);
        assert_purged(&dest.join("x"), &before, fault);
        assert!(
            byte_search(&env.cache, &gone_needles()).is_empty(),
            "{fault}"
        );
        // Parquet objects without their rows were not rewritten.
        let ledger: Value = {
            let dir = dest.join("x/_batch_export/purges");
            let p = fs::read_dir(&dir).unwrap().flatten().next().unwrap().path();
            serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
        };
        let rewritten: BTreeSet<String> = ledger["files_rewritten"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| format!("x/{}", f["path"].as_str().unwrap()))
            .collect();
        let after = object_etags(&server.endpoint, &bucket);
        let mut untouched = 0;
        for (key, etag) in etags.iter().filter(|(k, _)| k.ends_with(".parquet")) {
            assert_eq!(
                after[key] != *etag,
                rewritten.contains(key),
                "{fault}: {key} changed exactly when rewritten"
            );
            untouched += usize::from(after[key] == *etag);
        }
        assert!(untouched >= 1, "{fault}");
    }
    let deletes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_delete_object())
        .collect();
    assert!(deletes.is_empty(), "DeleteObject sent: {deletes:?}");
}

/// The purge against the second S3 implementation (s3s-fs), with a crash after its commit.
#[test]
fn s3s_fs_purge_round_trip() {
    require_pyarrow();
    let root = tempfile::tempdir().unwrap();
    let server = s3::S3sFs::start(root.path());
    server.create_bucket("purge");
    let env = Env::new();
    let with = |extra: &[&str]| s3_args(&env, &server.endpoint, "s3://purge/x", extra);
    consent_dataset(&env, 0);
    let out = run(&with(&[]), s3::CLIENT_ENV);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let dest = env.dir.path().join("before");
    download_bucket(&server.endpoint, "purge", &dest);
    let before = duckdb_audit(&dest.join("x"), &gone_needles());
    let withdrawn = withdrawn_file(&env);
    let purge = with(&["--withdrawn", &withdrawn, "purge"]);
    let mut vars = s3::CLIENT_ENV.to_vec();
    vars.push(("BATCH_EXPORT_FAULT", "purge-after-replace-one"));
    let o = command(&purge, &vars)
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(6), "{}", describe(&o));
    let out = run(&purge, s3::CLIENT_ENV);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let dest = env.dir.path().join("after");
    download_bucket(&server.endpoint, "purge", &dest);
    assert_purged(&dest.join("x"), &before, "s3s-fs");
}

/// The shared real fixtures (`$SYNC_FIXTURES`, default `../shared/fixtures` beside the repo).
fn fixtures_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("SYNC_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures").into());
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("SYNC_SKIP_FIXTURE_TESTS").is_some(),
        "fixtures not found at {}: set SYNC_FIXTURES",
        dir.display()
    );
    None
}

/// The captured firehose's posts and likes (`relay-capture`), made into cache files with the
/// writer's transform and spread over the four post tables and the two like tables. Returns the
/// number of files written.
fn fill_from_capture(env: &Env) -> usize {
    let Some(dir) = fixtures_dir() else {
        return 0;
    };
    let text = fs::read_to_string(dir.join("relay-capture/expected_jetstream_v1.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let c = &e["commit"];
        if e["kind"] != "commit" || c["operation"] != "create" {
            continue;
        }
        let did = e["did"].as_str().unwrap();
        let collection = c["collection"].as_str().unwrap();
        let rkey = c["rkey"].as_str().unwrap();
        let uri = format!("at://{did}/{collection}/{rkey}");
        let cid = c["cid"].as_str().unwrap();
        let (path, json) = match collection {
            "app.bsky.feed.post" => {
                let folder = match n % 4 {
                    0 => "study_user_activity/create/post".to_owned(),
                    1 => "study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k".to_owned(),
                    2 => "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k".to_owned(),
                    _ => format!("in_network_user_activity/create/post/{did}"),
                };
                (
                    post_path(&folder, did, rkey),
                    post_json(&uri, cid, did, c["record"].clone(), CLOCK),
                )
            }
            "app.bsky.feed.like" => {
                let folder = if n % 2 == 0 {
                    "like"
                } else {
                    "like_on_user_post"
                };
                (
                    format!("study_user_activity/create/{folder}/3l5jnpb6xyz2k/author_did={did}_like_uri_suffix={rkey}.json"),
                    transform::like_cache_json(&uri, cid, did, &c["record"]).unwrap(),
                )
            }
            _ => continue,
        };
        env.write(&path, &json);
        n += 1;
    }
    assert!(n > 100, "{n} posts and likes in the capture");
    n
}

/// A table's schema and its rows.
type TableRows = (Vec<(String, String)>, Vec<BTreeMap<String, Value>>);

/// The columns set to the export clock.
const CLOCK_COLUMNS: &[&str] = &["synctimestamp", "insert_timestamp"];

/// Each table's rows in batch order (the manifests' order), with the export clock checked to be
/// one export clock per file and then blanked (the two runs export in different seconds).
fn rows_in_batch_order(env: &Env) -> BTreeMap<String, TableRows> {
    let t = env.read();
    let by_path: BTreeMap<String, &PqFile> =
        t.values().flatten().map(|f| (f.path.clone(), f)).collect();
    let mut out: BTreeMap<String, TableRows> = BTreeMap::new();
    for m in manifests(&env.out).values() {
        for f in m["files"].as_array().unwrap() {
            let file = by_path[f["path"].as_str().unwrap()];
            let entry = out
                .entry(f["table"].as_str().unwrap().to_owned())
                .or_insert_with(|| (file.schema.clone(), Vec::new()));
            assert_eq!(entry.0, file.schema);
            let clocks: BTreeSet<String> = file
                .rows
                .iter()
                .flat_map(|r| CLOCK_COLUMNS.iter().filter_map(|c| r.get(*c)))
                .map(|v| {
                    assert!(is_export_ts(v), "{v}");
                    v.as_str().unwrap().to_owned()
                })
                .collect();
            assert!(clocks.len() <= 1, "{clocks:?}");
            entry.1.extend(file.rows.iter().cloned().map(|mut r| {
                for c in CLOCK_COLUMNS {
                    if r.contains_key(*c) {
                        r.insert(c.to_string(), Value::Null);
                    }
                }
                r
            }));
        }
    }
    out
}

/// Issue 10.3: Polars' JSON reader loads the post tables and the likes. Against the per-file
/// reader (`BATCH_EXPORT_JSON_READER=serde`), on the same cache (real captured posts and likes,
/// the spec's worked examples, edge cases and bad files): the same summary, the same
/// quarantined files and reasons, the same Parquet (schema, rows, order), in one batch and in
/// many. (The byte-for-byte comparison of the Parquet of one batch is `load.rs`'s unit test.)
#[test]
fn polars_json_reader_exports_what_the_per_file_reader_exports() {
    let env = Env::new();
    let captured = fill_from_capture(&env);
    let post = "study_user_activity/create/post";
    env.write(&post_path(post, A1, "3l5jqyv2s4k2c"), &example1());
    env.write(
        &post_path(
            "study_user_activity/create/reply_to_user_post/3l5jnpb6xyz2k",
            A2,
            "3l5jr4q7m2s2x",
        ),
        &example2(),
    );
    env.write(
        &post_path(
            "study_user_activity/create/quote_of_user_post/3l5jnpb6xyz2k",
            A3,
            "3l5jsz2v4fc2d",
        ),
        &example3(),
    );
    // The same post under a second name in one table: one row (de-duplicated by URI).
    env.write(&post_path(post, A1, "3l5jqyv2s4k2c-copy"), &example1());
    // Pretty-printed, with unknown keys, with counts: exported (the unknown keys counted).
    let mut extra: Value = serde_json::from_str(&study_post(
        S1,
        "3l5jr4q7m2s2x",
        "caf\u{e9} \u{1F600}\nline",
    ))
    .unwrap();
    extra["brand_new"] = json!({"x": [1, 2]});
    extra["like_count"] = json!(12);
    env.write(
        &post_path(post, S1, "3l5jr4q7m2s2x"),
        &serde_json::to_string_pretty(&extra).unwrap(),
    );
    // Bad files Polars' reader alone would turn into rows (a null, a number as text):
    // quarantined by both paths with the same reasons.
    let mut no_url: Value =
        serde_json::from_str(&study_post(S1, "3l5jnpb6xyz2a", "no url")).unwrap();
    no_url.as_object_mut().unwrap().remove("url");
    env.write(&post_path(post, S1, "3l5jnpb6xyz2a"), &no_url.to_string());
    let mut number_text: Value =
        serde_json::from_str(&study_post(S1, "3l5jnpb6xyz2b", "")).unwrap();
    number_text["text"] = json!(5);
    env.write(
        &post_path(post, S1, "3l5jnpb6xyz2b"),
        &number_text.to_string(),
    );
    env.write(
        &post_path(post, S1, "3l5jnpb6xyz2c"),
        "{\"uri\": \"at://trunc",
    );
    let like_dir = "study_user_activity/create/like/3l5jnpb6xyz2k";
    env.write(
        &format!("{like_dir}/author_did={S2}_like_uri_suffix=3l5jv9zzzzz2c.json"),
        &like_json(
            S2,
            "3l5jv9zzzzz2c",
            &format!("at://{S1}/app.bsky.feed.post/3l5jnpb6xyz2k"),
        ),
    );
    env.write(
        &format!("{like_dir}/author_did={S2}_like_uri_suffix=3l5jv9zzzzz2d.json"),
        r#"{"uri": "at://did:plc:a/app.bsky.feed.like/3l5jv9zzzzz2d", "cid": "c", "author": "did:plc:a", "record": "{\"created_at\": \"2024\"}"}"#,
    );
    env.write(
        &format!("{like_dir}/author_did={S2}_like_uri_suffix=3l5jv9zzzzz2e.json"),
        r#"{"uri": "at://did:plc:a/app.bsky.feed.like/3l5jv9zzzzz2e", "cid": "c", "record": "{}"}"#,
    );
    // A table the per-file reader keeps, in the same batches.
    env.write(
        &follow_path("follower", S1, A1),
        &follow_json(S1, A1, "3l5jx7ytlrs2w"),
    );

    let copy = || {
        let e = Env::new();
        fs::remove_dir(&e.cache).unwrap();
        copy_dir(&env.cache, &e.cache);
        e
    };
    for batch in [None, Some("7")] {
        let mut results = Vec::new();
        for reader in ["serde", "polars", "auto"] {
            let e = copy();
            let mut args = vec![
                "--cache-dir".to_owned(),
                e.cache.display().to_string(),
                "--output".to_owned(),
                e.out.display().to_string(),
                "--json".to_owned(),
            ];
            if let Some(b) = batch {
                args.extend(["--batch-files".to_owned(), b.to_owned()]);
            }
            let out = run(
                &args,
                &[
                    ("BATCH_EXPORT_JSON_READER", reader),
                    ("BATCH_EXPORT_LOG", "warn,batch_export::load=debug"),
                ],
            );
            assert_eq!(out.status.code(), Some(3), "{reader}: {}", describe(&out));
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(
                !log.contains("reading its files one by one"),
                "{reader}: Polars' reader failed on a batch: {}",
                describe(&out)
            );
            // Which reader built the post and like frames (the follows: always the per-file one).
            let by_polars: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("loaded by Polars' JSON reader"))
                .collect();
            let likes_by_polars = by_polars
                .iter()
                .filter(|l| l.contains("study_user_activity/create/like"))
                .count();
            match reader {
                "polars" => assert!(by_polars.len() >= 6 && likes_by_polars >= 2, "{log}"),
                // The default: the post tables by Polars, the likes by the per-file reader.
                "auto" => assert!(by_polars.len() >= 4 && likes_by_polars == 0, "{log}"),
                _ => assert!(by_polars.is_empty(), "{log}"),
            }
            let mut s = summary(&out);
            for k in ["seconds", "delete_seconds", "output"] {
                s.as_object_mut().unwrap().remove(k);
            }
            for t in s["tables"].as_object_mut().unwrap().values_mut() {
                t.as_object_mut().unwrap().remove("bytes");
            }
            let reasons: BTreeSet<String> =
                fs::read_to_string(e.cache.join(".quarantine/reasons.log"))
                    .unwrap()
                    .lines()
                    .map(|l| l.split_once('\t').map_or(l, |(_, rest)| rest).to_owned())
                    .collect();
            results.push((s, reasons, rows_in_batch_order(&e), e));
        }
        let serde = &results[0];
        for polars in &results[1..] {
            compare_exports(serde, polars, batch);
        }
        assert_eq!(serde.0["quarantined"], 4, "{}", serde.0);
        assert_eq!(serde.0["unknown_keys"], 1, "{}", serde.0);
        assert_eq!(serde.0["duplicates"], 1, "{}", serde.0);
        assert_eq!(
            serde.0["files_exported"].as_u64().unwrap() as usize,
            captured + 8,
            "{}",
            serde.0
        );
        assert!(serde.2.len() >= 7, "{:?}", serde.2.keys());
    }
}

/// One export's summary, quarantine reasons, rows per table and its environment.
type Export = (Value, BTreeSet<String>, BTreeMap<String, TableRows>, Env);

fn compare_exports(serde: &Export, polars: &Export, batch: Option<&str>) {
    assert_eq!(serde.0, polars.0, "summaries, batch {batch:?}");
    assert_eq!(serde.1, polars.1, "quarantine reasons");
    assert_eq!(
        list_files(&serde.3.cache.join(".quarantine")),
        list_files(&polars.3.cache.join(".quarantine"))
    );
    assert_eq!(
        serde.2.keys().collect::<Vec<_>>(),
        polars.2.keys().collect::<Vec<_>>()
    );
    for (table, (schema, rows)) in &serde.2 {
        let (p_schema, p_rows) = &polars.2[table];
        assert_eq!(schema, p_schema, "{table}");
        assert_eq!(rows.len(), p_rows.len(), "{table}");
        for (i, (a, b)) in rows.iter().zip(p_rows).enumerate() {
            assert_eq!(a, b, "{table} row {i}, batch {batch:?}");
        }
    }
}

/// Every version of every Parquet object in `bucket` read back (pyarrow): how many versions
/// there are, how many are not current, and the keys of the versions whose string columns
/// mention any of `needles`, noncurrent ones marked.
const VERSION_AUDIT: &str = r#"
import io, json, os, sys, boto3, pyarrow as pa, pyarrow.parquet as pq
endpoint, bucket, needles = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
s3 = boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1',
                  aws_access_key_id='testing', aws_secret_access_key='testing')
out = {'versions': 0, 'noncurrent': 0, 'hits': []}
for page in s3.get_paginator('list_object_versions').paginate(Bucket=bucket):
    for v in page.get('Versions', []):
        if not v['Key'].endswith('.parquet'):
            continue
        out['versions'] += 1
        out['noncurrent'] += 0 if v['IsLatest'] else 1
        body = s3.get_object(Bucket=bucket, Key=v['Key'], VersionId=v['VersionId'])['Body'].read()
        table = pq.read_table(io.BytesIO(body))
        for col in table.column_names:
            if not pa.types.is_string(table.schema.field(col).type):
                continue
            if any(n in (s or '') for s in table.column(col).to_pylist() for n in needles):
                out['hits'].append(v['Key'] + ('' if v['IsLatest'] else ' (old version)'))
                break
print(json.dumps(out), flush=True)
# pyarrow's threads and boto3's can abort the interpreter's teardown ("terminate called
# without an active exception"): the answer is out, leave without it.
os._exit(0)
"#;

fn version_audit(endpoint: &str, bucket: &str) -> Value {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            VERSION_AUDIT,
            endpoint,
            bucket,
            &serde_json::to_string(&gone_needles()).unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A bucket with versioning keeps the replaced objects' old versions, and those hold the
/// withdrawn rows: the purge says so (exit 3, counts) instead of calling the erasure done, and
/// with `--s3-delete-noncurrent-versions` deletes exactly those old versions (a DeleteObject
/// with a version id each; no current object is deleted), after which no version of any object
/// mentions them. Without versioning nothing of this happens (the other S3 purge tests: exit 0,
/// no DeleteObject).
#[test]
fn s3_purge_on_a_versioned_bucket_deletes_the_old_versions_only_when_asked() {
    require_pyarrow();
    let server = s3::S3Server::start();
    let bucket = "purge-versioned";
    server.create_bucket(bucket);
    let enable = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
             aws_access_key_id='testing', aws_secret_access_key='testing').put_bucket_versioning(\
             Bucket=sys.argv[2], VersioningConfiguration={'Status': 'Enabled'})",
            &server.endpoint,
            bucket,
        ])
        .output()
        .unwrap();
    assert!(enable.status.success(), "{}", describe(&enable));
    let env = Env::new();
    let output = format!("s3://{bucket}/x");
    let with = |extra: &[&str]| s3_args(&env, &server.endpoint, &output, extra);
    consent_dataset(&env, 0);
    let out = run(&with(&[]), s3::CLIENT_ENV);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let exported = version_audit(&server.endpoint, bucket);
    assert_eq!(exported["noncurrent"], 0, "{exported}");
    assert!(
        !exported["hits"].as_array().unwrap().is_empty(),
        "{exported}"
    );

    let withdrawn = withdrawn_file(&env);
    let purge = with(&["--withdrawn", &withdrawn, "purge"]);
    let out = run(&purge, s3::CLIENT_ENV);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    // moto answers GetBucketVersioning with a root element the SDK does not accept, so the
    // status is unknown there and the purge looks for old versions object by object (as it
    // does when the permission is missing); a real S3 says `Enabled`.
    assert!(
        ["Enabled", "unknown"].contains(&summary["s3_versioning"].as_str().unwrap()),
        "{summary}"
    );
    let rewritten = summary["files_rewritten"].as_u64().unwrap();
    assert!(rewritten >= 1, "{summary}");
    assert_eq!(summary["noncurrent_versions_left"], rewritten, "{summary}");
    assert_eq!(summary["noncurrent_versions_deleted"], 0, "{summary}");
    // The current objects are purged; every old version of a rewritten one still has their rows.
    let after_purge = version_audit(&server.endpoint, bucket);
    let hits: Vec<&str> = after_purge["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(hits.len() as u64, rewritten, "{after_purge}");
    assert!(
        hits.iter().all(|h| h.ends_with("(old version)")),
        "{after_purge}"
    );
    let deletes_before = server
        .requests()
        .iter()
        .filter(|r| r.is_delete_object())
        .count();
    assert_eq!(deletes_before, 0, "no DeleteObject without the flag");

    // With the flag: the old versions go, the current objects stay.
    let purge = with(&[
        "--withdrawn",
        &withdrawn,
        "--s3-delete-noncurrent-versions",
        "purge",
    ]);
    let out = run(&purge, s3::CLIENT_ENV);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        summary["noncurrent_versions_deleted"], rewritten,
        "{summary}"
    );
    assert_eq!(summary["noncurrent_versions_left"], 0, "{summary}");
    let cleaned = version_audit(&server.endpoint, bucket);
    assert_eq!(cleaned["hits"], serde_json::json!([]), "{cleaned}");
    assert_eq!(cleaned["noncurrent"], 0, "{cleaned}");
    assert_eq!(
        cleaned["versions"], exported["versions"],
        "every current object is still there: {cleaned}"
    );
    let deletes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_delete_object())
        .collect();
    assert_eq!(deletes.len() as u64, rewritten, "{deletes:?}");
    assert!(
        deletes
            .iter()
            .all(|r| r.method == "DELETE"
                && r.query.split('&').any(|kv| kv.starts_with("versionId="))),
        "only old versions are deleted: {deletes:?}"
    );
    // And the data of those who stay is all there.
    let dest = env.dir.path().join("after");
    download_bucket(&server.endpoint, bucket, &dest);
    let audit = duckdb_audit(&dest.join("x"), &gone_needles());
    assert!(audit.values().all(|t| t["hits"] == 0), "{audit:?}");
    assert!(
        audit
            .values()
            .map(|t| t["rows"].as_u64().unwrap())
            .sum::<u64>()
            > 0,
        "{audit:?}"
    );
    // A third run finds nothing left to do.
    let out = run(&purge, s3::CLIENT_ENV);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["noncurrent_versions_deleted"], 0, "{summary}");
}

/// The deployed crontab runs what the issue asks of it: `--clear-cache` (no millions of empty
/// folders) and the writer's state (a resume point for a lost machine) beside the cache and the
/// output, every variable one batch-export reads.
#[test]
fn the_deployed_crontab_clears_the_cache_records_the_resume_point_and_applies_withdrawals() {
    let text = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/batch-export.crontab"
    ))
    .unwrap();
    let vars: BTreeMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("BATCH_EXPORT_"))
        .collect();
    for key in [
        "BATCH_EXPORT_CACHE_DIR",
        "BATCH_EXPORT_OUTPUT",
        "BATCH_EXPORT_WRITER_STATE",
        "BATCH_EXPORT_WITHDRAWN",
    ] {
        assert!(vars.contains_key(key), "{key} missing from the crontab");
    }
    // One withdrawn list for both programs: the writer's (to which it adds deleted accounts
    // under --account-deleted-is-withdrawal) is the export's, in the one folder the writer's
    // unit may write to.
    let env_example = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/firehose-writer.env.example"
    ))
    .unwrap();
    let writer_list = env_example
        .lines()
        .find_map(|l| l.strip_prefix("FIREHOSE_WITHDRAWN="))
        .expect("FIREHOSE_WITHDRAWN set in the writer's environment example");
    assert_eq!(vars["BATCH_EXPORT_WITHDRAWN"], writer_list);
    assert!(
        writer_list.starts_with("/var/lib/firehose/"),
        "{writer_list}"
    );
    let help = run(&["--help".to_owned()], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    for key in vars.keys() {
        assert!(help.contains(key), "{key} is not a batch-export setting");
    }
    let jobs: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("batch-export --"))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].contains("--clear-cache"), "{}", jobs[0]);
    assert!(jobs[0].starts_with("*/5 "), "every 5 minutes: {}", jobs[0]);
}

/// A purge takes their file keys out of the output with their rows: the keys objects of the
/// batches it rewrote are emptied at once, but the newest batch's (the start-up check reads it)
/// and those a lost-machine replay from the resume point may need, which the first export run
/// after they stop being needed empties. Adoption still works afterwards.
#[test]
fn a_purge_empties_the_keys_objects_of_the_batches_it_rewrote() {
    let env = Env::new();
    let writer_state = env.dir.path().join("firehose-state.sqlite");
    let set_cursor = |cursor: i64| set_writer_cursor(&writer_state, cursor);
    let ws = ["--writer-state", writer_state.to_str().unwrap()];
    // Posts of the participant who stays (`study_posts` writes GONE's).
    let stays_posts = |from: usize| {
        for i in from..from + 2 {
            let rkey = format!("3l6a{i:09}");
            let rel = post_path("study_user_activity/create/post", STAYS, &rkey);
            env.write(&rel, &study_post(STAYS, &rkey, &format!("post {i}")));
        }
    };
    let batches = env.out.join("_batch_export/batches");
    let keys_len = |id: i64| {
        fs::metadata(batches.join(format!("{id:012}.keys")))
            .unwrap()
            .len()
    };
    let expired = |id: i64| -> bool {
        let m: Value =
            serde_json::from_slice(&fs::read(batches.join(format!("{id:012}.json"))).unwrap())
                .unwrap();
        m["keys"]["expired_at"].is_number() && m["keys"]["count"] == 0
    };
    // Batches 1-3 hold rows of theirs, each exported by a run that recorded a resume point (the
    // writer's cursor moving); batch 4 (the other participant's) by a run that recorded none.
    for tag in 0..3 {
        set_cursor(100 + i64::from(tag));
        consent_dataset(&env, tag);
        env.export_ok(&ws);
    }
    stays_posts(500);
    env.export_ok(&[]);
    let withdrawn = withdrawn_file(&env);
    assert!((1..=4).all(|id| keys_len(id) > 0));
    // The text summary this time (no --json).
    let mut args: Vec<String> = local_args(&env, &["--withdrawn", &withdrawn])
        .into_iter()
        .filter(|a| a != "--json")
        .collect();
    args.push("purge".into());
    let o = run(&args, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("batch-export purge: 1 withdrawn DIDs (1 new) applied to ")
            && text.contains(", ledger _batch_export/purges/"),
        "{text}"
    );
    let post_line = text
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("study_user_activity/create/post ")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(post_line.trim_end().ends_with(" rows removed"), "{text}");
    let rewritten: u64 = text
        .split(" rewritten (")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(rewritten >= 3, "{text}");
    // Batch 1: emptied. Batch 3: the resume point's run (a replacement writer would capture
    // its files again); batch 2: the recording run before it (slack: a writer that committed
    // nothing between the two runs). Batch 4: the newest.
    assert!(
        text.contains("keys objects of rewritten batches emptied: 1\n"),
        "{text}"
    );
    assert_eq!(keys_len(1), 0);
    assert!(expired(1));
    assert!((2..=4).all(|id| keys_len(id) > 0 && !expired(id)));
    // Each clean run with a moving cursor moves the bound to the previous recording run's
    // first batch: run 5 keeps 2 and 3 (bound 2), run 6 empties 2 (bound 3), run 7 empties 3
    // (bound 5). Batch 4 held nothing of theirs: the purge did not rewrite it, its keys stay.
    for (cursor, from, emptied) in [(200, 600, 0), (300, 700, 1), (400, 800, 1)] {
        set_cursor(cursor);
        stays_posts(from);
        let s = env.export_ok(&["--withdrawn", &withdrawn, ws[0], ws[1]]);
        assert_eq!(s["keys_expired_batches"], emptied, "{s}");
    }
    assert!((2..=3).all(|id| keys_len(id) == 0 && expired(id)));
    assert!((4..=7).all(|id| keys_len(id) > 0 && !expired(id)));
    // A lost state directory and a writer replay of the newest batch's files: the output is
    // adopted (the emptied batches give no keys) and the replayed files are recognised.
    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    stays_posts(800);
    let o = env.export(&["--withdrawn", &withdrawn, "--adopt-output"]);
    let s = summary(&o);
    assert_eq!(s["files_exported"], 0, "{s}");
    assert_eq!(s["already_exported"], 2, "{s}");
}

/// An adopted state takes over which rewritten batches still owe the emptying of their keys
/// (read from the manifests: purged, keys not expired), so a lost state directory does not
/// leave a withdrawn participant's file keys in the output until the retention ends.
#[test]
fn an_adopted_state_still_empties_the_keys_a_purge_had_to_keep() {
    let env = Env::new();
    let writer_state = env.dir.path().join("firehose-state.sqlite");
    let set_cursor = |cursor: i64| set_writer_cursor(&writer_state, cursor);
    let ws = writer_state.to_str().unwrap();
    let keys_len = |id: i64| {
        fs::metadata(env.out.join(format!("_batch_export/batches/{id:012}.keys")))
            .unwrap()
            .len()
    };
    let stays_post = |i: usize| {
        let rkey = format!("3l6b{i:09}");
        let rel = post_path("study_user_activity/create/post", STAYS, &rkey);
        env.write(&rel, &study_post(STAYS, &rkey, "stays"));
    };
    for tag in 0..3 {
        set_cursor(100 + i64::from(tag));
        consent_dataset(&env, tag);
        env.export_ok(&["--writer-state", ws]);
    }
    set_cursor(103);
    stays_post(1);
    env.export_ok(&["--writer-state", ws]);
    let withdrawn = withdrawn_file(&env);
    let mut purge = local_args(&env, &["--withdrawn", &withdrawn]);
    purge.push("purge".into());
    let o = run(&purge, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    // The bound was batch 3 (the recording run before the resume point's): 1 and 2 emptied,
    // 3 owed.
    assert_eq!(summary(&o)["keys_objects_emptied"], 2);
    assert!(keys_len(3) > 0);

    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    set_cursor(200);
    stays_post(2);
    let o = env.export(&[
        "--withdrawn",
        &withdrawn,
        "--adopt-output",
        "--writer-state",
        ws,
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "adopted, not purged yet: {}",
        describe(&o)
    );
    assert!(keys_len(3) > 0, "still within the bound");
    set_cursor(300);
    stays_post(3);
    let o = env.export(&["--withdrawn", &withdrawn, "--writer-state", ws]);
    assert_eq!(summary(&o)["keys_expired_batches"], 1, "{}", describe(&o));
    assert_eq!(keys_len(3), 0, "emptied by the adopted state");
}

/// A batch's keys object is emptied once the batch is older than the key retention (nothing
/// reads it again), never the newest batch's; the manifest says so, and an adoption of the
/// output afterwards still works and still recognises the files of the recent batches.
#[test]
fn keys_objects_older_than_the_retention_are_emptied() {
    let env = Env::new();
    let mut posts = Vec::new();
    for b in 0..3 {
        posts.extend(study_posts(&env, b * 10, 2));
        env.export_ok(&["--clear-filepaths", "false"]);
        for (rel, _) in &posts {
            let _ = fs::remove_file(env.cache.join(rel));
        }
    }
    let batches = env.out.join("_batch_export/batches");
    let keys_len = |id: i64| {
        fs::metadata(batches.join(format!("{id:012}.keys")))
            .unwrap()
            .len()
    };
    let manifest = |id: i64| -> Value {
        serde_json::from_slice(&fs::read(batches.join(format!("{id:012}.json"))).unwrap()).unwrap()
    };
    assert_eq!((keys_len(1), keys_len(2), keys_len(3)), (32, 32, 32));
    // Batches 1 and 2 committed eight days ago (the default retention is 7 days), batch 3 now.
    let db = env.cache.join(".export/state.sqlite");
    let aged = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute('UPDATE batch SET started_at = started_at - 8 * 86400 WHERE id <= 2')\nc.commit()",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(aged.status.success(), "{}", describe(&aged));
    posts.extend(study_posts(&env, 100, 2));
    let s = env.export_ok(&[]);
    assert_eq!(s["keys_expired_batches"], 2, "{s}");
    assert_eq!((keys_len(1), keys_len(2)), (0, 0));
    assert_eq!((keys_len(3), keys_len(4)), (32, 32));
    for id in [1, 2] {
        let m = manifest(id);
        assert_eq!(m["keys"]["count"], 0, "{m}");
        assert!(m["keys"]["expired_at"].as_i64().is_some(), "{m}");
        assert_eq!(
            m["keys"]["sha256"], "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "the digest of the empty object: {m}"
        );
    }
    assert!(manifest(3)["keys"].get("expired_at").is_none());
    // Idempotent: the next run has nothing to empty.
    let s = env.export_ok(&[]);
    assert_eq!(s["keys_expired_batches"], 0, "{s}");
    // The state is lost; the output is adopted. A replay of a file of batch 3 (within the
    // retention) is still recognised, and every post is in the output once.
    fs::remove_dir_all(env.cache.join(".export")).unwrap();
    let (rel, _) = &posts[4];
    let rkey = rel
        .rsplit("suffix=")
        .next()
        .unwrap()
        .trim_end_matches(".json");
    env.write(rel, &study_post(S1, rkey, "post 20"));
    let s = env.export_ok(&["--adopt-output"]);
    assert_eq!(s["already_exported"], 1, "{s}");
    assert_posts_once(&env, &posts);
}
