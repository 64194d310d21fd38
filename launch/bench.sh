#!/usr/bin/env bash
# Runs the benchmark suite and rebuilds BENCHMARKS.md's suite tables and
# charts from what it measured (about 30 minutes on 2 cores). Each bench
# writes its tables with the machine's facts (cores, CPU, memcpy bandwidth
# measured in the run) to bench-results/NAME.json; `swarmrun bench report`
# then fills the section between <!-- bench NAME --> and <!-- /bench NAME -->
# of BENCHMARKS.md, and draws docs/bench/*.png. Nothing else should run on
# the machine meanwhile: the ratios are measured in one run, the absolute
# figures are only as good as the machine is quiet.
#
#   ./launch/bench.sh            the whole suite
#   ./launch/bench.sh sched trust    only these (the others keep their tables)
set -euo pipefail
cd "$(dirname "$0")/.."

out=${SWARMRUN_BENCH_OUT:-bench-results}
mkdir -p "$out"

# The MPI reference rows need the `mpi` feature (and OpenMPI); without it the
# suite runs, and the tables say which rows are missing.
features=()
transports=tcp,tcp-sealed,shm,shm-registered
if command -v mpicc >/dev/null && dpkg-query -W -f='${Status}' libopenmpi-dev 2>/dev/null | grep -q "install ok installed"; then
    features=(--features mpi)
    transports=$transports,mpi,mpi-tcp
fi
cargo build --release --locked "${features[@]}"
sw=./target/release/swarmrun

wanted=("$@")
wants() {
    ((${#wanted[@]} == 0)) && return 0
    local w
    for w in "${wanted[@]}"; do [ "$w" = "$1" ] && return 0; done
    return 1
}

start=$SECONDS
step() {
    local name=$1
    shift
    wants "$name" || return 0
    echo "== bench $name"
    local t=$SECONDS
    "$sw" bench "$@" --json "$out/$name.json"
    echo "== bench $name: $((SECONDS - t)) s"
}

step launch launch -n 16 --reps 5
step allreduce allreduce -n 4 --transport "$transports" --min 1K --max 64M --rounds 3
step compress compress
step train train --windows 30 --rounds 3
step sched sched
step trust trust --seeds 20 --probability 0.1
if [ "$(id -u)" = 0 ]; then
    step wan wan --windows 10
else
    echo "== bench wan: skipped (needs root for network namespaces)"
fi
if wants micro; then
    echo "== cargo bench --bench micro -- --quick"
    t=$SECONDS
    rm -rf "$out/criterion"
    CRITERION_HOME="$out/criterion" cargo bench --locked "${features[@]}" --bench micro -- --quick
    echo "== micro: $((SECONDS - t)) s"
fi

"$sw" bench report "$out" --into BENCHMARKS.md --charts docs/bench
echo "bench.sh: $((SECONDS - start)) s in all"
