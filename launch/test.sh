#!/usr/bin/env bash
# Runs every test of swarmrun. Installs what the tests need first, when it is
# missing and we may: OpenMPI (integration tests under a real mpirun), hwloc
# and libudev (the `hwloc` feature's hwlocality crate), libclang and
# pkg-config (for the `mpi` and `hwloc` cargo features), Chromium (the
# status page is tested in a real headless browser), a
# one-node Slurm for the srun tests, and pip's NVRTC wheel (the `cuda`
# feature's test compiles every kernels/*.cu with it, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(openmpi-bin libopenmpi-dev libhwloc-dev libudev-dev libclang-dev pkg-config ethtool iproute2 chromium)
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

# NVRTC from pip (no CUDA toolkit): cudarc dlopens libnvrtc.so.12, found
# through LD_LIBRARY_PATH.
nvrtc_wheel=nvidia-cuda-nvrtc-cu12==12.9.*
nvrtc_lib() {
    python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null
}
if ! nvrtc_dir=$(nvrtc_lib); then
    echo "test.sh: installing $nvrtc_wheel (pip)"
    python3 -m pip install -q "$nvrtc_wheel" 2>/dev/null ||
        python3 -m pip install -q --break-system-packages "$nvrtc_wheel" ||
        echo "test.sh: could not install $nvrtc_wheel; the NVRTC test will fail" >&2
    nvrtc_dir=$(nvrtc_lib) || nvrtc_dir=
fi
if [ -n "$nvrtc_dir" ]; then
    export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# Every part runs even when an earlier one failed, so one failure hides no
# other; the summary at the end has one line per part, and the status is
# non-zero when any part failed.
summary=()
failed=0

# Default features need no system library and run every test. The other
# features each change a few modules, and only their tests run again:
# `mpi` (built against OpenMPI) adds the MPI fabric and the MPI_Allreduce
# reference; `cuda` builds without a CUDA toolkit (NVRTC and the driver are
# loaded at run time) and changes only the codec; `hwloc` builds against
# the system hwloc and changes only CPU binding. Clippy sees every line of
# every feature in two passes: no features, and all of them (features only
# add code, and `not(feature)` code is in the first pass).
all_features=mpi,cuda,hwloc
feature_tests() {
    local features=$1
    case "$features" in
        "")
            cargo clippy --all-targets --locked -- -D warnings &&
                cargo test --all-targets --locked
            ;;
        "$all_features")
            cargo clippy --all-targets --locked --features "$features" -- -D warnings
            ;;
        mpi)
            cargo test --locked --features mpi --test launch_mpirun --test bench_allreduce
            ;;
        cuda)
            cargo test --locked --features cuda --lib compress &&
                cargo test --locked --features cuda --test 'compress_*'
            ;;
        hwloc)
            cargo test --locked --features hwloc --lib launch::bind &&
                cargo test --locked --features hwloc --test launch_bind --test cli --test launch_local
            ;;
    esac
}

# part NAME COMMAND...: runs COMMAND, timed, and records how it ended.
part() {
    local name=$1 started=$SECONDS rc=0
    shift
    echo "test.sh: $name"
    "$@" || rc=$?
    local took=$((SECONDS - started))
    if [ "$rc" = 0 ]; then
        summary+=("test.sh: $name passed (${took} s)")
    else
        summary+=("test.sh: $name FAILED with status $rc (${took} s)")
        failed=1
    fi
}

# Tests of what crosses sites build network namespaces: root only. They
# are #[ignore]d for a plain `cargo test`; here they run, or the summary
# says why not.
wan_tests() {
    cargo test --locked --test wan_two_sites -- --ignored
}

# Each fuzz target for a few seconds, from its committed seeds and
# regressions (new inputs go to a scratch corpus, so the committed one stays
# as it is). Needs nightly Rust and cargo-fuzz; `tests/fuzz_corpus.rs`
# replays the corpora on stable either way.
fuzz_seconds=${SWARMRUN_FUZZ_SECONDS:-8}
fuzz_targets() {
    local work t
    work=$(mktemp -d)
    (
        cd fuzz &&
            for t in $(cargo +nightly fuzz list); do
                mkdir -p "$work/$t" "regressions/$t" &&
                    cargo +nightly fuzz run -O "$t" "$work/$t" "corpus/$t" "regressions/$t" \
                        -- -max_total_time="$fuzz_seconds" -print_final_stats=1 || exit 1
            done
    )
    local rc=$?
    rm -rf "$work"
    return $rc
}

suite_started=$SECONDS
part "cargo fmt --check" cargo fmt --all -- --check
part "cargo doc (warnings are errors)" env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked
for features in "" "$all_features" "mpi" "cuda" "hwloc"; do
    part "features [${features}]" feature_tests "$features"
done
if [ "$(id -u)" = 0 ] && ip netns add swarmrun-probe 2>/dev/null; then
    ip netns del swarmrun-probe
    part "emulated WAN (network namespaces)" wan_tests
else
    summary+=("test.sh: emulated WAN (network namespaces) SKIPPED: needs root and ip netns")
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly' &&
    { command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz; }; then
    part "fuzz (${fuzz_seconds} s per target)" fuzz_targets
else
    summary+=("test.sh: fuzz SKIPPED: needs nightly Rust and cargo-fuzz")
fi

printf '%s\n' "${summary[@]}"
echo "test.sh: $((SECONDS - suite_started)) s in all; $([ "$failed" = 0 ] && echo "every part passed" || echo "some part FAILED")"
exit "$failed"
