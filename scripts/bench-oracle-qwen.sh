#!/usr/bin/env bash
# Exactness oracle for the second model family: llama.cpp's llama-perplexity on an F32 copy of the
# Qwen2.5-Coder-0.5B GGUF against `affq eval --protocol llamacpp` of the same GGUF imported in f32,
# same text (WikiText-2 test), same context and chunk count, same threads. Prints both PPLs and
# their relative difference.
#   scripts/bench-oracle-qwen.sh [CHUNKS] [CTX]        (defaults: 8 chunks of 512 tokens)
# Needs ../shared/data (or AFFQ_DATA_DIR); fetches the model (scripts/fetch-qwen25-05b.sh) and
# builds llama.cpp (scripts/build-llamacpp.sh) into target/ on first use.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
chunks=${1:-8}
ctx=${2:-512}
threads=${THREADS:-$(nproc)}
data=${AFFQ_DATA_DIR:-$here/../shared/data}
bin=${AFFQ_BIN:-$here/target/release/affq}
models=$here/target/affq-models
gguf=$models/qwen25-05b-gguf/Qwen2.5-Coder-0.5B-Instruct.gguf
[ -f "$gguf" ] || "$here/scripts/fetch-qwen25-05b.sh" >&2
lbin=$("$here/scripts/build-llamacpp.sh")
f32=$models/qwen25-05b-gguf/Qwen2.5-Coder-0.5B-Instruct.F32.gguf
if [ ! -f "$f32" ]; then
  "$lbin/llama-quantize" --allow-requantize "$gguf" "$f32.part" F32 >&2
  mv "$f32.part" "$f32"
fi
hf=$models/qwen25-05b-f32
[ -f "$hf/model.safetensors" ] || "$bin" import "$gguf" -o "$hf" --dtype f32 --force >&2
text=$data/wikitext-2-raw/wiki.test.raw
l=$("$lbin/llama-perplexity" -m "$f32" -f "$text" -c "$ctx" --chunks "$chunks" -t "$threads" 2>&1 \
  | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
a=$(AFFQ_DATA_DIR=$data "$bin" eval "$hf" --protocol llamacpp --seqlen "$ctx" --max-windows "$chunks" \
  --threads "$threads" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])')
python3 - "$l" "$a" "$chunks" "$ctx" <<'PY'
import sys
l, a, chunks, ctx = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"Qwen2.5-Coder-0.5B F32, WikiText-2 test, {chunks} chunks x {ctx}: "
      f"llama-perplexity {l:.4f}  affq --protocol llamacpp {a:.6f}  relative {100 * (a - l) / l:+.4f} %")
PY
