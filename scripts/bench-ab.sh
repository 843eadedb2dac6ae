#!/usr/bin/env bash
# Side-by-side benchmark of one or more gateway builds in the same run.
#
# The same method as ../shared/bench/side-by-side.sh (pgbench -M prepared
# with the gateway's own SQL, then h2load sending the matching gRPC call
# from a separate process, 8 calls in flight, two shapes), but with several
# gateway binaries started against the same throwaway PostgreSQL, each
# measured right after the same pgbench figure: before/after comparisons
# in one run, on a shared machine whose load moves between runs.
#
# From the project root, after cargo build --release:
#   BINS="target/release/verdict.before target/release/verdict" D=5 PASSES=1 scripts/bench-ab.sh
#   AUTH=1 ...            an API key on every call (VERDICT_REQUIRE_AUTH=true);
#                         prints how many times api_keys was read during the run
#   STATS=1 ...           loads pg_stat_statements and prints the statements
#                         each gateway ran per call
#   PERF=list:1 ...       perf record -g on the gateway of BINS #1 during its
#                         ListSessions runs (perf.data in $WORK); PERF_ARGS
#                         replaces -g (e.g. "--call-graph dwarf,16384 -F 999")
#   ENV1="VAR=x" ENV2=... extra environment of gateway #1, #2, ...
# Needs root (PostgreSQL runs as user postgres), h2load (nghttp2-client),
# pgbench and python3. Results: $WORK/results.tsv.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# ../shared beside the project.
SHARED=${SHARED:-$HERE/../../shared/bench}
[ -f "$SHARED/frames.py" ] || { echo "no $SHARED/frames.py: set SHARED to ../shared/bench"; exit 1; }
read -r -a BINS <<<"${BINS:-target/release/verdict}"
for b in "${BINS[@]}"; do [ -x "$b" ] || { echo "no $b: cargo build --release first"; exit 1; }; done
WORK=${WORK:-${TMPDIR:-/tmp}/ab_work}
PGBIN=/usr/lib/postgresql/15/bin
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PGPORT=${PGPORT:-$(free_port)}
D=${D:-10}
PASSES=${PASSES:-3}
CONC=${CONC:-8}
SHAPES=${SHAPES:-"c8m1 c1m8"}
WORKS=${WORKS:-"get:GetSession list:ListSessions append:AppendSessionLog"}
STATS=${STATS:-0}
PERF=${PERF:-}
as_pg() { runuser -u postgres -- "$@"; }
PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres)
GWS=(); PORTS=(); PG_UP=0
cleanup() {
  set +e
  for g in "${GWS[@]}"; do kill -TERM "$g"; wait "$g"; done
  [ "$PG_UP" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m fast -w stop >/dev/null
}
trap cleanup EXIT
command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
rm -rf "$WORK"; mkdir -p "$WORK/pgdata" "$WORK/sock"; chown postgres:postgres "$WORK/pgdata" "$WORK/sock"; chmod 700 "$WORK/pgdata"
as_pg "$PGBIN/initdb" -D "$WORK/pgdata" --auth=trust --locale=C.UTF-8 -U postgres >/dev/null
cat >>"$WORK/pgdata/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$PGPORT
unix_socket_directories='$WORK/sock'
max_connections=200
shared_buffers=256MB
CONF
[ "$STATS" = 1 ] && echo "shared_preload_libraries='pg_stat_statements'" >>"$WORK/pgdata/postgresql.conf"
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata/server.log" -w start >/dev/null; PG_UP=1
"${PSQL[@]}" -c "CREATE DATABASE verdict"
[ "$STATS" = 1 ] && "${PSQL[@]}" -d verdict -c "CREATE EXTENSION pg_stat_statements"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/verdict?sslmode=disable"
AUTH=${AUTH:-0}; AUTH_ARGS=(); KEY=""
if [ "$AUTH" = 1 ]; then
  "${BINS[0]}" migrate >/dev/null 2>&1
  KEY=$("${BINS[0]}" keys create --name bench --scopes read,write 2>/dev/null | grep -oE 'vk_[0-9a-f]+_[A-Za-z0-9_-]+' | head -1)
  [ -n "$KEY" ] || { echo "could not create an API key"; exit 1; }
  AUTH_ARGS=(-H "authorization: Bearer $KEY")
  export VERDICT_REQUIRE_AUTH=true
fi
i=0
for b in "${BINS[@]}"; do
  i=$((i + 1)); port=$(free_port); extra_var="ENV$i"; read -r -a extra <<<"${!extra_var:-}"
  env "${extra[@]}" VERDICT_LISTEN="127.0.0.1:$port" VERDICT_ROLLUP_INTERVAL_SECS=0 RUST_LOG=${RUST_LOG:-warn} \
    "$b" serve >"$WORK/gw$i.log" 2>&1 &
  GWS+=($!); PORTS+=("$port")
  for _ in $(seq 1 120); do
    kill -0 "${GWS[-1]}" 2>/dev/null || { echo "gateway $b exited: $(tail -2 "$WORK/gw$i.log")"; exit 1; }
    n=$("${PSQL[@]}" -d verdict -c "select count(*) from refinery_schema_history" 2>/dev/null || echo 0)
    [ "${n:-0}" -ge 1 ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.5
  done
done
sleep 2
"${PSQL[@]}" -d verdict -c "
INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, status, config, input_refs, metadata, created_at)
SELECT gen_random_uuid(), 'seed-'||g, 'python_flask', 'typescript_react', 'full_system', 'processing',
       jsonb_build_object('strict', true, 'depth', g % 5), jsonb_build_object('repo', 'git://example/'||g),
       jsonb_build_object('owner', 'team-'||(g % 7)), now() - (g || ' seconds')::interval
FROM generate_series(1, 5000) g; ANALYZE sessions;"
ID=$("${PSQL[@]}" -d verdict -c "select id from sessions where request_id='seed-2500'")
COLS="id, request_id, source_technology, target_technology, validation_scope, status, config, input_refs, metadata, created_at, updated_at, started_at, completed_at, version"
echo "SELECT $COLS FROM sessions WHERE id = '$ID';" >"$WORK/get.sql"
echo "SELECT $COLS FROM sessions ORDER BY created_at DESC, id DESC LIMIT 51;" >"$WORK/list.sql"
cat >"$WORK/append.sql" <<SQL
BEGIN;
INSERT INTO session_logs (session_id, level, message, fields) VALUES ('$ID', 'info', 'bench entry', '{}') RETURNING id, session_id, logged_at, level, message, fields;
INSERT INTO audit_events (key_id, rpc, target_ids, outcome, trace_id) VALUES (NULL, '/verdict.v1.SessionService/AppendSessionLog', ARRAY['$ID'], 'appended', NULL);
COMMIT;
SQL
python3 "$SHARED/frames.py" "$ID" "$WORK"
key_reads() { "${PSQL[@]}" -d verdict -c "select coalesce(seq_scan,0)+coalesce(idx_scan,0) from pg_stat_user_tables where relname='api_keys'"; }
run_pg() { as_pg pgbench -n -M prepared -c "$CONC" -j 1 -T "$D" -h 127.0.0.1 -p "$PGPORT" -U postgres -f "$1" verdict 2>&1 | awk '/^tps/ {print $3; exit}'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
run_h2() { # gateway-index body rpc shape -> "calls/s cpu-µs-per-call calls"
  local g=$1 c m t0 t1 out rps n pid=${GWS[$1]} port=${PORTS[$1]} perf_pid=""
  case $4 in c8m1) c=$CONC; m=1;; c1m8) c=1; m=$CONC;; esac
  if [ -n "$PERF" ] && [ "${PERF%%:*}" = "$5" ] && [ "${PERF#*:}" = "$((g + 1))" ]; then
    perf record -q ${PERF_ARGS:--g} -p "$pid" -o "$WORK/perf.$5.$4.data" -- sleep "$D" >/dev/null 2>&1 & perf_pid=$!
  fi
  t0=$(cpu_ticks "$pid")
  out=$(h2load -c "$c" -m "$m" -t 1 -D "$D" -d "$2" -H 'content-type: application/grpc' -H 'te: trailers' "${AUTH_ARGS[@]}" \
    "http://127.0.0.1:$port/verdict.v1.SessionService/$3" 2>&1 | tee -a "$WORK/h2load.log")
  t1=$(cpu_ticks "$pid")
  [ -n "$perf_pid" ] && wait "$perf_pid"
  rps=$(awk '/^finished in/ {gsub(",","",$4); print $4; exit}' <<<"$out")
  n=$(awk '/^requests:/ {print $2; exit}' <<<"$out")
  echo "$rps $(python3 -c "print(round(($t1-$t0)/$(getconf CLK_TCK)*1e6/max($n,1)))") $n"
}
# Each gateway's own CPU while idle (background work the per-call figure includes).
for g in "${!GWS[@]}"; do i0[$g]=$(cpu_ticks "${GWS[$g]}"); done
sleep 5
for g in "${!GWS[@]}"; do
  echo "gateway $((g + 1)) idle: $(python3 -c "print(round(($(cpu_ticks "${GWS[$g]}")-${i0[$g]})/$(getconf CLK_TCK)*1e3/5, 1))") ms CPU per second"
