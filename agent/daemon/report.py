"""The final report of a job: the `/result` or `/fail` body, built once from its package.

In the core protocol everything a client gets is the ``result`` object (under
10 MiB): the main text output (bounded), the package's sha256 manifest and result
hash, where the package is, the tail of both logs, and the metrics. ``metrics``
carries ``duration_ms``, ``units`` and ``unit_type`` ("gpu_seconds") for the
coordinator's signed receipt.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import Outcome
from agent.execution.capture import open_regular, tail_bytes
from agent.execution.executor import JobReport
from agent.layout import RESULT_TEXT, STREAMS, log_path

MAX_MANIFEST_ENTRIES = 2000
SMALL_READS_MAX_BYTES = 64 << 10
_THROUGHPUT_KEYS = ("tokens_per_s", "samples_per_s", "steps_per_s", "images_per_s")


@dataclass(frozen=True)
class Report:
    """One call to make: ``kind`` is "result" or "fail".

    Journals written before the cancel decision moved to :mod:`agent.daemon.cancels`
    may still hold kind "none" (nothing may be sent); it is read and dropped.
    """

    kind: str
    body: dict[str, Any]

    @property
    def outcome(self) -> Outcome:
        """The outcome as far as reporting cares: a result's status, else failed."""
        status = self.body.get("result", {}).get("status") if self.kind == "result" else None
        try:
            return Outcome(status or Outcome.FAILED)
        except ValueError:  # not a status this agent writes: never treat it as canceled
            return Outcome.FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "body": self.body}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Report:
        return cls(str(raw["kind"]), dict(raw["body"]))


def read_text(path: Path, limit: int) -> tuple[str, bool]:
    try:
        with open_regular(path) as fh:
            data = fh.read(limit + 1)
    except OSError:
        return "", False
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def small_reads(folder: Path | None, *, max_text_bytes: int, log_tail_bytes: int) -> bool:
    """Whether :func:`build_report` reads so little that the event loop may do it.

    Its reads are the result text and both log tails, each bounded; together they
    must stay under ``SMALL_READS_MAX_BYTES``. Only regular files count as small: a
    job may leave a FIFO or a link to a device in its package, whose read would wait.
    """
    if folder is None:
        return True
    total = 0
    reads = [(folder / RESULT_TEXT, max_text_bytes)]
    reads += [(log_path(folder, s), log_tail_bytes) for s in STREAMS]
    for path, limit in reads:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        total += min(info.st_size, limit)
    return total <= SMALL_READS_MAX_BYTES


def receipt_metrics(output: dict[str, Any], gpu_count: int) -> dict[str, Any]:
    """The metrics that feed the receipt, plus throughput figures the runtime measured."""
    runtime = output.get("metrics") or {}
    duration_ms = float(runtime.get("duration_ms") or 0.0)
    metrics: dict[str, Any] = {
        "duration_ms": round(duration_ms, 1),
        # A CPU-only job is billed as one device-second per second: say which it was.
        "units": round(duration_ms / 1000 * max(1, gpu_count), 3),
        "unit_type": "gpu_seconds",
        "gpus": gpu_count,
        "device": "cuda" if gpu_count else "cpu",
    }
    throughput = {k: runtime[k] for k in _THROUGHPUT_KEYS if k in runtime}
    if throughput:
        metrics["throughput"] = throughput
    return metrics


def package_block(report: JobReport, location: str | None) -> dict[str, Any]:
    pkg = report.package
    if pkg is None:
        return {"error": "the package could not be written"}
    manifest = pkg.manifest[:MAX_MANIFEST_ENTRIES]
    return {"result_hash": pkg.result_hash, "manifest": manifest,
            "manifest_truncated": len(pkg.manifest) > len(manifest),
            "zip_sha256": pkg.zip_sha256,
            "location": location or (pkg.zip_path.as_uri() if pkg.zip_path else
                                     pkg.folder.as_uri())}


def build_report(report: JobReport, *, gpu_count: int, location: str | None,
                 lease_id: str | None,
                 max_text_bytes: int, log_tail_bytes: int) -> Report:
    """Turn a finished run into the one call the coordinator should get.

    Whether it is sent at all is :func:`agent.daemon.cancels.disposition`'s to say.
    """
    output = report.output
    metrics = receipt_metrics(output, gpu_count)
    folder = report.folder
    text, truncated = read_text(folder / RESULT_TEXT, max_text_bytes) if folder else ("", False)
    logs = {f"{s}_tail": tail_bytes(log_path(folder, s), log_tail_bytes)
            for s in STREAMS} if folder else {}
    if report.outcome in (Outcome.COMPLETED, Outcome.CANCELED):
        result = {"status": report.outcome.value, "partial": report.partial, "output": text,
                  "output_truncated": truncated, "package": package_block(report, location),
                  "logs": logs, "metrics": output.get("metrics") or {},
                  "environment": output.get("environment"),
                  "started_at": output.get("started_at"),
                  "finished_at": output.get("finished_at")}
        body: dict[str, Any] = {"result": result, "metrics": metrics}
        if lease_id:
            body["lease_id"] = lease_id
        return Report("result", body)
    metrics["package"] = package_block(report, location)
    metrics["logs"] = logs
    metrics["partial"] = report.partial
    body = {"error_code": report.error_code or "runtime_error",
            "error_message": (report.error_message or report.outcome.value)[:2000],
            "metrics": metrics}
    if lease_id:
        body["lease_id"] = lease_id
    return Report("fail", body)
