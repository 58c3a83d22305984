#!/usr/bin/env bash
# Decode and prefill speed side by side in one run, same threads: `affq bench` on SmolLM2 FP and
# its W4A4 / W4A4KV4 FlatQuant checkpoints against llama.cpp's llama-bench on the F32, F16 and
# Q4_0 GGUF exports of the same model and the Q4_1 GGUF it comes from. Prints llama-bench rows.
#   scripts/bench-decode.sh [-p 512] [-n 128] [-r 5] [-t 2]
# AFFQ_BIN (default target/release/affq); checkpoints cached under target/bench-decode/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
p=512; n=128; r=5; t=$(nproc)
while [ $# -gt 0 ]; do case $1 in -p) p=$2; shift 2;; -n) n=$2; shift 2;; -r) r=$2; shift 2;; -t) t=$2; shift 2;; *) echo "unknown $1" >&2; exit 2;; esac; done
affq=${AFFQ_BIN:-$here/target/release/affq}
[ -x "$affq" ] || (cd "$here" && cargo build --release >&2)
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
bin=$("$here/scripts/build-llamacpp.sh")
fp=$here/target/affq-models/smollm2
[ -d "$fp" ] || "$here/scripts/fetch-smollm2.sh" "$fp" >&2
c=$here/target/bench-decode
mkdir -p "$c"
for ty in f32 f16; do
  [ -f "$c/smollm2-$ty.gguf" ] || "$affq" export "$fp" --format gguf --type $ty -o "$c/smollm2-$ty.gguf" >&2
done
[ -f "$c/smollm2-q4_0.gguf" ] || "$bin/llama-quantize" "$c/smollm2-f32.gguf" "$c/smollm2-q4_0.gguf" q4_0 >/dev/null 2>&1
q41=$here/target/affq-models/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
for kv in "" 4; do
  out=$c/smollm2-w4a4${kv:+kv$kv}
  [ -d "$out" ] || "$affq" quantize "$fp" -o "$out" --method flatquant --bits 4 --a-bits 4 ${kv:+--kv-bits $kv} --weight-quantizer gptq >&2
done
echo "| runtime | model | test | t/s |"
echo "| --- | --- | ---: | ---: |"
for m in "$fp" "$c/smollm2-w4a4" "$c/smollm2-w4a4kv4"; do
  "$affq" bench "$m" -p "$p" -n "$n" -r "$r" --threads "$t" --json | python3 -c "
import json,sys; v=json.load(sys.stdin); name=sys.argv[1]
print(f\"| affq ({v['kernels']}) | {name} | pp{v['prompt_tokens']} | {v['prefill_tok_per_s']:.2f} ± {v['prefill_tok_per_s_stddev']:.2f} |\")
print(f\"| affq ({v['kernels']}) | {name} | tg{v['gen_tokens']} | {v['decode_tok_per_s']:.2f} ± {v['decode_tok_per_s_stddev']:.2f} |\")
print(f\"|  | {name}: peak RSS {v['peak_rss_mb']:.0f} MiB, KV {v['kv_bytes_per_token']} B/token |  |  |\")" "$(basename "$m")"
done
for g in "$c/smollm2-f32.gguf" "$c/smollm2-f16.gguf" "$c/smollm2-q4_0.gguf" "$q41"; do
  "$bin/llama-bench" -m "$g" -p "$p" -n "$n" -r "$r" -t "$t" -o json 2>/dev/null | python3 -c "
import json,sys; name=sys.argv[1]
for x in json.load(sys.stdin):
    test = f\"pp{x['n_prompt']}\" if x['n_prompt'] else f\"tg{x['n_gen']}\"
    print(f\"| llama.cpp | {name} | {test} | {x['avg_ts']:.2f} ± {x['stddev_ts']:.2f} |\")" "$(basename "$g")"
done
