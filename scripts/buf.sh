#!/usr/bin/env bash
# Runs the pinned buf CLI, installing it first (from the npm package
# @bufbuild/buf) into the git-ignored .tools/ folder when it is missing or at
# another version. Usage: scripts/buf.sh <buf arguments...>, e.g.
#   scripts/buf.sh lint proto
#   scripts/buf.sh curl --protocol grpc --http2-prior-knowledge http://127.0.0.1:50051/grpc.health.v1.Health/Check
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

BUF_VERSION=1.75.0
tools=$root/.tools
buf=$tools/node_modules/.bin/buf

if [ "$("$buf" --version 2>/dev/null || true)" != "$BUF_VERSION" ]; then
  echo "buf.sh: installing buf $BUF_VERSION into .tools/ (npm @bufbuild/buf)" >&2
  mkdir -p "$tools"
  npm install --prefix "$tools" --no-save --no-audit --no-fund --loglevel=error \
    "@bufbuild/buf@$BUF_VERSION" >&2
fi
exec "$buf" "$@"
