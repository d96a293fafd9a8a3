"""The metrics registry and endpoint, scraped over real loopback HTTP."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.errors import Outcome
from agent.node.metrics import AgentMetrics, MetricsServer, render


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def _value(text: str, name: str, **labels: str) -> float:
    # Parsed, not matched as text: label order inside {} carries no meaning
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"{name}{labels} not in exposition:\n{text}")


def _series(m: AgentMetrics, name: str) -> list[tuple[str, ...]]:
    return [tuple(s.labels.values()) for fam in m.registry.collect() for s in fam.samples
            if s.name == name]


def test_agent_metrics_scraped_over_http() -> None:
    # Given an agent that ran jobs, shipped logs, called its coordinator and sampled GPUs
    m = AgentMetrics()
    m.job_finished(Outcome.COMPLETED, 12.0)
    m.job_finished("completed", 0.5)
    m.job_finished(Outcome.CANCELED, 40.0)
    m.cancel_latency_s(0.3)
    m.log_bytes_shipped(1000)
    m.log_bytes_shipped(24)
    m.coordinator_call("heartbeat", 0.02, ok=True)
    m.coordinator_call("heartbeat", 3.0, ok=False)
    m.set_running(2)
    flushes = [7]
    m.count_journal_flushes(lambda: flushes[0])
    m.update_gpus({"gpus": [{"index": 0, "uuid": "GPU-a", "util_gpu_pct": 97, "mem_used_mb": 2,
                             "mem_total_mb": 80, "temp_c": 61, "power_w": 612.3}]})
    # When Prometheus scrapes the endpoint
    with MetricsServer(m.registry, port=0) as server:
        status, ctype, text = _scrape(server.port)
        assert _scrape(server.port, "/nope")[0] == 404
    # Then every figure is there in the text format
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert _value(text, "miner_agent_jobs_total", outcome="completed") == 2
    assert _value(text, "miner_agent_jobs_total", outcome="canceled") == 1
    bucket = "miner_agent_job_duration_seconds_bucket"
    assert _value(text, bucket, outcome="completed", le="1.0") == 1
    assert _value(text, bucket, outcome="completed", le="15.0") == 2
    assert _value(text, "miner_agent_job_duration_seconds_count", outcome="completed") == 2
    assert _value(text, "miner_agent_job_duration_seconds_sum", outcome="completed") == 12.5
    assert _value(text, "miner_agent_cancel_latency_seconds_bucket", le="0.25") == 0
    assert _value(text, "miner_agent_cancel_latency_seconds_bucket", le="0.5") == 1
    assert _value(text, "miner_agent_log_bytes_shipped_total") == 1024
    assert _value(text, "miner_agent_coordinator_errors_total", endpoint="heartbeat") == 1
    latency = "miner_agent_coordinator_request_duration_seconds_count"
    assert _value(text, latency, endpoint="heartbeat") == 2
    assert _value(text, "miner_agent_jobs_running") == 2
    assert _value(text, "miner_agent_journal_flushes_total") == 7
    flushes[0] = 9  # read at each scrape, never copied
    assert _value(render(m.registry).decode(), "miner_agent_journal_flushes_total") == 9
    assert _value(text, "miner_agent_gpu_power_watts", gpu="0", uuid="GPU-a") == 612.3
    assert _value(text, "miner_agent_gpu_memory_used_bytes", gpu="0", uuid="GPU-a") == 2 * 2**20
    assert "# TYPE miner_agent_job_duration_seconds histogram" in text
    assert "# TYPE miner_agent_jobs_total counter" in text
    assert "_created" not in text


def test_gpu_gauges_drop_unsupported_figures_and_vanished_gpus() -> None:
    m = AgentMetrics()
    gpu0 = {"index": 0, "uuid": "a", "util_gpu_pct": 5, "temp_c": 40, "power_w": 100.0}
    gpu1 = {"index": 1, "uuid": "b", "util_gpu_pct": 9, "temp_c": 50, "power_w": None}
    m.update_gpus({"gpus": [gpu0, gpu1]})
    gpu1_labels = {"gpu": "1", "uuid": "b"}
    assert m.registry.get_sample_value("miner_agent_gpu_power_watts", gpu1_labels) is None
    assert m.registry.get_sample_value("miner_agent_gpu_temperature_celsius", gpu1_labels) == 50
    m.update_gpus({"gpus": [gpu0]})
    assert _series(m, "miner_agent_gpu_temperature_celsius") == [("0", "a")]
    m.update_gpus({"gpus": []})
    assert _series(m, "miner_agent_gpu_utilization_percent") == []


def test_each_agent_has_its_own_registry_and_escaped_labels() -> None:
    # Given two agents in one process, one of which saw an awkward endpoint label
    a, b = AgentMetrics(), AgentMetrics()
    a.coordinator_call('a"b\\c\nd', 0.1, ok=False)
    # Then the other and the library's global registry saw nothing
    text = render(a.registry).decode()
    assert _value(text, "miner_agent_coordinator_errors_total", endpoint='a"b\\c\nd') == 1
    assert 'endpoint="a\\"b\\\\c\\nd"' in text
    assert "miner_agent_coordinator_errors_total{" not in render(b.registry).decode()
    assert REGISTRY.get_sample_value("miner_agent_jobs_running") is None
    with pytest.raises(ValueError):
        AgentMetrics(a.registry)  # the same names twice in one registry


def test_concurrent_scrapes_and_updates() -> None:
    m = AgentMetrics()
    errors: list[BaseException] = []

    def writer() -> None:
        for _ in range(2000):
            m.job_finished("failed", 1.0)

    with MetricsServer(m.registry) as server:
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(20):
                assert _scrape(server.port)[0] == 200
        except BaseException as exc:
            errors.append(exc)
        t.join()
        text = _scrape(server.port)[2]
    assert not errors
    assert _value(text, "miner_agent_jobs_total", outcome="failed") == 2000


def test_raw_http_request_and_clean_stop() -> None:
    server = MetricsServer(CollectorRegistry(), port=0).start()
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.")
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
