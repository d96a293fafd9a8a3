"""The one frozen config object, and where it is loaded from.

Order: defaults, then the TOML file (``/etc/miner-agent/agent.toml`` unless
``--config`` names another), then ``MINER_AGENT_<FIELD>`` environment variables,
then command-line flags. The API key comes from ``api_key`` (discouraged), the
file named by ``api_key_file``, or systemd's credential ``api-key``
(``$CREDENTIALS_DIRECTORY/api-key``); it is masked everywhere it is shown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from agent.errors import ConfigError
from agent.jobs import read_tags

DEFAULT_CONFIG = Path("/etc/miner-agent/agent.toml")
ENV_PREFIX = "MINER_AGENT_"
SECRET_FIELDS = ("api_key",)
LogFormat = Literal["auto", "text", "journal", "json"]
LauncherKind = Literal["auto", "forkserver", "spawn"]
LAUNCHER_KINDS: tuple[str, ...] = get_args(LauncherKind)
EventLoopKind = Literal["auto", "uvloop", "asyncio"]
SandboxMode = Literal["on", "off"]
# Built-in runtimes that run only our code over payload data. `command` (any program)
# and operator runtimes must be named in allowed_job_types to run.
DEFAULT_ALLOWED_JOB_TYPES = ("inference", "batch_inference", "training", "sleep")
MAX_POLL_WAIT_S = 300.0


def _systemd_or(variable: str, system: str, user: str) -> Path:
    """systemd's StateDirectory=/CacheDirectory= path, else the root or per-user default."""
    if os.environ.get(variable):
        return Path(os.environ[variable].split(":")[0])
    return Path(system) if os.geteuid() == 0 else Path.home() / user


def default_state_dir() -> Path:
    return _systemd_or("STATE_DIRECTORY", "/var/lib/miner-agent", ".local/state/miner-agent")


