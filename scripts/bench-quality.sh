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

# Calibrated methods and GPTQ (calibrated on the WikiText-2 validation split unless the data
# directory has the train split; CPU presets calib/cpu.toml, calib/affinequant-cpu.toml).
# ONLY=regex restricts the rows (e.g. ONLY='W4A4' or ONLY='affinequant').
echo
printf '%-10s %-12s %-5s %10s %12s\n' scheme method wq ppl "calibrate s"
while read -r name method wq flags; do
  [[ "$name $method $wq" =~ ${ONLY:-.} ]] || continue
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  if "$bin" quantize "$model" -o "$work/q" --method "$method" --weight-quantizer "$wq" $flags --force > "$work/log" 2>&1; then
    secs=$(python3 -c "import time; print('%.0f' % (time.time() - $t0))")
    printf '%-10s %-12s %-5s %10s %12s\n' "$name" "$method" "$wq" "$(ppl "$work/q")" "$secs"
  else
    printf '%-10s %-12s %-5s %10s\n' "$name" "$method" "$wq" "failed: $(tail -1 "$work/log")"
  fi
done <<'GRID'
W4A16 rtn gptq --bits 4
W3A16g64 rtn gptq --bits 3 --group-size 64
W2A16g64 rtn gptq --bits 2 --group-size 64
W4A4 rtn gptq --bits 4 --a-bits 4
W4A16 rotate gptq --bits 4
W3A16g64 rotate gptq --bits 3 --group-size 64
W2A16g64 rotate gptq --bits 2 --group-size 64
W4A4 rotate gptq --bits 4 --a-bits 4
W4A16 flatquant rtn --bits 4
W4A16 flatquant gptq --bits 4
W4A8 flatquant rtn --bits 4 --a-bits 8
W4A4 flatquant rtn --bits 4 --a-bits 4
W4A4 flatquant gptq --bits 4 --a-bits 4
W4A4KV4 flatquant rtn --bits 4 --a-bits 4 --kv-bits 4
W4A16 affinequant rtn --recipe affinequant-w4a16
W4A16 affinequant gptq --recipe affinequant-w4a16
W3A16g64 affinequant rtn --recipe affinequant-w3a16-g64
W3A16g64 affinequant gptq --recipe affinequant-w3a16-g64
W2A16g64 affinequant rtn --recipe affinequant-w3a16-g64 --bits 2
W2A16g64 affinequant gptq --recipe affinequant-w3a16-g64 --bits 2
W4A4 affinequant rtn --recipe affinequant-w4a4
W4A4 affinequant gptq --recipe affinequant-w4a4
GRID
