#!/usr/bin/env bash
# The gateway's own CPU and context switches per call over a fixed number
# of calls: robust to a loaded box (wall-clock rates are not).
#
#   scripts/switches-per-call.sh PID PORT BODY RPC N SHAPE [KEY]
#
# PID: the gateway's process; PORT: its gRPC port; BODY: a framed request
# (frames.py of ../shared/bench writes get.bin, list.bin, append.bin); RPC: a
# SessionService method (GetSession, ListSessions, AppendSessionLog); N:
# calls; SHAPE: c8m1 (8 connections x 1 stream) or c1m8 (1 x 8); KEY: an API
# key, sent as a bearer token. Warms up with 1,000 calls, then sends N with
# h2load and prints CPU µs per call (utime+stime from /proc), and voluntary
# and involuntary context switches per call summed over the gateway's
# threads (/proc/PID/task/*/status).
set -euo pipefail
PID=$1; PORT=$2; BODY=$3; RPC=$4; N=$5; S=$6; KEY=${7:-}
case $S in c8m1) c=8; m=1;; c1m8) c=1; m=8;; *) echo "shape: c8m1 or c1m8"; exit 2;; esac
A=(); [ -n "$KEY" ] && A=(-H "authorization: Bearer $KEY")
h2() { h2load -c "$c" -m "$m" -t 1 -n "$1" -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' "${A[@]}" \
  "http://127.0.0.1:$PORT/verdict.v1.SessionService/$RPC" 2>&1; }
h2 1000 >/dev/null
snap() { # CPU ticks, voluntary and involuntary switches of every thread
  local v=0 i=0 a b f
  for f in /proc/"$PID"/task/*/status; do
    read -r a b < <(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {n=$2} END {print v+0, n+0}' "$f" 2>/dev/null || echo 0 0)
    v=$((v + a)); i=$((i + b))
  done
  echo "$(awk '{print $14+$15}' /proc/"$PID"/stat) $v $i"
}
read -r t0 v0 i0 < <(snap)
out=$(h2 "$N")
read -r t1 v1 i1 < <(snap)
ok=$(awk '/^requests:/ {print $8}' <<<"$out")
python3 -c "print('$RPC $S: %s of $N OK, %.1f µs CPU, %.2f voluntary + %.2f involuntary switches per call' % ('$ok', ($t1-$t0)/$(getconf CLK_TCK)*1e6/$N, ($v1-$v0)/$N, ($i1-$i0)/$N))"
