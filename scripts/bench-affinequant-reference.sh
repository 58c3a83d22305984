#!/usr/bin/env bash
# Reference AffineQuant on CPU (a benchmark, not a test): runs the upstream Python code,
# bytedance/AffineQuant @ 0f3ba9392bb0 (docs/algorithms.md), on SmolLM2-135M at affq's AffineQuant
# budget, so affq's W4A4 result can be set beside the reference's on the same model and windows.
# Prints every block's time and per-epoch loss, then the WikiText-2 test PPL at seqlen 2048 (paper
# protocol: test rows joined with "\n\n", non-overlapping windows, mean token NLL).
#
#   scripts/bench-affinequant-reference.sh [-m MODEL] [-n 8] [-l 512] [-e 4] [--sf 0.1]
#        [--qkv-bits 16] [--no-aug-loss] [--windows 16] [--fp] [-t THREADS] [--layers K] [--out DIR]
#
#   -n/-l/-e     calibration windows × tokens, epochs (affq's default budget, calib/affinequant-cpu.toml)
#   --qkv-bits B bits of the Q, K, V matmul inputs (upstream quantizes them at --abits; 16 gives the
#                KV-16 scheme of affq's plain W4A4)
#   --no-aug-loss  drop upstream's W4A4 script's --aug_loss (on by default, as in that script)
#   --windows W  PPL over the first W windows of 2048 (0: the whole split)
#   --fp         also the PPL of the (MHA-expanded) full-precision model first: a protocol check
#   --layers K   keep the first K decoder layers (a quick check of the script only)
#
# Recipe: upstream scripts/llama/llama-7b/w4a4.sh less the budget: --wbits 4 --abits 4 --lwc --let
# --aug_loss --use_matrix --sf 0.1, everything else at upstream main.py's defaults (asymmetric
# per-channel weights with LWC at lwc_lr 1e-2, asymmetric per-token activations, LET at let_lr 5e-3
# with channel shifts trained from zero, α 0.5, AdamW without weight decay, seed 2), plus
# --deactive_amp (upstream's switch) so training runs in float32. On a GPU upstream still computes
# the full-precision targets and the next block's inputs under fp16 autocast; here they are float32
# too (no GPU is used: CUDA_VISIBLE_DEVICES is emptied, so the AMP grad scaler stays off).
#
# Upstream's main.py is not run; a driver below builds main.py's args and calls
# quantize.affinequant.affinequant, then evaluates as main.py's evaluate does. The driver, not the
# reference code, does:
#  - GQA: upstream's V→O and Q/K matrices are [hidden × hidden] with one block per query head and
#    are multiplied into v_proj/k_proj, so they need as many KV heads as query heads (SmolLM2 has 9
#    query and 3 KV heads). The driver repeats each KV head's k_proj/v_proj rows for its query heads
#    (the same function: what repeat_kv does at run time) and sets num_key_value_heads to 9. This
#    gives upstream one V→O matrix per query head, three times affq's per-KV-head freedom;
#  - act scales and shifts: upstream's generate_act_scale_shift.get_act_scales/get_act_shifts on the
#    calibration windows (upstream runs them on 128 × 2048 tokens of its calibration set);
#  - windows like upstream's get_wikitext2(train), from wiki.valid.raw (the train split is not in
#    shared/data), each row stripped before the join as in scripts/bench-calib-reference.sh, seed 2;
#    token ids come from the venv's own `tokenizers` (see below);
#  - loads in float32 for the statistics and --fp, then casts to float16 as upstream's LMClass
#    loads it; keeps the quantized model in float32 at the end (upstream returns model.half());
#  - runs on the CPU without editing the tree: Tensor.cuda returns the tensor,
#    torch.cuda.max_memory_allocated returns 0, auto_gptq (imported for --real_quant only) is a stub,
#    `datasets` (imported by the data loaders the driver replaces) is a stub, and a non-finite
#    loss raises instead of entering pdb.
#
# Python: $AFFINEQUANT_PYTHON (default ~/.cache/affq/py-gptq/bin/python, torch CPU). The pinned
# transformers 4.35.2 (tokenizers 0.15, huggingface_hub < 1) and termcolor are installed with
# `pip --target` into $AFFINEQUANT_DEPS (default target/affinequant-ref-py), first on PYTHONPATH.
# Reference tree: $AFFINEQUANT_REF (default target/affinequant-ref), exported if missing from
# $AFFINEQUANT_GIT_DIR (a bare clone of bytedance/AffineQuant):
#   git --git-dir=$AFFINEQUANT_GIT_DIR archive 0f3ba9392bb0 | tar -x -C target/affinequant-ref
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
commit=0f3ba9392bb0
model=$here/target/affq-models/smollm2
n=8; l=512; e=4; sf=0.1; qkv=16; aug=1; windows=16; fp=0; threads=2; layers=0
out=$here/target/bench-affinequant-reference
while [ $# -gt 0 ]; do
  case $1 in
    -m) model=$2; shift 2 ;;
    -n) n=$2; shift 2 ;;
    -l) l=$2; shift 2 ;;
    -e) e=$2; shift 2 ;;
    --sf) sf=$2; shift 2 ;;
    --qkv-bits) qkv=$2; shift 2 ;;
    --no-aug-loss) aug=0; shift ;;
    --windows) windows=$2; shift 2 ;;
    --fp) fp=1; shift ;;
    -t) threads=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [-m MODEL] [-n N] [-l L] [-e E] [--sf SF] [--qkv-bits B] [--no-aug-loss] [--windows W] [--fp] [-t THREADS] [--layers K] [--out DIR]" >&2; exit 2 ;;
  esac
