"""`miner-agent exec` and `miner-agent verify`: one job in the foreground, and checking packages."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tomllib
from pathlib import Path

from agent.commands.console import JobConsole
from agent.commands.options import config_args, load
from agent.config import LAUNCHER_KINDS, default_state_dir
from agent.errors import OUTCOME_EXIT, CancelReason, ExitCode, InvalidJob, Outcome
from agent.execution.executor import ExecutorConfig, JobRun
from agent.execution.isolation import build_isolation, secret_paths, set_non_dumpable
from agent.execution.launcher import make_launcher
from agent.execution.modelstore import exec_models
from agent.execution.sandbox import SandboxUnavailable, probe, require_bwrap
from agent.execution.verify import verify
from agent.jobs import Job
from agent.layout import FOLDER_PREFIX, ZIP_SUFFIX, job_folder, package_paths
from agent.signals import capture_signals
from agent.text import printable


def add_exec_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "exec", help="run one job from a JSON file in the foreground",
        description="Run one job, described as a JSON file ({\"job_id\", \"payload\": "
        "{\"type\", ...}, \"constraints\"}), in its own process, with a live progress bar "
        "and log tail, and write its result package to OUT/job_<ID>/ (plus a zip). Ctrl-C "
        "cancels the job and keeps its partial results; a second Ctrl-C kills it at once. "
        "The exit code says the outcome: 0 completed, 1 failed, 3 canceled, 4 timed out, "
        "5 killed by a signal, 7 invalid job, 13 sandbox unavailable. Every payload type "
        "runs here, `command` too (the file is yours), inside the job sandbox.")
    p.add_argument("job_file", metavar="JOB.json", help="the job description")
    p.add_argument("--out", default="out", help="where the package goes (default: ./out)")
    p.add_argument("--launcher", choices=LAUNCHER_KINDS, default="auto",
                   help="how the job's process starts: spawn (a fresh interpreter that "
                   "imports only what the job needs), forkserver (the daemon's way: a "
                   "server that preloads torch and every runtime, then forks; it pays off "
                   "from the second job), or auto (default: spawn, for one job)")
    p.add_argument("--grace", type=float, default=10.0, metavar="S",
                   help="seconds between a cancel's SIGTERM and the SIGKILL (default 10)")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="set CUDA_VISIBLE_DEVICES for the job (e.g. '0,1'; '' for none)")
    p.add_argument("--models", default=None, metavar="FILE",
                   help="a JSON or TOML file mapping model names to local folders")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run the job unconfined, as this user, seeing what it can see (only "
                   "for your own code; by default it runs in the job sandbox, where it sees "
                   "a read-only system and only its own package and work folders)")
    p.add_argument("--quiet", action="store_true", help="no log tail or progress bar")
    p.add_argument("--json", action="store_true", help="print output.json when done")
    p.set_defaults(func=cmd_exec)


def add_verify_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify", help="check a result package (folder, zip or job id)",
        description="Check every file of a result package against output.sha256 and "
        "output.json's manifest (and a zip against its .sha256). Says which file is wrong; "
        "exit code 0 when the package is intact, 8 when it is not, 11 when there is none. "
        "Given a job id, checks the package the agent keeps for it in its state dir "
        "(jobs/job_<ID>/ and job_<ID>.zip).")
    config_args(p)
    p.add_argument("path", metavar="PATH|JOB_ID",
                   help="a job_<ID>/ folder, a job_<ID>.zip, or a job id")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    paths = _packages(args)
    if not paths:
        return ExitCode.NOT_FOUND
    code = ExitCode.OK
    for path in paths:
        report = verify(path)
        for problem in report.problems:  # a job's file names: shown, never acted on
            print(f"FAIL {printable(problem, one_line=True)}")
        if report.ok:
            print(f"OK {path}: {report.checked} files match their checksums")
            continue
        print(f"{path}: {len(report.problems)} problem(s); the package was changed or is "
              "incomplete: fetch it again from its source", file=sys.stderr)
        code = ExitCode.VERIFY_FAILED
    return code


def _packages(args: argparse.Namespace) -> list[Path]:
    """What ``verify`` checks: the path given, else the agent's package(s) for a job id."""
    given = Path(args.path)
    if given.exists():
        return [given]
    looks_like_path = "/" in args.path or args.path.endswith(ZIP_SUFFIX)
    if looks_like_path or not args.path:
        print(f"error: {args.path}: no such file or folder", file=sys.stderr)
        return []
    jobs_dir = load(args).jobs_dir
    job_id = args.path.removeprefix(FOLDER_PREFIX)
    folder, zip_path, _ = package_paths(job_folder(jobs_dir, job_id))
    found = [p for p in (folder, zip_path) if p.exists()]
    if found:
        return found
    unreadable = jobs_dir.parent.is_dir() and not os.access(jobs_dir.parent, os.R_OK | os.X_OK)
    why = (f"; {jobs_dir.parent} is not readable by uid {os.getuid()}: run as the agent's "
           "user (or root)") if unreadable else (
        "; it is kept on the machine whose agent ran the job, until keep_packages_days")
    print(f"error: no package for job {job_id} in {jobs_dir} (looked for {folder.name}/ and "
          f"{zip_path.name}){why}", file=sys.stderr)
    return []


