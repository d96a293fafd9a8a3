#!/usr/bin/env bash
# GPU smoke: every CUDA path of the agent, proven on one node in under 8 minutes.
#
#   bash benchmarks/gpu_smoke.sh                          # from the repo root
#   OUT=/some/dir SMOKE_BUDGET_S=420 bash benchmarks/gpu_smoke.sh
#
# Steps (docs/performance.md, "GPU smoke", says what each proves):
#   1  NVML figures with unit sanity, the agent's telemetry, and nvidia-smi agreeing
#   2a the fork server never initialises CUDA while its jobs train on the GPU (bf16 +
#      torch.compile, fp16 + GradScaler), node sandbox on;  2b the same, sandbox off
#   3  the gpu-marked tests, alone on the GPU: every one must run and pass
#   4  the rest of the test suite on this GPU node (in the background during 2a, 5, 6;
#      tests/conftest.py hides the GPU from tests not marked gpu, as CI has none)
#   5  batch inference on CUDA
#   6  the daemon: `python -m agent run` (embedded coordinator) and `agent submit --wait`
#      of a coordinator-shaped job (gpu / min_vram_gb / cuda, no gpu_count) lands on the GPU
#   7  cancel frees VRAM: NVML shows the job's memory released, and how soon
#   8  DDP over NCCL with two ranks (SKIP below two GPUs)
#   9  `agent bench --quick --json`: bf16 matmul and memory copy at 0.5-1.0 of spec per GPU
#
# Each step runs under its own `timeout`, prints its checks and one PASS/FAIL/SKIP line
# with its seconds, and keeps its log in $OUT/logs; a failed step never stops the rest.
# The end: a summary table (also $OUT/summary.txt), $OUT/figures.json, and the exit
# status = the number of failed steps (skipped ones are listed, not counted). Without a
# GPU (nvidia-smi missing or failing, or torch seeing no CUDA device) it prints "no GPU"
# and exits 99 at once.
#
# Environment: OUT (default: a new temporary folder), PYTHON (default .venv/bin/python if
# it exists, else python3), SMOKE_BUDGET_S (default 470: each step's limit is cut to what
# is left, and a step with under 20 s left is skipped), SMOKE_SKIP_SUITE=1 (skip step 4),
# SMOKE_KEEP_WORK=1 (keep the job folders, which hold GBs of checkpoints), NVIDIA_SMI
# (default nvidia-smi), SMOKE_DEVICE=cpu (a dry run of this harness on a machine without
# a GPU: the job steps run on the CPU and prove nothing about CUDA).
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi
SMI=${NVIDIA_SMI:-nvidia-smi}
BUDGET_S=${SMOKE_BUDGET_S:-470}
MIN_STEP_S=20
START_S=$(date +%s)
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke.XXXXXX")}
mkdir -p "$OUT/logs" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=
SUITE_PID=
FAILED=0
SKIPPED=0
declare -A NAMES RESULT SECS DETAIL

no_gpu() {
    echo "no GPU: $1"
    echo "no GPU: $1" >"$OUT/summary.txt"
    exit 99
}

