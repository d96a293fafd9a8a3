"""The fault matrix as data: one row per fault, what it does, and what is checked after.

A row names its ``group`` (the runner module ``test_<group>.py`` that stages it), the
fault in one line, the checks (:class:`Check`, run by :mod:`tests.faults.checks`) and
the parameters its runner reads. ``docs/reliability.md`` is generated from these rows
and a run of the suite (``python -m tests.faults.table``); a test keeps the two alike.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Check(enum.Enum):
    """What a row asserts once its fault is over; the value is (label, meaning)."""

    ONE_REPORT = ("one report", "the attempt's report reached the coordinator exactly once "
                                "(one receipt; one accepted /fail for a failed job)")
    NO_REPORT = ("no report", "nothing was reported for the canceled or expired job "
                              "(no receipt, no /result reached the routes)")
    NOT_RERUN = ("not rerun", "the job ran at most once per attempt the coordinator handed "
                              "out, and was handed out only as often as the row expects")
    SERVING = ("serving", "the agent still serves: a fresh job completes afterwards, no "
                          "traceback in its log")
    SLOT_FREE = ("slot free", "a second job ran and was reported while the first one's "
                              "report still waited")
    PACKAGE_STORED = ("package stored", "the coordinator holds the package, byte for byte "
                                        "the zip on the node, and the result points at it")
    PACKAGE_REFUSED_ONCE = ("too large once", "the oversized package was offered at most "
                                              "once, ended as package_too_large, and the "
                                              "result still carries manifest and hash")
    DRAIN_BUDGET = ("drain budget", "the stop signal ended the agent, exit code 0, within "
                                    "drain_timeout_s + cancel_grace_s + 5 s")
    FAILED_INVALID = ("failed invalid_job", "the job with a usable id was failed once "
                                            "through /fail with invalid_job, never run")
    SKIPPED = ("skipped", "no request, file or folder names the unusable id; nothing ran "
                          "for it")
    LOOPS_GO_ON = ("loops go on", "heartbeats and polls went on after the hostile answers")
    NO_KEY_LEAK = ("no key leak", "the other host never saw the X-Api-Key header or the "
                                  "key's value")

    @property
    def label(self) -> str:
        return str(self.value[0])

    @property
    def meaning(self) -> str:
        return str(self.value[1])


@dataclass(frozen=True)
class Row:
    """One fault and its checks; ``params`` are read by the group's runner."""

    id: str
    group: str
    fault: str
    checks: tuple[Check, ...]
    params: Mapping[str, Any] = field(default_factory=dict)


C = Check
DELIVERY = (C.ONE_REPORT, C.NOT_RERUN, C.SERVING)
SHORT_JOB = {"type": "sleep", "steps": 5, "step_s": 0.1, "print_every": 1}
MID_JOB_S = 2.0
MID_JOB = {"type": "sleep", "steps": 20, "step_s": MID_JOB_S / 20, "print_every": 1}
LONG_JOB = {"type": "sleep", "steps": 100_000, "step_s": 0.01, "print_every": 50}
BAD_ID_ANSWER = {"payload": {"type": "sleep", "steps": 1, "step_s": 0}, "constraints": {}}


def _bad_id(row_id: str, job_id: Any, what: str) -> Row:
    return Row(row_id, "hostile", f"poll answer with job id {what}",
               (C.SKIPPED, C.LOOPS_GO_ON, C.SERVING),
               {"poll": [("json", {"job_id": job_id, **BAD_ID_ANSWER})], "bad_id": job_id})


OUTAGE = (
    Row("down-before-poll", "outage", "coordinator down (connections refused) for 2 s "
        "after register, while a job waits in its queue", DELIVERY,
        {"down_at": "registered", "hold_s": 2.0, "job": SHORT_JOB}),
    Row("down-during-job", "outage", "coordinator down for 1 s while the job runs "
        "(heartbeats, progress and logs fail)", DELIVERY,
        {"down_at": "started", "hold_s": 1.0, "job": MID_JOB}),
    Row("down-during-report", "outage", "core coordinator down from mid-job until 11 s "
        "after the job finished: the report meets an outage longer than any call's "
        "deadline", DELIVERY,
        {"down_at": "started", "hold_s": 11.0, "hold_from": "completed", "job": SHORT_JOB,
         "core": True}),
    Row("down-mid-report", "outage", "coordinator goes down while /result is in flight "
        "(the connection is cut), for 3 s", DELIVERY,
        {"down_at": "result", "hold_s": 3.0, "job": SHORT_JOB}),
    Row("down-during-upload", "outage", "coordinator goes down while the package upload "
        "is in flight, for 2 s", (*DELIVERY, C.PACKAGE_STORED),
        {"down_at": "package", "hold_s": 2.0, "job": SHORT_JOB}),
    Row("down-longer-than-lease", "outage", "coordinator down 4 s, past the 2 s lease, "
        "while the finished job's report waits; back up, only its poll answers (503 for "
        "/result, heartbeat, running list) until it handed the requeued job out again",
        DELIVERY,
        {"down_at": "started", "hold_s": 4.0, "hold_from": "completed", "job": SHORT_JOB,
         "coord": {"lease_ttl_s": 2.0}, "attempts": 2, "report_after_requeue": True}),
    Row("canceled-while-down", "outage", "core coordinator: the client cancels the running "
        "job while the coordinator is down for 2 s", (C.NO_REPORT, C.NOT_RERUN, C.SERVING),
        {"down_at": "started", "hold_s": 2.0, "job": LONG_JOB, "core": True,
         "cancel": True}),
)

