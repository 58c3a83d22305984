#!/usr/bin/env bash
# Builds llama.cpp's tools (llama-perplexity, llama-quantize, llama-imatrix, llama-bench) from the
# copy vendored in the PyPI source distribution of llama-cpp-python, with cmake and ninja from PyPI,
# into a cache (default target/llama.cpp; ~15 minutes on 2 cores the first time, nothing after).
# Prints the bin directory on stdout.
#   scripts/build-llamacpp.sh [CACHE]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-$here/target/llama.cpp}
version=0.3.36
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
bin=$cache/build/bin
tools="llama-perplexity llama-quantize llama-imatrix llama-bench"
mkdir -p "$cache"
done_all=1
for t in $tools; do [ -x "$bin/$t" ] || done_all=0; done
if [ $done_all = 1 ]; then echo "$bin"; exit 0; fi
src=$cache/llama_cpp_python-$version
if [ ! -d "$src/vendor/llama.cpp" ]; then
  echo "fetching llama-cpp-python $version (sdist) from PyPI" >&2
  python3 - "$cache" "$version" "$sha" <<'PY'
import hashlib, json, sys, tarfile, urllib.parse, urllib.request
cache, version, sha = sys.argv[1:]
index = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(index))
sd = [u for u in meta["releases"][version] if u["packagetype"] == "sdist"][0]
path = f"{cache}/{sd['filename']}"
with urllib.request.urlopen(urllib.parse.urljoin(index, sd["url"])) as r, open(path, "wb") as f:
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        f.write(b)
got = hashlib.sha256(open(path, "rb").read()).hexdigest()
if got != sha:
    sys.exit(f"{path}: sha256 {got}, expected {sha}")
with tarfile.open(path) as t:
    t.extractall(cache, filter="data")
PY
fi
venv=$cache/venv
if [ ! -x "$venv/bin/cmake" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet cmake ninja
fi
export PATH=$venv/bin:$PATH
cmake -S "$src/vendor/llama.cpp" -B "$cache/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
# shellcheck disable=SC2086
cmake --build "$cache/build" -j "$(nproc)" --target $tools >&2
echo "$bin"
