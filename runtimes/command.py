"""The ``command`` runtime: run an argv in the job's work dir, any language.

Payload: ``{"type": "command", "argv": ["prog", "arg", ...], "env": {...}}``.
The program inherits stdout and stderr (captured by the agent byte for byte) and
the events channel: it reports progress by writing JSON lines to the file
descriptor in ``$MINER_EVENTS_FD`` (see docs/job-protocol.md), its main text
result to ``$MINER_RESULT_FILE`` and files to ``$MINER_ARTIFACTS_DIR``. A cancel
reaches it as SIGTERM; it should save what it has and exit. Exit status 0 is
success; anything else fails the job with ``nonzero_exit``.
"""

from __future__ import annotations

import os
import signal
import subprocess

from runtimes.base import JobContext, JobFailed

MAX_ARGS = 4096


def _argv(payload: dict[str, object]) -> list[str]:
    argv = payload.get("argv")
    if isinstance(argv, str) or not isinstance(argv, list) or not argv:
        raise JobFailed("invalid_job", "payload.argv must be a non-empty list of strings")
    if len(argv) > MAX_ARGS or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise JobFailed("invalid_job", "payload.argv must be a list of strings without NUL")
    return list(argv)


def run(ctx: JobContext) -> None:
    argv = _argv(ctx.payload)
    events_fd = os.environ.get("MINER_EVENTS_FD", "")
    pass_fds = (int(events_fd),) if events_fd.isdigit() else ()
    try:
        proc = subprocess.Popen(argv, cwd=ctx.work_dir, pass_fds=pass_fds,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise JobFailed("launch_failed", f"cannot run {argv[0]!r}: {exc.strerror}; check "
                        "that the program exists on the node and is executable") from None

    def forward() -> None:
        # A cancel (or the job's own deadline) reaches the program as SIGTERM at once.
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    ctx.on_cancel(forward)
    while True:
        try:
            code = proc.wait(timeout=_poll_interval(ctx))
            break
        except subprocess.TimeoutExpired:
            _ = ctx.cancelled  # notices the job's own deadline and forwards SIGTERM
    if ctx.cancelled:
        return
    if code < 0:
        raise JobFailed("killed", f"{argv[0]} was killed by {signal_label(-code)}",
                        signal=-code)
    if code != 0:
        raise JobFailed("nonzero_exit", f"{argv[0]} exited with status {code}", exit_code=code)


def signal_label(number: int) -> str:
    """``SIGKILL``, ``SIGRTMIN+6`` (real-time signals have no name), or ``signal 99``."""
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        pass
    if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        return f"SIGRTMIN+{number - signal.SIGRTMIN} ({number})"
    return f"signal {number}"


def _poll_interval(ctx: JobContext) -> float:
    return 0.5 if ctx.deadline is None else 0.1
