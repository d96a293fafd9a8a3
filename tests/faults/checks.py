"""The checks every row ends with, one function per :class:`~tests.faults.rows.Check`.

:func:`verify` runs all of a row's checks and fails with every broken one named, so
the generated table says what broke, not only the first thing.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable

from tests.agent.daemon.helpers import MINER_KEY, wait_until
from tests.faults.hostile import MINER
from tests.faults.rig import MINER_ID, QUICK_JOB, TERMINAL, Rig
from tests.faults.rows import Check, Row

SETTLE_S = 0.3  # after the report lands: time for a duplicate to land too


def verify(rig: Rig, row: Row) -> None:
    """Run the row's checks in order; raise one AssertionError naming each that failed."""
    broken = []
    for check in row.checks:
        try:
            CHECKS[check](rig, row)
        except AssertionError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "failed"
            broken.append(f"{check.label}: {first}")
    assert not broken, "; ".join(broken)


def _wanted(row: Row) -> tuple[str, ...]:
    status = row.params.get("status", "COMPLETED")
    return (status,) if isinstance(status, str) else tuple(status)


def one_report(rig: Rig, row: Row) -> None:
    if rig.hostile is not None:
        _wait_hostile_exit(rig)
        accepted = rig.hostile.reports(rig.job_id, "result")
        tried = rig.hostile.requests(MINER + rig.job_id + "/result")
        assert len(accepted) == 1, (f"{len(accepted)} accepted /result for {rig.job_id} "
                                    f"({len(tried)} tried, answered "
                                    f"{[s.status for s in tried]})")
        return
    job = rig.wait_state(rig.job_id, TERMINAL)
    time.sleep(row.params.get("settle_s", SETTLE_S))  # a late duplicate lands meanwhile
    job = rig.job(rig.job_id)
    receipts = rig.ref.store.receipts(rig.job_id)
    fails = rig.ref.faults.answered(rig.path(rig.job_id, "fail"))
    assert job["state"] in _wanted(row), (f"job ended {job['state']} "
                                          f"({job.get('error_code')}), not {_wanted(row)}")
    if job["state"] == "COMPLETED":
        assert len(receipts) == 1, f"{len(receipts)} receipts"
    else:
        assert fails == 1 and not receipts, f"{fails} /fail and {len(receipts)} receipts"
        code = row.params.get("code")
        assert code is None or job["error_code"] == code, \
            f"failed with {job['error_code']}, not {code}"


def no_report(rig: Rig, row: Row) -> None:
    job = rig.wait_state(rig.job_id, TERMINAL)
    time.sleep(2 * SETTLE_S)
    receipts = rig.ref.store.receipts(rig.job_id)
    results = rig.ref.faults.answered(rig.path(rig.job_id, "result"))
    job = rig.job(rig.job_id)
    assert job["state"] in ("CANCELED", "EXPIRED") and not receipts and not results, \
        f"job is {job['state']}; {results} /result reached it, {len(receipts)} receipts"


def not_rerun(rig: Rig, row: Row) -> None:
    runs = rig.runs(rig.job_id)
    if rig.hostile is not None:
        assert runs <= 1, f"ran {runs} times"
        return
    attempts = rig.job(rig.job_id)["attempts"]
    expected = row.params.get("attempts", 1)
    ignored = rig.log().count(f"job {rig.job_id}: handed out twice")
    assert runs <= attempts and attempts == expected, \
        f"ran {runs} times over {attempts} attempts (expected {expected}); the agent " \
        f"ignored {ignored} hand-out(s) of it as repeats"


def serving(rig: Rig, row: Row) -> None:
    if rig.hostile is not None:
        code = _wait_hostile_exit(rig)
        done = rig.hostile.reports(rig.fresh_id, "result")
        assert len(done) == 1 and code == 0, \
            f"fresh job reported {len(done)} times; exit code {code}"
    else:
        agent = rig.agents[-1]
        assert agent.proc.poll() is None, f"the agent exited with {agent.proc.returncode}"
        rig.fresh_id = rig.ref.store.submit(QUICK_JOB, {}, 900.0)
        rig.wait_state(rig.fresh_id, TERMINAL)
        time.sleep(SETTLE_S)
        job = rig.job(rig.fresh_id)
        receipts = rig.ref.store.receipts(rig.fresh_id)
        assert job["state"] == "COMPLETED" and len(receipts) == 1, \
            f"fresh job {job['state']} ({job.get('error_code')}), {len(receipts)} receipts"
    assert "Traceback" not in rig.log(), "a traceback in the agent's log"


def slot_free(rig: Rig, row: Row) -> None:
    assert rig.facts.get("slot_free") is True, \
        f"while the first report waited: {rig.facts.get('second')}"


def package_stored(rig: Rig, row: Row) -> None:
    rig.wait_state(rig.job_id, TERMINAL)
    zip_path = rig.state / "jobs" / f"job_{rig.job_id}.zip"
    stored = rig.ref.store.package_data(rig.job_id)
    assert stored is not None, "the coordinator holds no package"
    assert zip_path.is_file() and stored == zip_path.read_bytes(), \
        "the stored package is not the node's zip"
    location = str(((rig.job(rig.job_id)["result"] or {}).get("package") or {})
                   .get("location"))
    assert "/package" in location, f"the result points at {location}"


