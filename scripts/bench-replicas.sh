#!/usr/bin/env bash
# GetSession and ListSessions throughput through the gateway, primary only
# vs primary + one streaming replica (VERDICT_DATABASE_READ_URL), side by
# side in the same run on the same box.
#
# A throwaway PostgreSQL 15 primary and a `pg_basebackup -R` standby on
# 127.0.0.1, 5,000 seeded sessions, then in each pass: the gateway started
# primary-only, h2load on each RPC; the gateway restarted with the replica
# as its read endpoint, h2load again. The replica's share is counted from
# its pg_stat_database (xact_commit delta).
#
# From the project root, after cargo build --release:
#   scripts/bench-replicas.sh                  # D=10 PASSES=2
#   D=5 PASSES=1 scripts/bench-replicas.sh     # quick
# Needs root (PostgreSQL runs as user postgres), h2load (nghttp2-client),
# and ../shared/bench/frames.py (request frames). Results: $WORK/results.tsv.
set -euo pipefail
: "${VERDICT_BIN:=target/release/verdict}"; [ -x "$VERDICT_BIN" ] || { echo "no $VERDICT_BIN: cargo build --release first"; exit 1; }
FRAMES=${FRAMES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/bench/frames.py}
WORK=${WORK:-${TMPDIR:-/tmp}/replica_bench}
PGBIN=/usr/lib/postgresql/15/bin
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
P1=$(free_port); P2=$(free_port); GPORT=$(free_port)
D=${D:-10}; PASSES=${PASSES:-2}; CONC=${CONC:-8}
as_pg() { runuser -u postgres -- "$@"; }
psql1() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$P1" -U postgres "$@"; }
psql2() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$P2" -U postgres "$@"; }
GW=""; UP1=0; UP2=0
stop_gw() { if [ -n "$GW" ]; then kill -TERM "$GW"; wait "$GW" || true; GW=""; fi; }
cleanup() {
  set +e; stop_gw
  [ "$UP2" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/standby" -m fast -w stop >/dev/null
  [ "$UP1" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -m fast -w stop >/dev/null
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK/primary" "$WORK/sock1" "$WORK/sock2"
chown postgres:postgres "$WORK" "$WORK/primary" "$WORK/sock1" "$WORK/sock2"; chmod 700 "$WORK/primary"
as_pg "$PGBIN/initdb" -D "$WORK/primary" --auth=trust --locale=C.UTF-8 -U postgres >/dev/null
cat >>"$WORK/primary/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$P1
unix_socket_directories='$WORK/sock1'
max_connections=200
shared_buffers=256MB
CONF
echo "host replication all 127.0.0.1/32 trust" >>"$WORK/primary/pg_hba.conf"
as_pg "$PGBIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w start >/dev/null; UP1=1
psql1 -c "CREATE DATABASE verdict"
as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$P1" -U postgres -D "$WORK/standby" -R -X stream -c fast
cat >>"$WORK/standby/postgresql.conf" <<CONF
port=$P2
unix_socket_directories='$WORK/sock2'
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/standby" -l "$WORK/standby.log" -w start >/dev/null; UP2=1

PRIMARY="postgres://postgres@127.0.0.1:$P1/verdict?sslmode=disable"
REPLICA="postgres://postgres@127.0.0.1:$P2/verdict?sslmode=disable"
start_gw() { # [read url]
  if [ -n "${1:-}" ]; then export VERDICT_DATABASE_READ_URL="$1"; else unset VERDICT_DATABASE_READ_URL; fi
  DATABASE_URL="$PRIMARY" VERDICT_LISTEN="127.0.0.1:$GPORT" VERDICT_ROLLUP_INTERVAL_SECS=0 RUST_LOG=warn \
    "$VERDICT_BIN" serve >>"$WORK/gw.log" 2>&1 &
  GW=$!
  for _ in $(seq 1 120); do
    kill -0 "$GW" 2>/dev/null || { echo "gateway exited: $(tail -2 "$WORK/gw.log")"; exit 1; }
    n=$(psql1 -d verdict -c "select count(*) from refinery_schema_history" 2>/dev/null || echo 0)
    [ "${n:-0}" -ge 1 ] && (exec 3<>/dev/tcp/127.0.0.1/$GPORT) 2>/dev/null && break; sleep 0.5
  done
  sleep 2 # the replica's first position checks
}
start_gw
psql1 -d verdict -c "
INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, status, config, input_refs, metadata, created_at)
SELECT gen_random_uuid(), 'seed-'||g, 'python_flask', 'typescript_react', 'full_system', 'processing',
       jsonb_build_object('strict', true, 'depth', g % 5), jsonb_build_object('repo', 'git://example/'||g),
       jsonb_build_object('owner', 'team-'||(g % 7)), now() - (g || ' seconds')::interval
FROM generate_series(1, 5000) g; ANALYZE sessions;"
stop_gw
ID=$(psql1 -d verdict -c "select id from sessions where request_id='seed-2500'")
python3 "$FRAMES" "$ID" "$WORK"
until [ "$(psql2 -d verdict -c "select count(*) from sessions")" = 5000 ]; do sleep 0.2; done
commits() { psql2 -d verdict -c "select xact_commit from pg_stat_database where datname = 'verdict'"; }
run_h2() { # body rpc -> calls/s
  h2load -c "$CONC" -m 1 -t 1 -D "$D" -d "$1" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$GPORT/verdict.v1.SessionService/$2" 2>&1 | tee -a "$WORK/h2load.log" |
    awk '/^finished in/ {gsub(",","",$4); print $4; exit}'
}
printf 'pass\tsetup\trpc\tcalls_per_s\treplica_commits\n' | tee "$WORK/results.tsv"
for p in $(seq 1 "$PASSES"); do
  for setup in primary replica; do
    if [ "$setup" = replica ]; then start_gw "$REPLICA"; else start_gw; fi
    for w in get:GetSession list:ListSessions; do
      name=${w%%:*}; rpc=${w#*:}
      c0=$(commits); sleep 1
      rps=$(run_h2 "$WORK/$name.bin" "$rpc")
      sleep 1.5; c1=$(commits) # statistics reach pg_stat_database within a second
      printf '%s\t%s\t%s\t%s\t%s\n' "$p" "$setup" "$rpc" "$rps" "$((c1 - c0))" | tee -a "$WORK/results.tsv"
    done
    if [ "$p" = 1 ] && python3 -c "import grpc" 2>/dev/null; then
      # h2load counts HTTP 200 only: check grpc-status through the gateway.
      python3 "$FRAMES" --check "$ID" "$GPORT"
    fi
    stop_gw
  done
done
grep -E "^status codes" "$WORK/h2load.log" | sort | uniq -c