done
py=${AFFINEQUANT_PYTHON:-$HOME/.cache/affq/py-gptq/bin/python}
ref=${AFFINEQUANT_REF:-$here/target/affinequant-ref}
deps=${AFFINEQUANT_DEPS:-$here/target/affinequant-ref-py}
gitdir=${AFFINEQUANT_GIT_DIR:-/work/.mirror/bytedance+AffineQuant/repo}
data=${AFFQ_DATA_DIR:-$here/../shared/data}
model=$(cd "$model" && pwd)
[ "$e" -ge 2 ] || { echo "-e must be at least 2 (upstream's gradual mask divides by epochs - 1)" >&2; exit 2; }

. "$here/scripts/reference-env.sh"
reference_tree "$ref" quantize/affinequant.py "$gitdir" "$commit" bytedance/AffineQuant "AFFINEQUANT_REF / AFFINEQUANT_GIT_DIR"
pinned_deps "$py" "$deps" 4.35.2 termcolor "tokenizers==0.15.2" "huggingface_hub==0.20.3" termcolor

mkdir -p "$out"
out=$(cd "$out" && pwd)
export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$deps:$ref PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "reference AffineQuant @ $commit ($ref), python $py, $threads threads"
echo "model $model; W4A4 (weights per-channel asym + LWC, activations per-token asym), Q/K/V matmul inputs $qkv bits; $n × $l tokens of wiki.valid.raw, $e epochs, sf $sf, aug_loss $aug; fp32"
# Token ids by the venv's own tokenizers (0.15, the one transformers 4.35 pins, cannot read SmolLM2's
# tokenizer.json); encode() adds special tokens as transformers' fast tokenizer does.
PYTHONPATH= "$py" - "$model" "$data" "$out/tokens.pt" <<'EOF'
import sys, torch
from tokenizers import Tokenizer
model, data, dst = sys.argv[1:4]
tok = Tokenizer.from_file(f"{model}/tokenizer.json")
def hf_rows(path):
    lines = open(path, encoding="utf-8").read().split("\n")[:-1]
    return [line + "\n" if line.strip() else "" for line in lines]
ids = lambda text: torch.tensor([tok.encode(text).ids], dtype=torch.long)
test = ids("\n\n".join(hf_rows(f"{data}/wikitext-2-raw/wiki.test.raw")))
valid = ids("\n\n".join(r.strip() for r in hf_rows(f"{data}/wikitext-2-raw/wiki.valid.raw")))
torch.save({"test": test, "valid": valid}, dst)
EOF
cd "$ref"
"$py" - "$model" "$data" "$out" "$n" "$l" "$e" "$sf" "$qkv" "$aug" "$windows" "$fp" "$threads" "$layers" <<'EOF' 2>&1 | tee "$out/run.log"
import argparse, logging, math, re, resource, sys, time, types
import torch, torch.nn as nn, transformers
model_path, data, out = sys.argv[1:4]
N, L, E = map(int, sys.argv[4:7]); sf = float(sys.argv[7])
qkv_bits, aug, windows, do_fp, threads, layers = map(int, sys.argv[8:14])
torch.set_num_threads(threads)

# CPU shims (see the header): no file of the reference tree is edited.
torch.Tensor.cuda = lambda self, *a, **k: self
torch.cuda.max_memory_allocated = lambda *a, **k: 0
for name in ["auto_gptq", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear",
             "auto_gptq.nn_modules.qlinear.qlinear_cuda"]:
    sys.modules[name] = types.ModuleType(name)
sys.modules["auto_gptq.nn_modules.qlinear"].qlinear_cuda = sys.modules["auto_gptq.nn_modules.qlinear.qlinear_cuda"]
sys.modules["datasets"] = types.ModuleType("datasets")  # imported by the data loaders, not used here
sys.modules["datasets"].load_dataset = None
import pdb
def _nan(*a, **k):
    raise RuntimeError("non-finite loss (upstream would enter pdb here)")
pdb.set_trace = _nan

import utils
from quantize.affinequant import affinequant
from generate_act_scale_shift import get_act_scales, get_act_shifts

tokens = torch.load(f"{out}/tokens.pt")
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
model.eval()
for p in model.parameters():
    p.requires_grad = False
if layers > 0:
    del model.model.layers[layers:]
    model.config.num_hidden_layers = layers

