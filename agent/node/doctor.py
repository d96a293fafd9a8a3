"""``miner-agent doctor``: is this node ready to earn? One line per check, and what to do.

Each check returns a :class:`Check` (OK, WARN or FAIL, a detail, a fix for
anything not OK). The torch check runs in a child process (``python -c``): the
agent's own process never imports torch. The key check uses a read-only call
(the miner's running-jobs list), never a heartbeat, which would overwrite the
coordinator's in-flight count of a daemon that is running right now.

The config is any object with the attributes ``state_dir``, ``cache_dir``,
``coordinator_url``, ``api_key_file``, ``api_key`` and ``miner_id`` (and, read when
present, ``embedded_host``/``embedded_port``). With no ``coordinator_url`` the agent
serves the embedded coordinator itself: doctor then checks that one (its keys in the
state dir, its port) instead of a key file and a remote URL.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from agent.errors import ConfigError
from agent.node.disk import inode_shortage
from agent.node.telemetry import Telemetry

Status = Literal["OK", "WARN", "FAIL"]
GIB = 1024**3
EMBEDDED_KEYS = "embedded.json"
DISK_FAIL_GB = 1.0
DISK_WARN_GB = 10.0  # the cache holds model weights: a few GiB each
GPU_BUSY_FRACTION = 0.10  # memory held by someone else beyond this leaves jobs short
TORCH_CUDA_WHEEL = "pip install torch --index-url https://download.pytorch.org/whl/cu128"

_TORCH_PROBE = (
    "import json, torch\n"
    "ok = torch.cuda.is_available()\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda_build': torch.version.cuda,"
    " 'available': ok, 'count': torch.cuda.device_count() if ok else 0}))\n"
)


@dataclass(frozen=True)
class Check:
    """One check's verdict; ``fix`` says what to do when it is not OK."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def check_nvml(tel: Telemetry) -> Check:
    """The NVIDIA driver answers through NVML and lists GPUs."""
    gpus = tel.inventory()
    if tel.failure:
        return Check("nvidia driver", "FAIL", tel.failure,
                     "run nvidia-smi: fix the driver (or reboot after an upgrade) until it "
                     "lists every GPU; the agent does not start on a broken driver")
    if not gpus:
        return Check("nvidia driver", "WARN", f"no GPU: {tel.reason}",
                     "install the NVIDIA driver (nvidia-smi must list the GPUs); "
                     "without one this node takes CPU jobs only")
    names = ", ".join(sorted({g.name for g in gpus}))
    if tel.lost:
        return Check("nvidia driver", "WARN", f"{len(gpus)} GPU(s) answer ({names}); "
                     f"{len(tel.lost)} do not: " + "; ".join(
                         f"gpu {g['index']}: {g['error']}" for g in tel.lost),
                     "check the lost GPU with nvidia-smi -q; the agent runs without it")
    mig = [g.index for g in gpus if g.mig]
    if mig:
        return Check("nvidia driver", "WARN", f"{len(gpus)} GPU(s) ({names}); MIG mode on "
                     f"for gpu {', '.join(map(str, mig))}: the agent gives jobs whole GPUs "
                     "and leaves those out",
                     "nvidia-smi -i N -mig 0 (then reset the GPU or reboot) to use them")
    return Check("nvidia driver", "OK", f"{len(gpus)} GPU(s): {names}; driver "
                 f"{gpus[0].driver_version}, CUDA {gpus[0].cuda_driver_version}")


NVIDIA_NODES = ("nvidiactl", "nvidia-uvm")  # every CUDA process opens both


def check_device_nodes(gpu_count: int, dev: str = "/dev") -> Check:
    """The device nodes CUDA opens beside a GPU's own, present before anything here
    uses CUDA: the sandbox binds only nodes that exist when the agent starts it, and
    the unit's NoNewPrivileges= keeps a job's CUDA from running the setuid
    nvidia-modprobe that would create /dev/nvidia-uvm on first use."""
    if gpu_count == 0:
        return Check("nvidia devices", "OK", "no GPU: none needed")
    missing = []
    for name in NVIDIA_NODES:
        try:
            if not stat.S_ISCHR(os.stat(os.path.join(dev, name)).st_mode):
                missing.append(name)
        except OSError:
            missing.append(name)
    if missing:
        return Check("nvidia devices", "FAIL",
                     "missing: " + ", ".join(f"{dev}/{n}" for n in missing) + "; every "
                     "sandboxed job would fail with gpu_unavailable",
                     "as root: nvidia-modprobe -u -c=0 (loads nvidia-uvm, creates the nodes); "
                     "for every boot, add nvidia-uvm to /etc/modules-load.d/ with a udev "
                     "rule or unit that runs that command, then restart the agent")
    return Check("nvidia devices", "OK", ", ".join(f"{dev}/{n}" for n in NVIDIA_NODES))


