#!/usr/bin/env bash
# Quality table (benchmark, not a test): paper-protocol WikiText-2 PPL of SmolLM2-135M for a grid of
# scheme × method × weight quantizer, with the wall time of each quantization.
#   scripts/bench-quality.sh            # seqlen 512, first 8 windows (quick column)
#   scripts/bench-quality.sh --full     # also seqlen 2048 over the whole test split (~7 min per row)
#   scripts/bench-quality.sh --full-only  # only the 2048 column, for rows already quantized
#   scripts/bench-quality.sh --table    # print what is cached, run nothing
#   scripts/bench-quality.sh --markdown # the same as a Markdown table (README)
#   scripts/bench-quality.sh --qwen [..] # the second model, Qwen2.5-Coder-0.5B-Instruct, its own grid
#                                        # and cache (target/bench-quality-qwen/); --qwen comes first
# Every row is cached under $RESULTS (default target/bench-quality/<row>/): the checkpoint, the
# quantize time and each PPL. A rerun skips what is there, so an interrupted run goes on where it
# stopped; delete a row's directory to redo it.
# Env: MODEL (default target/affq-models/smollm2), AFFQ_DATA_DIR (default ../shared/data), AFFQ_BIN,
#      ONLY=regex restricts the rows (matched against "scheme method wq"), RAYON_NUM_THREADS.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
model=${MODEL:-target/affq-models/smollm2}
results=${RESULTS:-target/bench-quality}
which=smollm2
if [ "${1:-}" = --qwen ]; then
  shift
  which=qwen
  model=${MODEL:-target/affq-models/qwen25-05b}
  results=${RESULTS:-target/bench-quality-qwen}
fi
full=0 run=1 quantize=1 markdown=0
case "${1:-}" in
  --markdown) run=0 markdown=1 ;;
  --full) full=1 ;;
  --full-only) full=1 quantize=0 ;;
  --table) run=0 ;;
  "") ;;
  *) echo "usage: $0 [--full|--full-only|--table|--markdown]" >&2; exit 2 ;;
esac
# AFFQ_BIN: a prebuilt binary (e.g. a copy, so a long run is not rebuilt under it).
bin=${AFFQ_BIN:-target/release/affq}
if [ $run = 1 ]; then
  [ -n "${AFFQ_BIN:-}" ] || cargo build --release --quiet
  if [ ! -f "$model/model.safetensors" ]; then
    if [ $which = qwen ]; then scripts/fetch-qwen25-05b.sh "$model"; else scripts/fetch-smollm2.sh "$model"; fi
  fi
fi
threads=${RAYON_NUM_THREADS:-$(nproc)}

# Rows: name, method, weight quantizer, quantize flags. "FP" is the unquantized model.
# Calibrated rows use the CPU presets (calib/cpu.toml for FlatQuant, calib/affinequant-cpu.toml and
# the affinequant-* recipes) on the WikiText-2 validation split (the data directory has no train split).
grid() {
  if [ $which = qwen ]; then grid_qwen; else grid_smollm2; fi
}

# The second model's grid (issue 17): every method × {rtn, gptq} weights at W4A16, W3A16 g64
# (896 = 14·64 and 4 864 = 76·64, so g64 divides), W4A8, W4A4, W4A4KV4; cheap rows first so an
# interrupted run has whole columns of them.
grid_qwen() {
  local scheme flags method wq
  {
    echo "FP none none"
    for method in rtn rotate flatquant affinequant; do
      while read -r scheme flags; do
        for wq in rtn gptq; do
          if [ $method = affinequant ]; then
            # AffineQuant picks its recipe by scheme (issue 17.6); stated here to keep the row explicit.
            case $scheme in
              W4A16) flags="--recipe affinequant-w4a16" ;;
              W3A16g64) flags="--recipe affinequant-w3a16-g64" ;;
              W4A8) flags="--recipe affinequant-w4a4 --a-bits 8" ;;
              W4A4) flags="--recipe affinequant-w4a4" ;;
              W4A4KV4) flags="--recipe affinequant-w4a4 --kv-bits 4" ;;
            esac
          fi
          echo "$scheme $method $wq $flags"
        done
      done <<'SCHEMES'
W4A16 --bits 4
W3A16g64 --bits 3 --group-size 64
W4A8 --bits 4 --a-bits 8
W4A4 --bits 4 --a-bits 4
W4A4KV4 --bits 4 --a-bits 4 --kv-bits 4
SCHEMES
    done
  }
}

