#!/usr/bin/env bash
# The GPU check, the one command on the GPU machine (docs/development.md, "On a GPU"): no make, no venv.
#
#   bash benchmarks/gpu-check.sh            # carry: build/gpu-wheels (made here by `make gpu-wheels`)
#   bash benchmarks/gpu-check.sh --smoke    # the same on tiny sizes and the CPU (tests/test_bench.py)
#
# That machine's python3 is itself a virtual environment holding torch, transformers, peft and accelerate; a venv
# made from it would lose them. So the carried wheels go into a plain folder with `pip install --target`, first on
# PYTHONPATH (ahead of the machine's site-packages: the carried pins win), and this project is installed into the
# same folder from a copy of its sources (the image installs it the same way, not editable). Every stage's child
# process inherits PYTHONPATH and the CUDA/driver variables (benchmarks/common.py: device_env).
# Everything it writes goes under $GPU_CHECK_TMP (/tmp): $OUT gets gpu.json, gpu-logs.txt and train.json.
# Knobs: PYTHON (python3), GPU_WHEELS (build/gpu-wheels), GPU_CHECK_TMP (/tmp/tuneserve-gpu-check),
# OUT (build/gpu-check), GPU_CHECK_BUDGET (seconds for the stages: 480; smoke 3600).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-build/gpu-wheels}
TMP=${GPU_CHECK_TMP:-/tmp/tuneserve-gpu-check}
OUT=${OUT:-build/gpu-check}
started=$(date +%s)

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "gpu-check: no wheels in $WHEELS: run \`make gpu-wheels\` here and name $WHEELS in the device call's carry" >&2
    exit 2
fi
rm -rf "$TMP/site" "$TMP/src"
mkdir -p "$TMP/site" "$TMP/src" "$OUT"
PIP=("$PYTHON" -m pip --disable-pip-version-check --no-input -q install --no-index --no-deps --no-compile
    --no-warn-script-location --target "$TMP/site")
"${PIP[@]}" "${wheels[@]}"
export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
# The project from a copy of what the image installs (setuptools writes its build files next to the sources).
cp -r pyproject.toml tuneserve entrypoints "$TMP/src/"
"${PIP[@]}" --no-build-isolation "$TMP/src"
echo "gpu-check: ${#wheels[@]} wheels and tuneserve installed into $TMP/site in $(($(date +%s) - started)) s" >&2

budget=()
[[ -n ${GPU_CHECK_BUDGET:-} ]] && budget=(--budget "$GPU_CHECK_BUDGET")
exec "$PYTHON" -m benchmarks.gpu_check run --out "$OUT" --work "$TMP/work" "${budget[@]}" "$@"
