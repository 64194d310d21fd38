#!/usr/bin/env bash
# The soak: proves the test suite passes every time on a busy machine.
#
#   launch/soak.sh [--suites N] [--repeat M] [--dir DIR]
#
# Clones this repository's HEAD into a fresh directory, keeps every core
# busy with `stress-ng --cpu <cores>` (installed from Debian's packages when
# missing), then
#   1. runs ./launch/test.sh N times in a row in the clone (default 5; the
#      first run builds everything from nothing, as CI does);
#   2. runs the training tests (tests/train_*.rs) M times (default 20);
#   3. runs the collective tests (tests/collective_*.rs) M times.
# Each run's output goes to DIR/logs (default: a new directory under /tmp);
# one line per run says how it ended and how long it took, and the last
# lines count the failures. Exits non-zero if any run failed. A test whose
# outcome follows the host's timing fails here, and then in CI.
set -euo pipefail

suites=5
repeat=20
dir=
while (($#)); do
    case "$1" in
        --suites) suites=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        *) echo "usage: launch/soak.sh [--suites N] [--repeat M] [--dir DIR]" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${dir:-$(mktemp -d /tmp/swarmrun-soak.XXXXXX)}
mkdir -p "$dir/logs"
clone=$dir/clone
rm -rf "$clone"
git clone -q "$repo" "$clone"
echo "soak: $(git -C "$clone" log -1 --format='%h %s' | cut -c1-72) in $clone; logs in $dir/logs"

if ! command -v stress-ng >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo -n); fi
    "${sudo[@]}" apt-get install -y -qq stress-ng >/dev/null
fi
cores=$(nproc)
stress-ng --cpu "$cores" --quiet &
stress=$!
trap 'kill "$stress" 2>/dev/null || true' EXIT
echo "soak: stress-ng --cpu $cores keeps every core busy (pid $stress)"

runs=0
fails=0
# soak_run NAME COMMAND...: one run in the clone, logged and timed.
soak_run() {
    local name=$1 started=$SECONDS rc=0
    shift
    (cd "$clone" && "$@") >"$dir/logs/$name.log" 2>&1 || rc=$?
    runs=$((runs + 1))
    if [ "$rc" = 0 ]; then
        echo "soak: $name passed in $((SECONDS - started)) s"
    else
        fails=$((fails + 1))
        echo "soak: $name FAILED (status $rc, $((SECONDS - started)) s): $dir/logs/$name.log"
    fi
}

tests_of() {
    local names=()
    for f in "$clone"/tests/"$1"_*.rs; do
        names+=(--test "$(basename "$f" .rs)")
    done
    printf '%s\n' "${names[@]}"
}
mapfile -t train < <(tests_of train)
mapfile -t collective < <(tests_of collective)

for i in $(seq 1 "$suites"); do
    soak_run "suite-$i" ./launch/test.sh
done
for i in $(seq 1 "$repeat"); do
    soak_run "train-$i" cargo test --locked "${train[@]}"
done
for i in $(seq 1 "$repeat"); do
    soak_run "collective-$i" cargo test --locked "${collective[@]}"
done

echo "soak: $((runs - fails)) of $runs runs passed under stress-ng --cpu $cores"
[ "$fails" = 0 ]