def _default_cache_dir() -> Path:
    return _systemd_or("CACHE_DIRECTORY", "/var/cache/miner-agent", ".cache/miner-agent")


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent reads from outside, typed, with units in the names."""

    coordinator_url: str | None = None  # None: serve the embedded reference coordinator
    miner_id: str = field(default_factory=socket.gethostname)
    api_key: str | None = None
    api_key_file: Path | None = None
    region: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    cache_dir: Path = field(default_factory=_default_cache_dir)
    heartbeat_interval_s: float = 5.0
    poll_interval_s: float = 1.0
    # An idle agent's back-off cap (a coordinator without long-poll; AITBC's miner polls
    # every 3 s); reset to poll_interval_s when a job comes or a slot frees.
    poll_max_interval_s: float = 3.0
    poll_jitter: float = 0.2
    # How long a coordinator that offers `longpoll` may hold an empty poll; 0: never ask.
    poll_wait_s: float = 20.0
    cancel_check_interval_s: float = 5.0
    progress_interval_s: float = 2.0
    log_ship_interval_s: float = 1.0
    max_log_chunk_bytes: int = 1 << 20
    drain_timeout_s: float = 120.0
    cancel_grace_s: float = 10.0
    jobs_per_gpu: int = 1
    cpu_slots: int = 1
    gpus: tuple[int, ...] | None = None  # None: every GPU NVML sees
    launcher: LauncherKind = "auto"
    # The daemon's event loop: uvloop (libuv) spends ~5-10 % less of the agent's CPU per
    # job than the stdlib loop (docs/performance.md); "auto" takes it where installed.
    event_loop: EventLoopKind = "auto"
    max_result_text_bytes: int = 256 * 1024
    log_tail_bytes: int = 8 * 1024
    cache_max_bytes: int = 50 << 30
    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    extensions: tuple[str, ...] | None = None  # None: whatever the coordinator offers
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_host: str = "127.0.0.1"
    log_format: LogFormat = "auto"
    log_level: str = "INFO"
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 8731
    keep_packages_days: float = 14.0  # reported packages older than this are removed
    # Reported packages past this total (MiB) are removed too, oldest first; 0: no cap.
    keep_packages_max_mb: int = 10240
    bench_file: Path | None = None  # `miner-agent bench --attach-capabilities` output
    models: Mapping[str, str] = field(default_factory=dict)
    # Where `miner-agent models pull` keeps models (read-only to jobs); None: <cache_dir>/models.
    model_store_dir: Path | None = None
    runtimes: Mapping[str, str] = field(default_factory=dict)
    # The job sandbox (docs/security.md). "on" refuses to start where it cannot be built.
    sandbox: SandboxMode = "on"
    sandbox_network: Mapping[str, bool] = field(default_factory=lambda: {"command": False})
    allowed_job_types: tuple[str, ...] = DEFAULT_ALLOWED_JOB_TYPES
    max_job_output_mb: int = 20480  # a job whose package grows past this fails
    max_job_work_mb: int = 102400  # a job whose work folder (scratch) grows past this fails
    max_job_files: int = 20000  # ... more entries (files, folders, links) fails
    max_job_work_files: int = 1000000  # ... more entries in its work folder fails
    max_job_log_mb: int = 4096  # each of a job's two logs keeps this much; the rest is dropped
    job_memory_max_mb: int = 0  # cgroup memory.max per job (0: the job's constraint or none)
    job_pids_max: int = 16384  # cgroup pids.max per job: a fork bomb stops here
    job_cpu_weight: int = 100  # cgroup cpu.weight per job (1-10000; 100 is an equal share)
    # MiB each of a sandboxed job's private /tmp and /dev/shm may hold (tmpfs, in RAM).
    # 0: a quarter of the node's memory shared among its slots, at most job_memory_max_mb,
    # at least 64.
    job_tmp_mb: int = 0
    # A GPU a finished job's contexts still hold after this long is given to no job until
    # it is free (the slot drains, with the reason in the heartbeat).
    gpu_release_timeout_s: float = 30.0
    # A coordinator answer longer than this (decoded) or nested deeper is not read: a
    # poll answer past either fails its job with invalid_job, or is skipped.
    max_answer_bytes: int = 16 * 1024 * 1024
    max_answer_depth: int = 64
    # Advertised as capabilities.price: jobs with constraints.max_price go only to miners
    # whose price is at or below it (None: no price, so no such job comes here).
    price: float | None = None
    # The [models] name an inference payload without `model` runs (AITBC's CLI omits it
    # when --model is not given); None: such a payload fails invalid_job.
    default_model: str | None = None
    # Built-in inference runs in a warm model worker per GPU that keeps models loaded
    # (docs/operations.md, "Warm model workers"); false: a process per job, as before.
    warm_models: bool = True
    # What a worker's loaded models may take (MiB) before the least recently used go;
    # 0: 80 % of its GPU's memory, or half the host's RAM for the CPU worker.
    model_memory_budget_mb: int = 0
    model_idle_s: float = 600.0  # a model unused this long is unloaded
    # Below this much free space on the state dir's filesystem, or under 1 % of its
    # inodes free, no job is taken (polling pauses, the heartbeat says why) until space
    # returns; 0: no check.
    min_free_disk_mb: int = 1024
    # Node labels, advertised as capabilities.tags: a job whose constraints.tags ask for
    # a label goes only to nodes where it has that value (env: name=value,name=value).
    tags: Mapping[str, str] = field(default_factory=dict)
    # Executables `pre-job` and `post-job` in this folder run around each job, as the
    # agent's user, outside the sandbox (docs/operations.md); None: no hooks.
    hooks_dir: Path | None = None
    hook_timeout_s: float = 60.0

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def model_store(self) -> Path:
        """The model store's folder (``model_store_dir``, else ``<cache_dir>/models``)."""
        return self.model_store_dir or self.cache_dir / "models"

    @property
    def embedded(self) -> bool:
        return not self.coordinator_url

    def resolved_api_key(self) -> str | None:
        """The API key from the credential, the key file or the config, in that order."""
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        candidates = [Path(cred_dir) / "api-key"] if cred_dir else []
        if self.api_key_file is not None:
            candidates.append(self.api_key_file)
        for path in candidates:
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigError(f"cannot read the API key from {path}: {exc.strerror}; "
                                  "check its owner and mode (0600, owned by the agent's user)"
                                  ) from None
        return self.api_key

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_HINTS = get_type_hints(AgentConfig)


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or environment value into the field's type, or raise ConfigError."""
    hint = _HINTS[name]
    optional = get_origin(hint) in (Union, types.UnionType)
    if value is None or (optional and isinstance(value, str) and value == ""):
        return None
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    try:
        return _convert(base, value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config field {name}: {exc}") from None


def _convert(base: Any, value: Any) -> Any:
    origin = get_origin(base)
    if origin is Literal:
        if value not in get_args(base):
            raise ValueError(f"must be one of {', '.join(map(str, get_args(base)))}")
        return value
    if base is str and isinstance(value, bool):  # a TOML true in a table of strings
        return "true" if value else "false"
    if base is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if base in (int, float):
        if isinstance(value, bool):
            raise ValueError("must be a number")
        return base(value)
    if base is Path:
        return Path(os.path.expanduser(str(value)))
    if origin is tuple:
        items = json.loads(value) if isinstance(value, str) and value.startswith("[") else (
            value.split(",") if isinstance(value, str) else value)
        inner = get_args(base)[0]
        return tuple(inner(x) for x in items if str(x).strip() != "")
    if origin in (Mapping, dict) or base is Mapping:
        data = _table(value)
        args = get_args(base)
        inner = args[1] if len(args) == 2 else str
        return {str(k): _convert(inner, v) for k, v in data.items()}
    return str(value)


def _table(value: Any) -> dict[Any, Any]:
    """A TOML table, a JSON object, or ``name=value,name=value`` (environment variables)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            pairs = [p.partition("=") for p in text.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError("must be a table, JSON object or name=value,name=value")
            value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        raise ValueError("must be a table of name = value")
    return value


def config_file(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The config file ``load_config`` reads (it may not exist)."""
    environ = os.environ if environ is None else environ
    return path or (Path(environ["MINER_AGENT_CONFIG"]) if "MINER_AGENT_CONFIG" in environ
                    else DEFAULT_CONFIG)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """Defaults, then the file, then the environment, then ``overrides`` (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    file_path = config_file(path, environ)
    if path is not None or file_path.exists():
        values.update(_read_toml(file_path))
        models = values.get("models")
        if isinstance(models, dict):  # relative folders are relative to the config file
            base = file_path.resolve().parent
            values["models"] = {name: str(base / os.path.expanduser(folder))
                                if isinstance(folder, str) else folder
                                for name, folder in models.items()}
    for name in _HINTS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = environ[key]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(_HINTS))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; "
                          "`miner-agent config show` lists the valid ones")
    cfg = AgentConfig(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(cfg)
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; create it with "
                          "`miner-agent install-service` or pass --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def _validate_limits(cfg: AgentConfig) -> None:
    """The limits a job and a coordinator answer are held to."""
    for name in ("max_job_output_mb", "max_job_work_mb", "max_job_files", "max_job_work_files",
                 "max_job_log_mb", "job_memory_max_mb", "job_pids_max", "min_free_disk_mb"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config field {name} must not be negative (0: no limit)")
    if cfg.job_tmp_mb < 0:
        raise ConfigError("config field job_tmp_mb must not be negative (0: a quarter of the "
                          "node's memory shared among its slots)")
    if not 1 <= cfg.job_cpu_weight <= 10000:
        raise ConfigError("job_cpu_weight must be between 1 and 10000 (100 is an equal share)")
    if cfg.model_memory_budget_mb < 0 or not 0 < cfg.model_idle_s < float("inf"):
        raise ConfigError("model_memory_budget_mb must not be negative (0: derived from the "
                          "device) and model_idle_s must be greater than 0")
    if cfg.max_answer_bytes < 4096 or not 2 <= cfg.max_answer_depth <= 512:
        raise ConfigError("max_answer_bytes must be at least 4096 and max_answer_depth "
                          "between 2 and 512")


def _validate(cfg: AgentConfig) -> None:
    positive = ("heartbeat_interval_s", "poll_interval_s", "poll_max_interval_s",
                "cancel_check_interval_s", "progress_interval_s", "log_ship_interval_s",
                "connect_timeout_s", "read_timeout_s", "retry_base_s", "retry_cap_s")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"config field {name} must be greater than 0")
    for name in ("drain_timeout_s", "cancel_grace_s", "keep_packages_days",
                 "keep_packages_max_mb"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config field {name} must not be negative")
    if not 0 <= cfg.poll_wait_s <= MAX_POLL_WAIT_S:  # NaN fails too
        raise ConfigError(f"config field poll_wait_s must be between 0 (no long-poll) and "
                          f"{MAX_POLL_WAIT_S:g} seconds")
    if cfg.jobs_per_gpu < 1 or cfg.cpu_slots < 0:
        raise ConfigError("jobs_per_gpu must be at least 1 and cpu_slots at least 0")
    if cfg.coordinator_url and not cfg.coordinator_url.startswith(("http://", "https://")):
        raise ConfigError("coordinator_url must start with http:// or https://")
    _validate_limits(cfg)
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("metrics_port must be 0 (off) or a TCP port")
    if cfg.price is not None and not 0 <= cfg.price < float("inf"):  # NaN fails too
        raise ConfigError("price must be a number >= 0 (or unset: no price advertised)")
    try:
        read_tags(dict(cfg.tags), "config field tags")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 < cfg.hook_timeout_s < float("inf"):
        raise ConfigError("config field hook_timeout_s must be greater than 0")
