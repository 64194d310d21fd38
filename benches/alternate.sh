#!/usr/bin/env bash
# Two variants of the quickstart trained for the same windows, alternating
# A, B, A, B, ... so both see the same machine; then tokens/s of each run
# (all windows after the first 10, from metrics.jsonl) and the ratio of the
# medians, B over A. The wrappers beside it name the variants:
# shm_vs_tcp.sh, slow_miner.sh.
#
#   benches/alternate.sh LABEL_A JOB_A LABEL_B JOB_B [PAIRS] [WINDOWS]
#
# PAIRS (default 3) runs of each; WINDOWS (default 200) windows a run.
# Tokens a window come from each job file's [pipeline] and [model].
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SWARMRUN:-target/release/swarmrun}
labels=("$1" "$3")
declare -A src=(["$1"]="$2" ["$3"]="$4")
pairs=${5:-3}
windows=${6:-200}
jobs=$(mktemp -d)
trap 'rm -rf "$jobs"' EXIT
# tokens/s of one run of job $2: its tokens after window 10 over their
# wall time.
rate() {
    python3 - "$1" "$2" <<'PY'
import json, sys, tomllib
lines = [json.loads(l) for l in open(sys.argv[1])]
job = tomllib.load(open(sys.argv[2], "rb"))
p = job["pipeline"]
per_window = p["microbatches_per_window"] * p["microbatch_size"] * job["model"]["block_size"]
start = next(l for l in lines if l["window"] == 9)["elapsed_s"]
timed = [l for l in lines if l["window"] >= 10]
print(f'{per_window * len(timed) / (timed[-1]["elapsed_s"] - start):.0f}')
PY
}
declare -A rates=(["$1"]="" ["$3"]="")
for i in $(seq 1 "$pairs"); do
    for label in "${labels[@]}"; do
        job="$jobs/$label-$i.toml"
        sed -e "s|^name = \".*\"|name = \"ab-$label-$i\"|" -e "s/^windows = .*/windows = $windows/" \
            -e "s/^eval_every = .*/eval_every = $((windows + 1))/" \
            -e "s/^checkpoint_every = .*/checkpoint_every = 0/" "${src[$label]}" >"$job"
        rm -rf "runs/ab-$label-$i"
        "$bin" launch "$job" >"$jobs/$label-$i.log" 2>&1 || { tail -20 "$jobs/$label-$i.log" >&2; exit 1; }
        r=$(rate "runs/ab-$label-$i/metrics.jsonl" "$job")
        rates[$label]="${rates[$label]} $r"
        echo "run $i $label: $r tokens/s"
        rm -rf "runs/ab-$label-$i"
    done
done
python3 - "${labels[0]}" ${rates[${labels[0]}]} -- "${labels[1]}" ${rates[${labels[1]}]} <<'PY'
import statistics, sys
args = sys.argv[1:]
cut = args.index("--")
a, b = args[:cut], args[cut + 1:]
ma, mb = statistics.median(map(float, a[1:])), statistics.median(map(float, b[1:]))
print(f"median tokens/s: {a[0]} {ma:.0f}, {b[0]} {mb:.0f}; {b[0]}/{a[0]} = {mb / ma:.2f}x")
PY
