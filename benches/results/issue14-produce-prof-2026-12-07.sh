#!/bin/bash
# issue 14 (produce), 2026-12-07: prof.sh (per-thread CPU + perf record -g of spoold during spool-loadgen produce) and, below, trace.sh (perf trace -s of spoold and the load generator).
# usage: prof.sh SPOOLD LOADGEN OUT [loadgen produce args...]
# spoold 1 runtime worker; loadgen produce for 4 s (1 s warmup); per-thread CPU of spoold and
# loadgen over the run; perf record -g of spoold (and loadgen) for 3 s in the middle.
set -u
SP=$1; LG=$2; OUT=$3; shift 3
D=$(mktemp -d /work/wt-produce/target/prof.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:7191 --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 50); do grep -q "listening" $OUT.spoold.log && break; sleep 0.1; done
snap() { for t in /proc/$1/task/*; do echo "$(basename $t) $(cat $t/comm | tr ' ' _) $(sed 's/.*) //' $t/stat | cut -d' ' -f12,13) $(grep -E '^(voluntary|nonvoluntary)_ctxt' $t/status | awk '{print $2}' | tr '\n' ' ')"; done; }
$LG produce --broker 127.0.0.1:7191 --duration 4 --warmup 1 --threads 1 --prefault-bytes ${PREFAULT:-3221225472} --watch-pid $SPID "$@" > $OUT.loadgen.txt 2>&1 &
LPID=$!
sleep 1.2
snap $SPID > $OUT.t0
if [ "${PERF:-1}" = 1 ]; then perf record -g -F 999 -p $SPID -o $OUT.perf.data -- sleep 3 2>/dev/null >/dev/null; else sleep 3; fi
snap $SPID > $OUT.t1
wait $LPID
kill $SPID; wait $SPID
rm -rf $D
cat $OUT.loadgen.txt
# per-thread CPU delta (ticks) grouped by comm (threads born mid-window count from 0)
python3 - $OUT.t0 $OUT.t1 <<'PY'
import sys,collections
def rd(f):
    d={}
    for l in open(f):
        p=l.split()
        if len(p)>=6: d[p[0]]=(p[1],int(p[2])+int(p[3]),int(p[4]),int(p[5]))
    return d
a,b=rd(sys.argv[1]),rd(sys.argv[2])
g=collections.defaultdict(lambda:[0,0,0,0])
for t,(c,cpu,v,n) in b.items():
    c0,cpu0,v0,n0=a.get(t,(c,0,0,0))
    x=g[c]; x[0]+=cpu-cpu0; x[1]+=v-v0; x[2]+=n-n0; x[3]+=1
for c,x in sorted(g.items(),key=lambda kv:-kv[1][0]):
    print(f"{c:24s} {x[0]:6d} ticks/3s {x[1]:8d} vol {x[2]:8d} invol  threads {x[3]}")
PY
#!/bin/bash
# usage: trace.sh SPOOLD LOADGEN OUT [loadgen args]: perf trace -s of spoold and loadgen for 2 s mid-run
set -u
SP=$1; LG=$2; OUT=$3; shift 3
D=$(mktemp -d /work/wt-produce/target/prof.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:7191 --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 50); do grep -q "listening" $OUT.spoold.log && break; sleep 0.1; done
$LG produce --broker 127.0.0.1:7191 --duration 4 --warmup 1 --threads 1 --prefault-bytes 3221225472 --watch-pid $SPID "$@" > $OUT.loadgen.txt 2>&1 &
LPID=$!
sleep 2.5
perf trace -s -p $SPID,$LPID -o $OUT.trace.txt -- sleep 2 >/dev/null 2>&1
wait $LPID
kill $SPID; wait $SPID
rm -rf $D
cat $OUT.loadgen.txt

# ---- offcpu.sh (perf record -e sched:sched_switch -g of spoold for 1.5 s mid-run)
#!/bin/bash
set -u
SP=$1; LG=$2; OUT=$3; shift 3
D=$(mktemp -d /work/wt-produce/target/prof.XXXX)
$SP --data-dir $D/data --listen 127.0.0.1:7191 --metrics-listen off --runtime-threads 1 2>$OUT.spoold.log &
SPID=$!
for i in $(seq 50); do grep -q "listening" $OUT.spoold.log && break; sleep 0.1; done
$LG produce --broker 127.0.0.1:7191 --duration 4 --warmup 1 --threads 1 --prefault-bytes 3221225472 --watch-pid $SPID "$@" > $OUT.loadgen.txt 2>&1 &
LPID=$!
sleep 2.5
perf record -e sched:sched_switch -g -p $SPID -o $OUT.sw.data -- sleep 1.5 >/dev/null 2>&1
wait $LPID
kill $SPID; wait $SPID
rm -rf $D
cat $OUT.loadgen.txt | cut -c1-80
