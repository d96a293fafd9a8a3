"""The node's job sandbox: what a job's process can see, built with bubblewrap.

Two layers (docs/security.md has the threat model):

- **The node's sandbox** (this module): one bubblewrap per fork server (and one per
  job on the plain-spawn path). A user namespace without new user namespaces; the
  host's root bound read-only; ``/tmp``, ``/var/tmp``, ``/run``, ``/home``, ``/root``
  and ``/dev/shm`` replaced by empty tmpfs; the agent's state dir, config file, API key
  file and systemd credentials covered; the interpreter, the agent's code, the model
  paths and the shared download cache bound back read-only; the folders of job
  packages and work dirs bound read-write; a minimal ``/dev`` plus the NVIDIA device
  nodes. Inside, the fork server keeps ``CAP_SYS_ADMIN``, ``CAP_NET_ADMIN`` and
  ``CAP_SETPCAP`` *of its own user namespace* (nothing on the host) to build each job's
  namespaces.
- **The job's jail** (``runtimes.jail``): per job, fresh mount, PID, IPC, UTS and
  cgroup namespaces (and network, when the type has none), where every other job's
  folder is covered and the job's process runs without any capability.

bubblewrap (Debian's ``bubblewrap``, the sandbox Flatpak uses) is a small,
audited, setuid-free tool that makes the namespaces and mounts in one exec; the
per-job part is a handful of ``unshare``/``mount`` calls in the already-running
fork server, so a job still starts in milliseconds.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.layout import LOGS_DIR

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 20.0
HIDDEN_TREES = ("/tmp", "/var/tmp", "/run", "/home", "/root", "/dev/shm")
# The host's own secrets, covered wherever they exist: readable by an agent run as root.
HOST_SECRETS = (Path("/etc/shadow"), Path("/etc/gshadow"), Path("/etc/ssh"),
                Path("/etc/sudoers"), Path("/etc/sudoers.d"), Path("/var/lib/miner-agent"),
                Path("/etc/miner-agent"), Path("/etc/credstore"), Path("/etc/credstore.encrypted"))
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                  "/dev/nvidia-modeset", "/dev/nvidia-caps")
SANDBOX_CAPS = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETPCAP")
NETWORK_OFF_BY_DEFAULT = frozenset({"command"})


class SandboxUnavailable(Exception):
    """The sandbox cannot be built on this node; the message says why and what to do."""


def job_tmp_bytes(tmp_mb: int, memory_mb: int = 0, slots: int = 1) -> int:
    """The size of each of a job's private ``/tmp`` and ``/dev/shm`` (tmpfs, held in RAM).

    ``tmp_mb`` (config ``job_tmp_mb``) when set; else a quarter of the node's memory
    shared among the ``slots`` jobs it runs at once, at most the job's memory limit
    (``job_memory_max_mb``), and never under 64 MiB: the two of every job running
    together hold at most half the RAM, where the kernel's default would let each take
    half (without the memory controller, eight jobs could have held four times the RAM).
    """
    if tmp_mb > 0:
        return tmp_mb << 20
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        ram = 4 << 30
    size = ram // (4 * max(1, slots))
    if memory_mb > 0:
        size = min(size, memory_mb << 20)
    return max(size, 64 << 20)


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


@dataclass(frozen=True)
class SandboxPolicy:
    """Where things are, and what a job may see of them."""

    jobs_root: Path
    work_root: Path
    hidden: tuple[Path, ...] = ()  # state dir, config, key file, credentials
    read_only: tuple[Path, ...] = ()  # shared cache, model paths
    network: Mapping[str, bool] = field(default_factory=dict)
    bwrap: str = "bwrap"
    tmp_bytes: int = field(default_factory=lambda: job_tmp_bytes(0))  # each job's /tmp, /dev/shm

    def network_for(self, job_type: str) -> bool:
        if job_type in self.network:
            return bool(self.network[job_type])
        return job_type not in NETWORK_OFF_BY_DEFAULT

    def argv(self, command: list[str]) -> list[str]:
        """bubblewrap's command line for the node's sandbox, running ``command``."""
        # Its own PID namespace with the command as PID 1: when the fork server dies
        # (with the agent: --die-with-parent), every job in it dies too.
        args = [self.bwrap, "--unshare-user", "--unshare-pid", "--as-pid-1", "--unshare-ipc",
                "--unshare-uts", "--hostname", "miner-job", "--die-with-parent",
                "--new-session"]
        for cap in SANDBOX_CAPS:
            args += ["--cap-add", cap]
        args += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
        for tree in HIDDEN_TREES:
            if os.path.isdir(tree) and not os.path.islink(tree):
                args += ["--tmpfs", tree]
        args += ["--dir", "/run/miner-jail"]
        for path in _existing(code_roots()):
            args += ["--ro-bind", str(path), str(path)]
        args += self._cover((*HOST_SECRETS, *self.hidden))
        for path in _existing(self.read_only):
            args += ["--ro-bind", str(path), str(path)]
        # A secret inside a read-only path just bound (a state dir inside a model folder)
        # is covered again; a read-only path inside a secret one (the cache under the
        # state dir) stays bound.
        args += self._cover([h for h in self.hidden
                             if any(h != r and h.is_relative_to(r) for r in self.read_only)])
        for path in _existing((self.jobs_root, self.work_root)):
            args += ["--bind", str(path), str(path)]
        for device in nvidia_devices():
            args += ["--dev-bind", device, device]
        # Nothing writable is shared between jobs: the tmpfs trees and /dev turn read-only
        # (the binds inside them keep theirs); each job gets a fresh /tmp and /dev/shm.
        for tree in ("/dev", *HIDDEN_TREES):
            if tree in ("/tmp", "/dev/shm"):
                continue
            if tree == "/dev" or (os.path.isdir(tree) and not os.path.islink(tree)):
                args += ["--remount-ro", tree]
        return [*args, "--chdir", "/", "--", *command]

    @staticmethod
    def _cover(paths: Iterable[Path]) -> list[str]:
        args: list[str] = []
        for path in paths:
            if path.is_dir():
                args += ["--tmpfs", str(path)]
            elif path.is_file():  # not /dev/null named as a config file (MINER_AGENT_CONFIG)
                args += ["--ro-bind", "/dev/null", str(path)]
        return args

    def jail(self, package_dir: Path, work_dir: Path, job_type: str,
             gpu_devices: list[str] | None) -> dict[str, Any]:
        """The per-job request the keeper reads (``runtimes.jail.JailRequest``).

        The package's logs are the agent's, written from the job's pipes: read-only
        to the job, so it cannot remove what it printed or swap a log for a link that
        the agent would then read and ship.
        """
        return {"package_dir": str(package_dir), "work_dir": str(work_dir),
                "covered": [str(self.jobs_root), str(self.work_root)],
                "read_only": [str(package_dir / LOGS_DIR)],
                "network": self.network_for(job_type), "gpu_devices": gpu_devices,
                "keep": self.kept_under_fresh_trees, "tmp_size": self.tmp_bytes}

    @functools.cached_property
    def kept_under_fresh_trees(self) -> list[str]:
        """Code and read-only paths under /tmp or /dev/shm, which each job gets fresh."""
        fresh = (Path("/tmp"), Path("/dev/shm"))
        paths = [*code_roots(), *_existing(self.read_only)]
        return [str(p) for p in paths if any(p.is_relative_to(t) and p != t for t in fresh)]


@functools.lru_cache(maxsize=1)
def code_roots() -> tuple[Path, ...]:
    """What a job's interpreter needs to read: Python, its packages, the agent's code."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
             Path(sys.executable).resolve().parent.parent,
             *_package_parents("agent", "runtimes")}
    for entry in sys.path:
        if entry and os.path.isabs(entry) and os.path.isdir(entry):
            roots.add(Path(entry).resolve())
    ordered = sorted(roots, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for root in ordered:  # a root inside another is bound with it
        if any(root.is_relative_to(k) for k in kept) or \
                any(Path(tree).is_relative_to(root) for tree in HIDDEN_TREES):
            continue  # "/", or a script's folder like /tmp: never bound over the covers
        kept.append(root)
    return tuple(kept)


def _package_parents(*names: str) -> list[Path]:
    """Where these top-level packages live (found, not imported: runtimes pulls in torch)."""
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            found.append(Path(location).resolve().parent)
    return found


def nvidia_devices() -> list[str]:
    """The NVIDIA device nodes of this node (the keeper hides other jobs' GPUs)."""
    found = [d for d in NVIDIA_CONTROL if os.path.exists(d)]
    found += sorted(d for d in glob.glob("/dev/nvidia[0-9]*") if d[11:].isdigit())
    return found


def _existing(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if p.exists()]


def require_bwrap() -> str:
    """bubblewrap's path; raises :class:`SandboxUnavailable` (what to do) when it is missing."""
    tool = find_bwrap()
    if tool is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed: install it (Debian/Ubuntu: "
            "`apt-get install bubblewrap`; scripts/setup.sh does), or set sandbox = \"off\" "
            "to run jobs unconfined (only for code you trust)")
    return tool


def probe(bwrap: str | None = None) -> str:
    """Build a throw-away sandbox and a job jail in it; returns bwrap's version.

    Raises :class:`SandboxUnavailable` with the reason and the fix.
    """
    tool = bwrap or require_bwrap()
    root = Path("/")
    policy = SandboxPolicy(jobs_root=root / "nonexistent-jobs", work_root=root / "nonexistent",
                           bwrap=tool)
    argv = policy.argv([sys.executable, "-c", _SELF_TEST])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, env=_probe_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap did not run: {exc}") from None
    if done.returncode != 0 or "jail ok" not in done.stdout:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SandboxUnavailable(
            f"the job sandbox cannot be built here: {reason}. User namespaces must be "
            "allowed (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces "
            "> 0; under systemd, RestrictNamespaces= must allow user mnt pid net); "
            "`miner-agent doctor` shows the details, or set sandbox = \"off\" to run jobs "
            "unconfined")
    version = subprocess.run([tool, "--version"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S).stdout.strip()
    return version or "bwrap"


def _probe_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG")}


# Runs inside the probe sandbox: both jail models (fork server, spawn) on scratch folders.
_SELF_TEST = "from runtimes.jail import self_test; self_test()"
