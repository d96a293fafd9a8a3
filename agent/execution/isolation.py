"""How this node confines jobs, decided once at start: sandbox, cgroups, limits.

``build_isolation`` turns the config into the executor's parts and refuses
(:class:`SandboxUnavailable`, exit 13) when ``sandbox = "on"`` and the sandbox
cannot be built. The cgroup subtree is optional: without it the package says so
and the executor falls back to the process-group (and PID-namespace) kill.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import DEFAULT_CONFIG, AgentConfig
from agent.execution.cgroups import CgroupTree, Limits
from agent.execution.sandbox import SandboxPolicy, find_bwrap, job_tmp_bytes, probe

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_M_MMAP_THRESHOLD = -3  # mallopt(3)


@dataclass
class Isolation:
    """The parts the executor confines jobs with."""

    sandbox: SandboxPolicy | None
    cgroups: CgroupTree | None
    cgroup_note: str
    limits: Limits = field(default_factory=Limits)
    bwrap_version: str | None = None

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()


def secret_paths(state_dir: Path | None, config_file: Path | None,
                 key_file: Path | None) -> list[Path]:
    """What a job must never see: the agent's state, config, key and credentials."""
    paths = [p for p in (state_dir, config_file, key_file) if p is not None]
    paths.append(DEFAULT_CONFIG.parent)
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        paths.append(Path(os.environ["CREDENTIALS_DIRECTORY"]))
    return [p.absolute() for p in paths]


def build_isolation(*, sandbox_on: bool, jobs_root: Path, work_root: Path,
                    hidden: Iterable[Path], read_only: Iterable[Path] = (),
                    network: Mapping[str, bool] | None = None,
                    limits: Limits | None = None, probe_first: bool = True,
                    tmp_bytes: int | None = None) -> Isolation:
    """Probe and build; raises ``SandboxUnavailable`` when the sandbox is on but impossible.

    ``probe_first=False`` (``exec``): no probe here; the caller probes if its job fails.
    ``tmp_bytes``: each job's ``/tmp`` and ``/dev/shm`` (None: ``job_tmp_bytes(0)``).
    """
    jobs_root.mkdir(parents=True, exist_ok=True)
    work_root.mkdir(parents=True, exist_ok=True)
    sandbox = None
    version = None
    if sandbox_on:
        version = probe() if probe_first else None
        sandbox = SandboxPolicy(jobs_root=jobs_root.resolve(), work_root=work_root.resolve(),
                                hidden=tuple(p.resolve() for p in hidden),
                                read_only=tuple(p.resolve() for p in read_only),
                                network=dict(network or {}), bwrap=find_bwrap() or "bwrap",
                                tmp_bytes=tmp_bytes or job_tmp_bytes(0))
        log.info("job sandbox: %s; each job's /tmp and /dev/shm hold %d MiB", version,
                 sandbox.tmp_bytes >> 20)
    else:
        log.warning("job sandbox is OFF (sandbox = \"off\"): jobs run as this user and can "
                    "read what it can read; run only code you trust")
    cgroups, note = CgroupTree.discover()
    if cgroups is None:
        log.warning("jobs get no cgroup of their own (%s); ending a job kills its process "
                    "group%s", note, " and its PID namespace" if sandbox else "")
    else:
        log.info("job cgroups under %s", note)
    return Isolation(sandbox, cgroups, note, limits or Limits(), version)


def for_agent(cfg: AgentConfig, config_file: Path | None) -> Isolation:
    """The daemon's isolation, from its config."""
    read_only = [cfg.cache_dir, *(Path(p) for p in cfg.models.values())]
    if not cfg.model_store.is_relative_to(cfg.cache_dir):  # else the cache's bind covers it
        read_only.append(cfg.model_store)
    limits = Limits(memory_bytes=cfg.job_memory_max_mb << 20 or None,
                    pids=cfg.job_pids_max or None, cpu_weight=cfg.job_cpu_weight)
    return build_isolation(
        sandbox_on=cfg.sandbox == "on", jobs_root=cfg.jobs_dir, work_root=cfg.state_dir / "work",
        hidden=secret_paths(cfg.state_dir, config_file, cfg.api_key_file),
        read_only=read_only, network=cfg.sandbox_network, limits=limits,
        tmp_bytes=job_tmp_bytes(cfg.job_tmp_mb, cfg.job_memory_max_mb))


def share_tmp(isolation: Isolation, cfg: AgentConfig, slots: int) -> None:
    """Size each job's ``/tmp`` and ``/dev/shm`` for the ``slots`` jobs the node runs at
    once (:func:`job_tmp_bytes`), where the config leaves it to the agent (job_tmp_mb 0)."""
    policy = isolation.sandbox
    if policy is None or cfg.job_tmp_mb:
        return
    size = job_tmp_bytes(0, cfg.job_memory_max_mb, slots)
    if size != policy.tmp_bytes:
        isolation.sandbox = dataclasses.replace(policy, tmp_bytes=size)
        log.info("each job's /tmp and /dev/shm hold %d MiB: a quarter of the RAM shared by "
                 "%d slots (config job_tmp_mb sets it)", size >> 20, slots)


def set_non_dumpable() -> None:
    """No core dumps of the agent, and /proc/<agent>/{environ,mem,...} readable by root only."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


def bound_heap() -> None:
    """Blocks of 256 KiB and more (log chunks, package buffers) are mapped on their own
    and unmapped when freed. glibc otherwise raises that threshold to the largest block
    freed (up to 32 MiB), and bursts of such blocks then stay in the agent's heap and
    its threads' arenas (a few MiB each). Only this process: jobs start with exec."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):  # not glibc
        pass
