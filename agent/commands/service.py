"""``miner-agent install-service``: the systemd units, the config template, user and dirs.

Every step is planned first as an :class:`Action`, then either printed
(``--dry-run``) or carried out, so the dry run shows exactly what a real run
does. ``--prefix DIR`` installs under another root (tests, image builds); the
system user, ownership and ``systemctl daemon-reload`` are left out there.

The config is the operator's file once written: install-service keeps the sha256
of the template it wrote beside it, and later refuses to replace a file whose
hash differs (it was edited) unless told ``--force`` (which keeps a backup) or
``--keep-config``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.errors import ConfigError, ExitCode

USER = "miner-agent"
UNITS = ("miner-agent.service", "miner-agent@.service")
DEFAULT_EXEC = "/usr/local/bin/miner-agent"
CONFIG_PATH = "etc/miner-agent/agent.toml"
HASH_PATH = "etc/miner-agent/.agent.toml.template-sha256"
UNIT_DIR = "etc/systemd/system"
KEPT = "kept as it is (--keep-config)"
# (path under the root, mode, owned by the service user)
DIRECTORIES = (
    ("etc/miner-agent", 0o755, False),
    ("var/lib/miner-agent", 0o750, True),
    ("var/cache/miner-agent", 0o750, True),
    ("var/log/miner-agent", 0o750, True),
)

CONFIG_TEMPLATE = """\
# miner-agent configuration (TOML). Written by `miner-agent install-service`;
# once you edit it, install-service leaves it alone unless given --force.
# Check it with: miner-agent doctor --config /etc/miner-agent/agent.toml

# The coordinator's base URL (the agent adds /v1/...).
coordinator_url = "{coordinator_url}"
# This node's miner id, as issued with its API key.
miner_id = "{miner_id}"
# The API key is not written here. Under systemd it arrives through LoadCredential=
# as $CREDENTIALS_DIRECTORY/api-key, read from /etc/miner-agent/api-key (mode 0600).
# Outside systemd, name a file instead:
# api_key_file = "/etc/miner-agent/api-key"

# Durable state (journal, results) and caches (models, inputs). systemd creates both.
state_dir = "/var/lib/miner-agent"
cache_dir = "/var/cache/miner-agent"
# "auto" (journal under systemd, else text), "text", "journal" or "json".
log_format = "auto"

# Seconds between heartbeats (they carry GPU telemetry) and between polls for work.
heartbeat_interval_s = 5
poll_interval_s = 1
# Idle: a coordinator offering long-poll holds each empty poll up to poll_wait_s and
# answers the moment a job fits; without it empty polls back off to poll_max_interval_s.
poll_wait_s = 20
poll_max_interval_s = 3
# On stop: let running jobs finish for up to drain_timeout_s, then cancel them and
# wait cancel_grace_s before killing. Keep TimeoutStopSec= in the unit above the sum.
drain_timeout_s = 120
cancel_grace_s = 10
# Jobs run at once on each GPU.
jobs_per_gpu = 1
# Prometheus metrics on 127.0.0.1:PORT/metrics; 0 turns them off.
metrics_port = 0
# Figures from `miner-agent bench --attach-capabilities`, sent with the capabilities.
# bench_file = "/var/lib/miner-agent/bench-summary.json"

# Jobs are strangers' code (docs/security.md). The sandbox confines each job; "off"
# runs them as this user, unconfined: only for code you trust.
sandbox = "on"
# Payload types this node runs. "command" runs any program: add it only for
# submitters you trust with that.
allowed_job_types = ["inference", "batch_inference", "training", "sleep"]
# A job whose result package grows past this many MiB is stopped (output_too_large).
max_job_output_mb = 20480
# A job whose work folder (scratch, HOME, caches) grows past this is stopped
# (work_too_large), so one job cannot fill the state dir's disk.
max_job_work_mb = 102400
# A job whose package holds more files than this (folders and links count too) is
# stopped (output_too_large); the seal packages only this many, so a job cannot
# flood the agent's memory with names.
max_job_files = 20000
# A job that makes more entries than this in its work folder is stopped
# (work_too_large): a flood of empty files would use up the disk's inodes.
max_job_work_files = 1000000
# Each of a job's stdout and stderr logs keeps this many MiB; what the job prints past
# it is dropped (output.json counts it) and the job goes on (0: no cap).
max_job_log_mb = 4096
# Per-job cgroup limits where the controllers are enabled (0: no limit).
job_memory_max_mb = 0
job_pids_max = 16384
# Each sandboxed job's private /tmp and /dev/shm, in MiB of RAM (0: a quarter of
# the node's memory shared among its slots, at most job_memory_max_mb).
job_tmp_mb = 0
# Your own executables `pre-job` and `post-job` in this folder run around each job, as
# this user, for at most hook_timeout_s; a failing pre-job refuses the job.
# hooks_dir = "/etc/miner-agent/hooks"
# hook_timeout_s = 60

# The built-in inference runtime keeps models loaded in a warm worker per GPU; a model
# unused for model_idle_s is unloaded (warm_models = false: a process per job instead).
warm_models = true
model_idle_s = 600

