#!/bin/bash
# hop (2026-12-07): one traced e2e run of spoold AND the load generator in one `perf trace`
# (one clock), so a record's path splits on both sides: load generator's produce write ->
# spoold's read -> append -> (fsync=always: the covering fdatasync) -> spoold's write to the
# consumer connection -> the load generator's read of it. Analysis:
# issue14-hop-breakdown-2026-12-07.py. Adapted from issue14-synchop-breakdown-run-2026-12-07.sh
# (which traced spoold alone). Producer: the efficiency bench's e2e one (50 MB/s of 1 KiB
# records, linger 0, 1 in flight, acks=written).
# TRACE_LG=1 traces the load generator too; first tried 15:15 UTC: perf trace on the load
# generator's many small system calls slowed the whole run ~50x (p50 10-100 ms), so by default
# only spoold is traced and the load generator's side is its own report (after send p99).
# Usage: FSYNC=always|never RUN=1 issue14-hop-breakdown-run-2026-12-07.sh name:/path/spoold ...
set -u
LG=${LG:-/tmp/perf-bins/main-079a76f/spool-loadgen}
OUT=${OUT:-/tmp/hop/tr}
TMP=${TMP:-/work/wt-hop/target/hop-tmp}
FSYNC=${FSYNC:-always}
mkdir -p "$OUT"
trace_run() {
  name=$1; bin=$2
  d=$TMP/$name; rm -rf "$d"; mkdir -p "$d"
  port=$((17000 + RANDOM % 1000))
  "$bin" --data-dir "$d" --listen 127.0.0.1:$port --metrics-listen off --runtime-threads 1 > "$OUT/$name.spoold.log" 2>&1 &
  sp=$!
  sleep 1.5
  "$LG" e2e --broker 127.0.0.1:$port --fsync "$FSYNC" --rate 48828 --record-size 1024 --acks written \
    --linger-ms 0 --in-flight 1 --duration 4s --warmup 1s --threads 1 > "$OUT/$name.lg.log" 2>&1 &
  lp=$!
  sleep 1.8   # past the connections, the prefault and the warm-up
  ls /proc/$sp/task > "$OUT/$name.spoold.tids"; ls /proc/$lp/task > "$OUT/$name.lg.tids"
  pids=$sp; [ "${TRACE_LG:-0}" = 1 ] && pids=$sp,$lp
  perf trace -p $pids -e fdatasync,pwritev,pwrite64,writev,sendmsg,sendto,recvfrom,recvmsg,read,write \
    -o "$OUT/$name.trace" & tp=$!
  sleep 3; kill -INT $tp; wait $tp
  ls /proc/$sp/task >> "$OUT/$name.spoold.tids"; ls /proc/$lp/task >> "$OUT/$name.lg.tids"
  wait $lp
  kill -TERM $sp; wait $sp
  rm -rf "$d"
  echo "$name: $(tail -1 "$OUT/$name.lg.log" | cut -c1-260)"
}
for i in ${RUN:-1}; do
  for nb in "$@"; do trace_run "${nb%%:*}-$FSYNC-$i" "${nb#*:}"; done
done
