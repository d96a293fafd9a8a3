"""`miner-agent doctor` and `miner-agent bench`: is this node ready, and how fast is it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.commands.options import config_args
from agent.errors import ExitCode
from agent.node import bench, doctor


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``miner-agent doctor``."""
    p = subparsers.add_parser(
        "doctor", help="check this node is ready to run jobs",
        description="Check the driver, torch, the config, the directories, the key and the "
        "coordinator, one line each with what to do. With no coordinator_url configured "
        "the agent serves the embedded coordinator: doctor checks that one.")
    config_args(p)
    p.add_argument("--timeout-s", type=float, default=5.0, help="per network call")
    p.set_defaults(func=run_doctor)
    return p


def run_doctor(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run ``miner-agent doctor``; non-zero when any check FAILs.

    ``args.agent_config`` (the loaded config object), when the CLI sets it, wins over
    reading ``args.config`` here.
    """
    cfg = getattr(args, "agent_config", None) or doctor.load_for_doctor(
        args.config, getattr(args, "state_dir", None))
    checks = doctor.run_checks(cfg, timeout_s=args.timeout_s,
                               sandbox_probe=probe_torch_in_sandbox)
    checks += sandbox_checks(getattr(cfg, "sandbox", "on"))
    out(doctor.format_checks(checks))
    failed = [c for c in checks if c.status == "FAIL"]
    out(f"\n{len(failed)} failed, {sum(c.status == 'WARN' for c in checks)} warnings")
    return int(ExitCode.FAILED) if failed else int(ExitCode.OK)


def probe_torch_in_sandbox(python: str = sys.executable,
                           timeout_s: float = 120.0) -> dict[str, Any] | None:
    """doctor's torch probe as a job would run it: inside the node's job sandbox (every
    GPU device node bound, the driver's libraries where they live) with a job's scrubbed
    environment. None where there is no bubblewrap to run it in."""
    from agent.execution.environment import scrubbed_environ
    from agent.execution.sandbox import SandboxPolicy, find_bwrap

    bwrap = find_bwrap()
    if bwrap is None:
        return None
    with tempfile.TemporaryDirectory(prefix="miner-doctor-") as tmp:
        jobs, work = Path(tmp, "jobs"), Path(tmp, "work")
        jobs.mkdir()
        work.mkdir()
        policy = SandboxPolicy(jobs_root=jobs, work_root=work, bwrap=bwrap)
        return doctor.probe_torch(python, timeout_s, wrap=policy.argv,
                                  env=scrubbed_environ(os.environ))


def sandbox_checks(mode: str) -> list[doctor.Check]:
    """Can jobs be confined here: bubblewrap's namespaces, and a cgroup per job."""
    from agent.execution.cgroups import CgroupTree, describe
    from agent.execution.sandbox import SandboxUnavailable, probe

    checks = []
    try:
        version = probe()
        status: doctor.Status = "OK" if mode == "on" else "WARN"
        checks.append(doctor.Check(
            "sandbox", status, f"{version}: jobs get their own namespaces" + (
                "" if mode == "on" else ", but sandbox = \"off\" runs them unconfined"),
            "set sandbox = \"on\" (the default) unless every job is your own code"))
    except SandboxUnavailable as exc:
        checks.append(doctor.Check(
            "sandbox", "FAIL" if mode == "on" else "WARN", f"{exc}; {userns_settings()}",
            "install bubblewrap and allow user namespaces; the agent will not start with "
            "sandbox = \"on\" until this check passes"))
    tree, why = CgroupTree.discover()
    if tree is None:
        checks.append(doctor.Check(
            "job cgroups", "WARN", f"{why} ({describe()})",
            "run under the shipped unit (Delegate=yes) for a cgroup per job: without one, a "
            "job's end kills its process group and PID namespace, and no memory/pids limits "
            "apply"))
    else:
        tree.close()
        missing = {"memory", "pids"} - tree.controllers
        checks.append(doctor.Check(
            "job cgroups", "WARN" if missing else "OK", why,
            f"enable the {', '.join(sorted(missing))} controller(s) on the cgroup v2 "
            "hierarchy for per-job limits" if missing else ""))
    return checks


def userns_settings() -> str:
    """The kernel settings that decide whether unprivileged user namespaces work."""
    found = []
    for name in ("kernel/unprivileged_userns_clone", "user/max_user_namespaces",
                 "kernel/apparmor_restrict_unprivileged_userns"):
        try:
            value = Path("/proc/sys", name).read_text().strip()
        except OSError:
            continue
        found.append(f"{name.replace('/', '.')}={value}")
    return ", ".join(found) or "no user-namespace sysctls found"


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``miner-agent bench``."""
    p = subparsers.add_parser("bench", help="benchmark this node's GPUs (or CPU)",
                              description=_first_paragraph(bench.__doc__))
    p.add_argument("--quick", action="store_true", help="smaller sizes, about 30 s per GPU")
    p.add_argument("--device", default="auto", help="auto (every GPU, else CPU), cpu, cuda:N")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--attach-capabilities", nargs="?", const="", metavar="PATH",
                   help=f"write the summary the agent attaches to its capabilities "
                        f"(default: STATE_DIR/{bench.SUMMARY_NAME})")
    p.add_argument("--timeout-s", type=float, default=bench.DEFAULT_TIMEOUT_S,
                   help=argparse.SUPPRESS)
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run ``miner-agent bench``; the exit code."""
    try:
        result = bench.run_bench(args.quick, args.device, bench.ProgressBar(sys.stderr),
                                 args.timeout_s)
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return int(ExitCode.FAILED)
    print(bench.format_table(result))
    print(f"\ntorch {result.get('torch')}, CUDA {result.get('cuda') or '-'}, "
          f"{result.get('duration_s')} s{' (quick)' if result.get('quick') else ''}")
    if args.json:
        bench.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.attach_capabilities is not None:
        state_dir = getattr(args, "state_dir", None)
        path = Path(args.attach_capabilities) if args.attach_capabilities else \
            bench.default_summary_path(state_dir)
        bench.write_json(path, bench.bench_summary_for_capabilities(result))
        print(f"wrote {path} (attached to capabilities at the next register)")
    return int(ExitCode.OK)


def _first_paragraph(text: str | None) -> str | None:
    return text.split("\n\n")[0] if text else None
