"""Job hooks: real executables in a real folder, run by the hook runner and by the real
daemon against the reference coordinator on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.daemon.hooks import (
    OUTPUT_TAIL_BYTES,
    HookFailed,
    JobHooks,
    hook_environ,
    run_hook,
)
from agent.jobs import Job
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.conftest import pid_alive
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

SLEEP = {"type": "sleep", "steps": 2, "step_s": 0.01}
PATH_ONLY = {"PATH": "/usr/bin:/bin"}


def write_hook(folder: Path, name: str, body: str, mode: int = 0o755) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def read_env(path: Path) -> dict[str, str]:
    return dict(line.partition("=")[::2] for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path / "coord", extensions=())
    yield coord
    coord.stop()


# -- the runner ------------------------------------------------------------------------

def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    # Given a hook that starts a child and waits on it
    pid_file = tmp_path / "child.pid"
    hook = write_hook(tmp_path / "hooks", "pre-job",
                      f'sleep 300 &\necho $! > {pid_file}\necho started\nwait\n')
    # When it runs past its timeout
    started = time.monotonic()
    result = asyncio.run(run_hook(hook, PATH_ONLY, 0.5))
    # Then it failed as timed out, soon, with its output, and its child is gone too
    assert time.monotonic() - started < 5
    assert result.problem == "timed out after 0.5 s (killed)"
    assert result.output == "started\n"
    wait_until(lambda: not pid_alive(int(pid_file.read_text())), 5)


def test_a_hook_that_exits_is_not_held_up_by_a_child_it_left(tmp_path: Path) -> None:
    hook = write_hook(tmp_path / "hooks", "post-job", "sleep 30 &\necho done\nexit 0\n")
    result = asyncio.run(run_hook(hook, PATH_ONLY, 20))
    assert result.ok and result.output == "done\n" and result.duration_s < 5


def test_a_hook_that_cannot_run_fails(tmp_path: Path) -> None:
    plain = write_hook(tmp_path / "hooks", "pre-job", "exit 0\n", mode=0o644)
    result = asyncio.run(run_hook(plain, PATH_ONLY, 5))
    assert result.problem == f"{plain} is not an executable file"
    killed = write_hook(tmp_path / "hooks2", "pre-job", "kill -9 $$\n")
    assert asyncio.run(run_hook(killed, PATH_ONLY, 5)).problem == "was killed by SIGKILL"


def test_a_hooks_output_is_bounded_to_its_tail(tmp_path: Path) -> None:
    hook = write_hook(tmp_path / "hooks", "pre-job",
                      "head -c 200000 /dev/zero | tr '\\0' x\necho\necho the end\nexit 1\n")
    result = asyncio.run(run_hook(hook, PATH_ONLY, 10))
    assert result.problem == "exited with status 1"
    assert result.output.startswith("[first ") and result.output.endswith("x\nthe end\n")
    assert len(result.output) < OUTPUT_TAIL_BYTES + 100
    assert result.describe().endswith("x\nthe end")
    assert len(result.describe()) < 2200  # the refused job's message gets the tail only


def test_a_hook_never_sees_the_agents_secrets() -> None:
    job = Job.from_dict({"job_id": "j-1", "payload": SLEEP})
    base = {"PATH": "/bin", "MINER_AGENT_API_KEY": "k", "CREDENTIALS_DIRECTORY": "/run/c",
            "NOTIFY_SOCKET": "/run/n", "AWS_SECRET_ACCESS_KEY": "s", "LANG": "C.UTF-8"}
    env = hook_environ(base, "pre-job", job, ["GPU-a", "GPU-b"], Path("/s/jobs/job_j-1"))
    assert env == {"PATH": "/bin", "LANG": "C.UTF-8", "MINER_HOOK": "pre-job",
                   "MINER_JOB_ID": "j-1", "MINER_JOB_TYPE": "sleep",
                   "MINER_JOB_GPUS": "GPU-a,GPU-b", "MINER_JOB_DIR": "/s/jobs/job_j-1"}


def test_three_pre_job_failures_in_a_row_call_on_failures(tmp_path: Path) -> None:
    # Given a pre-job that fails in several ways, and passes once
    cfg = AgentConfig(hooks_dir=tmp_path / "hooks", hook_timeout_s=0.5)
    reasons: list[str] = []

    async def drain(reason: str) -> None:
        reasons.append(reason)

    hooks = JobHooks(lambda: cfg, PATH_ONLY, drain)
    job = Job.from_dict({"job_id": "j", "payload": SLEEP})

    async def pre_job(body: str) -> str | None:
        write_hook(tmp_path / "hooks", "pre-job", body)
        try:
            await hooks.pre_job(job, [], tmp_path / "job_j")
        except HookFailed as exc:
            return exc.message
        return None

    async def main() -> list[str | None]:
        return [await pre_job(body) for body in
                ("exit 1\n", "exit 0\n", "exit 1\n", "sleep 5\n", "echo no; exit 2\n")]

    # When it fails, passes, then fails three times (one of them a timeout)
    messages = asyncio.run(main())
    # Then each failure refused its job, and only the three in a row drain
    assert messages[1] is None
    assert messages[3] == "pre-job hook timed out after 0.5 s (killed) (no output)"
    assert messages[4] == "pre-job hook exited with status 2; its output ends:\nno"
    assert reasons == ["pre-job hook failed 3 times in a row; last: exited with status 2"]


# -- the daemon ---------------------------------------------------------------------------

@pytest.mark.slow
def test_pre_job_and_post_job_see_the_job_and_its_outcome(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given hooks that write down their environment and what the package folder holds
    out, hooks = tmp_path / "seen", tmp_path / "hooks"
    out.mkdir()
    write_hook(hooks, "pre-job", f'env > {out}/pre-$MINER_JOB_ID.env\n'
                                 'echo "pre-job says hello"\n'
                                 f'test -e "$MINER_JOB_DIR" && touch {out}/dir-existed\n'
                                 'exit 0\n')
    write_hook(hooks, "post-job", f'env > {out}/post-$MINER_JOB_ID.env\n'
                                  f'ls "$MINER_JOB_DIR" > {out}/post-$MINER_JOB_ID.ls\n'
                                  'echo "post-job fails" >&2\nexit 1\n')
    client = Client(core)
    good = client.submit(SLEEP)
    bad = client.submit({**SLEEP, "steps": 3, "fail_at": 1})
    # When the agent runs them
    agent = AgentProcess(core.base_url, tmp_path / "state", burst=True, cpu_slots=1,
                         hooks_dir=hooks)
    agents.append(agent)
    assert agent.wait(90) == 0, agent.log()
    # Then pre-job saw the job, its (CPU: no) GPUs and where its package goes, and no key
    pre = read_env(out / f"pre-{good}.env")
    assert pre["MINER_HOOK"] == "pre-job" and pre["MINER_JOB_ID"] == good
    assert pre["MINER_JOB_TYPE"] == "sleep" and pre["MINER_JOB_GPUS"] == ""
    assert pre["MINER_JOB_DIR"] == str(tmp_path / "state" / "jobs" / f"job_{good}")
    assert not (out / "dir-existed").exists()  # the job's process had not started
    for env_file in out.glob("*.env"):
        text = env_file.read_text()
        assert MINER_KEY not in text and "MINER_AGENT_" not in text, env_file
    # And post-job saw each outcome, with the sealed package there
    post_good, post_bad = read_env(out / f"post-{good}.env"), read_env(out / f"post-{bad}.env")
    assert (post_good["MINER_JOB_OUTCOME"], post_good["MINER_JOB_ERROR_CODE"]) == (
        "completed", "")
    assert (post_bad["MINER_JOB_OUTCOME"], post_bad["MINER_JOB_ERROR_CODE"]) == (
        "failed", "runtime_error")
    assert "output.json" in (out / f"post-{good}.ls").read_text().split()
    # And post-job failing changed nothing; both hooks' output is in the agent's log
    assert client.job(good)["status"] == "completed"
    assert client.job(bad)["error"]["code"] == "runtime_error"
    log = agent.log()
    assert f"job {good}: pre-job hook: pre-job says hello" in log
    assert f"job {good}: post-job hook: post-job fails" in log
    assert f"job {good}: post-job hook exited with status 1" in log


@pytest.mark.slow
def test_a_failing_pre_job_refuses_the_job_and_three_drain_the_node(
        core: ReferenceCoordinator, tmp_path: Path, agents: list[AgentProcess]) -> None:
    # Given a pre-job that finds the node unfit, and four jobs queued
    hooks, marker = tmp_path / "hooks", tmp_path / "post-job-ran"
    write_hook(hooks, "pre-job", 'echo "ECC errors on GPU 0: $MINER_JOB_ID"\nexit 3\n')
    write_hook(hooks, "post-job", f"touch {marker}\n")
    client = Client(core)
    jobs = [client.submit(SLEEP) for _ in range(4)]
    # When the agent takes them one at a time
    agent = AgentProcess(core.base_url, tmp_path / "state", cpu_slots=1, hooks_dir=hooks)
    agents.append(agent)
    wait_until(lambda: (core.store.miner("miner-1") or {}).get("status") == "DRAINING", 60,
               lambda: agent.log()[-4000:])
    # Then each of the first three failed hook_failed with the hook's output, unstarted
    for job_id in jobs[:3]:
        error = client.wait_status(job_id, "failed")["error"]
        assert error["code"] == "hook_failed", error
        assert error["message"] == (f"pre-job hook exited with status 3; its output ends:\n"
                                    f"ECC errors on GPU 0: {job_id}")
        assert not (tmp_path / "state" / "jobs" / f"job_{job_id}").exists()
    assert not marker.exists()  # post-job runs only for a job that ran
    # And the node drains with the reason, stays up, and leaves the fourth job alone
    reason = core.store.miner("miner-1")["metadata"]["drain_reason"]  # type: ignore[index]
    assert reason == "pre-job hook failed 3 times in a row; last: exited with status 3"
    time.sleep(1.5)  # several poll and heartbeat intervals
    assert core.store.miner("miner-1")["status"] == "DRAINING"  # type: ignore[index]
    assert client.job(jobs[3])["status"] == "pending"
    assert agent.proc.poll() is None
