"""`miner-agent watch` and `logs`: a job live, over the coordinator's job stream.

What happened before the watch began comes from one look at ``GET /v1/jobs/{id}/events``
(the catch-up); what happens next comes pushed over the WebSocket
``/v1/jobs/{id}/stream?after=SEQ`` (docs/protocol-extensions.md). A coordinator without
the stream, or a stream that breaks, is followed by long-polling the events endpoint
from the last event seen, so nothing is skipped or shown twice.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import datetime as dt
import json
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, TextIO

from agent.commands.client import (
    TERMINAL,
    Target,
    call,
    job_id,
    json_flag,
    outcome_exit,
    shown,
    summary,
    target,
    verb,
)
from agent.commands.console import JobConsole
from agent.commands.options import Sub
from agent.coordinator.jobs_api import JobsClient
from agent.errors import ExitCode
from agent.layout import STREAMS
from agent.text import printable

WAIT_S = 25.0  # one long-poll; the server answers sooner whenever there is news
STREAM_MAX_MESSAGE_BYTES = 4 << 20  # one event (a log chunk is at most 1 MiB)
TAIL_LINES = 10
# A job's line without its newline is shown in pieces of this many characters: held
# whole, a job printing a gigabyte on one line held a gigabyte here, and each chunk that
# arrived copied all of it again (a 100 MB line took 25 s and 580 MB).
MAX_LINE_CHARS = 64 * 1024


def add_parsers(sub: Sub) -> None:
    p = verb(sub, "watch", "follow a job live: progress bar, stage, ETA, metrics, log tail",
             "Follow a job until it ends: the last log lines so far, then a live progress bar "
             "(stage, ETA, metrics) with its log lines as they come (job stderr lines start "
             f"with '! '; a line longer than {MAX_LINE_CHARS:,} characters shows in pieces), "
             "on stderr as under "
             "`exec`; then the final status on stdout. Exits "
             "by the job's outcome, as `exec` and `status --wait` do (0 completed, 1 failed, "
             "3 canceled, 4 timed out, 5 killed).")
    p.add_argument("--tail", type=int, default=TAIL_LINES, metavar="N",
                   help=f"log lines to show from before the watch began ({TAIL_LINES})")
    json_flag(p, "print each event as one JSON line on stdout instead (state and log "
              "events, from the job's first)")
    p.set_defaults(func=cmd_watch)

    p = verb(sub, "logs", "print a job's log",
             "Print a job's log: its stdout on stdout and its stderr on stderr, or one stream "
             "with --stream, read from the coordinator a page at a time (a log of any size). "
             "With -f, keep printing new output until the job ends. On a "
             "terminal, control characters show as \\xNN (a job's escape sequences are not "
             "acted on); piped or redirected, the bytes are as the job wrote them. Exit 0, "
             "or 11 when there is no such job.")
    p.add_argument("--stream", choices=STREAMS, help="only this stream, on stdout")
    p.add_argument("-f", "--follow", action="store_true",
                   help="follow: print new output as it comes until the job ends")
    p.set_defaults(func=cmd_logs)


def events(client: JobsClient, where: Target, jid: str,
           wait_s: float = WAIT_S) -> Iterator[tuple[dict[str, Any], bool]]:
    """The job's events from its first, each with whether it was already there when the
    stream began (the catch-up), until the job ends and every event was delivered."""
    after, live, pushed = 0, False, False
    while True:
        answer = call(where, client.events, jid, after, wait_s if live else 0.0)
        for event in answer.get("events", []):
            yield event, not live
        after = int(answer.get("next", after))
        if answer.get("done"):
            return
        live = live or not answer.get("more")
        if live and not pushed:
            pushed = True  # the stream once; after it, long-polls from where it stopped
            for event in _stream(where, jid, after):
                after = max(after, int(event.get("seq", after)))
                if event.get("type") == "end":
                    return
                yield event, False


def _stream(where: Target, jid: str, after: int) -> Iterator[dict[str, Any]]:
    """The job's events after ``after``, pushed over the WebSocket until the server ends
    the stream; nothing (the caller long-polls instead) where it cannot be had."""
    from websockets.exceptions import ConnectionClosedOK, InvalidHandshake, WebSocketException
    from websockets.sync.client import connect

    url = where.url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    url = f"{url}/v1/jobs/{urllib.parse.quote(jid, safe='')}/stream?after={after}"
    try:
        with connect(url, additional_headers={"X-Api-Key": where.key}, open_timeout=10,
                     max_size=STREAM_MAX_MESSAGE_BYTES) as ws:
            for message in ws:
                event = json.loads(message)
                if isinstance(event, dict):
                    yield event
            yield {"type": "end"}  # closed 1000 by the server: the job ended, all sent
    except ConnectionClosedOK:
        yield {"type": "end"}
    except (InvalidHandshake, WebSocketException, OSError, ValueError):
        return  # no stream here, or it broke: the long-poll goes on from the last event


def cmd_logs(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    streams = (args.stream,) if args.stream else STREAMS
    with JobsClient(where.url, where.key) as client:
        if not args.follow:
            for stream in streams:
                call(where, _print_log, client, jid, stream, _out(stream, args.stream))
            return ExitCode.OK
        for event, _ in events(client, where, jid):
            if event.get("type") == "log" and event.get("stream") in streams:
                out = _out(str(event["stream"]), args.stream)
                text = str(event.get("data", ""))
                out.write(printable(text) if out.isatty() else text)
                out.flush()
    return ExitCode.OK


def _print_log(client: JobsClient, jid: str, stream: str, out: TextIO) -> None:
    """One stream's log to ``out`` as it arrives (a log may be larger than memory)."""
    tty = out.isatty()  # a terminal would act on the job's escape sequences
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in client.log(jid, stream):
        if tty:
            out.write(printable(decoder.decode(chunk)))
        else:
            out.buffer.write(chunk)
    if tty:
        out.write(printable(decoder.decode(b"", final=True)))
    out.flush()


