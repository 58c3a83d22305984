#!/usr/bin/env bash
# How calibration and evaluation cost grow with model size (benchmark, not a test). Builds
# synthetic Llama-shaped models with random f16 weights (examples/synthetic_model.rs: SmolLM2-,
# Llama-3.2-1B-, Llama-3-8B- and Llama-3-70B-shaped blocks, 2 blocks each, 1 for 70B; SmolLM2's
# tokenizer and 49 152 vocabulary) and measures, per shape:
#   - FlatQuant W4A4 per-block wall time at the CPU preset (32 × 512, 1 epoch), measured on
#     NS_CPU windows and scaled linearly in windows, all but the block's fixed cost; and peak RSS;
#   - the paper budget (128 × 2048, 15 epochs): one and two 2048-token windows for one epoch,
#     which separate a block's fixed cost (statistics, deploy, writing), the per-window cost
#     outside training (targets, RTN baseline: once) and a window's training (×128 ×15); peak
#     RSS at 1 and 2 windows, extrapolated linearly to 128;
#   - GPTQ (W4, RTN method, 32 × 512 Hessian windows) per-block wall time;
#   - eval: ms per token per block (difference of 1- and 2-block models at 512 tokens) and
#     peak RSS of the 2-block evaluation.
# then prints the table and a projection for whole 8B (32 blocks) and 70B (80 blocks) models.
# What a 24 GB, 2-core machine can run is measured; the rest is estimated from the measured shapes
# and marked ~ in the table: 8B trains on 2 windows of 512 tokens and 1–2 of 2 048 (one block),
# 70B runs GPTQ and eval only (training one of its blocks holds ≈ 12× the block's f32 weights,
# ≈ 41 GB): its training time is scaled from 8B by block parameters, its memory by the measured
# ratio of peak RSS to block f32 weights; GPTQ is projected, where not measured, by its cost Σ over
# the linears of out·in² + tokens·in² (the Hessians and their solves).
#   scripts/bench-scale.sh [SHAPES...]     default: smollm2 1b 8b 70b
#   scripts/bench-scale.sh --table         print what is cached
# Cached under target/bench-scale/<shape>/ (delete a file to redo that measurement).
# Env: AFFQ_DATA_DIR (default ../shared/data), AFFQ_BIN, TOKENIZER_DIR (default SmolLM2's import).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
bin=${AFFQ_BIN:-target/release/affq}
results=target/bench-scale
tokdir=${TOKENIZER_DIR:-target/affq-models/smollm2}
table_only=0
shapes=()
for a in "$@"; do
  case $a in
    --table) table_only=1 ;;
    smollm2|1b|8b|70b) shapes+=("$a") ;;
    *) echo "usage: $0 [--table] [smollm2|1b|8b|70b ...]" >&2; exit 2 ;;
  esac
