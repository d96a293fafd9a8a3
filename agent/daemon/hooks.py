"""Job hooks: the operator's ``pre-job`` and ``post-job`` executables around each job.

As the Buildkite agent has them: executables named ``pre-job`` and ``post-job`` in
``hooks_dir`` run as the agent's user, outside the job sandbox (they are the operator's
code), in a session of their own. Their environment is the agent's, scrubbed as a job's
is (never the API key or systemd's credentials), plus ``MINER_JOB_ID``,
``MINER_JOB_TYPE``, ``MINER_JOB_GPUS`` (UUIDs, comma-separated; empty for a CPU job),
``MINER_JOB_DIR`` (the package folder) and ``MINER_HOOK``; ``post-job`` also gets
``MINER_JOB_OUTCOME`` and ``MINER_JOB_ERROR_CODE``. Past ``hook_timeout_s`` the
hook's whole process group is killed. Its stdout and stderr (the last 64 KiB) go to
the agent's log.

``pre-job`` runs once the job's devices are reserved and before its process starts
(its package folder does not exist yet): a failure (non-zero exit, timeout, not
executable) refuses the job with ``hook_failed`` and the output's tail in the message,
and ``FAILURES_TO_DRAIN`` failures in a row await ``on_failures`` (the agent drains)
before the job's slot is freed, so no poll comes between.
``post-job`` runs after the package is sealed; its failure is logged only. A hook that
is not there is no hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.clock import within
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.execution.environment import scrubbed_environ
from agent.jobs import Job

log = logging.getLogger(__name__)
PRE_JOB, POST_JOB = "pre-job", "post-job"
OUTPUT_TAIL_BYTES = 64 * 1024  # what the agent's log gets of a hook's output
MESSAGE_TAIL_CHARS = 2000  # what a refused job's error message gets of it
FAILURES_TO_DRAIN = 3
PIPE_DRAIN_S = 1.0  # after the hook exits, how long a leftover child may hold its pipe


class HookFailed(AgentError):
    """Raised when a ``pre-job`` hook fails: the job is refused before it starts."""

    code = "hook_failed"


@dataclass(frozen=True)
class HookResult:
    """How one hook run ended."""

    name: str
    output: str  # the last OUTPUT_TAIL_BYTES of its stdout and stderr, decoded
    duration_s: float
    problem: str | None = None  # why it failed, in words; None: it exited 0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        """The failure and the output's tail, for a refused job's error message."""
        text = f"{self.name} hook {self.problem or 'succeeded'}"
        tail = self.output.strip()[-MESSAGE_TAIL_CHARS:]
        return f"{text}; its output ends:\n{tail}" if tail else f"{text} (no output)"


class _Tail:
    """The last ``limit`` bytes of a stream, read to its end."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    async def read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(self.limit):
            self.data += chunk
            if len(self.data) > self.limit:
                cut = len(self.data) - self.limit
                self.dropped += cut
                del self.data[:cut]

    def text(self) -> str:
        note = f"[first {self.dropped} bytes not kept]\n" if self.dropped else ""
        return note + self.data.decode(errors="replace")


def _kill_group(pid: int) -> None:
    """SIGKILL the hook's process group; one already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_hook(path: Path, env: Mapping[str, str], timeout_s: float) -> HookResult:
    """Run one hook to its end or its timeout; never raises for the hook's own failure."""
    start = time.monotonic()
    if not path.is_file() or not os.access(path, os.X_OK):
        return HookResult(path.name, "", 0.0, f"{path} is not an executable file")
    # A pipe of our own, not asyncio's: its wait() also waits for asyncio's pipes to
    # close, which a child the hook left running would put off past the hook's exit.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(path), stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
            env=dict(env), cwd=path.parent,
            start_new_session=True)  # its own group: the timeout kills all it started
    except OSError as exc:
        os.close(read_fd)
        return HookResult(path.name, "", 0.0, f"{path} could not start: {exc.strerror}")
    finally:
        os.close(write_fd)
    tail = _Tail(OUTPUT_TAIL_BYTES)
    reader = asyncio.create_task(_read_pipe(read_fd, tail))
    try:
        problem = _exit_problem(await within(proc.wait(), timeout_s))
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        problem = f"timed out after {timeout_s:g} s (killed)"
    except asyncio.CancelledError:
        _kill_group(proc.pid)  # the agent is going away: leave nothing of it running
        raise
    finally:
        # A child it left behind may hold the pipe open: read what comes soon, no more.
        with contextlib.suppress(TimeoutError):
            await within(asyncio.shield(reader), PIPE_DRAIN_S)
        reader.cancel()
    return HookResult(path.name, tail.text(), time.monotonic() - start, problem)


