"""Log shipping against log capture, and the agent's memory, with two jobs logging flat out.

    python -m benchmarks.bench_logs [--quick | --tiny] [--mib N] [--repeats R]

Setup: the reference coordinator runs as its own process (`miner-agent coordinator`,
no rate limits), once offering the core protocol only and once every extension; a real
daemon (`miner-agent run`, two CPU slots, polls at most 0.5 s apart, default shipping
settings) serves each. Both pairs stay up for the whole run; the runs alternate
between them.

Workload: two `command` jobs at once, each a Python program that prints training-style
log lines (step, loss, learning rate, throughput: text that varies line to line) with
``print`` as fast as it can until it has written N MiB, then writes its own first- and
last-write times (``time.time()``) on stderr.

Figures, per job of each extension-mode run:
- capture: bytes on disk / (last write - first write), the job's own clock; the bytes
  on disk are checked to be the N MiB written;
- shipped: the same bytes / (moment the coordinator acknowledged the last byte - first
  write), the acknowledged end read from the coordinator
  (``GET /v1/miners/{id}/logs/offsets``, every 20 ms, the time taken after the
  answer; the same clock: one machine);
- ratio = shipped / capture (1.0: the coordinator had everything the moment the job
  stopped writing). The last chunk lands some tens of ms after the last write, so the
  ratio tells something for jobs that write for seconds (the default: 128 MiB each).
  The coordinator's copy is then compared with the file on disk.
The job's runtime is also paired across modes: the core-mode run and the
extension-mode run of the same repeat, ratio core / extensions (< 1: shipping slowed
the job down). Medians over the runs, with the spread (min-max).
CPU: the agent's and the coordinator's (user + system, /proc/PID/stat) per MiB logged,
over the extension-mode runs (the coordinator's includes the benchmark's own reads),
and the agent's over the core-mode runs (capture alone, for comparison).
Memory: the agent process's VmHWM (peak RSS, /proc/PID/status) after all runs, per
mode; the embedded mode (coordinator inside the agent process) is measured apart, on
one run, and is not held to the agent's target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.reference.embedded import KEYS_FILE
from agent.reference.model import EXTENSIONS
from benchmarks.loopback import KEYS, cpu_of, free_port, status_kib, stop

MINER_ID = "bench-logs"
JOB = r"""
import sys, time
target = int(sys.argv[1])
out, n, i = sys.stdout, 0, 0
t0 = time.time()
while n < target:
    line = (f"step {i:>9} | loss {1.0 / (1 + i * 1e-4):.6f} | lr {3e-4 * (1 - i / 1e9):.3e} "
            f"| {1234.5 + (i % 977) * 0.37:.1f} samples/s | grad_norm {(i * 7919) % 1000 / 97:.4f}")
    line = line[:target - n - 1] + "\n"
    out.write(line)
    n += len(line)
    i += 1
