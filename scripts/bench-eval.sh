#!/usr/bin/env bash
# Benchmark (not a test): full WikiText-2 paper-protocol evaluation of SmolLM2-135M at seqlen 2048.
# Prints PPL, tokens/s and peak RSS.
#   scripts/bench-eval.sh [MODEL_DIR] [extra affq eval flags...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
model=${1:-target/affq-models/smollm2}
shift || true
export AFFQ_DATA_DIR=${AFFQ_DATA_DIR:-$here/../shared/data}
cargo build --release --quiet
[ -f "$model/model.safetensors" ] || scripts/fetch-smollm2.sh "$model"
python3 - "$model" "$@" <<'PY'
import json, resource, subprocess, sys
model, extra = sys.argv[1], sys.argv[2:]
cmd = ["target/release/affq", "eval", model, "--ppl", "wikitext2", "--seqlen", "2048", "--json", *extra]
out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE).stdout
r = json.loads(out)
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"model          {model}")
print(f"command        {' '.join(cmd)}")
print(f"ppl            {r['ppl']:.4f}  ({r['windows']} windows x {r['seqlen']}, {r['predictions']} predictions)")
print(f"eval time      {r['seconds']:.1f} s  (+ load {r['load_seconds']:.1f} s)")
print(f"throughput     {r['tok_per_s']:.0f} tokens/s")
print(f"peak RSS       {rss_mb:.0f} MB")
PY
