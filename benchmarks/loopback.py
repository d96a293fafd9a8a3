"""What the daemon benchmarks share: a reference coordinator in its own process on
loopback, and a process's CPU and memory read from /proc.

The coordinator runs apart from the agent so its CPU is never counted as the agent's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

KEYS = {"miner": "bench-miner", "client": "bench-client"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of one process: its own, and its reaped children's."""

    own_s: float
    children_s: float
    sys_s: float  # the kernel's part of own_s


def cpu_of(pid: int) -> Cpu:
    """utime+stime and cutime+cstime from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return Cpu((utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, stime / CLK_TCK)


def thread_switches(pid: int) -> dict[str, tuple[int, int]]:
    """Voluntary and involuntary context switches of a process's main thread ("main")
    and of its other threads together ("others"), from /proc/PID/task/*/status. A
    thread that ended meanwhile drops out of "others"; the agent's threads live long."""
    out = {"main": (0, 0), "others": (0, 0)}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        values = status_fields(status)
        key = "main" if task.name == str(pid) else "others"
        was = out[key]
        out[key] = (was[0] + int(values["voluntary_ctxt_switches"]),
                    was[1] + int(values["nonvoluntary_ctxt_switches"]))
    return out


def status_fields(text: str) -> dict[str, str]:
    """The fields of a /proc/.../status text, by name, values as written."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (``VmHWM``, ``VmRSS``); 0 where absent."""
    value = status_fields(Path(f"/proc/{pid}/status").read_text()).get(field)
    return int(value.split()[0]) if value else 0


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Coordinator:
    """The reference coordinator in its own process, on a free loopback port.

    ``extensions``: None offers the reference's own set, ``()`` the core only.
    """

    def __init__(self, root: Path, extensions: tuple[str, ...] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, REFCOORD_MINER_KEY=KEYS["miner"],
                   REFCOORD_CLIENT_KEY=KEYS["client"])
        argv = [sys.executable, "-m", "agent.coordinator.reference", "--port", "0",
                "--db", str(root / "coord.db"), "--no-rate-limits"]
        if extensions is not None:
            argv += ["--extensions", ",".join(extensions)]
        self.log = open(root / "coordinator.log", "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self.log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "reference coordinator on " not in line:
            self.close()
            raise RuntimeError(f"the coordinator did not start: {line!r}; see {root}")
        self.url = line.split(" on ", 1)[1].strip()
        self.http = httpx.Client(base_url=self.url, headers={"X-Api-Key": KEYS["client"]},
                                 timeout=30)
        self.extensions = tuple(self.http.get("/health").json().get("extensions") or ())

    def submit(self, payload: dict[str, Any]) -> str:
        resp = self.http.post("/v1/jobs", json={"payload": payload})
        resp.raise_for_status()
        return str(resp.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def close(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        stop(self.proc, 30)
        self.log.close()
