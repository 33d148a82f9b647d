#!/bin/bash
# issue 14, 2026-12-07: the standalone perf-trace runs quoted in docs/benchmarks.md
# ("map ahead, sync_behind, ..." section). Two scripts, run from anywhere:
#   prof2.sh SPOOLD LOADGEN always|never OUT   — perf trace of syscalls >= 2 ms, thread counts
#   stall.sh SPOOLD LOADGEN OUT                 — e2e-always-linger, syscalls >= 10 ms

# ---- prof2.sh
# usage: prof2.sh SPOOLD LOADGEN FSYNC OUT : e2e 50 MB/s for 6 s; perf trace of syscalls >= 2 ms; thread counts every 0.5 s
set -u
SP=$1; LG=$2; FS=$3; OUT=$4; shift 4
D=$(mktemp -d /tmp/broker-exp/d.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:7190 --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 50); do grep -q "listening" $OUT.spoold.log && break; sleep 0.1; done
perf trace -p $SPID --duration 2 -o $OUT.slow.txt &
TPID=$!
$LG e2e --broker 127.0.0.1:7190 --fsync $FS --rate 48828 --record-size 1024 --acks written --duration 6 --warmup 1 --threads 1 --watch-pid $SPID "$@" > $OUT.loadgen.txt 2>&1 &
LPID=$!
: > $OUT.threads.txt
while kill -0 $LPID 2>/dev/null; do echo "$(date +%s.%N) $(ls /proc/$SPID/task | wc -l)" >> $OUT.threads.txt; sleep 0.5; done
wait $LPID
kill $TPID; wait $TPID 2>/dev/null
kill $SPID; wait $SPID
rm -rf $D
tail -2 $OUT.loadgen.txt

# ---- stall.sh
# e2e-always-linger once, perf trace of every spoold syscall >= 10 ms, and of the loadgen (bench-side) too
set -u
SP=$1; LG=$2; OUT=$3
D=$(mktemp -d /work/main/target/efficiency-tmp/stall.XXXX 2>/dev/null || mktemp -d /tmp/broker-exp/d.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:7190 --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 50); do grep -q "listening" $OUT.spoold.log && break; sleep 0.1; done
perf trace -p $SPID --duration 10 -o $OUT.slow.txt &
TPID=$!
$LG e2e --broker 127.0.0.1:7190 --fsync always --rate 48828 --record-size 1024 --acks written --linger-only --duration 3 --warmup 1 --threads 1 --watch-pid $SPID > $OUT.loadgen.txt 2>&1
kill $TPID; wait $TPID 2>/dev/null
kill $SPID; wait $SPID
rm -rf $D
echo "$(tail -1 $OUT.loadgen.txt | grep -o 'p99 [0-9]* p99.9 [0-9]* max [0-9]*')  slow: $(grep -v 'futex\|epoll_wait' $OUT.slow.txt | wc -l)"

# ---- stall2.sh (as stall.sh, but perf trace -a: every process's syscalls >= 10 ms)
# e2e-always-linger once, perf trace of every spoold syscall >= 10 ms, and of the loadgen (bench-side) too
set -u
SP=$1; LG=$2; OUT=$3
D=$(mktemp -d /work/main/target/efficiency-tmp/stall.XXXX 2>/dev/null || mktemp -d /tmp/broker-exp/d.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:7190 --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 50); do grep -q "listening" $OUT.spoold.log && break; sleep 0.1; done
perf trace -a --duration 10 -o $OUT.slow.txt &
TPID=$!; sleep 2
$LG e2e --broker 127.0.0.1:7190 --fsync always --rate 48828 --record-size 1024 --acks written --linger-only --duration 3 --warmup 1 --threads 1 --watch-pid $SPID > $OUT.loadgen.txt 2>&1
kill $TPID; wait $TPID 2>/dev/null
kill $SPID; wait $SPID
rm -rf $D
sleep 0; echo "$(tail -1 $OUT.loadgen.txt | grep -o 'p99 [0-9]* p99.9 [0-9]* max [0-9]*')  slow: $(grep -v 'futex\|epoll_wait' $OUT.slow.txt | wc -l)"

# ---- dirty.sh (e2e-always-linger 8 times under quiet-run, with the machine's dirty pages and disk writes per run)
# e2e-always-linger 8 times; before/after each: Dirty+Writeback (kB) and sectors written to vda; stall = max latency
SP=$1; LG=$2
for i in $(seq 8); do
  D=$(mktemp -d /tmp/broker-exp/d.XXXX)
  d0=$(awk '/^Dirty:|^Writeback:/ {s+=$2} END {print s}' /proc/meminfo); w0=$(awk '$3=="vda" {print $10}' /proc/diskstats)
  $SP --data-dir $D/data --listen 127.0.0.1:7190 --metrics-listen off --runtime-threads 1 2>$D/log &
  SPID=$!
  for j in $(seq 50); do grep -q listening $D/log && break; sleep 0.1; done
  $LG e2e --broker 127.0.0.1:7190 --fsync always --rate 48828 --record-size 1024 --acks written --linger-only --duration 3 --warmup 1 --threads 1 > $D/lg 2>&1
  kill $SPID; wait $SPID
  d1=$(awk '/^Dirty:|^Writeback:/ {s+=$2} END {print s}' /proc/meminfo); w1=$(awk '$3=="vda" {print $10}' /proc/diskstats)
  echo "run $i $(date -u +%T): $(tail -1 $D/lg | grep -o 'p50 [0-9]* p99 [0-9]* p99.9 [0-9]* max [0-9]*') | dirty+wb before ${d0} kB after ${d1} kB | MB written to vda $(( (w1-w0)/2048 ))"
  rm -rf $D
done
