"""The per-job jail inside a real bubblewrap: GPU device nodes, capabilities, mounts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.execution.sandbox import SandboxPolicy

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap is not installed (scripts/setup.sh does)")

# Runs inside the node's sandbox: a keeper confines a child, which reports what it sees.
_INSIDE = """
import json, os, stat, sys
from runtimes import jail
req = jail.JailRequest.from_dict(json.loads(sys.argv[1]))
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    jail.enter(req, None)

    def look():
        seen = {}
        for name in ("nvidia0", "nvidia1", "nvidiactl"):
            try:
                st = os.stat(f"/dev/{name}")
            except FileNotFoundError:
                seen[name] = "gone"
                continue
            seen[name] = "char" if stat.S_ISCHR(st.st_mode) else "file"
        with open("/proc/self/mountinfo") as f:
            seen["dev_ro"] = any(l.split()[4] == "/dev" and "ro" in l.split()[5].split(",")
                                 for l in f)
        caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")]
        nnp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")]
        try:
            jail._umount(os.path.dirname(req.package_dir))
            seen["umount"] = "worked"
        except OSError as exc:
            seen["umount"] = exc.errno
        try:
            open(os.path.join(req.read_only[0], "stdout.log"), "w").close()
            seen["logs"] = "written"
        except OSError as exc:
            seen["logs"] = exc.errno
        seen.update(pid=os.getpid(), caps=caps, nnp=nnp[0],
                    jobs=os.listdir(os.path.dirname(req.package_dir)))
        os.write(w, json.dumps(seen).encode())
        os._exit(0)

    child = jail.fork_job(look)
    os._exit(jail.keep(child))
os.close(w)
os.waitpid(pid, 0)
print(os.read(r, 65536).decode())
"""


def test_the_jail_keeps_only_its_gpus_and_no_capability(tmp_path: Path) -> None:
    # Given a node's sandbox with two GPU nodes and a control node (stand-ins: /dev/null)
    jobs, work = tmp_path / "jobs", tmp_path / "work"
    for d in (jobs / "job_a" / "logs", jobs / "job_b", work / "a"):
        d.mkdir(parents=True)
    policy = SandboxPolicy(jobs_root=jobs, work_root=work)
    argv = policy.argv([sys.executable, "-c", _INSIDE, json.dumps(policy.jail(
        jobs / "job_a", work / "a", "training", ["/dev/nvidia1"]))])
    at = argv.index("--remount-ro")  # with the devices, before /dev turns read-only
    argv[at:at] = ["--dev-bind", "/dev/null", "/dev/nvidia0", "--dev-bind", "/dev/null",
                   "/dev/nvidia1", "--dev-bind", "/dev/null", "/dev/nvidiactl"]
    # When a job is jailed with GPU 1 only
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # Then it keeps its GPU and the control node, not the other GPU
    assert seen["nvidia1"] == "char" and seen["nvidiactl"] == "char"
    assert seen["nvidia0"] == "gone"  # no placeholder file left where the node was
    assert seen["dev_ro"] is True  # and /dev is read-only again
    # and it is PID 1, with no capability at all and no new privileges
    assert seen["pid"] == 1
    assert set(seen["caps"]) == {"0000000000000000"}, seen["caps"]
    assert seen["nnp"] == "1"
    # and it sees its own package folder only, and cannot unmount the cover
    assert seen["jobs"] == ["job_a"]
    assert seen["umount"] == 1  # EPERM
    # and its logs folder, which the agent writes, is read-only to it
    assert seen["logs"] == 30  # EROFS


def test_code_and_read_only_paths_under_tmp_survive_the_jobs_fresh_tmp(tmp_path: Path) -> None:
    # Given a models file under /tmp (as a checkout or a venv under /tmp would be)
    models = tmp_path / "models.json"
    models.write_text('{"tiny": "/nonexistent"}\n')
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "reads", "payload": {"type": "command", "argv": [
        "sh", "-c", 'cat "$MINER_MODELS_FILE" > $MINER_RESULT_FILE; '
                    'echo x >> "$MINER_MODELS_FILE" || echo read-only >> $MINER_RESULT_FILE']}}))
    # When a sandboxed job reads it
    done = subprocess.run([sys.executable, "-m", "agent", "exec", str(job), "--out",
                           str(tmp_path / "out"), "--quiet", "--models", str(models)],
                          capture_output=True, text=True, timeout=120)
    # Then it is there, read-only, though the job's /tmp is its own
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "job_reads" / "result.txt").read_text()
    assert text.splitlines() == ['{"tiny": "/nonexistent"}', "read-only"], text
    assert models.read_text() == '{"tiny": "/nonexistent"}\n'


@pytest.mark.slow
def test_ddp_ranks_meet_inside_the_sandbox(tmp_path: Path) -> None:
    # Given a two-rank DDP training job (torchrun resolves the job's hostname to meet),
    # with the network off as the sandbox allows per type
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "ddp", "payload": {
        "type": "training", "model": {"arch": "mlp", "config": {"hidden": [8]}},
        "dataset": {"synthetic": {"kind": "classification", "samples": 64}},
        "optimizer": {"name": "sgd", "lr": 0.05}, "batch_size": 16, "steps": 4,
        "distributed": {"nproc": 2, "backend": "gloo"}}, "constraints": {"timeout_s": 120}}))
    # When it runs in the sandbox
    done = subprocess.run([sys.executable, "-m", "agent", "exec", str(job), "--out",
                           str(tmp_path / "out"), "--quiet", "--launcher", "forkserver"],
                          capture_output=True, text=True, timeout=180)
    # Then both ranks meet and train (no wait on an unresolvable hostname)
    assert done.returncode == 0, done.stderr
    output = json.loads((tmp_path / "out" / "job_ddp" / "output.json").read_text())
    assert output["metrics"]["world_size"] == 2
    assert output["environment"]["device"] is not None  # the runtime's device event
