"""Every test sees no GPU unless it is marked ``gpu``.

A test not marked ``gpu`` runs with ``CUDA_VISIBLE_DEVICES=""`` in the environment, so
the job processes, fork servers and ``python -m agent`` children it starts see no CUDA
device and behave on a GPU node as they do on CI. NVML ignores the variable, so the
agent's telemetry still sees the node's GPUs, but an agent started so gives its jobs
none of them (it reads its own ``CUDA_VISIBLE_DEVICES`` as CUDA would): its slots are
``cpu_slots``, as on CI.

The hiding spans the whole of a test's run, setup and teardown included, so a
module- or session-scoped fixture first set up for a CPU test (an agent process, say)
starts hidden as well. It never touches torch or CUDA: for the test process itself the
variable only matters before CUDA's first initialisation, and by then it has usually
happened already. So in-process code that must run on the CPU says
``"device": "cpu"``, and ``gpu`` tests decide whether to skip at import time (a module
level ``torch.cuda.is_available()``, evaluated during collection, before any test has
hidden anything), never lazily inside a test.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker("gpu") is not None:
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        return (yield)
