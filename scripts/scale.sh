#!/usr/bin/env bash
# The scale bench of issue 18, before and after, on one database.
#
#   SCALE=S BEFORE=/path/to/old/verdict AFTER=target/release/verdict \
#     KEEP=/var/tmp/scale/S scripts/scale.sh
#
# SCALE      S (1M executions, 1M discrepancies, 2M metric points, 20k
#            coverage reports with 1M files) or L (five times that).
# BEFORE     the gateway release measured first: it migrates a fresh
#            database, `verdict-bench --scale --load-only` loads it through
#            SQL, then every dashboard read is timed through its gRPC API
#            (`verdict-bench --scale --target`, median of 5 calls).
# AFTER      (optional) the release measured second: it migrates the SAME
#            loaded database (each new migration's time is printed: new
#            migrations backfill their aggregates from the loaded rows),
#            then the same calls are timed.
# KEEP       (optional) a folder that keeps the loaded PostgreSQL cluster
#            (stopped cleanly at the end) and the BEFORE figures. When it
#            already holds a loaded cluster, nothing is loaded: BEFORE is
#            skipped (its saved figures are printed) and only AFTER runs.
#            Without KEEP the cluster lives in a temporary folder, removed
#            at the end.
# BENCH      verdict-bench binary (default target/release/verdict-bench).
#
# Prints the load time per table, each AFTER migration's time, and ONE
# markdown table: call | SCALE before median ms | SCALE after median ms.
# Needs root (PostgreSQL runs as user postgres) and python3. Listens on
# 127.0.0.1 only; stops what it started, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-S}
case $SCALE in S|L) ;; *) echo "SCALE is S or L" >&2; exit 1;; esac
BEFORE=${BEFORE:-}
AFTER=${AFTER:-}
BENCH=${BENCH:-target/release/verdict-bench}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
[ -x "$BENCH" ] || { echo "no $BENCH: cargo build --release --bin verdict-bench" >&2; exit 1; }
if [ -n "${KEEP:-}" ]; then
  WORK=$KEEP; THROWAWAY=0
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/verdict-scale-XXXXXX"); THROWAWAY=1
  chmod 755 "$WORK" # PostgreSQL (user postgres) keeps its data inside
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
LOADED=0
[ -f "$WORK/pgdata/PG_VERSION" ] && [ -f "$WORK/loaded" ] && LOADED=1
if [ "$LOADED" = 0 ] && [ -z "$BEFORE" ]; then
  echo "BEFORE is needed to load a new cluster ($WORK holds no loaded one)" >&2; exit 1
fi

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
as_pg() { runuser -u postgres -- "$@"; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.1f}')"; }
PGPORT=$(free_port)
GW=""; PG_UP=0; POLL=""
cleanup() {
  set +e
  [ -n "$POLL" ] && { kill -TERM "$POLL"; wait "$POLL"; }
  [ -n "$GW" ] && { kill -TERM "$GW"; wait "$GW"; }
  [ "$PG_UP" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m fast -w stop >/dev/null
  [ "$THROWAWAY" = 1 ] && rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -f "$WORK/pgdata/PG_VERSION" ]; then
  rm -rf "$WORK/pgdata"
  mkdir -p "$WORK/pgdata" "$WORK/sock"
  chown postgres:postgres "$WORK/pgdata" "$WORK/sock"; chmod 700 "$WORK/pgdata"
  as_pg "$PGBIN/initdb" -D "$WORK/pgdata" --auth=trust --locale=C.UTF-8 -U postgres >/dev/null
  # wal_level=minimal: the index rebuilds of the load write no WAL.
  cat >>"$WORK/pgdata/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$PGPORT
unix_socket_directories='$WORK/sock'
shared_buffers=512MB
work_mem=16MB
maintenance_work_mem=256MB
max_wal_size=8GB
checkpoint_timeout=30min
wal_level=minimal
max_wal_senders=0
CONF
  NEW_CLUSTER=1
else
  sed -i "s/^port=.*/port=$PGPORT/" "$WORK/pgdata/postgresql.conf"
  NEW_CLUSTER=0
fi
touch "$WORK/server.log"; chown postgres:postgres "$WORK/server.log"
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/server.log" -w start >/dev/null; PG_UP=1
[ "$NEW_CLUSTER" = 1 ] && psql -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE verdict"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/verdict?sslmode=disable"
PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres -d verdict)

