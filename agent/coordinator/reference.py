"""Deprecated alias: the reference coordinator lives in :mod:`agent.reference.coordinator`.

``python -m agent.coordinator.reference`` keeps working for scripts that use it; new
code imports ``agent.reference``. This is the one module under ``agent/coordinator/``
allowed to reach the reference package, and only for this alias.
"""

from agent.reference.coordinator import ReferenceCoordinator, main

__all__ = ["ReferenceCoordinator", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
