#!/usr/bin/env bash
# Installs PyTorch into the given Python environment: a normal (CUDA) build when an NVIDIA GPU
# is present, the CPU build otherwise, so a GPU-less machine never downloads GBs of CUDA wheels.
set -euo pipefail
py="$1"
if "$py" -c "import torch" 2>/dev/null; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install "torch>=2.4"
else
    # PyTorch's CPU index first; a machine with a local CPU wheel of 2.13.0 (no internet) falls back to it.
    "$py" -m pip install --retries 0 --timeout 15 "torch==2.13.0" \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || "$py" -m pip install "torch==2.13.0"
fi
