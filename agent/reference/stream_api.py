"""A job's live stream for clients: the WebSocket ``/v1/jobs/{job_id}/stream``.

The same events as the long-poll in :mod:`agent.reference.events_api`, pushed: after
the handshake (the client key in ``X-Api-Key``; a bad key is refused 401/403 and an
unknown job 404, as JSON, before any upgrade) each event is one JSON text message::

    {"seq": 7, "type": "log", "stream": "stdout", "offset": 120, "data": "step 3/10\\n"}
    {"seq": 8, "type": "state", "status": "running", "progress": 30.0, "stage": ..., ...}

in sequence order, from ``?after=SEQ`` (0: from the start; pass the last ``seq`` seen to
resume after a reconnect). A state event is the job's view as it is now, so states
between two looks collapse into the latest; log chunks are never skipped. Once the job
has ended and every event was sent, the server closes with code 1000. It closes with
1001 when the coordinator stops.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from agent.reference.events_api import RECHECK_S, EventsAPI
from agent.reference.model import Problem
from agent.reference.server import HTTPApp, WSRoute, ws_route
from agent.reference.store import Store

# How often a stream looks at the store's change counter: an int read on the event
# loop, so an idle stream holds no worker thread (a long-poll holds one).
POLL_S = 0.05


class StreamAPI:
    """The handler for ``/v1/jobs/{job_id}/stream``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.events = EventsAPI(store)

    def routes(self) -> list[WSRoute]:
        return [ws_route("/v1/jobs/{job_id}/stream", self.stream, "client")]

    async def stream(self, ws: WebSocket, app: HTTPApp) -> None:
        job_id = ws.path_params["job_id"]
        after = _after(ws.query_params.get("after", "0"))
        generation = self.store.generation  # read before looking: no change is missed
        answer = await app.run_sync(self.events.collect, job_id, after)  # 404 here
        await ws.accept()
        client_left = asyncio.ensure_future(_until_disconnect(ws))
        try:
            await self._send_until_done(ws, app, job_id, generation, answer, client_left)
        except (WebSocketDisconnect, OSError):
            pass  # the client left mid-send
        finally:
            client_left.cancel()

    async def _send_until_done(self, ws: WebSocket, app: HTTPApp, job_id: str,
                               generation: int, answer: dict[str, Any],
                               client_left: asyncio.Future[Any]) -> None:
        while True:
            for event in answer["events"]:
                await ws.send_json(event)
            if answer["done"]:
                await ws.close(1000, "job ended")
                return
            if not answer["more"] and not await self._changed(generation, client_left):
                if not client_left.done():
                    await ws.close(1001, "the coordinator is stopping")
                return
            generation = self.store.generation
            answer = await app.run_sync(self.events.collect, job_id, int(answer["next"]))

    async def _changed(self, generation: int, client_left: asyncio.Future[Any]) -> bool:
        """Until the store moved past ``generation`` or RECHECK_S passed (True: look
        again), the client left or the store closed (False: end the stream)."""
        deadline = time.monotonic() + RECHECK_S
        while self.store.generation == generation and time.monotonic() < deadline:
            if self.store.closed:
                return False
            await asyncio.wait([client_left], timeout=POLL_S)
            if client_left.done():
                return False
        return not self.store.closed


async def _until_disconnect(ws: WebSocket) -> None:
    """Reads (and ignores) what the client sends, until it goes."""
    try:
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    except (RuntimeError, OSError):  # the socket closed under the read
        pass


def _after(text: str) -> int:
    try:
        return max(0, int(text))
    except ValueError:
        raise Problem(422, "after must be an integer") from None
