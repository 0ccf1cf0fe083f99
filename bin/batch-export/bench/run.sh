#!/bin/sh
# Reproduces BENCHMARKS.md: export of N generated post files to local Parquet (release build),
# wall time and peak RSS with /usr/bin/time -v, then the pyarrow baseline on the same cache.
# usage: bin/batch-export/bench/run.sh N [WORKDIR]   (run from the repo root)
set -eu
N=${1:-100000}
W=${2:-/tmp/batch-export-bench}
BIN=${CARGO_TARGET_DIR:-target}/release/batch-export
rm -rf "$W" && mkdir -p "$W"
"$BIN" --cache-dir "$W/cache" gen-cache --posts "$N" >/dev/null
cp -a "$W/cache" "$W/cache-py"            # same files for the baseline
sync
echo "== batch-export (export + delete), $N files"
/usr/bin/time -v "$BIN" --cache-dir "$W/cache" --output "$W/out" --json --no-progress 2> "$W/time.txt" | tee "$W/summary.json"
grep -E "Elapsed|Maximum resident" "$W/time.txt"
echo "== pyarrow baseline (read + write only, no journal, no delete), $N files"
/usr/bin/time -v python3 bin/batch-export/bench/pyarrow_export.py "$W/cache-py" "$W/out-py" 2> "$W/time-py.txt"
grep -E "Elapsed|Maximum resident" "$W/time-py.txt"