# GQA → MHA with the same function: query head h reads KV head h // rep.
cfg = model.config
nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
hd = cfg.hidden_size // nh
rep = nh // nkv
if rep > 1:
    for layer in model.model.layers:
        at = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(at, name)
            new = nn.Linear(old.in_features, nh * hd, bias=old.bias is not None)
            new.weight.data = old.weight.data.view(nkv, hd, -1).repeat_interleave(rep, 0).reshape(nh * hd, -1).clone()
            if old.bias is not None:
                new.bias.data = old.bias.data.view(nkv, hd).repeat_interleave(rep, 0).reshape(-1).clone()
            new.requires_grad_(False)
            setattr(at, name, new)
        at.num_key_value_heads = nh
        at.num_key_value_groups = 1
    cfg.num_key_value_heads = nh
print(f"model load {time.perf_counter() - t0:.1f} s; KV heads {nkv} → {cfg.num_key_value_heads} (rows repeated ×{rep})")

testenc = tokens["test"]
nwin = testenc.numel() // 2048
if windows > 0:
    nwin = min(nwin, windows)

@torch.no_grad()
def ppl(model):
    model.config.use_cache = False
    nll = 0.0
    t0 = time.perf_counter()
    for i in range(nwin):
        batch = testenc[:, i * 2048:(i + 1) * 2048]
        logits = model.lm_head(model.model(batch)[0])
        nll += nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:]).item()
    return math.exp(nll / nwin), time.perf_counter() - t0

if do_fp:
    p, s = ppl(model)
    print(f"FP wikitext2 test PPL {p:.4f} (seqlen 2048, first {nwin} windows; {s:.1f} s)")

# Upstream get_wikitext2(train) on the validation split, upstream's default seed.
import random
random.seed(2); torch.manual_seed(2)
trainenc = tokens["valid"]
dataloader = []
for _ in range(N):
    i = random.randint(0, trainenc.shape[1] - L - 1)
    inp = trainenc[:, i:i + L]
    tar = inp.clone(); tar[:, :-1] = -100
    dataloader.append((inp, tar))
t0 = time.perf_counter()
act_scales = get_act_scales(model, dataloader, N)
act_shifts = get_act_shifts(model, dataloader, N)
print(f"act scales and shifts over {N} × {L} tokens: {time.perf_counter() - t0:.1f} s")

args = argparse.Namespace(
    net="llama-smollm2", model=model_path, nsamples=N, batch_size=1, seed=2, epochs=E,
    wbits=4, abits=4, group_size=None, alpha=0.5, let_lr=5e-3, lwc_lr=1e-2, wd=0.0,
    let=True, lwc=True, aug_loss=bool(aug), symmetric=False, use_matrix=True, use_ln_matrix=False,
    sf=sf, deactive_amp=True, dtype=torch.float32, resume=None, real_quant=False, output_dir=out)
args.weight_quant_params = {"n_bits": 4, "per_channel_axes": [0], "symmetric": False,
                            "dynamic_method": "per_channel", "group_size": None, "lwc": True}
args.act_quant_params = {"n_bits": 4, "per_channel_axes": [], "symmetric": False, "dynamic_method": "per_token"}
for k in ("q", "k", "v"):
    setattr(args, f"{k}_quant_params", {"n_bits": qkv_bits, "per_channel_axes": [], "symmetric": False,
                                        "dynamic_method": "per_token"})
args.p_quant_params = {"n_bits": 16, "metric": "fix0to1"}

lm = types.SimpleNamespace(model=model, device=torch.device("cpu"), _device="cpu", seqlen=L)
logger = utils.create_logger(__import__("pathlib").Path(out))
marks, losses = [], {}
class Clock(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        m = re.match(r"=== Start quantize layer (\d+) ===", msg)
        if m:
            marks.append((int(m[1]), time.perf_counter()))
        m = re.match(r"layer (\d+) iter (\d+) loss:(\S+)", msg)
        if m:
            losses.setdefault(int(m[1]), []).append(float(m[3]))
logger.addHandler(Clock())

# Upstream's LMClass loads the model in float16 and affinequant() casts each block to float32
# (plain tensors, which the temporary weights are assigned over); so does the driver.
model.half()
half = nn.Module.half
nn.Module.half = lambda self: self
t0 = time.perf_counter()
affinequant(lm, args, dataloader, act_scales, act_shifts, logger)
t_end = time.perf_counter()
nn.Module.half = half
model.float()

print(f"\n== reference AffineQuant, {len(model.model.layers)} blocks, {E * N} steps per block ==")
print("block   wall s  loss per epoch")
for k, (blk, ts) in enumerate(marks):
    te = marks[k + 1][1] if k + 1 < len(marks) else t_end
    print(f"{blk:5d} {te - ts:8.1f}  " + " ".join(f"{x:.6g}" for x in losses.get(blk, [])))
print(f"calibration wall {t_end - t0:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
p, s = ppl(model)
print(f"wikitext2 test PPL {p:.4f} (seqlen 2048, first {nwin} windows; {s:.1f} s)")
EOF
