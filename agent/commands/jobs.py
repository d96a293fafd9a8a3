"""`miner-agent submit`, `status`, `cancel`, `delete` and `retry`: one job at a time."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent.commands.client import (
    TERMINAL,
    Target,
    call,
    job_id,
    json_flag,
    line,
    outcome_exit,
    shown,
    summary,
    target,
    verb,
)
from agent.commands.options import Sub, client_args
from agent.coordinator.jobs_api import JobsClient
from agent.coordinator.transport import CoordinatorHTTPError
from agent.errors import ExitCode, InvalidJob
from agent.jobs import Job

FOLLOW_INTERVAL_S = 0.5


def add_parsers(sub: Sub) -> None:
    p = sub.add_parser("submit", help="submit a job to the (embedded) coordinator",
                       description="Submit JOB.json's payload and constraints as a new job; "
                       "prints the job id. With --wait, follows it to the end.")
    client_args(p)
    p.add_argument("job_file", metavar="JOB.json")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.set_defaults(func=cmd_submit)

    p = verb(sub, "status", "show a job's status",
             "Show a job as the coordinator sees it: status, progress, result or error, and "
             "how to fetch its package. With --wait, follows it until it ends and exits by "
             "its outcome, as `exec` does (0 completed, 1 failed, 3 canceled, 4 timed out, "
             "5 killed); 11 when the coordinator has no such job.")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    json_flag(p, "print the job as JSON: status (the guide's names), progress in percent "
              "(100 once completed), created_at/started_at/finished_at, error, package")
    p.set_defaults(func=cmd_status)

    p = verb(sub, "cancel", "cancel a job",
             "Ask the coordinator to cancel a job; the agent running it stops it and keeps its "
             "partial results. A running job shows `canceling` until its agent confirms (or the "
             "coordinator's grace period passes). --force ends it as canceled at once, "
             "canceling or not, without waiting for the agent's confirmation: the agent learns "
             "it from its running list and still uploads the partial results it has.")
    p.add_argument("--force", action="store_true",
                   help="canceled at once, without waiting for the agent to confirm")
    json_flag(p, "print the job as JSON after the request")
    p.set_defaults(func=cmd_cancel)

    p = verb(sub, "delete", "delete a finished job, its logs and its package",
             "Delete a job and everything the coordinator keeps for it: the record, its logs, "
             "its package and receipts. Refused (exit 12) while the job is assigned, running "
             "or canceling: cancel it first. The agent's own copy of the package (on its "
             "machine) is left alone.")
    json_flag(p, "print the coordinator's answer as JSON")
    p.set_defaults(func=cmd_delete)

    p = verb(sub, "retry", "submit a job again",
             "Submit a new job with the same payload, constraints and TTL; prints the new "
             "job's id. --resume: a canceled or failed training job continues from the newest "
             "checkpoint in its package (the coordinator serves it to the new job as "
             "payload.resume_from); refused (exit 12) for other jobs, or when the package "
             "holds no checkpoint.")
    p.add_argument("--resume", action="store_true",
                   help="continue a canceled or failed training job from its last checkpoint")
    p.add_argument("--wait", action="store_true", help="follow the new job until it ends")
    json_flag(p, "print the new job as JSON")
    p.set_defaults(func=cmd_retry)


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
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        wanted = raw.get("job_id") if isinstance(raw.get("job_id"), str) else None
        why = "is not used"
        try:
            job = call(where, client.submit, raw["payload"], raw.get("constraints"),
                       raw.get("ttl_s"), wanted)
        except CoordinatorHTTPError as exc:
            if not wanted or exc.status != 409:
                raise
            # The file's id is taken (an earlier submit of the same file): a fresh one
            job = call(where, client.submit, raw["payload"], raw.get("constraints"),
                       raw.get("ttl_s"))
            why = "is taken by an earlier job"
        print(job["job_id"])
        if wanted and wanted != job["job_id"]:
            # Never drop the file's id silently: say which id the job has instead.
            print(f"note: the coordinator assigned the id {job['job_id']}; {args.job_file}'s "
                  f"job_id {wanted!r} {why} (use the printed id with status/cancel)",
                  file=sys.stderr)
        if args.wait:
            return follow(client, where, job["job_id"], as_json=False)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        if args.wait:
            return follow(client, where, jid, as_json=args.json)
        _show(shown(call(where, client.job, jid)), where, args.json)
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        job = call(where, client.cancel, jid, force=args.force)
    if args.json:
        print(json.dumps(shown(job), indent=2))
    else:
        print(f"{jid}: {job.get('status')}")
    return ExitCode.OK


def cmd_delete(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        try:
            answer = call(where, client.delete, jid)
        except CoordinatorHTTPError as exc:
            if exc.status != 409:
                raise
            detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
            print(f"error: {jid}: not deleted: {detail or exc.message}; run `miner-agent "
                  f"cancel {jid}` and wait for it to end", file=sys.stderr)
            return ExitCode.REFUSED
    print(json.dumps(answer, indent=2) if args.json else f"{jid}: deleted")
    return ExitCode.OK


def cmd_retry(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        job = call(where, client.retry, jid, resume=args.resume)
        if args.json:
            print(json.dumps(shown(job), indent=2))
        else:
            print(job["job_id"])
            resume = (job.get("payload") or {}).get("resume_from") if args.resume else None
            how = f", resuming from checkpoint sha256 {resume['sha256']}" if resume else ""
            print(f"note: {job['job_id']} retries {jid}{how}", file=sys.stderr)
        if args.wait:
            return follow(client, where, job["job_id"], as_json=args.json)
    return ExitCode.OK


def follow(client: JobsClient, where: Target, jid: str, as_json: bool) -> int:
    """Poll the job until it ends: changes on stderr, the last line once on stdout, and
    the exit code by its outcome."""
    last = None
    while True:
        job = shown(call(where, client.job, jid))
        if job.get("status") in TERMINAL:
            _show(job, where, as_json)
            return outcome_exit(job)
        now = line(job)
        if now != last and not as_json:
            print(now, file=sys.stderr)
            last = now
        time.sleep(FOLLOW_INTERVAL_S)


def _show(job: dict[str, Any], where: Target, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    for text in summary(job, where):
        print(text)
