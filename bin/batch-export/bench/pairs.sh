#!/bin/sh
# Same-run comparison of two batch-export binaries, as in BENCHMARKS.md ("A read pool of its
# own"): a warm-up of each, then PAIRS pairs in turn (A, B, A, B ...), each run with a fresh
# state directory and output and nothing deleted (--clear-filepaths false: "without the
# deletes"), whole-process wall time, peak RSS and CPU from /usr/bin/time, medians at the end.
# usage: bin/batch-export/bench/pairs.sh BIN_A BIN_B CACHE_DIR [PAIRS] [WORKDIR]
#   CACHE_DIR from `batch-export --cache-dir CACHE_DIR gen-cache --posts N`, read once before
#   (find CACHE_DIR -type f | xargs cat >/dev/null) so both binaries start from a warm cache.
set -eu
A=$1; B=$2; CACHE=$3; PAIRS=${4:-5}; W=${5:-/tmp/batch-export-pairs}
mkdir -p "$W"; : > "$W/runs.txt"
one() { # label binary
  rm -rf "$W/s" "$W/o"; sync; sleep 2
  /usr/bin/time -f "$1 %e %M %U %S" -a -o "$W/runs.txt" "$2" --cache-dir "$CACHE" \
    --state-dir "$W/s" --output "$W/o" --clear-filepaths false --no-progress --json >/dev/null 2>&1
}
one warmup-A "$A"; one warmup-B "$B"
i=0
while [ "$i" -lt "$PAIRS" ]; do one A "$A"; one B "$B"; i=$((i + 1)); done
grep -v '^warmup' "$W/runs.txt"
python3 - "$W/runs.txt" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, wall, rss_kb, user, sys_ = line.split()
    if not label.startswith('warmup'):
        runs.setdefault(label, []).append((float(wall), int(rss_kb), float(user) + float(sys_)))
for label, r in sorted(runs.items()):
    print(f"{label}: wall median {statistics.median(x[0] for x in r):.3f} s "
          f"(min {min(x[0] for x in r):.3f}, max {max(x[0] for x in r):.3f}), "
          f"CPU median {statistics.median(x[2] for x in r):.2f} s, "
          f"peak RSS max {max(x[1] for x in r) / 1024:.0f} MiB")
a, b = runs['A'], runs['B']
print("A/B wall per pair:", ", ".join(f"{x[0] / y[0]:.2f}" for x, y in zip(a, b)),
      f"(median {statistics.median(x[0] / y[0] for x, y in zip(a, b)):.2f})")
PY
