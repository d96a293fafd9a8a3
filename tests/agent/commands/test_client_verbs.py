"""The client verbs of the seed guide through the real CLI: list, watch, logs, download,
export, stats, delete, retry, cancel --force and status --json.

One reference coordinator and one agent daemon (a subprocess) serve the module, as in
test_client.py; each test runs `python -m agent VERB ...` as a user would and checks what
it prints and how it exits (README's exit-code table). The last test does the same
against the embedded coordinator of `miner-agent run`, with no --coordinator.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.cli import run_command
from agent.commands.follow import MAX_LINE_CHARS
from agent.commands.history import CSV_COLUMNS, csv_row
from agent.errors import ExitCode
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import (
    CLIENT_KEY,
    FAST,
    AgentProcess,
    Client,
    start_coordinator,
    tmpfs,
    wait_until,
)

CLI = [sys.executable, "-m", "agent"]
VERBS = ("list", "watch", "logs", "download", "export", "stats", "delete", "retry", "cancel",
         "status")
STEPS = {"type": "sleep", "steps": 8, "step_s": 0.1, "print_every": 1}
MIXED = {"type": "command", "argv": ["sh", "-c", "echo out1; echo err1 >&2; sleep 0.3; "
                                     "echo out2"]}
LONG = {"type": "sleep", "steps": 100000, "step_s": 0.01}

pytestmark = pytest.mark.slow


class Node:
    """The module's coordinator and agent, and the CLI aimed at them."""

    def __init__(self, coord: ReferenceCoordinator, home: Path) -> None:
        self.coord, self.home = coord, home
        self.client = Client(coord)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
        env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(self.home)})
        return env

    def argv(self, *argv: str) -> list[str]:
        return [*CLI, *argv, "--coordinator", self.coord.base_url, "--client-key", CLIENT_KEY]

    def cli(self, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=90,
                              env=self.env(), cwd=cwd or self.home)

    def done(self, payload: dict[str, Any]) -> str:
        job_id = self.client.submit(payload)
        self.client.wait_status(job_id, "completed", "failed", "canceled")
        return job_id


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("verbs")
    coord = start_coordinator(tmp / "coord")
    agent = AgentProcess(coord.base_url, tmp / "agent", allowed_job_types="sleep,command",
                         cpu_slots="4")
    (tmp / "home").mkdir()
    try:
        agent.wait_log("registered as")
        yield Node(coord, tmp / "home")
    finally:
        Client.close_all()
        agent.stop()
        coord.stop()


def test_every_verb_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in VERBS:
        with pytest.raises(SystemExit) as exc:
            run_command([verb, "--help"])
        assert exc.value.code == 0
        assert "--coordinator" in capsys.readouterr().out, verb


def test_watch_follows_a_job_to_the_end(node: Node) -> None:
    job_id = node.client.submit({**STEPS, "step_s": 0.3})  # outlasts the CLI's start
    proc = node.cli("watch", job_id)
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert proc.stdout.startswith(f"{job_id}: completed 100%")
    assert f"[{job_id}] status: running" in proc.stderr
    assert "step 8/8" in proc.stderr and "100.0%" in proc.stderr
    # The live part came pushed over the WebSocket: the events endpoint was asked only
    # for the catch-up, not once per change as a long-poll would be
    assert node.coord.faults.arrived(f"/v1/jobs/{job_id}/events") <= 2
    # A failed job: watch exits 1, as exec does; --json gives one event a line
    failed = node.client.submit({**STEPS, "fail_at": 2})
    out = node.cli("watch", failed, "--json")
    assert out.returncode == ExitCode.FAILED, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[-1]["type"] == "state" and events[-1]["status"] == "failed"
    assert events[-1]["error"]["code"] == "runtime_error"


def test_logs_prints_each_stream_and_follows_live(node: Node) -> None:
    job_id = node.client.submit(MIXED)
    # -f while it runs: everything, up to its end
    followed = node.cli("logs", job_id, "-f")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "out1\nout2\n" and followed.stderr == "err1\n"
    node.client.wait_status(job_id, "completed")
    assert node.cli("logs", job_id).stdout == "out1\nout2\n"
    only = node.cli("logs", "--job-id", job_id, "--stream", "stderr")
    assert only.stdout == "err1\n" and only.stderr == ""


