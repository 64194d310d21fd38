#!/usr/bin/env bash
# What shared memory buys the quickstart over loopback TCP: the same job
# (configs/quickstart.toml, fabric "tcp"; configs/quickstart-shm.toml, fabric
# "shm"), alternated by benches/alternate.sh.
#
#   cargo build --release && benches/shm_vs_tcp.sh [PAIRS] [WINDOWS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec benches/alternate.sh tcp configs/quickstart.toml shm configs/quickstart-shm.toml "$@"
