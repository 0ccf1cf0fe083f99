"""Baseline for BENCHMARKS.md: the same export of post files as batch-export, in Python.

Reads every post cache file under CACHE (study_user_activity/create/post and
in_network_user_activity/create/post/<did>) with json.load, builds pyarrow tables with the typed
23-column schema (synctimestamp = export time), writes one zstd Parquet file per table under OUT.
No journal, no dedupe, no deletes: a lower bound for what a Python implementation would cost.

usage: python3 pyarrow_export.py CACHE OUT
"""
import json
import os
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

COLS = ["uri", "cid", "indexed_at", "author_did", "author_handle", "author_avatar",
        "author_display_name", "created_at", "text", "embed", "entities", "facets", "labels",
        "langs", "reply_parent", "reply_root", "tags", "synctimestamp", "url", "source"]
INTS = ["like_count", "reply_count", "repost_count"]
SCHEMA = pa.schema([(c, pa.string()) for c in COLS] + [(c, pa.int64()) for c in INTS])
TABLES = {
    "study_user_activity/create/post": "study_user_activity/create/post",
    "in_network_user_activity/create/post": "in_network_user_activity",
}


def main(cache, out):
    start = time.time()
    ts = time.strftime("%Y-%m-%d-%H:%M:%S", time.gmtime())
    total = 0
    for folder, table_path in TABLES.items():
        rows = {c: [] for c in COLS + INTS}
        for dirpath, dirnames, filenames in os.walk(os.path.join(cache, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                with open(os.path.join(dirpath, name)) as f:
                    obj = json.load(f)
                obj["synctimestamp"] = ts
                for c in COLS + INTS:
                    rows[c].append(obj.get(c))
        n = len(rows["uri"])
        total += n
        if n == 0:
            continue
        table = pa.table(rows, schema=SCHEMA)
        d = os.path.join(out, table_path, "active", "partition_date=" + ts[:10])
        os.makedirs(d, exist_ok=True)
        pq.write_table(table, os.path.join(d, uuid.uuid4().hex + "-0.parquet"), compression="zstd")
    print(json.dumps({"rows": total, "seconds": round(time.time() - start, 3)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
