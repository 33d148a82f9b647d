#!/bin/bash
# One traced e2e-always run: trace-run.sh NAME SPOOLD [linger] ; perf trace of spoold's system calls
# (pwritev appends, fdatasync, socket reads/writes), spool-loadgen e2e at 50 MB/s, fsync=always, acks=written.
set -u
name=$1; bin=$2; mode=${3:-reply}
T=/work/wt-syncfast/target
d=$T/syncfast-tmp/$name; rm -rf $d; mkdir -p $d
port=$((17000 + RANDOM % 1000))
perf trace -e fdatasync,pwritev,pwrite64,writev,sendmsg,recvfrom,recvmsg,read,write -o /tmp/syncfast/tr/$name.trace -- $bin --data-dir $d --listen 127.0.0.1:$port --metrics-listen off --runtime-threads 1 > /tmp/syncfast/tr/$name.spoold.log 2>&1 &
pt=$!
sleep 1.5
extra=""; [ "$mode" = linger ] && extra="--linger-only"
/tmp/perf-bins/main-15ff07c/spool-loadgen e2e --broker 127.0.0.1:$port --fsync always --rate 48828 --record-size 1024 --acks written --linger-ms 1 $extra --duration 4s --warmup 1s --threads 1 > /tmp/syncfast/tr/$name.lg.log 2>&1
kill -TERM $(pgrep -P $pt) 2>/dev/null; wait $pt
rm -rf $d
tail -1 /tmp/syncfast/tr/$name.lg.log | cut -c1-200
#!/bin/bash
# Breakdown A/B: traced e2e-always runs alternating main's spoold and this branch's.
cd /tmp/syncfast
for i in 1 2; do
  ./trace-run.sh main-$i /tmp/perf-bins/main-15ff07c/spoold
  ./trace-run.sh new-$i /tmp/syncfast/spoold-new
done
