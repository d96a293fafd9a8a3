"""Hostile jobs against the real agent: a reference coordinator on loopback, the daemon
as a subprocess with its torch-preloaded fork server inside bubblewrap, real signals.

Each test submits a `command` job that tries what a stranger's job would, then asserts
that nothing of the agent leaked into the package, that the package is intact
(`sha256sum -c`), that no process of the job is left and that the agent still serves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.execution.cgroups import CgroupTree
from tests.agent.daemon.helpers import (
    MINER_KEY,
    AgentProcess,
    Client,
    start_coordinator,
    wait_until,
)

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap is not installed (scripts/setup.sh does)")

KEY_TEXT = MINER_KEY


@pytest.fixture(scope="module", params=["forkserver", "spawn"])
def node(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One agent per launcher: both paths build the same jail."""
    tmp = tmp_path_factory.mktemp("security")
    coord = start_coordinator(tmp / "coord")
    state = tmp / "state"
    state.mkdir()
    key_file = tmp / "api-key"
    key_file.write_text(KEY_TEXT + "\n")
    key_file.chmod(0o600)
    agent = AgentProcess(coord.base_url, state, launcher=request.param,
                         api_key_file=str(key_file), cancel_grace_s="2",
                         allowed_job_types="command,sleep", job_pids_max="256",
                         max_job_output_mb="8", max_job_work_mb="8", job_tmp_mb="16",
                         max_job_files="50", max_job_work_files="2000",
                         max_job_log_mb="2")
    client = Client(coord)
    agent.wait_log("registered", timeout=120)
    yield {"agent": agent, "client": client, "state": state, "key_file": key_file,
           "coord": coord}
    agent.stop()
    Client.close_all()
    coord.stop()


def run_script(node: dict[str, Any], script: str, *, wait: bool = True,
               timeout_s: float = 60) -> tuple[str, dict[str, Any]]:
    """Submit ``sh -c script`` as a command job; returns its id and the client's view."""
    client: Client = node["client"]
    job_id = client.submit({"type": "command", "argv": ["sh", "-c", script]},
                           timeout_s=timeout_s)
    if not wait:
        return job_id, {}
    return job_id, client.wait_status(job_id, "completed", "failed", timeout=120)


def package(node: dict[str, Any], job_id: str) -> Path:
    folder = node["state"] / "jobs" / f"job_{job_id}"
    wait_until(lambda: (folder / "output.sha256").exists(), 60)
    return folder