grid_smollm2() {
  cat <<'GRID'
FP none none
W8A8 rtn rtn --bits 8 --a-bits 8
W8A8 rotate rtn --bits 8 --a-bits 8
W4A16 rtn rtn --bits 4
W4A16 rtn gptq --bits 4
W4A16 rotate rtn --bits 4
W4A16 rotate gptq --bits 4
W4A16 flatquant rtn --bits 4
W4A16 flatquant gptq --bits 4
W4A16 affinequant rtn --recipe affinequant-w4a16
W4A16 affinequant gptq --recipe affinequant-w4a16
W3A16g64 rtn rtn --bits 3 --group-size 64
W3A16g64 rtn gptq --bits 3 --group-size 64
W3A16g64 rotate rtn --bits 3 --group-size 64
W3A16g64 rotate gptq --bits 3 --group-size 64
W3A16g64 flatquant rtn --bits 3 --group-size 64
W3A16g64 flatquant gptq --bits 3 --group-size 64
W3A16g64 affinequant rtn --recipe affinequant-w3a16-g64
W3A16g64 affinequant gptq --recipe affinequant-w3a16-g64
W2A16g64 rtn rtn --bits 2 --group-size 64
W2A16g64 rtn gptq --bits 2 --group-size 64
W2A16g64 rotate rtn --bits 2 --group-size 64
W2A16g64 rotate gptq --bits 2 --group-size 64
W2A16g64 flatquant rtn --bits 2 --group-size 64
W2A16g64 flatquant gptq --bits 2 --group-size 64
W2A16g64 affinequant rtn --recipe affinequant-w3a16-g64 --bits 2
W2A16g64 affinequant gptq --recipe affinequant-w3a16-g64 --bits 2
W4A8 rtn rtn --bits 4 --a-bits 8
W4A8 rotate rtn --bits 4 --a-bits 8
W4A8 flatquant rtn --bits 4 --a-bits 8
W4A4 rtn rtn --bits 4 --a-bits 4
W4A4 rtn gptq --bits 4 --a-bits 4
W4A4 rotate rtn --bits 4 --a-bits 4
W4A4 rotate gptq --bits 4 --a-bits 4
W4A4 flatquant rtn --bits 4 --a-bits 4
W4A4 flatquant gptq --bits 4 --a-bits 4
W4A4 affinequant rtn --recipe affinequant-w4a4
W4A4 affinequant gptq --recipe affinequant-w4a4
W4A4KV4 rtn rtn --bits 4 --a-bits 4 --kv-bits 4
W4A4KV4 rotate rtn --bits 4 --a-bits 4 --kv-bits 4
W4A4KV4 flatquant rtn --bits 4 --a-bits 4 --kv-bits 4
GRID
}

field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
ppl_of() { [ -f "$1" ] && python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["ppl"])' "$1" || echo -; }

# One row: quantize once (cached), then each PPL column (cached).
run_row() {
  local name=$1 method=$2 wq=$3; shift 3
  # FlatQuant rows stay on the `cpu` budget with symmetric weights and plain GPTQ, as the grid was
  # measured: without --recipe, `--method flatquant` at W4A16/W4A4/W4A4KV4 takes the scheme's
  # preset (GPTQ v2; W4A16 asymmetric), which README's preset table reports on its own.
  if [ "$method" = flatquant ] && [[ " $* " != *" --recipe "* ]]; then set -- "$@" --recipe cpu; fi
  local dir="$results/$name-$method-$wq" ckpt
  if [ $quantize = 0 ]; then
    # Only rows whose quantization finished (FP always).
    [ "$name" = FP ] || [ -f "$dir/quantize.json" ] || return 0
    [ "$name" = FP ] && ckpt=$model || ckpt=$dir/q
    mkdir -p "$dir"
    eval_once "$ckpt" "$dir/ppl-2048.json" --seqlen 2048
    return 0
  fi
  mkdir -p "$dir"
  if [ "$name" = FP ]; then
    ckpt=$model
  else
    ckpt=$dir/q
    if [ ! -f "$dir/quantize.json" ]; then
      local t0 t1 resume=() resumed=false
      # A calibration interrupted by a stopped run goes on from its last finished block (its
      # time then covers only the rest: marked * in the table).
      if [ "$method" = flatquant ] || [ "$method" = affinequant ] || [ "$wq" = gptq ]; then
        resume=(--resume)
        [ -d "$dir/.q.affq-work" ] && resumed=true
      fi
      t0=$(date +%s.%N)
      if ! /usr/bin/time -f %M -o "$dir/quantize.rss" "$bin" quantize "$model" -o "$ckpt" --method "$method" --weight-quantizer "$wq" "$@" "${resume[@]}" --force > "$dir/quantize.log" 2>&1; then
        echo "$name $method $wq: quantize failed: $(tail -1 "$dir/quantize.log")" >&2
        return 0
      fi
      t1=$(date +%s.%N)
      # Peak RSS of the quantize process (GNU time's %M, KiB).
      python3 -c 'import json,sys; json.dump({"seconds": float(sys.argv[1]) - float(sys.argv[2]), "threads": int(sys.argv[3]), "flags": sys.argv[4], "resumed": sys.argv[5] == "true", "peak_rss_kib": int(open(sys.argv[7]).read().split()[-1])}, open(sys.argv[6], "w"))' \
        "$t1" "$t0" "$threads" "$*" "$resumed" "$dir/quantize.json" "$dir/quantize.rss"
    fi
  fi
  eval_once "$ckpt" "$dir/ppl-512x8.json" --seqlen 512 --max-windows 8
  [ $full = 0 ] || eval_once "$ckpt" "$dir/ppl-2048.json" --seqlen 2048
}

