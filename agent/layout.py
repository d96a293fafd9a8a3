"""Names every layer spells the same way: a job's result package on disk and its streams.

A package is a folder ``job_<id>/`` beside ``job_<id>.zip`` and ``job_<id>.zip.sha256``
(a ``sha256sum -c`` line for the zip). Inside the folder: ``output.json`` (status,
metrics, manifest), ``output.sha256`` (every file, for ``sha256sum -c``),
``logs/stdout.log``, ``logs/stderr.log``, ``result.txt`` and ``artifacts/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr")

OUTPUT_JSON = "output.json"
CHECKSUMS = "output.sha256"
RESULT_TEXT = "result.txt"
LOGS_DIR = "logs"
ARTIFACTS_DIR = "artifacts"
FOLDER_PREFIX = "job_"
ZIP_SUFFIX = ".zip"
CHECKSUM_SUFFIX = ".sha256"


def job_folder(root: Path, job_id: str) -> Path:
    """The package folder of ``job_id`` under ``root``."""
    return root / f"{FOLDER_PREFIX}{job_id}"


def zip_of(folder: Path) -> Path:
    """The zip written beside a package folder."""
    return folder.with_name(folder.name + ZIP_SUFFIX)


def checksum_of(path: Path) -> Path:
    """The ``.sha256`` sidecar of a zip (one ``sha256sum`` line)."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def package_paths(folder: Path) -> tuple[Path, Path, Path]:
    """Everything a package is on disk: the folder, its zip and the zip's sidecar."""
    zip_path = zip_of(folder)
    return folder, zip_path, checksum_of(zip_path)


def log_path(folder: Path, stream: str) -> Path:
    """Where a package keeps one stream's log."""
    return folder / LOGS_DIR / f"{stream}.log"


def job_id_of(folder: Path) -> str:
    """The job id a package folder is named after."""
    return folder.name.removeprefix(FOLDER_PREFIX)