# Migrates with $1, printing each migration it applies and its time (the
# commit of each migration's history row is seen by a poll every 0.2 s).
migrate() {
  local before_v t0 start
  before_v=$("${PSQL[@]}" -c "SELECT coalesce(max(version), 0) FROM refinery_schema_history" 2>/dev/null || echo 0)
  : >"$WORK/migrations.seen"
  ( set +e; while :; do
      "${PSQL[@]}" -F ' ' -c "SELECT version, name FROM refinery_schema_history WHERE version > $before_v ORDER BY version" 2>/dev/null |
        while read -r v n; do grep -q "^$v " "$WORK/migrations.seen" || echo "$v $(now) $n" >>"$WORK/migrations.seen"; done
      sleep 0.2
    done ) &
  POLL=$!
  t0=$(now)
  "$1" migrate >"$WORK/migrate.log" 2>&1 || { echo "migrate with $1 failed: $(tail -3 "$WORK/migrate.log")" >&2; exit 1; }
  sleep 0.5; kill -TERM "$POLL"; wait "$POLL" || true; POLL=""
  echo "migrated by $1 in $(since "$t0") s"
  start=$t0
  while read -r v t n; do
    echo "  V$v $n: $(python3 -c "print(f'{$t - $start:.1f}')") s"
    start=$t
  done <"$WORK/migrations.seen"
}

start_gateway() { # binary -> sets GW, PORT
  PORT=$(free_port)
  VERDICT_LISTEN="127.0.0.1:$PORT" VERDICT_ROLLUP_INTERVAL_SECS=0 VERDICT_RETENTION_INTERVAL_SECS=0 \
    VERDICT_POOL_SIZE=2 VERDICT_MAX_STATEMENT_TIMEOUT_MS=300000 RUST_LOG=warn \
    "$1" serve >"$WORK/gateway.log" 2>&1 &
  GW=$!
}
stop_gateway() { kill -TERM "$GW"; wait "$GW" || true; GW=""; }

measure() { # label binary
  start_gateway "$2"
  "$BENCH" --scale "$SCALE" --database-url "$DATABASE_URL" --skip-load \
    --target "http://127.0.0.1:$PORT" --tsv "$WORK/$1.tsv"
  stop_gateway
}

echo "scale $SCALE in $WORK (PostgreSQL on 127.0.0.1:$PGPORT); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$LOADED" = 0 ]; then
  migrate "$BEFORE"
  t0=$(now)
  "$BENCH" --scale "$SCALE" --database-url "$DATABASE_URL" --load-only | tee "$WORK/load.log"
  echo "load: $(since "$t0") s; load average: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$WORK/load.log"
  touch "$WORK/loaded"
  measure before "$BEFORE"
  echo "$BEFORE" >"$WORK/before.binary"
else
  echo "reusing the cluster loaded in $WORK (before: $(cat "$WORK/before.binary" 2>/dev/null || echo unknown))"
fi
rm -f "$WORK/after.tsv"
if [ -n "$AFTER" ]; then
  migrate "$AFTER"
  # As after the load: statistics and visibility maps of what the
  # migrations backfilled (tables already vacuumed are skipped quickly).
  t0=$(now)
  "${PSQL[@]}" -c "VACUUM (ANALYZE)"
  echo "VACUUM (ANALYZE) after the migrations: $(since "$t0") s"
  measure after "$AFTER"
fi

echo
python3 - "$SCALE" "$WORK/before.tsv" "$WORK/after.tsv" <<'PY'
import os, sys
scale, before, after = sys.argv[1:4]
def read(path):
    rows = {}
    if os.path.exists(path):
        for line in open(path):
            name, median, *_ = line.rstrip("\n").split("\t")
            rows[name] = median
    return rows
b, a = read(before), read(after)
names = list(b) + [n for n in a if n not in b]
print(f"| call | {scale} before median ms | {scale} after median ms |")
print("| --- | --- | --- |")
for n in names:
    print(f"| {n} | {b.get(n, '–')} | {a.get(n, '–')} |")
PY
