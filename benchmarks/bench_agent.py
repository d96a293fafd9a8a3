"""The agent's own overhead through the whole loop, against the reference coordinator.

    python -m benchmarks.bench_agent [--quick]

Runs the real daemon (`miner-agent run`, fork server warm) against the reference
coordinator on loopback and prints, side by side:
- poll-to-first-progress latency of a tiny job (the poll answer to the job's first
  progress report, torch already imported in the fork server);
- jobs per second through the whole loop (poll, start, run, package, report) with
  tiny jobs: the agent's own overhead per job;
- cancel latency from the coordinator's cancel to the job's exit, in core mode
  (detected through the running-jobs list) and with the extensions (delivered in
  heartbeat/progress answers), at the agent's default intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from agent.config import AgentConfig
from agent.reference.coordinator import ReferenceCoordinator

KEYS = {"miner": "bench-miner", "client": "bench-client"}
TINY = {"type": "sleep", "steps": 1, "step_s": 0, "torch": True}


def ts(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else float("nan")


class Bench:
    def __init__(self, root: Path, extensions: tuple[str, ...] | None, **settings: Any) -> None:
        args: dict[str, Any] = {"api_keys": KEYS}
        if extensions is not None:
            args["extensions"] = extensions
        self.coord = ReferenceCoordinator(str(root / "coord.db"), **args)
        self.coord.start()
        self.http = httpx.Client(base_url=self.coord.base_url,
                                 headers={"X-Api-Key": KEYS["client"]})
        self.state = root / "state"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
        env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(self.state),
                    "MINER_AGENT_CACHE_DIR": str(root / "cache"),
                    "MINER_AGENT_API_KEY": KEYS["miner"], "MINER_AGENT_LOG_LEVEL": "WARNING"})
        env.update({f"MINER_AGENT_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = open(root / "agent.log", "wb")
        self.agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--coordinator",
                                       self.coord.base_url], env=env, stdout=self.log,
                                      stderr=subprocess.STDOUT)

    def submit(self, payload: dict[str, Any]) -> str:
        return str(self.http.post("/v1/jobs", json={"payload": payload}).json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.job(job_id)["status"] not in statuses:
            if time.monotonic() > deadline or self.agent.poll() is not None:
                raise RuntimeError(f"job {job_id} stuck; see the agent log")
            time.sleep(0.02)

    def output(self, job_id: str) -> dict[str, Any]:
        path = self.state / "jobs" / f"job_{job_id}" / "output.json"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return dict(json.loads(path.read_text()))

    def close(self) -> None:
        self.agent.send_signal(signal.SIGTERM)
        self.agent.wait(60)
        self.log.close()
        self.http.close()
        self.coord.stop()


def first_progress(b: Bench, n: int) -> list[float]:
    figures = []
    for _ in range(n + 1):
        job_id = b.submit(TINY)
        b.wait(job_id, ("completed",))
        figures.append(b.output(job_id)["metrics"]["first_progress_ms"])
    return figures[1:]  # the first job waits for the fork server to finish importing


def throughput(b: Bench, n: int) -> float:
    ids = [b.submit({"type": "sleep", "steps": 1, "step_s": 0}) for _ in range(n)]
    t0 = time.monotonic()
    for job_id in ids:
        b.wait(job_id, ("completed",))
    return n / (time.monotonic() - t0)


def cancel_latency(b: Bench, n: int, spread_s: float) -> list[float]:
    """Cancels land at a random point of the agent's check period, as clients' do."""
    figures = []
    rng = random.Random(7)
    for _ in range(n):
        job_id = b.submit({"type": "sleep", "steps": 10**7, "step_s": 0.01})
        b.wait(job_id, ("running",))
        while not (b.state / "jobs" / f"job_{job_id}").exists():
            time.sleep(0.01)
        time.sleep(0.3 + rng.uniform(0, spread_s))
        t0 = time.time()
        b.http.post(f"/v1/jobs/{job_id}/cancel", json={})
        out = b.output(job_id)
        figures.append((ts(out["cancel"]["exited_at"]) - t0) * 1000)
    return figures


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(values):8.1f} ms  p95 {p95:8.1f} ms  (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs")
    args = parser.parse_args()
    n = 5 if args.quick else 20
    defaults = AgentConfig()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        root = Path(tmp)
        (root / "core").mkdir()
        (root / "ext").mkdir()
        core = Bench(root / "core", extensions=(), cpu_slots=2)
        try:
            fp = first_progress(core, n)
            jps = throughput(core, n * 5)
            core_cancel = cancel_latency(core, max(3, n // 2),
                                         defaults.cancel_check_interval_s)
        finally:
            core.close()
        ext = Bench(root / "ext", extensions=None, cpu_slots=2)
        try:
            first_progress(ext, 1)  # warm
            ext_cancel = cancel_latency(ext, max(3, n // 2), defaults.heartbeat_interval_s)
        finally:
            ext.close()
    print("== agent loop (reference coordinator on loopback, fork server) ==")
    print(f"poll to first progress          : {summary(fp)}")
    print(f"tiny jobs through the whole loop: {jps:.1f} jobs/s with 2 slots "
          f"(a job every {1000 / jps:.0f} ms: poll, start, run, package, report)")
    print(f"cancel, core (running-list check every {defaults.cancel_check_interval_s:.0f} s): "
          f"{summary(core_cancel)}")
    print(f"cancel, extensions (heartbeat every {defaults.heartbeat_interval_s:.0f} s, progress "
          f"every {defaults.progress_interval_s:.0f} s): {summary(ext_cancel)}")


if __name__ == "__main__":
    main()
