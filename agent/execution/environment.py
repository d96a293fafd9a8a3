"""What a job's process may see of the agent's environment, and what the package records.

The job gets an allow-list of the agent's variables (locale, paths, CUDA and NCCL
tuning), never anything that looks like a secret, never PYTHONUNBUFFERED (it
halves a chatty job's printing speed), plus the ``MINER_*`` variables of the
runtime contract.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import agent

_ALLOWED = {"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME",
            "LD_LIBRARY_PATH", "PYTHONPATH", "CUDA_HOME", "CUDA_PATH", "CUDA_MODULE_LOADING",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HOME", "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SSL_CERT_FILE", "CUDA_DEVICE_ORDER",
            "CUDA_CACHE_PATH", "CUDA_CACHE_MAXSIZE"}
_ALLOWED_PREFIXES = ("LC_", "NCCL_", "TORCH_NCCL_", "NVIDIA_", "CUBLAS_", "PYTORCH_")
_SECRET = re.compile(r"(KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION)", re.I)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def scrubbed_environ(source: Mapping[str, str]) -> dict[str, str]:
    """The agent's variables a job may inherit."""
    out = {}
    for name, value in source.items():
        # The allow-list first: the secret pattern (the slow test) only sees what it lets in.
        if (name in _ALLOWED or name.startswith(_ALLOWED_PREFIXES)) \
                and not _SECRET.search(name):
            out[name] = value
    return out


def job_environ(source: Mapping[str, str], contract: Mapping[str, str],
                gpu_ids: list[str] | None, job_env: Any = None) -> dict[str, str]:
    """The full environment of one job's process."""
    env = scrubbed_environ(source)
    if isinstance(job_env, dict):
        for name, value in job_env.items():
            if isinstance(name, str) and _ENV_NAME.match(name) and isinstance(value, str) \
                    and not name.startswith("MINER_") and name != "CUDA_VISIBLE_DEVICES":
                env[name] = value
    env.update(contract)
    if gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        if any(i.strip().isdigit() for i in gpu_ids):
            # Indices are NVML's and nvidia-smi's (PCI bus order); CUDA's own default
            # is fastest first, another GPU on a node of mixed models. UUIDs need none.
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    elif "CUDA_VISIBLE_DEVICES" in source:
        env["CUDA_VISIBLE_DEVICES"] = source["CUDA_VISIBLE_DEVICES"]
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def _torch_build() -> tuple[str | None, str | None]:
    """torch's version and CUDA build, read without importing torch."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None, None
    cuda = None
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        vfile = Path(next(iter(spec.submodule_search_locations))) / "version.py"
        try:
            match = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", vfile.read_text(), re.M)
            cuda = match.group(1) if match else None
        except OSError:
            pass
    return version, cuda


_CACHE: dict[str, Any] = {}


def environment_info(gpu_names: list[str] | None = None) -> dict[str, Any]:
    """The ``environment`` block of output.json."""
    if "base" not in _CACHE:
        torch_version, cuda = _torch_build()
        _CACHE["base"] = {"agent": agent.__version__, "python": platform.python_version(),
                          "torch": torch_version, "cuda": cuda,
                          "platform": platform.platform(terse=True)}
    return {**_CACHE["base"], "gpus": list(gpu_names or [])}
