#!/usr/bin/env bash
# What one miner five times slower than the others costs the quickstart:
# the same job with and without `[[faults.slow]] rank = 3, factor = 5.0`
# (rank 3 mines stage 1; it waits out four times its compute after each
# pass), alternated by benches/alternate.sh. Routing sends it fewer
# microbatches as its pass times come in.
#
#   cargo build --release && benches/slow_miner.sh [PAIRS] [WINDOWS]
set -euo pipefail
cd "$(dirname "$0")/.."
slow=$(mktemp --suffix=.toml)
trap 'rm -f "$slow"' EXIT
{ cat configs/quickstart.toml; printf '\n[[faults.slow]]\nrank = 3\nfactor = 5.0\n'; } >"$slow"
benches/alternate.sh healthy configs/quickstart.toml slow "$slow" "$@"
