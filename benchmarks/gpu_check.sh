#!/usr/bin/env bash
# GPU node check: what the device is, what it delivers, and that the agent runs jobs on
# it (throughput as a job vs bare, cancel frees device memory). Prints figures, one
# PASS/FAIL/SKIP per section and a summary; a failing section never stops the rest.
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh          # from the repo root
#   PYTHON=/opt/venv/bin/python PYTHONPATH=$PWD bash benchmarks/gpu_check.sh
#
# Needs nothing installed beyond torch (CUDA build), nvidia-ml-py, psutil and httpx, and
# no network: the project is run from the checkout (python -m agent / -m benchmarks),
# never through the miner-agent entry point. The whole run fits in GPU_CHECK_BUDGET_S
# (default 460 s): each section's limit is cut to what is left. On a machine without a
# GPU it says so and skips the CUDA sections. Exit status: the number of failed
# sections (0: all passed or skipped).
set -u

cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
START_S=$(date +%s)
SUMMARY=()
FAILED=0

remaining() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

header() { printf '\n===== %s =====\n' "$1"; }

record() {  # record STATUS NAME DETAIL
    SUMMARY+=("$(printf '%-5s %-44s %s' "$1" "$2" "$3")")
    echo "--> $1 $2 $3"
}

# section [--soft] NAME LIMIT_S CMD...: run CMD under a time limit and record the result.
# --soft: a non-zero exit is a WARN, not a FAIL (doctor's coordinator checks).
section() {
    local soft=0
    if [[ "$1" == --soft ]]; then soft=1; shift; fi
    local name=$1 limit=$2
    shift 2
    header "$name"
    local left
    left=$(remaining)
    if ((left < 20)); then
        record SKIP "$name" "(time budget of ${BUDGET_S}s spent)"
        return
    fi
    ((limit > left)) && limit=$left
    local t0 rc dt
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        record PASS "$name" "(${dt}s)"
    elif ((rc == 124 || rc == 137)); then
        record FAIL "$name" "(timed out after ${limit}s)"
        FAILED=$((FAILED + 1))
    elif ((soft)); then
        record WARN "$name" "(exit $rc, ${dt}s: expected without a coordinator)"
    else
        record FAIL "$name" "(exit $rc, ${dt}s)"
        FAILED=$((FAILED + 1))
    fi
}

skip() {  # skip NAME WHY
    header "$1"
    echo "SKIP: $2"
    record SKIP "$1" "($2)"
}

VERSIONS_PY='
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
'

MATMUL_PY='
import torch
dev = torch.device("cuda", 0)
def tflops(dtype, tf32, n=8192, target_s=1.0):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); a @ b; end.record(); end.synchronize()
    iters = max(5, int(target_s * 1000 / max(start.elapsed_time(end), 1e-3)))
    start.record()
    for _ in range(iters):
        a @ b
    end.record(); end.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000) / 1e12
print(f"{torch.cuda.get_device_name(dev)}, matmul 8192x8192:")
for label, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                           ("bf16", torch.bfloat16, False)):
    print(f"  {label:5s} {tflops(dtype, tf32):8.1f} TFLOP/s")
'

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), python: $PY, budget ${BUDGET_S}s"

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 \
        && timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
            2>/dev/null; then
    GPU=1
fi

if ((GPU)); then
    section "nvidia-smi" 30 bash -c 'nvidia-smi && nvidia-smi --format=csv \
        --query-gpu=index,name,driver_version,memory.total,memory.used,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.max.sm,pstate'
else
    header "GPU"
    echo "no GPU: skipping CUDA sections (nvidia-smi: $(command -v nvidia-smi || echo 'not found');" \
         "torch.cuda.is_available() is not True for $PY)"
fi

section "torch and CUDA versions" 90 "$PY" -c "$VERSIONS_PY"

if ((GPU)); then
    section "matmul TFLOP/s (fp32, tf32, bf16)" 90 "$PY" -c "$MATMUL_PY"
    section "runtimes: training + inference, job vs bare (cuda)" 240 \
        "$PY" -m benchmarks.bench_runtimes --device cuda --quick
    section "cancel on the GPU frees device memory" 180 "$PY" -m benchmarks.gpu_cancel_check
    section "nvidia-smi after the jobs (no job process left)" 30 \
        nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
else
    skip "matmul TFLOP/s (fp32, tf32, bf16)" "no GPU"
    skip "runtimes: training + inference, job vs bare (cuda)" "no GPU"
    # The harness still gets exercised: tiny sizes on the CPU, figures not meaningful.
    section "runtimes harness on the CPU (--tiny)" 120 \
        "$PY" -m benchmarks.bench_runtimes --device cpu --tiny
    skip "cancel on the GPU frees device memory" "no GPU"
fi

section --soft "agent doctor" 60 "$PY" -m agent doctor --config /dev/null

if ((GPU)); then
    section "agent bench (full)" 180 "$PY" -m agent bench
else
    section "agent bench --quick (CPU)" 180 "$PY" -m agent bench --quick
fi

header "summary"
printf '%s\n' "${SUMMARY[@]}"
echo "$FAILED failed; $(($(date +%s) - START_S))s in all (budget ${BUDGET_S}s)"
exit "$FAILED"
