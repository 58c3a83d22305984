#!/usr/bin/env bash
# Fuzz the readers (cargo-fuzz, libFuzzer; needs a nightly toolchain and `cargo install cargo-fuzz`).
#   scripts/fuzz.sh [MINUTES] [TARGET...]     # default 10 minutes each: safetensors gguf checkpoint
# Targets run in turn; crashes land in fuzz/artifacts/TARGET/. The corpus (fuzz/corpus/TARGET) is
# seeded from the shared test models and kept small (merged after each run).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here/fuzz"
minutes=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors gguf checkpoint)
data=${AFFQ_DATA_DIR:-$here/../shared/data}
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  case $t in
    safetensors) cp -n "$data"/models/stories260K/hf/model.safetensors "corpus/$t/stories" 2>/dev/null || true ;;
    gguf) for f in "$data"/models/stories260K/*.gguf; do [ -f "$f" ] && cp -n "$f" "corpus/$t/" ; done ;;
  esac
  cargo +nightly fuzz run "$t" -- -max_total_time=$((minutes * 60)) -rss_limit_mb=4096 -max_len=1048576
  # Keep the corpus minimal.
  mkdir -p "corpus/$t.min"
  cargo +nightly fuzz run "$t" -- -merge=1 "corpus/$t.min" "corpus/$t" > /dev/null 2>&1 || true
  rm -rf "corpus/$t" && mv "corpus/$t.min" "corpus/$t"
done
