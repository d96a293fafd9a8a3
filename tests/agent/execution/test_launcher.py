"""The fork server: same isolation as a spawn, and a fallback when it can't start."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import Outcome
from agent.execution.executor import ExecutorConfig, JobReport, JobRun
from agent.execution.launcher import INLINE_REQUEST_MAX_BYTES, AutoLauncher, ForkServerLauncher
from tests.agent.conftest import PY, make_job

ISOLATION = r"""
import json, os, sys
print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
                  "cwd": os.getcwd(), "env": dict(os.environ),
                  "torch_loaded": "torch" in sys.modules}))
"""


def run_many(launcher: ForkServerLauncher | AutoLauncher, out: Path, n: int) -> list[JobRun]:
    async def main() -> list[JobRun]:
        runs = [JobRun(make_job({"type": "command", "argv": [PY, "-c", ISOLATION]},
                                job_id=f"j{i}"), ExecutorConfig(out), launcher,
                       environ={**os.environ, "AGENT_TOKEN": "hunter2"})
                for i in range(n)]
        try:
            reports = await asyncio.gather(*(r.run() for r in runs))
        finally:
            await launcher.close()
        assert all(r.outcome == Outcome.COMPLETED for r in reports), reports
        return runs

    return asyncio.run(main())


def test_fork_server_jobs_are_isolated_processes(tmp_path: Path) -> None:
    # Given three jobs started through the torch-preloaded fork server
    out = tmp_path / "out"
    runs = run_many(ForkServerLauncher(), out, 3)
    seen = [json.loads((out / f"job_j{i}/logs/stdout.log").read_text()) for i in range(3)]
    # Then each is its own session, with its own work dir and a scrubbed environment
    assert all(r.handle is not None and r.handle.via == "forkserver" for r in runs)
    assert len({s["sid"] for s in seen}) == 3
    for i, s in enumerate(seen):
        assert s["cwd"].endswith(f".work/j{i}")
        assert s["env"]["MINER_JOB_ID"] == f"j{i}"
        assert "AGENT_TOKEN" not in s["env"] and "PYTHONUNBUFFERED" not in s["env"]
    host_pids = {r.pid for r in runs}
    assert len(host_pids) == 3
    output = json.loads((out / "job_j0/output.json").read_text())
    assert output["exit"]["via"] == "forkserver"


def test_python_runtime_runs_inside_the_forked_process(tmp_path: Path) -> None:
    async def main() -> None:
        launcher = ForkServerLauncher()
        try:
            job = make_job({"type": "sleep", "steps": 2, "step_s": 0, "torch": True})
            report = await JobRun(job, ExecutorConfig(tmp_path), launcher).run()
        finally:
            await launcher.close()
        assert report.outcome == Outcome.COMPLETED
        assert report.output["exit"]["via"] == "forkserver"
        assert launcher.info.get("ready") is True

    asyncio.run(main())


def test_a_forked_jobs_collection_leaves_the_servers_pages_shared(tmp_path: Path) -> None:
    # Given a job forked from the torch-preloaded server that runs a full collection
    async def main() -> JobReport:
        launcher = ForkServerLauncher()
        try:
            cfg = ExecutorConfig(tmp_path, extra_runtimes={
                "gc_probe": "tests.agent.execution.gc_probe:run"})
            return await JobRun(make_job({"type": "gc_probe"}), cfg, launcher).run()
        finally:
            await launcher.close()

    report = asyncio.run(main())
    assert report.outcome == Outcome.COMPLETED, report
    metrics = report.output["metrics"]
    # Then the objects the preload left are frozen, out of the collector's walk, and
    # the collection copied next to none of the server's pages (unfrozen: ~70 MB here)
    assert metrics["frozen"] > 1000
    assert metrics["copied_kb"] < 16 << 10


def _kernel_collapses() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            never = "[never]" in fh.read()
    except OSError:
        return False
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return not never and (major, minor) >= (6, 1)


@pytest.mark.skipif(not _kernel_collapses(), reason="needs MADV_COLLAPSE (Linux 6.1+) and THP")
def test_the_fork_server_backs_its_memory_with_huge_pages(tmp_path: Path) -> None:
    # Given the torch-preloaded fork server, started for a job
    async def main() -> dict[str, object]:
        launcher = ForkServerLauncher()
        try:
            report = await JobRun(make_job({"type": "sleep", "steps": 1, "step_s": 0}),
                                  ExecutorConfig(tmp_path), launcher).run()
            assert report.outcome == Outcome.COMPLETED, report
            info = dict(launcher.info)
            with open(f"/proc/{info['pid']}/smaps_rollup") as fh:
                info["smaps"] = fh.read()
            return info
        finally:
            await launcher.close()

    info = asyncio.run(main())
    # Then it said how much of its memory it put in 2 MiB pages, and the kernel agrees
    # (its anonymous memory after torch's import is ~200 MB)
    assert int(str(info["huge_pages_mb"])) >= 32, info
    huge_kb = next(int(line.split()[1]) for line in str(info["smaps"]).splitlines()
                   if line.startswith("AnonHugePages:"))
    assert huge_kb >= 32 << 10


def test_broken_fork_server_falls_back_to_spawn(tmp_path: Path) -> None:
    # Given a fork server that cannot start (its interpreter has no standard library)
    launcher = AutoLauncher(env={"PATH": os.environ["PATH"], "PYTHONHOME": "/nonexistent"})
    runs = run_many(launcher, tmp_path / "out", 1)
    # Then the job still runs, through a plain spawn
    assert runs[0].handle is not None and runs[0].handle.via == "spawn"


ARGV_LENGTH = "import sys; print(len(sys.argv[1]))"


@pytest.mark.parametrize("size", [1_000, 40_000, 100_000])
def test_fork_server_spec_goes_inline_unless_it_is_large(tmp_path: Path, size: int) -> None:
    # Given a job whose payload carries `size` bytes, its work dir kept after it ran
    # (40 kB reaches the server in two pieces; 100 kB is past what one request may hold)
    job = make_job({"type": "command", "argv": [PY, "-c", ARGV_LENGTH, "x" * size]})

    async def main() -> JobReport:
        launcher = ForkServerLauncher()
        try:
            return await JobRun(job, ExecutorConfig(tmp_path, keep_work_dir=True),
                                launcher).run()
        finally:
            await launcher.close()

    report = asyncio.run(main())
    # Then it ran in the fork server and saw its whole payload
    assert report.outcome == Outcome.COMPLETED, report
    assert report.output["exit"]["via"] == "forkserver"
    assert (tmp_path / "job_t1/logs/stdout.log").read_text() == f"{size}\n"
    # And its spec became a file only when the request could not carry it
    large = size > INLINE_REQUEST_MAX_BYTES
    assert (tmp_path / ".work/t1/.miner-job.json").exists() is large
    assert (tmp_path / ".work/t1").is_dir()


def send_raw(sock_path: Path, line: bytes) -> socket.socket:
    """A raw request to the fork server, with the four descriptors a job's request has."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(sock_path))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
    try:
        socket.send_fds(sock, [line], fds)
    finally:
        for fd in fds:
            os.close(fd)
    return sock


