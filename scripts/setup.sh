#!/usr/bin/env bash
# Create .venv with the agent and its test tools. Installs the CPU build of torch first
# (a plain `pip install torch` would pull a multi-GB CUDA build); on a GPU node install
# the CUDA build of torch instead (see README, "Install on a GPU node").
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
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q -e ".[test]" 2> .venv/pip-install.log \
        || { cat .venv/pip-install.log; exit 1; }
    rm -f .venv/.installed-*
    touch "$stamp"
fi
