"""What every client verb shares: which coordinator, the job id, time filters, the job view.

A client verb talks to the embedded coordinator of the agent on this machine (found
through ``<state_dir>/embedded.json``) unless ``--coordinator URL --client-key KEY``
names another. Times take ISO 8601 (a date, or a date and time; without a zone it is
local time) or a span back from now (``30m``, ``6h``, ``7d``, ``2w``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.commands.options import Sub, client_args, load
from agent.coordinator.transport import CoordinatorUnavailable, path_segment
from agent.errors import ConfigError, ExitCode
from agent.text import printable

TERMINAL = ("completed", "failed", "canceled", "expired")
_SPAN_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DAY_S = 86400.0


@dataclass(frozen=True)
class Target:
    """Which coordinator a client verb talks to, and how to say where its client key is."""

    url: str
    key: str
    key_hint: str
    embedded: bool


def target(args: argparse.Namespace) -> Target:
    """The coordinator the flags name, else this machine's embedded one."""
    if args.coordinator:
        if not args.client_key:
            raise ConfigError("--coordinator needs --client-key")
        return Target(args.coordinator, args.client_key, "the key you passed as --client-key",
                      embedded=False)
    from agent.reference.embedded import keys_path, read_embedded

    cfg = load(args)
    path = keys_path(cfg)
    if not path.exists():
        raise CoordinatorUnavailable(
            f"no agent with an embedded coordinator has run here ({path} is missing): start "
            "one with `miner-agent run`, or pass --coordinator URL --client-key KEY")
    info = read_embedded(cfg)
    return Target(info.url, args.client_key or info.client_key,
                  f"client_key in {path}", embedded=True)


