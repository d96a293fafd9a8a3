"""`miner-agent submit`, `status` and `cancel`: the client verbs, over the job API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent.commands.options import Sub, client_args, load
from agent.coordinator.jobs_api import JobsClient
from agent.coordinator.transport import CoordinatorHTTPError, CoordinatorUnavailable
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
                       "result or error. With --wait, follows it until it ends.")
    client_args(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job",
                       description="Ask the coordinator to cancel a job; the agent running it "
                       "stops it and keeps its partial results.")
    client_args(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel)


def _client(args: argparse.Namespace) -> JobsClient:
    if args.coordinator:
        if not args.client_key:
            raise ConfigError("--coordinator needs --client-key")
        url, key = args.coordinator, args.client_key
    else:
        from agent.reference.embedded import read_embedded

        info = read_embedded(load(args))
        url, key = info.url, args.client_key or info.client_key
    return JobsClient(url, key)


def _call(call: Any, *args: Any) -> dict[str, Any]:
    """One job-API call; what went wrong becomes an error that says what to do."""
    try:
        result: dict[str, Any] = call(*args)
    except CoordinatorUnavailable as exc:
        raise ConfigError(f"{exc.message}; is `miner-agent run` running?") from None
    except CoordinatorHTTPError as exc:
        raise ConfigError(exc.message) from None
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
    with _client(args) as client:
        job = _call(client.submit, raw["payload"], raw.get("constraints"), raw.get("ttl_s"))
        print(job["job_id"])
        if args.wait:
            return _follow(client, job["job_id"], as_json=False)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait:
            return _follow(client, args.job_id, as_json=args.json)
        job = _call(client.job, args.job_id)
        _show(job, args.json)
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _call(client.cancel, args.job_id)
        print(f"{args.job_id}: {job.get('status')}")
    return ExitCode.OK


def _follow(client: JobsClient, job_id: str, as_json: bool) -> int:
    last = None
    while True:
        job = _call(client.job, job_id)
        line = _line(job)
        if line != last and not as_json:
            print(line, file=sys.stderr)
            last = line
        if job.get("status") in TERMINAL:
            _show(job, as_json)
            return ExitCode.OK if job["status"] == "completed" else ExitCode.FAILED
        time.sleep(0.5)


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


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(_line(job))
    result = job.get("result") or {}
    if job.get("error"):
        print(f"error: {job['error'].get('code')}: {job['error'].get('message')}")
    if isinstance(result, dict) and result.get("output"):
        print(str(result["output"])[-2000:])
    pkg = result.get("package") if isinstance(result, dict) else None
    if isinstance(pkg, dict) and pkg.get("location"):
        print(f"package: {pkg['location']} (sha256 {pkg.get('zip_sha256')})")
