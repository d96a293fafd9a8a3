"""The agent's own latency and cost per job, through the real daemon on loopback.

    python -m benchmarks.bench_agent [--quick] [--jobs N] [--only a,b,c,d] [--profile FILE]

Every part runs the real daemon (`miner-agent run`, default config: fork server,
sandbox as configured, log level INFO, into a file) against the reference coordinator
started as a SEPARATE process (`python -m agent.coordinator.reference`), so the
coordinator's CPU is not the agent's. Each part prints its method with its figures:

(a) idle latency: a tiny job submitted to an idle agent at a random moment (a random
    idle gap before each), from the coordinator's ``created_at`` to the job's
    ``started`` event (``started_at`` in the package's output.json, stamped by the
    agent when the job's process says it started). Two arms: "core" (extensions
    limited to the core: the agent polls, its idle interval capped) and "longpoll"
    (the reference's default extensions, run only where it announces ``longpoll``).
    Median always; p95 only with at least 20 samples.
(b) steady-state jobs/s: tiny jobs submitted ahead so the 4 slots stay full, core
    coordinator; from the first job's start to the last one's report.
(c) agent CPU per tiny job over the same run (200 jobs; --quick runs fewer and says
    so): utime+stime of the `miner-agent run` process itself from /proc/PID/stat,
    before and after, divided by the jobs. The fork server (with the jobs it forked and
    reaped), the agent's other reaped children and the coordinator are printed apart;
    so is what the idle agent spends in the same time (timers), which is included.
    Three rounds of 200 on one warm agent (--rounds), each printed, judged on their
    median with the spread: on this 2-core VM one round varies by +-15 % run to run.
(d) cancel latency: a client's cancel to the job's exit, core (running-list check)
    and with the extensions (heartbeat/progress answers), at the default intervals.
(e) the daemon's event loop, side by side (--only e): two warm agents, one on asyncio's
    loop and one on uvloop, each on its own core coordinator, take rounds of 100 tiny
    jobs (--jobs) in turn (which goes first alternates); the agent process's CPU per job of each
    pair and their ratio uvloop/asyncio, judged on the median of the pairs (--pairs).

``--profile FILE`` records the agent process with py-spy during part (c) (250 Hz,
samples of the thread holding the GIL: Python's CPU, not the kernel's), as collapsed
stacks for a flame graph.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.loopback import KEYS, Coordinator, Cpu, cpu_of, free_port, thread_switches

TINY = {"type": "sleep", "steps": 1, "step_s": 0}
SLOTS = 4
P95_MIN_SAMPLES = 20


def ts(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else float("nan")


class Agent:
    """`miner-agent run` in its own process, default config but for ``settings``."""

    def __init__(self, root: Path, coord: Coordinator, **settings: Any) -> None:
        self.coord = coord
        self.state = root / "state"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
        env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(self.state),
                    "MINER_AGENT_CACHE_DIR": str(root / "cache"),
                    "MINER_AGENT_API_KEY": KEYS["miner"]})
        self.metrics_port = free_port()  # its call counts, read before and after a run
        env["MINER_AGENT_METRICS_PORT"] = str(self.metrics_port)
        env.update({f"MINER_AGENT_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = root / "agent.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--coordinator",
                                      coord.url], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._terminated = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fork_server(self) -> int | None:
        """The long-lived process that forks the jobs, under the sandbox's bwrap where
        there is one (None with another launcher)."""
        kids = [p for p in psutil.Process(self.pid).children(recursive=True)
                if p.cmdline()[1:3] == ["-m", "runtimes.forkserver"]]  # not its bwrap
        return kids[0].pid if kids else None

    def counts(self) -> tuple[dict[str, float], float | None]:
        """From one scrape of the agent's Prometheus metrics: coordinator calls made so
        far, by endpoint, and the journal's fdatasync calls (None from an agent without
        that metric)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        calls = {m[1]: float(m[2]) for m in re.finditer(
            r'^miner_agent_coordinator_request_duration_seconds_count\{endpoint="([^"]+)"\} '
            r'(\S+)$', text, re.M)} | {"": 0.0}
        found = re.search(r"^miner_agent_journal_flushes_total (\S+)$", text, re.M)
        return calls, float(found[1]) if found else None

    def registered(self) -> str:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "registered as" in line:
                return line.split("extensions:", 1)[-1].strip()
        return "?"

    def wait(self, job_id: str, statuses: tuple[str, ...] = ("completed",),
             timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.coord.job(job_id)
            if job["status"] in statuses:
                return job
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
                raise RuntimeError(f"job {job_id} is {job['status']}; the agent's log ends:\n"
                                   + "\n".join(tail))
            time.sleep(0.01)

    def output(self, job_id: str) -> dict[str, Any]:
        import json

        path = self.state / "jobs" / f"job_{job_id}" / "output.json"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return dict(json.loads(path.read_text()))

    def terminate(self) -> None:
        """SIGTERM once (a second one would cancel running jobs)."""
        if not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        self.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def summary(values: list[float], unit: str = "ms") -> str:
    """Median always; p95 only where there are enough samples to mean something."""
    if not values:
        return "no samples"
    ordered = sorted(values)
    text = f"median {statistics.median(values):8.1f} {unit}"
    if len(values) >= P95_MIN_SAMPLES:
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        text += f"  p95 {p95:8.1f} {unit}"
    else:
        text += f"  (p95 needs >= {P95_MIN_SAMPLES} samples)"
    return text + f"  max {ordered[-1]:8.1f} {unit}  (n={len(values)})"


def warm(agent: Agent, n: int = 2) -> None:
    """The first jobs wait for the fork server's imports: not counted anywhere. All are
    submitted at once: one after another, each would wait out the idle poll's back-off."""
    for job_id in [agent.coord.submit(TINY) for _ in range(n)]:
        agent.wait(job_id)


# -- (a) idle latency ---------------------------------------------------------------------
def idle_latency(agent: Agent, n: int, max_gap_s: float, seed: int = 7) -> list[float]:
    """created_at (coordinator) -> started event (package), each job on an idle agent."""
    rng = random.Random(seed)
    figures = []
    for _ in range(n):
        time.sleep(rng.uniform(0.0, max_gap_s))  # a random point of the idle poll cycle
        job_id = agent.coord.submit(TINY)
        created = ts(agent.wait(job_id)["created_at"])
        figures.append((ts(agent.output(job_id)["started_at"]) - created) * 1000)
    return figures


def run_idle(root: Path, arm: str, extensions: tuple[str, ...] | None, n: int,
             max_gap_s: float) -> tuple[list[float], str] | None:
    """One arm; None where it needs ``longpoll`` and the coordinator does not announce it."""
    coord = Coordinator(root / f"idle-{arm}" / "coord", extensions)
    if arm == "longpoll" and "longpoll" not in coord.extensions:
        print(f"  longpoll: not run, the reference announces {list(coord.extensions)}")
        coord.close()
        return None
    agent = Agent(root / f"idle-{arm}", coord, cpu_slots=SLOTS)
    try:
        warm(agent)
        return idle_latency(agent, n, max_gap_s), agent.registered()
    finally:
        agent.close()
        coord.close()


# -- (b) and (c) steady state and CPU per job ---------------------------------------------
@dataclass
class Steady:
    jobs: int
    wall_s: float
    agent_s: float
    agent_sys_s: float
    agent_children_s: float
    fork_server_s: float
    jobs_s: float
    coordinator_s: float
    idle_agent_s: float  # what the idle agent spent in as long a time, included above
    idle_window_s: float
    calls: dict[str, float]  # coordinator calls per job, by endpoint
    reference_ms: float  # this machine's speed just before the round (reference_ms())
    switches: dict[str, tuple[float, float]]  # context switches per job, by thread group
    flushes: float | None  # journal flushes (fdatasync) per job


def snapshot(agent: Agent, coord: Coordinator, fs_pid: int | None) -> dict[str, Cpu]:
    out = {"agent": cpu_of(agent.pid), "coord": cpu_of(coord.proc.pid)}
    if fs_pid is not None:
        out["fs"] = cpu_of(fs_pid)
    return out


def idle_rate(agent: Agent, window_s: float) -> float:
    """The idle agent's own CPU per second (timers: heartbeats, polls, sampling)."""
    before = cpu_of(agent.pid).own_s
    time.sleep(window_s)
    return (cpu_of(agent.pid).own_s - before) / window_s


def reference_ms(repeat: int = 3) -> float:
    """CPU milliseconds of a fixed piece of Python work much like the agent's own (JSON,
    dicts, strings, small objects), fastest of ``repeat``, in this benchmark's process
    while the agent idles. This VM's speed drifts by 2x from day to day (a neighbour's
    load); the figure puts rounds measured on different days side by side."""
    body = {"job_id": "j" * 32, "payload": {"type": "sleep", "steps": 1, "args": list(range(20))},
            "constraints": {"gpus": 0, "tags": {"zone": "a"}}, "metrics": {"units": 1.5}}
    best = float("inf")
    for _ in range(repeat):
        began = time.process_time()
        for i in range(4000):
            text = json.dumps(body)
            back = json.loads(text)
            back["n"] = f"{i}:{back['job_id'][:8]}"
            sorted(back.items(), key=lambda kv: kv[0])
        best = min(best, time.process_time() - began)
    return best * 1000


def run_ahead(agent: Agent, n: int) -> list[str]:
    """``n`` tiny jobs submitted ahead (the 4 slots stay full), each waited for."""
    ids = [agent.coord.submit(TINY) for _ in range(n)]
    for job_id in ids:
        agent.wait(job_id)
    return ids


def steady(agent: Agent, coord: Coordinator, n: int, profile: Path | None) -> Steady:
    fs_pid = agent.fork_server()
    rate = idle_rate(agent, 3.0)
    reference = reference_ms()
    spy = start_profile(agent.pid, profile)
    calls, flushed = agent.counts()
    switched = thread_switches(agent.pid)
    before, t0 = snapshot(agent, coord, fs_pid), time.monotonic()
    ids = run_ahead(agent, n)
    after, wall = snapshot(agent, coord, fs_pid), time.monotonic() - t0
    switches = {k: ((v[0] - switched[k][0]) / n, (v[1] - switched[k][1]) / n)
                for k, v in thread_switches(agent.pid).items()}
    stop_profile(spy, profile)
    calls_after, flushed_after = agent.counts()
    calls = {k: (v - calls.get(k, 0.0)) / n for k, v in calls_after.items() if k}
    flushes = ((flushed_after - flushed) / n
               if flushed is not None and flushed_after is not None else None)
    first = ts(agent.output(ids[0])["started_at"])
    last = max(ts(coord.job(j)["finished_at"]) for j in ids[-2 * SLOTS:])
    fs = (after["fs"].own_s - before["fs"].own_s) if fs_pid else 0.0
    jobs = (after["fs"].children_s - before["fs"].children_s) if fs_pid else 0.0
    return Steady(n, wall, after["agent"].own_s - before["agent"].own_s,
                  after["agent"].sys_s - before["agent"].sys_s,
                  after["agent"].children_s - before["agent"].children_s, fs, jobs,
                  after["coord"].own_s - before["coord"].own_s, rate * wall,
                  last - first if last > first else wall, calls, reference, switches,
                  flushes)


def start_profile(pid: int, path: Path | None) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if path is None or not Path(spy).exists():
        if path is not None:
            print("py-spy not found: no profile (pip install py-spy)")
        return None
    proc = subprocess.Popen([spy, "record", "-p", str(pid), "-r", "250", "--threads", "--gil",
                             "--format", "raw", "-o", str(path), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached before the jobs start counting
    return proc


def stop_profile(spy: subprocess.Popen[bytes] | None, path: Path | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        return
    if spy.returncode not in (0, -signal.SIGINT) and err:
        print(f"py-spy: {err.decode(errors='replace').strip()[-300:]}")
    else:
        print(f"profile of the agent during (c): {path} (collapsed stacks)")


def run_steady(root: Path, n: int, rounds: int, profile: Path | None) -> list[Steady]:
    """``rounds`` runs of ``n`` jobs on one warm agent (the profile records the first)."""
    coord = Coordinator(root / "steady" / "coord", ())
    agent = Agent(root / "steady", coord, cpu_slots=SLOTS)
    try:
        warm(agent, 2 * SLOTS)
        runs = [steady(agent, coord, n, profile if i == 0 else None) for i in range(rounds)]
        print_agent_notes(agent)
        return runs
    finally:
        agent.close()
        coord.close()


def print_agent_notes(agent: Agent) -> None:
    """What the agent itself said it changed, or warned about, during the rounds: a mode
    it switched to (a seal sent to a thread) changes what a job costs."""
    lines = agent.log_path.read_text(errors="replace").splitlines()
    notes = [line for line in lines if " WARNING " in line or " ERROR " in line
             or "in a thread for the next" in line or "event loop:" in line]
    print(f"  the agent's log during the rounds: {len(lines)} lines, {len(notes)} warnings or "
          "mode switches" + (":" if notes else ""))
    for line in notes[:5]:
        print(f"    {line[:200]}")


# -- (d) cancel latency -----------------------------------------------------------------
def cancel_latency(agent: Agent, n: int, spread_s: float) -> list[float]:
    """Cancels land at a random point of the agent's check period, as clients' do."""
    figures = []
    rng = random.Random(7)
    for _ in range(n):
        job_id = agent.coord.submit({"type": "sleep", "steps": 10**7, "step_s": 0.01})
        agent.wait(job_id, ("running",))
        while not (agent.state / "jobs" / f"job_{job_id}").exists():
            time.sleep(0.01)
        time.sleep(0.3 + rng.uniform(0, spread_s))
        t0 = time.time()
        agent.coord.http.post(f"/v1/jobs/{job_id}/cancel", json={})
        out = agent.output(job_id)
        figures.append((ts(out["cancel"]["exited_at"]) - t0) * 1000)
    return figures


def run_cancel(root: Path, arm: str, extensions: tuple[str, ...] | None, n: int,
               spread_s: float) -> list[float]:
    coord = Coordinator(root / f"cancel-{arm}" / "coord", extensions)
    agent = Agent(root / f"cancel-{arm}", coord, cpu_slots=2)
    try:
        warm(agent, 1)
        return cancel_latency(agent, n, spread_s)
    finally:
        agent.close()
        coord.close()


# -- (e) the event loop, side by side ------------------------------------------------------
def agent_cpu_per_job(agent: Agent, n: int) -> float:
    """ms of the agent process's CPU per tiny job over ``n`` submitted ahead."""
    before = cpu_of(agent.pid).own_s
    run_ahead(agent, n)
    return (cpu_of(agent.pid).own_s - before) * 1000 / n


def run_loops(root: Path, pairs: int, n: int) -> None:
    print(f"\n== (e) the daemon's event loop: {pairs} pairs of {n} tiny jobs, {SLOTS} slots, "
          "a core coordinator each, arms alternating ==")
    agents: dict[str, Agent] = {}
    try:
        for kind in ("asyncio", "uvloop"):
            coord = Coordinator(root / f"loop-{kind}" / "coord", ())
            agents[kind] = Agent(root / f"loop-{kind}", coord, cpu_slots=SLOTS,
                                 event_loop=kind)
        for agent in agents.values():  # both started at once: their imports overlap
            warm(agent, 2 * SLOTS)
        ratios: list[float] = []
        figures: dict[str, list[float]] = {kind: [] for kind in agents}
        for i in range(pairs):
            order = ("asyncio", "uvloop") if i % 2 == 0 else ("uvloop", "asyncio")
            got = {kind: agent_cpu_per_job(agents[kind], n) for kind in order}
            for kind, ms in got.items():
                figures[kind].append(ms)
            ratios.append(got["uvloop"] / got["asyncio"])
            print(f"  pair {i + 1}: asyncio {got['asyncio']:6.2f}  uvloop {got['uvloop']:6.2f} "
                  f"ms/job  uvloop/asyncio {ratios[-1]:.3f}")
        print(f"  median asyncio {statistics.median(figures['asyncio']):.2f}, uvloop "
              f"{statistics.median(figures['uvloop']):.2f} ms/job; uvloop/asyncio per pair "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}, "
              f"n={pairs})")
        for agent in agents.values():
            print_agent_notes(agent)
    finally:
        for agent in agents.values():  # both drain at once
            agent.terminate()
        for agent in agents.values():
            agent.close()
            agent.coord.close()


# -- report -------------------------------------------------------------------------------
def print_steady(runs: list[Steady], quick: bool) -> None:
    s = runs[len(runs) // 2] if len(runs) % 2 else runs[0]
    per_job = sorted(r.agent_s * 1000 / r.jobs for r in runs)
    rates = sorted(r.jobs / r.idle_window_s for r in runs)
    print(f"\n== (b) steady state: {s.jobs} tiny jobs {TINY} submitted ahead, {SLOTS} slots, "
          f"core coordinator, {len(runs)} round(s) on one agent ==")
    for r in runs:
        print(f"  {r.jobs / r.idle_window_s:.1f} jobs/s from the first job's start to the last "
              f"report ({r.idle_window_s:.2f} s); {r.jobs / r.wall_s:.1f} jobs/s counting the "
              f"first poll and the client's view ({r.wall_s:.2f} s)")
    if len(runs) > 1:
        print(f"  median {statistics.median(rates):.1f} jobs/s ({rates[0]:.1f}-{rates[-1]:.1f}, "
              f"n={len(runs)} rounds)")
    ms = 1000 / s.jobs
    note = " (fewer than the 200 the target is measured on)" if quick else ""
    print(f"\n== (c) CPU per tiny job over {s.jobs} jobs{note}, each round ==")
    for r in runs:
        print(f"  agent process (utime+stime, /proc/PID/stat): {r.agent_s * 1000 / r.jobs:6.2f}"
              f" ms/job ({r.agent_sys_s * 1000 / r.jobs:.2f} ms of it in the kernel)")
    print(f"  median {statistics.median(per_job):.2f} ms/job ({per_job[0]:.2f}-{per_job[-1]:.2f}, "
          f"n={len(runs)} rounds)  target <= 5 ms")
    refs = sorted(r.reference_ms for r in runs)
    print(f"  this machine's speed: a reference piece of Python work took {refs[0]:.0f}-"
          f"{refs[-1]:.0f} ms of CPU before the rounds (reference_ms(); the "
          "table in docs/performance.md gives its own): compare days at a like reference")
    print(f"  the others, {'the middle round' if len(runs) % 2 else 'round 1'}:")
    print(f"    idle agent's timers in as long (included): {s.idle_agent_s * ms:6.2f} ms/job")
    print(f"    fork server itself                        : {s.fork_server_s * ms:6.2f} ms/job")
    print(f"    job processes (reaped by the fork server) : {s.jobs_s * ms:6.2f} ms/job")
    print(f"    agent's other reaped children             : {s.agent_children_s * ms:6.2f} ms/job")
    print(f"    coordinator (separate process, not counted): {s.coordinator_s * ms:6.2f} ms/job")
    per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s.calls.items()) if v)
    print(f"    coordinator calls per job: {sum(s.calls.values()):.2f} ({per})")
    if s.flushes is not None:
        print(f"    journal flushes (fdatasync) per job: {s.flushes:.2f}")
    print("    agent's context switches per job, voluntary + involuntary (each a thread "
          "wake-up or preemption): " + ", ".join(
              f"{k} {v[0]:.1f} + {v[1]:.1f}" for k, v in s.switches.items()))


def describe_filesystem(path: Path) -> str:
    """The filesystem under ``path``, and for ext4 whether it has a journal: without one,
    ext4 skips recently deleted inodes one by one when it makes a file (a kernel cost
    per new file that grows with the rate of deletions; journaled ext4 and XFS do not)."""
    best = ("?", "?", "?")
    real = str(path.resolve())
    with open("/proc/mounts") as fh:
        for line in fh:
            device, mount, fstype = line.split()[:3]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) \
                    and len(mount) >= len(best[1]):
                best = (device, mount, fstype)
    device, mount, fstype = best
    text = f"{fstype} at {mount} ({device})"
    if fstype == "ext4":
        name = Path(device).name
        journals = [j.name for j in Path("/proc/fs/jbd2").glob("*")] \
            if Path("/proc/fs/jbd2").is_dir() else []
        journaled = any(j.startswith(name + "-") for j in journals)
        text += ", with a journal" if journaled else ", without a journal (see --help of --dir)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and jobs (says so in the output)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs for (b) and (c) (200; --quick: 40), for each round of "
                             "(e) (100)")
    parser.add_argument("--only", default="a,b,c,d",
                        help="parts to run, comma-separated (a,b,c,d,e; b and c run "
                             "together; e only when named)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs of rounds in (e) (12; --quick: 4)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the agent with py-spy during (c) into this file")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of (b) and (c) on one agent, median and spread printed "
                             "(3; --quick: 1)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the agents' state and job folders go (a temporary "
                             "folder under it; default: the system's temporary folder): "
                             "the filesystem there shapes the kernel time of (c)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    n_idle = 5 if args.quick else P95_MIN_SAMPLES
    n_jobs = args.jobs or (40 if args.quick else 200)
    from agent.config import AgentConfig

    defaults = AgentConfig()
    print(__doc__.split("\n\n", 2)[2].split("``--profile")[0].rstrip())
    with tempfile.TemporaryDirectory(prefix="bench-agent-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"\nstate and job folders on: {describe_filesystem(root)}")
        if "a" in parts:
            gap = 1.0 if args.quick else 4.0
            print(f"\n== (a) idle latency: created_at -> started, a random idle gap of "
                  f"0-{gap:.0f} s before each job, {SLOTS} slots ==")
            arms = (("core", (), f"idle poll capped at poll_max_interval_s "
                                 f"{defaults.poll_max_interval_s:g} s"),
                    ("longpoll", None, "target median <= 100 ms"))
            for arm, extensions, note in arms:
                done = run_idle(root, arm, extensions, n_idle, gap)
                if done is not None:
                    print(f"  {arm} (extensions: {done[1]}): {summary(done[0])}  {note}")
        if parts & {"b", "c"}:
            rounds = args.rounds or (1 if args.quick else 3)
            print_steady(run_steady(root, n_jobs, rounds, args.profile),
                         args.quick or n_jobs < 200)
        if "d" in parts:
            n_cancel = 3 if args.quick else 10
            core_cancel = run_cancel(root, "core", (), n_cancel,
                                     defaults.cancel_check_interval_s)
            ext_cancel = run_cancel(root, "ext", None, n_cancel, defaults.heartbeat_interval_s)
            print("\n== (d) cancel latency: the client's cancel -> the job's exit ==")
            print(f"  core (running-list check every {defaults.cancel_check_interval_s:.0f} "
                  f"s): {summary(core_cancel)}")
            print(f"  extensions (heartbeat every {defaults.heartbeat_interval_s:.0f} s, "
                  f"progress every {defaults.progress_interval_s:.0f} s): "
                  f"{summary(ext_cancel)}")
        if "e" in parts:
            if importlib.util.find_spec("uvloop") is None:
                print("\n(e) not run: uvloop is not installed (pip install uvloop)")
            else:
                run_loops(root, args.pairs or (4 if args.quick else 12), args.jobs or 100)


if __name__ == "__main__":
    main()