# -- is there a GPU? (seconds, not minutes, when there is none) ---------------------------
detect_gpu() {
    command -v "$SMI" >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
    SMI_LIST=$(timeout 20 "$SMI" -L 2>&1) || no_gpu "nvidia-smi failed (exit $?): ${SMI_LIST:0:300}"
    grep -q '^GPU [0-9]' <<<"$SMI_LIST" || no_gpu "nvidia-smi lists no GPU: ${SMI_LIST:0:300}"
    TORCH_LINE=$(timeout 90 "$PY" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(n, "torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>"$OUT/logs/0-detect.log")
    [[ "$TORCH_LINE" =~ ^[1-9] ]] ||
        no_gpu "torch sees no CUDA device with $PY (${TORCH_LINE:-$(tail -n 1 "$OUT/logs/0-detect.log")})"
    NGPU=$(grep -c '^GPU [0-9]' <<<"$SMI_LIST")
}

DEVICE=${SMOKE_DEVICE:-cuda}
if [[ "$DEVICE" == cpu ]]; then  # a dry run of this harness where there is no GPU
    SMI_LIST="SMOKE_DEVICE=cpu: a dry run of the harness on the CPU; it proves no GPU path"
    TORCH_LINE="0 (jobs on the CPU)"
    NGPU=0
else
    detect_gpu
fi
if [[ -n "${GPU_SMOKE_ACTIVE:-}" ]]; then
    echo "gpu_smoke: refusing to run inside another gpu_smoke run (GPU_SMOKE_ACTIVE is set)"
    exit 98
fi
export GPU_SMOKE_ACTIVE=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke-work.XXXXXX") || exit 1
# shellcheck disable=SC2317  # only the EXIT trap calls it
cleanup() {
    if [[ -n "$SUITE_PID" ]]; then
        kill -TERM "$SUITE_PID" 2>/dev/null
        wait "$SUITE_PID" 2>/dev/null
    fi
    if [[ "${SMOKE_KEEP_WORK:-0}" != 1 && -n "$WORK" ]]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

remaining() { echo $((BUDGET_S - ($(date +%s) - START_S))); }

header() { printf '\n===== %s  %s =====\n' "$1" "${NAMES[$1]}"; }

record() {  # record ID RESULT SECONDS DETAIL
    RESULT[$1]=$2
    SECS[$1]=$3
    DETAIL[$1]=$4
    if [[ $2 == FAIL ]]; then FAILED=$((FAILED + 1)); fi
    if [[ $2 == SKIP ]]; then SKIPPED=$((SKIPPED + 1)); fi
    printf -- '--> %s %s (%ss) %s\n' "$2" "$1" "$3" "$4"
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "${NAMES[$1]}" "$2" "$3" "$4" >>"$OUT/steps.tsv"
}

show_log() {  # show_log LOG RC: the checks, and the log's tail when the step failed
    grep -E '^  (PASS|FAIL|NOTE)  |^SKIP: |^  failed: ' "$1" | cut -c1-400
    if (($2 != 0 && $2 != 77)); then
        echo "  --- last lines of $1 ---"
        tail -n 15 "$1" | cut -c1-400
    fi
}

finish() {  # finish ID RC SECONDS LIMIT LOG
    local figure
    figure=$(grep '^FIGURE: ' "$5" | tail -n 1 | cut -c9-)
    case $2 in
        0) record "$1" PASS "$3" "$figure" ;;
        77) record "$1" SKIP "$3" "$(grep -m 1 '^SKIP: ' "$5" | cut -c7-)" ;;
        124 | 137) record "$1" FAIL "$3" "timed out after $4s${figure:+; $figure}" ;;
        *) record "$1" FAIL "$3" "exit $2${figure:+; $figure}" ;;
    esac
}

# step ID NAME LIMIT_S COMMAND...: COMMAND under `timeout`, cut to the budget left; "{limit}"
# in COMMAND becomes the limit it got.
step() {
    local id=$1 limit=$3 left t0 rc dt arg args=()
    NAMES[$id]=$2
    shift 3
    header "$id"
    left=$(remaining)
    if ((left < MIN_STEP_S)); then
        record "$id" SKIP 0 "the time budget of ${BUDGET_S}s is spent"
        return
    fi
    ((limit > left)) && limit=$left
    for arg in "$@"; do args+=("${arg//\{limit\}/$limit}"); done
    echo "(limit ${limit}s, log $OUT/logs/$id.log)"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "${args[@]}" >"$OUT/logs/$id.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    show_log "$OUT/logs/$id.log" "$rc"
    finish "$id" "$rc" "$dt" "$limit" "$OUT/logs/$id.log"
}

pystep() {  # pystep ID NAME LIMIT_S STEP [ARGS...]: a step of benchmarks/gpu_smoke_steps.py
    local id=$1 name=$2 limit=$3 which=$4
    shift 4
    step "$id" "$name" "$limit" "$PY" -m benchmarks.gpu_smoke_steps "$which" --out "$OUT" \
        --work "$WORK/$id" --limit-s "{limit}" --device "$DEVICE" "$@"
}

