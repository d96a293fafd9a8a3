"""``miner-agent bench``: measure the node, compare with the spec sheet, save the figures.

The measuring happens in a child process (``python -m runtimes.nodebench``): this
side never imports torch. It reads the child's JSON progress lines to draw a
progress bar on stderr, then prints a table of each figure beside the device's
spec-sheet peak and the ratio, and can write the whole result as JSON and a small
summary that the agent attaches to its capabilities at register time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

BENCH_VERSION = 1
SUMMARY_NAME = "bench-summary.json"
DEFAULT_TIMEOUT_S = 300.0

# Spec-sheet peaks, dense (no sparsity), tensor cores with fp32 accumulation (what
# torch.mm uses). TFLOP/s for matmuls, GB/s for memory and for one direction of the
# host link (PCIe theoretical). None where the device has no such path (V100, T4: no
# TF32 or bf16 tensor cores).
_PEAKS: dict[str, dict[str, float | None]] = {
    "H100 SXM": dict(fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, mem=3350, link=63),
    "H100 PCIe": dict(fp32=51.2, tf32=378, bf16=756, fp16=756, mem=2000, link=63),
    "H200": dict(fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, mem=4800, link=63),
    "A100 40GB": dict(fp32=19.5, tf32=156, bf16=312, fp16=312, mem=1555, link=31.5),
    "A100 80GB": dict(fp32=19.5, tf32=156, bf16=312, fp16=312, mem=2039, link=31.5),
    "L40S": dict(fp32=91.6, tf32=183, bf16=362, fp16=362, mem=864, link=31.5),
    "L4": dict(fp32=30.3, tf32=60, bf16=121, fp16=121, mem=300, link=31.5),
    "A10": dict(fp32=31.2, tf32=62.5, bf16=125, fp16=125, mem=600, link=31.5),
    "RTX 4090": dict(fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, mem=1008, link=31.5),
    "RTX 3090": dict(fp32=35.6, tf32=35.6, bf16=71, fp16=71, mem=936, link=31.5),
    "V100": dict(fp32=15.7, tf32=None, bf16=None, fp16=125, mem=900, link=15.75),
    "T4": dict(fp32=8.1, tf32=None, bf16=None, fp16=65, mem=320, link=15.75),
}

# First match wins: the more specific names come before the ones they contain.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100", "H100 SXM"),
    (r"H200", "H200"),
    (r"A100.*80\s*GB", "A100 80GB"),
    (r"A100", "A100 40GB"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bA10\b(?!0)", "A10"),
    (r"RTX 4090", "RTX 4090"),
    (r"RTX 3090", "RTX 3090"),
    (r"V100", "V100"),
    (r"\bT4\b", "T4"),
]

# (result key, row label, value field, unit, peak key)
_ROWS = [
    ("matmul_fp32", "matmul fp32", "tflops", "TFLOP/s", "fp32"),
    ("matmul_tf32", "matmul tf32", "tflops", "TFLOP/s", "tf32"),
    ("matmul_bf16", "matmul bf16", "tflops", "TFLOP/s", "bf16"),
    ("matmul_fp16", "matmul fp16", "tflops", "TFLOP/s", "fp16"),
    ("mem_bw", "memory copy", "gbs", "GB/s", "mem"),
    ("h2d", "host->device", "gbs", "GB/s", "link"),
    ("d2h", "device->host", "gbs", "GB/s", "link"),
    ("train_mlp", "train (MLP)", "samples_s", "samples/s", ""),
    ("infer_mlp", "infer (MLP)", "samples_s", "samples/s", ""),
]


def known_gpu(name: str) -> str | None:
    """The spec-table key for a device name as NVML or torch spells it, or None."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, re.IGNORECASE):
            return key
    return None


def spec_peaks(name: str) -> dict[str, float | None]:
    """The spec-sheet peaks for ``name``; empty when the device is not in the table."""
    key = known_gpu(name)
    return dict(_PEAKS[key]) if key else {}


