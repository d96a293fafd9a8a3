"""A cgroup (v2) per job, under a subtree the agent owns: limits, and a kill that misses nothing.

Where the subtree is:

- under systemd with ``Delegate=yes`` the unit's cgroup is ours. The agent is its only
  process at start: it moves itself into ``<unit>/supervisor`` (v2 allows controllers
  only in cgroups without processes of their own), enables the controllers it was
  given in ``<unit>`` and ``<unit>/jobs``, and makes ``<unit>/jobs/<job>`` per job;
- anywhere else (a shell, a test) the agent shares its cgroup with other processes and
  must not move: it makes ``<own cgroup>/miner-agent.<pid>/<job>``, with whatever
  controllers its cgroup already hands down (often none).

Each job's processes join their cgroup before any job code runs (the keeper writes
itself into ``cgroup.procs`` through a directory descriptor the agent opened). At the
end of a job and on a forced cancel the agent writes ``cgroup.kill`` and waits until
``cgroup.events`` says ``populated 0``: a setsid, double-forked grandchild dies with
the rest. ``memory.max``, ``pids.max`` and ``cpu.weight`` are written where those
controllers are enabled; what was applied is recorded in the job's package.

Without a writable cgroup v2 hierarchy (or without ``cgroup.kill``, Linux < 5.14) the
executor falls back to killing the process group (and, in the sandbox, PID 1 of the
job's PID namespace, which takes every process of the namespace with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

WANTED_CONTROLLERS = ("cpu", "memory", "pids")
KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class Limits:
    """What one job may use; None or 0 leaves that resource unlimited."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpu_weight: int | None = None


