#!/usr/bin/env bash
# Runs every Spool engine benchmark and writes a dated results file under benches/results/.
#
#   benches/run.sh [RUNS]        # RUNS full passes over all benches (default 1)
#
# Any SPOOL_BENCH_* variable is passed through (see docs/benchmarks.md), e.g.
#   SPOOL_BENCH_QUICK=1 benches/run.sh        # smoke test, ~30 s
#   SPOOL_BENCH_REPS=7 benches/run.sh 3       # 3 passes of 1 warm-up + 7 measured rounds
#   SPOOL_BENCH_ONLY=engine_never_1t,dd benches/run.sh   # a subset of cases
#   BENCHES="append read" benches/run.sh      # a subset of bench targets
#
# The file holds: the machine (nproc, free, lscpu, kernel, filesystem), the git commit,
# every per-sample line (stderr of the benches, with the CPU other processes used during
# each sample), each bench's table, and at the end the RESULT lines of all passes plus,
# with RUNS > 1, the median over passes of each figure.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-1}
benches=${BENCHES:-append read lookup recovery compaction}
mkdir -p benches/results
out="benches/results/$(date -u +%Y-%m-%dT%H%M%SZ).txt"

{
    echo "# Spool benchmarks, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- log-engine benches 2>/dev/null || echo ' (log-engine/ or benches/ modified)')"
    echo "command: benches/run.sh $* (runs=$runs, benches=$benches)"
    env | grep '^SPOOL_BENCH_' | sed 's/^/env: /' || true
    echo
    echo "## machine"
    echo "nproc: $(nproc)"
    free -h
    lscpu | head -n 15
    echo "kernel: $(uname -r)"
    mkdir -p target
    df -T target | tail -n 1 | awk '{print "filesystem of target/: " $2 " on " $1 " (" $7 ")"}'
    echo "dd: $(dd --version | head -n 1)"
    if command -v fio >/dev/null 2>&1; then
        echo "fio: $(fio --version)"
    else
        echo "fio: not installed (the fio baseline is skipped; apt-get install -y fio)"
    fi
    echo "loadavg at start: $(cat /proc/loadavg)"
    echo
} | tee "$out"

echo "## build" | tee -a "$out"
cargo bench -p spool-benches --no-run 2>&1 | tail -n 3 | tee -a "$out"

for run in $(seq 1 "$runs"); do
    for b in $benches; do
        {
            echo
            echo "## pass $run/$runs: $b ($(date -u +%H:%M:%S), loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
        } | tee -a "$out"
        cargo bench -q -p spool-benches --bench "$b" 2>&1 | sed "s/^RESULT /RESULT pass=$run /" | tee -a "$out"
    done
done

results=$(grep '^RESULT ' "$out" || true)
{
    echo
    echo "## loadavg at end: $(cat /proc/loadavg)"
    echo
    echo "## all RESULT lines"
    echo "$results"
} >> "$out"

if [ "$runs" -gt 1 ] && command -v python3 >/dev/null 2>&1; then
    python3 - "$out" <<'EOF' | tee -a "$out"
import re, statistics, sys
rows = {}
seen = set()
for line in open(sys.argv[1]):
    if line in seen:  # the "all RESULT lines" section repeats each line
        continue
    seen.add(line)
    m = re.match(r"RESULT pass=(\d+) (\S+) unit=(\S+) median=(\S+)", line)
    if m:
        rows.setdefault((m.group(2), m.group(3)), []).append(float(m.group(4)))
print("\n## median over passes of each figure's per-pass median [min-max over passes]")
for (key, unit), v in rows.items():
    print(f"SUMMARY {key} unit={unit} median={statistics.median(v):.4f} "
          f"min={min(v):.4f} max={max(v):.4f} passes={len(v)}")
EOF
fi
echo
echo "results written to $out"
