#!/usr/bin/env bash
# IngestDiscrepancies against COPY ... FROM STDIN (FORMAT binary) of the same
# rows into the same table, each from a process of its own, in one run; then
# what each index (and the foreign key) of `discrepancies` costs a COPY.
#
# A throwaway PostgreSQL 15 and the gateway against it over TCP (as
# ../shared/bench/side-by-side.sh does). `verdict-bench --gateway` streams
# ROWS rows through IngestDiscrepancies (5,000-item messages; the gateway
# COPYs and commits them in 10,000-row transactions); the rows it stored are
# written to a binary COPY file (under another session id, same ids), which
# psql then sends with \copy (COPY FROM STDIN, binary, one transaction).
# Each index is then dropped in turn inside a transaction that COPYs the
# same rows again (into a third session) and rolls back: the difference
# with the same COPY with every index in place is that index's cost.
#
# From the project root, after
#   cargo build --release --bin verdict --bin verdict-bench
#   ROWS=200000 scripts/ingest-vs-copy.sh
# Needs root (PostgreSQL runs as user postgres), psql and python3.
set -euo pipefail
: "${VERDICT_BIN:=target/release/verdict}"
: "${BENCH_BIN:=target/release/verdict-bench}"
for b in "$VERDICT_BIN" "$BENCH_BIN"; do [ -x "$b" ] || { echo "no $b: cargo build --release first"; exit 1; }; done
WORK=${WORK:-${TMPDIR:-/tmp}/ingest_work}
ROWS=${ROWS:-200000}
PGBIN=/usr/lib/postgresql/15/bin
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PGPORT=${PGPORT:-$(free_port)}
GPORT=${GPORT:-$(free_port)}
as_pg() { runuser -u postgres -- "$@"; }
PSQL=(psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres)
GW=""; PG_UP=0
cleanup() { set +e; [ -n "$GW" ] && kill -TERM "$GW" && wait "$GW"; [ "$PG_UP" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m fast -w stop >/dev/null; }
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK/pgdata" "$WORK/sock" "$WORK/copy"
chown postgres:postgres "$WORK/pgdata" "$WORK/sock" "$WORK/copy"; chmod 700 "$WORK/pgdata"
as_pg "$PGBIN/initdb" -D "$WORK/pgdata" --auth=trust --locale=C.UTF-8 -U postgres >/dev/null
cat >>"$WORK/pgdata/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$PGPORT
unix_socket_directories='$WORK/sock'
max_connections=200
shared_buffers=256MB
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata/server.log" -w start >/dev/null; PG_UP=1
"${PSQL[@]}" -c "CREATE DATABASE verdict"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/verdict?sslmode=disable"
VERDICT_LISTEN="127.0.0.1:$GPORT" VERDICT_ROLLUP_INTERVAL_SECS=0 RUST_LOG=warn "$VERDICT_BIN" serve >"$WORK/gw.log" 2>&1 &
GW=$!
for _ in $(seq 1 120); do
  kill -0 "$GW" 2>/dev/null || { echo "gateway exited: $(tail -2 "$WORK/gw.log")"; exit 1; }
  n=$("${PSQL[@]}" -d verdict -c "select count(*) from refinery_schema_history" 2>/dev/null || echo 0)
  [ "${n:-0}" -ge 1 ] && (exec 3<>"/dev/tcp/127.0.0.1/$GPORT") 2>/dev/null && break; sleep 0.5
done
sleep 2
S=()
for i in 1 2 3; do
  S+=("$("${PSQL[@]}" -d verdict -c "INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, status)
    VALUES (gen_random_uuid(), 'ingest-bench-$i', 'cobol', 'java', 'full', 'processing') RETURNING id")")
done
COLS="session_id, project_id, id, result_id, kind, severity, description, source_element, target_element, recommendation, confidence, fingerprint, resolution, resolved_by, resolution_note, resolution_updated_at, batch_id, batch_position"
REST=${COLS#session_id, }

echo "IngestDiscrepancies: $ROWS rows through the gateway (verdict-bench, a process of its own)"
read -r _ g_secs g_rate < <("$BENCH_BIN" --gateway "http://127.0.0.1:$GPORT" --session "${S[0]}" --ingest-rows "$ROWS")
for i in 1 2; do
  "${PSQL[@]}" -d verdict -c "COPY (SELECT '${S[$i]}'::uuid, $REST FROM discrepancies WHERE session_id = '${S[0]}' ORDER BY id)
    TO '$WORK/copy/rows$i.bin' (FORMAT binary)"
done
# Seconds of the \copy in the psql script read from stdin (the Time line after COPY).
copy_secs() {
  { echo '\timing on'; cat; } | "${PSQL[@]}" -d verdict 2>&1 | awk '/^copy-starts$/ {c=1; next} c && /^Time:/ {print $2/1000; exit}'
}
c_secs=$(printf '\\echo copy-starts\n%s\n' "\\copy discrepancies ($COLS) FROM '$WORK/copy/rows1.bin' (FORMAT binary)" | copy_secs)
c_rate=$(python3 -c "print(round($ROWS/$c_secs))")
printf 'ingest\t%s rows\t%s s\t%s rows/s\n' "$ROWS" "$g_secs" "$g_rate"
printf 'COPY\t%s rows\t%s s\t%s rows/s\n' "$ROWS" "$c_secs" "$c_rate"
printf 'ratio\t%s\n' "$(python3 -c "print(round($g_rate/$c_rate, 3))")"

INDEXES=$("${PSQL[@]}" -d verdict -c "select indexrelid::regclass from pg_index where indrelid = 'discrepancies'::regclass and not indisprimary order by 1")
FKS=$("${PSQL[@]}" -d verdict -c "select conname from pg_constraint where conrelid = 'discrepancies'::regclass and contype = 'f' order by 1")
echo "discrepancies: primary key + $(wc -w <<<"$INDEXES") indexes ($(echo $INDEXES)), foreign keys: $(echo $FKS)"
rolled_back() { # statements before the COPY -> seconds of the COPY (rolled back)
  printf 'BEGIN;\n%s\n\\echo copy-starts\n\\copy discrepancies (%s) FROM '"'"'%s'"'"' (FORMAT binary)\nROLLBACK;\n' "$1" "$COLS" "$WORK/copy/rows2.bin" | copy_secs
}
base=$(rolled_back "")
printf 'cost\t%-40s\t%s s (all indexes and keys)\n' "baseline" "$base"
for idx in $INDEXES; do
  t=$(rolled_back "DROP INDEX $idx;")
  printf 'cost\t%-40s\t%s s without it: %s%% of the COPY\n' "$idx" "$t" "$(python3 -c "print(round(100*($base-$t)/$base))")"
done
for fk in $FKS; do
  t=$(rolled_back "ALTER TABLE discrepancies DROP CONSTRAINT $fk;")
  printf 'cost\t%-40s\t%s s without it: %s%% of the COPY\n' "$fk" "$t" "$(python3 -c "print(round(100*($base-$t)/$base))")"
done
all=$(for idx in $INDEXES; do echo "DROP INDEX $idx;"; done)
t=$(rolled_back "$all")
printf 'cost\t%-40s\t%s s without them: %s%% of the COPY\n' "all secondary indexes" "$t" "$(python3 -c "print(round(100*($base-$t)/$base))")"