done
K0=$([ "$AUTH" = 1 ] && key_reads || echo 0)
TOTAL_CALLS=0
printf 'pass\twork\tpgbench_tps\tgateway\tshape\tgateway_rps\tratio\tcpu_us_per_call\n' | tee "$WORK/results.tsv"
for p in $(seq 1 "$PASSES"); do
  for w in $WORKS; do
    name=${w%%:*}; rpc=${w#*:}
    pg=$(run_pg "$WORK/$name.sql")
    for g in "${!GWS[@]}"; do
      [ "$STATS" = 1 ] && "${PSQL[@]}" -d verdict -c "select pg_stat_statements_reset()" >/dev/null
      calls=0
      for s in $SHAPES; do
        read -r gw cpu n < <(run_h2 "$g" "$WORK/$name.bin" "$rpc" "$s" "$name")
        calls=$((calls + n)); TOTAL_CALLS=$((TOTAL_CALLS + n))
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$p" "$name" "$pg" "$((g + 1))" "$s" "$gw" "$(python3 -c "print(round($gw/$pg,3))")" "$cpu" | tee -a "$WORK/results.tsv"
      done
      if [ "$STATS" = 1 ]; then
        "${PSQL[@]}" -d verdict -c "select round(calls::numeric/$calls, 3) || ' per call: ' || left(regexp_replace(query, '\s+', ' ', 'g'), 90) from pg_stat_statements where dbid = (select oid from pg_database where datname='verdict') and calls > 0 and query not like '%pg_stat_statements%' order by calls desc limit 8" | sed "s/^/  gateway $((g + 1)) $name: /"
      fi
    done
  done
done
for g in "${!GWS[@]}"; do VERDICT_KEY="$KEY" "${PY:-$(command -v /usr/bin/python3 || echo python3)}" "$SHARED/frames.py" --check "$ID" "${PORTS[$g]}"; done
grep -E "^status codes|requests:" "$WORK/h2load.log" | sort | uniq -c | head
if [ "$AUTH" = 1 ]; then
  echo "api_keys reads during the run: $(( $(key_reads) - K0 )) for $TOTAL_CALLS authenticated calls"
fi
