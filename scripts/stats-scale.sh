#!/usr/bin/env bash
# GetTestStatistics at scale, before and after (issue 18): one throwaway
# PostgreSQL; the BEFORE gateway migrates it, bench/scale/executions.sql
# loads SCALE (S: 1M executions over 90 days, L: 5M; 2000 test cases, 20
# subsystems), five calls of each shape are timed through the gRPC API;
# then the AFTER gateway migrates the same database (V25 backfills the
# rollup; its time is printed) and the same calls are timed again.
#
#   SCALE=S BEFORE=/path/to/old/verdict AFTER=target/debug/verdict scripts/stats-scale.sh
#
# Each call is one h2load request (-n 1, one connection): its "time for
# request" is the gRPC round trip without process start-up. Prints the
# median of 5 per shape. Needs root (PostgreSQL runs as user postgres),
# h2load and python3. Only 127.0.0.1.
set -euo pipefail
SCALE=${SCALE:-S}
case $SCALE in S) ROWS=1000000;; L) ROWS=5000000;; *) echo "SCALE is S or L"; exit 1;; esac
ROWS=${ROWS_OVERRIDE:-$ROWS}
BEFORE=${BEFORE:-}
AFTER=${AFTER:-target/debug/verdict}
WORK=${WORK:-${TMPDIR:-/tmp}/stats_scale_$SCALE}
PGBIN=/usr/lib/postgresql/15/bin
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PGPORT=$(free_port)
as_pg() { runuser -u postgres -- "$@"; }
PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres -d verdict)
GW=""; PG_UP=0
cleanup() {
  set +e
  [ -n "$GW" ] && { kill -TERM "$GW"; wait "$GW"; }
  [ "$PG_UP" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m fast -w stop >/dev/null
}
trap cleanup EXIT
# RESUME=1: the database of an earlier run in $WORK, loaded and measured
# with BEFORE; only the AFTER gateway is measured.
RESUME=${RESUME:-0}
if [ "$RESUME" = 1 ]; then
  sed -i "s/^port=.*/port=$PGPORT/" "$WORK/pgdata/postgresql.conf"
  as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata/server.log" -w start >/dev/null; PG_UP=1
fi
[ "$RESUME" = 1 ] || { rm -rf "$WORK"; mkdir -p "$WORK/pgdata" "$WORK/sock"; chown postgres:postgres "$WORK/pgdata" "$WORK/sock"; chmod 700 "$WORK/pgdata"
as_pg "$PGBIN/initdb" -D "$WORK/pgdata" --auth=trust --locale=C.UTF-8 -U postgres >/dev/null
cat >>"$WORK/pgdata/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$PGPORT
unix_socket_directories='$WORK/sock'
shared_buffers=512MB
work_mem=16MB
maintenance_work_mem=256MB
max_wal_size=4GB
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata/server.log" -w start >/dev/null; PG_UP=1
psql -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE verdict"
}
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/verdict?sslmode=disable"

start_gateway() { # binary -> sets GW, PORT (migrates first)
  "$1" migrate >"$WORK/migrate.log" 2>&1 || { echo "migrate failed: $(tail -3 "$WORK/migrate.log")"; exit 1; }
  PORT=$(free_port)
  VERDICT_LISTEN="127.0.0.1:$PORT" VERDICT_ROLLUP_INTERVAL_SECS=0 RUST_LOG=warn "$1" serve >"$WORK/gw.log" 2>&1 &
  GW=$!
  for _ in $(seq 1 1200); do
    kill -0 "$GW" 2>/dev/null || { echo "gateway $1 exited: $(tail -3 "$WORK/gw.log")"; exit 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.5
  done
  echo "gateway $1 did not listen"; exit 1
}
stop_gateway() { kill -TERM "$GW"; wait "$GW" || true; GW=""; }

# gRPC frames of GetTestStatisticsRequest, encoded by hand (field numbers of
# proto/verdict/v1/test_cases.proto): key 2, subsystem 3, window 4, run 7.
frames() { # run-id
  python3 - "$1" "$WORK" <<'PY'
import struct, sys, time
run, work = sys.argv[1], sys.argv[2]
def varint(n):
    out = b""
    while True:
        b = n & 0x7f; n >>= 7
        if n: out += bytes([b | 0x80])
        else: return out + bytes([b])
def field(num, wire, payload):
    tag = varint(num << 3 | wire)
    return tag + (varint(payload) if wire == 0 else varint(len(payload)) + payload)
now = int(time.time())
ts = lambda s: field(1, 0, s)
window = field(4, 2, field(1, 2, ts(now - 30 * 86400)) + field(2, 2, ts(now)))
shapes = {
  "test_case": field(2, 2, b"scale-5") + window,
  "subsystem": field(3, 2, b"subsystem-3") + window,
  "global": window,
  "run": field(7, 2, run.encode()),
}
for name, body in shapes.items():
    open(f"{work}/{name}.bin", "wb").write(b"\0" + struct.pack(">I", len(body)) + body)
PY
}

measure() { # label
  for shape in test_case subsystem global run; do
    times=()
    for _ in 1 2 3 4 5; do
      out=$(h2load -n 1 -c 1 -t 1 -d "$WORK/$shape.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$PORT/verdict.v1.TestCaseService/GetTestStatistics" 2>&1)
      grep -q "1 succeeded" <<<"$out" || { echo "$shape failed: $out"; exit 1; }
      times+=("$(awk '/^time for request:/ {print $4; exit}' <<<"$out")")
    done
    printf '%s\t%s\t%s\t%s\n' "$SCALE" "$1" "$shape" "$(python3 -c "
import sys
def ms(t): return float(t[:-2]) if t.endswith('ms') else float(t[:-2]) / 1000 if t.endswith('us') else float(t[:-1]) * 1000
v = sorted(ms(t) for t in sys.argv[1:]); print(f'median {v[2]:.1f} ms (5 calls: {\" \".join(f\"{x:.1f}\" for x in v)})')" "${times[@]}")" | tee -a "$WORK/results.tsv"
  done
}

if [ "$RESUME" = 1 ]; then
  RUN=$("${PSQL[@]}" -c "SELECT id FROM test_runs WHERE client_key LIKE 'scale-run-%' ORDER BY started_at DESC LIMIT 1 OFFSET 3")
  frames "$RUN"
  t0=$(date +%s.%N)
  start_gateway "$AFTER"
  echo "after gateway migrated (V25 backfill) and listening in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
  "${PSQL[@]}" -c "ANALYZE test_execution_days"
  measure after
  exit 0
fi
FIRST=${BEFORE:-$AFTER}
start_gateway "$FIRST"
PROJECT=$("${PSQL[@]}" -c "SELECT id FROM projects WHERE slug = 'default'")
t0=$(date +%s.%N)
"${PSQL[@]}" -v project="$PROJECT" -v rows="$ROWS" -f bench/scale/executions.sql
echo "loaded $ROWS executions in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
RUN=$("${PSQL[@]}" -c "SELECT id FROM test_runs WHERE client_key LIKE 'scale-run-%' ORDER BY started_at DESC LIMIT 1 OFFSET 3")
frames "$RUN"
if [ -n "$BEFORE" ]; then
  measure before
  stop_gateway
  t0=$(date +%s.%N)
  start_gateway "$AFTER"
  echo "after gateway migrated (V25 backfill) and listening in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
  "${PSQL[@]}" -c "ANALYZE test_execution_days"
fi
measure after