done
[ ${#shapes[@]} -gt 0 ] || shapes=(smollm2 1b 8b 70b)

if [ $table_only = 0 ]; then
  [ -n "${AFFQ_BIN:-}" ] || cargo build --release --quiet
  cargo build --release --quiet --example synthetic_model
  [ -f "$tokdir/tokenizer.json" ] || scripts/fetch-smollm2.sh "$tokdir"
fi
gen=target/release/examples/synthetic_model

# timed OUT_PREFIX CMD...: runs CMD, writes OUT_PREFIX.rss (peak KiB) and .wall (seconds).
timed() {
  local out=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f %M -o "$out.rss" "$@" > "$out.log" 2> "$out.err" || { echo "failed: $* (see $out.err)" >&2; return 1; }
  t1=$(date +%s.%N)
  python3 -c "print(float('$t1') - float('$t0'))" > "$out.wall"
}

measure() {
  local shape=$1 dir=$results/$1 layers=2 ns_cpu todo="fq-cpu fq-paper gptq eval"
  case $shape in
    smollm2) ns_cpu=32 ;; 1b) ns_cpu=8 ;;
    8b) ns_cpu=2; layers=1 ;;
    70b) ns_cpu=1; layers=1; todo="gptq eval" ;;
  esac
  mkdir -p "$dir"
  local m=$dir/model m1=$dir/model-1
  [ -f "$m/model.safetensors" ] || "$gen" "$shape" "$layers" "$m" "$tokdir"
  echo "$layers" > "$dir/layers"; echo "$ns_cpu" > "$dir/ns_cpu"
  # FlatQuant at the CPU preset's shape on ns_cpu windows.
  if [[ $todo == *fq-cpu* ]] && [ ! -f "$dir/fq-cpu.wall" ]; then
    rm -rf "$dir/q-fq"
    timed "$dir/fq-cpu" "$bin" quantize "$m" -o "$dir/q-fq" --method flatquant --bits 4 --a-bits 4 --weight-quantizer rtn --nsamples "$ns_cpu"
    cp "$dir/q-fq/calibration.csv" "$dir/fq-cpu.csv"; rm -rf "$dir/q-fq"
  fi
  # The paper budget's window length, 1 and 2 windows, one epoch.
  for n in 1 2; do
    if [[ $todo == *fq-paper* ]] && [ ! -f "$dir/fq-paper-$n.wall" ]; then
      rm -rf "$dir/q-fqp"
      timed "$dir/fq-paper-$n" "$bin" quantize "$m" -o "$dir/q-fqp" --method flatquant --bits 4 --a-bits 4 --weight-quantizer rtn --nsamples "$n" --calib-seqlen 2048 --epochs 1
      cp "$dir/q-fqp/calibration.csv" "$dir/fq-paper-$n.csv"; rm -rf "$dir/q-fqp"
    fi
  done
  if [[ $todo == *gptq* ]] && [ ! -f "$dir/gptq.wall" ]; then
    rm -rf "$dir/q-gptq"
    timed "$dir/gptq" "$bin" quantize "$m" -o "$dir/q-gptq" --method rtn --weight-quantizer gptq --bits 4
    cp "$dir/q-gptq/calibration.csv" "$dir/gptq.csv"; rm -rf "$dir/q-gptq"
  fi
  # Eval: 2 blocks against the first block alone (same file, config says 1), so the per-block
  # cost excludes the embedding and head; a 1-block calibration model gets a 2-block twin.
  if [[ $todo == *eval* ]] && { [ ! -f "$dir/eval-1.wall" ] || [ ! -f "$dir/eval-2.wall" ]; }; then
    local m2=$m
    if [ "$layers" = 1 ]; then
      m2=$dir/model-2
      [ -f "$m2/model.safetensors" ] || "$gen" "$shape" 2 "$m2" "$tokdir"
    fi
    mkdir -p "$m1"
    ln -sf "$(realpath "$m2/model.safetensors")" "$m1/model.safetensors"
    cp "$m2"/tokenizer*.json "$m1/"
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["num_hidden_layers"]=1; json.dump(c, open(sys.argv[2],"w"))' "$m2/config.json" "$m1/config.json"
    timed "$dir/eval-1" "$bin" eval "$m1" --seqlen 512 --max-windows 2 --json
    timed "$dir/eval-2" "$bin" eval "$m2" --seqlen 512 --max-windows 2 --json
  fi
}

if [ $table_only = 0 ]; then
  for s in "${shapes[@]}"; do measure "$s"; done
fi

python3 - "$results" <<'PY'
import csv, json, os, sys
res = sys.argv[1]
# (hidden, ffn, heads, kv heads, head_dim, layers of the real model, real vocabulary)
SHAPES = {"smollm2": (576, 1536, 9, 3, 64, 30, 49152), "1b": (2048, 8192, 32, 8, 128, 16, 128256),
          "8b": (4096, 14336, 32, 8, 128, 32, 128256), "70b": (8192, 28672, 64, 8, 128, 80, 128256)}
def block_params(d, f, nh, nkv, hd):
    return d * nh * hd * 2 + d * nkv * hd * 2 + 3 * d * f
def phases(path):
    # (seconds per block, of which training steps) from a calibration.csv: epoch rows, a blank
    # line, block rows.
    train, blocks, part = 0.0, [], 0
    for line in open(path):
        line = line.strip()
        if not line:
            part += 1; continue
        if line.startswith("block"): continue
        if part == 0:
            train += float(line.split(",")[3])
        else:
            blocks.append(float(line.split(",")[3]))
    return sum(blocks) / len(blocks), train / len(blocks)
def block_secs(path):
    return phases(path)[0]