def test_a_log_larger_than_a_page_and_a_line_without_end(node: Node) -> None:
    # Given a job that printed 20 MiB on one line (held whole, `watch` copied all of it
    # again for each chunk that came, and `logs` held the log in memory more than twice)
    job_id = node.done({"type": "command", "argv": [
        "sh", "-c", "head -c 20971520 /dev/zero | tr '\\0' a; echo; echo end"]})
    # Then `logs` prints it exactly, read from the coordinator a page at a time
    before = node.coord.faults.arrived(f"/v1/jobs/{job_id}/logs")
    proc = subprocess.run(node.argv("logs", job_id, "--stream", "stdout"), capture_output=True,
                          timeout=90, env=node.env(), cwd=node.home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"a" * (20 << 20) + b"\nend\n"
    assert node.coord.faults.arrived(f"/v1/jobs/{job_id}/logs") - before >= 5
    # And `watch` shows the line in pieces of at most MAX_LINE_CHARS, none of it lost
    watched = node.cli("watch", job_id, "--tail", "1000")
    assert watched.returncode == ExitCode.OK, watched.stderr[-2000:]
    lines = watched.stderr.splitlines()
    pieces = [line for line in lines if line.startswith("a")]
    assert max(len(line) for line in lines) <= MAX_LINE_CHARS
    assert len(pieces) == 320 and "".join(pieces) == "a" * (20 << 20)
    assert lines[max(i for i, line in enumerate(lines) if line.startswith("a")) + 1] == "end"


def test_status_json_carries_the_guides_fields(node: Node) -> None:
    job_id = node.done(STEPS)
    view = json.loads(node.cli("status", job_id, "--json").stdout)
    assert view["status"] == "completed" and view["progress"] == 100
    for key in ("created_at", "started_at", "finished_at"):
        assert dt.datetime.fromisoformat(view[key]).tzinfo is not None, key
    assert view["error"] is None
    assert len(view["package"]["sha256"]) == 64 and view["package"]["size"] > 0
    failed = json.loads(node.cli("status", node.done({**STEPS, "fail_at": 1}), "--json").stdout)
    assert failed["error"]["code"] == "runtime_error" and failed["error"]["message"]


def test_download_checks_the_package_and_says_which_file_is_wrong(node: Node,
                                                                  tmp_path: Path) -> None:
    job_id = node.done(STEPS)
    proc = node.cli("download", job_id, "--out", str(tmp_path), "--extract")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    zip_path = tmp_path / f"job_{job_id}.zip"
    sha = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    assert proc.stdout.startswith(f"OK {zip_path}") and sha in proc.stdout
    assert (tmp_path / f"job_{job_id}.zip.sha256").read_text() == f"{sha}  {zip_path.name}\n"
    assert (tmp_path / f"job_{job_id}" / "result.txt").read_text() == "8 of 8 steps\n"
    # Given a package changed at rest on the coordinator (its sha256 recomputed)
    tampered = _changed(zip_path.read_bytes(), "result.txt")
    node.coord.store.put_package(job_id, hashlib.sha256(tampered).hexdigest(), tampered)
    # Then download names the file, extracted or not, and exits 8
    for extra in ((), ("--extract",)):
        bad = node.cli("download", job_id, "--out", str(tmp_path / "bad"), *extra)
        assert bad.returncode == ExitCode.VERIFY_FAILED, bad.stdout + bad.stderr
        assert "FAIL result.txt: checksum mismatch" in bad.stdout
    missing = node.cli("download", "no-such-job", "--out", str(tmp_path))
    assert missing.returncode == ExitCode.NOT_FOUND


def test_a_package_that_unpacks_past_the_disk_is_kept_zipped(node: Node,
                                                              tmp_path: Path) -> None:
    # Given a package a miner made to unpack to 600 MiB (zeros: under 1 MiB zipped) and
    # a download folder on a disk of 512 MiB (unpacked, it filled the disk)
    job_id = node.done(STEPS)
    node.cli("download", job_id, "--out", str(tmp_path / "first"))
    plain = (tmp_path / "first" / f"job_{job_id}.zip").read_bytes()
    bomb = _with_member(plain, "artifacts/zeros", 600 << 20)
    node.coord.store.put_package(job_id, hashlib.sha256(bomb).hexdigest(), bomb)
    with tmpfs(tmp_path / "small", 512) as small:
        # When it is downloaded with --extract
        proc = node.cli("download", job_id, "--out", str(small), "--extract")
        # Then the zip is kept and checked, nothing is unpacked, and it says why (exit 12)
        assert proc.returncode == ExitCode.REFUSED, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"OK {small / f'job_{job_id}.zip'}")
        assert "not unpacked: it unpacks to 0.6 GiB" in proc.stderr
        assert sorted(p.name for p in small.iterdir()) == [f"job_{job_id}.zip",
                                                           f"job_{job_id}.zip.sha256"]


