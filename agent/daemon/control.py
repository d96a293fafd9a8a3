"""The local control socket: how `miner-agent ps`, `drain` and `resume` reach the agent.

A unix socket at ``<state_dir>/control.sock``, mode 0660 with the agent's group: root and
the operators in that group can use it; jobs never see it (their sandbox covers the
state dir). It lives as long as the agent serves and is removed when it stops.

One request per connection, one JSON object a line each way; a request is at most
:data:`MAX_REQUEST_BYTES`::

    {"op": "ps"}                        -> {"ok": true, ...the node's view...}
    {"op": "drain", "reason": "..."}    -> {"ok": true, ...}
    {"op": "resume"}                    -> {"ok": true, ...}
    anything else                       -> {"ok": false, "error": "..."}

The server side runs on the agent's event loop; the client side (:func:`call`) is plain
blocking code for the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from agent.aio import write_or_reset
from agent.clock import within
from agent.errors import AgentError

log = logging.getLogger(__name__)
SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o660
MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 16 << 20
REQUEST_TIMEOUT_S = 5.0  # a client that connects and says nothing is dropped after this

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AgentNotRunning(AgentError):
    """Raised when no agent answers on the control socket of the state dir asked about."""

    code = "agent_not_running"


class ControlDenied(AgentError):
    """Raised when the control socket is there but this user may not use it."""

    code = "permission_denied"


def socket_path(state_dir: Path) -> Path:
    """Where the agent with this state dir serves its control socket."""
    return state_dir / SOCKET_NAME


class ControlServer:
    """Serves ``handlers`` (op name -> coroutine) on the control socket at ``path``."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def start(self) -> bool:
        """Bind and serve; False (logged) where the socket cannot be made.

        The socket is bound under a temporary name, given its mode and group, and only then
        renamed into place: it is never reachable at ``path`` with a looser mode, and a
        stale socket from an agent that died is replaced in one step.
        """
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            sock.bind(str(tmp))
            os.chown(tmp, -1, os.getegid())
            os.chmod(tmp, SOCKET_MODE)
            os.replace(tmp, self.path)
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("control socket %s not served (%s): `miner-agent ps`, `drain` and "
                      "`resume` cannot reach this agent", self.path, exc.strerror or exc)
            return False
        log.info("control socket on %s (mode %04o, group %s)", self.path, SOCKET_MODE,
                 _group_name(os.getegid()))
        return True

    async def close(self) -> None:
        """Stop serving and remove the socket, unless another agent has replaced it since."""
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(TimeoutError):
            await within(self._server.wait_closed(), 1.0)
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await within(self._answer(reader, _peer_uid(writer)), REQUEST_TIMEOUT_S)
        except TimeoutError:
            answer = _error(f"no request within {REQUEST_TIMEOUT_S:.0f} s")
        try:
            write_or_reset(writer, json.dumps(answer, default=str).encode() + b"\n", "client")
            await within(writer.drain(), REQUEST_TIMEOUT_S)
        except (ConnectionError, TimeoutError):
            pass  # the client left: nothing to tell it
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, uid: int | None) -> dict[str, Any]:
        try:
            line = await reader.readline()
        except ValueError:  # asyncio's LimitOverrunError: past the stream's limit
            return _error(f"request longer than {MAX_REQUEST_BYTES} bytes")
        try:
            request = json.loads(line)
        except ValueError:
            return _error("the request is not one JSON object on one line")
        op = request.get("op") if isinstance(request, dict) else None
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return _error(f"unknown op {op!r}; one of {', '.join(sorted(self.handlers))}")
        request["uid"] = uid
        log.debug("control: %s from uid %s", op, uid)
        try:
            return {"ok": True, **await handler(request)}
        except AgentError as exc:
            return _error(exc.message)
        except Exception:  # one bad request never takes the socket (or the agent) down
            log.exception("control: %s failed", op)
            return _error(f"{op} failed inside the agent; its log says why")


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting process's uid (SO_PEERCRED), for the log of who drained the node."""
    sock = writer.get_extra_info("socket")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (AttributeError, OSError):
        return None
    return int(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def call(state_dir: Path, op: str, *, timeout_s: float = 10.0,
         **fields: Any) -> dict[str, Any]:
    """Send one request to the agent serving ``state_dir``; its answer.

    Raises :class:`AgentNotRunning` when no agent answers there, :class:`ControlDenied`
    when this user may not use the socket, and :class:`AgentError` when the agent
    refuses the request.
    """
    path = socket_path(state_dir)
    not_running = AgentNotRunning(
        f"no agent is running with state dir {state_dir}: start it with `miner-agent run` "
        "or `systemctl start miner-agent`")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise not_running from None
        except PermissionError:
            raise ControlDenied(_denied(path)) from None
        except TimeoutError:
            raise AgentNotRunning(f"the agent on {path} did not accept a connection within "
                                  f"{timeout_s:.0f} s; is it hung? (`kill -QUIT` its pid "
                                  "writes its stacks to its log)") from None
        except OSError as exc:
            raise AgentNotRunning(f"cannot reach the agent's control socket {path}: "
                                  f"{exc.strerror or exc}") from None
        answer = _exchange(sock, path, {"op": op, **fields}, timeout_s)
    if not answer.get("ok"):
        raise AgentError(str(answer.get("error") or "refused"), code="control_refused")
    return answer


def _exchange(sock: socket.socket, path: Path, request: dict[str, Any],
              timeout_s: float) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        while size <= MAX_ANSWER_BYTES and (chunk := sock.recv(65536)):
            chunks.append(chunk)
            size += len(chunk)
    except TimeoutError:
        raise AgentNotRunning(f"the agent did not answer on {path} within {timeout_s:.0f} s"
                              ) from None
    except OSError as exc:
        raise AgentNotRunning(f"the agent's control socket {path} failed: "
                              f"{exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise AgentError(f"the agent's answer on {path} is not readable", code="bad_answer")
    return answer


def _denied(path: Path) -> str:
    try:
        group = _group_name(os.stat(path).st_gid)
    except OSError:
        group = "the agent's group"
    return (f"permission denied on the agent's control socket {path}: run as root or as a "
            f"member of group {group}")