# Network inside the sandbox, per payload type (on unless set false; command is off).
[sandbox_network]
command = false

# Models this node serves, by the name jobs ask for, and where the weights are, besides
# those `miner-agent models pull` put in the model store (this table wins a clash).
# Paths outside /var/cache/miner-agent need ReadOnlyPaths= in a unit drop-in.
[models]
# "llama3.2:3b" = "/srv/models/llama3.2-3b"

# Labels for this node, sent with its capabilities; a job whose constraints.tags ask
# for one goes only to nodes that have it with that value.
# [tags]
# pool = "eu-research"
"""


@dataclass(frozen=True)
class Action:
    """One step of an install: what it does, in words a dry run can print."""

    kind: Literal["useradd", "mkdir", "write", "backup", "run", "note"]
    target: str
    content: str = ""
    mode: int = 0o644
    owner: str | None = None
    command: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the operator."""
        owner = f" owner {self.owner}" if self.owner else ""  # user:group
        if self.kind == "mkdir":
            return f"mkdir -m {self.mode:04o} {self.target}{owner}"
        if self.kind == "write":
            return f"write {self.target} (mode {self.mode:04o}, {len(self.content)} bytes){owner}"
        if self.kind == "backup":
            return f"copy {self.target} to {self.content}"
        if self.kind in ("useradd", "run"):
            return shlex.join(self.command)
        return f"note: {self.target}"


class ConfigEdited(ConfigError):
    """Raised when install-service would overwrite a config the operator has edited."""

    code = "config_edited"


