#!/usr/bin/env bash
# Reference FlatQuant calibration on CPU (a benchmark, not a test): runs the upstream Python code,
# ruikangliu/FlatQuant @ 9d88ffcb7d2c (docs/algorithms.md), on SmolLM2-135M at the budget of
# scripts/bench-calib.sh, so affq's calibration time can be set beside the reference's on the same
# machine. Prints the total calibration wall time, every block's time (wall, training epochs, the
# rest) and its final loss; with --ppl, then the WikiText-2 test PPL (upstream's ppl_eval: paper
# protocol, seqlen 2048, 148 windows, fp32 on the CPU: most of an hour on 2 cores, hence opt-in).
#
#   scripts/bench-calib-reference.sh [-m MODEL] [-n 32] [-l 512] [-e 5] [-b 4] [--lr 5e-3]
#                                    [-t THREADS] [--layers K] [--ppl] [--ppl-windows W]
#
#   -n/-l/-e/-b  calibration windows × tokens, epochs, batch (bench-calib.sh's meaning)
#   -t           torch threads (default 2). Two OpenMP threads on a 2-core machine that another job
#                also keeps busy wait a scheduler slice at every op (≈ 8 ms each, a 20× slower step):
#                time on an idle machine, or pass -t 1 while sharing it.
#   --layers K   keep only the first K decoder layers (for a quick check of the script only)
#   --ppl        also the WikiText-2 test PPL after reparameterisation + RTN
#   --ppl-windows W  --ppl on the first W windows only (not the protocol; for a quick check)
#
# Recipe: the README's W4A4 line less KV quantization, i.e. upstream main.py's flags
#   --w_bits 4 --a_bits 4 --cali_trans --add_diag --lwc --lac --cali_bsz B --epochs E --flat_lr LR
#   --nsamples N, everything else at upstream defaults (per-channel symmetric weights by RTN,
#   per-token symmetric activations, KV 16, SVD-parametrised transforms, SmoothQuant-style channel
#   scale with α 0.3, AdamW + cosine schedule, LWC/LAC at 10 × lr, seed 0), plus --deactive_amp
#   (upstream's own switch) so training runs in float32 instead of fp16 autocast.
#
# Upstream's main.py is not run; a driver below calls its functions in main.py's order (seed,
# model, tokenizer, calibration windows, apply_flatquant_to_llama_31, cali_flat_quant,
# reparameterize_model, rtn_fwrd, ppl_eval). The driver, not the reference code, does:
#  - loads the model with upstream's get_llama_31 (the LLaMA-3.1 path, written for the pinned
#    transformers 4.45; SmolLM2 is a plain LLaMA) and casts it to float32 (upstream keeps the fp16
#    checkpoint dtype; on a CPU fp32 is the fast path and matches affq's f32);
#  - builds the windows like upstream's get_wikitext2(train) but from wiki.valid.raw (the train
#    split is not in shared/data): HF rows (line + "\n", blank → ""), each stripped, joined with
#    "\n\n", tokenized once, N windows [i, i+L) with i = random.randint(0, n − L − 1) after
#    seed_everything(0);
#  - the PPL text: HF test rows of wiki.test.raw joined with "\n\n" (upstream's eval loader);
#  - the tokenizer: use_fast=False like upstream, falling back to the fast one (SmolLM2 ships only
#    tokenizer.json, so the slow GPT2Tokenizer cannot load);
#  - adds MODEL to args_utils.supported_models (argparse choices) instead of editing the file;
#  - times each block from the log lines cali_flat_quant writes ("Layer i", per-epoch "time").
# Edits to the reference code, applied by this script to a copy under $OUT/src (the export under
# target/flatquant-ref stays pristine), each checked to have matched:
#  1. flatquant/model_tools/llama31_utils.py: the three `torch.ones_like(...).cuda() * 1e-5`
#     (SmoothQuant max trackers) lose `.cuda()`.
# Nothing else needs one: DEV is already cpu without CUDA, torch.cuda.empty_cache/manual_seed are
# no-ops then, the autocast line is not reached under --deactive_amp, no DataParallel is used.
#
# Python: $FLATQUANT_PYTHON (default ~/.cache/affq/py-gptq/bin/python, torch CPU). The pinned
# transformers 4.45.0 (with tokenizers 0.20, huggingface_hub < 1) plus scipy and termcolor are
# installed with `pip --target` into $FLATQUANT_DEPS (default target/flatquant-ref-py), put first
# on PYTHONPATH, so the venv's own newer transformers is left alone.
# Reference tree: $FLATQUANT_REF (default target/flatquant-ref). If it is missing and
# $FLATQUANT_GIT_DIR (a bare clone of ruikangliu/FlatQuant) exists, it is exported from it:
#   git --git-dir=$FLATQUANT_GIT_DIR archive 9d88ffcb7d2c | tar -x -C target/flatquant-ref
# Data: $AFFQ_DATA_DIR (default ../shared/data). Output, logs and the trained parameters:
# target/bench-calib-reference/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
commit=9d88ffcb7d2c
model=$here/target/affq-models/smollm2
n=32; l=512; e=5; b=4; lr=5e-3; threads=2; layers=0; ppl=0; pplwin=0
while [ $# -gt 0 ]; do
  case $1 in
    -m) model=$2; shift 2 ;;
    -n) n=$2; shift 2 ;;
    -l) l=$2; shift 2 ;;
    -e) e=$2; shift 2 ;;
    -b) b=$2; shift 2 ;;
    --lr) lr=$2; shift 2 ;;
    -t) threads=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --ppl) ppl=1; shift ;;
    --ppl-windows) ppl=1; pplwin=$2; shift 2 ;;
    *) echo "usage: $0 [-m MODEL] [-n N] [-l L] [-e E] [-b B] [--lr LR] [-t THREADS] [--layers K] [--ppl] [--ppl-windows W]" >&2; exit 2 ;;
  esac
