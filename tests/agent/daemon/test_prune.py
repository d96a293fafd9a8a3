"""Retention: done jobs' packages pruned by age and total size, clock-jump safe; the
journal keeps the record of a pruned package."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import journal as journal_mod
from agent.daemon.journal import Journal, Phase
from agent.daemon.lifecycle import PRUNE_INTERVAL_S
from agent.daemon.retention import MIB, SUPERSEDED_DIR, Retention
from agent.layout import job_folder, package_paths
from tests.agent.daemon.helpers import make_agent

DAY = 86400.0
KEEP_S = 14 * DAY
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    job_json    TEXT NOT NULL,
    lease_id    TEXT,
    phase       TEXT NOT NULL,
    outcome     TEXT,
    report_json TEXT,
    package_dir TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS log_offsets (
    job_id  TEXT NOT NULL,
    stream  TEXT NOT NULL,
    shipped INTEGER NOT NULL,
    PRIMARY KEY (job_id, stream)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class FakeClock:
    """The journal's clocks: wall and monotonic, moved together or apart by the test."""

    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.mono = 5_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(journal_mod, "time", fake)  # the journal's clocks only
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("this-boot\n")
    monkeypatch.setattr(journal_mod, "BOOT_ID_PATH", boot_id)
    return fake


@pytest.fixture
def journal(tmp_path: Path, clock: FakeClock) -> Any:
    j = Journal(tmp_path / "state" / "journal.db")
    yield j
    j.close()


def write_package(root: Path, job_id: str, size: int) -> tuple[Path, Path, Path]:
    """A package on disk as the executor leaves it: folder, zip and the zip's sidecar."""
    paths = package_paths(job_folder(root, job_id))
    folder, zip_path, side = paths
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "stdout.log").write_bytes(os.urandom(size))
    zip_path.write_bytes(os.urandom(4096))
    side.write_text(f"{'ab' * 32}  {zip_path.name}\n")
    return paths


def report_of(job_id: str) -> dict[str, Any]:
    package = {"result_hash": f"sha256:{job_id}-result", "zip_sha256": f"{job_id}-zip"}
    return {"kind": "result", "body": {"result": {"status": "completed", "package": package},
                                       "metrics": {"package": package}}}


def run_job(journal: Journal, job_id: str, phase: Phase = Phase.REPORTED) -> None:
    journal.accept(job_id, {"job_id": job_id, "payload": {"type": "sleep"}}, f"lease-{job_id}")
    journal.set_phase(job_id, Phase.RUNNING)
    if phase is not Phase.RUNNING:
        journal.set_phase(job_id, Phase.FINISHED, outcome="completed", report=report_of(job_id))
    if phase not in (Phase.RUNNING, Phase.FINISHED):
        journal.set_phase(job_id, phase)


def exists(paths: tuple[Path, ...]) -> bool:
    return all(p.exists() for p in paths)


def gone(paths: tuple[Path, ...]) -> bool:
    return not any(p.exists() for p in paths)


def test_the_size_cap_prunes_the_oldest_reported_first_and_keeps_unreported(
        tmp_path: Path, journal: Journal, clock: FakeClock) -> None:
    # Given four done packages of about 1 MiB, reported a minute apart, and two of jobs
    # not reported yet (running, finished), bigger than the cap on their own
    root = tmp_path / "jobs"
    done = {}
    for job_id, phase in (("a", Phase.REPORTED), ("b", Phase.DROPPED),
                          ("c", Phase.REJECTED), ("d", Phase.REPORTED)):
        done[job_id] = write_package(root, job_id, MIB)
        run_job(journal, job_id, phase)
        clock.advance(60)
    running = write_package(root, "r", 2 * MIB)
    run_job(journal, "r", Phase.RUNNING)
    finished = write_package(root, "f", 2 * MIB)
    run_job(journal, "f", Phase.FINISHED)
    # When a pass runs under a cap that holds two of the done packages
    Retention(journal, root, keep_s=KEEP_S, max_bytes=int(2.5 * MIB)).prune()
    # Then the two oldest done ones are gone, the two newest kept, unreported ones untouched
    assert gone(done["a"]) and gone(done["b"])
    assert exists(done["c"]) and exists(done["d"])
    assert exists(running) and exists(finished)
    assert journal.pruned_at("a") is not None and journal.pruned_at("b") is not None
    assert journal.pruned_at("c") is None and journal.pruned_at("f") is None