def sha256(text: str) -> str:
    """Hex sha256 of ``text`` as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


def render_config(coordinator_url: str = "https://coordinator.example.com",
                  miner_id: str = "") -> str:
    """The commented config template, with the two values a node must have."""
    for value in (coordinator_url, miner_id):
        if any(c in value for c in '"\\\n'):
            raise ConfigError(f"not allowed in a config value: {value!r}")
    return CONFIG_TEMPLATE.format(coordinator_url=coordinator_url, miner_id=miner_id)


def find_units_dir(explicit: str | None = None) -> Path:
    """Where the unit files ship: ``explicit``, the source tree, or ``share/``."""
    candidates = [Path(explicit)] if explicit else [
        Path(__file__).resolve().parents[2] / "systemd",
        Path(sys.prefix) / "share" / "miner-agent" / "systemd",
    ]
    for path in candidates:
        if all((path / unit).is_file() for unit in UNITS):
            return path
    raise ConfigError(f"unit files not found in {', '.join(map(str, candidates))}; "
                      "pass --units-from DIR")


def render_unit(text: str, exec_path: str) -> str:
    """The unit with ``ExecStart`` pointing at ``exec_path``."""
    return text.replace(f"ExecStart={DEFAULT_EXEC} ", f"ExecStart={exec_path} ")


@dataclass(frozen=True)
class Options:
    """What ``install-service`` was asked to do."""

    prefix: Path = Path("/")
    exec_path: str = DEFAULT_EXEC
    units_from: str | None = None
    coordinator_url: str = "https://coordinator.example.com"
    miner_id: str = ""
    force: bool = False
    keep_config: bool = False

    @property
    def system(self) -> bool:
        """True when installing into the running system (not under a prefix)."""
        return self.prefix.resolve() == Path("/")


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _user_actions(opts: Options) -> list[Action]:
    if not opts.system:
        return [Action("note", f"prefix install: no system user '{USER}', no chown")]
    if user_exists(USER):
        return [Action("note", f"user {USER} exists")]
    return [Action("useradd", USER, command=(
        "useradd", "--system", "--user-group", "--home-dir", "/var/lib/miner-agent",
        "--no-create-home", "--shell", "/usr/sbin/nologin",
        "--comment", "GPU miner execution agent", USER))]


def config_actions(opts: Options) -> list[Action]:
    """Write, keep or refuse the config; raises :class:`ConfigEdited` on an edited file."""
    path, hash_path = opts.prefix / CONFIG_PATH, opts.prefix / HASH_PATH
    new = render_config(opts.coordinator_url, opts.miner_id)
    owner = f"root:{USER}" if opts.system else None  # the agent reads it, never writes it
    write = [Action("write", str(path), new, 0o640, owner),
             Action("write", str(hash_path), sha256(new) + "\n", 0o644)]
    if not path.exists():
        return write
    current = path.read_text(encoding="utf-8")
    if current == new:
        return [Action("note", f"{path} is up to date")]
    written = hash_path.read_text().strip() if hash_path.exists() else None
    if written == sha256(current):
        return write  # still the template we wrote: safe to replace with the new one
    if opts.keep_config:
        return [Action("note", f"{path} was edited: {KEPT}")]
    if opts.force:
        backup = f"{path}.bak-{time.strftime('%Y%m%d%H%M%S')}"
        return [Action("backup", str(path), backup), *write]
    raise ConfigEdited(
        f"{path} was edited since install-service wrote it; refusing to overwrite it.\n"
        f"  compare: miner-agent install-service --print-config | diff -u {path} -\n"
        "  then either keep yours (--keep-config) or replace it, with a backup (--force)")


def plan(opts: Options) -> list[Action]:
    """Every action of an install, in order; nothing is touched."""
    units_dir = find_units_dir(opts.units_from)
    actions = _user_actions(opts)
    for rel, mode, owned in DIRECTORIES:
        actions.append(Action("mkdir", str(opts.prefix / rel), mode=mode,
                              owner=f"{USER}:{USER}" if owned and opts.system else None))
    actions.append(Action("mkdir", str(opts.prefix / UNIT_DIR), mode=0o755))
    for unit in UNITS:
        text = render_unit((units_dir / unit).read_text(encoding="utf-8"), opts.exec_path)
        actions.append(Action("write", str(opts.prefix / UNIT_DIR / unit), text, 0o644))
    actions += config_actions(opts)
    if opts.system and shutil.which("systemctl"):
        actions.append(Action("run", "daemon-reload", command=("systemctl", "daemon-reload")))
    if not Path(opts.prefix, opts.exec_path.lstrip("/")).exists():
        actions.append(Action("note", f"{opts.exec_path} does not exist: pass --exec-start "
                                      "with the installed miner-agent's path"))
    return actions


def apply(action: Action) -> None:
    """Carry out one action."""
    if action.kind in ("useradd", "run"):
        subprocess.run(action.command, check=True)
    elif action.kind == "mkdir":
        Path(action.target).mkdir(mode=action.mode, parents=True, exist_ok=True)
        os.chmod(action.target, action.mode)
    elif action.kind == "backup":
        shutil.copy2(action.target, action.content)
    elif action.kind == "write":
        _write_file(Path(action.target), action.content, action.mode)
    if action.owner and action.kind in ("mkdir", "write"):
        user, group = action.owner.split(":")
        shutil.chown(action.target, user=user, group=group)


def _write_file(path: Path, content: str, mode: int) -> None:
    # Write beside and rename, so that a crash never leaves half a unit or config.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def next_steps(opts: Options, url_given: bool, config_written: bool = True) -> str:
    """What is left to do after an install: only what install-service was not told (or
    all of it, where an edited config was kept)."""
    config = "/" + CONFIG_PATH
    url_given = url_given and config_written
    unset = [name for name, given in (("coordinator_url", url_given),
                                      ("miner_id", bool(opts.miner_id) and config_written))
             if not given]
    steps = ["put the miner key in /etc/miner-agent/api-key:\n"
             "       install -m 0600 -o root -g root /dev/stdin /etc/miner-agent/api-key"]
    if unset:
        steps.append(f"set {' and '.join(unset)} in {config}")
    steps += ["miner-agent doctor", "systemctl enable --now miner-agent",
              "journalctl -u miner-agent -f"]
    lines = ["next:"] + [f"  {n}. {step}" for n, step in enumerate(steps, 1)]
    if url_given:
        lines.insert(0, f"{config} names the coordinator {opts.coordinator_url}")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``miner-agent install-service``."""
    p = subparsers.add_parser("install-service",
                              help="install the systemd units, config template, user and dirs")
    p.add_argument("--dry-run", action="store_true", help="print every action, change nothing")
    p.add_argument("--prefix", default="/", help="install under this root (default /)")
    p.add_argument("--exec-start", default=DEFAULT_EXEC, metavar="PATH",
                   help=f"the miner-agent executable the units run (default {DEFAULT_EXEC})")
    p.add_argument("--units-from", metavar="DIR", help="where the .service files are")
    p.add_argument("--coordinator-url", default=None, metavar="URL",
                   help="the coordinator the installed config names (default: a placeholder "
                   "to edit)")
    p.add_argument("--miner-id", default="", help="the miner id the installed config names")
    conflict = p.add_mutually_exclusive_group()
    conflict.add_argument("--force", action="store_true",
                          help="replace an edited config (a .bak copy is kept)")
    conflict.add_argument("--keep-config", action="store_true",
                          help="leave an edited config as it is, install the rest")
    p.add_argument("--print-config", action="store_true",
                   help="print the config template and exit (to diff against yours)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run ``miner-agent install-service``; the exit code."""
    url = args.coordinator_url or Options.coordinator_url
    try:
        if args.print_config:
            out(render_config(url, args.miner_id).rstrip("\n"))
            return int(ExitCode.OK)
        opts = Options(Path(args.prefix), args.exec_start, args.units_from,
                       url, args.miner_id, args.force, args.keep_config)
        actions = plan(opts)
    except ConfigError as exc:
        print(f"install-service: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG)
    if opts.system and not args.dry_run and os.geteuid() != 0:
        print("install-service: run as root, or use --dry-run or --prefix", file=sys.stderr)
        return int(ExitCode.USAGE)
    for action in actions:
        out(("would " if args.dry_run and action.kind != "note" else "") + action.describe())
        if not args.dry_run:
            apply(action)
    if opts.system:
        kept = any(a.kind == "note" and a.target.endswith(KEPT) for a in actions)
        out(next_steps(opts, bool(args.coordinator_url), config_written=not kept))
    return int(ExitCode.OK)
