#!/usr/bin/env bash
# Two "clusters" on this machine and one training run across them: site a
# (network namespace NAME-a, 10.77.0.1) starts the job with `swarmrun
# launch`; site b (NAME-b, 10.77.0.2) joins it while it trains with
# `swarmrun join`, and later leaves on SIGTERM. Between them an emulated
# wide-area link (`swarmrun wan`): bandwidth capped by tc's tbf, delay,
# jitter and loss by a userspace bridge of ours (this kernel has no netem).
#
#   launch/two-sites.sh [options] JOB.toml
#     --name NAME        namespaces NAME-a, NAME-b, NAME-r (default: twosite)
#     --rate RATE        bandwidth each way, tc style (default: 100mbit)
#     --rtt-ms MS        round trip added (default: 50)
#     --jitter-ms MS     one-way delay varies by this much (default: 2)
#     --loss P           share of frames lost each way (default: 0)
#     --joiners N        miners site b starts (default: 2)
#     --join-after W     site b joins once window W is done (default: 2)
#     --leave-after W    site b leaves once window W is done (default: 5)
#     --port PORT        rendezvous port in site a (default: 29400)
#     --bin PATH         the swarmrun binary (default: target/release/swarmrun)
#     --out DIR          where the logs go (default: a new directory in /tmp)
#
# Needs root, ip, tc and ethtool. Exits with the job's status; site a's
# output is in DIR/site-a.log, site b's in DIR/site-b.log.
set -euo pipefail

name=twosite rate=100mbit rtt=50 jitter=2 loss=0 joiners=2 join_after=2 leave_after=5
port=29400 out=
bin=$(cd "$(dirname "$0")/.." && pwd)/target/release/swarmrun
while (($# > 1)); do
    case "$1" in
        --name) name=$2 ;;
        --rate) rate=$2 ;;
        --rtt-ms) rtt=$2 ;;
        --jitter-ms) jitter=$2 ;;
        --loss) loss=$2 ;;
        --joiners) joiners=$2 ;;
        --join-after) join_after=$2 ;;
        --leave-after) leave_after=$2 ;;
        --port) port=$2 ;;
        --bin) bin=$2 ;;
        --out) out=$2 ;;
        *) echo "two-sites.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
job=${1:?usage: launch/two-sites.sh [options] JOB.toml}
out=${out:-$(mktemp -d /tmp/two-sites.XXXXXX)}
mkdir -p "$out"
rdzv=tcp://10.77.0.1:$port

"$bin" wan up "$name" --rate "$rate" --rtt-ms "$rtt" --jitter-ms "$jitter" --loss "$loss"
site_a= site_b=
cleanup() {
    [ -n "$site_b" ] && kill "$site_b" 2>/dev/null || true
    [ -n "$site_a" ] && kill "$site_a" 2>/dev/null || true
    "$bin" wan down "$name"
}
trap cleanup EXIT

# One key for both sites: the job's secret, which joiners must hold.
SWARMRUN_JOB_KEY=$("$bin" keygen "$out/job.key" >/dev/null && cat "$out/job.key")
export SWARMRUN_JOB_KEY

# Waits until site a's log has COUNT lines matching PATTERN, or the job ended.
wait_for_line() {
    local pattern=$1 count=${2:-1}
    while [ "$(grep -c -- "$pattern" "$out/site-a.log" || true)" -lt "$count" ]; do
        if ! kill -0 "$site_a" 2>/dev/null; then
            echo "two-sites.sh: the job ended before '$pattern' appeared" >&2
            return 1
        fi
        sleep 0.1
    done
}

ip netns exec "$name-a" "$bin" launch --rdzv "$rdzv" "$job" >"$out/site-a.log" 2>&1 &
site_a=$!
wait_for_line "$(printf 'window %5d ' "$join_after")"
echo "two-sites.sh: window $join_after done; site b joins over $rate, ${rtt} ms, ${loss} loss"
ip netns exec "$name-b" "$bin" join --rdzv "$rdzv" -n "$joiners" --site b "$job" \
    >"$out/site-b.log" 2>&1 &
site_b=$!
wait_for_line "joined stage" "$joiners"
wait_for_line "$(printf 'window %5d ' "$leave_after")"
echo "two-sites.sh: window $leave_after done; site b leaves"
kill -TERM "$site_b"
left=0
wait "$site_b" || left=$?
site_b=
status=0
wait "$site_a" || status=$?
site_a=
grep -E "joined stage|left after" "$out/site-a.log" || true
echo "two-sites.sh: site b exited with $left, the job with $status; logs in $out"
[ "$left" = 0 ] || exit "$left"
exit "$status"
