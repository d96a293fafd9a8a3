"""The reference coordinator served on its own: its flags and its serve-until-signal loop.

Shared by `miner-agent coordinator` and ``python -m agent.coordinator.reference``; kept
apart from :mod:`agent.reference.coordinator` so that building the CLI's parser imports
no server (starlette, uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from typing import Protocol

from agent.errors import ConfigError
from agent.reference.model import EXTENSIONS
from agent.signals import capture_signals


class Served(Protocol):
    """What :func:`serve` needs of a coordinator (a ReferenceCoordinator)."""

    def start(self) -> str: ...

    def stop(self) -> None: ...

logger = logging.getLogger(__name__)

# The real server's per-IP limits (requests a minute); off unless asked for.
REAL_RATE_LIMITS = {"poll": 100, "heartbeat": 100, "result": 50, "fail": 50}

DESCRIPTION = ("Run the reference coordinator: the AITBC core miner protocol (quirks "
               "included) plus this project's extensions, with client endpoints and the "
               "job stream (WebSocket /v1/jobs/{id}/stream).")
KEYS_EPILOG = ("Keys come from the environment: REFCOORD_MINER_KEY, REFCOORD_CLIENT_KEY "
               "(default: miner-key and client-key, for loopback tests only). See "
               "docs/protocol-extensions.md.")
_DEFAULT_KEYS = {"miner": "miner-key", "client": "client-key"}


def add_arguments(p: argparse.ArgumentParser, *, port: int, db_help: str) -> None:
    """The standalone server's flags; `miner-agent coordinator` has the same ones."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"port to listen on ({port}; 0: any)")
    p.add_argument("--db", default=None, help=db_help)
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


def serve(args: argparse.Namespace, db_path: str | None,
          coordinator: Callable[..., Served]) -> int:
    """Serve ``coordinator(...)`` (the class, passed in: this module imports no server)
    with ``args`` from :func:`add_arguments` until SIGINT or SIGTERM."""
    keys = {"miner": os.environ.get("REFCOORD_MINER_KEY", _DEFAULT_KEYS["miner"]),
            "client": os.environ.get("REFCOORD_CLIENT_KEY", _DEFAULT_KEYS["client"])}
    if args.host not in ("127.0.0.1", "localhost", "::1") and \
            any(keys[role] == key for role, key in _DEFAULT_KEYS.items()):
        logger.warning("serving on %s with a default API key: set REFCOORD_MINER_KEY and "
                       "REFCOORD_CLIENT_KEY", args.host)
    coord = coordinator(
        db_path, api_keys=keys, host=args.host, port=args.port,
        extensions=[e for e in args.extensions.split(",") if e], job_ttl_s=args.job_ttl,
        lease_ttl_s=args.lease_ttl, cancel_grace_s=args.cancel_grace,
        rate_limits=None if args.no_rate_limits else REAL_RATE_LIMITS,
        retain_days=args.retain_days, retain_bytes=args.retain_bytes)
    try:
        url = coord.start()
    except OSError as exc:
        coord.stop()
        raise ConfigError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}"
                          ) from None
    print(f"reference coordinator on {url}", flush=True)
    try:
        asyncio.run(_until_signal())
    finally:
        coord.stop()
    return 0


async def _until_signal() -> None:
    stop = asyncio.Event()
    with capture_signals(lambda _sig: stop.set()):
        await stop.wait()