def test_a_pruned_package_keeps_its_journal_row_with_outcome_and_hashes(
        tmp_path: Path, journal: Journal, clock: FakeClock) -> None:
    root = tmp_path / "jobs"
    paths = write_package(root, "j1", 4096)
    run_job(journal, "j1")
    journal.set_shipped("j1", "stdout", 4096)
    # When the package outlives keep_packages_days
    clock.advance(KEEP_S + 1)
    Retention(journal, root, keep_s=KEEP_S, max_bytes=0).prune()
    # Then its files are gone, and its row stays: outcome, report and hashes
    assert gone(paths)
    record = journal.get("j1")
    assert record is not None and record.phase is Phase.REPORTED
    assert record.outcome == "completed" and record.report == report_of("j1")
    assert record.job == {"job_id": "j1"}  # the payload shrinks to the id
    assert journal.shipped("j1", "stdout") == 0  # its log offsets go
    # And the row itself goes ten times keep_packages_days after the job's last update
    clock.advance(8 * KEEP_S)
    Retention(journal, root, keep_s=KEEP_S, max_bytes=0).prune()
    assert journal.get("j1") is not None
    clock.advance(KEEP_S)
    Retention(journal, root, keep_s=KEEP_S, max_bytes=0).prune()
    assert journal.get("j1") is None


def test_a_wall_clock_jumped_forward_does_not_prune_this_boots_packages(
        tmp_path: Path, journal: Journal, clock: FakeClock) -> None:
    root = tmp_path / "jobs"
    paths = write_package(root, "j1", 4096)
    run_job(journal, "j1")
    retention = Retention(journal, root, keep_s=KEEP_S, max_bytes=0)
    # When the wall clock jumps a month ahead while only a minute passes
    clock.wall += 30 * DAY
    clock.mono += 60
    retention.prune()
    # Then the package is kept: in this boot, ages come from the monotonic clock
    assert exists(paths) and journal.pruned_at("j1") is None
    # And it goes once keep_packages_days has really passed
    clock.mono += KEEP_S
    retention.prune()
    assert gone(paths) and journal.pruned_at("j1") is not None


def test_a_record_from_another_boot_ages_by_the_wall_clock(
        tmp_path: Path, journal: Journal, clock: FakeClock) -> None:
    # Given two rows the previous boot wrote (its monotonic times mean nothing now), one
    # of them stamped in the future: the wall clock has been set back since
    root = tmp_path / "jobs"
    old, ahead = write_package(root, "old", 4096), write_package(root, "ahead", 4096)
    run_job(journal, "old")
    run_job(journal, "ahead")
    with sqlite3.connect(journal.path) as db:
        db.execute("UPDATE jobs SET boot_id = 'previous-boot', updated_mono = 1e12")
        db.execute("UPDATE jobs SET updated_at = ? WHERE job_id = 'ahead'",
                   (clock.wall + 365 * DAY,))
    db.close()
    retention = Retention(journal, root, keep_s=KEEP_S, max_bytes=0)
    # When keep_packages_days passes by the wall clock (the monotonic one stands still)
    clock.wall += KEEP_S + 1
    retention.prune()
    # Then the old row's package goes; the one from the future is not kept for a year:
    # it ages from now, by this boot's monotonic clock
    assert gone(old) and exists(ahead)
    clock.mono += KEEP_S + 1
    retention.prune()
    assert gone(ahead)


