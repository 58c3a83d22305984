#!/usr/bin/env bash
# Runs a sharded calibration as N local processes — the same commands a Slurm array or a
# Kubernetes Indexed Job runs, one per shard — then merges the blocks into the checkpoint.
#
#   scripts/shard-local.sh N MODEL -o OUT [quantize flags…]
#
# Each shard gets RAYON_NUM_THREADS=max(1, cores/N) (set AFFQ_SHARD_THREADS to override).
# Prints each shard's report (blocks, seconds, forward seconds) and the wall time of the shards
# and of the merge. AFFQ_BIN selects the binary (default target/release/affq).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${AFFQ_BIN:-$here/target/release/affq}
[ $# -ge 2 ] || { echo "usage: $0 N MODEL -o OUT [quantize flags…]" >&2; exit 2; }
n=$1; shift
case $n in ''|*[!0-9]*|0) echo "$0: N must be a positive integer" >&2; exit 2 ;; esac
cores=$(nproc)
threads=${AFFQ_SHARD_THREADS:-$(( cores / n > 0 ? cores / n : 1 ))}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
t0=$(date +%s.%N)
pids=()
for ((i = 0; i < n; i++)); do
  RAYON_NUM_THREADS=$threads "$bin" quantize "$@" --shard "$i/$n" --json \
    > "$logs/$i.json" 2> "$logs/$i.err" &
  pids+=($!)
done
fail=0
for ((i = 0; i < n; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "shard $i/$n failed:" >&2; tail -n 5 "$logs/$i.err" >&2; fail=1
  fi
done
t1=$(date +%s.%N)
for ((i = 0; i < n; i++)); do
  [ -s "$logs/$i.json" ] || continue
  python3 - "$logs/$i.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
b = v["blocks"]
print("shard %s: blocks %d..%d  calibrated %d  %.1f s  (forward to its first block %.2f s)"
      % (v["shard"], b[0], b[1], len(v["calibrated"]), v["seconds"], v["forward_seconds"]))
PY
done
[ $fail = 0 ] || exit 1
"$bin" quantize "$@" --merge > "$logs/merge.out" 2> "$logs/merge.err" || {
  cat "$logs/merge.err" >&2; exit 1; }
t2=$(date +%s.%N)
python3 -c 'import sys; a,b,c=map(float,sys.argv[1:4]); print(f"shards: {b-a:.1f} s wall ({sys.argv[4]} processes × {sys.argv[5]} threads); merge: {c-b:.1f} s")' \
  "$t0" "$t1" "$t2" "$n" "$threads"
