"""Prometheus metrics: the agent's named metrics on ``prometheus_client``, a loopback endpoint.

Every :class:`AgentMetrics` owns its own ``CollectorRegistry``, never the library's
process-global default one: tests build as many as they like, and nothing is exported
that this module does not name (no process or platform collectors).

``prometheus_client`` adds a ``*_created`` series to every counter and histogram; the
endpoint leaves them out (:class:`_WithoutCreated`) so that the exposition keeps the
names it always had, without flipping the library's process-wide switch.

``MetricsServer`` serves ``GET /metrics`` from a daemon thread on 127.0.0.1 by
default: the figures are not secret, but nothing on the network needs them
either; scrape through a node exporter's textfile or an SSH tunnel, or bind
elsewhere on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__

log = logging.getLogger(__name__)

# generate_latest writes the 0.0.4 text format; the library's CONTENT_TYPE_LATEST names 1.0.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024

GpuKey = tuple[str, str]  # (gpu index, uuid): the GPU gauges' label values


class _WithoutCreated(Collector):
    """A registry as the endpoint shows it: every family, less its ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            # collect() builds fresh families on each call, so trimming them is safe
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class _ReadCounter(Collector):
    """A counter whose value something else keeps, read at each scrape (no cost between)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, value=self._read())


def render(registry: CollectorRegistry) -> bytes:
    """``registry`` in the Prometheus text format, as ``/metrics`` serves it."""
    return generate_latest(_WithoutCreated(registry))


class AgentMetrics:
    """The agent's metrics, named once; the daemon calls the methods, never the registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        Gauge("miner_agent_info", "Agent version", ["version"], registry=r).labels(
            __version__).set(1)
        # prometheus_client keeps a counter's visible name: "x_total" is exposed as x_total
        self.jobs = Counter("miner_agent_jobs_total", "Jobs finished, by outcome", ["outcome"],
                            registry=r)
        self.jobs_running = Gauge("miner_agent_jobs_running", "Jobs running now", registry=r)
        self.job_duration = Histogram(
            "miner_agent_job_duration_seconds", "Job run time, start to outcome", ["outcome"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600), registry=r)
        self.cancel_latency = Histogram(
            "miner_agent_cancel_latency_seconds", "From cancel seen to the job's process gone",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.log_bytes = Counter("miner_agent_log_bytes_shipped_total",
                                 "Job log bytes shipped to the coordinator", registry=r)
        self.coordinator_latency = Histogram(
            "miner_agent_coordinator_request_duration_seconds",
            "Coordinator call latency, by endpoint", ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.coordinator_errors = Counter(
            "miner_agent_coordinator_errors_total", "Failed coordinator calls, by endpoint",
            ["endpoint"], registry=r)
        gpu = ["gpu", "uuid"]
        self.gpu_utilization = Gauge("miner_agent_gpu_utilization_percent", "GPU busy", gpu,
                                     registry=r)
        self.gpu_memory_used = Gauge("miner_agent_gpu_memory_used_bytes", "GPU memory used", gpu,
                                     registry=r)
        self.gpu_memory_total = Gauge("miner_agent_gpu_memory_total_bytes", "GPU memory", gpu,
                                      registry=r)
        self.gpu_temperature = Gauge("miner_agent_gpu_temperature_celsius", "GPU core temp", gpu,
                                     registry=r)
        self.gpu_power = Gauge("miner_agent_gpu_power_watts", "GPU board power draw", gpu,
                               registry=r)
        # (telemetry key, gauge, factor to the metric's base unit)
        self._gpu_figures = (
            ("util_gpu_pct", self.gpu_utilization, 1.0),
            ("mem_used_mb", self.gpu_memory_used, float(MIB)),
            ("mem_total_mb", self.gpu_memory_total, float(MIB)),
            ("temp_c", self.gpu_temperature, 1.0),
            ("power_w", self.gpu_power, 1.0),
        )
        self._gpus: set[GpuKey] = set()

    def count_journal_flushes(self, read: Callable[[], float]) -> None:
        """``miner_agent_journal_flushes_total``: the journal's ``fdatasync`` calls, as
        ``read`` tells them at each scrape."""
        self.registry.register(_ReadCounter(
            "miner_agent_journal_flushes", "Journal flushes to disk (fdatasync)", read))

    def job_finished(self, outcome: str, duration_s: float) -> None:
        """Count one job's outcome (an :class:`agent.errors.Outcome` value) and run time."""
        outcome = getattr(outcome, "value", outcome)
        self.jobs.labels(outcome).inc()
        self.job_duration.labels(outcome).observe(duration_s)

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
        self.coordinator_latency.labels(endpoint).observe(seconds)
        if not ok:
            self.coordinator_errors.labels(endpoint).inc()

    def update_gpus(self, sample: dict[str, Any]) -> None:
        """Set the GPU gauges from a :meth:`agent.node.telemetry.Telemetry.sample`; figures a GPU
        does not report (None) and GPUs no longer present drop out."""
        seen: set[GpuKey] = set()
        for gpu in sample.get("gpus", []):
            key = (str(gpu["index"]), str(gpu.get("uuid", "")))
            seen.add(key)
            for figure, gauge, factor in self._gpu_figures:
                value = gpu.get(figure)
                if value is None:
                    _remove(gauge, key)
                else:
                    gauge.labels(*key).set(value * factor)
        for gone in self._gpus - seen:
            for _figure, gauge, _factor in self._gpu_figures:
                _remove(gauge, gone)
        self._gpus = seen


def _remove(gauge: Gauge, key: GpuKey) -> None:
    # older prometheus_client releases raise KeyError for a series that is not there
    with contextlib.suppress(KeyError):
        gauge.remove(*key)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    disable_nagle_algorithm = True  # TCP_NODELAY: one small answer, no 40 ms delayed-ACK wait
    timeout = 10  # a client that stalls mid-request must not hold a thread forever
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, render(self.server.registry), CONTENT_TYPE)
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
    registry: CollectorRegistry


class MetricsServer:
    """Serves a ``CollectorRegistry`` at ``http://host:port/metrics`` from a daemon thread.

    Not ``prometheus_client.start_http_server``: its wsgiref server answers every path
    with the metrics and lacks this handler's per-request timeout and TCP_NODELAY.
    ``port=0`` picks a free port (tests); :attr:`port` says which.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1",
                 port: int = 0) -> None:
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
