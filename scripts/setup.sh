#!/usr/bin/env bash
# Create .venv with the agent and its test tools. On a machine without an NVIDIA GPU
# it installs the CPU build of torch first, from the PyTorch CPU wheel index (a plain
# `pip install torch` would pull a multi-GB CUDA build on Linux), falling back to the
# default index when that one cannot be reached; where nvidia-smi works it takes torch
# from the default index, whose Linux wheels are CUDA builds (README, "Install on a GPU
# node", says how to pick a CUDA version). An importable torch is kept as it is.
# TORCH_SPEC overrides the requirement (default torch==2.13.0).
# Re-running is cheap: the project is reinstalled only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The job sandbox runs jobs inside bubblewrap (docs/security.md).
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -q bubblewrap >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; } \
            || echo "setup: could not install bubblewrap with apt-get (see above)" >&2
    else
        echo "setup: bubblewrap is missing: install it (sudo apt-get install bubblewrap);" \
             "without it the agent runs only with sandbox = \"off\"" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
TORCH=${TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q "$TORCH"  # the default index's CUDA build
    else
        # One short try: where the index cannot be reached (offline, a firewall) the
        # fallback starts within seconds instead of after pip's minutes of retries.
        .venv/bin/python -m pip install -q --index-url "$CPU_INDEX" --timeout 15 \
                --retries 0 "$TORCH" 2> .venv/pip-torch.log \
            || { echo "setup: $CPU_INDEX did not serve $TORCH (.venv/pip-torch.log);" \
                      "trying the default index" >&2
                 .venv/bin/python -m pip install -q "$TORCH"; }
    fi
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q -e ".[test]" 2> .venv/pip-install.log \
        || { cat .venv/pip-install.log; exit 1; }
    rm -f .venv/.installed-*
    touch "$stamp"
fi