REPORT = (
    Row("report-5xx-slot-free", "report", "/result answers 503 for as long as a second job "
        "takes (one slot)", (*DELIVERY, C.SLOT_FREE),
        {"fault": ("set", {"status": 503, "count": 100_000}), "then": "second_job",
         "agent": {"cpu_slots": 1}}),
    Row("report-resets", "report", "/result connection reset 5 times", DELIVERY,
        {"fault": ("reset", {"count": 5})}),
    Row("report-slow-past-timeout", "report", "/result held 2 s before the coordinator "
        "reads it, past the agent's 1 s read timeout, once", DELIVERY,
        {"fault": ("set", {"status": None, "delay_s": 2.0}), "tries": 2, "settle_s": 2.5,
         "agent": {"read_timeout_s": 1}}),
    Row("report-answer-late", "report", "/result handled at once, its answer 2 s late (past "
        "the 1 s read timeout), once", DELIVERY,
        {"late_answer_s": 2.0, "tries": 1, "settle_s": 2.5, "agent": {"read_timeout_s": 1}}),
    Row("report-answer-late-core", "report", "as above, against a core coordinator, whose "
        "/result adds a receipt per call", DELIVERY,
        {"late_answer_s": 2.0, "tries": 1, "settle_s": 2.5, "core": True,
         "agent": {"read_timeout_s": 1}}),
    Row("report-expired-while-retried", "report", "core coordinator: /result answers 503, "
        "and the job expires before the coordinator recovers", (C.NO_REPORT, C.SERVING),
        {"fault": ("set", {"status": 503, "count": 100_000}), "then": "expire",
         "core": True}),
    Row("package-too-large", "report", "package above the coordinator's max_package_bytes "
        "(1 KiB): the upload gets 413", (C.ONE_REPORT, C.PACKAGE_REFUSED_ONCE, C.NOT_RERUN,
                                         C.SERVING),
        {"coord": {"max_package_bytes": 1024}}),
)

STORM = (
    Row("storm-503", "storm", "25 answers of 503 across every endpoint", DELIVERY,
        {"faults": [("set", {"status": 503, "count": 25})]}),
    Row("storm-502-html", "storm", "20 answers of 502 with an HTML body (a proxy's error "
        "page)", DELIVERY,
        {"faults": [("set", {"status": 502, "count": 20,
                             "body": b"<html><body><h1>502 Bad Gateway</h1></body></html>"})]}),
    Row("storm-429", "storm", "15 answers of 429 with Retry-After 0.2 s, every endpoint",
        DELIVERY, {"faults": [("rate_limit", {"retry_after_s": 0.2, "count": 15})]}),
    Row("storm-resets", "storm", "15 connection resets across every endpoint", DELIVERY,
        {"faults": [("reset", {"count": 15})]}),
    Row("storm-slow", "storm", "every answer 0.4 s late, 25 times", DELIVERY,
        {"faults": [("set", {"status": None, "delay_s": 0.4, "count": 25})]}),
)

CRASH = (
    Row("kill-accepted", "crash", "SIGKILL right after the journal says accepted (before "
        "the job started), then restart", DELIVERY,
        {"phase": "accepted", "status": "FAILED", "code": "agent_restart"}),
    Row("kill-running", "crash", "SIGKILL while the job runs (journal: running), then "
        "restart", DELIVERY,
        {"phase": "running", "job": LONG_JOB, "status": "FAILED", "code": "agent_restart"}),
    Row("kill-finished", "crash", "SIGKILL with the report journaled but not acknowledged "
        "(/result answers 503), then restart", DELIVERY, {"phase": "finished"}),
    Row("kill-during-upload", "crash", "SIGKILL while the package upload is in flight, then "
        "restart", (*DELIVERY, C.PACKAGE_STORED), {"phase": "upload"}),
    Row("term-report-undeliverable", "crash", "SIGTERM while /result answers 503; the "
        "report goes out after a restart", (C.DRAIN_BUDGET, *DELIVERY),
        {"phase": "finished", "signal": "TERM"}),
    Row("term-during-upload", "crash", "SIGTERM while the package upload hangs (the "
        "coordinator answers it after 20 s), then restart", (C.DRAIN_BUDGET, *DELIVERY,
                                                           C.PACKAGE_STORED),
        {"phase": "upload", "signal": "TERM", "upload_delay_s": 20.0}),
)

DISK = (
    Row("enospc-job-fills-disk", "disk", "the job fills the state dir's 8 MiB tmpfs "
        "(ENOSPC)", DELIVERY, {"mode": "job_fills", "status": "FAILED", "code": "disk_full"}),
    Row("enospc-state-dir", "disk", "the state dir's tmpfs fills up from outside while the "
        "job runs; space returns 2 s after it ends", DELIVERY,
        {"mode": "filled_outside", "status": ("COMPLETED", "FAILED")}),
)

