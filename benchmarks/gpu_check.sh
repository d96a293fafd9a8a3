#!/usr/bin/env bash
# Deprecated alias: the GPU node check is benchmarks/gpu_smoke.sh now (the decided name,
# /work/shared/DECISIONS.md). This runs it with the same arguments and environment;
# GPU_CHECK_BUDGET_S still sets the time budget (SMOKE_BUDGET_S wins when both are set).
echo "benchmarks/gpu_check.sh is deprecated: running benchmarks/gpu_smoke.sh" >&2
if [[ -n "${GPU_CHECK_BUDGET_S:-}" && -z "${SMOKE_BUDGET_S:-}" ]]; then
    export SMOKE_BUDGET_S=$GPU_CHECK_BUDGET_S
fi
exec bash "$(dirname "$0")/gpu_smoke.sh" "$@"
