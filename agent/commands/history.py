"""`miner-agent list`, `export` and `stats`: past and present jobs, over ``GET /v1/jobs``.

``list`` shows one page, newest first, with the true total. ``export`` and ``stats``
read every matching job page by page; the window's end is fixed when they start (jobs
submitted meanwhile are left out) and a job is counted once even if paging shifts.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from agent.commands.client import (
    call,
    filter_args,
    filters,
    iso_param,
    json_flag,
    shown,
    target,
    verb,
)
from agent.commands.options import Sub
from agent.coordinator.jobs_api import JobsClient
from agent.errors import ExitCode

PAGE = 1000
FINISHED = ("completed", "failed", "canceled")
CSV_COLUMNS = ("job_id", "status", "type", "created_at", "started_at", "finished_at",
               "duration_s", "progress", "miner_id", "error_code", "error_message",
               "package_sha256", "package_size", "gpu_seconds")


def add_parsers(sub: Sub) -> None:
    p = verb(sub, "list", "list jobs, newest first",
             "List jobs newest first, a page at a time, with the total that match.", job=False)
    filter_args(p)
    p.add_argument("--limit", type=int, default=50, metavar="N", help="jobs per page (50)")
    p.add_argument("--offset", type=int, default=0, metavar="N", help="skip the newest N")
    json_flag(p, "print the coordinator's page as JSON: {jobs, total, limit, offset}")
    p.set_defaults(func=cmd_list)

    p = verb(sub, "export", "write every matching job as CSV or JSON",
             "Write the jobs that match the filters (all of them, newest first) as CSV (one "
             f"row a job: {', '.join(CSV_COLUMNS)}; a text cell that a spreadsheet would run "
             "as a formula, such as an error message starting with '=', gets a ' before it) "
             "or JSON (a list of job views).", job=False)
    filter_args(p)
    p.add_argument("--format", choices=("csv", "json"), default="json", help="(json)")
    p.add_argument("--output", "-o", type=Path, metavar="FILE", help="write here (stdout)")
    p.set_defaults(func=cmd_export)

    p = verb(sub, "stats", "counts, success rate, durations and GPU-seconds",
             "Summarise the jobs that match the filters: counts by status, success rate "
             "(completed among completed, failed and canceled), run duration p50/p95 "
             "(started to finished), total GPU-seconds (the agents' reported units), overall "
             "and by payload type.", job=False)
    filter_args(p)
    json_flag(p, "print the figures as JSON")
    p.set_defaults(func=cmd_stats)


def cmd_list(args: argparse.Namespace) -> int:
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        page = call(where, client.jobs, **filters(args), limit=max(1, args.limit),
                    offset=max(0, args.offset))
    jobs = [shown(j) for j in page.get("jobs", [])]
    if args.json:
        print(json.dumps({**page, "jobs": jobs}, indent=2))
        return ExitCode.OK
    total = int(page.get("total", len(jobs)))
    if jobs:
        print(f"{'JOB_ID':<32}  {'STATUS':<9}  {'TYPE':<15}  {'PROGRESS':>8}  "
              f"{'CREATED':<20}  {'DURATION':>8}")
    for job in jobs:
        pct = "" if job.get("progress") is None else f"{job['progress']:.0f}%"
        secs = duration_s(job)
        print(f"{job['job_id']:<32}  {job.get('status', ''):<9}  {job_type(job):<15}  "
              f"{pct:>8}  {_short_time(job.get('created_at')):<20}  "
              f"{'' if secs is None else f'{secs:.1f}s':>8}")
    first = int(page.get("offset", args.offset))
    more = f"; --offset {first + len(jobs)} for more" if first + len(jobs) < total else ""
    print(f"{len(jobs)} of {total} job(s) shown, newest first{more}", file=sys.stderr)
    return ExitCode.OK


def cmd_export(args: argparse.Namespace) -> int:
    if args.output is None:
        write_export(all_jobs(args), args.format, sys.stdout)
        return ExitCode.OK
    # Beside the file first: a coordinator lost at page three leaves no half an export
    part = args.output.with_name(f".{args.output.name}.part")
    try:
        with open(part, "w", encoding="utf-8", newline="") as out:
            count = write_export(all_jobs(args), args.format, out)
        part.replace(args.output)
    finally:
        part.unlink(missing_ok=True)
    print(f"{count} job(s) written to {args.output}", file=sys.stderr)
    return ExitCode.OK


def write_export(jobs: Iterator[dict[str, Any]], fmt: str, out: TextIO) -> int:
    """Write ``jobs`` to ``out`` as they come (a history may not fit in memory): CSV, or
    JSON as ``json.dumps(list, indent=2)`` would. Returns how many."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for job in jobs:
            writer.writerow(csv_row(job))
            count += 1
        return count
    for job in jobs:
        out.write(",\n" if count else "[\n")
        out.write("\n".join("  " + line for line in json.dumps(job, indent=2).split("\n")))
        count += 1
    out.write("\n]\n" if count else "[]\n")
    return count