HOSTILE = (
    Row("hostile-too-big", "hostile", "poll answer of 20 MiB (job id first), past "
        "max_answer_bytes", (C.FAILED_INVALID, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("big", "big-1", True)], "bad_id": "big-1"}),
    Row("hostile-too-big-no-id", "hostile", "poll answer of 20 MiB whose job id comes after "
        "the padding", (C.SKIPPED, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("big", "big-2", False)], "bad_id": "big-2"}),
    Row("hostile-too-deep", "hostile", "poll answer nesting 10,000 brackets",
        (C.FAILED_INVALID, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("deep", "deep-1")], "bad_id": "deep-1"}),
    Row("hostile-ttl-400-digits", "hostile", "poll answer whose lease ttl_s has 400 digits",
        (C.FAILED_INVALID, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("raw", b'{"job_id":"ttl-1","payload":{"type":"sleep","steps":1},'
                          b'"lease":{"id":"l-1","ttl_s":' + b"9" * 400 + b"}}")],
         "bad_id": "ttl-1"}),
    Row("hostile-number-1e999", "hostile", "poll answer with 1e999 (infinite) and NaN as "
        "numbers", (C.FAILED_INVALID, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("raw", b'{"job_id":"inf-1","payload":{"type":"sleep","steps":1e999,'
                          b'"step_s":NaN}}')], "bad_id": "inf-1"}),
    _bad_id("hostile-id-null", None, "null"),
    _bad_id("hostile-id-empty", "", '"" (empty)'),
    _bad_id("hostile-id-dotdot", "..", '".." (a dot segment)'),
    _bad_id("hostile-id-slash", "a/b", '"a/b" (a slash)'),
    _bad_id("hostile-id-control", "job\x1b[31m\nx", "control characters (ESC, newline)"),
    _bad_id("hostile-id-300", "a" * 300, "of 300 characters"),
    _bad_id("hostile-id-number", 12345, "a number, not a string"),
    Row("hostile-payload-wrong-type", "hostile", "poll answer whose payload is a string and "
        "constraints a list", (C.FAILED_INVALID, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("json", {"job_id": "wt-1", "payload": "sleep 1", "constraints": [1]})],
         "bad_id": "wt-1"}),
    Row("hostile-lease-wrong-type", "hostile", "poll answer whose lease id is a list",
        (C.FAILED_INVALID, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("json", {"job_id": "lw-1", **BAD_ID_ANSWER,
                            "lease": {"id": ["x"], "ttl_s": "soon"}})], "bad_id": "lw-1"}),
    Row("hostile-answer-array", "hostile", "poll answer that is a JSON array, not an object",
        (C.SKIPPED, C.LOOPS_GO_ON, C.SERVING),
        {"poll": [("json", [{"job_id": "arr-1", **BAD_ID_ANSWER}])], "bad_id": "arr-1"}),
    Row("hostile-html", "hostile", "poll answered 200 with an HTML page (a captive portal)",
        (C.LOOPS_GO_ON, C.SERVING), {"poll": [("html",)]}),
    Row("hostile-heartbeat", "hostile", "heartbeats answered with deep JSON, a 400-digit "
        "number, HTML and an array, by turns, 8 times", (*DELIVERY, C.LOOPS_GO_ON),
        {"heartbeat": [("deep", "hb"), ("huge_number",), ("html",), ("json", [1])] * 2,
         # Heartbeats keep their own timer (jobs wake none): the job outlasts 8 of them.
         "job": {"type": "sleep", "steps": 50, "step_s": 0.1, "print_every": 10}}),
    Row("hostile-running-list", "hostile", "the running-jobs list answered with HTML, deep "
        "JSON, a 400-digit number and an array, by turns, 8 times", DELIVERY,
        {"running": [("html",), ("deep", "rl"), ("huge_number",), ("json", [1])] * 2,
         "job": SHORT_JOB}),
    Row("hostile-redirect-register", "hostile", "register answered 308 to another host",
        (C.NO_KEY_LEAK, C.SERVING), {"register": [("redirect", 308)]}),
    Row("hostile-redirect-poll", "hostile", "poll answered 307 to another host, 3 times",
        (C.NO_KEY_LEAK, C.LOOPS_GO_ON, C.SERVING), {"poll": [("redirect", 307)] * 3}),
    Row("hostile-redirect-report", "hostile", "/result answered 307 to another host, once",
        (*DELIVERY, C.NO_KEY_LEAK),
        {"result": [("redirect", 307)], "job": SHORT_JOB}),
)

ROWS: tuple[Row, ...] = (*OUTAGE, *REPORT, *STORM, *CRASH, *DISK, *HOSTILE)


def rows_of(group: str) -> list[Any]:
    """The group's rows as pytest params, each with its row id as the test id."""
    import pytest  # here, so the table generator can import the rows without pytest

    return [pytest.param(r, id=r.id) for r in ROWS if r.group == group]