def call(where: Target, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """One job-API call; an unreachable embedded coordinator means the agent is not running."""
    try:
        return fn(*args, **kw)
    except CoordinatorUnavailable as exc:
        if not where.embedded:
            raise
        raise CoordinatorUnavailable(f"{exc.message}; is `miner-agent run` running?",
                                     exc.last_error) from None


# -- parsers ------------------------------------------------------------------------------

def verb(sub: Sub, name: str, help: str, description: str, *,
         job: bool = True) -> argparse.ArgumentParser:
    """A client verb's parser: the coordinator flags, and JOB_ID (or ``--job-id``)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    client_args(p)
    if job:
        p.add_argument("job_id", metavar="JOB_ID", nargs="?", help="the job's id")
        p.add_argument("--job-id", dest="job_id_flag", metavar="JOB_ID",
                       help="the same, as the client guide spells it")
        p.set_defaults(parser=p)
    return p


def job_id(args: argparse.Namespace) -> str:
    """JOB_ID or ``--job-id``; a usage error (exit 2) without either, or with two."""
    given = {j for j in (args.job_id, args.job_id_flag) if j}
    if len(given) != 1:
        args.parser.error("give the job's id once: JOB_ID or --job-id JOB_ID")
    return str(given.pop())


def json_flag(p: argparse.ArgumentParser, what: str = "print JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)


def span_arg(text: str) -> float:
    """A duration: ``90s``, ``30m``, ``6h``, ``7d``, ``2w`` (or plain seconds)."""
    text = text.strip().lower()
    span = _span_s(text)
    if span is not None:
        return span
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use 90s, 30m, 6h, 7d or 2w") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be more than 0")
    return seconds


def since_arg(text: str) -> float:
    """``--since``: ISO 8601 or a span back from now, as seconds since the epoch."""
    return _parse_time(text, end_of_day=False)


def until_arg(text: str) -> float:
    """``--until``: as ``--since``; a bare date means the end of that day."""
    return _parse_time(text, end_of_day=True)


def _span_s(text: str) -> float | None:
    """Seconds in a span such as ``30m`` or ``7d``; None when ``text`` is not one."""
    span = _SPAN_RE.match(text.strip().lower())
    return float(span[1]) * _UNIT_S[span[2]] if span else None


def _parse_time(text: str, *, end_of_day: bool) -> float:
    span = _span_s(text)
    if span is not None:
        return time.time() - span
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2026-01-31, 2026-01-31T12:00Z) or a span "
            "back from now (30m, 6h, 7d, 2w)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as a user typing a date means it
    bare_date = "T" not in text and " " not in text.strip()
    return when.timestamp() + (DAY_S if end_of_day and bare_date else 0.0)


def filter_args(p: argparse.ArgumentParser) -> None:
    """``--status``, ``--type`` and the time window (``--since``/``--from``,
    ``--until``/``--to``, ``--days``) that list, export and stats share."""
    p.add_argument("--status", metavar="S",
                   help="only jobs in these states (comma-separated: pending, assigned, "
                   "running, canceling, completed, failed, canceled)")
    p.add_argument("--type", metavar="T", help="only jobs of this payload type")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--since", "--from", dest="since", type=since_arg, metavar="TIME",
                        help="created at or after TIME (ISO 8601, or 30m, 6h, 7d, 2w ago)")
    window.add_argument("--days", type=float, metavar="N",
                        help="created in the last N days (the same as --since Nd)")
    p.add_argument("--until", "--to", dest="until", type=until_arg, metavar="TIME",
                   help="created before TIME (a bare date: up to the end of that day)")


def filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filter flags as ``GET /v1/jobs`` query parameters."""
    since = args.since
    if args.days is not None:
        since = time.time() - args.days * DAY_S
    return {"status": args.status, "type": args.type, "since": iso_param(since),
            "until": iso_param(args.until)}


def iso_param(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


# -- the job view -------------------------------------------------------------------------

# A failed job's error code, where it names an outcome with its own exit code (as exec's).
ERROR_EXIT = {"timeout": ExitCode.TIMED_OUT, "expired": ExitCode.TIMED_OUT,
              "killed": ExitCode.KILLED, "agent_shutdown": ExitCode.LOST,
              "invalid_job": ExitCode.INVALID_JOB}


def outcome_exit(job: dict[str, Any]) -> ExitCode:
    """A finished job's exit code: the same numbers `exec` exits with."""
    if job.get("status") == "completed":
        return ExitCode.OK
    if job.get("status") == "canceled":
        return ExitCode.CANCELED
    code = (job.get("error") or {}).get("code")
    return ERROR_EXIT.get(str(code), ExitCode.FAILED)


def shown(job: dict[str, Any]) -> dict[str, Any]:
    """The coordinator's view as the client shows it: a completed job is at 100 %, whatever
    progress its miner last sent; ``package`` says the zip's sha256 and size wherever it is
    (held by the coordinator, or only on the agent's machine as its report says)."""
    out = dict(job)
    if job.get("status") == "completed":
        out["progress"] = 100.0
    result = job.get("result")
    block = result.get("package") if isinstance(result, dict) else None
    block = block if isinstance(block, dict) else {}
    if not out.get("package") and block.get("zip_sha256"):
        out["package"] = {"sha256": block["zip_sha256"], "size": block.get("zip_size"),
                          "location": block.get("location")}
    return out


def line(job: dict[str, Any]) -> str:
    """One line: id, status, percent, stage, message and a few metrics."""
    detail = job.get("progress_detail") or {}
    parts = [f"{job['job_id']}: {job.get('status')}"]
    if job.get("progress") is not None:
        parts.append(f"{job['progress']:.0f}%")
    for key in ("stage", "message"):
        if detail.get(key):
            parts.append(str(detail[key]))
    for key, value in list((detail.get("metrics") or {}).items())[:4]:
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return printable(" ".join(parts), one_line=True)  # a job's words, from a miner


def summary(job: dict[str, Any], where: Target) -> list[str]:
    """What `status` prints: the line, the error, the output and where the package is."""
    out = [line(job)]
    result = job.get("result") or {}
    if job.get("error"):
        out.append(printable(f"error: {job['error'].get('code')}: "
                             f"{job['error'].get('message')}"))
    if isinstance(result, dict) and result.get("output"):
        out.append(printable(str(result["output"])[-2000:]))
    return out + package_lines(job, where)


def package_lines(job: dict[str, Any], where: Target) -> list[str]:
    """Where the package is, and how to fetch it with this client's key.

    The coordinator serves a zip it holds at ``/v1/jobs/{id}/package`` to the client role
    only: a plain ``curl URL`` gets "Invalid API key", so the line says which key to send.
    """
    result = job.get("result")
    pkg = result.get("package") if isinstance(result, dict) else None
    pkg = pkg if isinstance(pkg, dict) else {}
    held = job.get("package") or {}
    sha = pkg.get("zip_sha256") or held.get("sha256")
    if held and not held.get("location"):  # the coordinator holds the zip (see shown())
        url = f"{where.url.rstrip('/')}/v1/jobs/{path_segment(job['job_id'])}/package"
        return [f"package: {url} (sha256 {sha})",
                f'  fetch: curl -fsS -H "X-Api-Key: $CLIENT_KEY" -o job_{job["job_id"]}.zip '
                f"{url}  (CLIENT_KEY: {where.key_hint}), or `miner-agent download "
                f"{job['job_id']}`"]
    location = pkg.get("location")
    if not location:
        return []
    if str(location).startswith("file:"):
        return [f"package: {location} (sha256 {sha}; on the agent's machine: "
                f"`miner-agent verify {job['job_id']}` there checks it)"]
    return [f"package: {location} (sha256 {sha})"]