def assert_sealed_and_clean(node: dict[str, Any], job_id: str, *secrets: bytes) -> dict[str, Any]:
    """The package verifies, and holds none of ``secrets`` (nor the miner key) anywhere."""
    folder = package(node, job_id)
    check = subprocess.run(["sha256sum", "-c", "--strict", "output.sha256"], cwd=folder,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    forbidden = [KEY_TEXT.encode(), *secrets]
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for secret in forbidden:
                assert secret not in data, f"{secret!r} leaked into {path}"
    with zipfile.ZipFile(folder.with_suffix(".zip")) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            for secret in forbidden:
                assert secret not in data, f"{secret!r} leaked into {name} of the zip"
    output = dict(json.loads((folder / "output.json").read_text()))
    isolation = output["environment"]["isolation"]
    if isolation["cgroup"]:  # removed, which only an empty cgroup can be: nothing is left
        tree = Path("/sys/fs/cgroup")
        leftovers = [p for p in tree.rglob(isolation["cgroup"]) if p.is_dir()] \
            if tree.is_dir() else []
        assert leftovers == [], f"the job's cgroup is still there: {leftovers}"
    return output


def result_text(node: dict[str, Any], job_id: str) -> str:
    return (package(node, job_id) / "result.txt").read_text()


def no_process_with(marker: str) -> bool:
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            return False
    return True


def assert_serving(node: dict[str, Any]) -> None:
    agent: AgentProcess = node["agent"]
    assert agent.proc.poll() is None, agent.log()[-3000:]
    job_id, view = run_script(node, "echo still-serving > $MINER_RESULT_FILE")
    assert view["status"] == "completed", view
    assert result_text(node, job_id).strip() == "still-serving"


def test_the_jobs_view_of_the_node(node: dict[str, Any]) -> None:
    # Given a job that lists and tries to write what it can
    state, key_file = node["state"], node["key_file"]
    targets = ["/", "/usr", "/etc", "/var", str(Path(sys.executable).parent),
               str(state / "cache")]
    script = f"""
    r=$MINER_RESULT_FILE
    echo "ls_run=$(ls -A /run | tr '\\n' ,)" >> $r
    echo "ls_home=$(ls -A /home | tr '\\n' ,)" >> $r
    echo "ls_jobs=$(ls -A {state}/jobs | tr '\\n' ,)" >> $r
    echo "ls_state=$(ls -A {state} 2>&1 | tr '\\n' ,)" >> $r
    echo "ls_work=$(ls -A {state}/work | tr '\\n' ,)" >> $r
    echo "key_exists=$(test -e {key_file} && echo yes || echo no)" >> $r
    for d in {' '.join(targets)}; do
        if touch $d/.probe-$MINER_JOB_ID 2>/dev/null; then echo "wrote=$d" >> $r; fi
    done
    touch /tmp/ok && echo "tmp_writable=yes" >> $r
    touch $MINER_ARTIFACTS_DIR/ok && echo "artifacts_writable=yes" >> $r
    touch $MINER_WORK_DIR/ok && echo "work_writable=yes" >> $r
    echo "pids=$(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ,)" >> $r
    echo "devs=$(ls /dev | tr '\\n' ,)" >> $r
    """
    job_id, view = run_script(node, script)
    assert view["status"] == "completed", view
    found = dict(line.split("=", 1) for line in result_text(node, job_id).splitlines())
    # Then the system is read-only; its own folders and a private /tmp are writable
    assert "wrote" not in found, found
    assert not any(Path(d, f".probe-{job_id}").exists() for d in targets)
    assert found["tmp_writable"] == found["artifacts_writable"] == found["work_writable"] == "yes"
    # and the agent's state, other jobs, the key file and /run do not exist for it
    assert found["key_exists"] == "no"
    assert found["ls_run"] in ("", "miner-jail,")
    assert found["ls_home"] == ""
    assert found["ls_jobs"] == f"job_{job_id},"
    assert found["ls_work"] == f"{job_id},"
    # no journal or log; the shared download cache only read-only (a target above)
    assert found["ls_state"] == "cache,jobs,work,", found["ls_state"]
    # and it sees only its own processes, and no device beyond the basic ones
    pids = [int(p) for p in found["pids"].split(",") if p]
    assert 1 in pids and max(pids) < 100, pids
    assert set(found["devs"].strip(",").split(",")) <= {
        "core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
        "stdout", "tty", "urandom", "zero"}
    assert_sealed_and_clean(node, job_id)
    assert_serving(node)


def test_a_job_cannot_read_the_agents_secrets(node: dict[str, Any]) -> None:
    # Given a job that hunts for the agent: its environ, cmdline, key file, state, journal
    state, key_file = node["state"], node["key_file"]
    agent_pid = node["agent"].proc.pid
    script = f"""
    out=$MINER_ARTIFACTS_DIR/loot
    for p in /proc/[0-9]*; do
        cat $p/environ $p/cmdline >> $out 2>/dev/null
        cat $p/stat >> $out 2>/dev/null
    done
    cat /proc/{agent_pid}/environ /proc/{agent_pid}/cmdline >> $out 2>/dev/null
    cat {key_file} >> $out 2>/dev/null
    cat {state}/journal.db {state}/*.log >> $out 2>/dev/null
    cat $CREDENTIALS_DIRECTORY/api-key >> $out 2>/dev/null
    cat /etc/miner-agent/* >> $out 2>/dev/null
    env >> $out
    ln {key_file} $MINER_ARTIFACTS_DIR/hard 2>/dev/null
    ln -s {key_file} $MINER_ARTIFACTS_DIR/soft
    ln -s {state}/journal.db $MINER_ARTIFACTS_DIR/journal
    echo done > $MINER_RESULT_FILE
    """
    job_id, view = run_script(node, script)
    assert view["status"] == "completed", view
    # Then nothing of the agent is in the package: no key, no journal, no agent argv
    output = assert_sealed_and_clean(node, job_id, str(state).encode() + b"/journal.db\x00")
    loot = (package(node, job_id) / "artifacts" / "loot").read_bytes()
    assert b"MINER_AGENT_" not in loot and b"SQLite format" not in loot
    assert b"agent run --coordinator" not in loot
    skipped = {s["path"]: s["reason"] for s in output["skipped"]}
    assert skipped.get("artifacts/soft") == "symlink"
    assert not (package(node, job_id) / "artifacts" / "hard").exists()  # EXDEV or no file
    assert_serving(node)


def test_a_job_cannot_reach_the_agents_control_socket(node: dict[str, Any]) -> None:
    # Given the agent's control socket, which answers on the host
    sock = node["state"] / "control.sock"
    assert sock.is_socket()
    host = subprocess.run([sys.executable, "-m", "agent", "ps", "--json", "--state-dir",
                           str(node["state"])], capture_output=True, text=True, timeout=60,
                          env={**node["agent"].env})
    assert host.returncode == 0 and json.loads(host.stdout)["miner_id"], host.stderr
    # When a job tries to connect to it (and to drain the node through it)
    probe = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    s.sendall(b'{"op": "drain", "reason": "a job"}\\n')
    seen = "connected " + s.recv(100).decode()
except OSError as exc:
    seen = type(exc).__name__
open(os.environ["MINER_RESULT_FILE"], "w").write(seen)
"""
    client: Client = node["client"]
    job_id = client.submit({"type": "command", "argv": [sys.executable, "-c", probe,
                                                        str(sock)]}, timeout_s=60)
    view = client.wait_status(job_id, "completed", "failed", timeout=120)
    # Then the socket does not exist for it, and the node is not drained
    assert view["status"] == "completed", view
    assert result_text(node, job_id).strip() == "FileNotFoundError"
    assert not (node["state"] / "drain.json").exists()
    assert_serving(node)


def test_no_writable_place_is_shared_between_jobs(node: dict[str, Any]) -> None:
    # Given a job that leaves a note wherever it can outside its own folders
    places = ["/tmp", "/var/tmp", "/run", "/dev", "/dev/shm", "/root", "/home", "$HOME",
              "$TRITON_CACHE_DIR", "$XDG_CACHE_HOME"]
    plant = "; ".join(f'mkdir -p "{p}" 2>/dev/null; echo planted > "{p}/note" 2>/dev/null'
                      for p in places)
    first, view = run_script(node, plant + "; echo ok > $MINER_RESULT_FILE")
    assert view["status"] == "completed", view
    # When the next job looks for those notes
    look = "; ".join(f'cat "{p}/note" 2>/dev/null' for p in places)
    second, view = run_script(node, f"({look}) > $MINER_RESULT_FILE; echo end >> "
                                    "$MINER_RESULT_FILE")
    # Then it finds none of them
    assert view["status"] == "completed", view
    assert result_text(node, second).strip() == "end"
    assert_serving(node)


def test_setsid_double_fork_dies_with_a_completed_job(node: dict[str, Any]) -> None:
    # Given a job whose grandchild escapes its session and keeps writing into the package
    marker = f"{41 + os.getpid() % 1000 / 1000:.3f}"
    script = f"""
    setsid sh -c 'sh -c "while :; do echo x >> $MINER_ARTIFACTS_DIR/late; sleep 0.01; done" &
                  exec sleep {marker}' &
    sleep 0.3
    echo parent-done > $MINER_RESULT_FILE
    """
    t0 = time.monotonic()
    job_id, view = run_script(node, script)
    # Then the job ends at once (the grandchild held no pipe open past the end) ...
    assert view["status"] == "completed", view
    assert time.monotonic() - t0 < 20
    output = assert_sealed_and_clean(node, job_id)
    # ... and nothing of it is left, so the sealed package stays as sealed
    assert no_process_with(f"sleep {marker}")
    folder = package(node, job_id)
    before = (folder / "artifacts" / "late").read_bytes()
    time.sleep(0.3)
    assert (folder / "artifacts" / "late").read_bytes() == before
    assert output["environment"]["isolation"]["sandbox"] == "bwrap"
    assert_serving(node)


def test_setsid_double_fork_dies_with_a_canceled_job(node: dict[str, Any]) -> None:
    marker = f"{43 + os.getpid() % 1000 / 1000:.3f}"
    script = f"""
    setsid sh -c 'trap "" TERM; exec sleep {marker}' &
    trap '' TERM
    echo started > $MINER_RESULT_FILE
    while :; do sleep 0.1; done
    """
    client: Client = node["client"]
    job_id, _ = run_script(node, script, wait=False)
    wait_until(lambda: not no_process_with(f"sleep {marker}"), 60)
    client.cancel(job_id)
    view = client.wait_status(job_id, "canceled", "failed", "completed", timeout=60)
    assert view["status"] == "canceled", view
    assert_sealed_and_clean(node, job_id)
    wait_until(lambda: no_process_with(f"sleep {marker}"), 10,
               lambda: "a process of the canceled job survived")
    assert_serving(node)


def test_a_job_that_signals_everything_it_sees(node: dict[str, Any]) -> None:
    # Given a job that SIGKILLs every process it can see, then every pid it can guess
    agent: AgentProcess = node["agent"]
    fork_servers = [p.pid for p in psutil.Process(agent.proc.pid).children(recursive=True)
                    if "runtimes.forkserver" in " ".join(p.cmdline())]
    script = f"""
    echo before > $MINER_RESULT_FILE
    kill -9 {agent.proc.pid} {' '.join(map(str, fork_servers))} 2>/dev/null
    for p in $(seq 2 400); do kill -9 $p 2>/dev/null; done
    kill -9 -1
    """
    job_id, view = run_script(node, script)
    assert view["status"] in ("failed", "completed"), view  # it killed itself: failed
    # Then the agent and its fork server live on, and the next job runs
    assert agent.proc.poll() is None
    assert all(psutil.pid_exists(pid) for pid in fork_servers)
    assert_sealed_and_clean(node, job_id)
    assert_serving(node)


def test_command_jobs_have_no_network(node: dict[str, Any]) -> None:
    coord = node["coord"]
    port = coord.base_url.rsplit(":", 1)[1].strip("/")
    script = f"""
    {sys.executable} - <<'EOF' > $MINER_RESULT_FILE
import socket
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", {port}))
    print("connected")
except OSError as exc:
    print("refused", exc.errno)
print(sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]))
EOF
    """
    job_id, view = run_script(node, script)
    assert view["status"] == "completed", view
    text = result_text(node, job_id)
    assert "refused" in text and "['lo']" in text, text
    assert_serving(node)


def test_a_job_cannot_touch_its_logs_nor_swap_them_for_a_link(node: dict[str, Any]) -> None:
    # Given a job that prints, then tries to remove, truncate, move or replace its logs
    # (a link in place of stdout.log had the agent ship the miner's key as the job's log)
    key_file = node["key_file"]
    script = f"""
    echo printed-before; echo err-before >&2
    d=$MINER_PACKAGE_DIR/logs
    {{
    rm -f $d/stdout.log; echo "rm $?"
    ln -sf {key_file} $d/stdout.log; echo "link $?"
    sh -c ": > $d/stderr.log"; echo "truncate $?"
    mv $d $MINER_PACKAGE_DIR/moved; echo "move $?"
    rm -rf $d; echo "remove $?"
    ln -s {key_file} $d/more.log; echo "add $?"
    }} > $MINER_RESULT_FILE 2> /dev/null
    echo printed-after
    """
    job_id, view = run_script(node, script)
    assert view["status"] == "completed", view
    # Then every attempt failed: the logs folder is read-only to the job and busy
    attempts = dict(line.split() for line in result_text(node, job_id).splitlines())
    assert set(attempts) == {"rm", "link", "truncate", "move", "remove", "add"}, attempts
    assert all(status != "0" for status in attempts.values()), attempts
    # And the package holds every byte it printed, and no key, as does the shipped log
    assert_sealed_and_clean(node, job_id)
    logs = package(node, job_id) / "logs"
    assert (logs / "stdout.log").read_text() == "printed-before\nprinted-after\n"
    assert (logs / "stderr.log").read_text() == "err-before\n"
    assert sorted(p.name for p in logs.iterdir()) == ["stderr.log", "stdout.log"]
    client: Client = node["client"]

    def shipped() -> str:
        resp = client.http.get(f"/v1/jobs/{job_id}/logs", params={"stream": "stdout"})
        return resp.text

    wait_until(lambda: "printed-after" in shipped(), 30, shipped)
    assert shipped() == "printed-before\nprinted-after\n"
    assert_serving(node)


def test_output_quota_stops_a_job_and_keeps_what_it_had(node: dict[str, Any]) -> None:
    # Given max_job_output_mb = 8 and a job that writes without end
    script = """
    echo partial > $MINER_RESULT_FILE
    while :; do head -c 1048576 /dev/zero >> $MINER_ARTIFACTS_DIR/big; sleep 0.02; done
    """
    job_id, view = run_script(node, script)
    assert view["status"] == "failed", view
    output = assert_sealed_and_clean(node, job_id)
    assert output["error"]["code"] == "output_too_large", output["error"]
    assert 7 << 20 < (package(node, job_id) / "artifacts" / "big").stat().st_size < 64 << 20
    assert (package(node, job_id) / "result.txt").read_text().strip() == "partial"
    assert_serving(node)


def test_a_log_keeps_max_job_log_mb_and_the_job_goes_on(node: dict[str, Any]) -> None:
    # Given max_job_log_mb = 2 and a job that prints 6 MiB (its logs lie outside
    # max_job_output_mb: they were kept up to 4 GiB a stream, whatever the operator set)
    script = """
    head -c 6291456 /dev/zero | tr '\\0' x
    echo to-stderr >&2
    echo done > $MINER_RESULT_FILE
    """
    job_id, view = run_script(node, script)
    # Then its stdout log holds the first 2 MiB, the rest is counted as dropped, and
    # the job ran on to its end
    assert view["status"] == "completed", view
    output = assert_sealed_and_clean(node, job_id)
    folder = package(node, job_id)
    assert (folder / "logs" / "stdout.log").read_bytes() == b"x" * (2 << 20)
    assert output["logs"]["stdout"] == {"bytes": 2 << 20, "dropped_bytes": 4 << 20}
    assert (folder / "logs" / "stderr.log").read_text() == "to-stderr\n"
    assert result_text(node, job_id).strip() == "done"
    assert_serving(node)


def test_a_sparse_file_past_the_quota_is_left_out_of_the_seal(node: dict[str, Any]) -> None:
    # Given max_job_output_mb = 8 and a job that makes a 2 GiB sparse file (no disk, a
    # millisecond) and exits before the quota's walk comes round (the seal read and
    # zipped all of it: 2 GiB of disk; `truncate -s 1T` would have filled the disk)
    script = """
    truncate -s 2G $MINER_ARTIFACTS_DIR/sparse
    echo kept > $MINER_ARTIFACTS_DIR/small
    echo partial > $MINER_RESULT_FILE
    """
    job_id, view = run_script(node, script)
    # Then the job fails as past its quota, though it exited 0
    assert view["status"] == "failed", view
    output = assert_sealed_and_clean(node, job_id)
    assert output["error"]["code"] == "output_too_large", output["error"]
    # And its package holds what fits, and lists the sparse file as left out
    assert {"path": "artifacts/sparse", "reason": "past max_job_output_mb: left out"} \
        in output["skipped"]
    assert {"artifacts/small", "result.txt"} <= {f["path"] for f in output["files"]}
    zip_path = package(node, job_id).with_suffix(".zip")
    assert zip_path.stat().st_size < 1 << 20
    assert result_text(node, job_id).strip() == "partial"
    assert_serving(node)


def test_a_flood_of_files_stops_the_job_and_never_reaches_the_seal(
        node: dict[str, Any]) -> None:
    # Given max_job_files = 50 and a job that makes 20,000 empty files and goes on
    # (a job that ends first fails the same way: test_executor)
    script = """
    echo made > $MINER_RESULT_FILE
    cd $MINER_ARTIFACTS_DIR && seq -f f%05g 20000 | xargs touch
    sleep 60
    """
    job_id, view = run_script(node, script)
    # Then the quota's walk stops it: output_too_large, naming the limit
    assert view["status"] == "failed", view
    output = assert_sealed_and_clean(node, job_id)
    assert output["error"]["code"] == "output_too_large", output["error"]
    assert "max_job_files" in output["error"]["message"]
    # And its package holds at most 50 of them, its logs and result.txt all the same
    paths = [m["path"] for m in output["files"]]
    assert sum(p.startswith("artifacts/") for p in paths) <= 50
    assert {"result.txt", "logs/stdout.log", "logs/stderr.log"} <= set(paths)
    assert output["skipped"][-1]["reason"].startswith("past max_job_files")
    assert (package(node, job_id) / "result.txt").read_text().strip() == "made"
    assert output["cancel"]["reason"] == "too_many_files", output["cancel"]
    assert_serving(node)


@pytest.mark.parametrize(("fill", "limit", "reason"), [
    # bytes: max_job_work_mb = 8, a job that writes without end into its work folder
    ("while :; do head -c 1048576 /dev/zero >> $MINER_WORK_DIR/big; sleep 0.02; done",
     "max_job_work_mb", "work_too_large"),
    # entries: max_job_work_files = 2000, a job that makes 20,000 empty files there and
    # goes on (each takes an inode of the state dir's disk)
    ("cd $MINER_WORK_DIR && seq -f f%05g 20000 | xargs touch; sleep 60",
     "max_job_work_files", "work_too_many_files"),
], ids=["bytes", "entries"])
def test_work_quota_stops_a_job_that_fills_its_scratch(node: dict[str, Any], fill: str,
                                                       limit: str, reason: str) -> None:
    # Given a job that fills its work folder past one of its limits
    script = f"""
    echo partial > $MINER_RESULT_FILE
    echo $MINER_WORK_DIR > $MINER_ARTIFACTS_DIR/where
    {fill}
    """
    job_id, view = run_script(node, script)
    # Then the quota's walk stops it: work_too_large, naming the limit
    assert view["status"] == "failed", view
    output = assert_sealed_and_clean(node, job_id)
    assert output["error"]["code"] == "work_too_large", output["error"]
    assert limit in output["error"]["message"]
    assert output["cancel"]["reason"] == reason, output["cancel"]
    # And its package is kept, its scratch removed
    folder = package(node, job_id)
    assert (folder / "result.txt").read_text().strip() == "partial"
    work = Path((folder / "artifacts" / "where").read_text().strip())
    assert work.is_relative_to(node["state"])
    wait_until(lambda: not work.exists(), 30)
    assert limit in node["agent"].log()
    assert_serving(node)


def test_tmp_and_shm_are_bounded_by_job_tmp_mb(node: dict[str, Any]) -> None:
    # Given job_tmp_mb = 16 and a job that writes 64 MiB into each of /tmp and /dev/shm
    script = """
    for d in /tmp /dev/shm; do
        head -c 67108864 /dev/zero > $d/fill 2> /dev/null
        echo "$d $? $(stat -c %s $d/fill) $(df -k --output=size $d | tail -1)"
    done > $MINER_RESULT_FILE
    """
    job_id, view = run_script(node, script)
    # Then each write stopped at 16 MiB (ENOSPC, a failing head), not in the node's RAM
    assert view["status"] == "completed", view
    lines = result_text(node, job_id).split("\n")
    for line, tree in zip(lines, ("/tmp", "/dev/shm"), strict=False):
        name, status, size, size_k = line.split()
        assert name == tree and status != "0", line
        assert 15 << 20 <= int(size) <= 16 << 20 and int(size_k) == 16 << 10, line
    assert len([line for line in lines if line]) == 2, lines
    assert_sealed_and_clean(node, job_id)
    assert_serving(node)


def _controllers() -> frozenset[str]:
    tree, _ = CgroupTree.discover()
    if tree is None:
        return frozenset()
    try:
        return tree.controllers
    finally:
        tree.close()


@pytest.mark.skipif("pids" not in _controllers(),
                    reason="no pids controller on this host's cgroup v2: a fork bomb would "
                    "not be bounded here")
def test_a_fork_bomb_is_bounded(node: dict[str, Any]) -> None:
    job_id, view = run_script(node, "b() { b | b & }; b; sleep 3", timeout_s=20)
    assert view["status"] in ("failed", "completed"), view
    output = assert_sealed_and_clean(node, job_id)
    assert output["environment"]["isolation"]["limits"].get("pids.max") == "256"
    assert_serving(node)


@pytest.mark.skipif("memory" not in _controllers(),
                    reason="no memory controller on this host's cgroup v2: a memory hog "
                    "would not be bounded here")
def test_a_memory_hog_is_bounded(tmp_path: Path) -> None:
    coord = start_coordinator(tmp_path / "coord")
    agent = AgentProcess(coord.base_url, tmp_path / "state", allowed_job_types="command",
                         job_memory_max_mb="64")
    client = Client(coord)
    try:
        agent.wait_log("registered", timeout=120)
        job_id = client.submit({"type": "command", "argv": [
            sys.executable, "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"]},
            timeout_s=60)
        view = client.wait_status(job_id, "failed", "completed", timeout=120)
        assert view["status"] == "failed", view
    finally:
        agent.stop()
        Client.close_all()
        coord.stop()
