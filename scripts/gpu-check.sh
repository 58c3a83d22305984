#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU, with the binaries of scripts/build-cuda.sh --check-kit
# (target/release/affq, target/release/examples/cuda_check, target/gpu-check/): the CUDA kernels
# against the CPU kernels and their throughput, then a whole-model eval on the CPU and on the GPU
# (the two must agree within the 0.5 % the integer path promises).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
target/release/examples/cuda_check
kit=target/gpu-check
if [ -d "$kit/model" ]; then
  export AFFQ_DATA_DIR=$kit/data
  for dev in cpu cuda; do
    target/release/affq eval "$kit/model" --seqlen 256 --max-windows 32 --device $dev --json > "$kit/$dev.json"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d["kernels"], "ppl %.4f" % d["ppl"], "%.0f tok/s" % d["tok_per_s"])' "$kit/$dev.json" $dev
  done
  python3 - "$kit" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{d}.json"))["ppl"] for d in ("cpu", "cuda"))
rel = abs(a - b) / a
print(f"whole model: cpu {a:.4f} vs cuda {b:.4f} ({100 * rel:.3f} %)")
sys.exit(0 if rel <= 0.005 else 1)
PY
fi
