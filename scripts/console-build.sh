#!/usr/bin/env bash
# Rebuilds the console's embedded files (src/console/assets/) from console/:
# installs its locked npm packages, generates the TypeScript stubs from
# proto/ (buf + protoc-gen-es) and bundles with esbuild. Commit the result:
# cargo build needs no npm.
#   scripts/console-build.sh           rebuild the assets
#   scripts/console-build.sh --check   fail when the committed assets differ from a rebuild
set -euo pipefail
cd "$(dirname "$0")/../console"
npm ci --no-audit --no-fund --loglevel=error >/dev/null
rm -rf gen
npm run --silent generate
node build.mjs "$@"
