#!/usr/bin/env bash
# Runs the gateway on its embedded default: no DATABASE_URL, so it starts
# its own PostgreSQL with data in ./verdict-data. Extra arguments go to verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo run --release --bin verdict -- "$@"