def cmd_exec(args: argparse.Namespace) -> int:
    try:
        job = Job.from_file(args.job_file)
    except InvalidJob as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        print("fix the job file; `miner-agent exec --help` shows its shape", file=sys.stderr)
        return ExitCode.INVALID_JOB
    contract: dict[str, str] = {}
    read_only: list[Path] = []
    if args.models:
        models_file = Path(args.models).resolve()
        contract["MINER_MODELS_FILE"] = str(models_file)
        read_only = [models_file, *_model_paths(models_file)]
    stored_env, store_root = exec_models(Path(args.models) if args.models else None)
    contract.update(stored_env)  # the model store's names (the --models file wins a clash)
    read_only += store_root
    out = Path(args.out).resolve()
    set_non_dumpable()
    try:
        if not args.no_sandbox:
            require_bwrap()
        # No probe before the job (a sandboxed interpreter, ~0.1 s): the job's own start
        # is the probe. It runs only inside bubblewrap, so a sandbox that cannot be built
        # runs nothing; a job that then never started is diagnosed (_sandbox_failed).
        isolation = build_isolation(
            sandbox_on=not args.no_sandbox, jobs_root=out, work_root=out / ".work",
            hidden=secret_paths(default_state_dir(), None, None), read_only=read_only,
            probe_first=False)
    except SandboxUnavailable as exc:
        print(f"error: {exc} (or pass --no-sandbox)", file=sys.stderr)
        return ExitCode.SANDBOX_UNAVAILABLE
    # Your own job, no daemon's quotas: as with bytes, no limit on its package's files.
    cfg = ExecutorConfig(out, cancel_grace_s=args.grace, contract_env=contract,
                         sandbox=isolation.sandbox, cgroups=isolation.cgroups,
                         cgroup_note=isolation.cgroup_note, max_files=None)
    gpu_ids = None if args.gpus is None else [g for g in args.gpus.split(",") if g]
    try:
        return asyncio.run(_exec(job, cfg, args, gpu_ids))
    finally:
        isolation.close()


def _model_paths(models_file: Path) -> list[Path]:
    """The folders a models file names: the sandbox binds them in read-only."""
    try:
        text = models_file.read_text()
        data = tomllib.loads(text) if models_file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError):
        return []  # the job reports the unreadable file itself
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        data = data["models"]  # a [models] table, as the runtime reads it too
    if not isinstance(data, dict):
        return []
    # Relative folders are relative to the file, as the runtime resolves them.
    return [(models_file.parent / os.path.expanduser(v)).resolve() for v in data.values()
            if isinstance(v, str)]


async def _exec(job: Job, cfg: ExecutorConfig, args: argparse.Namespace,
                gpu_ids: list[str] | None) -> int:
    console = JobConsole(job.job_id, quiet=args.quiet)
    launcher = make_launcher(args.launcher, sandbox=cfg.sandbox, one_job=True)
    run = JobRun(job, cfg, launcher, gpu_ids=gpu_ids, on_line=console.line,
                 on_event=console.event)

    def interrupt(signum: int) -> None:
        if run.cancel_reason is None:
            console.note("cancel requested; saving partial results (Ctrl-C again to kill)")
            run.cancel(CancelReason.INTERRUPTED)
        else:
            console.note("killing the job now")
            run.kill_now()

    try:
        with capture_signals(interrupt):
            report = await run.run()
        if report.outcome is Outcome.COMPLETED:
            console.complete()
    finally:
        await launcher.close()
        console.close()
    if report.outcome is Outcome.FAILED and run.times["started"] is None and \
            cfg.sandbox is not None and await _sandbox_failed():
        return ExitCode.SANDBOX_UNAVAILABLE
    where = report.folder or cfg.out_root
    detail = f" ({report.error_code}: {report.error_message})" if report.error_code else ""
    partial = " with partial results" if report.partial else ""
    print(printable(f"{job.job_id}: {report.outcome.value}{partial}{detail}"),
          file=sys.stderr)
    print(f"package: {where}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.output, indent=2))
    return OUTCOME_EXIT[report.outcome]


async def _sandbox_failed() -> bool:
    """Whether the job never started because the sandbox cannot be built here (says why)."""
    try:
        await asyncio.to_thread(probe)
    except SandboxUnavailable as exc:
        print(f"error: {exc} (or pass --no-sandbox)", file=sys.stderr)
        return True
    return False
