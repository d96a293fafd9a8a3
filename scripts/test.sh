#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint and type-check, then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/mypy --no-error-summary agent runtimes benchmarks
# Two worker processes (pytest-xdist), a test file each at a time: the suite mostly
# waits on agents, jobs and sockets, so on two cores it takes about half as long.
# TEST_WORKERS=0 runs it in this one process; an -n among the arguments wins.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
