"""Fixtures: a real reference coordinator on loopback and real clients against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from agent.coordinator.client import CoordinatorClient
from agent.coordinator.retry import RetryPolicy
from agent.reference.coordinator import ReferenceCoordinator

MINER_KEY = "miner-secret-key-123"
CLIENT_KEY = "client-secret-key-456"
GPU_CAPS: dict[str, Any] = {"gpus": [{"name": "RTX 4090", "memory_mb": 24564}],
                            "cuda": "12.4", "models": ["llama3.2:3b"], "price": 1.0}
FAST = RetryPolicy(base_s=0.01, cap_s=0.05)


@pytest.fixture
def make_coordinator() -> Iterator[Callable[..., ReferenceCoordinator]]:
    """Start coordinators with any constructor arguments; all are stopped afterwards."""
    started: list[ReferenceCoordinator] = []

    def make(**kwargs: Any) -> ReferenceCoordinator:
        kwargs.setdefault("api_keys", {"miner": MINER_KEY, "client": CLIENT_KEY})
        coord = ReferenceCoordinator(**kwargs)
        coord.start()
        started.append(coord)
        return coord

    yield make
    for coord in started:
        coord.stop()


@pytest.fixture
def coordinator(make_coordinator: Callable[..., ReferenceCoordinator]) -> ReferenceCoordinator:
    """A coordinator offering every extension."""
    return make_coordinator()


@pytest.fixture
def core(make_coordinator: Callable[..., ReferenceCoordinator]) -> ReferenceCoordinator:
    """A coordinator speaking the core protocol only, as real servers do today."""
    return make_coordinator(extensions=())


def miner(coord: ReferenceCoordinator, miner_id: str = "miner-1", *,
          api_key: str = MINER_KEY, policy: RetryPolicy = FAST,
          **kwargs: Any) -> CoordinatorClient:
    """A miner client for ``coord`` with fast backoff (create it inside the event loop)."""
    return CoordinatorClient(coord.base_url, api_key, miner_id, retry=policy, **kwargs)


def client_http(coord: ReferenceCoordinator) -> httpx.Client:
    """A plain HTTP client holding the client role's key, for /v1/jobs calls."""
    return httpx.Client(base_url=coord.base_url, headers={"X-Api-Key": CLIENT_KEY},
                        timeout=5.0)


def submit(coord: ReferenceCoordinator, payload: dict[str, Any] | None = None,
           constraints: dict[str, Any] | None = None, **extra: Any) -> str:
    """Submit a job as a client; returns its id."""
    with client_http(coord) as http:
        resp = http.post("/v1/jobs", json={"payload": payload or {"type": "command"},
                                           "constraints": constraints or {}, **extra})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["job_id"])


def status(coord: ReferenceCoordinator, job_id: str) -> dict[str, Any]:
    """The client's view of a job."""
    with client_http(coord) as http:
        resp = http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())