def probe_torch(python: str = sys.executable, timeout_s: float = 120.0,
                wrap: Callable[[list[str]], list[str]] | None = None,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """What torch sees, asked in a child process (``wrap``: its command line inside
    something, the job sandbox); ``{"error": ...}`` when it cannot say."""
    argv = [python, "-c", _TORCH_PROBE]
    try:
        out = subprocess.run(wrap(argv) if wrap else argv, capture_output=True, text=True,
                             timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    try:
        data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"unexpected output: {out.stdout[-200:]!r}"}
    return data


def check_torch(probe: dict[str, Any], gpu_count: int) -> Check:
    """torch imports and sees the GPUs NVML sees."""
    if "error" in probe:
        return Check("torch", "FAIL", f"torch does not import: {probe['error']}",
                     f"install torch into the agent's Python: {TORCH_CUDA_WHEEL}")
    version = probe["torch"]
    if gpu_count == 0:
        return Check("torch", "OK", f"torch {version} (no GPU on this node)")
    if not probe["available"]:
        build = probe["cuda_build"] or "CPU-only build"
        return Check("torch", "FAIL", f"torch {version} ({build}) sees no CUDA device",
                     f"install a CUDA build of torch: {TORCH_CUDA_WHEEL}")
    if probe["count"] != gpu_count:
        return Check("torch", "WARN", f"torch sees {probe['count']} of {gpu_count} GPUs",
                     "check CUDA_VISIBLE_DEVICES and the unit's DeviceAllow= lines")
    return Check("torch", "OK", f"torch {version}, CUDA {probe['cuda_build']}, "
                 f"{probe['count']} device(s)")


def check_torch_in_sandbox(inside: dict[str, Any], outside: dict[str, Any],
                           gpu_count: int) -> Check:
    """A job's torch, in the sandbox, sees what the agent's sees outside it."""
    name = "torch in sandbox"
    if "error" in inside:
        return Check(name, "FAIL", f"torch does not start in the job sandbox: {inside['error']}",
                     "every torch job would fail: run `miner-agent exec examples/train-job.json`"
                     " for the whole error, and check what the sandbox hides (docs/security.md)")
    if gpu_count and outside.get("available") and inside["count"] != outside.get("count"):
        return Check(name, "FAIL", f"torch in the job sandbox sees {inside['count']} CUDA "
                     f"device(s), {outside.get('count')} outside it: GPU jobs would fail "
                     "with gpu_unavailable",
                     "check the 'nvidia devices' line above, and that the driver's libraries "
                     "(libcuda.so.1) are not under a path the sandbox hides")
    seen = f"{inside['count']} CUDA device(s)" if gpu_count else "no GPU on this node"
    return Check(name, "OK", f"torch {inside['torch']} starts in the job sandbox; {seen}")


def check_gpu_memory(sample: dict[str, Any]) -> list[Check]:
    """Memory other processes already hold on each GPU."""
    checks = []
    for gpu in sample.get("gpus", []):
        name = f"gpu {gpu['index']} memory"
        used, total = gpu.get("mem_used_mb"), gpu.get("mem_total_mb")
        if used is None or not total:
            checks.append(Check(name, "WARN", gpu.get("error", "memory figures unavailable"),
                                "run nvidia-smi; a GPU that fell off the bus needs a reboot"))
        elif used / total > GPU_BUSY_FRACTION:
            checks.append(Check(name, "WARN", f"{used} of {total} MiB already in use",
                                "find the process with nvidia-smi; jobs may run out of memory"))
        else:
            checks.append(Check(name, "OK", f"{total - used} of {total} MiB free"))
    return checks


def check_dir(label: str, path: str | os.PathLike[str] | None) -> Check:
    """``path`` exists, is writable and has room."""
    name = f"{label} dir"
    if not path:
        return Check(name, "FAIL", "not set", f"set {label}_dir in the config")
    p = Path(path)
    if not p.is_dir():
        return Check(name, "WARN", f"{p} does not exist yet",
                     f"systemd creates it at the first start, or: install -d -o miner-agent {p}")
    free_gb = shutil.disk_usage(p).free / GIB
    if not os.access(p, os.W_OK):
        return Check(name, "WARN", f"{p} is not writable by uid {os.getuid()} "
                     f"({free_gb:.1f} GiB free)", "fine if the service user owns it; "
                     f"else chown miner-agent {p}")
    if free_gb < DISK_FAIL_GB:
        return Check(name, "FAIL", f"{p}: only {free_gb:.2f} GiB free",
                     "free disk space (old results, unused models) or move the directory")
    short = inode_shortage(os.statvfs(p))
    if short:
        return Check(name, "FAIL", f"{p}: {short}", "remove files (old results, a job's "
                     "leftovers) or move the directory; the agent takes no job meanwhile")
    if free_gb < DISK_WARN_GB:
        return Check(name, "WARN", f"{p}: {free_gb:.1f} GiB free", "models need several GiB")
    return Check(name, "OK", f"{p}: {free_gb:.1f} GiB free")


def config_problems(cfg: Any) -> list[str]:
    """What is wrong with ``cfg``, one phrase each (empty when it looks usable)."""
    problems = []
    url = getattr(cfg, "coordinator_url", None) or ""
    parts = urlsplit(url)
    if url and (parts.scheme not in ("http", "https") or not parts.netloc):
        problems.append(f"coordinator_url {url!r} is not an http(s) URL")
    if not getattr(cfg, "miner_id", None):
        problems.append("miner_id is empty")
    for key in ("state_dir", "cache_dir"):
        value = getattr(cfg, key, None)
        if value and not Path(value).is_absolute():
            problems.append(f"{key} {value!r} is not an absolute path")
    for key in ("heartbeat_interval_s", "poll_interval_s", "drain_timeout_s", "cancel_grace_s"):
        value = getattr(cfg, key, None)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            problems.append(f"{key} must be a positive number, not {value!r}")
    return problems


def check_config(cfg: Any) -> Check:
    """The config names a coordinator, a miner and usable directories."""
    error = getattr(cfg, "load_error", None)
    if error:
        return Check("config", "FAIL", error, "fix the file; see docs/operations.md")
    problems = config_problems(cfg)
    if problems:
        return Check("config", "FAIL", "; ".join(problems), "fix the config file")
    if not cfg.coordinator_url:
        return Check("config", "OK", f"miner {cfg.miner_id} -> the embedded coordinator on "
                     f"{embedded_url(cfg)} (no coordinator_url set)")
    return Check("config", "OK", f"miner {cfg.miner_id} -> {cfg.coordinator_url}")


def _credential_path(cfg: Any) -> Path | None:
    if getattr(cfg, "api_key_file", None):
        return Path(cfg.api_key_file)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(creds) / "api-key" if creds else None


def read_api_key(cfg: Any) -> tuple[Check, str | None]:
    """The API key (never shown) and the verdict on where it came from."""
    if getattr(cfg, "api_key", None):
        return Check("credential", "WARN", "api_key is written in the config itself",
                     "move it to /etc/miner-agent/api-key (mode 0600), loaded by systemd "
                     "LoadCredential="), cfg.api_key
    path = _credential_path(cfg)
    if path is None:
        return Check("credential", "FAIL", "no api_key_file and no $CREDENTIALS_DIRECTORY",
                     "set api_key_file, or run under the unit (LoadCredential=api-key:...)"), None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        return Check("credential", "FAIL", f"{path}: {exc.strerror}",
                     "doctor reads the key as the service would: run it as root or as "
                     "miner-agent; check the path and mode"), None
    if not key:
        return Check("credential", "FAIL", f"{path} is empty", "write the miner key into it"), None
    if path.stat().st_mode & 0o077:
        return Check("credential", "WARN", f"{path} is readable by group or others",
                     f"chmod 0600 {path}"), key
    return Check("credential", "OK", f"key read from {path}"), key


def embedded_url(cfg: Any) -> str:
    """Where ``miner-agent run`` serves the embedded coordinator with this config."""
    host = getattr(cfg, "embedded_host", "127.0.0.1")
    port = getattr(cfg, "embedded_port", 8731)
    if not port:  # an ephemeral port: the running agent wrote the one it got
        url = _embedded_keys(cfg)[1].get("url")
        return str(url) if url else f"http://{host}:0"
    return f"http://{host}:{port}"


def _embedded_keys(cfg: Any) -> tuple[Path, dict[str, Any]]:
    # The agent keeps them in STATE_DIR/embedded.json (agent/reference/embedded.py; node
    # code does not import the reference coordinator, so the name is spelled here too).
    path = Path(getattr(cfg, "state_dir", "") or ".") / EMBEDDED_KEYS
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return path, {}
    return path, data if isinstance(data, dict) else {}


def read_embedded_key(cfg: Any) -> tuple[Check, str | None]:
    """The embedded coordinator's miner key: no key file to set, the agent makes one."""
    path = Path(getattr(cfg, "state_dir", "") or ".") / EMBEDDED_KEYS
    if not path.exists():
        return Check("credential", "OK", "embedded coordinator: no key to set; the first "
                     f"`miner-agent run` makes its keys in {path}"), None
    if not os.access(path, os.R_OK):
        return Check("credential", "WARN", f"{path} is not readable by uid {os.getuid()}",
                     "run doctor as the agent's user (or root) to check the key"), None
    key = _embedded_keys(cfg)[1].get("miner_key")
    if not isinstance(key, str) or not key:
        return Check("credential", "FAIL", f"{path} holds no miner_key",
                     "stop the agent, remove the file; the next start makes new keys"), None
    if path.stat().st_mode & 0o077:
        return Check("credential", "WARN", f"{path} is readable by group or others",
                     f"chmod 0600 {path}"), key
    return Check("credential", "OK", f"embedded coordinator's keys in {path}"), key


def check_embedded(client: httpx.Client, cfg: Any) -> tuple[Check, bool]:
    """The embedded coordinator answers where the agent serves it, or its port is free;
    and whether it is running now."""
    url = embedded_url(cfg)
    try:
        resp = client.get(f"{url}/health")
    except httpx.ConnectError:
        return Check("coordinator", "OK", f"embedded: `miner-agent run` serves it on {url} "
                     "(not running now)"), False
    except httpx.HTTPError as exc:
        return Check("coordinator", "WARN", f"{url}: {type(exc).__name__}: {exc}",
                     "something else holds that port: stop it or set embedded_port"), False
    if resp.status_code != 200:
        return Check("coordinator", "WARN", f"{url}/health answered {resp.status_code}: not "
                     "the embedded coordinator", "stop what holds the port, or set "
                     "embedded_port (or coordinator_url for a remote one)"), False
    return Check("coordinator", "OK", f"embedded coordinator on {url} answers (the agent "
                 "is running)"), True


def check_coordinator(client: httpx.Client, url: str) -> Check:
    """``GET /health`` answers."""
    t0 = time.monotonic()
    try:
        resp = client.get(url.rstrip("/") + "/health")
    except httpx.HTTPError as exc:
        return Check("coordinator", "FAIL", f"{url}: {type(exc).__name__}: {exc}",
                     f"check coordinator_url, DNS and firewall: curl {url.rstrip('/')}/health")
    ms = (time.monotonic() - t0) * 1000
    if resp.status_code != 200:
        return Check("coordinator", "FAIL", f"/health answered {resp.status_code}",
                     "the coordinator is up but unhealthy: ask its operator")
    return Check("coordinator", "OK", f"{url} healthy in {ms:.0f} ms")


def check_key(client: httpx.Client, url: str, miner_id: str, key: str) -> Check:
    """The coordinator accepts the key (a read-only call: the miner's running jobs)."""
    endpoint = f"{url.rstrip('/')}/v1/miners/{miner_id}/jobs"
    try:
        resp = client.post(endpoint, params={"job_status": "running", "limit": 1}, json={},
                           headers={"X-Api-Key": key, "X-Miner-ID": miner_id})
    except httpx.HTTPError as exc:
        return Check("api key", "FAIL", f"{type(exc).__name__}: {exc}", "see the line above")
    if resp.status_code == 401:
        return Check("api key", "FAIL", "the coordinator rejected the key (401)",
                     "check the key file; ask the coordinator operator for a miner key")
    if resp.status_code == 403:
        return Check("api key", "FAIL", "the key is valid but not a miner's (403)",
                     "use a key issued for a miner, not a client or admin key")
    if resp.status_code >= 400:
        return Check("api key", "WARN", f"the check call answered {resp.status_code}",
                     "the key was not rejected, but could not be confirmed")
    return Check("api key", "OK", "the coordinator accepts the key")


def gpu_checks(tel: Telemetry, python: str = sys.executable,
               sandbox_probe: Callable[[str], dict[str, Any] | None] | None = None,
               timeout_s: float = 120.0) -> list[Check]:
    """The driver, the device nodes, torch outside and (``sandbox_probe``) inside the job
    sandbox. The nodes come before the probes: a CUDA start could create
    /dev/nvidia-uvm itself and hide its absence."""
    gpus = len(tel.inventory())
    checks = [check_nvml(tel), check_device_nodes(gpus)]
    outside = probe_torch(python, timeout_s)
    checks.append(check_torch(outside, gpus))
    if sandbox_probe is not None and "error" not in outside:
        inside = sandbox_probe(python)
        if inside is not None:
            checks.append(check_torch_in_sandbox(inside, outside, gpus))
    return checks


def run_checks(cfg: Any, python: str = sys.executable, timeout_s: float = 5.0,
               telemetry: Telemetry | None = None,
               sandbox_probe: Callable[[str], dict[str, Any] | None] | None = None
               ) -> list[Check]:
    """Every check, in the order an operator fixes things. ``sandbox_probe(python)``:
    the torch probe run inside the job sandbox (None where there is none), from the
    layer that knows the sandbox (``agent.commands.node``)."""
    tel = telemetry or Telemetry()
    try:
        checks = gpu_checks(tel, python, sandbox_probe
                            if getattr(cfg, "sandbox", "on") == "on" else None)
        checks += check_gpu_memory(tel.sample())
    finally:
        if telemetry is None:
            tel.close()
    checks.append(check_config(cfg))
    checks += [check_dir("state", getattr(cfg, "state_dir", None)),
               check_dir("cache", getattr(cfg, "cache_dir", None))]
    url = getattr(cfg, "coordinator_url", None)
    cred, key = read_api_key(cfg) if url else read_embedded_key(cfg)
    checks.append(cred)
    if config_problems(cfg) or (not url and getattr(cfg, "load_error", None)):
        return checks
    with httpx.Client(timeout=timeout_s) as client:
        if url:
            checks.append(check_coordinator(client, url))
        else:
            verdict, running = check_embedded(client, cfg)
            checks.append(verdict)
            url = embedded_url(cfg) if running else None  # not running: no key to check
        if url and key and checks[-1].status == "OK":
            checks.append(check_key(client, url, cfg.miner_id, key))
    return checks


def format_checks(checks: list[Check]) -> str:
    """One line per check, and an indented "->" line with the fix for each that is not OK."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.status != "OK" and c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  -> {c.fix}")
    return "\n".join(lines)


def load_plain_config(path: str | os.PathLike[str]) -> SimpleNamespace:
    """Read the TOML config into a plain object; a ``load_error`` instead of raising."""
    defaults: dict[str, Any] = dict(state_dir="/var/lib/miner-agent",
                                    cache_dir="/var/cache/miner-agent", coordinator_url=None,
                                    api_key_file=None, api_key=None, miner_id=None)
    try:
        import tomllib  # Python 3.11+; doctor reads the file itself until agent/config.py lands
    except ImportError:
        return SimpleNamespace(**defaults, load_error="reading TOML here needs Python 3.11+")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return SimpleNamespace(**defaults, load_error=f"{path}: {exc}")
    return SimpleNamespace(**{**defaults, **data}, load_error=None)


def load_for_doctor(path: str | os.PathLike[str] | None,
                    state_dir: str | os.PathLike[str] | None = None) -> Any:
    """The agent's own loader (``path`` None: $MINER_AGENT_CONFIG, else the default file
    where it exists, as ``miner-agent run`` reads it); a failure becomes the config
    check's FAIL."""
    from agent.config import config_file, load_config

    overrides = {"state_dir": state_dir} if state_dir else None
    try:
        return load_config(Path(path) if path else None, overrides=overrides)
    except ConfigError as exc:
        plain = load_plain_config(config_file(Path(path) if path else None))
        plain.load_error = exc.message
        return plain