def ask(sock_path: Path, line: bytes) -> dict[str, object]:
    with send_raw(sock_path, line) as sock:
        answer: dict[str, object] = json.loads(sock.makefile("rb").readline())
    return answer


async def open_fds_settle(pid: int, count: int) -> int:
    """The number of descriptors ``pid`` holds, once it is back to ``count`` (or 5 s on)."""
    for _ in range(100):
        now = len(os.listdir(f"/proc/{pid}/fd"))
        if now == count:
            break
        await asyncio.sleep(0.05)
    return now


def test_fork_server_refuses_a_bad_request_and_serves_the_next(tmp_path: Path) -> None:
    # Given a running fork server
    bad = [b'{"spec_inline": [1, 2], "env": {}, "cwd": "/"}\n',
           b'{"spec_inline": "{}", "env": {}, "cwd": "/"}\n',
           b'{"env": {}, "cwd": "/"}\n', b"[1, 2]\n", b"not json\n"]

    async def main() -> tuple[list[dict[str, object]], int, int, JobReport]:
        launcher = ForkServerLauncher()
        try:
            await launcher.start()
            server = int(str(launcher.info["pid"]))
            before = len(os.listdir(f"/proc/{server}/fd"))
            # When it gets requests whose spec is not an object, or no request at all,
            # and two from an agent that hangs up (after its line, halfway through it)
            answers = [ask(launcher.sock_path, line) for line in bad]
            for line in (b"not json\n", b'{"spec_inline": {'):
                send_raw(launcher.sock_path, line).close()
            after = await open_fds_settle(server, before)
            job = make_job({"type": "command", "argv": [PY, "-c", "print('next')"]})
            report = await JobRun(job, ExecutorConfig(tmp_path), launcher).run()
        finally:
            await launcher.close()
        return answers, before, after, report

    answers, before, after, report = asyncio.run(main())
    # Then each bad request gets an error answer, and keeps none of its descriptors
    assert all("error" in a and "pid" not in a for a in answers), answers
    assert "spec_inline must be a JSON object" in str(answers[0]["error"])
    assert after == before
    # And the server goes on serving: the next job runs in it
    assert report.outcome == Outcome.COMPLETED, report
    assert report.output["exit"]["via"] == "forkserver"
    assert (tmp_path / "job_t1/logs/stdout.log").read_text() == "next\n"


