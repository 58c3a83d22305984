#!/usr/bin/env bash
# The Q4_0 benchmark (not a test): affq's Q4_0 GGUF of SmolLM2 against llama.cpp's own
# `llama-quantize Q4_0` of the same F32 GGUF, with and without an importance matrix computed by
# `llama-imatrix` on the same calibration text and token budget as affq's GPTQ. Every PPL and KL
# divergence is measured by llama-perplexity itself (WikiText-2 test, --ctx 512, the first CHUNKS
# chunks; KLD against the F32 model's logits).
#   scripts/bench-gguf.sh            # run what is not cached, print the table
#   scripts/bench-gguf.sh --markdown # the cached table as Markdown (README)
# Env: MODEL (default target/affq-models/smollm2), AFFQ_BIN, LLAMA_BIN (default
#      target/llama.cpp/build/bin, built by scripts/build-llamacpp.sh), CHUNKS (default 100),
#      CALIB_CHUNKS (calibration windows of 512 tokens for both imatrix and GPTQ, default 32),
#      THREADS, RESULTS (cache directory, default target/bench-gguf/; delete a row's directory to
#      redo it), ROWS (a subset of the rows, f32 first).
#   MODEL=target/affq-models/qwen25-05b RESULTS=target/bench-gguf-qwen CHUNKS=30 \
#     ROWS="f32 llama-q4_0 llama-q4_0-imatrix affq-q4_0-rotate-gptq-gs" scripts/bench-gguf.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
model=${MODEL:-target/affq-models/smollm2}
bin=${AFFQ_BIN:-target/release/affq}
llama=${LLAMA_BIN:-target/llama.cpp/build/bin}
chunks=${CHUNKS:-100}
calib_chunks=${CALIB_CHUNKS:-32}
threads=${THREADS:-$(nproc)}
out=${RESULTS:-target/bench-gguf}
markdown=0
[ "${1:-}" = --markdown ] && markdown=1
test_txt=$AFFQ_DATA_DIR/wikitext-2-raw/wiki.test.raw
valid_txt=$AFFQ_DATA_DIR/wikitext-2-raw/wiki.valid.raw
mkdir -p "$out"