# eval_once CKPT OUT.json FLAGS...: evaluate unless OUT.json exists; written only when complete.
eval_once() {
  local ckpt=$1 out=$2; shift 2
  [ -f "$out" ] && return 0
  if "$bin" eval "$ckpt" "$@" --json > "$out.tmp"; then mv "$out.tmp" "$out"; else rm -f "$out.tmp"; fi
}

if [ $run = 1 ]; then
  grid | while read -r name method wq flags; do
    [[ "$name $method $wq" =~ ${ONLY:-.} ]] || continue
    # shellcheck disable=SC2086
    run_row "$name" "$method" "$wq" $flags
  done
fi

if [ $markdown = 1 ]; then
  echo "| scheme | method | weights | PPL 512 × 8 | PPL 2048, full | quantize (threads) | peak RSS |"
  echo "|---|---|---|---:|---:|---:|---:|"
  grid | while read -r name method wq flags; do
    dir="$results/$name-$method-$wq"
    [ -d "$dir" ] || continue
    python3 - "$dir" "$name" "$method" "$wq" <<'PY'
import json, os, sys
d, name, method, wq = sys.argv[1:5]
def ppl(f):
    p = os.path.join(d, f)
    if not os.path.exists(p):
        return ""
    v = json.load(open(p))["ppl"]
    return f"{v / 1e6:.1f} M" if v >= 1e6 else (f"{v:,.0f}".replace(",", " ") if v >= 1e4 else f"{v:.2f}")
q = rss = ""
qf = os.path.join(d, "quantize.json")
if os.path.exists(qf):
    j = json.load(open(qf))
    s = j["seconds"]
    q = (f"{s:.0f} s" if s < 60 else f"{s / 60:.1f} min") + f" ({j['threads']})" + ("*" if j.get("resumed") else "")
    if "peak_rss_kib" in j:
        rss = f"{j['peak_rss_kib'] / 1048576:.2f} GB"
none = lambda x: "—" if x == "none" else x
print(f"| {name} | {none(method)} | {none(wq)} | {ppl('ppl-512x8.json')} | {ppl('ppl-2048.json')} | {q} | {rss} |")
PY
  done
  exit 0
fi
if [ $which = qwen ]; then
  echo "Qwen2.5-Coder-0.5B-Instruct (GGUF of an AWQ checkpoint: Q5_0/Q8_0/K-quant weights, dequantized),"
  echo "WikiText-2 paper protocol; PPL with the default"
else
  echo "SmolLM2-135M-Instruct (dequantized Q4_1 weights), WikiText-2 paper protocol; PPL with the default"
fi
echo "(integer) kernels; weights symmetric amax/7-style per channel unless gN; activations symmetric per"
echo "token; KV asymmetric per (token, head); quantize = wall seconds of 'affq quantize' (threads)"
printf '%-9s %-12s %-5s %10s %10s %12s\n' scheme method wq "512x8" "2048 full" "quantize s"
grid | while read -r name method wq flags; do
  dir="$results/$name-$method-$wq"
  [ -d "$dir" ] || continue
  secs=-
  if [ -f "$dir/quantize.json" ]; then
    secs="$(printf '%.0f' "$(field "$dir/quantize.json" seconds)") ($(field "$dir/quantize.json" threads))"
    [ "$(field "$dir/quantize.json" resumed 2>/dev/null)" = True ] && secs="$secs*"
  fi
  printf '%-9s %-12s %-5s %10s %10s %12s\n' "$name" "$method" "$wq" \
    "$(ppl_of "$dir/ppl-512x8.json")" "$(ppl_of "$dir/ppl-2048.json")" "$secs"
done
