"""The result package: manifest, checksums, zip, and verification.

Layout (the client guide, shared/seed-job-lifecycle.txt)::

    job_<ID>/
      output.json     job id, status, partial, times, progress, metrics, exit,
                      error, environment, and the manifest (path, size, sha256)
      output.sha256   `sha256sum -c output.sha256` passes from inside the folder
      result.txt      the main text result
      logs/stdout.log, logs/stderr.log
      artifacts/...
    job_<ID>.zip, job_<ID>.zip.sha256   beside the folder

Packaging never follows a symlink and never includes a path outside the folder:
symlinks, devices and names that ``sha256sum`` would need escaped are left out and
listed under ``skipped`` in output.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import PackageError
from agent.layout import CHECKSUMS, OUTPUT_JSON, checksum_of, zip_of

HASH_CHUNK = 1 << 20
_TEXT_SUFFIXES = {".log", ".txt", ".json", ".jsonl", ".csv", ".md", ".yaml", ".toml"}


@dataclass
class PackageInfo:
    """What was packaged, for whoever reports it."""

    folder: Path
    zip_path: Path | None
    zip_sha256: str | None
    manifest: list[dict[str, Any]]
    result_hash: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
            buf = bytearray(HASH_CHUNK)
            view = memoryview(buf)
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                digest.update(view[:n])
    finally:
        os.close(fd)
    return digest.hexdigest()


def sha256_many(paths: list[Path], workers: int | None = None) -> list[str]:
    """Hash files in parallel (hashlib releases the GIL on large buffers)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def _safe_name(rel: str) -> bool:
    return "\n" not in rel and "\\" not in rel and "\r" not in rel


def collect_files(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Regular files under ``folder`` (relative POSIX paths), never through a symlink."""
    files: list[str] = []
    skipped: list[dict[str, str]] = []
    root = folder.resolve()

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    skipped.append({"path": rel, "reason": "symlink"})
                elif stat.S_ISDIR(st.st_mode):
                    walk(Path(entry.path), rel + "/")
                elif not stat.S_ISREG(st.st_mode):
                    skipped.append({"path": rel, "reason": "not a regular file"})
                elif not _safe_name(rel):
                    skipped.append({"path": rel.encode("unicode_escape").decode(),
                                    "reason": "name needs escaping"})
                elif prefix == "" and entry.name in (OUTPUT_JSON, CHECKSUMS):
                    continue
                else:
                    files.append(rel)

    if not root.is_dir():
        raise PackageError(f"package folder {folder} does not exist")
    walk(root, "")
    return files, skipped


def build_manifest(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    files, skipped = collect_files(folder)
    paths = [folder / rel for rel in files]
    digests = sha256_many(paths)
    manifest = [{"path": rel, "size": p.stat().st_size, "sha256": d}
                for rel, p, d in zip(files, paths, digests, strict=True)]
    return manifest, skipped


def result_hash(manifest: list[dict[str, Any]]) -> str:
    """One hash over the manifest: the package's identity for receipts."""
    lines = "".join(f"{m['sha256']}  {m['path']}\n" for m in manifest)
    return hashlib.sha256(lines.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_package(folder: Path, output: dict[str, Any], make_zip: bool = True) -> PackageInfo:
    """Write output.json, output.sha256 and the zip for a job folder whose files are final."""
    manifest, skipped = build_manifest(folder)
    output = dict(output)
    output["files"] = manifest
    output["skipped"] = skipped
    output["result_hash"] = result_hash(manifest)
    body = (json.dumps(output, indent=2, sort_keys=False, default=str) + "\n").encode()
    _atomic_write(folder / OUTPUT_JSON, body)
    out_hash = hashlib.sha256(body).hexdigest()
    lines = [f"{out_hash}  {OUTPUT_JSON}\n"] + [f"{m['sha256']}  {m['path']}\n" for m in manifest]
    _atomic_write(folder / CHECKSUMS, "".join(lines).encode())
    info = PackageInfo(folder, None, None, manifest, output["result_hash"], skipped, output)
    if make_zip:
        info.zip_path, info.zip_sha256 = write_zip(folder, [m["path"] for m in manifest])
    return info


def write_zip(folder: Path, files: list[str]) -> tuple[Path, str]:
    """Zip the package (folder name as the top entry) and write its .sha256 beside it."""
    zip_path = zip_of(folder)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for rel in [OUTPUT_JSON, CHECKSUMS, *files]:
            method = zipfile.ZIP_DEFLATED if Path(rel).suffix in _TEXT_SUFFIXES \
                else zipfile.ZIP_STORED
            src = folder / rel
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                info = zipfile.ZipInfo.from_file(src, f"{folder.name}/{rel}")
                info.compress_type = method
                # Level 1: logs compress ~5x at once; level 6 costs 3x the time for ~10% more.
                info._compresslevel = 1  # type: ignore[attr-defined]  # public from 3.13
                with zf.open(info, "w") as dst:
                    while chunk := fh.read(HASH_CHUNK):
                        dst.write(chunk)
    os.replace(tmp, zip_path)
    digest = sha256_file(zip_path)
    _atomic_write(checksum_of(zip_path),
                  f"{digest}  {zip_path.name}\n".encode())
    return zip_path, digest
