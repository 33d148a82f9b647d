#!/usr/bin/env bash
# Idempotent produce vs plain produce on one fresh release spoold (issue 5's target: idempotent
# ≥ 95% of plain). Rounds interleave off / copy / on so machine noise hits all three alike;
# prints every run and the medians, and writes them to loadgen/results/.
#
#   loadgen/scripts/idempotence.sh [ROUNDS] [extra spool-loadgen produce flags…]
#
#   off:  plain produce, pre-encoded batches sent as they are
#   copy: plain produce, but every request copies its batch and rewrites the producer fields
#         and CRC (what stamping costs the load generator itself) — the control for `on`
#   on:   idempotent produce: producer id + per-partition sequences, checked by the broker
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
shift || true
cargo build --release -q -p spool-broker --bin spoold
cargo build --release -q -p spool-loadgen --bin spool-loadgen
cargo build --release -q -p spool-cli --bin spool
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/spoold --data-dir "$dir/data" --listen "127.0.0.1:$port" --metrics-listen off >"$dir/spoold.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$dir/spoold.log" && break; sleep 0.1; done
mkdir -p loadgen/results
out="loadgen/results/idempotence-$(date -u +%Y-%m-%dT%H%M%SZ).txt"
{
    echo "# idempotent vs plain produce, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD)"
    echo "# command: $0 $rounds $*; nproc $(nproc); $(uname -r)"
    for r in $(seq "$rounds"); do
        # Rotate the order each round, and give every run a fresh topic that is deleted after
        # it, so page-cache and writeback state do not favour one mode.
        case $((r % 3)) in
            0) order="off copy on" ;;
            1) order="copy on off" ;;
            *) order="on off copy" ;;
        esac
        for mode in $order; do
            topic="idem-$mode-$r"
            json=$(target/release/spool-loadgen produce --broker "127.0.0.1:$port" --topic "$topic" \
                --stamping "$mode" --json "$@" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))')
            echo "round $r $mode $json"
            target/release/spool --broker "127.0.0.1:$port" topic delete "$topic" >/dev/null
        done
    done
} | tee "$out"
python3 - "$out" <<'PY'
import json, sys, statistics
runs = {}
for line in open(sys.argv[1]):
    if line.startswith("round "):
        _, r, mode, js = line.split(" ", 3)
        rep = json.loads(js)
        if rep["errors"]:
            sys.exit(f"{mode} round {r}: {rep['errors']} failed requests: the figures would mean nothing")
        runs.setdefault(mode, []).append(rep["mb_per_s"])
med = {m: statistics.median(v) for m, v in runs.items()}
lines = [f"runs MB/s    " + "  ".join(f"{m} {[round(x) for x in v]}" for m, v in runs.items()),
         f"median MB/s  off {med['off']:.0f}  copy {med['copy']:.0f}  on {med['on']:.0f}",
         f"on/copy {med['on']/med['copy']:.3f}  on/off {med['on']/med['off']:.3f}"]
with open(sys.argv[1], "a") as f:
    for l in lines:
        print(l); f.write(l + "\n")
PY
