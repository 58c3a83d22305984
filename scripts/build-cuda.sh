#!/usr/bin/env bash
# Builds affq and examples/cuda_check with the cuda feature on a machine without a CUDA toolkit:
# NVRTC, ptxas and the CUDA headers come from NVIDIA's PyPI wheels (cached under
# target/cuda-toolchain), the kernels are compiled to PTX (compute_80: runs on Ampere and Hopper),
# assembled once for sm_90 as a check, and embedded in the binary. The binary needs only the
# NVIDIA driver (libcuda.so.1) where it runs.
#   scripts/build-cuda.sh              # build
#   scripts/build-cuda.sh --check-kit  # also prepare target/gpu-check/ (a W4A4 stories260K
#                                      # checkpoint + the WikiText-2 test text) for gpu-check.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
kit=target/cuda-toolchain
if [ ! -x "$kit/nvidia/cuda_nvcc/bin/ptxas" ] || [ ! -f "$kit/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pip download --no-deps -q -d "$tmp" nvidia-cuda-nvrtc-cu12==12.6.85 \
    nvidia-cuda-nvcc-cu12==12.6.85 nvidia-cuda-runtime-cu12==12.6.77
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$kit"; done
  chmod +x "$kit/nvidia/cuda_nvcc/bin/ptxas"
fi
mkdir -p target/cuda
LD_LIBRARY_PATH=$kit/nvidia/cuda_nvrtc/lib \
  python3 scripts/nvrtc-ptx.py src/kernels/cuda/int_kernels.cu target/cuda/int_kernels.ptx "$kit" compute_80
"$kit/nvidia/cuda_nvcc/bin/ptxas" -arch=sm_90 target/cuda/int_kernels.ptx -o target/cuda/int_kernels.sm_90.cubin
AFFQ_CUDA_PTX=$here/target/cuda/int_kernels.ptx \
  cargo build --release --quiet --features cuda --bin affq --example cuda_check
echo "built target/release/affq and target/release/examples/cuda_check with the cuda feature"

if [ "${1:-}" = --check-kit ]; then
  data=${AFFQ_DATA_DIR:-$here/../shared/data}
  out=target/gpu-check
  rm -rf "$out"
  mkdir -p "$out/data/wikitext-2-raw"
  cp "$data/wikitext-2-raw/wiki.test.raw" "$out/data/wikitext-2-raw/"
  AFFQ_DATA_DIR=$data target/release/affq quantize "$data/models/stories260K/hf" -o "$out/model" \
    --method flatquant --bits 4 --a-bits 4 --nsamples 8 --calib-seqlen 128 --epochs 2 > /dev/null
  echo "prepared $out (carry target/release/affq, target/release/examples/cuda_check and $out)"
fi