AGENT_KILLED_OUTRIGHT = r"""
import asyncio, sys
from pathlib import Path
from agent.execution.launcher import ForkServerLauncher

async def main():
    launcher = ForkServerLauncher(runtime_dir=Path(sys.argv[1]))
    await launcher.start()
    print(launcher.sock_path, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run([PY, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder whose socket paths fit AF_UNIX's 108 bytes wherever pytest's tmp_path
    lies (pytest-xdist's are longer)."""
    path = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_socket_folders_left_by_killed_agents_go_at_the_next_start(short_dir: Path) -> None:
    # Given an agent process whose fork server is serving, SIGKILLed (no close() ran)
    agent = subprocess.Popen([PY, "-c", AGENT_KILLED_OUTRIGHT, str(short_dir)],
                             stdout=subprocess.PIPE, text=True)
    assert agent.stdout is not None
    sock = Path(agent.stdout.readline().strip())
    assert sock.parent.name.startswith(f"miner-fs-{agent.pid}-") and sock.exists()
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    agent.stdout.close()
    # and folders that are not stale: this live process's, a dead pid's whose socket still
    # takes connections (a server in another PID namespace), one holding other files
    live = short_dir / f"miner-fs-{os.getpid()}-live"
    live.mkdir()
    serving = short_dir / f"miner-fs-{dead_pid()}-serving"
    serving.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(serving / "forkserver.sock"))
    listener.listen()
    foreign = short_dir / f"miner-fs-{dead_pid()}-other"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours to remove")
    # and an older agent's folders (no pid in the name): one with a dead socket, one
    # empty for an hour (stale), one empty just now (an agent starting)
    legacy = short_dir / "miner-fs-2qwnj_4j"
    legacy.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(legacy / "forkserver.sock"))
    legacy_empty = short_dir / "miner-fs-4e7at04n"
    legacy_empty.mkdir()
    os.utime(legacy_empty, (time.time() - 3600,) * 2)
    starting = short_dir / "miner-fs-9a9qal4k"
    starting.mkdir()
    # (its fork server dies with it: wait until the socket refuses connections)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(sock)) != 0:
                break
        time.sleep(0.02)

    # When the next agent makes its launcher
    launcher = ForkServerLauncher(runtime_dir=short_dir)
    try:
        # Then the killed agent's folder is gone, and the older agents' stale ones
        assert not sock.parent.exists()
        assert not legacy.exists() and not legacy_empty.exists()
        assert live.exists() and serving.exists() and foreign.exists() and starting.exists()
        assert launcher.sock_path.parent.name.startswith(f"miner-fs-{os.getpid()}-")
    finally:
        listener.close()
        asyncio.run(launcher.close())
    assert not launcher.sock_path.parent.exists()
