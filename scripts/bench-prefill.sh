#!/usr/bin/env bash
# Prefill speed of W4A4 against full precision, side by side in one run, same threads:
#  - SmolLM2-135M at -p 2048: FP and the W4A4 FlatQuant checkpoint of scripts/bench-decode.sh;
#  - a synthetic Llama-3-8B-shaped stack (examples/synthetic_model.rs: 4096/14336, 32:8 heads,
#    random f16 weights, LAYERS blocks, SmolLM2's vocabulary): FP, W4A4 RTN (the integer kernels
#    alone) and W4A4 FlatQuant (its online transforms too; calibrated on a tiny budget, 1 × 128
#    tokens, --keep-trained: these weights are random, so training does not beat RTN and the
#    engine would deploy the RTN start; only the transforms' shapes matter for speed).
# Prints llama-bench-style rows (`affq bench --json`).
#   scripts/bench-prefill.sh [-p 2048] [-r 3] [-t 2] [-l 4]
# AFFQ_BIN (default target/release/affq); models cached under target/bench-prefill/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
p=2048; r=3; t=$(nproc); layers=4
while [ $# -gt 0 ]; do case $1 in -p) p=$2; shift 2;; -r) r=$2; shift 2;; -t) t=$2; shift 2;; -l) layers=$2; shift 2;; *) echo "unknown $1" >&2; exit 2;; esac; done
affq=${AFFQ_BIN:-$here/target/release/affq}
[ -x "$affq" ] || (cd "$here" && cargo build --release >&2)
gen=$here/target/release/examples/synthetic_model
[ -x "$gen" ] || (cd "$here" && cargo build --release --example synthetic_model >&2)
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
fp=$here/target/affq-models/smollm2
[ -d "$fp" ] || "$here/scripts/fetch-smollm2.sh" "$fp" >&2
c=$here/target/bench-prefill
mkdir -p "$c"
w4a4=$here/target/bench-decode/smollm2-w4a4
[ -d "$w4a4" ] || "$affq" quantize "$fp" -o "$w4a4" --method flatquant --bits 4 --a-bits 4 --weight-quantizer gptq >&2
s8=$c/synthetic-8b-$layers
[ -f "$s8/model.safetensors" ] || "$gen" 8b "$layers" "$s8" "$fp" >&2
[ -d "$s8-w4a4-rtn" ] || "$affq" quantize "$s8" -o "$s8-w4a4-rtn" --method rtn --bits 4 --a-bits 4 >&2
[ -d "$s8-w4a4-fq" ] || "$affq" quantize "$s8" -o "$s8-w4a4-fq" --method flatquant --bits 4 --a-bits 4 \
  --nsamples 1 --calib-seqlen 128 --epochs 1 --keep-trained >&2
echo "| model | kernels | pp$p t/s | × FP |"
echo "| --- | --- | ---: | ---: |"
# row NAME MODEL [FP_RATE]: prints the row; leaves the prefill rate in $c/rate.
row() {
  "$affq" bench "$2" -p "$p" -n 1 -r "$r" --threads "$t" --json | python3 -c "
import json,sys; v=json.load(sys.stdin); x=v['prefill_tok_per_s']; base=float(sys.argv[2] or x)
open(sys.argv[3], 'w').write(str(x))
print(f\"| {sys.argv[1]} | {v['kernels']} | {x:.2f} ± {v['prefill_tok_per_s_stddev']:.2f} | {x/base:.2f} |\")" "$1" "${3:-}" "$c/rate"
}
row "SmolLM2 FP" "$fp"; base=$(cat "$c/rate")
row "SmolLM2 W4A4 FlatQuant" "$w4a4" "$base"
row "8B-shaped ×$layers FP" "$s8"; base=$(cat "$c/rate")
row "8B-shaped ×$layers W4A4 RTN" "$s8-w4a4-rtn" "$base"
row "8B-shaped ×$layers W4A4 FlatQuant" "$s8-w4a4-fq" "$base"