def annotate(result: dict[str, Any]) -> dict[str, Any]:
    """Add each device's spec model, peaks and measured/peak ratios to ``result``."""
    for dev in result.get("devices", []):
        peaks = spec_peaks(dev.get("name", "")) if dev.get("kind") == "cuda" else {}
        dev["spec"] = known_gpu(dev.get("name", "")) if peaks else "unknown"
        dev["ratios"] = {}
        for key, _label, field, _unit, peak_key in _ROWS:
            value = dev.get("results", {}).get(key, {}).get(field)
            peak = peaks.get(peak_key) if peak_key else None
            if value is not None and peak:
                dev["ratios"][key] = round(value / peak, 3)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The human table: one block per device, figure beside spec peak and ratio."""
    lines = []
    for dev in result.get("devices", []):
        lines.append(f"{dev['device']}: {dev.get('name', '?')} (spec: {dev.get('spec', '?')})")
        lines.append(f"  {'figure':<14} {'measured':>12} {'spec peak':>10} {'ratio':>6}  unit")
        peaks = spec_peaks(dev.get("name", "")) if dev.get("spec") != "unknown" else {}
        for key, label, field, unit, peak_key in _ROWS:
            lines.append("  " + _row(dev, key, label, field, unit, peaks.get(peak_key)))
    return "\n".join(lines)


def _row(dev: dict[str, Any], key: str, label: str, field: str, unit: str,
         peak: float | None) -> str:
    entry = dev.get("results", {}).get(key, {})
    if "skipped" in entry or "error" in entry:
        why = entry.get("skipped") or entry.get("error")
        return f"{label:<14} {'-':>12} {'':>10} {'':>6}  ({why})"
    value = entry.get(field)
    ratio = dev.get("ratios", {}).get(key)
    shown = _number(value) if value is not None else "-"
    return (f"{label:<14} {shown:>12} {peak if peak else '-':>10} "
            f"{f'{ratio:.0%}' if ratio is not None else '-':>6}  {unit}")


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def bench_summary_for_capabilities(result: dict[str, Any]) -> dict[str, Any]:
    """The few figures worth attaching to ``capabilities.bench`` at register time."""
    devices = []
    for dev in result.get("devices", []):
        res = dev.get("results", {})
        matmul = {k.split("_", 1)[1]: v["tflops"] for k, v in res.items()
                  if k.startswith("matmul_") and "tflops" in v}
        devices.append({
            "device": dev.get("device"),
            "name": dev.get("name"),
            "spec": dev.get("spec", "unknown"),
            "matmul_tflops": matmul,
            "mem_bw_gbs": res.get("mem_bw", {}).get("gbs"),
            "h2d_gbs": res.get("h2d", {}).get("gbs"),
            "train_samples_s": res.get("train_mlp", {}).get("samples_s"),
            "infer_samples_s": res.get("infer_mlp", {}).get("samples_s"),
        })
    return {"bench_version": result.get("version", BENCH_VERSION),
            "measured_at": result.get("started_at"), "quick": result.get("quick"),
            "torch": result.get("torch"), "devices": devices}


def default_summary_path(state_dir: str | Path | None = None) -> Path:
    """Where the summary lives: ``state_dir``, systemd's ``$STATE_DIRECTORY``, or /var/lib."""
    base = state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(base or "/var/lib/miner-agent") / SUMMARY_NAME


def load_bench_summary(path: str | Path) -> dict[str, Any] | None:
    """The saved summary for ``capabilities(bench=...)``; None if absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.debug("no bench summary at %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader (the agent at register) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False, encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(f.name, path)


class ProgressBar:
    """A one-line bar on a terminal, one line per step otherwise (journal, CI logs)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def update(self, done: int, total: int, task: str) -> None:
        if self.tty:
            width = 30
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                              f"{done}/{total} {task:<32.32}")
        else:
            self.stream.write(f"bench: {done}/{total} {task}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def child_command(quick: bool, device: str) -> list[str]:
    """The torch-side command line."""
    cmd = [sys.executable, "-m", "runtimes.nodebench", "--device", device]
    return cmd + ["--quick"] if quick else cmd


def _child_env() -> dict[str, str]:
    # The child must import runtimes/ from the same tree as this agent/, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{path}" if path else root)


def run_bench(quick: bool, device: str, progress: ProgressBar | None,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Run the torch-side benchmark in a child process; its annotated result.

    Raises RuntimeError with the tail of the child's stderr when it fails or times out.
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors, subprocess.Popen(
            child_command(quick, device), stdout=subprocess.PIPE, stderr=errors, text=True,
            env=_child_env(), start_new_session=True) as proc:
        timer = threading.Timer(timeout_s, _kill_group, args=(proc,))
        timer.start()
        try:
            result = _read_events(proc, progress)
            code = proc.wait()
        finally:
            timer.cancel()
            _kill_group(proc)
            if progress:
                progress.finish()
        if code != 0 or result is None:
            errors.seek(0)
            tail = errors.read()[-2000:].strip()
            why = "timed out" if code == -signal.SIGKILL else f"exited with {code}"
            raise RuntimeError(f"benchmark process {why}: {tail or 'no output'}")
    return annotate(result)


def _read_events(proc: subprocess.Popen[str], progress: ProgressBar | None
                 ) -> dict[str, Any] | None:
    assert proc.stdout is not None
    result = None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue  # anything torch or a library prints is not ours
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "progress" and progress:
            progress.update(event["done"], event["total"], event["task"])
        elif event.get("event") == "result":
            result = event["result"]
    return result


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
