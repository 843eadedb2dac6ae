#!/usr/bin/env bash
# Runs the whole test suite: unit and integration tests (each integration
# test gets its own database on a PostgreSQL started for the run), then the
# grpcurl smoke test against a freshly started gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --all-targets
./scripts/smoke.sh
