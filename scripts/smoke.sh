#!/usr/bin/env bash
# Smoke test with grpcurl against a real gateway on its embedded default:
# reflection, health, create and get a session as JSON, a field violation.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${VERDICT_BIN:-target/debug/verdict}
[ -x "$bin" ] || cargo build --bin verdict
data=$(mktemp -d /tmp/verdict-smoke-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr=127.0.0.1:$port

VERDICT_DATA_DIR=$data VERDICT_LISTEN=$addr RUST_LOG=warn "$bin" serve >"$data.log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data" "$data.log"; }
trap cleanup EXIT

fail() { echo "smoke: FAILED: $*" >&2; cat "$data.log" >&2; exit 1; }

# Wait (bounded) for the gateway to report SERVING.
for _ in $(seq 1 120); do
  if grpcurl -plaintext -max-time 2 "$addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then
    break
  fi
  kill -0 "$pid" 2>/dev/null || fail "the gateway exited during start-up"
  sleep 0.5
done

services=$(grpcurl -plaintext "$addr" list)
grep -qx 'verdict.v1.SessionService' <<<"$services" || fail "SessionService not listed: $services"
grep -qx 'grpc.health.v1.Health' <<<"$services" || fail "Health not listed: $services"

grpcurl -plaintext -d '{"service":"verdict.v1.SessionService"}' "$addr" grpc.health.v1.Health/Check \
  | grep -q '"SERVING"' || fail "SessionService is not SERVING"

grpcurl -plaintext "$addr" describe verdict.v1.SessionService | grep -q 'rpc CreateSession' \
  || fail "describe did not show CreateSession"

created=$(grpcurl -plaintext -d '{
  "request_id": "smoke-1", "source_technology": "cobol", "target_technology": "java",
  "validation_scope": "full", "config": {"threshold": 0.9}}' \
  "$addr" verdict.v1.SessionService/CreateSession)
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["session"]["id"])' <<<"$created")

got=$(grpcurl -plaintext -d "{\"id\": \"$id\"}" "$addr" verdict.v1.SessionService/GetSession)
grep -q '"requestId": "smoke-1"' <<<"$got" || fail "GetSession did not return the session: $got"
grep -q 'SESSION_STATUS_PENDING' <<<"$got" || fail "the new session is not pending: $got"

if bad=$(grpcurl -plaintext -d '{"request_id": ""}' "$addr" verdict.v1.SessionService/CreateSession 2>&1); then
  fail "an empty request was accepted"
fi
grep -q 'InvalidArgument' <<<"$bad" || fail "expected InvalidArgument: $bad"

kill -TERM "$pid"
wait "$pid" || fail "the gateway did not exit cleanly on SIGTERM"
[ ! -e "$data/pgdata/postmaster.pid" ] || fail "the embedded PostgreSQL was left running"
echo "smoke: 7 passed, 0 failed"
