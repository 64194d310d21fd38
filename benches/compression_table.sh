#!/usr/bin/env bash
# Issue 6's loss-versus-ratio table: the quickstart job (configs/quickstart.toml)
# trained for the same tokens, with the same seed, with each boundary setting
# below, one after the other on this machine; then one table row per setting
# from each run's metrics.jsonl.
#
#   cargo build --release && benches/compression_table.sh [SETTING...]
#
# SETTING is a row name (1x 8x 32x 128x 256x; all by default). Each run
# writes runs/quickstart-<name>/ (replaced if it exists). WINDOWS=N shortens
# every run for a quick look (the table is then not comparable to README's).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SWARMRUN:-target/release/swarmrun}
declare -A section=(
    [1x]=''
    [8x]='bottleneck = 64
quant = "int8"'
    [32x]='bottleneck = 28
quant = "int4"'
    [128x]='bottleneck = 4
quant = "int4"
zstd = true'
    [256x]='bottleneck = 1
quant = "int4"
zstd = true'
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(1x 8x 32x 128x 256x)
jobs=$(mktemp -d)
trap 'rm -rf "$jobs"' EXIT
for name in "${names[@]}"; do
    [ -n "${section[$name]+set}" ] || { echo "unknown setting $name" >&2; exit 2; }
    job="$jobs/$name.toml"
    sed -e "s/^name = \"quickstart\"/name = \"quickstart-$name\"/" \
        ${WINDOWS:+-e "s/^windows = .*/windows = $WINDOWS/"} configs/quickstart.toml >"$job"
    printf '\n[pipeline.compression]\n%s\n' "${section[$name]}" >>"$job"
    rm -rf "runs/quickstart-$name"
    echo "== $name: $(tr '\n' ' ' <<<"${section[$name]}")" >&2
    "$bin" launch "$job" >"$jobs/$name.log" 2>&1 || { cat "$jobs/$name.log" >&2; exit 1; }
done
python3 - "${names[@]}" <<'PY'
import json, sys
dense = 128 * 4  # f32 bytes of one token's 128-wide residual stream
rows = []
for name in sys.argv[1:]:
    lines = [json.loads(l) for l in open(f"runs/quickstart-{name}/metrics.jsonl")]
    val = [l for l in lines if l["val_loss"] is not None][-1]
    ratios = [l["compression"] or 1.0 for l in lines]
    ratio = len(ratios) / sum(1 / r for r in ratios)  # bytes-weighted mean
    tps = sum(l["tokens_per_s"] for l in lines) / len(lines)
    rows.append((name, ratio, dense / ratio, val["val_loss"], val["window"], tps))
base = rows[0][3] if rows[0][0] == "1x" else None
print("| setting | ratio | bytes/token | val loss (window) | vs 1x | tokens/s |")
print("|---|---:|---:|---:|---:|---:|")
for name, ratio, bpt, val, window, tps in rows:
    pen = f"{100 * (val / base - 1):+.1f}%" if base else "-"
    print(f"| {name} | {ratio:.1f}x | {bpt:.1f} | {val:.4f} ({window}) | {pen} | {tps:,.0f} |")
PY
