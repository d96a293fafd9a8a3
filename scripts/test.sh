#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint and type-check, then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/mypy --no-error-summary agent runtimes benchmarks
exec .venv/bin/python -m pytest "$@"
