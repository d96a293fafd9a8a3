"""A reference coordinator: the core protocol exactly as real servers behave, plus extensions.

For tests and local runs. It serves real HTTP on loopback from a background thread,
keeps its state in SQLite (WAL), and takes injected faults::

    with ReferenceCoordinator(api_keys={"miner": "mk", "client": "ck"}) as coord:
        url = coord.base_url
        coord.faults.set(status=503, count=3)

``extensions=()`` gives the core only. Standalone: ``python -m agent.reference.coordinator``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

from agent.reference.client_api import ClientAPI
from agent.reference.faults import Faults, RateLimiter
from agent.reference.miner_api import MinerAPI
from agent.reference.model import EXTENSIONS, Settings
from agent.reference.server import CoordinatorHTTPServer
from agent.reference.store import Store

logger = logging.getLogger(__name__)

# The real server's per-IP limits (requests a minute); off unless asked for.
REAL_RATE_LIMITS = {"poll": 100, "heartbeat": 100, "result": 50, "fail": 50}


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
        self._server: CoordinatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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
        self._go_down()
        self.store.close()
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
        with self._lock:
            if self._server is not None:
                return
            miners, clients = MinerAPI(self.store, self.settings), ClientAPI(self.store,
                                                                             self.settings)
            server = CoordinatorHTTPServer((self._host, self._port),
                                           miners.routes() + clients.routes(), self.api_keys,
                                           self.faults, self._limiter,
                                           self.settings.max_body_bytes)
            self._port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name="reference-coordinator", daemon=True)
            self._thread.start()
            logger.info("reference coordinator listening on %s", self.base_url)

    def _go_down(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=5)

    def presign(self) -> str:
        """A fresh presigned upload URL (a bearer URL: ``PUT`` it, no API key)."""
        return f"{self.base_url}/presigned/{self.store.presign()}?signature=stand-in"

    def presigned_object(self, url: str) -> bytes | None:
        """What was uploaded to a presigned URL, or None."""
        token = url.split("/presigned/", 1)[-1].split("?", 1)[0]
        row = self.store.presigned(token)
        return bytes(row["data"]) if row and row["data"] is not None else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent.coordinator.reference",
        description="Run the reference coordinator: the AITBC core miner protocol (quirks "
                    "included) plus this project's extensions, with client endpoints.",
        epilog="Keys come from the environment when not given: REFCOORD_MINER_KEY, "
               "REFCOORD_CLIENT_KEY. See docs/protocol-extensions.md.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0: any)")
    p.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")
    p.add_argument("--extensions", default=",".join(EXTENSIONS),
                   help="comma-separated extensions to offer; '' for the core only "
                        f"(default: {','.join(EXTENSIONS)})")
    p.add_argument("--job-ttl", type=float, default=900.0, help="job TTL seconds (900)")
    p.add_argument("--lease-ttl", type=float, default=60.0, help="lease TTL seconds (60)")
    p.add_argument("--cancel-grace", type=float, default=60.0,
                   help="seconds a cancel waits for the miner's confirmation (60)")
    p.add_argument("--no-rate-limits", action="store_true",
                   help="turn off the real server's per-IP rate limits")
    p.add_argument("--retain-days", type=float, default=None, metavar="DAYS",
                   help="drop finished jobs' packages older than this (default: keep)")
    p.add_argument("--retain-bytes", type=int, default=None, metavar="BYTES",
                   help="drop the oldest finished jobs' packages past this total "
                        "(default: no cap); job records and receipts stay")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: serve until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    keys = {"miner": os.environ.get("REFCOORD_MINER_KEY", "miner-key"),
            "client": os.environ.get("REFCOORD_CLIENT_KEY", "client-key")}
    coord = ReferenceCoordinator(
        args.db, api_keys=keys, host=args.host, port=args.port,
        extensions=[e for e in args.extensions.split(",") if e], job_ttl_s=args.job_ttl,
        lease_ttl_s=args.lease_ttl, cancel_grace_s=args.cancel_grace,
        rate_limits=None if args.no_rate_limits else REAL_RATE_LIMITS,
        retain_days=args.retain_days, retain_bytes=args.retain_bytes)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"reference coordinator on {coord.start()}", flush=True)
    done.wait()
    coord.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
