#!/usr/bin/env bash
# Set up bigpt in ./.venv from nothing: torch (the CPU build unless a GPU is present), megatron-core,
# bigpt itself (editable) and the test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # Pin the CPU build: an unpinned torch pulls a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test,curate]"
echo "bigpt is set up in .venv ($(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "+ megatron-core", m.__version__)'))"
