#!/bin/bash
# issue 14, 2026-12-07 (wakeups): per-request accounting of spoold at 50 MB/s end to end, fsync=never.
# acct.sh: perf stat (syscalls by kind, context switches, wake-ups; per thread) + /proc/<pid>/task/*/status
# prof.sh: the same run with 'perf record -F 4999 -g -p SPOOLD -- sleep 3' instead of perf stat.
# run1.sh / run2.sh: what ran under /work/team/quiet-run (acct, prof, then the efficiency bench A/B).

# ---- acct.sh
# usage: acct.sh SPOOLD LOADGEN FSYNC OUT [extra loadgen args]
# e2e at 50 MB/s, 1 KiB records; after 2 s, 3 s of per-thread accounting of spoold:
# context switches (/proc/.../status), syscalls by kind (perf stat tracepoints, per thread).
set -u
SP=$1; LG=$2; FS=$3; OUT=$4; shift 4
PORT=${PORT:-7193}
D=$(mktemp -d /tmp/wk/d.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:$PORT --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 100); do grep -q "listening" $OUT.spoold.log && break; sleep 0.05; done
$LG e2e --broker 127.0.0.1:$PORT --fsync $FS --rate 48828 --record-size 1024 --acks written --duration 5 --warmup 1 --threads 1 --watch-pid $SPID "$@" > $OUT.loadgen.txt 2>&1 &
LPID=$!
sleep 2.5
snap() { for t in /proc/$SPID/task/*; do echo "$(basename $t) $(cat $t/comm) $(awk '/^voluntary_ctxt/ {v=$2} /^nonvoluntary_ctxt/ {n=$2} END {print v, n}' $t/status) $(awk '{print $14+$15}' $t/stat)"; done; }
snap > $OUT.ctx0
EV=raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_readv,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendto,syscalls:sys_enter_futex,syscalls:sys_enter_pwrite64,syscalls:sys_enter_sync_file_range,sched:sched_switch,sched:sched_wakeup,context-switches
t0=$(date +%s.%N)
perf stat -e $EV --per-thread -p $SPID -x, -o $OUT.perfstat -- sleep 3 2>/dev/null
t1=$(date +%s.%N)
snap > $OUT.ctx1
wait $LPID
kill $SPID; wait $SPID 2>/dev/null
rm -rf $D
echo "window $(echo "$t1 - $t0" | bc)" > $OUT.window
tail -3 $OUT.loadgen.txt

# ---- prof.sh: acct.sh with the perf stat line replaced by
# perf record -F 4999 -g -p $SPID -o $OUT.prof.data -- sleep 3

# ---- rec.sh: acct.sh with the perf stat line replaced by
# perf record -e syscalls:sys_enter_futex,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,sched:sched_switch --call-graph dwarf,16384 -p $SPID -o $OUT.perf.data -- sleep 0.5

# ---- run2.sh
set -u
B=/tmp/perf-bins/main-7af5b8d
N=/tmp/perf-bins/$1
/tmp/wk/acct.sh $N/spoold $B/spool-loadgen never /tmp/wk/$1-never
/tmp/wk/prof.sh $N/spoold $B/spool-loadgen never /tmp/wk/$1-prof
$B/efficiency --bench --spoold $N/spoold --baseline $B/spoold --reps 5 --only e2e,fdatasync \
  --out-dir /work/wt-wakeups/benches/results --data-parent /work/wt-wakeups/target/efficiency-tmp