def _exit_problem(code: int) -> str | None:
    if code == 0:
        return None
    return f"exited with status {code}" if code > 0 else \
        f"was killed by {signal.Signals(-code).name}"


async def _read_pipe(fd: int, tail: _Tail) -> None:
    """Read the hook's output pipe to its end into ``tail``; the pipe is closed after."""
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(limit=OUTPUT_TAIL_BYTES)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(fd, "rb", buffering=0))
    try:
        await tail.read(stream)
    finally:
        transport.close()


def hook_environ(base: Mapping[str, str], name: str, job: Job, gpus: list[str],
                 folder: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A hook's environment: the scrubbed agent environment and the job's facts."""
    env = scrubbed_environ(base)
    env.update({"MINER_HOOK": name, "MINER_JOB_ID": job.job_id, "MINER_JOB_TYPE": job.type,
                "MINER_JOB_GPUS": ",".join(gpus), "MINER_JOB_DIR": str(folder)})
    env.update(extra or {})
    return env


class JobHooks:
    """The hooks of one agent: where they are comes from ``config()`` at each job, so a
    reloaded config takes effect on the next job."""

    def __init__(self, config: Callable[[], AgentConfig], environ: Mapping[str, str],
                 on_failures: Callable[[str], Awaitable[None]]) -> None:
        self.config = config
        self.environ = dict(environ)
        self.on_failures = on_failures
        self.failures_in_a_row = 0

    def _path(self, name: str) -> Path | None:
        folder = self.config().hooks_dir
        if folder is None:
            return None
        path = folder / name
        return path if os.path.lexists(path) else None

    async def pre_job(self, job: Job, gpus: list[str], folder: Path) -> None:
        """Run ``pre-job``; raise :class:`HookFailed` when it fails."""
        path = self._path(PRE_JOB)
        if path is None:
            return
        result = await self._run(path, hook_environ(self.environ, PRE_JOB, job, gpus, folder),
                                 job.job_id)
        if result.ok:
            self.failures_in_a_row = 0
            return
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= FAILURES_TO_DRAIN:
            self.failures_in_a_row = 0
            await self.on_failures(f"pre-job hook failed {FAILURES_TO_DRAIN} times in a row; "
                             f"last: {result.problem}")
        raise HookFailed(result.describe())

    async def post_job(self, job: Job, gpus: list[str], folder: Path, outcome: str,
                       error_code: str | None) -> None:
        """Run ``post-job`` with the job's outcome; a failure is only logged."""
        path = self._path(POST_JOB)
        if path is None:
            return
        env = hook_environ(self.environ, POST_JOB, job, gpus, folder,
                           {"MINER_JOB_OUTCOME": outcome,
                            "MINER_JOB_ERROR_CODE": error_code or ""})
        await self._run(path, env, job.job_id)

    async def _run(self, path: Path, env: dict[str, str], job_id: str) -> HookResult:
        result = await run_hook(path, env, self.config().hook_timeout_s)
        for line in result.output.splitlines():
            log.info("job %s: %s hook: %s", job_id, result.name, line)
        if result.ok:
            log.info("job %s: %s hook succeeded in %.1f s", job_id, result.name,
                     result.duration_s)
        else:
            log.warning("job %s: %s hook %s", job_id, result.name, result.problem)
        return result