def paper_model(dd):
    # From the 1- and 2-window runs at 2048 tokens: a block's fixed cost (statistics, deploy and
    # its check, writing), the per-window cost outside training (full-precision targets, RTN
    # baseline) and one window's training for one epoch.
    p1, p2 = os.path.join(dd, "fq-paper-1.csv"), os.path.join(dd, "fq-paper-2.csv")
    if not (os.path.exists(p1) and os.path.exists(p2)):
        return None
    (t1, tr1), (t2, tr2) = phases(p1), phases(p2)
    per_win = max((t2 - tr2) - (t1 - tr1), 0.0)
    return dict(fixed=max((t1 - tr1) - per_win, 0.0), per_win=per_win, train_win=tr2 / 2)
def cpu_block(dd, ns):
    # The CPU preset's block time at 32 windows from ns measured: everything but the block's
    # fixed cost (taken from the paper runs where measured) grows with the windows.
    t, _ = phases(os.path.join(dd, "fq-cpu.csv"))
    pm = paper_model(dd)
    fixed = min(pm["fixed"], t) if pm else 0.0
    return fixed + (t - fixed) * 32 / ns
def read(p, conv=float):
    # A measurement still running has an empty file.
    v = open(p).read().split() if os.path.exists(p) else []
    return conv(v[-1]) if v else None
def eval_tok_s(p):
    # Only a finished evaluation (its .wall is written last).
    return json.load(open(p + ".log"))["tok_per_s"] if os.path.exists(p + ".wall") else None
def fmt_s(s):
    if s is None: return "—"
    if s < 120: return f"{s:.1f} s"
    if s < 7200: return f"{s / 60:.1f} min"
    if s < 2 * 86400: return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"
