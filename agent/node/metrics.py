"""Prometheus metrics: a small registry, the agent's named metrics, a loopback endpoint.

The text exposition format (version 0.0.4) is a few lines per series, so the
agent writes it itself rather than pull in ``prometheus_client`` and its
process-global default registry: tests build as many registries as they like,
and nothing is exported that this module does not name.

``MetricsServer`` serves ``GET /metrics`` from a daemon thread on 127.0.0.1 by
default: the figures are not secret, but nothing on the network needs them
either; scrape through a node exporter's textfile or an SSH tunnel, or bind
elsewhere on purpose.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent import __version__

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
MIB = 1024 * 1024

LabelKey = tuple[str, ...]


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class Metric:
    """One metric family: a name, help text, label names and a value per label set."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        for n in (name, *labelnames):
            if not _NAME.match(n):
                raise ValueError(f"invalid metric or label name: {n!r}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._values: dict[LabelKey, Any] = {}

    def _key(self, labels: dict[str, Any]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def remove(self, **labels: Any) -> None:
        """Drop one series (a GPU that is gone, a figure no longer reported)."""
        with self._lock:
            self._values.pop(self._key(labels), None)

    def series(self) -> list[LabelKey]:
        """The label values of every series present."""
        with self._lock:
            return list(self._values)

    def render(self) -> list[str]:
        """The family's exposition lines, HELP and TYPE first."""
        lines = [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            lines.extend(self._lines(key, value))
        return lines

    def _lines(self, key: LabelKey, value: Any) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, key)} {_fmt(value)}"]


class Counter(Metric):
    """A value that only goes up (name it ``*_total``)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add ``amount`` (never negative) to the series named by ``labels``."""
        if amount < 0:
            raise ValueError("a counter cannot go down")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        """The current value (0 for a series never incremented)."""
        with self._lock:
            return float(self._values.get(self._key(labels), 0.0))


class Gauge(Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        """Set the series named by ``labels`` to ``value``."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, **labels: Any) -> float | None:
        """The current value, or None when the series is absent."""
        with self._lock:
            return self._values.get(self._key(labels))


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = (0.01, 0.1, 1, 10)) -> None:
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))

    def observe(self, value: float, **labels: Any) -> None:
        """Count ``value`` into the series named by ``labels``."""
        key = self._key(labels)
        with self._lock:
            # [per-bucket counts (not yet cumulative), sum, count]; count is the +Inf bucket
            entry = self._values.setdefault(key, [[0] * len(self.buckets), 0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    entry[0][i] += 1
                    break
            entry[1] += value
            entry[2] += 1

    def _lines(self, key: LabelKey, value: Any) -> list[str]:
        counts, total, count = value
        lines, cumulative = [], 0
        for bound, n in zip(self.buckets, counts, strict=True):
            cumulative += n
            le = f'le="{bound!r}"'
            lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {cumulative}")
        inf = _labels(self.labelnames, key, 'le="+Inf"')
        lines.append(f"{self.name}_bucket{inf} {count}")
        lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(total)}")
        lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {count}")
        return lines


class Registry:
    """The metric families one endpoint exposes, in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: Metric) -> Metric:
        """Add ``metric``; a second family with the same name is a programming error."""
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} registered twice")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        """Create and register a :class:`Counter`."""
        metric = Counter(name, help_text, labelnames)
        self.register(metric)
        return metric

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Create and register a :class:`Gauge`."""
        metric = Gauge(name, help_text, labelnames)
        self.register(metric)
        return metric

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                  buckets: Iterable[float] = (0.01, 0.1, 1, 10)) -> Histogram:
        """Create and register a :class:`Histogram`."""
        metric = Histogram(name, help_text, labelnames, buckets)
        self.register(metric)
        return metric

    def render(self) -> str:
        """The whole registry in the Prometheus text format."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(line + "\n" for m in metrics for line in m.render())


# (telemetry key, gauge attribute, factor to the metric's base unit)
_GPU_FIGURES = (
    ("util_gpu_pct", "gpu_utilization", 1.0),
    ("mem_used_mb", "gpu_memory_used", float(MIB)),
    ("mem_total_mb", "gpu_memory_total", float(MIB)),
    ("temp_c", "gpu_temperature", 1.0),
    ("power_w", "gpu_power", 1.0),
)


class AgentMetrics:
    """The agent's metrics, named once; the daemon calls the methods, never the registry."""

    def __init__(self, registry: Registry | None = None) -> None:
        r = self.registry = registry or Registry()
        r.gauge("miner_agent_info", "Agent version", ["version"]).set(1, version=__version__)
        self.jobs = r.counter("miner_agent_jobs_total", "Jobs finished, by outcome", ["outcome"])
        self.jobs_running = r.gauge("miner_agent_jobs_running", "Jobs running now")
        self.job_duration = r.histogram(
            "miner_agent_job_duration_seconds", "Job run time, start to outcome", ["outcome"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600))
        self.cancel_latency = r.histogram(
            "miner_agent_cancel_latency_seconds", "From cancel seen to the job's process gone",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.log_bytes = r.counter("miner_agent_log_bytes_shipped_total",
                                   "Job log bytes shipped to the coordinator")
        self.coordinator_latency = r.histogram(
            "miner_agent_coordinator_request_duration_seconds",
            "Coordinator call latency, by endpoint", ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.coordinator_errors = r.counter(
            "miner_agent_coordinator_errors_total", "Failed coordinator calls, by endpoint",
            ["endpoint"])
        gpu = ["gpu", "uuid"]
        self.gpu_utilization = r.gauge("miner_agent_gpu_utilization_percent", "GPU busy", gpu)
        self.gpu_memory_used = r.gauge("miner_agent_gpu_memory_used_bytes", "GPU memory used", gpu)
        self.gpu_memory_total = r.gauge("miner_agent_gpu_memory_total_bytes", "GPU memory", gpu)
        self.gpu_temperature = r.gauge("miner_agent_gpu_temperature_celsius", "GPU core temp", gpu)
        self.gpu_power = r.gauge("miner_agent_gpu_power_watts", "GPU board power draw", gpu)

    def job_finished(self, outcome: str, duration_s: float) -> None:
        """Count one job's outcome (an :class:`agent.errors.Outcome` value) and run time."""
        outcome = getattr(outcome, "value", outcome)
        self.jobs.inc(outcome=outcome)
        self.job_duration.observe(duration_s, outcome=outcome)

    def set_running(self, n: int) -> None:
        """The number of jobs running now."""
        self.jobs_running.set(n)

    def cancel_latency_s(self, seconds: float) -> None:
        """One cancel: from the agent seeing it to the job's process group gone."""
        self.cancel_latency.observe(seconds)

    def log_bytes_shipped(self, n: int) -> None:
        """``n`` log bytes accepted by the coordinator."""
        self.log_bytes.inc(n)

    def coordinator_call(self, endpoint: str, seconds: float, ok: bool) -> None:
        """One coordinator call; ``endpoint`` is a template ("heartbeat", "result"), never a URL
        with a job id in it, so that the series stay few."""
        self.coordinator_latency.observe(seconds, endpoint=endpoint)
        if not ok:
            self.coordinator_errors.inc(endpoint=endpoint)

    def update_gpus(self, sample: dict[str, Any]) -> None:
        """Set the GPU gauges from a :meth:`agent.node.telemetry.Telemetry.sample`; figures a GPU
        does not report (None) and GPUs no longer present drop out."""
        seen: set[LabelKey] = set()
        for gpu in sample.get("gpus", []):
            labels = {"gpu": str(gpu["index"]), "uuid": str(gpu.get("uuid", ""))}
            seen.add((labels["gpu"], labels["uuid"]))
            for key, attr, factor in _GPU_FIGURES:
                gauge: Gauge = getattr(self, attr)
                value = gpu.get(key)
                if value is None:
                    gauge.remove(**labels)
                else:
                    gauge.set(value * factor, **labels)
        for _key, attr, _factor in _GPU_FIGURES:
            gauge = getattr(self, attr)
            for gone in set(gauge.series()) - seen:
                gauge.remove(gpu=gone[0], uuid=gone[1])


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    disable_nagle_algorithm = True  # TCP_NODELAY: one small answer, no 40 ms delayed-ACK wait
    timeout = 10  # a client that stalls mid-request must not hold a thread forever
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.registry.render().encode(), CONTENT_TYPE)
        elif path == "/":
            self._send(200, b"miner-agent metrics: /metrics\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s " + format, self.address_string(), *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    registry: Registry


class MetricsServer:
    """Serves a :class:`Registry` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (tests); :attr:`port` says which.
    """

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _HTTPServer((host, port), _Handler)
        self._server.registry = registry
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Start serving; returns self."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
