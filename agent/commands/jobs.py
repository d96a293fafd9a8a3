"""`miner-agent submit`, `status` and `cancel`: the client verbs, over the job API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.commands.options import Sub, client_args, load
from agent.coordinator.jobs_api import JobsClient
from agent.coordinator.transport import CoordinatorUnavailable, path_segment
from agent.errors import ConfigError, ExitCode, InvalidJob
from agent.jobs import Job

TERMINAL = ("completed", "failed", "canceled", "expired")


def add_parsers(sub: Sub) -> None:
    p = sub.add_parser("submit", help="submit a job to the (embedded) coordinator",
                       description="Submit JOB.json's payload and constraints as a new job; "
                       "prints the job id. With --wait, follows it to the end.")
    client_args(p)
    p.add_argument("job_file", metavar="JOB.json")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a job's status",
                       description="Show a job as the coordinator sees it: status, progress, "
                       "result or error, and how to fetch its package. With --wait, follows "
                       "it until it ends and exits by its outcome, as `exec` does (0 "
                       "completed, 1 failed, 3 canceled, 4 timed out, 5 killed); 11 when "
                       "the coordinator has no such job.")
    client_args(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--json", action="store_true",
                   help="print the coordinator's JSON (progress 100 once completed)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job",
                       description="Ask the coordinator to cancel a job; the agent running it "
                       "stops it and keeps its partial results.")
    client_args(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel)


@dataclass(frozen=True)
class Target:
    """Which coordinator a client verb talks to, and how to say where its client key is."""

    url: str
    key: str
    key_hint: str
    embedded: bool


def _target(args: argparse.Namespace) -> Target:
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


def _call(target: Target, call: Any, *args: Any) -> dict[str, Any]:
    """One job-API call; an unreachable embedded coordinator means the agent is not running."""
    try:
        result: dict[str, Any] = call(*args)
    except CoordinatorUnavailable as exc:
        if not target.embedded:
            raise
        raise CoordinatorUnavailable(f"{exc.message}; is `miner-agent run` running?",
                                     exc.last_error) from None
    return result


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        raw = json.loads(Path(args.job_file).read_text())
        Job.from_dict({**raw, "job_id": raw.get("job_id") or "submitted"})
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.job_file}: {exc}", file=sys.stderr)
        return ExitCode.INVALID_JOB
    except InvalidJob as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return ExitCode.INVALID_JOB
    target = _target(args)
    with JobsClient(target.url, target.key) as client:
        job = _call(target, client.submit, raw["payload"], raw.get("constraints"),
                    raw.get("ttl_s"))
        print(job["job_id"])
        wanted = raw.get("job_id")
        if wanted and wanted != job["job_id"]:
            # The job API takes no id from the submitter (the reference's POST /v1/jobs
            # makes its own): say so rather than drop the file's id silently.
            print(f"note: the coordinator assigned the id {job['job_id']}; {args.job_file}'s "
                  f"job_id {wanted!r} is not used (use the printed id with status/cancel)",
                  file=sys.stderr)
        if args.wait:
            return _follow(client, target, job["job_id"], as_json=False)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    target = _target(args)
    with JobsClient(target.url, target.key) as client:
        if args.wait:
            return _follow(client, target, args.job_id, as_json=args.json)
        _show(_shown(_call(target, client.job, args.job_id)), target, args.json)
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    target = _target(args)
    with JobsClient(target.url, target.key) as client:
        job = _call(target, client.cancel, args.job_id)
        print(f"{args.job_id}: {job.get('status')}")
    return ExitCode.OK


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


def _follow(client: JobsClient, target: Target, job_id: str, as_json: bool) -> int:
    last = None
    while True:
        job = _shown(_call(target, client.job, job_id))
        if job.get("status") in TERMINAL:
            _show(job, target, as_json)  # the last line, once, on stdout
            return outcome_exit(job)
        line = _line(job)
        if line != last and not as_json:
            print(line, file=sys.stderr)
            last = line
        time.sleep(0.5)


def _shown(job: dict[str, Any]) -> dict[str, Any]:
    """The coordinator's view as the client shows it: a completed job is at 100 %, whatever
    progress its miner last sent before finishing."""
    if job.get("status") == "completed":
        return {**job, "progress": 100.0}
    return job


def _line(job: dict[str, Any]) -> str:
    detail = job.get("progress_detail") or {}
    parts = [f"{job['job_id']}: {job.get('status')}"]
    if job.get("progress") is not None:
        parts.append(f"{job['progress']:.0f}%")
    for key in ("stage", "message"):
        if detail.get(key):
            parts.append(str(detail[key]))
    for key, value in list((detail.get("metrics") or {}).items())[:4]:
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _show(job: dict[str, Any], target: Target, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(_line(job))
    result = job.get("result") or {}
    if job.get("error"):
        print(f"error: {job['error'].get('code')}: {job['error'].get('message')}")
    if isinstance(result, dict) and result.get("output"):
        print(str(result["output"])[-2000:])
    for line in _package_lines(job, target):
        print(line)


def _package_lines(job: dict[str, Any], target: Target) -> list[str]:
    """Where the package is, and how to fetch it with this client's key.

    The coordinator serves a zip it holds at ``/v1/jobs/{id}/package`` to the client role
    only: a plain ``curl URL`` gets "Invalid API key", so the line says which key to send.
    """
    result = job.get("result")
    pkg = result.get("package") if isinstance(result, dict) else None
    pkg = pkg if isinstance(pkg, dict) else {}
    sha = pkg.get("zip_sha256") or (job.get("package") or {}).get("sha256")
    if job.get("package"):  # the coordinator holds the zip: the URL as this client sees it
        url = f"{target.url.rstrip('/')}/v1/jobs/{path_segment(job['job_id'])}/package"
        return [f"package: {url} (sha256 {sha})",
                f'  fetch: curl -fsS -H "X-Api-Key: $CLIENT_KEY" -o job_{job["job_id"]}.zip '
                f"{url}  (CLIENT_KEY: {target.key_hint})"]
    location = pkg.get("location")
    if not location:
        return []
    if str(location).startswith("file:"):
        return [f"package: {location} (sha256 {sha}; on the agent's machine: "
                f"`miner-agent verify {job['job_id']}` there checks it)"]
    return [f"package: {location} (sha256 {sha})"]
