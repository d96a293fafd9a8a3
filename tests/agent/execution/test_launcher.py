"""The fork server: same isolation as a spawn, and a fallback when it can't start."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from agent.errors import Outcome
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.launcher import AutoLauncher, ForkServerLauncher
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


def test_broken_fork_server_falls_back_to_spawn(tmp_path: Path) -> None:
    # Given a fork server that cannot start (its interpreter has no standard library)
    launcher = AutoLauncher(env={"PATH": os.environ["PATH"], "PYTHONHOME": "/nonexistent"})
    runs = run_many(launcher, tmp_path / "out", 1)
    # Then the job still runs, through a plain spawn
    assert runs[0].handle is not None and runs[0].handle.via == "spawn"
