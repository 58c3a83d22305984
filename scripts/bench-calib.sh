#!/usr/bin/env bash
# Calibration engine profile (not a timed test): where a FlatQuant/AffineQuant training step's
# time goes, and its rate as a fraction of the machine's f32 GEMM peak.
#
#   scripts/bench-calib.sh [-m MODEL] [--method flatquant] [-n 32] [-l 512] [-e 5] [-b 4] [-- QUANTIZE ARGS…]
#
# Defaults: SmolLM2, W4A4 FlatQuant at the reference code's budget (32 windows × 512 tokens,
# 5 epochs, batch 4, lr 5e-3; the equal-budget run of the calibration-engine issue). Prints:
#  - candle's f32 GEMM rate at the model's linear shapes (examples/gemm_peak.rs) — the peak;
#  - wall time, peak RSS, and per phase (building the quantized block's weights, forward + loss,
#    backward, optimizer) the seconds summed over all blocks, from `affq quantize`'s block lines;
#  - the step's model FLOPs: forward = linears 2·T·Σ out·in + attention 2·B·L²·H·hd (Q·Kᵀ and
#    P·V over the visible, causal half: the fused kernel's work; before it had a backward, this
#    counted 4·B·L²·H·hd, the full matrices candle computed) + FlatQuant's online Kronecker
#    transforms 2·T·n·(n1+n2) per site + the weight-side transforms 2·out·in·(n1+n2) per linear;
#    a step ≈ 3 × forward (the backward of a product costs two products); T = B·L tokens.
#    Achieved GFLOP/s = FLOPs × steps / (forward + backward + weights seconds), and its share of
#    the peak.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$here/target/affq-models/smollm2
method=flatquant; n=32; l=512; e=5; b=4
extra=(--bits 4 --a-bits 4 --lr 5e-3)
while [ $# -gt 0 ]; do
  case $1 in
    -m) model=$2; shift 2 ;;
    --method) method=$2; shift 2 ;;
    -n) n=$2; shift 2 ;;
    -l) l=$2; shift 2 ;;
    -e) e=$2; shift 2 ;;
    -b) b=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "usage: $0 [-m MODEL] [--method M] [-n N] [-l L] [-e E] [-b B] [-- QUANTIZE ARGS…]" >&2; exit 2 ;;
  esac
done
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
affq=${AFFQ_BIN:-$here/target/release/affq}
[ -x "$affq" ] || (cd "$here" && cargo build --release >&2)
peakbin=$here/target/release/examples/gemm_peak
[ -x "$peakbin" ] || (cd "$here" && cargo build --release --example gemm_peak >&2)
[ -d "$model" ] || "$here/scripts/fetch-smollm2.sh" "$model" >&2
out=$here/target/bench-calib
mkdir -p "$out"
read -r d i < <(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(c['hidden_size'], c['intermediate_size'])" "$model/config.json")
"$peakbin" $((b * l)) "$d" "$i" | tee "$out/gemm.txt"
peak=$(awk '/^peak_gflops/ {print $2}' "$out/gemm.txt")
log=$out/quantize.log
# The reference trains the transforms and rounds the weights to nearest: RTN weights unless the
# extra arguments choose the weight quantizer (FlatQuant's scheme recipes would take GPTQ v2).
case " ${extra[*]} " in *" --weight-quantizer "*) ;; *) extra+=(--weight-quantizer rtn) ;; esac
echo "affq quantize $model --method $method --nsamples $n --calib-seqlen $l --epochs $e --batch $b ${extra[*]}"
/usr/bin/time -f "wall %e s, peak RSS %M KB" "$affq" quantize "$model" -o "$out/ckpt" --force \
  --method "$method" --nsamples "$n" --calib-seqlen "$l" --epochs "$e" --batch "$b" "${extra[@]}" 2> "$log"
python3 - "$model/config.json" "$log" "$b" "$l" "$peak" "$method" <<'EOF'
import json, math, re, sys
cfg, log, B, L, peak, method = json.load(open(sys.argv[1])), open(sys.argv[2]).read(), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
d, I, H = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
kv = cfg.get("num_key_value_heads", H); hd = cfg.get("head_dim", d // H)
T = B * L
def split(n):  # FlatQuant's Kronecker factors: n1 the largest divisor ≤ √n
    n1 = max(k for k in range(1, int(math.isqrt(n)) + 1) if n % k == 0)
    return n1, n // n1
def kron(n):
    a, b = split(n); return a + b
lin = {"q": (H * hd, d), "k": (kv * hd, d), "v": (kv * hd, d), "o": (d, H * hd),
       "gate": (I, d), "up": (I, d), "down": (d, I)}
fwd_lin = 2 * T * sum(o * n for o, n in lin.values())
fwd_attn = 2 * B * L * L * H * hd  # Q·Kᵀ and P·V over the causal half
if method == "flatquant":
    site = {"q": kron(d), "k": kron(d), "v": kron(d), "o": H + hd, "gate": kron(d), "up": kron(d), "down": kron(I)}
    online = 2 * T * (d * kron(d) * 2 + H * hd * (H + hd) + I * kron(I))
    wside = 2 * sum(o * n * site[k] for k, (o, n) in lin.items())
else:
    online = wside = 0
fwd = fwd_lin + fwd_attn + online + wside
step = 3 * fwd
blocks = [l for l in log.splitlines() if re.match(r"block +\d+: loss", l)]
tot = {"steps": 0, "weights": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
secs = 0.0
for l in blocks:
    m = re.search(r"\(([\d.]+)s; (\d+) steps: weights ([\d.]+)s, forward ([\d.]+)s, backward ([\d.]+)s, optimizer ([\d.]+)s\)", l)
    if not m:
        continue
    secs += float(m[1]); tot["steps"] += int(m[2])
    for k, v in zip(["weights", "forward", "backward", "optimizer"], m.groups()[2:]):
        tot[k] += float(v)
print("".join(l + "\n" for l in log.splitlines() if l.startswith("wall ")), end="")
if not tot["steps"]:
    sys.exit("no training steps in the log (an untrained method?)")
train = tot["weights"] + tot["forward"] + tot["backward"] + tot["optimizer"]
print(f"{len(blocks)} blocks, {secs:.1f} s in block calibration, {tot['steps']} steps, {train:.1f} s in steps ({train / tot['steps']:.3f} s per step)")
for k in ["weights", "forward", "backward", "optimizer"]:
    print(f"  {k:<9} {tot[k]:8.1f} s  {100 * tot[k] / train:5.1f} %  ({tot[k] / tot['steps'] * 1e3:.1f} ms per step)")
print(f"model FLOPs per step (T = {T} tokens): forward {fwd / 1e9:.2f} G (linears {fwd_lin / 1e9:.2f}, attention {fwd_attn / 1e9:.2f}, online transforms {online / 1e9:.2f}, weight-side {wside / 1e9:.2f}); step ≈ 3 × forward = {step / 1e9:.2f} G")
rate = step * tot["steps"] / train / 1e9
print(f"achieved {rate:.1f} GFLOP/s over whole steps = {100 * rate / peak:.1f} % of the f32 GEMM peak ({peak:.1f} GFLOP/s)")
EOF