def _out(stream: str, only: str | None) -> TextIO:
    return sys.stderr if stream == "stderr" and only is None else sys.stdout


def cmd_watch(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        if args.json:
            for event, _ in events(client, where, jid):
                print(json.dumps(event), flush=True)
        else:
            Watch(jid, max(0, args.tail)).run(events(client, where, jid))
        job = shown(call(where, client.job, jid))
    if not args.json:
        for text in summary(job, where):
            print(text)
    return outcome_exit(job) if job.get("status") in TERMINAL else ExitCode.OK


class Watch:
    """Turns events into the console's view: the catch-up kept to a tail, then live."""

    def __init__(self, jid: str, tail: int) -> None:
        self.console = JobConsole(jid)
        self.tail: collections.deque[tuple[str, str]] = collections.deque(maxlen=tail)
        self.partial = {s: "" for s in STREAMS}
        self.status: str | None = None
        self.latest: dict[str, Any] | None = None  # the last state seen while catching up
        self.live = False

    def run(self, stream: Iterator[tuple[dict[str, Any], bool]]) -> None:
        try:
            for event, catching_up in stream:
                if not catching_up:
                    self._go_live()
                if event.get("type") == "log":
                    self._log(str(event.get("stream")), str(event.get("data", "")))
                elif event.get("type") == "state":
                    self._state(event)
            self._go_live()
            for name in STREAMS:  # a last line without its newline
                if self.partial[name]:
                    self.console.line(name, self.partial[name].encode())
            if self.status == "completed":
                self.console.complete()
        finally:
            self.console.close()

    def _go_live(self) -> None:
        """Print the tail of what was there before, then the state as it is now."""
        if self.live:
            return
        self.live = True
        for name, text in self.tail:
            self.console.line(name, text.encode())
        self.tail.clear()
        if self.latest is not None:
            self._state(self.latest)

    def _log(self, name: str, data: str) -> None:
        if name not in self.partial:
            return
        *ended, rest = (self.partial[name] + data).split("\n")
        # A line too long is shown in pieces, ended or not: held whole, a line without its
        # end grew with each chunk. Pieces of the unended one go out while more of it
        # follows (the rest stays), so where chunks end never changes what is shown.
        cut = (len(rest) - 1) // MAX_LINE_CHARS * MAX_LINE_CHARS if rest else 0
        lines = [piece for line in ended for piece in _pieces(line)]
        if cut:
            lines += _pieces(rest[:cut])
        self.partial[name] = rest[cut:]
        for text in lines:
            if self.live:
                self.console.line(name, text.encode())
            else:
                self.tail.append((name, text))

    def _state(self, event: dict[str, Any]) -> None:
        if not self.live:
            self.latest = event
            return
        status = event.get("status")
        if status != self.status:
            self.console.note(f"status: {status}")
            self.status = str(status)
        started = event.get("started_at")
        if isinstance(started, str):
            self.console.t0 = time.monotonic() - max(0.0, time.time() - _epoch(started))
        if event.get("progress") is not None:
            self.console.event({"event": "progress", "fraction": float(event["progress"]) / 100,
                                "stage": event.get("stage"), "eta_s": event.get("eta_s"),
                                "metrics": event.get("metrics") or {},
                                "message": event.get("message")})


def _pieces(line: str) -> list[str]:
    """``line`` in pieces of at most :data:`MAX_LINE_CHARS` (an empty line is one)."""
    return [line[i:i + MAX_LINE_CHARS] for i in range(0, len(line), MAX_LINE_CHARS)] or [""]


def _epoch(text: str) -> float:
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return time.time()