gb = lambda kib: f"{kib / 1048576:.2f} GB" if kib else "—"
print("| shape | params / block | FlatQuant CPU preset / block | paper budget / block | GPTQ / block | quantize peak RSS (CPU preset; paper, 2 win → 128 win) | GPTQ peak RSS | eval ms / token / block | eval peak RSS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
proj = {}
def linears(d, f, nh, nkv, hd):
    return [(nh * hd, d), (nkv * hd, d), (nkv * hd, d), (d, nh * hd), (f, d), (f, d), (d, f)]
def gptq_cost(d, f, nh, nkv, hd, tokens=32 * 512):
    return sum(o * i * i + tokens * i * i for o, i in linears(d, f, nh, nkv, hd))
# Reference shape for estimates: the largest one fully measured.
ref = None
for s in ("8b", "1b", "smollm2"):
    dd = os.path.join(res, s)
    if all(os.path.exists(os.path.join(dd, f)) for f in ("gptq.csv", "fq-cpu.csv", "fq-paper-2.csv")):
        d, f, nh, nkv, hd, _, _ = SHAPES[s]
        ns = int(open(os.path.join(dd, "ns_cpu")).read())
        pm = paper_model(dd)
        cpu_train_w = phases(os.path.join(dd, "fq-cpu.csv"))[1] / ns
        r1 = read(os.path.join(dd, "fq-paper-1.rss")); r2 = read(os.path.join(dd, "fq-paper-2.rss"))
        ref = dict(shape=s, gptq_k=block_secs(os.path.join(dd, "gptq.csv")) / gptq_cost(d, f, nh, nkv, hd),
                   paper_over_cpu=pm["train_win"] / cpu_train_w, heads=nh,
                   attn_kib=(r1 - read(os.path.join(dd, "fq-cpu.rss"))), per_window_kib=r2 - r1)
        break
largest_cpu = None
for s, (d, f, nh, nkv, hd, L, V) in SHAPES.items():
    c = os.path.join(res, s, "fq-cpu.csv")
    if os.path.exists(c):
        ns = int(open(os.path.join(res, s, "ns_cpu")).read())
        rc = read(os.path.join(res, s, "fq-cpu.rss"))
        largest_cpu = (s, block_params(d, f, nh, nkv, hd), cpu_block(os.path.join(res, s), ns), rc)
VSYN = 49152
for s, (d, f, nh, nkv, hd, L, V) in SHAPES.items():
    dd = os.path.join(res, s)
    if not os.path.isdir(dd): continue
    P = block_params(d, f, nh, nkv, hd)
    ns = read(os.path.join(dd, "ns_cpu"), int)
    layers = read(os.path.join(dd, "layers"), int)
    cpu = cpu_block(dd, ns) if os.path.exists(os.path.join(dd, "fq-cpu.csv")) else None
    paper = None; rss128 = None
    pm = paper_model(dd)
    if pm:
        # 128 windows' targets once, 15 epochs of training over them.
        paper = pm["fixed"] + 128 * pm["per_win"] + 128 * 15 * pm["train_win"]
    r1, r2 = read(os.path.join(dd, "fq-paper-1.rss")), read(os.path.join(dd, "fq-paper-2.rss"))
    if r1 and r2:
        rss128 = r2 + (r2 - r1) * 126
    gptq = block_secs(os.path.join(dd, "gptq.csv")) if os.path.exists(os.path.join(dd, "gptq.csv")) else None
    rcpu = read(os.path.join(dd, "fq-cpu.rss"))
    est = set()
    if cpu is None and largest_cpu:
        # Training time per window grows with the block's parameters.
        ls, lP, lcpu, _ = largest_cpu
        cpu = lcpu * P / lP; est.add("cpu")
    if gptq is None and ref:
        gptq = ref["gptq_k"] * gptq_cost(d, f, nh, nkv, hd); est.add("gptq")
    if paper is None and cpu is not None and ref:
        # Per-window cost at 2048 over 512 tokens as on the reference shape.
        paper = cpu / 32 * ref["paper_over_cpu"] * 128 * 15; est.add("paper")
    if rcpu is None and largest_cpu and largest_cpu[3]:
        # Training holds a fixed multiple of the block's f32 weights: that of the largest
        # shape measured.
        ls, lP, _, lr = largest_cpu
        rcpu = lr * P / lP; est.add("rcpu")
    if rss128 is None and ref:
        # The 2048-token attention graph grows with the heads; the windows with the width.
        attn = ref["attn_kib"] * nh / ref["heads"]
        win = ref["per_window_kib"] * d / SHAPES[ref["shape"]][0]
        rss128 = rcpu + attn + 128 * win; est.add("rss128")
    t1, t2 = eval_tok_s(os.path.join(dd, "eval-1")), eval_tok_s(os.path.join(dd, "eval-2"))
    ms_block = 1000 / t2 - 1000 / t1 if t1 and t2 else None
    reval = read(os.path.join(dd, "eval-2.rss"))
    proj[s] = (P, cpu, paper, gptq, ms_block, L, V, d, rss128, rcpu, reval)
    e = lambda k, txt: ("~" + txt) if k in est else txt
    msb = f"{ms_block:.2f}" if ms_block is not None else "—"
    print(f"| {s} | {P / 1e6:.0f} M | {e('cpu', fmt_s(cpu))} | {e('paper', fmt_s(paper))} | {e('gptq', fmt_s(gptq))} | "
          f"{e('rcpu', gb(rcpu))}; {gb(r2)} → {e('rss128', gb(rss128))} | {gb(read(os.path.join(dd, 'gptq.rss')))} | {msb} | {gb(reval)} |")
print()
if ref:
    print(f"~ estimated from the {ref['shape']} shape (see the header of scripts/bench-scale.sh).")
print("Projection for a whole model with its real vocabulary (128 256), blocks × per-block figures on these 2 cores")
print("(one core: about twice the time). Peak RSS: calibration holds one block, so the whole model adds only its")
print("embedding and head (16-bit, 4 B per vocabulary row element); eval holds every block in 16-bit (2 B/param)")
print("plus the embedding (f16) and the head (f32).")
print("| model | FlatQuant CPU preset | paper budget | RTN + GPTQ | eval, s per 2048 tokens (512-token windows) | FlatQuant CPU-preset peak RSS | eval peak RSS |")
print("|---|---:|---:|---:|---:|---:|---:|")
for s in ("8b", "70b"):
    if s not in proj: continue
    P, cpu, paper, gptq, msb, L, V, d, _, rcpu, reval = proj[s]
    mul = lambda x: x * L if x is not None else None
    ev = f"{msb * L * 2048 / 1000:.0f} s" if msb is not None else "—"
    qr = rcpu + (V - VSYN) * d * 4 / 1024 if rcpu else None
    er = reval + ((L - 2) * P * 2 + (V - VSYN) * d * 6) / 1024 if reval else None
    print(f"| {s} ({L} blocks) | ~{fmt_s(mul(cpu))} | ~{fmt_s(mul(paper))} | ~{fmt_s(mul(gptq))} | ~{ev} | ~{gb(qr)} | ~{gb(er)} |")
PY