out.flush()
t1 = time.time()
print(f"BENCH {t0!r} {t1!r} {n}", file=sys.stderr)
"""
TARGET_RATIO = 0.9
TARGET_RSS_MB = 100.0


def base_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(root / "state"),
                "MINER_AGENT_CACHE_DIR": str(root / "cache"),
                "MINER_AGENT_API_KEY": KEYS["miner"], "MINER_AGENT_LOG_LEVEL": "WARNING",
                "MINER_AGENT_CPU_SLOTS": "2", "MINER_AGENT_ALLOWED_JOB_TYPES": "command",
                "MINER_AGENT_POLL_MAX_INTERVAL_S": "0.5"})
    return env


def wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer /health within 60 s")


class Node:
    """A coordinator process and an agent process serving it (or one embedded agent)."""

    def __init__(self, root: Path, extensions: str | None) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.log = open(root / "processes.log", "wb")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = base_env(root)
        self.coord: subprocess.Popen[bytes] | None = None
        argv = [sys.executable, "-m", "agent", "run", "--miner-id", MINER_ID]
        if extensions is None:  # embedded: the coordinator lives in the agent's process
            env["MINER_AGENT_EMBEDDED_PORT"] = str(port)
            (root / "state").mkdir()
            keys = {"miner_key": KEYS["miner"], "client_key": KEYS["client"]}
            (root / "state" / KEYS_FILE).write_text(json.dumps(keys))
        else:
            cenv = dict(env, REFCOORD_MINER_KEY=KEYS["miner"], REFCOORD_CLIENT_KEY=KEYS["client"])
            self.coord = subprocess.Popen(
                [sys.executable, "-m", "agent", "coordinator", "--port", str(port),
                 "--db", str(root / "coord.db"), "--extensions", extensions,
                 "--no-rate-limits"], env=cenv, stdout=self.log, stderr=subprocess.STDOUT)
            wait_healthy(self.url, self.coord, "the coordinator")
            argv += ["--coordinator", self.url]
        self.agent = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if self.coord is None:
            wait_healthy(self.url, self.agent, "the embedded agent")
        self.http = httpx.Client(base_url=self.url, headers={"X-Api-Key": KEYS["client"]},
                                 timeout=30)
        self.miner_headers = {"X-Api-Key": KEYS["miner"], "X-Miner-ID": MINER_ID}

    def submit(self, mib: int) -> str:
        payload = {"type": "command", "argv": [sys.executable, "-c", JOB, str(mib << 20)]}
        resp = self.http.post("/v1/jobs", json={"payload": payload})
        resp.raise_for_status()
        return str(resp.json()["job_id"])

    def status(self, job_id: str) -> str:
        return str(self.http.get(f"/v1/jobs/{job_id}").json()["status"])

    def acked(self, job_id: str) -> int:
        resp = self.http.get(f"/v1/miners/{job_id}/logs/offsets", headers=self.miner_headers)
        return int(resp.json().get("stdout", 0)) if resp.status_code == 200 else 0

    def folder(self, job_id: str) -> Path:
        return self.root / "state" / "jobs" / f"job_{job_id}"

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds (user + system) used so far by the agent and the coordinator."""
        pids = [self.agent.pid, self.coord.pid if self.coord else 0]
        return tuple(cpu_of(pid).own_s if pid else 0.0 for pid in pids)  # type: ignore[return-value]

    def hwm_mb(self) -> float:
        return status_kib(self.agent.pid, "VmHWM") * 1024 / 1e6

    def close(self) -> None:
        self.http.close()
        stop(self.agent, 60)
        if self.coord is not None:
            stop(self.coord, 60)
        self.log.close()


@dataclass
class JobRun:
    job_id: str
    size: int
    runtime_s: float  # the job's writing time: the capture window, paired across modes
    ship_s: float | None  # first write to the last byte acknowledged; None: core mode


def run_pair(node: Node, mib: int, shipping: bool) -> list[JobRun]:
    """Two jobs at once, until both completed and (shipping) fully acknowledged. The
    acknowledged ends are read back to back; a job's status only every 0.5 s."""
    ids = [node.submit(mib) for _ in range(2)]
    size = mib << 20
    acked_at: dict[str, float] = {}
    deadline = time.monotonic() + 600
    next_status = 0.0
    while True:
        for job_id in ids:
            if shipping and job_id not in acked_at and node.acked(job_id) >= size:
                acked_at[job_id] = time.time()  # after the answer: never early
        if time.monotonic() >= next_status or len(acked_at) == len(ids):
            states = [node.status(j) for j in ids]
            if any(s in ("failed", "canceled") for s in states):
                raise RuntimeError(f"a job did not complete: {states}; see {node.log.name}")
            if all(s == "completed" for s in states) and (not shipping
                                                          or len(acked_at) == len(ids)):
                break
            next_status = time.monotonic() + 0.5
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not done in 600 s: {states}")
        time.sleep(0.02 if shipping else 0.1)
    return [job_run(node, j, acked_at.get(j)) for j in ids]


def job_run(node: Node, job_id: str, acked_at: float | None) -> JobRun:
    logs = node.folder(job_id) / "logs"
    words = (logs / "stderr.log").read_text().split()
    t0, t1, written = float(words[1]), float(words[2]), int(words[3])
    on_disk = (logs / "stdout.log").stat().st_size
    if on_disk != written:
        raise RuntimeError(f"job {job_id} wrote {written} bytes, {on_disk} on disk")
    return JobRun(job_id, on_disk, t1 - t0, None if acked_at is None else acked_at - t0)