# Step 4 runs in the background while steps that measure nothing run (2a, 5, 6, 1b); the
# steps that measure device memory or speed (7, 3, 9) run after it, alone.
suite_start() {
    NAMES[4]="the test suite on this GPU node (all but gpu-marked)"
    if [[ "${SMOKE_SKIP_SUITE:-0}" == 1 ]]; then
        return
    fi
    SUITE_LIMIT=$(remaining)
    ((SUITE_LIMIT > 270)) && SUITE_LIMIT=270
    SUITE_T0=$(date +%s)
    timeout --kill-after=15 "$SUITE_LIMIT" "$PY" -m benchmarks.gpu_smoke_steps suite \
        --out "$OUT" --work "$WORK/4" --limit-s "$SUITE_LIMIT" --device "$DEVICE" \
        >"$OUT/logs/4.log" 2>&1 &
    SUITE_PID=$!
    echo "step 4 (${NAMES[4]}) started in the background (limit ${SUITE_LIMIT}s)"
}

suite_wait() {
    local rc dt
    header 4
    if [[ -z "$SUITE_PID" ]]; then
        record 4 SKIP 0 "SMOKE_SKIP_SUITE=1"
        return
    fi
    echo "waiting for the background suite ($(($(date +%s) - SUITE_T0))s in so far)"
    wait "$SUITE_PID"
    rc=$?
    SUITE_PID=
    dt=$(($(date +%s) - SUITE_T0))
    show_log "$OUT/logs/4.log" "$rc"
    finish 4 "$rc" "$dt" "$SUITE_LIMIT" "$OUT/logs/4.log"
}

summary() {
    local id
    printf '\n===== summary =====\n'
    {
        printf '%-4s %-5s %5s  %-58s %s\n' step result secs name figure
        for id in 1 1b 2a 2b 3 4 5 6 7 8 9; do
            [[ -n "${RESULT[$id]:-}" ]] || continue
            printf '%-4s %-5s %5s  %-58.58s %s\n' "$id" "${RESULT[$id]}" "${SECS[$id]}" \
                "${NAMES[$id]}" "${DETAIL[$id]}"
        done
        echo "$FAILED failed, $SKIPPED skipped; $(($(date +%s) - START_S))s in all" \
            "(budget ${BUDGET_S}s); logs and figures in $OUT"
    } | tee "$OUT/summary.txt"
}

echo "gpu_smoke: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), budget ${BUDGET_S}s, out $OUT"
echo "python $PY: ${TORCH_LINE#* } (${TORCH_LINE%% *} CUDA device(s))"
echo "$SMI_LIST"
: >"$OUT/steps.tsv"

pystep 1 "NVML figures and units, telemetry, nvidia-smi" 45 nvml
suite_start
pystep 2a "fork server never initialises CUDA (sandbox on)" 150 forkserver --sandbox on
pystep 5 "batch inference on CUDA" 90 inference
pystep 6 "daemon + submit: coordinator constraints land on the GPU" 150 daemon
pystep 1b "doctor: device nodes, torch in and out of the job sandbox" 40 doctor
suite_wait
pystep 7 "cancel frees VRAM" 120 cancel
pystep 9 "bench --quick: bf16 matmul, memory copy vs spec" $((60 + 40 * NGPU)) bench
pystep 3 "the gpu-marked tests, alone on the GPU" 150 gputests
pystep 8 "DDP over NCCL, two ranks" 150 ddp
if (($(remaining) >= 90)); then
    pystep 2b "fork server never initialises CUDA (sandbox off)" 120 forkserver --sandbox off
else
    NAMES[2b]="fork server never initialises CUDA (sandbox off)"
    header 2b
    record 2b SKIP 0 "under 90 s of the budget left"
fi

summary
"$PY" -m benchmarks.gpu_smoke_steps figures --out "$OUT" || echo "figures.json not written"
exit "$FAILED"