def cmd_stats(args: argparse.Namespace) -> int:
    jobs = list(all_jobs(args))
    figures = summarise(jobs)
    figures["by_type"] = {kind: summarise([j for j in jobs if job_type(j) == kind])
                          for kind in sorted({job_type(j) for j in jobs})}
    if args.json:
        print(json.dumps(figures, indent=2))
        return ExitCode.OK
    print(_stats_line("all", figures))
    for kind, sub in figures["by_type"].items():
        print(_stats_line(kind, sub))
    return ExitCode.OK


def all_jobs(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Every job matching the filters, newest first, each once."""
    query = filters(args)
    query["until"] = query["until"] or iso_param(time.time() + 1)  # jobs from now on: out
    where = target(args)
    seen: set[str] = set()
    with JobsClient(where.url, where.key) as client:
        offset = 0
        while True:
            page = call(where, client.jobs, **query, limit=PAGE, offset=offset)
            batch = page.get("jobs", [])
            for job in batch:
                if job["job_id"] not in seen:
                    seen.add(job["job_id"])
                    yield shown(job)
            offset += len(batch)
            if not batch or offset >= int(page.get("total", 0)):
                return


def summarise(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts by status, success rate, run duration p50/p95 and GPU-seconds of ``jobs``."""
    counts = Counter(str(j.get("status")) for j in jobs)
    finished = sum(counts[s] for s in FINISHED)
    durations = sorted(d for j in jobs if j.get("status") in FINISHED
                       and (d := duration_s(j)) is not None)
    return {"total": len(jobs), "by_status": dict(sorted(counts.items())),
            "success_rate": round(counts["completed"] / finished, 4) if finished else None,
            "duration_s": {"p50": percentile(durations, 50), "p95": percentile(durations, 95),
                           "count": len(durations)},
            "gpu_seconds": round(sum(gpu_seconds(j) for j in jobs), 3)}


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (None for none)."""
    if not values:
        return None
    rank = max(1, -(-len(values) * pct // 100))  # ceil
    return round(values[int(rank) - 1], 3)


def gpu_seconds(job: dict[str, Any]) -> float:
    """The GPU-seconds the agent reported for the job (``metrics.units``), 0 if none."""
    metrics = job.get("metrics")
    if not isinstance(metrics, dict) or metrics.get("unit_type", "gpu_seconds") != "gpu_seconds":
        return 0.0
    units = metrics.get("units")
    if isinstance(units, bool) or not isinstance(units, int | float):
        return 0.0
    return float(units)


def duration_s(job: dict[str, Any]) -> float | None:
    """Started to finished (to now while running), in seconds."""
    start, end = _ts(job.get("started_at")), _ts(job.get("finished_at"))
    if start is None:
        return None
    if end is None:
        return None if job.get("status") in FINISHED else max(0.0, time.time() - start)
    return max(0.0, end - start)


def job_type(job: dict[str, Any]) -> str:
    payload = job.get("payload")
    return str(payload.get("type")) if isinstance(payload, dict) else "?"


def csv_row(job: dict[str, Any]) -> dict[str, Any]:
    """One job as a CSV row; its text cells never open as a spreadsheet formula."""
    error = job.get("error") or {}
    package = job.get("package") or {}
    secs = duration_s(job)
    row = {"job_id": job["job_id"], "status": job.get("status"), "type": job_type(job),
            "created_at": job.get("created_at"), "started_at": job.get("started_at"),
            "finished_at": job.get("finished_at"),
            "duration_s": None if secs is None else round(secs, 3),
            "progress": job.get("progress"), "miner_id": job.get("miner_id"),
            "error_code": error.get("code"), "error_message": error.get("message"),
            "package_sha256": package.get("sha256"), "package_size": package.get("size"),
            "gpu_seconds": gpu_seconds(job)}
    return {name: _inert(value) for name, value in row.items()}


def _inert(value: Any) -> Any:
    """A text cell a spreadsheet would take for a formula (a job's error message of
    ``=HYPERLINK(...)``, a miner id of ``@SUM(...)``), with a ``'`` before it: shown as
    text, never run (OWASP's advice for CSV injection). Numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _stats_line(name: str, f: dict[str, Any]) -> str:
    rate = "-" if f["success_rate"] is None else f"{100 * f['success_rate']:.1f}%"
    d = f["duration_s"]
    p50 = "-" if d["p50"] is None else f"{d['p50']:.1f}s"
    p95 = "-" if d["p95"] is None else f"{d['p95']:.1f}s"
    counts = " ".join(f"{k}={v}" for k, v in f["by_status"].items()) or "no jobs"
    return (f"{name}: {f['total']} job(s) ({counts}); success {rate}; duration p50 {p50} "
            f"p95 {p95}; {f['gpu_seconds']:.1f} GPU-seconds")


def _ts(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _short_time(text: Any) -> str:
    when = _ts(text)
    if when is None:
        return ""
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
