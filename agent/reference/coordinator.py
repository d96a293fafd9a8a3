"""A reference coordinator: the core protocol exactly as real servers behave, plus extensions.

For tests and local runs. It serves real HTTP (Starlette on uvicorn) on loopback from
a background thread with its own event loop, keeps its state in SQLite (WAL), and
takes injected faults::

    with ReferenceCoordinator(api_keys={"miner": "mk", "client": "ck"}) as coord:
        url = coord.base_url
        coord.faults.set(status=503, count=3)

``extensions=()`` gives the core only. Standalone: ``miner-agent coordinator`` (or
``python -m agent.reference.coordinator``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

from agent.errors import ConfigError, ExitCode
from agent.reference.client_api import ClientAPI
from agent.reference.faults import Faults, RateLimiter
from agent.reference.listener import Listener
from agent.reference.miner_api import MinerAPI
from agent.reference.model import EXTENSIONS, Settings
from agent.reference.server import HTTPApp
from agent.reference.standalone import (
    DESCRIPTION,
    KEYS_EPILOG,
    REAL_RATE_LIMITS,
    add_arguments,
    serve,
)

__all__ = ["REAL_RATE_LIMITS", "ReferenceCoordinator", "main"]
from agent.reference.store import Store
from agent.reference.stream_api import StreamAPI

logger = logging.getLogger(__name__)


class ReferenceCoordinator:
    """A coordinator on ``host:port`` (port 0: any free one); :meth:`start` returns its URL.

    ``api_keys`` maps a role (``"miner"``, ``"client"``) to a key or keys. Time-driven
    transitions: a job expires ``job_ttl_s`` after submission (clients may pass ttl_s),
    a lease lapses ``lease_ttl_s`` after its last renewal (the job is requeued), and an
    unconfirmed cancel becomes CANCELED after ``cancel_grace_s``.
    """

    def __init__(self, db_path: str | None = None, *,
                 api_keys: Mapping[str, str | Iterable[str]] | None = None,
                 extensions: Sequence[str] = EXTENSIONS, host: str = "127.0.0.1",
                 port: int = 0, job_ttl_s: float = 900.0, lease_ttl_s: float = 60.0,
                 cancel_grace_s: float = 60.0,
                 rate_limits: Mapping[str, int] | None = None,
                 max_body_bytes: int = 10 * 1024 * 1024,
                 max_package_bytes: int = 256 * 1024 * 1024,
                 announce_limits: bool = True, retain_days: float | None = None,
                 retain_bytes: int | None = None) -> None:
        unknown = set(extensions) - set(EXTENSIONS)
        if unknown:
            raise ValueError(f"unknown extensions {sorted(unknown)}; known: {EXTENSIONS}")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if db_path is None or db_path == ":memory:":
            self._tmp = tempfile.TemporaryDirectory(prefix="refcoord-")
            db_path = os.path.join(self._tmp.name, "coordinator.db")
        keys = api_keys or {"miner": "miner-key", "client": "client-key"}
        self.api_keys = {role: frozenset([k] if isinstance(k, str) else k)
                         for role, k in keys.items()}
        self.settings = Settings(tuple(e for e in EXTENSIONS if e in extensions), job_ttl_s,
                                 lease_ttl_s, cancel_grace_s, max_body_bytes, max_package_bytes,
                                 os.urandom(32), announce_limits)
        # Retention keeps the store's disk use bounded: packages past retain_days, then
        # the oldest until retain_bytes (None: keep); job records and receipts stay.
        self.store = Store(db_path, cancel_grace_s=cancel_grace_s, retain_days=retain_days,
                           retain_bytes=retain_bytes)
        self.faults = Faults()
        self.faults.bind(self._go_down, self._go_up)
        self._limiter = RateLimiter(rate_limits)
        self._host, self._port = host, port
        miners, clients = MinerAPI(self.store, self.settings), ClientAPI(self.store,
                                                                         self.settings)
        self._app = HTTPApp(miners.routes() + clients.routes(), self.api_keys, self.faults,
                            self._limiter, self.settings.max_body_bytes,
                            websockets=StreamAPI(self.store).routes())
        self._listener = Listener(self._app, host, port)

    def __repr__(self) -> str:
        return f"ReferenceCoordinator({self._host}:{self._port}, api_keys='***')"

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def start(self) -> str:
        """Listen and serve in a background thread; returns the base URL."""
        self._go_up()
        return self.base_url

    def stop(self) -> None:
        """Stop serving, close the store and remove a temporary database."""
        self._listener.close()
        self.store.close()  # wakes long-polls still waiting in worker threads
        self._app.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ReferenceCoordinator:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _go_up(self) -> None:
        if self._listener.serving:
            return
        self._listener.up()
        self._port = self._listener.port
        logger.info("reference coordinator listening on %s", self.base_url)

    def _go_down(self) -> None:
        self._listener.down()

    def presign(self) -> str:
        """A fresh presigned upload URL (a bearer URL: ``PUT`` it, no API key)."""
        return f"{self.base_url}/presigned/{self.store.presign()}?signature=stand-in"

    def presigned_object(self, url: str) -> bytes | None:
        """What was uploaded to a presigned URL, or None."""
        token = url.split("/presigned/", 1)[-1].split("?", 1)[0]
        row = self.store.presigned(token)
        return bytes(row["data"]) if row and row["data"] is not None else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent.coordinator.reference",
                                description=DESCRIPTION, epilog=KEYS_EPILOG)
    add_arguments(p, port=8000, db_help="SQLite file (default: a temporary one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The module's entry, kept for scripts: the same server as `miner-agent coordinator`
    (the documented way), with this entry's old defaults (port 8000, a temporary db)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return serve(args, args.db, ReferenceCoordinator)
    except ConfigError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return int(ExitCode.CONFIG)


if __name__ == "__main__":
    raise SystemExit(main())
