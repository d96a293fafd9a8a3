"""What an earlier seal of a job folder wrote: recovery's reading of a package.

Only the zip is trusted (see :func:`read_sealed`); the folder is the job's own.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from agent.execution.package import PackageInfo, replace_at, sha256_file
from agent.execution.sealwalk import DIR_FLAGS
from agent.layout import CHECKSUMS, OUTPUT_JSON, checksum_of, zip_of

log = logging.getLogger(__name__)


def read_sealed(folder: Path) -> PackageInfo | None:
    """What an earlier seal of ``folder`` wrote, or None where it never finished.

    For recovery after a crash. Only the zip is trusted: every seal the daemon makes
    with room for it writes it first (``agent.execution.package._ZipDraft``), beside
    the folder, where no job reaches. The folder is the job's own: a job may have left
    an ``output.json`` of its making there (any status, metrics or job id) before the
    agent died, and a power cut may have left the seal's copy empty. So the folder's
    output.json and output.sha256 are put back from the zip, and without a readable zip
    the seal never finished (a folder sealed alone, for want of room for its zip, is
    sealed again as leftovers).
    """
    zip_path = zip_of(folder)
    output = _json_or_none(_restore_from_zip(folder, zip_path)) if zip_path.is_file() \
        else None
    if output is None:
        return None
    zip_sha = None
    if zip_path.is_file():
        words = (_read_or_none(checksum_of(zip_path)) or b"").split()
        zip_sha = words[0].decode() if words and len(words[0]) == 64 else None
        if zip_sha is None:
            zip_sha = sha256_file(zip_path)
            _replace_in(zip_path.parent, checksum_of(zip_path).name,
                        f"{zip_sha}  {zip_path.name}\n".encode())
    return PackageInfo(folder, zip_path if zip_sha else None, zip_sha,
                       output.get("files", []), output.get("result_hash", ""),
                       output.get("skipped", []), output)


def _restore_from_zip(folder: Path, zip_path: Path) -> bytes | None:
    """The zip's output.json, put back in the folder with its output.sha256."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            body = zf.read(f"{folder.name}/{OUTPUT_JSON}")
            sums = zf.read(f"{folder.name}/{CHECKSUMS}")
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    if _json_or_none(body) is not None:
        try:
            _replace_in(folder, CHECKSUMS, sums)
            _replace_in(folder, OUTPUT_JSON, body)
        except OSError as exc:  # the zip still says what the seal wrote
            log.warning("%s: cannot put output.json back from %s: %s", folder, zip_path.name,
                        exc)
    return body


def _replace_in(directory: Path, name: str, data: bytes) -> None:
    dir_fd = os.open(directory, DIR_FLAGS)
    try:
        replace_at(dir_fd, name, data)
    finally:
        os.close(dir_fd)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _json_or_none(data: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
