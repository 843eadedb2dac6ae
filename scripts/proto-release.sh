#!/usr/bin/env bash
# Records the API as released: writes proto/releases/<major>.binpb, the buf
# image (a FileDescriptorSet with source info and imports) that
# scripts/proto-check.sh compares every later change against. Run it when a
# release is cut, review the diff of proto/ since the previous release, and
# commit the image with the release.
#   scripts/proto-release.sh        # refreshes proto/releases/v1.binpb
#   scripts/proto-release.sh v2     # after a new major version lands
set -euo pipefail
cd "$(dirname "$0")/.."

major=${1:-v1}
case $major in v[0-9]*) ;; *) echo "proto-release: expected a major version like v1, got '$major'" >&2; exit 2 ;; esac

scripts/buf.sh lint proto
mkdir -p proto/releases
scripts/buf.sh build proto -o "proto/releases/$major.binpb"
echo "proto-release: wrote proto/releases/$major.binpb"
