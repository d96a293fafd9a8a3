"""``miner-agent uninstall-service``: undo ``install-service``, step by step.

Stops the agent (the service and every ``miner-agent@`` instance: each drains first,
as a stop always does), disables the units (their ``*.wants/`` links), removes the two
unit files and reloads systemd. ``--purge`` also removes what is the node's own: the
config directory (config, API key, instance configs, unit drop-ins), the state, cache
and log directories, and the system user. Every step is planned first, then printed
(``--dry-run``) or carried out; ``--prefix DIR`` works under another root, as
install-service's does (no systemctl, no user there).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.commands.service import DIRECTORIES, UNIT_DIR, UNITS, USER, user_exists
from agent.errors import ExitCode

INSTANCES = "miner-agent@*.service"


@dataclass(frozen=True)
class Step:
    """One step of an uninstall, in words a dry run can print."""

    kind: Literal["run", "remove", "rmtree", "note"]
    target: str
    command: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "run":
            return shlex.join(self.command)
        if self.kind == "remove":
            return f"remove {self.target}"
        if self.kind == "rmtree":
            return f"remove {self.target} and everything in it"
        return f"note: {self.target}"


def _systemctl(root: Path) -> bool:
    return root.resolve() == Path("/") and shutil.which("systemctl") is not None


def unit_steps(root: Path) -> list[Step]:
    """Stop, disable and remove the units."""
    unit_dir = root / UNIT_DIR
    steps = []
    if _systemctl(root):
        # Stopping drains running jobs first, for up to the unit's TimeoutStopSec. The
        # pattern matches loaded instances only; the service is named only if installed.
        names = (UNITS[0], INSTANCES) if (unit_dir / UNITS[0]).exists() else (INSTANCES,)
        steps.append(Step("run", "stop", ("systemctl", "stop", *names)))
    elif root.resolve() == Path("/"):
        steps.append(Step("note", "no systemctl here: stop the agent yourself"))
    # What `systemctl disable` removes: the links that enable the service and instances.
    links = sorted(p for p in unit_dir.glob("*.wants/miner-agent*.service") if p.is_symlink())
    steps += [Step("remove", str(p)) for p in links]
    for unit in UNITS:
        path = unit_dir / unit
        steps.append(Step("remove", str(path)) if path.exists()
                     else Step("note", f"{path} is not there"))
    if _systemctl(root):
        steps.append(Step("run", "daemon-reload", ("systemctl", "daemon-reload")))
    return steps


def purge_steps(root: Path) -> list[Step]:
    """The node's own: drop-ins, config, state, cache and logs, then the user."""
    steps = []
    drop_ins = [root / UNIT_DIR / f"{unit}.d" for unit in UNITS]
    for path in [*drop_ins, *(root / rel for rel, _, _ in DIRECTORIES)]:
        if path.exists():
            steps.append(Step("rmtree", str(path)))
    if root.resolve() != Path("/"):
        steps.append(Step("note", f"prefix uninstall: the system user '{USER}' is left"))
    elif user_exists(USER):
        steps.append(Step("run", "userdel", ("userdel", USER)))
    return steps


def plan(root: Path, purge: bool) -> list[Step]:
    """Every step of an uninstall, in order; nothing is touched."""
    steps = unit_steps(root)
    if purge:
        return steps + purge_steps(root)
    kept = [str(root / rel) for rel, _, _ in DIRECTORIES if (root / rel).exists()]
    if kept:
        steps.append(Step("note", f"kept: {', '.join(kept)} and the user {USER} "
                                  "(--purge removes them)"))
    return steps


def apply(step: Step) -> None:
    """Carry out one step."""
    if step.kind == "run":
        subprocess.run(step.command, check=True)
    elif step.kind == "remove":
        Path(step.target).unlink(missing_ok=True)
    elif step.kind == "rmtree":
        shutil.rmtree(step.target)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``miner-agent uninstall-service``."""
    p = subparsers.add_parser(
        "uninstall-service", help="stop and remove the systemd units (--purge: also the "
        "config, state, cache, logs and user)")
    p.add_argument("--dry-run", action="store_true", help="print every step, change nothing")
    p.add_argument("--purge", action="store_true",
                   help="also remove /etc/miner-agent (config and API key), the state, cache "
                   "and log directories, and the miner-agent user")
    p.add_argument("--prefix", default="/", help="uninstall under this root (default /)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run ``miner-agent uninstall-service``; the exit code."""
    root = Path(args.prefix)
    system = root.resolve() == Path("/")
    if system and not args.dry_run and os.geteuid() != 0:
        print("uninstall-service: run as root, or use --dry-run or --prefix", file=sys.stderr)
        return int(ExitCode.USAGE)
    for step in plan(root, args.purge):
        out(("would " if args.dry_run and step.kind != "note" else "") + step.describe())
        if not args.dry_run:
            try:
                apply(step)
            except (OSError, subprocess.CalledProcessError) as exc:
                print(f"uninstall-service: {step.describe()} failed: {exc}", file=sys.stderr)
                return int(ExitCode.FAILED)
    return int(ExitCode.OK)