def check_copies(node: Node, runs: list[JobRun]) -> None:
    """The coordinator's copy of each job's stdout is the file on disk, byte for byte."""
    for run in runs:
        digest = hashlib.sha256()
        with node.http.stream("GET", f"/v1/jobs/{run.job_id}/logs",
                              params={"stream": "stdout"}) as resp:
            for chunk in resp.iter_bytes(1 << 20):
                digest.update(chunk)
        with open(node.folder(run.job_id) / "logs" / "stdout.log", "rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != digest.hexdigest():
                raise RuntimeError(f"job {run.job_id}: the coordinator's copy differs from "
                                   "the file on disk")


def spread(values: list[float]) -> str:
    return (f"median {statistics.median(values):.2f}x  spread {min(values):.2f}-"
            f"{max(values):.2f}x  (n={len(values)})")


def mib_s(runs: list[JobRun], seconds: str) -> float:
    return statistics.median(r.size / getattr(r, seconds) / (1 << 20) for r in runs)


def measure(root: Path, mib: int, repeats: int, warm: bool = True) -> dict[str, Any]:
    core, ext = Node(root / "core", ""), Node(root / "ext", ",".join(EXTENSIONS))
    ext_runs: list[JobRun] = []
    paired: list[float] = []
    cpu = {"agent (core mode)": 0.0, "agent": 0.0, "coordinator": 0.0}
    try:
        if warm:  # the first job of an agent pays for imports and the sandbox's set-up
            run_pair(core, 1, False), run_pair(ext, 1, True)
        for i in range(repeats):
            order = [(core, False), (ext, True)] if i % 2 == 0 else [(ext, True), (core, False)]
            got = {}
            for node, shipping in order:
                before = node.cpu_s()
                got[shipping] = run_pair(node, mib, shipping)
                agent_s, coord_s = (b - a for a, b in zip(before, node.cpu_s(), strict=True))
                cpu["agent" if shipping else "agent (core mode)"] += agent_s
                cpu["coordinator"] += coord_s if shipping else 0.0
            ext_runs += got[True]
            check_copies(ext, got[True])
            paired.append(statistics.median(r.runtime_s for r in got[False])
                          / statistics.median(r.runtime_s for r in got[True]))
        rss = {"core": core.hwm_mb(), "extensions": ext.hwm_mb()}
    finally:
        core.close()
        ext.close()
    embedded = Node(root / "embedded", None)
    try:
        runs = run_pair(embedded, mib, True)
        rss["embedded"] = embedded.hwm_mb()  # before the check reads the copies back
        check_copies(embedded, runs)
    finally:
        embedded.close()
    logged_mib = sum(r.size for r in ext_runs) / (1 << 20)
    return {"runs": ext_runs, "paired": paired, "rss": rss,
            "cpu_ms_per_mib": {k: v * 1000 / logged_mib for k, v in cpu.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB a job, 2 repeats")
    parser.add_argument("--tiny", action="store_true",
                        help="2 MiB a job, 1 repeat: a smoke test (its ratio means nothing)")
    parser.add_argument("--mib", type=int, help="MiB each job prints (default 128)")
    parser.add_argument("--repeats", type=int, help="runs per mode (default 5)")
    args = parser.parse_args()
    mib = args.mib or (2 if args.tiny else 32 if args.quick else 128)
    repeats = args.repeats or (1 if args.tiny else 2 if args.quick else 5)
    print(__doc__.split("\n\n", 2)[2].rstrip())
    print(f"\n== two jobs printing {mib} MiB each, {repeats} runs per mode ==")
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        got = measure(Path(tmp), mib, repeats, warm=not args.tiny)
    runs: list[JobRun] = got["runs"]
    ratios = [r.runtime_s / r.ship_s for r in runs if r.ship_s]
    print(f"capture (bytes on disk / s, per job): median {mib_s(runs, 'runtime_s'):.1f} MiB/s")
    print(f"shipped (bytes acknowledged / s)    : median {mib_s(runs, 'ship_s'):.1f} MiB/s")
    print(f"ratio shipped / capture             : {spread(ratios)}  target >= {TARGET_RATIO}x")
    print(f"job runtime core / extensions (paired): {spread(got['paired'])}")
    print("coordinator's copy == bytes on disk : yes (every job)")
    print("CPU per MiB logged: " + ", ".join(
        f"{who} {ms:.1f} ms" for who, ms in got["cpu_ms_per_mib"].items()))
    for mode, mb in got["rss"].items():
        target = f"target <= {TARGET_RSS_MB:.0f} MB" if mode != "embedded" else \
            "(its own figure: coordinator in-process)"
        print(f"agent peak RSS (VmHWM), {mode:<10}: {mb:6.1f} MB ({mb * 1e6 / (1 << 20):.1f} "
              f"MiB)  {target}")


if __name__ == "__main__":
    main()
