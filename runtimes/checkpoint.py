"""Training checkpoints: written atomically, found and restored from a folder or archive.

Layout of ``checkpoints/step-XXXXXX/``: ``model.safetensors``, ``optimizer.safetensors``
(the optimizer state's tensors, flattened to ``state/<param>/<name>``),
``optimizer.json`` (its param groups and non-tensor state) and ``meta.json`` (step,
epoch, RNG states, grad-scaler state, the payload, the loss history). A checkpoint
is written into a hidden temp folder and renamed into place, then
``checkpoints/latest`` (one line: the folder name) is replaced, so a reader never
sees half a checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from runtimes.train_spec import fail

LATEST = "latest"
_PREFIX = "step-"


def step_name(step: int) -> str:
    """The folder name of the checkpoint at ``step``."""
    return f"{_PREFIX}{step:06d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                    keep: int = 0) -> Path:
    """Write the checkpoint for ``step`` under ``root`` and point ``latest`` at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    if not final.exists():
        tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        tensors, info = flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", info)
        _write_json(tmp / "meta.json", {**meta, "step": step, "rng": rng_state()})
        for child in tmp.iterdir():
            _fsync(child)
        os.rename(tmp, final)
        _fsync(root)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoint folders under ``root``, oldest step first."""
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def load_checkpoint(folder: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` from ``folder``; returns its meta (RNG restored)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"model mismatch: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        info = json.loads((folder / "optimizer.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten_optimizer(tensors, info))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise fail(f"cannot resume from {folder.name}: {type(exc).__name__}: {exc}") from None
    restore_rng(meta.get("rng") or {})
    return meta  # type: ignore[no-any-return]


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors and a JSON-ready remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pid}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": info["param_groups"]}


def rng_state() -> dict[str, Any]:
    """Python and torch (CPU, CUDA) RNG states, JSON-ready."""
    state: dict[str, Any] = {"python": _b64(json.dumps(random.getstate()).encode()),
                             "torch": _b64(torch.get_rng_state().numpy().tobytes())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved (missing parts are left alone)."""
    if "python" in state:
        version, inner, gauss = json.loads(base64.b64decode(state["python"]))
        random.setstate((version, tuple(inner), gauss))
    if "torch" in state:
        torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_tensor(s) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_resume(resume: dict[str, Any], work_dir: Path) -> Path:
    """The checkpoint folder named by ``payload.resume_from`` (fetched, unpacked, found)."""
    from runtimes.fetch import cache_dir_from_env, fetch, max_bytes_from_env

    uri = str(resume["uri"])
    local = Path(uri.removeprefix("file://")).expanduser()
    if "://" in uri and not uri.startswith("file://"):
        local = Path("/nonexistent")
    if local.is_dir():
        return find_checkpoint(local)
    blob = fetch(uri, resume.get("sha256"), cache_dir_from_env(), max_bytes_from_env())
    dest = work_dir / "resume"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    extract_archive(blob, dest)
    return find_checkpoint(dest)


def extract_archive(blob: Path, dest: Path) -> None:
    """Unpack a zip or tar archive into ``dest``, refusing paths that leave it."""
    root = dest.resolve()
    if zipfile.is_zipfile(blob):
        with zipfile.ZipFile(blob) as zf:
            for name in zf.namelist():
                if root not in (root / name).resolve().parents:
                    raise fail(f"checkpoint archive entry {name!r} leaves its folder")
            zf.extractall(root)
    elif tarfile.is_tarfile(blob):
        with tarfile.open(blob) as tf:
            tf.extractall(root, filter="data")
    else:
        raise fail(f"resume_from {blob.name!r} is not a folder, zip or tar archive")


def find_checkpoint(folder: Path, depth: int = 0) -> Path:
    """The checkpoint inside ``folder``: itself, its ``latest``, or its newest step."""
    if (folder / "meta.json").is_file():
        return folder
    if (folder / LATEST).is_file():
        target = folder / (folder / LATEST).read_text().strip()
        if target.parent == folder and (target / "meta.json").is_file():
            return target
    found = list_checkpoints(folder)
    if found:
        return found[-1]
    subdirs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    if depth < 2 and len(subdirs) == 1:
        return find_checkpoint(subdirs[0], depth + 1)
    raise fail(f"no checkpoint (meta.json) found in resume_from {folder.name!r}")