done
py=${FLATQUANT_PYTHON:-$HOME/.cache/affq/py-gptq/bin/python}
ref=${FLATQUANT_REF:-$here/target/flatquant-ref}
deps=${FLATQUANT_DEPS:-$here/target/flatquant-ref-py}
gitdir=${FLATQUANT_GIT_DIR:-/work/.mirror/ruikangliu+FlatQuant/repo}
data=${AFFQ_DATA_DIR:-$here/../shared/data}
out=$here/target/bench-calib-reference
model=$(cd "$model" && pwd)

. "$here/scripts/reference-env.sh"
reference_tree "$ref" flatquant/train_utils.py "$gitdir" "$commit" ruikangliu/FlatQuant "FLATQUANT_REF / FLATQUANT_GIT_DIR"
pinned_deps "$py" "$deps" 4.45.0 "scipy, termcolor" "tokenizers>=0.20,<0.21" "huggingface_hub>=0.23.2,<1.0" scipy termcolor

# A patched copy of the code the run imports.
rm -rf "$out/src"
mkdir -p "$out/src"
cp -r "$ref/flatquant" "$ref/gptq_utils.py" "$out/src/"
f=$out/src/flatquant/model_tools/llama31_utils.py
[ "$(grep -c '\.cuda() \* 1e-5' "$f")" = 3 ] || { echo "patch 1 does not match $f" >&2; exit 1; }
sed -i 's/\.cuda() \* 1e-5/ * 1e-5/' "$f"
grep -q '\.cuda()' "$f" && { echo "patch 1 left a .cuda() in $f" >&2; exit 1; }

export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$deps:$out/src PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "reference FlatQuant @ $commit (patched copy $out/src), python $py, $threads threads"
echo "model $model; W4A4 (weights per-channel sym RTN, activations per-token sym), KV 16; $n × $l tokens of wiki.valid.raw, $e epochs, batch $b, lr $lr; fp32 (--deactive_amp)"
cd "$out"
"$py" - "$model" "$data" "$out" "$n" "$l" "$e" "$b" "$lr" "$threads" "$layers" "$ppl" "$pplwin" <<'EOF' 2>&1 | tee "$out/run.log"
import logging, random, re, resource, sys, time
import torch, transformers
model_path, data, out = sys.argv[1:4]
N, L, E, B = map(int, sys.argv[4:8]); lr = sys.argv[8]
threads, layers, do_ppl, ppl_windows = map(int, sys.argv[9:13])
torch.set_num_threads(threads)

import flatquant.args_utils as args_utils
import flatquant.utils as utils
import flatquant.model_utils as model_utils
import flatquant.train_utils as train_utils
import flatquant.flat_utils as flat_utils
import flatquant.eval_utils as eval_utils
import gptq_utils

args_utils.supported_models.append(model_path)
sys.argv = [sys.argv[0], "--model", model_path, "--w_bits", "4", "--a_bits", "4",
            "--cali_bsz", str(B), "--epochs", str(E), "--flat_lr", lr, "--nsamples", str(N),
            "--lwc", "--lac", "--cali_trans", "--add_diag", "--deactive_amp",
            "--output_dir", out, "--exp_name", "run"]
