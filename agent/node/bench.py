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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

BENCH_VERSION = 1
SUMMARY_NAME = "bench-summary.json"
DEFAULT_TIMEOUT_S = 300.0

# Spec-sheet peaks, dense (no sparsity), tensor cores with fp32 accumulation (what
# torch.mm uses). TFLOP/s for matmuls, GB/s for memory and for one direction of the
# host link (PCIe theoretical; NVLink-C2C on GH200). None where the device has no such
# path (V100, T4: no TF32 or bf16 tensor cores). The NVL and PCIe Hoppers run lower
# clocks and power than SXM; GH200 is the SXM-class H100 die beside a Grace CPU.
_PEAKS: dict[str, dict[str, float | None]] = {
    "H100 SXM": dict(fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, mem=3350, link=63),
    "H100 NVL": dict(fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, mem=3900, link=63),
    "H100 PCIe": dict(fp32=51.2, tf32=378, bf16=756, fp16=756, mem=2000, link=63),
    "H200 SXM": dict(fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, mem=4800, link=63),
    "H200 NVL": dict(fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, mem=4800, link=63),
    "GH200 96GB": dict(fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, mem=4000, link=450),
    "GH200 144GB": dict(fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, mem=4900, link=450),
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

# A ratio this far above the spec peak is not a fast GPU but a timing bug (events on
# another device, a copy that never ran); a healthy GPU measures about 0.6-0.9.
SUSPECT_RATIO = 1.05


@dataclass(frozen=True)
class _Model:
    key: str
    words: tuple[str, ...]  # whole words of the name, any case, all required
    min_memory_mb: int = 0  # and at least this much device memory, where names agree


# Every row that matches is a candidate and the most specific one wins (most words,
# then a memory condition; a tie goes to the earlier row), so "H200" never catches
# "H200 NVL"; whole words keep "H200" from matching "GH200". NVML and torch names:
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200",
# "NVIDIA H200 NVL", "NVIDIA GH200 480GB" or "NVIDIA GH200 120GB" (96 GB HBM3),
# "NVIDIA GH200 144G HBM3e".
_MODELS: list[_Model] = [
    _Model("H100 SXM", ("H100",)),
    _Model("H100 NVL", ("H100", "NVL")),
    _Model("H100 PCIe", ("H100", "PCIE")),
    _Model("H200 SXM", ("H200",)),
    _Model("H200 NVL", ("H200", "NVL")),
    _Model("GH200 96GB", ("GH200",)),  # the lower figure when nothing tells them apart
    _Model("GH200 144GB", ("GH200", "HBM3E")),
    _Model("GH200 144GB", ("GH200",), min_memory_mb=120 * 1024),
    _Model("A100 40GB", ("A100",)),
    _Model("A100 80GB", ("A100", "80GB")),
    _Model("L40S", ("L40S",)),
    _Model("L4", ("L4",)),
    _Model("A10", ("A10",)),
    _Model("RTX 4090", ("RTX", "4090")),
    _Model("RTX 3090", ("RTX", "3090")),
    _Model("V100", ("V100",)),
    _Model("T4", ("T4",)),
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


def known_gpu(name: str, memory_mb: int | None = None) -> str | None:
    """The spec-table key for a device name as NVML or torch spells it, or None.

    ``memory_mb`` (the device's total memory) tells apart parts that share a name,
    as GH200 with 96 GB HBM3 or 144 GB HBM3e may.
    """
    words = set(re.findall(r"[A-Z0-9]+", re.sub(r"(\d)\s+GB\b", r"\1GB", name.upper())))
    matches = [m for m in _MODELS if words.issuperset(m.words)
               and (memory_mb or 0) >= m.min_memory_mb]
    if not matches:
        return None
    return max(matches, key=lambda m: (len(m.words), m.min_memory_mb > 0)).key


def spec_peaks(name: str, memory_mb: int | None = None) -> dict[str, float | None]:
    """The spec-sheet peaks for ``name``; empty when the device is not in the table."""
    key = known_gpu(name, memory_mb)
    return dict(_PEAKS[key]) if key else {}


def _peaks_of(dev: dict[str, Any]) -> dict[str, float | None]:
    if dev.get("kind") != "cuda":
        return {}
    spec = dev.get("spec") or known_gpu(dev.get("name", ""), dev.get("memory_mb"))
    return dict(_PEAKS.get(spec or "", {}))


def annotate(result: dict[str, Any]) -> dict[str, Any]:
    """Add each device's spec model, peaks, measured/peak ratios and suspect figures.

    A figure above ``SUSPECT_RATIO`` of its peak is listed under ``suspect``: the
    benchmark mismeasured it, the GPU did not beat its spec sheet.
    """
    for dev in result.get("devices", []):
        key = known_gpu(dev.get("name", ""), dev.get("memory_mb"))
        dev["spec"] = key if key and dev.get("kind") == "cuda" else "unknown"
        peaks = _PEAKS.get(dev["spec"], {})
        dev["ratios"] = {}
        for name, _label, field, _unit, peak_key in _ROWS:
            value = dev.get("results", {}).get(name, {}).get(field)
            peak = peaks.get(peak_key) if peak_key else None
            if value is not None and peak:
                dev["ratios"][name] = round(value / peak, 3)
        dev["suspect"] = [k for k, r in dev["ratios"].items() if r > SUSPECT_RATIO]
    return result


def format_table(result: dict[str, Any]) -> str:
    """The human table: one block per device, figure beside spec peak and ratio."""
    lines = []
    for dev in result.get("devices", []):
        lines.append(f"{dev['device']}: {dev.get('name', '?')} (spec: {dev.get('spec', '?')})")
        lines.append(f"  {'figure':<14} {'measured':>12} {'spec peak':>10} {'ratio':>6}  unit")
        peaks = _peaks_of(dev)
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
    flag = ("  SUSPECT: above the spec peak, a measurement bug"
            if ratio is not None and ratio > SUSPECT_RATIO else "")
    return (f"{label:<14} {shown:>12} {peak if peak else '-':>10} "
            f"{f'{ratio:.0%}' if ratio is not None else '-':>6}  {unit}{flag}")


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
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{path}" if path else root)
    # `--device cuda:N` means nvidia-smi's GPU N (PCI bus order), not CUDA's fastest-first N
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


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
