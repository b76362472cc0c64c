#!/usr/bin/env bash
# GPU check for a lent GPU machine: one command, at most 8 minutes, no network needed.
#
#   scripts/gpu_check.sh              # Qwen3-30B-A3B-shaped random package, 2 MoE layers
#   scripts/gpu_check.sh --dry-run    # tiny shape on the CPU: checks the script anywhere (< 1 min)
#   scripts/gpu_check.sh --layers 4 --max-new-tokens 64   # any scripts/gpu_check.py option
#
# Prints onnxruntime.get_available_providers() first; without the CUDA EP it says so and runs
# what it can (the device-tier code path with its slots on the CPU EP, and the CPU paging
# comparison). Figures go to $OUT/gpu_check.json when OUT is set, else results/gpu_check.json.
#
# Needs python3 with numpy, onnx, onnxruntime (onnxruntime-gpu for the CUDA EP), tokenizers,
# pyyaml; not torch (used only, when present, for link and expert timings) and not this package
# installed: the repository itself is put on the path as `spac`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if python3 -c "import onnxruntime, onnx, yaml, tokenizers" 2>/dev/null; then
        PYTHON=python3
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi

# `spac` is the repository root (pyproject's package-dir): a link makes it importable as is.
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/spac-shim.XXXXXX")"
ln -s "$ROOT" "$SHIM/spac"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# 8 minutes for the whole command: the script plans for its --time-budget (420 s by default)
# and a SIGINT at the limit still writes what finished.
LIMIT="${GPU_CHECK_LIMIT:-470}"

echo "gpu_check: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), limit ${LIMIT}s"
timeout --signal=INT --kill-after=20 "$LIMIT" "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
status=$?
rm -rf "$SHIM"
exit $status