args, logger = args_utils.parser_gen()

# Per-block timing from cali_flat_quant's own log lines.
marks, epochs = [], {}
class Clock(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        m = re.match(r"=+ Layer (\d+) =+", msg)
        if m:
            marks.append((int(m[1]), time.perf_counter()))
        m = re.match(r"layer (\d+) lwc lac iter (\d+), lr \S+\s+time ([\d.]+)s, mse: ([\d.eE+-]+)", msg)
        if m:
            epochs.setdefault(int(m[1]), []).append((float(m[3]), float(m[4])))
logger.addHandler(Clock())

utils.seed_everything(seed=args.seed)
t0 = time.perf_counter()
model, apply_flatquant_to_model = model_utils.get_llama_31(args.model, args.hf_token)
model = model.float()
model.eval()
if layers > 0:
    del model.model.layers[layers:]
    model.config.num_hidden_layers = layers
try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, use_fast=False)
except Exception as err:
    print(f"slow tokenizer unavailable ({type(err).__name__}); using the fast one")
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, use_fast=True)
t_load = time.perf_counter() - t0

def hf_rows(path):
    lines = open(path, encoding="utf-8").read().split("\n")[:-1]
    return [line + "\n" if line.strip() else "" for line in lines]

# Upstream get_wikitext2(eval_mode=False), on the validation split.
model.seqlen = L
rows = [r.strip() for r in hf_rows(f"{data}/wikitext-2-raw/wiki.valid.raw")]
trainenc = tokenizer("\n\n".join(rows), return_tensors="pt")
trainloader = []
for _ in range(N):
    i = random.randint(0, trainenc.input_ids.shape[1] - L - 1)
    inp = trainenc.input_ids[:, i:i + L]
    tar = inp.clone(); tar[:, :-1] = -100
    trainloader.append((inp, tar))
print(f"calibration text: wiki.valid.raw, {trainenc.input_ids.shape[1]} tokens, {N} windows × {L}")

t0 = time.perf_counter()
model = apply_flatquant_to_model(args, model)
t_apply = time.perf_counter() - t0
t0 = time.perf_counter()
train_utils.cali_flat_quant(args, model, trainloader, utils.DEV, logger=logger)
t_end = time.perf_counter()
t_cali = t_end - t0
t0 = time.perf_counter()
flat_utils.reparameterize_model(model)
gptq_utils.rtn_fwrd(model, utils.DEV, args)
t_rep = time.perf_counter() - t0

steps = E * (N // B)
print(f"\n== reference FlatQuant calibration, {len(model.model.layers)} blocks, {steps} steps per block ({E} epochs × {N // B}) ==")
print("block   wall s  epochs s   other s  final mse")
tot_train = 0.0
for k, (blk, ts) in enumerate(marks):
    te = marks[k + 1][1] if k + 1 < len(marks) else t_end
    ep = epochs.get(blk, [])
    tr = sum(t for t, _ in ep); tot_train += tr
    print(f"{blk:5d} {te - ts:8.1f} {tr:9.1f} {te - ts - tr:9.1f}  {ep[-1][1] if ep else float('nan'):.6g}")
print(f"calibration wall {t_cali:.1f} s (cali_flat_quant; {tot_train:.1f} s in training epochs, "
      f"{tot_train / max(1, steps * len(marks)):.3f} s per step)")
print(f"model load {t_load:.1f} s, apply FlatQuant modules {t_apply:.1f} s, reparameterize + RTN {t_rep:.1f} s")
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

if do_ppl:
    model.to(utils.DEV)
    testenc = tokenizer("\n\n".join(hf_rows(f"{data}/wikitext-2-raw/wiki.test.raw")), return_tensors="pt")
    total = testenc.input_ids.shape[1]
    if ppl_windows > 0:
        testenc.input_ids = testenc.input_ids[:, :ppl_windows * 2048]
    t0 = time.perf_counter()
    ppl = eval_utils.ppl_eval(model, testenc)
    w = testenc.input_ids.numel() // 2048
    note = "" if ppl_windows <= 0 else " (first windows only: not the protocol)"
    print(f"wikitext2 test PPL {ppl:.4f} (seqlen 2048, {w} windows of {total} tokens{note}; {time.perf_counter() - t0:.1f} s)")
EOF
