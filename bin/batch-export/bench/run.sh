#!/bin/sh
# Reproduces BENCHMARKS.md: export of N generated post files to local Parquet (release build),
# wall time and peak RSS with /usr/bin/time -v, after the pyarrow baseline on the same files
# (the baseline only reads; batch-export then exports and deletes them).
# usage: CARGO_TARGET_DIR=... bin/batch-export/bench/run.sh N [WORKDIR]   (from the repo root)
set -eu
N=${1:-100000}
W=${2:-/tmp/batch-export-bench}
BIN=${CARGO_TARGET_DIR:-target}/release/batch-export
rm -rf "$W" && mkdir -p "$W"
/usr/bin/time -f "gen-cache: %e s" "$BIN" --cache-dir "$W/cache" gen-cache --posts "$N" >/dev/null
sync
echo "== pyarrow baseline (json.load + pyarrow, zstd; no journal, dedupe or delete), $N files"
/usr/bin/time -v python3 bin/batch-export/bench/pyarrow_export.py "$W/cache" "$W/out-py" 2> "$W/time-py.txt"
grep -E "Elapsed|Maximum resident" "$W/time-py.txt"
echo "== batch-export (export, then delete the exported files), $N files"
/usr/bin/time -v "$BIN" --cache-dir "$W/cache" --output "$W/out" --json --no-progress --log info \
  > "$W/summary.json" 2> "$W/time.txt"
cat "$W/summary.json"
grep -E "batch committed" "$W/time.txt" | sed 's/\x1b\[[0-9;]*m//g; s/.*batch committed//' | head -3
grep -E "Elapsed|Maximum resident" "$W/time.txt"
uptime