def _with_member(data: bytes, name: str, zeros: int) -> bytes:
    """The package ``data`` with one more file of ``zeros`` zero bytes, deflated, listed
    in its output.json and output.sha256 so that it checks out."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        top = src.namelist()[0].split("/", 1)[0]
        digest = hashlib.sha256(b"\0" * zeros).hexdigest()
        output = json.loads(src.read(f"{top}/output.json"))
        output["files"].append({"path": name, "size": zeros, "sha256": digest})
        body = json.dumps(output).encode()
        sums = [f"{hashlib.sha256(body).hexdigest()}  output.json\n"]
        sums += [line + "\n" for line in src.read(f"{top}/output.sha256").decode()
                 .splitlines()[1:]]
        sums.append(f"{digest}  {name}\n")
        for item in src.infolist():
            if item.filename.endswith(("/output.json", "/output.sha256")):
                continue
            dst.writestr(item, src.read(item))
        dst.writestr(f"{top}/output.json", body)
        dst.writestr(f"{top}/output.sha256", "".join(sums))
        with dst.open(f"{top}/{name}", "w", force_zip64=True) as fh:
            chunk = b"\0" * (1 << 20)
            for _ in range(zeros >> 20):
                fh.write(chunk)
    return out.getvalue()


def _changed(data: bytes, name: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            dst.writestr(item, b"changed\n" if item.filename.endswith("/" + name) else body)
    return out.getvalue()


def test_list_export_and_stats_over_a_window(node: Node, tmp_path: Path) -> None:
    # Given three jobs since T0: two completed, one failed
    t0 = dt.datetime.now(dt.UTC).isoformat()
    ok1, ok2 = node.done(STEPS), node.done({**STEPS, "steps": 2})
    bad = node.done({**STEPS, "fail_at": 1})
    page = json.loads(node.cli("list", "--since", t0, "--json").stdout)
    assert [j["job_id"] for j in page["jobs"]] == [bad, ok2, ok1] and page["total"] == 3
    one = node.cli("list", "--from", t0, "--limit", "1")
    assert bad in one.stdout and ok1 not in one.stdout
    assert "1 of 3 job(s) shown, newest first; --offset 1 for more" in one.stderr
    failed = node.cli("list", "--since", t0, "--status", "failed").stdout
    assert bad in failed and ok1 not in failed
    assert json.loads(node.cli("list", "--days", "1", "--json").stdout)["total"] >= 3
    assert node.cli("list", "--since", "whenever").returncode == ExitCode.USAGE
    # export: every job in the window, CSV or JSON
    out = tmp_path / "jobs.csv"
    assert node.cli("export", "--since", t0, "--format", "csv", "--output", str(out)) \
        .returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["job_id"] for r in rows] == [bad, ok2, ok1]
    assert rows[0]["error_code"] == "runtime_error" and float(rows[2]["gpu_seconds"]) > 0
    exported = json.loads(node.cli("export", "--since", t0).stdout)
    assert [j["job_id"] for j in exported] == [bad, ok2, ok1]
    # stats: counts, success rate, durations and GPU-seconds, by type
    stats = json.loads(node.cli("stats", "--since", t0, "--json").stdout)
    assert stats["total"] == 3 and stats["by_status"] == {"completed": 2, "failed": 1}
    assert stats["success_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert stats["duration_s"]["count"] == 3 and stats["duration_s"]["p95"] > 0
    assert stats["gpu_seconds"] > 0 and list(stats["by_type"]) == ["sleep"]
    assert "success 66.7%" in node.cli("stats", "--since", t0).stdout


def test_an_exported_csv_opens_a_jobs_words_as_text_never_as_a_formula() -> None:
    # Given a job whose error message, and a miner whose id, a spreadsheet would run
    job = {"job_id": "j1", "status": "failed", "payload": {"type": "+cmd"},
           "miner_id": "@SUM(A1:A9)", "progress": -1.5,
           "error": {"code": "-bad", "message": '=HYPERLINK("http://x.example","open")'}}
    # When it is written as a CSV row and read back
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerow(csv_row(job))
    [row] = list(csv.DictReader(io.StringIO(buf.getvalue())))
    # Then each such cell starts with a quote (text), and numbers are left as they are
    assert row["error_message"] == \
        """'=HYPERLINK("http://x.example","open")"""
    assert row["miner_id"] == "'@SUM(A1:A9)" and row["error_code"] == "'-bad"
    assert row["type"] == "'+cmd" and row["progress"] == "-1.5"
    assert row["job_id"] == "j1" and row["status"] == "failed"