def package_refused_once(rig: Rig, row: Row) -> None:
    job = rig.wait_state(rig.job_id, TERMINAL)
    offers = rig.ref.faults.arrived(rig.path(rig.job_id, "package"))
    assert offers <= 1, f"the package was offered {offers} times"
    assert "package_too_large" in rig.log() + str(job.get("result")), \
        "package_too_large is in neither the log nor the result"
    package = (job.get("result") or {}).get("package") or {}
    assert package.get("manifest") and package.get("result_hash"), \
        f"the result's package block lacks manifest or hash: {sorted(package)}"


def drain_budget(rig: Rig, row: Row) -> None:
    code, took, budget = rig.facts["stop"]
    assert code == 0 and took <= budget, \
        f"exit code {code} after {took:.1f} s (budget {budget:.0f} s)"


def failed_invalid(rig: Rig, row: Row) -> None:
    assert rig.hostile is not None
    _wait_hostile_exit(rig)
    bad = row.params["bad_id"]
    fails = rig.hostile.reports(bad, "fail")
    results = rig.hostile.requests(MINER + bad + "/result")
    assert [f.get("error_code") for f in fails] == ["invalid_job"] and not results, \
        f"/fail codes {[f.get('error_code') for f in fails]}, {len(results)} /result"
    assert rig.runs(bad) == 0, f"ran {rig.runs(bad)} times"


def skipped(rig: Rig, row: Row) -> None:
    assert rig.hostile is not None
    _wait_hostile_exit(rig)
    good = {rig.job_id, rig.fresh_id} - {""}
    ours = {MINER + p for p in ("register", "heartbeat", "poll", MINER_ID, MINER_ID + "/jobs")}
    odd = [s.path for s in rig.hostile.requests()
           if s.path.split("?")[0] not in ours
           and not any(s.path.startswith(f"{MINER}{g}/") for g in good)]
    assert not odd, f"requests named something else: {odd[:3]}"
    names = {f"job_{g}" for g in good} | {f"job_{g}.zip" for g in good} \
        | {f"job_{g}.zip.sha256" for g in good}
    jobs = rig.state / "jobs"
    extra = sorted(p.name for p in jobs.iterdir() if p.name not in names) if jobs.is_dir() \
        else []
    assert not extra, f"unexpected entries in jobs/: {extra}"


def loops_go_on(rig: Rig, row: Row) -> None:
    assert rig.hostile is not None
    _wait_hostile_exit(rig)
    seen = rig.hostile.requests()
    last = max((i for i, s in enumerate(seen) if s.hostile), default=-1)
    after = {s.path.split("?")[0] for s in seen[last + 1:]}
    missing = {MINER + "heartbeat", MINER + "poll"} - after
    assert last >= 0 and not missing, \
        f"no {sorted(missing)} after the last hostile answer (#{last} of {len(seen)})"


def no_key_leak(rig: Rig, row: Row) -> None:
    assert rig.witness is not None
    _wait_hostile_exit(rig)
    for seen in rig.witness.requests():
        headers = {k.lower(): v for k, v in seen.headers.items()}
        assert "x-api-key" not in headers, f"X-Api-Key sent to {seen.path}"
        assert MINER_KEY not in f"{seen.path} {headers} {seen.body!r}", \
            f"the key's value sent to {seen.path}"


def _wait_hostile_exit(rig: Rig) -> int | None:
    """Once the fresh job is reported (or 30 s passed), SIGTERM a hostile row's agent;
    its exit code (None: it did not stop in time, and was killed)."""
    if "exit" not in rig.facts:
        assert rig.hostile is not None
        hostile, agent = rig.hostile, rig.agents[-1]
        with contextlib.suppress(AssertionError):
            wait_until(lambda: bool(hostile.reports(rig.fresh_id, "result"))
                       or agent.proc.poll() is not None, 30)
        time.sleep(SETTLE_S)
        if agent.proc.poll() is None:
            agent.signal(signal.SIGTERM)
        try:
            rig.facts["exit"] = agent.wait(30)
        except AssertionError:
            rig.facts["exit"] = None
    code = rig.facts["exit"]
    return code if isinstance(code, int) else None


CHECKS: dict[Check, Callable[[Rig, Row], None]] = {
    Check.ONE_REPORT: one_report, Check.NO_REPORT: no_report, Check.NOT_RERUN: not_rerun,
    Check.SERVING: serving, Check.SLOT_FREE: slot_free,
    Check.PACKAGE_STORED: package_stored, Check.PACKAGE_REFUSED_ONCE: package_refused_once,
    Check.DRAIN_BUDGET: drain_budget, Check.FAILED_INVALID: failed_invalid,
    Check.SKIPPED: skipped, Check.LOOPS_GO_ON: loops_go_on, Check.NO_KEY_LEAK: no_key_leak,
}
