#!/bin/bash
# One traced e2e-always run (synchop, 2026-12-07): trace-run NAME SPOOLD ; perf trace of spoold's
# system calls (pwritev appends, fdatasync, socket reads/writes) while spool-loadgen e2e runs the
# efficiency bench's e2e-always producer (50 MB/s of 1 KiB records, linger 0, 1 in flight,
# fsync=always, acks=written). Analysis: issue14-syncfast-breakdown-2026-12-07.py (the same as
# syncfast's). Adapted from issue14-syncfast-breakdown-run-2026-12-07.sh (the old tick producer).
# Usage: RUN=1 issue14-synchop-breakdown-run-2026-12-07.sh main:/path/spoold new:/path/spoold ...
set -u
LG=${LG:-/tmp/perf-bins/main-d5a603c/spool-loadgen}
OUT=${OUT:-/tmp/synchop/tr}
TMP=${TMP:-/work/wt-synchop/target/synchop-tmp}
mkdir -p "$OUT"
trace_run() {
  name=$1; bin=$2
  d=$TMP/$name; rm -rf "$d"; mkdir -p "$d"
  port=$((17000 + RANDOM % 1000))
  perf trace -e fdatasync,pwritev,pwrite64,writev,sendmsg,recvfrom,recvmsg,read,write -o "$OUT/$name.trace" -- \
    "$bin" --data-dir "$d" --listen 127.0.0.1:$port --metrics-listen off --runtime-threads 1 > "$OUT/$name.spoold.log" 2>&1 &
  pt=$!
  sleep 1.5
  "$LG" e2e --broker 127.0.0.1:$port --fsync always --rate 48828 --record-size 1024 --acks written \
    --linger-ms 0 --in-flight 1 --duration 4s --warmup 1s --threads 1 > "$OUT/$name.lg.log" 2>&1
  kill -TERM $(pgrep -P $pt) 2>/dev/null; wait $pt
  rm -rf "$d"
  echo "$name: $(tail -1 "$OUT/$name.lg.log" | cut -c1-220)"
}
for i in ${REPS:-1 2}; do
  for nb in "$@"; do trace_run "${nb%%:*}-$i" "${nb#*:}"; done
done