def test_delete_cancel_force_and_retry(node: Node) -> None:
    # Given a running job
    job_id = node.client.submit(LONG)
    node.client.wait_status(job_id, "running")
    # Then delete is refused while it runs, with what to do instead
    refused = node.cli("delete", job_id)
    assert refused.returncode == ExitCode.REFUSED
    assert f"miner-agent cancel {job_id}" in refused.stderr
    # cancel asks; --force ends it at once, without waiting for the agent
    assert node.cli("cancel", job_id).stdout.strip() == f"{job_id}: canceling"
    assert node.cli("cancel", job_id, "--force").stdout.strip() == f"{job_id}: canceled"
    # Once ended, delete removes it: status and download then find nothing (11)
    assert node.cli("delete", job_id, "--json").returncode == 0
    assert node.cli("status", job_id).returncode == ExitCode.NOT_FOUND
    assert node.cli("download", job_id).returncode == ExitCode.NOT_FOUND
    # retry: a new job with the same payload, followed to its end
    original = node.done(STEPS)
    again = node.cli("retry", original, "--wait")
    assert again.returncode == 0, again.stderr
    new_id = again.stdout.splitlines()[0]
    assert new_id != original and node.client.job(new_id)["payload"] == STEPS
    # --resume: only a canceled or failed training job, else refused with the reason
    no = node.cli("retry", original, "--resume")
    assert no.returncode == ExitCode.REFUSED and "no checkpoints" in no.stderr


def test_unreachable_and_unknown_exit_10_and_11(node: Node) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = subprocess.run([*CLI, "list", "--coordinator", f"http://127.0.0.1:{port}",
                           "--client-key", "k"], capture_output=True, text=True, timeout=30,
                          env=node.env())
    assert gone.returncode == ExitCode.UNAVAILABLE and "Traceback" not in gone.stderr
    for verb in ("watch", "logs", "delete", "retry"):
        assert node.cli(verb, "no-such-job").returncode == ExitCode.NOT_FOUND, verb
    assert node.cli("status").returncode == ExitCode.USAGE


def test_the_verbs_find_the_embedded_coordinator(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"MINER_AGENT_" + k.upper(): v for k, v in FAST.items()})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_STATE_DIR": str(state),
                "MINER_AGENT_CACHE_DIR": str(state / "cache"),
                "MINER_AGENT_EMBEDDED_PORT": port})

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=90,
                              env=env, cwd=tmp_path)

    log = tmp_path / "agent.log"
    with open(log, "wb") as fh:
        agent = subprocess.Popen([*CLI, "run"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "registered as" in log.read_text(), 60, log.read_text)
        (tmp_path / "job.json").write_text(json.dumps({"payload": STEPS}))
        job_id = cli("submit", str(tmp_path / "job.json")).stdout.strip()
        assert cli("watch", job_id).returncode == 0
        assert "step 8/8" in cli("logs", job_id).stdout
        assert json.loads(cli("list", "--json").stdout)["total"] == 1
        assert json.loads(cli("stats", "--json").stdout)["by_status"] == {"completed": 1}
        assert cli("download", job_id, "--out", str(tmp_path / "dl")).returncode == 0
        assert cli("delete", job_id).returncode == 0
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    assert cli("list").returncode == ExitCode.UNAVAILABLE


def test_share_prints_a_signed_url_that_works_without_a_key_until_it_expires(
        node: Node) -> None:
    job_id = node.done(STEPS)
    proc = node.cli("share", job_id, "--expires", "2s")
    assert proc.returncode == 0, proc.stderr
    url = proc.stdout.strip()
    assert "/v1/shared/" in url and "expires" in proc.stderr
    # Anyone holding the URL gets the package, no API key; its bytes match the sha256
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == got.headers["X-Content-SHA256"]
    # A tampered link is refused; an expired one says so
    signature = url.rpartition(".")[2]
    forged = url.replace(signature, signature[::-1])
    assert httpx.get(forged, timeout=10).status_code == 403
    time.sleep(2.5)
    gone = httpx.get(url, timeout=10)
    assert gone.status_code == 410 and "expired" in gone.json()["detail"]
    # A job with no package: 11
    assert node.cli("share", "no-such-job").returncode == ExitCode.NOT_FOUND