def test_superseded_attempts_count_toward_the_cap_and_go_with_their_job(
        tmp_path: Path, journal: Journal, clock: FakeClock) -> None:
    root = tmp_path / "jobs"

    def set_aside(job_id: str, size: int) -> Path:
        aside = root / SUPERSEDED_DIR / f"job_{job_id}-{int(clock.wall * 1000)}"
        for path in write_package(aside, job_id, size):
            assert path.exists()
        return aside

    # Given a requeued job whose earlier attempt was set aside before any other package
    early = set_aside("x", MIB)
    clock.advance(60)
    run_job(journal, "x")
    x_now = write_package(root, "x", 4096)
    # and a later attempt of another job, then two done packages
    late = set_aside("y", 4096)
    run_job(journal, "y", Phase.RUNNING)
    clock.advance(60)
    newer = {}
    for job_id in ("n1", "n2"):
        newer[job_id] = write_package(root, job_id, MIB)
        run_job(journal, job_id)
        clock.advance(60)
    # When the kept packages pass the cap
    retention = Retention(journal, root, keep_s=KEEP_S, max_bytes=int(2.5 * MIB))
    retention.prune()
    # Then the oldest, the superseded attempt, goes first; the rest fit
    assert not early.exists()
    assert exists(x_now) and exists(newer["n1"]) and exists(newer["n2"]) and late.exists()
    # And once job y is done and ages out, its earlier attempt goes with its package
    journal.set_phase("y", Phase.REPORTED)
    clock.advance(KEEP_S + 1)
    retention.prune()
    assert not late.exists() and not any((root / SUPERSEDED_DIR).iterdir())


def test_the_migration_upgrades_an_old_journal_and_keeps_its_rows(
        tmp_path: Path, clock: FakeClock) -> None:
    # Given a journal an older agent wrote, with a reported job
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO jobs VALUES ('old', '{\"job_id\": \"old\"}', 'l1', 'reported', "
               "'completed', ?, NULL, ?, ?)",
               ('{"kind": "result", "body": {}}', clock.wall - DAY, clock.wall - DAY))
    db.execute("INSERT INTO log_offsets VALUES ('old', 'stdout', 12)")
    db.commit()
    db.close()
    # When this agent opens it, twice (the migration is idempotent)
    Journal(path).close()
    journal = Journal(path)
    # Then the new columns exist and the old row reads as before
    with sqlite3.connect(path) as check:
        columns = {row[1] for row in check.execute("PRAGMA table_info(jobs)")}
    check.close()
    assert {"pruned_at", "updated_mono", "boot_id", "package_bytes"} <= columns
    record = journal.get("old")
    assert record is not None and record.phase is Phase.REPORTED
    assert record.outcome == "completed" and journal.shipped("old", "stdout") == 12
    # and it ages by the wall clock (no boot recorded): kept now, pruned past the limit
    assert journal.expired(KEEP_S) == []
    clock.wall += KEEP_S
    assert journal.expired(KEEP_S) == ["old"]
    journal.close()


def test_the_hourly_prune_runs_off_the_event_loop(tmp_path: Path) -> None:
    # Given an agent whose work folder holds a scratch no job holds, of 80,000 names
    # (a job of a dead agent's; hard links: many names, made fast, each one to unlink)
    agent = make_agent(tmp_path)
    orphan = tmp_path / "state" / "work" / "gone-job"
    for d in range(8):
        (orphan / f"d{d}").mkdir(parents=True)
        (orphan / f"d{d}" / "one").touch()
        for i in range(10000):
            os.link(orphan / f"d{d}" / "one", orphan / f"d{d}" / str(i))

    async def tick() -> float:
        # When the hour's prune comes due on the agent's tick
        agent._last_prune -= 2 * PRUNE_INTERVAL_S
        worst, start = 0.0, time.perf_counter()
        agent.on_tick()
        worst = time.perf_counter() - start
        while orphan.exists():
            tick = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - tick)
        await agent.shutdown()
        return worst

    # Then the scratch goes while the loop keeps ticking
    worst = asyncio.run(tick())
    assert not orphan.exists()
    # (0.81 s in one stall here when it ran on the loop)
    assert worst < 0.2, worst
