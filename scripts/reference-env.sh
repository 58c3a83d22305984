# Set-up shared by the reference-code benchmarks (bench-calib-reference.sh,
# bench-affinequant-reference.sh); sourced, not run.

# reference_tree DIR MARKER GITDIR COMMIT REPO VARS: unless DIR/MARKER exists, export REPO at
# COMMIT from the bare clone GITDIR into DIR; without the clone, one error line naming VARS.
reference_tree() {
  local dir=$1 marker=$2 gitdir=$3 commit=$4 repo=$5 vars=$6
  [ -f "$dir/$marker" ] && return 0
  if [ -d "$gitdir" ]; then
    mkdir -p "$dir"
    git --git-dir="$gitdir" archive "$commit" | tar -x -C "$dir"
  else
    echo "no reference tree at $dir: export $repo @ $commit there (or set $vars)" >&2
    exit 1
  fi
}

# pinned_deps PY DEPS VERSION IMPORTS PKG...: unless PY with DEPS first on PYTHONPATH imports
# transformers at VERSION and the modules IMPORTS (comma-separated), install transformers==VERSION
# and PKG... into DEPS with `pip --target` (no dependencies: the venv's own packages serve the rest).
pinned_deps() {
  local py=$1 deps=$2 version=$3 imports=$4
  shift 4
  if ! PYTHONPATH=$deps "$py" -c "import transformers, $imports, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    "$py" -m pip install --quiet --no-deps --target "$deps" "transformers==$version" "$@" >&2
  fi
}
