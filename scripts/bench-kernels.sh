#!/usr/bin/env bash
# Kernel benchmark (not a test): GOP/s of the fused W4A4 kernel, the kernel without the
# transform, candle's f32 matmul and the simulated path over the shapes of issue #6, plus the
# whole-model eval of a W4A4 SmolLM2 checkpoint with integer kernels against the f32 model.
#   scripts/bench-kernels.sh [W4A4_CHECKPOINT]
# AFFQ_KERNEL_ISA=scalar|avx2|avx512vnni forces a kernel.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
cargo run --release --quiet --example bench_kernels
model=${MODEL:-target/affq-models/smollm2}
ckpt=${1:-}
[ -n "$ckpt" ] || exit 0
cargo build --release --quiet
echo
echo "whole model, paper protocol, seqlen 2048, first 16 windows:"
for run in "$model simulate" "$ckpt simulate" "$ckpt int"; do
  set -- $run
  target/release/affq eval "$1" --seqlen 2048 --max-windows 16 --kernels "$2" | tail -1
done
