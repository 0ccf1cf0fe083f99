# usage: python3 bin/batch-export/bench/gen_likes.py CACHE_DIR N   (benchmark of the like tables, issue 10.3)
# 100,000 like files in the writer's Era H format (sync_core::transform::like_cache_json), in
# like_on_user_post/<rkey>/ folders (~20 likes per liked post). Deterministic.
import json, os, random, sys
root = sys.argv[1]; n = int(sys.argv[2])
r = random.Random(1)
A = "abcdefghijklmnopqrstuvwxyz234567"
b32 = lambda k: "".join(r.choice(A) for _ in range(k))
for i in range(n):
    liker = "did:plc:" + b32(24); rkey = "3l" + b32(11)
    post_author = "did:plc:" + b32(24); post_rkey = "3l" + b32(11) if i % 20 == 0 else None
    if post_rkey is None: post_rkey = last
    last = post_rkey
    doc = {"uri": f"at://{liker}/app.bsky.feed.like/{rkey}", "cid": "bafyrei" + b32(52), "author": liker,
           "record": {"createdAt": "2026-07-04T12:%02d:%02d.%03dZ" % (r.randrange(60), r.randrange(60), r.randrange(1000)),
                      "subject": {"cid": "bafyrei" + b32(52), "uri": f"at://{post_author}/app.bsky.feed.post/{post_rkey}", "py_type": "com.atproto.repo.strongRef"},
                      "py_type": "app.bsky.feed.like"}}
    d = os.path.join(root, "study_user_activity/create/like_on_user_post", post_rkey)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"author_did={liker}_like_uri_suffix={rkey}.json"), "w") as f:
        f.write(json.dumps(doc))
