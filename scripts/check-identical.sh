#!/usr/bin/env bash
# Byte-identity check for refactors: runs a fixed set of `affq quantize` / `affq eval` commands and
# prints one sha256 per output, so two binaries (before and after a change) can be compared.
#
#   scripts/check-identical.sh [--bin BIN] [--out FILE]      hashes of one binary
#   scripts/check-identical.sh --base REV [--bin BIN]        builds REV in target/identity-base,
#                                                           runs both, diffs (exit 1 on any change)
#
# Outputs hashed: model.safetensors and config.json of stories260K quantized with rtn, rotate,
# flatquant, affinequant and rtn + GPTQ at seed 7; `affq eval --json` (timing keys removed) of
# SmolLM2 FP and of a SmolLM2 W4A4 rotate checkpoint (integer kernels and simulation), and of the
# stories260K checkpoints. Runs on one thread so float reductions are ordered the same way.
# Needs ../shared/data (or AFFQ_DATA_DIR) and SmolLM2 (scripts/fetch-smollm2.sh, AFFQ_SMOLLM2_DIR).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/target/release/affq
out=
base=
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    *) echo "usage: $0 [--bin BIN] [--out FILE] [--base REV]" >&2; exit 2 ;;
  esac
done
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
export RAYON_NUM_THREADS=1
smol=${AFFQ_SMOLLM2_DIR:-$here/target/affq-models/smollm2}
stories=$AFFQ_DATA_DIR/models/stories260K/hf

if [ -n "$base" ]; then
  wt=$here/target/identity-base/src
  rm -rf "$wt"; git -C "$here" worktree prune
  git -C "$here" worktree add --detach "$wt" "$base" >/dev/null
  (cd "$wt" && CARGO_TARGET_DIR=$here/target/identity-base/target cargo build --release --quiet --bin affq)
  a=$(mktemp); b=$(mktemp)
  "$0" --bin "$here/target/identity-base/target/release/affq" --out "$a"
  "$0" --bin "$bin" --out "$b"
  git -C "$here" worktree remove --force "$wt"
  if diff "$a" "$b"; then echo "identical: $(wc -l < "$a") outputs"; else echo "DIFFERENT" >&2; exit 1; fi
  exit 0
fi

[ -x "$bin" ] || { echo "$bin: no such binary" >&2; exit 2; }
[ -f "$smol/model.safetensors" ] || { echo "$smol: no SmolLM2 (scripts/fetch-smollm2.sh)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
strip() { python3 -c 'import json,sys; v=json.load(sys.stdin); [v.pop(k,None) for k in ("seconds","tok_per_s","load_seconds","model")]; print(json.dumps(v,sort_keys=True))'; }
line() { printf '%s %s\n' "$1" "$2" >> "$work/hashes"; }
train="--nsamples 4 --calib-seqlen 64 --epochs 1"
declare -A runs=(
  [rtn]="--method rtn --bits 4 --a-bits 8"
  [rotate]="--method rotate --bits 4 --a-bits 4 --kv-bits 8"
  [flatquant]="--method flatquant --bits 4 --a-bits 4 --kv-bits 4 --weight-quantizer rtn $train"
  [affinequant]="--method affinequant --bits 4 --a-bits 4 $train"
  [rtn-gptq]="--method rtn --bits 3 --group-size 4 --weight-quantizer gptq --nsamples 8 --calib-seqlen 64"
)
for name in rtn rotate flatquant affinequant rtn-gptq; do
  # shellcheck disable=SC2086
  "$bin" quantize "$stories" -o "$work/$name" --seed 7 ${runs[$name]} --json > /dev/null 2> "$work/$name.err" \
    || { cat "$work/$name.err" >&2; exit 1; }
  for f in model.safetensors config.json; do
    line "stories-$name/$f" "$(sha256sum < "$work/$name/$f" | cut -d' ' -f1)"
  done
  line "stories-$name/eval" "$("$bin" eval "$work/$name" --seqlen 128 --max-windows 4 --json | strip | sha256sum | cut -d' ' -f1)"
done
"$bin" quantize "$smol" -o "$work/smol-w4a4" --method rotate --bits 4 --a-bits 4 --seed 7 --json > /dev/null
for f in model.safetensors config.json; do
  line "smollm2-w4a4-rotate/$f" "$(sha256sum < "$work/smol-w4a4/$f" | cut -d' ' -f1)"
done
for m in fp w4a4; do
  dir=$smol; [ $m = w4a4 ] && dir=$work/smol-w4a4
  for k in int simulate; do
    [ $m = fp ] && [ $k = simulate ] && continue
    line "smollm2-$m/eval-$k" "$("$bin" eval "$dir" --seqlen 512 --max-windows 4 --kernels $k --json | strip | sha256sum | cut -d' ' -f1)"
  done
done
line "smollm2-fp/eval-llamacpp" "$("$bin" eval "$smol" --protocol llamacpp --seqlen 512 --max-windows 2 --json | strip | sha256sum | cut -d' ' -f1)"
if [ -n "$out" ]; then cp "$work/hashes" "$out"; else cat "$work/hashes"; fi
