#!/usr/bin/env bash
# What shared memory buys the quickstart over loopback TCP: the same job
# (configs/quickstart.toml, fabric "tcp"; configs/quickstart-shm.toml, fabric
# "shm") trained for the same windows, alternating tcp, shm, tcp, shm, ... so
# both see the same machine; then tokens/s of each run (all windows after the
# first 10, from metrics.jsonl) and the ratio of the medians.
#
#   cargo build --release && benches/shm_vs_tcp.sh [PAIRS] [WINDOWS]
#
# PAIRS (default 3) runs of each; WINDOWS (default 200) windows a run.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SWARMRUN:-target/release/swarmrun}
pairs=${1:-3}
windows=${2:-200}
jobs=$(mktemp -d)
trap 'rm -rf "$jobs"' EXIT
# tokens/s of one run: its tokens after window 10 over their wall time.
rate() {
    python3 - "$1" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
start = next(l for l in lines if l["window"] == 9)["elapsed_s"]
timed = [l for l in lines if l["window"] >= 10]
tokens = 2 * 12 * 64 * len(timed)  # microbatches x batch x block, as the quickstart
print(f'{tokens / (timed[-1]["elapsed_s"] - start):.0f}')
PY
}
declare -A rates=([tcp]="" [shm]="")
for i in $(seq 1 "$pairs"); do
    for fabric in tcp shm; do
        src=configs/quickstart.toml
        [ "$fabric" = shm ] && src=configs/quickstart-shm.toml
        job="$jobs/$fabric-$i.toml"
        sed -e "s|^name = \".*\"|name = \"sv-$fabric-$i\"|" -e "s/^windows = .*/windows = $windows/" \
            -e "s/^eval_every = .*/eval_every = $((windows + 1))/" \
            -e "s/^checkpoint_every = .*/checkpoint_every = 0/" "$src" >"$job"
        rm -rf "runs/sv-$fabric-$i"
        "$bin" launch "$job" >"$jobs/$fabric-$i.log" 2>&1 || { tail -20 "$jobs/$fabric-$i.log" >&2; exit 1; }
        r=$(rate "runs/sv-$fabric-$i/metrics.jsonl")
        rates[$fabric]="${rates[$fabric]} $r"
        echo "run $i $fabric: $r tokens/s"
        rm -rf "runs/sv-$fabric-$i"
    done
done
python3 - ${rates[tcp]} -- ${rates[shm]} <<'PY'
import statistics, sys
args = sys.argv[1:]
cut = args.index("--")
tcp, shm = [float(x) for x in args[:cut]], [float(x) for x in args[cut + 1:]]
t, s = statistics.median(tcp), statistics.median(shm)
print(f"median tokens/s: tcp {t:.0f}, shm {s:.0f}; shm/tcp = {s / t:.2f}x")
PY
