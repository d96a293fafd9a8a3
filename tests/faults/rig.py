"""What a row starts: a coordinator (reference or hostile), agents on one state dir, a witness.

Everything is real and on loopback: the reference coordinator with its injected
faults, or :class:`~tests.faults.hostile.HostileCoordinator`; ``miner-agent run`` as a
subprocess (a restart is a new process on the same state dir). :meth:`Rig.close` stops
it all, whatever the row did.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)
from tests.faults.hostile import HostileCoordinator, Witness

MINER_ID = "miner-1"
QUICK_JOB = {"type": "sleep", "steps": 2, "step_s": 0.05, "print_every": 1}
# On top of helpers.FAST: an idle agent polls at least every 0.2 s, so rows stay short
SETTINGS = {"poll_max_interval_s": 0.2}
TERMINAL = ("COMPLETED", "FAILED", "CANCELED", "EXPIRED")


class Rig:
    """One row's world; the row's job is :attr:`job_id`, the fresh one :attr:`fresh_id`."""

    def __init__(self, tmp: Path, state: Path | None = None) -> None:
        self.tmp = tmp
        self.state = state or tmp / "state"
        self.agents: list[AgentProcess] = []
        self.coord: ReferenceCoordinator | None = None
        self.client: Client | None = None
        self.hostile: HostileCoordinator | None = None
        self.witness: Witness | None = None
        self.job_id = ""
        self.fresh_id = ""
        self.facts: dict[str, Any] = {}  # what a runner saw on the way, for the checks

    # -- parts ----------------------------------------------------------------------------

    def coordinator(self, core: bool = False, **settings: Any) -> ReferenceCoordinator:
        self.coord = start_coordinator(self.tmp / "coordinator", extensions=() if core else None,
                                       **settings)
        self.client = Client(self.coord)
        return self.coord

    def hostile_coordinator(self) -> tuple[HostileCoordinator, Witness]:
        self.hostile, self.witness = HostileCoordinator(), Witness()
        return self.hostile, self.witness

    def agent(self, burst: bool = False, **settings: Any) -> AgentProcess:
        """A new agent process on the rig's state dir (a restart, when one ran before)."""
        url = self.hostile.base_url if self.hostile else self.ref.base_url
        agent = AgentProcess(url, self.state, miner_id=MINER_ID, burst=burst,
                             **{**SETTINGS, **settings})
        self.agents.append(agent)
        return agent

    @property
    def ref(self) -> ReferenceCoordinator:
        assert self.coord is not None, "this row has no reference coordinator"
        return self.coord

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.client is not None:
            self.client.close()
        for server in (self.coord, self.hostile, self.witness):
            if server is not None:
                server.stop() if isinstance(server, ReferenceCoordinator) else server.close()

    # -- what happened --------------------------------------------------------------------

    def log(self) -> str:
        """Every agent's log, in start order."""
        return "\n".join(a.log() for a in self.agents)

    def runs(self, job_id: str) -> int:
        """How many times a process was started for ``job_id``, over every agent."""
        return len(re.findall(f"job {re.escape(job_id)}: started pid", self.log()))

    def job(self, job_id: str) -> dict[str, Any]:
        """The reference coordinator's own row for the job (states in capitals)."""
        job = self.ref.store.job(job_id)
        assert job is not None, f"the coordinator has no job {job_id}"
        return job

    def wait_state(self, job_id: str, states: tuple[str, ...],
                   timeout: float = 30.0) -> dict[str, Any]:
        wait_until(lambda: self.job(job_id)["state"] in states, timeout,
                   lambda: f"job {job_id} is {self.job(job_id)['state']}, not one of "
                           f"{'/'.join(states)}; agent log ends:\n{self.log()[-2500:]}")
        return self.job(job_id)

    def path(self, job_id: str, call: str) -> str:
        return f"/v1/miners/{job_id}/{call}"

    def wait_arrived(self, job_id: str, call: str, timeout: float = 30.0) -> None:
        """Until the reference coordinator saw a ``call`` for the job (faulted or not)."""
        wait_until(lambda: self.ref.faults.arrived(self.path(job_id, call)) >= 1, timeout,
                   lambda: f"no {call} for {job_id} arrived; agent log ends:\n"
                           f"{self.log()[-2500:]}")

    # -- staged moments -------------------------------------------------------------------

    def stop_with_term(self, agent: AgentProcess, budget_s: float) -> None:
        """SIGTERM ``agent``; note its exit code and how long it took (None: killed)."""
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        try:
            code: int | None = agent.wait(budget_s + 20)
        except AssertionError:
            code = None
        self.facts["stop"] = (code, time.monotonic() - started, budget_s)

    def seed_accepted(self) -> str:
        """The state a SIGKILL leaves right after accept: journal row accepted, the job
        RUNNING and this miner's on the coordinator, nothing started."""
        from agent.daemon.journal import Journal

        agent = self.agent()
        agent.wait_log("registered as")
        agent.kill()
        assert self.client is not None
        job_id = self.client.submit(QUICK_JOB)
        resp = httpx.post(f"{self.ref.base_url}/v1/miners/poll", json={}, timeout=10,
                          headers={"X-Api-Key": MINER_KEY, "X-Miner-ID": MINER_ID})
        answer = resp.raise_for_status().json()
        assert answer["job_id"] == job_id, answer
        lease_id = (answer.get("lease") or {}).get("id")
        raw = {"job_id": job_id, "payload": answer["payload"],
               "constraints": answer["constraints"], "lease_id": lease_id}
        journal = Journal(self.state / "journal.db")
        try:
            assert journal.accept(job_id, raw, lease_id)
        finally:
            journal.close()
        return job_id
