#!/usr/bin/env bash
# The GPU checks in one run: the GPU tests (the codec's kernels and a
# stage's passes against the CPU reference, a GPU pass replayed bit for
# bit, a short training job on GPU miners) and the GPU benchmarks.
#
#   launch/gpu-check.sh --build   here, with cargo: builds the release
#                                 binary and the GPU test binaries into
#                                 gpu-check/ (git-ignored), to carry to a
#                                 GPU machine that has no Rust toolchain
#   launch/gpu-check.sh           runs them (building first when cargo is
#                                 here and gpu-check/ is not)
#
# A GPU machine needs the CUDA driver, NVRTC, cuBLAS and NCCL (any of CUDA
# 12 or 13): the script finds their libraries and gives cudarc the names it
# dlopens. Without a GPU every test says "skipped" and passes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=gpu-check
tests=(gpu_stage gpu_nccl compress_nvrtc train_gpu)

build() {
    set -e
    cargo build --release --features cuda
    rm -rf "$out" && mkdir -p "$out"
    cargo test --release --features cuda --no-run --message-format=json \
        $(printf -- '--test %s ' "${tests[@]}") |
        jq -r 'select(.executable != null and .target.kind == ["test"]) | "\(.target.name) \(.executable)"' |
        while read -r name exe; do strip -o "$out/$name" "$exe"; done
    strip -o "$out/swarmrun" target/release/swarmrun
    cp configs/gpu.toml configs/quickstart.toml "$out/"
    ls -l "$out"
    set +e
}

if [[ "${1:-}" == --build ]]; then
    build
    exit
fi
if [[ ! -x "$out/swarmrun" ]]; then
    command -v cargo >/dev/null || { echo "gpu-check: no $out/ and no cargo to build it" >&2; exit 1; }
    build
fi

# cudarc dlopens libcublas.so / libnvrtc.so (or their CUDA 12 names); a
# CUDA 13 install has libcublas.so.13 and libnvrtc.so.13, perhaps only
# inside Python wheels: link the names it asks for.
libs=$(mktemp -d)
link_lib() {
    local name=$1 found
    found=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu \
        /opt /usr/local/lib -name "$name.so.[0-9]*" 2>/dev/null | grep -v stubs | sort -V | tail -1)
    if [[ -n "$found" ]]; then
        ln -sf "$found" "$libs/$name.so"
        LD_LIBRARY_PATH="$(dirname "$found"):$LD_LIBRARY_PATH"
        echo "gpu-check: $name -> $found"
    else
        echo "gpu-check: no $name found"
    fi
}
LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
for lib in libnvrtc libcublasLt libcublas libnccl; do link_lib "$lib"; done
export LD_LIBRARY_PATH="$libs:$LD_LIBRARY_PATH"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null ||
    echo "gpu-check: no nvidia-smi"

failed=0
started=$SECONDS
# The training tests start this binary, not the one of the build tree.
export SWARMRUN_TEST_BIN="$PWD/$out/swarmrun"
for t in "${tests[@]}"; do
    echo "== $t"
    [[ -x "$out/$t" ]] || { echo "gpu-check: no $out/$t"; failed=1; continue; }
    # Only the tests that run on a GPU: the others read the source tree.
    "$out/$t" gpu --test-threads=1 --nocapture || failed=1
done
echo "== swarmrun bench compress --device cuda"
"$out/swarmrun" bench compress --device cuda --rows 1048576 || failed=1
echo "== swarmrun bench train --device cuda"
"$out/swarmrun" bench train --device cuda --job "$out/quickstart.toml" || failed=1
echo "== swarmrun launch configs/gpu.toml (300 windows)"
run_dir=$(mktemp -d)
sed "s|^seed = 1337|seed = 1337\nrun_dir = \"$run_dir\"|" "$out/gpu.toml" >"$run_dir.toml"
"$out/swarmrun" launch "$run_dir.toml" >"$run_dir.log" 2>&1 || failed=1
grep -E "val_loss|error|panicked|stage passes" "$run_dir.log" | head -20
python3 - "$run_dir/metrics.jsonl" <<'PY' || failed=1
import json, statistics, sys
try:
    lines = [json.loads(l) for l in open(sys.argv[1])][10:]
except OSError as e:
    sys.exit(f"gpu-check: the training job left no metrics ({e})")
if not lines:
    sys.exit("gpu-check: the training job ended before its window 10 (its errors are above)")
print(f"windows 10-{lines[-1]['window']}: median {statistics.median(l['tokens_per_s'] for l in lines):.0f} tokens/s, "
      f"bubble {statistics.median(l['bubble'] for l in lines):.0%}, last loss {lines[-1]['loss']:.4f}, "
      f"replayed {sum(l['replayed'] for l in lines)}, caught {sorted({c for l in lines for c in l['caught']})}")
PY
echo "gpu-check: $((SECONDS - started)) s, $([[ $failed == 0 ]] && echo 'all passed' || echo 'FAILED')"
exit $failed