@dataclass
class JobCgroup:
    """One job's cgroup directory."""

    path: Path
    applied: dict[str, str] = field(default_factory=dict)

    def open_fd(self) -> int:
        """A directory descriptor the job's keeper writes itself into ``cgroup.procs`` by."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def populated(self) -> bool:
        # os.open/os.read: a third of the system calls of read_text(), each of which hands
        # the GIL over to a waiting thread; this is looked at for every job that ends.
        try:
            fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            return b"populated 1" in os.read(fd, 4096)
        finally:
            os.close(fd)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, now (the kernel walks it for us)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / "cgroup.kill").write_text("1")

    async def kill_and_wait(self, timeout_s: float = KILL_WAIT_S) -> bool:
        """Kill what is left and wait until the cgroup is empty; False if it never emptied."""
        if not self.populated():
            return True
        self.kill()
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while self.populated():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def oom_kills(self) -> int:
        """How many processes the kernel killed for ``memory.max`` (0 without the controller)."""
        try:
            text = (self.path / "memory.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the (empty) cgroup; a leftover is retried at the next start."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", self.path, exc.strerror)


@dataclass
class CgroupTree:
    """The agent's subtree: where job cgroups are made, and which controllers they get."""

    parent: Path
    controllers: frozenset[str]
    delegated: bool
    _count: int = 0

    @classmethod
    def discover(cls) -> tuple[CgroupTree | None, str]:
        """Our subtree, or None and the reason (said in logs, doctor and each package)."""
        mount = cgroup2_mount()
        if mount is None:
            return None, "no cgroup v2 hierarchy is mounted"
        own = own_cgroup()
        if own is None:
            return None, "this process is in no cgroup v2 (/proc/self/cgroup has no 0:: line)"
        base = mount / own.lstrip("/")
        if not os.access(base, os.W_OK):
            return None, (f"cgroup {base} is not writable by this user (run under the "
                          "shipped systemd unit, which sets Delegate=yes)")
        try:
            tree = cls._delegated(base) if _only_us(base) and own != "/" else cls._shared(base)
        except OSError as exc:
            return None, f"cannot make the agent's cgroups under {base}: {exc.strerror or exc}"
        if not (tree.parent / "cgroup.kill").exists():
            return None, "this kernel has no cgroup.kill (Linux 5.14 or later is needed)"
        return tree, f"{tree.parent} (controllers: {', '.join(sorted(tree.controllers)) or 'none'})"

    @classmethod
    def _delegated(cls, base: Path) -> CgroupTree:
        supervisor = base / "supervisor"
        supervisor.mkdir(exist_ok=True)
        (supervisor / "cgroup.procs").write_text(str(os.getpid()))
        _enable(base)
        jobs = base / "jobs"
        jobs.mkdir(exist_ok=True)
        controllers = _enable(jobs)
        tree = cls(jobs, controllers, delegated=True)
        tree.sweep(jobs)
        return tree

    @classmethod
    def _shared(cls, base: Path) -> CgroupTree:
        for stale in base.glob("miner-agent.*"):
            pid = stale.name.partition(".")[2]
            if pid.isdigit() and not pid_alive(int(pid)):
                cls(stale, frozenset(), delegated=False).sweep(stale, remove_self=True)
        mine = base / f"miner-agent.{os.getpid()}"
        mine.mkdir(exist_ok=True)
        controllers = _enable(mine)
        return cls(mine, controllers, delegated=False)

    def sweep(self, where: Path, remove_self: bool = False) -> None:
        """Kill and remove job cgroups a previous run of the agent left behind."""
        for child in [p for p in where.iterdir() if p.is_dir()]:
            leftover = JobCgroup(child)
            if leftover.populated():
                log.warning("killing processes left in %s by an earlier run", child)
                leftover.kill()
                _wait_empty_blocking(leftover)
            leftover.remove()
        if remove_self:
            JobCgroup(where).remove()

    def create(self, job_id: str, limits: Limits) -> JobCgroup:
        self._count += 1
        path = self.parent / f"{job_id[:96]}.{self._count}"
        if path.exists():
            JobCgroup(path).kill()
            _wait_empty_blocking(JobCgroup(path))
            path.rmdir()
        path.mkdir()
        cgroup = JobCgroup(path)
        self._apply(cgroup, limits)
        return cgroup

    def _apply(self, cgroup: JobCgroup, limits: Limits) -> None:
        wanted = {"memory.max": ("memory", limits.memory_bytes),
                  "pids.max": ("pids", limits.pids),
                  "cpu.weight": ("cpu", limits.cpu_weight)}
        for name, (controller, value) in wanted.items():
            if not value or controller not in self.controllers:
                continue
            try:
                (cgroup.path / name).write_text(str(value))
                cgroup.applied[name] = str(value)
            except OSError as exc:
                log.warning("cannot set %s=%s on %s: %s", name, value, cgroup.path, exc.strerror)

    def close(self) -> None:
        """Remove our subtree's empty leftovers (a shared-mode agent's own folder too)."""
        with contextlib.suppress(OSError):
            self.sweep(self.parent, remove_self=not self.delegated)


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or ``.../unified``)."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _only_us(base: Path) -> bool:
    """Is this process alone in ``base`` (a delegated systemd unit at start)?"""
    try:
        pids = (base / "cgroup.procs").read_text().split()
    except OSError:
        return False
    return pids == [str(os.getpid())]


def _enable(path: Path) -> frozenset[str]:
    """Hand the wanted controllers ``path`` has on to its children; returns those enabled."""
    try:
        available = set((path / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()
    enabled = set()
    for controller in WANTED_CONTROLLERS:
        if controller not in available:
            continue
        try:
            (path / "cgroup.subtree_control").write_text(f"+{controller}")
            enabled.add(controller)
        except OSError as exc:  # EBUSY: processes of our own live here (shared mode)
            if exc.errno not in (errno.EBUSY, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM):
                raise
    return frozenset(enabled)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process (one we may not signal counts as live)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_empty_blocking(cgroup: JobCgroup, timeout_s: float = KILL_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while cgroup.populated() and time.monotonic() < deadline:
        time.sleep(0.01)


def describe() -> str:
    """One line for ``doctor``: can this node give each job its own cgroup?"""
    mount = cgroup2_mount()
    if mount is None:
        return "no cgroup v2 hierarchy is mounted"
    own = own_cgroup() or "?"
    base = mount / own.lstrip("/")
    writable = os.access(base, os.W_OK)
    controllers = ""
    with contextlib.suppress(OSError):
        controllers = (base / "cgroup.controllers").read_text().strip()
    return (f"{base}: {'writable' if writable else 'not writable'}, controllers: "
            f"{controllers or 'none'}")
