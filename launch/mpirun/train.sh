#!/usr/bin/env bash
# A training job under OpenMPI's mpirun: one `swarmrun rank` per MPI process,
# identity from OMPI_COMM_WORLD_*, rendezvous over TCP on the hostfile's
# first host (rank 0 lands there), the job key exported to every rank with -x.
#
#   launch/mpirun/train.sh [-n N] [--hostfile FILE] [--port PORT] JOB.toml
#
# N defaults to the job file's slot count, FILE to launch/mpirun/hostfile,
# PORT to 29500. Makes a job key unless SWARMRUN_JOB_KEY is set; prints it
# so that others can join the run (swarmrun join ... --rdzv tcp://HOST:PORT).
# SWARMRUN is the binary (default: swarmrun on PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n= hostfile=$here/hostfile port=29500
while (($# > 1)); do
    case "$1" in
        -n) n=$2 ;;
        --hostfile) hostfile=$2 ;;
        --port) port=$2 ;;
        *) echo "train.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
job=${1:?usage: launch/mpirun/train.sh [-n N] [--hostfile FILE] [--port PORT] JOB.toml}
bin=${SWARMRUN:-swarmrun}
if [ -z "$n" ]; then
    n=$("$bin" check "$job" | sed -n 's/^job [^:]*: \([0-9]*\) ranks.*/\1/p')
fi
first=$(grep -v '^\s*\(#\|$\)' "$hostfile" | head -n 1 | awk '{print $1}')
if [ -z "${SWARMRUN_JOB_KEY:-}" ]; then
    SWARMRUN_JOB_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    echo "train.sh: job key $SWARMRUN_JOB_KEY (joiners need it)"
fi
export SWARMRUN_JOB_KEY
export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-1}
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
# swarmrun binds its ranks itself when asked (SWARMRUN_BIND); mpirun's own
# binding would pin every rank of an oversubscribed host to one core.
exec mpirun "${root[@]}" --oversubscribe --bind-to none -n "$n" --hostfile "$hostfile" \
    -x SWARMRUN_JOB_KEY -x CANDLE_NUM_THREADS \
    "$bin" rank --rdzv "tcp://$first:$port" "$job"
