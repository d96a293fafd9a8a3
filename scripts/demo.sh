#!/usr/bin/env bash
# Set up, start the agent on its embedded coordinator, submit a sample training job,
# watch it finish, verify its package, and stop the agent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STATE=${STATE_DIR:-$PWD/.demo-state}
PORT=${DEMO_PORT:-8731}
# The demo's own state starts afresh each run: the sample job keeps its file's job_id,
# which an earlier run's embedded coordinator would refuse as taken (409).
[ -z "${STATE_DIR:-}" ] && rm -rf "$STATE"
mkdir -p "$STATE"
export MINER_AGENT_STATE_DIR="$STATE" MINER_AGENT_CACHE_DIR="$STATE/cache" \
       MINER_AGENT_EMBEDDED_PORT="$PORT" MINER_AGENT_CONFIG=/dev/null
.venv/bin/miner-agent run 2> "$STATE/agent.log" &
AGENT=$!
trap 'kill -TERM $AGENT 2>/dev/null; wait $AGENT 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "registered as" "$STATE/agent.log" && break
    kill -0 $AGENT 2>/dev/null || { cat "$STATE/agent.log"; exit 1; }
    sleep 0.2
done
echo "agent running (log: $STATE/agent.log); submitting examples/train-job.json"
JOB=$(.venv/bin/miner-agent submit examples/train-job.json)
.venv/bin/miner-agent status "$JOB" --wait
.venv/bin/miner-agent verify "$STATE/jobs/job_$JOB"
