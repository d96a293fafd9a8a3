"""sd_notify spoken directly: one datagram per message to ``$NOTIFY_SOCKET``.

No libsystemd binding is needed; the protocol is newline-separated
``KEY=VALUE`` pairs sent on an ``AF_UNIX``/``SOCK_DGRAM`` socket whose path is in
``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). Outside systemd
the variable is unset and every call is a no-op, so the daemon can call these
unconditionally.

The unit runs with ``NotifyAccess=main``: only the agent's own pid may speak,
so job processes must not inherit ``NOTIFY_SOCKET`` (``from_env(unset=True)``
removes it from the environment once read).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def watchdog_interval_s(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, or None when not asked.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; any
    other process (a child that inherited the environment) gets None.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(raw) / 1_000_000 / 2


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # vsock (vsock:CID:PORT) and anything else: not for a host daemon


class Notifier:
    """Sends state changes to systemd; every method is a no-op without a socket."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, unset: bool = False) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``; ``unset=True`` hides it from later children."""
        source = os.environ if env is None else env
        raw = source.get("NOTIFY_SOCKET", "")
        if unset and env is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET of an unsupported kind")
        return cls(address)

    @property
    def enabled(self) -> bool:
        """True when there is a systemd socket to talk to."""
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased); True when systemd got the datagram."""
        if self._sock is None or self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            # systemd going away (or restarting) must never take the agent down with it.
            log.warning("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup is done (``Type=notify`` units count as started from here)."""
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """The agent's main loop is alive; send at :func:`watchdog_interval_s`."""
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        """A configuration reload started; follow with :meth:`ready` when it is done."""
        return self.notify(RELOADING=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown (drain) started."""
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = _one_line(status)
        return self.notify(**fields)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start or stop timeout fires."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE pair: a status text must not inject one.
    return " ".join(text.split())
