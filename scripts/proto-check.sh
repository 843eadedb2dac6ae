#!/usr/bin/env bash
# The proto contract gates: buf lint (STANDARD + COMMENTS, see proto/buf.yaml),
# buf format, and buf breaking against the image of the last release
# (proto/releases/v1.binpb, written by scripts/proto-release.sh). Installs buf
# itself (scripts/buf.sh). A deliberate incompatible change needs a new major
# version (package verdict.v2), not an edit of the v1 image.
set -euo pipefail
cd "$(dirname "$0")/.."

release=${PROTO_RELEASE_IMAGE:-proto/releases/v1.binpb}
passed=0 failed=0
check() {
  local name=$1; shift
  if "$@"; then
    passed=$((passed + 1)); echo "proto-check: ok: $name"
  else
    failed=$((failed + 1)); echo "proto-check: FAILED: $name" >&2
  fi
}

scripts/buf.sh --version >/dev/null # install before the checks, so its output stays apart
check "buf lint" scripts/buf.sh lint proto
check "buf format" scripts/buf.sh format --diff --exit-code proto
# buf lint checks that the files of a package agree on these options; that
# each file sets them (so Go, Java and C# generators work out of the box) is
# checked here.
file_options() {
  local f opt missing=0
  for f in $(find proto/verdict -name '*.proto' | sort); do
    for opt in go_package java_package java_multiple_files csharp_namespace; do
      if ! grep -q "^option $opt = " "$f"; then
        echo "proto-check: $f does not set option $opt" >&2; missing=1
      fi
    done
  done
  return "$missing"
}
check "file options for Go, Java and C#" file_options
check "buf breaking against $release" scripts/buf.sh breaking proto --against "$release"

echo "proto-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
