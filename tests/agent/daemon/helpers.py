"""The real daemon as a subprocess against a real reference coordinator on loopback (or
in the test's own process, :func:`make_agent`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from agent.config import load_config
from agent.daemon.lifecycle import Agent
from agent.reference.coordinator import ReferenceCoordinator

MINER_KEY = "test-miner-key"
CLIENT_KEY = "test-client-key"
FAST = {"heartbeat_interval_s": "0.5", "poll_interval_s": "0.1", "poll_max_interval_s": "0.5",
        "cancel_check_interval_s": "0.5", "progress_interval_s": "0.3",
        "log_ship_interval_s": "0.2", "cancel_grace_s": "3", "drain_timeout_s": "30",
        "retry_base_s": "0.05", "retry_cap_s": "0.5", "launcher": "spawn",
        "log_level": "DEBUG", "log_format": "text"}


def make_agent(tmp_path: Path, url: str = "http://127.0.0.1:9", **overrides: object) -> Agent:
    """An agent in this process, not serving yet (nothing listens at the default URL)."""
    cfg = load_config(Path("/dev/null"), environ={}, overrides={
        "coordinator_url": url, "miner_id": "gpus-1", "launcher": "spawn",
        "state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache", **overrides})
    return Agent(cfg, MINER_KEY)


def start_coordinator(tmp: Path, extensions: tuple[str, ...] | None = None,
                      **kwargs: Any) -> ReferenceCoordinator:
    args: dict[str, Any] = {"api_keys": {"miner": MINER_KEY, "client": CLIENT_KEY}, **kwargs}
    if extensions is not None:
        args["extensions"] = extensions
    tmp.mkdir(parents=True, exist_ok=True)
    coord = ReferenceCoordinator(str(tmp / "coordinator.db"), **args)
    coord.start()
    return coord


class AgentProcess:
    """`miner-agent run` in a subprocess, its log in a file."""

    def __init__(self, url: str, state: Path, miner_id: str = "miner-1", burst: bool = False,
                 config: Path | None = None, **settings: Any) -> None:
        self.state = state
        self.log_path = state / f"agent-{time.monotonic_ns()}.log"
        state.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
        env.update({"MINER_AGENT_" + k.upper(): str(v) for k, v in {**FAST, **settings}.items()})
        env.update({"MINER_AGENT_CONFIG": str(config or "/dev/null"),
                    "MINER_AGENT_STATE_DIR": str(state),
                    "MINER_AGENT_CACHE_DIR": str(state / "cache"),
                    "MINER_AGENT_API_KEY": MINER_KEY})
        argv = [sys.executable, "-m", "agent", "run", "--coordinator", url, "--miner-id",
                miner_id]
        if burst:
            argv.append("--burst")
        self.env = env  # what `miner-agent ps` and friends need to find this agent
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> None:
        wait_until(lambda: len(re.findall(pattern, self.log())) >= count, timeout,
                   lambda: f"{pattern!r} not in the agent log:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 60.0) -> int:
        """The agent's exit code; past ``timeout``, its stacks (SIGQUIT) and log tail."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)  # the agent dumps every thread's stack
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the agent did not exit within {timeout:.0f} s; its log "
                                 f"ends:\n{self.log()[-6000:]}") from None
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0,
               why: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(why() if why else "condition not reached in time")
        time.sleep(0.05)


class Client:
    """The client side of the reference coordinator, over real HTTP."""

    opened: list[Client] = []

    def __init__(self, coord: ReferenceCoordinator) -> None:
        Client.opened.append(self)
        self.coord = coord
        self.http = httpx.Client(base_url=coord.base_url, headers={"X-Api-Key": CLIENT_KEY},
                                 timeout=10)

    def submit(self, payload: dict[str, Any], **constraints: Any) -> str:
        resp = self.http.post("/v1/jobs", json={"payload": payload, "constraints": constraints})
        resp.raise_for_status()
        return str(resp.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/jobs/{job_id}")
        resp.raise_for_status()
        return dict(resp.json())

    def cancel(self, job_id: str) -> None:
        self.http.post(f"/v1/jobs/{job_id}/cancel", json={}).raise_for_status()

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 60.0) -> dict[str, Any]:
        wait_until(lambda: self.job(job_id)["status"] in statuses, timeout,
                   lambda: f"job {job_id} is {self.job(job_id)['status']}, not {statuses}")
        return self.job(job_id)

    def receipts(self, job_id: str) -> list[dict[str, Any]]:
        return self.coord.store.receipts(job_id)

    def close(self) -> None:
        self.http.close()

    @classmethod
    def close_all(cls) -> None:
        while cls.opened:
            cls.opened.pop().close()


@contextlib.contextmanager
def tmpfs(mount: Path, size_mb: int, inodes: int | None = None) -> Iterator[Path]:
    """``mount`` on its own ``size_mb`` MiB tmpfs of ``inodes`` inodes (root only: the
    test is skipped where mount fails), unmounted afterwards."""
    import pytest

    mount.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mb}m" + (f",nr_inodes={inodes}" if inodes else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size_mb} MiB tmpfs (needs root): "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def use_inodes(folder: Path, leave: int) -> None:
    """Fill ``folder`` with empty files until only ``leave`` inodes stay free on its
    filesystem (a tmpfs of few inodes: a few thousand files at most)."""
    folder.mkdir(exist_ok=True)
    made = 0
    while os.statvfs(folder).f_favail > leave:
        (folder / str(made)).touch()
        made += 1