# Rows: name | how it is made (shell, writing $dir/model.gguf and $dir/quantize.seconds).
rows=(f32 llama-q4_0 llama-q4_0-imatrix affq-q4_0-rtn affq-q4_0-gptq affq-q4_0-gptq-clip affq-q4_0-rotate-gptq affq-q4_0-gptq-gs affq-q4_0-rotate-gptq-gs affq-q4_0-flatquant-gptq)
# ROWS="f32 llama-q4_0 …" runs a subset (f32 first: the others are scored against it).
[ -n "${ROWS:-}" ] && read -r -a rows <<< "$ROWS"
about() {
  case $1 in
    f32) echo "F32 (reference)" ;;
    llama-q4_0) echo "llama-quantize Q4_0" ;;
    llama-q4_0-imatrix) echo "llama-quantize Q4_0 --imatrix ($calib_chunks × 512 WikiText-2 validation tokens)" ;;
    affq-q4_0-rtn) echo "affq quantize --format gguf --bits 4 (RTN)" ;;
    affq-q4_0-gptq) echo "affq + --weight-quantizer gptq ($calib_chunks × 512 validation tokens)" ;;
    affq-q4_0-gptq-clip) echo "affq + gptq --weight-clip-search" ;;
    affq-q4_0-rotate-gptq) echo "affq --method rotate (merged only) + gptq" ;;
    affq-q4_0-gptq-gs) echo "affq + gptq --gptq-grid-search" ;;
    affq-q4_0-rotate-gptq-gs) echo "affq rotate (merged only) + gptq --gptq-grid-search, export --allow-lossy (F16 embedding/head)" ;;
    affq-q4_0-flatquant-gptq) echo "affq --method flatquant (merged only) + gptq" ;;
  esac
}
timed() {
  local t0 t1; t0=$(date +%s%N); "$@"; t1=$(date +%s%N)
  printf '%d.%03d\n' $(( (t1 - t0) / 1000000000 )) $(( (t1 - t0) / 1000000 % 1000 )) > "$dir/quantize.seconds"
}
make_row() {
  local name=$1 dir=$out/$1
  local f32=$out/f32/model.gguf
  local gptq=(--weight-quantizer gptq --calib wikitext2 --nsamples "$calib_chunks" --calib-seqlen 512)
  case $name in
    f32) timed "$bin" export "$model" -o "$dir/model.gguf" --type f32 --force ;;
    llama-q4_0) timed "$llama/llama-quantize" --token-embedding-type f16 "$f32" "$dir/model.gguf" Q4_0 "$threads" > "$dir/log" 2>&1 ;;
    llama-q4_0-imatrix)
      timed bash -c "'$llama/llama-imatrix' -m '$f32' -f '$valid_txt' -c 512 --chunks $calib_chunks -t $threads -o '$dir/imatrix.gguf' > '$dir/log' 2>&1 &&
        '$llama/llama-quantize' --imatrix '$dir/imatrix.gguf' --token-embedding-type f16 '$f32' '$dir/model.gguf' Q4_0 $threads >> '$dir/log' 2>&1" ;;
    affq-q4_0-rtn) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --format gguf --bits 4 --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --force >> '$dir/log'" ;;
    affq-q4_0-gptq) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --format gguf --bits 4 ${gptq[*]} --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --force >> '$dir/log'" ;;
    affq-q4_0-gptq-clip) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --format gguf --bits 4 ${gptq[*]} --weight-clip-search --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --force >> '$dir/log'" ;;
    affq-q4_0-gptq-gs) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --format gguf --bits 4 ${gptq[*]} --gptq-grid-search --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --force >> '$dir/log'" ;;
    affq-q4_0-rotate-gptq-gs) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --method rotate --format gguf --bits 4 ${gptq[*]} --gptq-grid-search --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --allow-lossy --force >> '$dir/log'" ;;
    affq-q4_0-flatquant-gptq) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --method flatquant --format gguf --bits 4 ${gptq[*]} --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --force >> '$dir/log'" ;;
    affq-q4_0-rotate-gptq) timed bash -c "'$bin' quantize '$model' -o '$dir/ckpt' --method rotate --format gguf --bits 4 ${gptq[*]} --force --json > '$dir/log' && '$bin' export '$dir/ckpt' -o '$dir/model.gguf' --force >> '$dir/log'" ;;
  esac
}
score() {
  local name=$1 dir=$out/$1
  if [ "$name" = f32 ]; then
    "$llama/llama-perplexity" -m "$dir/model.gguf" -f "$test_txt" -c 512 --chunks "$chunks" -t "$threads" \
      --kl-divergence-base "$out/f32.kld" > "$dir/ppl.log" 2>&1
  else
    "$llama/llama-perplexity" -m "$dir/model.gguf" -f "$test_txt" -c 512 --chunks "$chunks" -t "$threads" \
      --kl-divergence-base "$out/f32.kld" --kl-divergence > "$dir/ppl.log" 2>&1
  fi
}
if [ $markdown = 0 ]; then
  [ -x "$llama/llama-perplexity" ] || { echo "$llama: no llama.cpp tools (scripts/build-llamacpp.sh)" >&2; exit 2; }
  [ -n "${AFFQ_BIN:-}" ] || cargo build --release --quiet
  for name in "${rows[@]}"; do
    dir=$out/$name
    mkdir -p "$dir"
    [ -f "$dir/model.gguf" ] || { echo "== $name: making" >&2; make_row "$name"; }
    [ -f "$dir/ppl.log" ] && grep -qE "Final estimate|Mean PPL\(Q\)" "$dir/ppl.log" || { echo "== $name: scoring" >&2; score "$name"; }
  done
fi
# llama-perplexity prints "Final estimate: PPL = X +/- E" (without --kl-divergence) or a block of
# "Mean PPL(Q)/PPL(base)", "Mean    KLD:", "99.0%   KLD:", "Same top p:".
python3 - "$out" "$markdown" "${rows[@]}" <<'PY'
import os, re, sys
out, md, rows = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
def grab(text, pat):
    m = re.search(pat, text)
    return m.group(1) if m else "–"
lines = []
for r in rows:
    d = os.path.join(out, r)
    log = open(os.path.join(d, "ppl.log")).read() if os.path.exists(os.path.join(d, "ppl.log")) else ""
    secs = open(os.path.join(d, "quantize.seconds")).read().strip() if os.path.exists(os.path.join(d, "quantize.seconds")) else "–"
    size = os.path.getsize(os.path.join(d, "model.gguf")) / 1e6 if os.path.exists(os.path.join(d, "model.gguf")) else 0
    ppl = grab(log, r"Final estimate: PPL = ([0-9.]+)")
    if ppl == "–":
        ppl = grab(log, r"Mean PPL\(Q\)\s+:\s+([0-9.]+)")
    lines.append((r, ppl, grab(log, r"Mean\s+KLD:\s+([0-9.]+)"),
                  grab(log, r"99\.0%\s+KLD:\s+([0-9.]+)"), grab(log, r"Same top p:\s+([0-9.]+ ± [0-9.]+ %)"),
                  f"{size:.1f}", secs if secs == "–" else f"{float(secs):.1f}"))
head = ("row", "PPL", "mean KLD", "KLD p99", "same top-1", "MB", "make s")
if md:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for l in lines:
        print("| " + " | ".join(l) + " |")
else:
    print("%-22s %9s %9s %9s %16s %7s %8s" % head)
    for l in lines:
        print("%-22s %9s %9s %9s %16s %7s %8s" % l)
PY
