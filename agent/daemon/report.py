"""The final report of a job: the `/result` or `/fail` body, built once from its package.

In the core protocol everything a client gets is the ``result`` object (under
10 MiB): the main text output (bounded), the package's sha256 manifest and result
hash, where the package is, the tail of both logs, and the metrics. ``metrics``
carries ``duration_ms``, ``units`` and ``unit_type`` ("gpu_seconds") for the
coordinator's signed receipt.

The body always fits the coordinator's limit, whatever the job left and however the
operator sized the text and tails (:func:`fit`): a report over 10 MiB is refused with 413
and was retried for ever, the job never reported. A job's names make the manifest long
(a path may be 64 folders of 255 bytes, and a character may take six bytes escaped),
so it stops at MAX_MANIFEST_BYTES of JSON as it stops at MAX_MANIFEST_ENTRIES.
"""

from __future__ import annotations

import copy
import json
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
MAX_MANIFEST_BYTES = 1 << 20  # of JSON
# Of JSON: the coordinator refuses a body over 10 MiB; the rest is room for what is
# added after the build (the upload's location and errors, the release's metrics).
MAX_REPORT_BYTES = 9 << 20
# What a report holds besides its text, tails and manifest, encoded, at most: metrics
# (64 KiB), the runtime's device summary (one event line, 64 KiB, escaped), the error
# message (4000 characters) and the fixed fields.
_REST_MAX_BYTES = 1 << 20
_ENTRY_BYTES = 120  # a manifest entry's JSON besides its path: size, sha256, keys
_ESCAPED = 6  # the most bytes a character takes in JSON ("\u00e9")
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
    manifest = listed(pkg.manifest, MAX_MANIFEST_BYTES)
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
        return fit(Report("result", body))
    metrics["package"] = package_block(report, location)
    metrics["logs"] = logs
    metrics["partial"] = report.partial
    body = {"error_code": report.error_code or "runtime_error",
            "error_message": (report.error_message or report.outcome.value)[:2000],
            "metrics": metrics}
    if lease_id:
        body["lease_id"] = lease_id
    return fit(Report("fail", body))


def listed(manifest: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """The manifest's first entries, at most MAX_MANIFEST_ENTRIES and ``max_bytes`` of JSON."""
    head = manifest[:MAX_MANIFEST_ENTRIES]
    if sum(len(m["path"]) for m in head) * _ESCAPED + _ENTRY_BYTES * len(head) <= max_bytes:
        return head  # short names, the usual case: nothing to measure
    total = 0
    for i, entry in enumerate(head):
        total += len(_dumps(entry)) + 1
        if total > max_bytes:
            return head[:i]
    return head


def fit(report: Report, limit: int = MAX_REPORT_BYTES) -> Report:
    """``report`` with a body of at most ``limit`` bytes of JSON, cut where it must be.

    Cut in this order, each only as far as needed: the manifest to MAX_MANIFEST_BYTES
    (a report journaled before that bound), the log tails, stdout's first (their ends
    kept; the package and the shipped logs hold them whole), the result text (its
    start kept; ``output_truncated``), then the rest of the manifest (its first entries
    kept; ``manifest_truncated``; the package holds it whole). Everything else is bounded
    well under the limit where it is made. A report that fits is returned as it is,
    most without being encoded.
    """
    holder = report.body.get("result" if report.kind == "result" else "metrics")
    if not isinstance(holder, dict) or _at_most(holder) <= limit:
        return report
    over = len(_dumps(report.body)) - limit
    if over <= 0:
        return report
    body = copy.deepcopy(report.body)
    holder = body["result" if report.kind == "result" else "metrics"]
    package = holder.get("package")
    manifest = package.get("manifest") if isinstance(package, dict) else None
    manifest = manifest if isinstance(manifest, list) else []
    over = _drop_entries(package, manifest, over, keep_bytes=MAX_MANIFEST_BYTES)
    logs = holder.get("logs")
    # stdout's first: a failed job's traceback is at stderr's end
    for name in sorted(logs, reverse=True) if isinstance(logs, dict) else ():
        if over > 0 and isinstance(logs[name], str):
            logs[name], over = _cut(logs[name], over, keep_end=True)
    if over > 0 and isinstance(holder.get("output"), str) and holder["output"]:
        holder["output"], over = _cut(holder["output"], over, keep_end=False)
        holder["output_truncated"] = True
    _drop_entries(package, manifest, over, keep_bytes=0)
    return Report(report.kind, body)


def _drop_entries(package: Any, manifest: list[Any], over: int, *, keep_bytes: int) -> int:
    """Drop the manifest's last entries while ``over`` > 0 and it holds more than
    ``keep_bytes`` of JSON; what is still over."""
    size = sum(len(_dumps(m)) + 1 for m in manifest) if over > 0 and manifest else 0
    while over > 0 and manifest and size > keep_bytes:
        dropped = len(_dumps(manifest.pop())) + 1
        size -= dropped
        over -= dropped
        package["manifest_truncated"] = True
    return over


def _at_most(holder: dict[str, Any]) -> int:
    """A bound on the encoded size of a report whose text, tails and manifest these are."""
    logs = holder.get("logs")
    texts = [holder.get("output"), *(logs.values() if isinstance(logs, dict) else ())]
    chars = sum(len(text) for text in texts if isinstance(text, str))
    package = holder.get("package")
    manifest = package.get("manifest") if isinstance(package, dict) else None
    entries = manifest if isinstance(manifest, list) else []
    # An entry is the agent's own {"path", "size", "sha256"}; anything else is measured.
    chars += sum(len(m["path"]) if isinstance(m, dict) and isinstance(m.get("path"), str)
                 else _REST_MAX_BYTES for m in entries)
    return chars * _ESCAPED + _ENTRY_BYTES * len(entries) + _REST_MAX_BYTES


def _cut(text: str, over: int, *, keep_end: bool) -> tuple[str, int]:
    """``text`` shortened until its JSON is ``over`` bytes shorter (or it is empty), and
    what is still over. Characters escape to 1 to 12 bytes, so the cut is measured."""
    size = len(_dumps(text))
    target = size - over
    while size > target and text:
        keep = min(len(text) - 1, int(len(text) * max(0, target) / size))
        text = text[len(text) - keep:] if keep_end else text[:keep]
        size = len(_dumps(text))
    return text, size - target


def _dumps(value: Any) -> str:
    """``value`` as the transport encodes it (ASCII, escaped; no spaces)."""
    return json.dumps(value, separators=(",", ":"))
