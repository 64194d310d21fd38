#!/usr/bin/env bash
# Formation trials: starts every rank of a hello job by hand with
# `swarmrun rank` (RANK and WORLD_SIZE set, as mpirun or srun would), all
# at once or each after a random delay, and checks that every trial forms
# one world: each rank passes the barrier and the ring and exits 0, and no
# trial hangs (a trial not done in --limit seconds fails).
#
#   launch/formation.sh [--trials N] [--ranks N] [--spread SECONDS] [--limit SECONDS] [--bin PATH]
#
# --spread 0 (the default) starts all ranks at once; --spread 5 starts each
# after a random delay below 5 s, so they come in a random order. One line
# per trial; exit status 0 only when every trial formed one world.
set -euo pipefail
cd "$(dirname "$0")/.."

trials=10 ranks=8 spread=0 limit=120 bin=target/release/swarmrun
while (($#)); do
    case "$1" in
        --trials) trials=$2; shift 2 ;;
        --ranks) ranks=$2; shift 2 ;;
        --spread) spread=$2; shift 2 ;;
        --limit) limit=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        *) echo "formation.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -x "$bin" ] || { echo "formation.sh: no $bin (cargo build --release)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SWARMRUN_JOB_KEY
SWARMRUN_JOB_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

failed=0
for trial in $(seq 1 "$trials"); do
    dir=$work/$trial
    mkdir -p "$dir"
    # A port below the ephemeral range, as launch::free_port draws them.
    port=$((20000 + RANDOM % 12000))
    cat >"$dir/job.toml" <<EOF
[job]
name = "formation"
task = "hello"

[[site]]
name = "local"
hosts = "localhost"
ranks_per_host = $ranks

[network]
rendezvous = "tcp://127.0.0.1:$port"

[hello]
rounds = 3
EOF
    started=$SECONDS
    pids=()
    for rank in $(seq 0 $((ranks - 1))); do
        delay=0
        if [ "$spread" != 0 ]; then
            delay=$(awk -v s="$spread" -v r="$RANDOM" 'BEGIN { printf "%.3f", s * r / 32768 }')
        fi
        (
            sleep "$delay"
            RANK=$rank WORLD_SIZE=$ranks exec timeout -k 5 "$limit" \
                "$bin" rank "$dir/job.toml" >"$dir/out.$rank" 2>"$dir/err.$rank"
        ) &
        pids+=($!)
    done
    statuses=()
    for pid in "${pids[@]}"; do
        rc=0
        wait "$pid" || rc=$?
        statuses+=("$rc")
    done
    passed=$(cat "$dir"/out.* | grep -c "barrier passed" || true)
    took=$((SECONDS - started))
    bad=$(printf '%s\n' "${statuses[@]}" | grep -vc '^0$' || true)
    if [ "$bad" = 0 ] && [ "$passed" = "$ranks" ]; then
        echo "formation: trial $trial: one world of $ranks ranks in ${took} s"
    else
        failed=$((failed + 1))
        echo "formation: trial $trial FAILED after ${took} s: exit statuses ${statuses[*]} (124: hung), $passed of $ranks passed the barrier"
        tail -n 3 "$dir"/err.* | sed 's/^/  /'
    fi
done
echo "formation: $((trials - failed)) of $trials trials formed one world (spread ${spread} s, $ranks ranks)"
[ "$failed" = 0 ]
