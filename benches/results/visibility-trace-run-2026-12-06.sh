#!/bin/bash
# One traced e2e-always-linger run (docs/benchmarks.md, "Why the async path makes records visible
# later"): ./visibility-trace-run-2026-12-06.sh NAME linger [SPOOL_DIAG_ASYNC_ALWAYS=1].
# /tmp/perf-bins/spoold-diag was a release spoold of this session's produce.rs with, at the top of
# blocking_path: `if std::env::var_os("SPOOL_DIAG_ASYNC_ALWAYS").is_some() { return false; }`
# (not on main). Needs perf; the data directory is removed afterwards.
set -u
name=$1; mode=$2; shift 2
d=/work/wt/perf/target/efficiency-tmp/diag-$name; rm -rf $d; mkdir -p $d
port=$((17000 + RANDOM % 1000))
env "$@" perf trace -e fdatasync,pwrite64,write,writev,sendmsg,read,recvfrom,recvmsg -o /tmp/perf-bins/diag/$name.trace -- /tmp/perf-bins/spoold-diag --data-dir $d --listen 127.0.0.1:$port --metrics-listen off --runtime-threads 1 > /tmp/perf-bins/diag/$name.spoold.log 2>&1 &
pt=$!
sleep 1.5
extra=""; [ "$mode" = linger ] && extra="--linger-only"
/work/wt/perf/target/release/spool-loadgen e2e --broker 127.0.0.1:$port --fsync always --rate 48828 --record-size 1024 --acks written --linger-ms 1 $extra --duration 4s --warmup 1s --threads 1 > /tmp/perf-bins/diag/$name.lg.log 2>&1
pkill -TERM -f "spoold-diag --data-dir $d" ; wait $pt
rm -rf $d
tail -1 /tmp/perf-bins/diag/$name.lg.log | cut -c1-140
