#!/usr/bin/env bash
# Runs every test of swarmrun. Installs what the tests need first, when it is
# missing and we may: OpenMPI (integration tests under a real mpirun), hwloc,
# libclang and pkg-config (for the `mpi` and `hwloc` cargo features), and a
# one-node Slurm for the srun tests.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(openmpi-bin libopenmpi-dev libhwloc-dev libclang-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo -n); else sudo=(false); fi
    echo "test.sh: installing ${missing[*]}"
    if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"; }; then
        echo "test.sh: could not install ${missing[*]}; tests that need them will fail" >&2
    fi
fi

# A one-node Slurm for the srun tests (needs root).
if [ "$(id -u)" = 0 ] && [ -z "${SWARMRUN_SKIP_SLURM:-}" ]; then
    ./launch/slurm-local.sh || echo "test.sh: no local Slurm; the srun test will fail" >&2
fi

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
cargo fmt --all -- --check
# Default features need no system library; `mpi` builds against OpenMPI.
for features in "" "mpi"; do
    echo "test.sh: features [${features}]"
    cargo clippy --all-targets --locked --features "$features" -- -D warnings
    cargo test --all-targets --locked --features "$features"
done
