#!/usr/bin/env bash
# Quality table (benchmark, not a test): paper-protocol WikiText-2 PPL of SmolLM2-135M for a grid
# of schemes, each with RTN and the rotation baseline.
#   scripts/bench-quality.sh            # seqlen 512, first 8 windows (quick)
#   scripts/bench-quality.sh --full     # seqlen 2048, whole test split
# Env: MODEL (default target/affq-models/smollm2), AFFQ_DATA_DIR (default ../shared/data).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
model=${MODEL:-target/affq-models/smollm2}
evalflags=(--seqlen 512 --max-windows 8)
[ "${1:-}" = "--full" ] && evalflags=(--seqlen 2048)
cargo build --release --quiet
[ -f "$model/model.safetensors" ] || scripts/fetch-smollm2.sh "$model"
bin=target/release/affq
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ppl() { "$bin" eval "$1" "${evalflags[@]}" --json | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["ppl"])'; }

echo "SmolLM2-135M-Instruct (dequantized Q4_1 weights), WikiText-2 paper protocol, ${evalflags[*]}"
echo "weights: symmetric amax/7, per channel unless gN; activations: symmetric per token; KV: asymmetric per (token, head); no clipping"
printf '%-10s %10s %10s %14s\n' scheme rtn rotate "quantize s"
printf '%-10s %10s %10s\n' FP "$(ppl "$model")" -
while read -r name flags; do
  row=()
  secs=""
  for method in rtn rotate; do
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$bin" quantize "$model" -o "$work/q" --method "$method" $flags --force > /dev/null
    secs="$secs $(python3 -c "import time; print('%.1f' % (time.time() - $t0))")"
    row+=("$(ppl "$work/q")")
  done
  printf '%-10s %10s %10s %14s\n' "$name" "${row[0]}" "${row[1]}" "$secs"
done <<'GRID'
W8A8 --bits 8 --a-bits 8
W4A16 --bits 4
W4A16g64 --bits 4 --group-size 64
W3A16g64 --bits 3 --group-size 64
W4A8 --bits 4 --a-bits 8
W16A4 --bits 16 --a-bits 4
W4A4 --bits 4 --a-bits 4
W4A4KV4 --bits 4 --a-bits 4 --kv-bits 4
GRID

# FlatQuant with the CPU preset (calib/cpu.toml; calibrated on the WikiText-2 validation split
# unless the data directory has the train split).
echo
printf '%-10s %10s %14s\n' scheme flatquant "calibrate s"
while read -r name flags; do
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$bin" quantize "$model" -o "$work/q" --method flatquant $flags --force > /dev/null 2>&1
  secs=$(python3 -c "import time; print('%.0f' % (time.time() - $t0))")
  printf '%-10s %10s %14s\n' "$name" "$(ppl "$work/q")" "$secs"
done <<'GRID'
W4A16 --bits 4
W4A8 --bits 4 --a-bits 8
W4A4 --bits 4 --a-bits 4
W4A4KV4 --bits 4 --a-bits 4 --kv-bits 4
GRID
