"""`miner-agent ps`, `drain` and `resume`: the operator's view and hold on a running agent.

They talk to the agent over its control socket in the state dir (the same config and
state dir as `run`), so they need no coordinator and no key: root, or a member of the
agent's group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agent.clock import iso
from agent.commands.options import Sub, config_args, load
from agent.daemon.control import call
from agent.errors import ExitCode

WAIT_POLL_S = 0.5


def add_parsers(sub: Sub) -> None:
    p = sub.add_parser(
        "ps", help="what the running agent is doing: slots, jobs, GPUs, drains",
        description="Show the running agent: its state (running, draining and why, "
        "stopping), every slot with its GPUs and the job on it (id, type, state, progress, "
        "elapsed, ETA), the GPUs' utilisation, memory, temperature and power, the node's "
        "tags and price, and reports waiting to be delivered. Exits 10 when no agent runs "
        "with this state dir.")
    config_args(p)
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser(
        "drain", help="stop taking work; running jobs finish; the agent stays up",
        description="Take this node out of rotation: the agent takes no new job, lets the "
        "running ones finish, and stays up heartbeating DRAINING with the reason. The drain "
        "holds across restarts of the agent until `miner-agent resume`. With --wait, "
        "returns once no job runs (0), or at --timeout with 4, naming what still runs.")
    config_args(p)
    p.add_argument("--reason", default="operator drain", metavar="TEXT",
                   help="why (shown by ps and sent in the heartbeat)")
    p.add_argument("--wait", action="store_true", help="return once no job runs")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --wait: give up after S seconds (exit 4)")
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("resume", help="take work again after `miner-agent drain`",
                       description="End the operator's drain: the agent polls for work again "
                       "at once. Other holds (a low disk, a GPU still held, a shutdown) "
                       "stay, and are named.")
    config_args(p)
    p.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    p.set_defaults(func=cmd_resume)


def cmd_ps(args: argparse.Namespace) -> int:
    view = call(state_dir_of(args), "ps")
    print(json.dumps(view, indent=2) if args.json else format_view(view))
    return ExitCode.OK


def cmd_drain(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.wait:
        print("miner-agent drain: --timeout needs --wait", file=sys.stderr)
        return ExitCode.USAGE
    state_dir = state_dir_of(args)
    view = call(state_dir, "drain", reason=args.reason)
    if not args.wait:
        print(json.dumps(view, indent=2) if args.json else
              f"draining: {args.reason}; {_running_line(view)}; `miner-agent resume` takes "
              "work again")
        return ExitCode.OK
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while _jobs(view) and (deadline is None or time.monotonic() < deadline):
        time.sleep(WAIT_POLL_S)
        view = call(state_dir, "ps")
    if args.json:
        print(json.dumps(view, indent=2))
    if _jobs(view):
        print(f"drain: timed out after {args.timeout:g} s; still running:", file=sys.stderr)
        for job in _jobs(view):
            print(f"  {_job_line(job)}", file=sys.stderr)
        return ExitCode.TIMED_OUT
    if not args.json:
        print(f"drained: no job runs; `miner-agent resume` takes work again ({args.reason})")
    return ExitCode.OK


def cmd_resume(args: argparse.Namespace) -> int:
    view = call(state_dir_of(args), "resume")
    if args.json:
        print(json.dumps(view, indent=2))
        return ExitCode.OK
    print("resumed: taking work again" if view.get("resumed") else
          "not drained by the operator: nothing to resume")
    for drain in view.get("drains") or ():
        print(f"still holding: {_drain_line(drain)}")
    return ExitCode.OK


def state_dir_of(args: argparse.Namespace) -> Path:
    """``--state-dir`` as given (the config is not read: a broken one cannot hide the
    agent), else the state dir the config names, as `run` finds it."""
    return Path(args.state_dir) if args.state_dir else load(args).state_dir


def _jobs(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [s["job"] for s in view.get("slots") or () if s.get("job")]


def _running_line(view: dict[str, Any]) -> str:
    jobs = _jobs(view)
    return f"{len(jobs)} job(s) still running" if jobs else "no job runs"


def _job_line(job: dict[str, Any]) -> str:
    return (f"{job['id']} ({job.get('type') or '?'}, {job.get('state')}, "
            f"{_percent(job.get('progress'))}, {_duration(job.get('elapsed_s'))} elapsed)")


def _drain_line(drain: dict[str, Any]) -> str:
    kind = str(drain.get("kind"))
    what = {"operator": "drained by the operator", "shutdown": "stopping",
            "low_disk": "paused", "gpu": f"GPU {drain.get('gpu')} held back"}.get(kind, kind)
    text = f"{what}: {drain.get('reason')}"
    if drain.get("since"):
        text += f" (since {iso(drain['since'], timespec='seconds')}"
        text += f", by {drain['by']})" if drain.get("by") else ")"
    return text


def format_view(view: dict[str, Any]) -> str:
    """`ps` as a person reads it: the agent, its slots, its GPUs."""
    lines = [f"miner {view.get('miner_id')} (pid {view.get('pid')}): {view.get('state')}, "
             f"up {_duration(view.get('uptime_s'))}, coordinator {view.get('coordinator')}"
             f"{'' if view.get('registered') else ' (not registered yet)'}"]
    lines += [f"  {_drain_line(d)}" for d in view.get("drains") or ()]
    labels = [f"{k}={v}" for k, v in sorted((view.get("tags") or {}).items())]
    if view.get("price") is not None:
        labels.append(f"price {view['price']:g}")
    lines.append(f"  job types: {', '.join(view.get('allowed_job_types') or ()) or '-'}"
                 + (f"; {', '.join(labels)}" if labels else "")
                 + f"; reports waiting: {view.get('reports_pending', 0)}")
    lines += ["", _table(["SLOT", "GPUS", "JOB", "TYPE", "STATE", "PROGRESS", "ELAPSED",
                          "ETA"], [_slot_row(s) for s in view.get("slots") or ()])]
    if view.get("gpus"):
        lines += ["", _table(["GPU", "NAME", "UTIL", "MEMORY", "TEMP", "POWER"],
                             [_gpu_row(g) for g in view["gpus"]])]
    return "\n".join(lines)


def _slot_row(slot: dict[str, Any]) -> list[str]:
    gpus = ",".join(str(g) for g in slot.get("gpus") or ()) or "cpu"
    job = slot.get("job")
    if not job:
        held = slot.get("held_back")
        return [str(slot.get("slot")), gpus, "-", "", f"held back: {held}" if held else "free",
                "", "", ""]
    return [str(slot.get("slot")), ",".join(str(g) for g in job.get("gpus") or ()) or "cpu",
            str(job.get("id")), str(job.get("type") or "?"), str(job.get("state")),
            _percent(job.get("progress")), _duration(job.get("elapsed_s")),
            _duration(job.get("eta_s"))]


def _gpu_row(gpu: dict[str, Any]) -> list[str]:
    if gpu.get("error"):
        return [str(gpu.get("index")), str(gpu.get("name")), f"error: {gpu['error']}", "", "",
                ""]
    used, total = gpu.get("mem_used_mb"), gpu.get("mem_total_mb")
    return [str(gpu.get("index")), str(gpu.get("name")), _unit(gpu.get("util_pct"), "%"),
            f"{_unit(used, '')}/{_unit(total, ' MiB')}", _unit(gpu.get("temp_c"), " C"),
            _unit(gpu.get("power_w"), " W")]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def _unit(value: Any, unit: str) -> str:
    return "-" if value is None else f"{value}{unit}"


def _percent(fraction: Any) -> str:
    return f"{fraction * 100:.0f}%" if isinstance(fraction, int | float) else "-"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
