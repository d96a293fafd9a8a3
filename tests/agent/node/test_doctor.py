"""miner-agent doctor against a real loopback coordinator, real files and a real torch child."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from agent.commands import node
from agent.execution.sandbox import find_bwrap
from agent.node import doctor
from agent.node.doctor import Check
from tests.agent.daemon.helpers import tmpfs, use_inodes

GOOD_KEY = "miner-key-123"


class _Coordinator(BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/health" else 404, {"status": "ok"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.seen.append((self.command, self.path))
        if self.headers.get("X-Api-Key") != GOOD_KEY:
            self._answer(401, {"detail": "Invalid API key"})
        elif self.path.startswith("/v1/miners/m1/jobs?"):
            self._answer(200, {"jobs": []})
        else:
            self._answer(404, {})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def coordinator() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Coordinator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cfg(tmp_path: Path, url: str, key: str = GOOD_KEY) -> SimpleNamespace:
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "cache").mkdir(exist_ok=True)
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return SimpleNamespace(state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "cache"),
                           coordinator_url=url, api_key_file=str(key_file), api_key=None,
                           miner_id="m1")


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.mark.slow
def test_full_run_on_this_cpu_node(tmp_path: Path, coordinator: str) -> None:
    # Given a configured CPU-only node whose coordinator accepts its key
    checks = doctor.run_checks(_cfg(tmp_path, coordinator),
                               sandbox_probe=node.probe_torch_in_sandbox)
    by = _by_name(checks)
    # Then the missing driver is a warning, torch (in a child) is fine, and the key works
    assert by["nvidia driver"].status == "WARN" and by["nvidia driver"].fix
    assert by["torch"].status == "OK" and "no GPU" in by["torch"].detail
    # and torch starts inside the job sandbox too (asked there, where bubblewrap is)
    if find_bwrap():
        assert by["torch in sandbox"].status == "OK", by["torch in sandbox"]
        assert "starts in the job sandbox; no GPU" in by["torch in sandbox"].detail
    assert by["config"].status == "OK"
    assert by["credential"].status == "OK"
    assert by["coordinator"].status == "OK"
    assert by["api key"].status == "OK"
    assert ("POST", "/v1/miners/m1/jobs?job_status=running&limit=1") in _Coordinator.seen
    assert not [c for c in checks if c.status == "FAIL"]
    text = doctor.format_checks(checks)
    assert GOOD_KEY not in text


def test_rejected_key_fails_and_the_key_is_never_printed(tmp_path: Path,
                                                          coordinator: str) -> None:
    cfg = _cfg(tmp_path, coordinator, key="wrong-key")
    cred, key = doctor.read_api_key(cfg)
    with httpx.Client(timeout=5) as client:
        health = doctor.check_coordinator(client, coordinator)
        verdict = doctor.check_key(client, coordinator, "m1", key or "")
    assert cred.status == "OK" and health.status == "OK"
    assert verdict.status == "FAIL" and "401" in verdict.detail
    assert "wrong-key" not in doctor.format_checks([cred, health, verdict])


def test_unreachable_coordinator_fails_with_what_to_do() -> None:
    with httpx.Client(timeout=2) as client:
        verdict = doctor.check_coordinator(client, "http://127.0.0.1:9")
    assert verdict.status == "FAIL" and "curl http://127.0.0.1:9/health" in verdict.fix


def test_credential_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    none = SimpleNamespace(api_key=None, api_key_file=None)
    assert doctor.read_api_key(none)[0].status == "FAIL"
    missing = SimpleNamespace(api_key=None, api_key_file=str(tmp_path / "nope"))
    assert doctor.read_api_key(missing) == (doctor.read_api_key(missing)[0], None)
    assert "No such file" in doctor.read_api_key(missing)[0].detail
    loose = tmp_path / "loose"
    loose.write_text("k")
    loose.chmod(0o644)
    check, key = doctor.read_api_key(SimpleNamespace(api_key=None, api_key_file=str(loose)))
    assert check.status == "WARN" and key == "k" and "chmod 0600" in check.fix
    # Under systemd the key comes from LoadCredential's directory
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "api-key").write_text("from-systemd")
    os.chmod(tmp_path / "creds" / "api-key", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert doctor.read_api_key(none) == (doctor.read_api_key(none)[0], "from-systemd")


def test_config_validity(tmp_path: Path) -> None:
    good = _cfg(tmp_path, "https://coord.example")
    assert doctor.check_config(good).status == "OK"
    bad = SimpleNamespace(coordinator_url="coord.example", miner_id="", state_dir="rel/state",
                          cache_dir="/c", heartbeat_interval_s=0)
    detail = doctor.check_config(bad).detail
    assert "not an http(s) URL" in detail and "miner_id is empty" in detail
    assert "not an absolute path" in detail and "heartbeat_interval_s" in detail


def test_directories(tmp_path: Path) -> None:
    assert doctor.check_dir("state", str(tmp_path)).status == "OK"
    assert doctor.check_dir("state", str(tmp_path / "absent")).status == "WARN"
    assert doctor.check_dir("cache", None).status == "FAIL"


def test_a_directory_out_of_inodes_fails(tmp_path: Path) -> None:
    # Given a state dir on a filesystem of 500 inodes, all but 20 taken by empty files
    with tmpfs(tmp_path / "state", 16384, inodes=500) as state:  # bytes: never used
        use_inodes(state / "flood", leave=20)
        # Then doctor fails it, though bytes are plentiful, and says what to do
        check = doctor.check_dir("state", str(state))
        assert check.status == "FAIL", check
        assert "inodes free < 64 (1 % of 500)" in check.detail and "remove files" in check.fix


def test_torch_verdicts() -> None:
    cpu_torch = {"torch": "2.4.0+cpu", "cuda_build": None, "available": False, "count": 0}
    verdict = doctor.check_torch(cpu_torch, gpu_count=2)
    assert verdict.status == "FAIL" and "download.pytorch.org/whl/cu" in verdict.fix
    assert doctor.check_torch({"error": "No module named 'torch'"}, 0).status == "FAIL"
    partial = {"torch": "2.4.0", "cuda_build": "12.4", "available": True, "count": 1}
    assert doctor.check_torch(partial, gpu_count=2).status == "WARN"


def test_device_nodes_cuda_opens_must_exist_on_a_gpu_node(tmp_path: Path) -> None:
    # Given a /dev with the control node but not nvidia-uvm (a module nobody loaded)
    (tmp_path / "nvidiactl").symlink_to("/dev/null")  # a character device
    missing = doctor.check_device_nodes(2, str(tmp_path))
    assert missing.status == "FAIL" and f"{tmp_path}/nvidia-uvm" in missing.detail
    assert "nvidia-modprobe -u" in missing.fix
    # A regular file where the node should be is no device either
    (tmp_path / "nvidia-uvm").write_text("")
    assert doctor.check_device_nodes(2, str(tmp_path)).status == "FAIL"
    # When both are character devices, Then all is well; and a CPU node needs none
    (tmp_path / "nvidia-uvm").unlink()
    (tmp_path / "nvidia-uvm").symlink_to("/dev/null")
    assert doctor.check_device_nodes(2, str(tmp_path)).status == "OK"
    assert doctor.check_device_nodes(0, str(tmp_path / "absent")).status == "OK"


@pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
def test_a_torch_the_sandbox_cannot_start_fails(tmp_path: Path) -> None:
    # Given the agent's environment at a path jobs never see (the sandbox's /tmp is its own)
    venv = Path(tempfile.mkdtemp(dir="/tmp")) / "venv"
    venv.symlink_to(Path(sys.prefix))
    python = venv / "bin" / Path(sys.executable).name
    try:
        outside = doctor.probe_torch(str(python))
        inside = node.probe_torch_in_sandbox(str(python))
    finally:
        venv.unlink()
        venv.parent.rmdir()
    # Then torch starts outside but not inside, and the verdict says so, with what to do
    assert "error" not in outside and inside is not None and "error" in inside
    verdict = doctor.check_torch_in_sandbox(inside, outside, 0)
    assert verdict.status == "FAIL" and "miner-agent exec" in verdict.fix


def test_sandboxed_torch_must_see_the_gpus_torch_sees_outside() -> None:
    outside = {"torch": "2.13.0", "cuda_build": "12.8", "available": True, "count": 2}
    blind = {**outside, "available": False, "count": 0}
    verdict = doctor.check_torch_in_sandbox(blind, outside, gpu_count=2)
    assert verdict.status == "FAIL" and "sees 0 CUDA device(s), 2 outside" in verdict.detail
    assert doctor.check_torch_in_sandbox(outside, outside, gpu_count=2).status == "OK"


def test_gpu_memory_verdicts() -> None:
    sample = {"gpus": [{"index": 0, "mem_used_mb": 500, "mem_total_mb": 81559},
                       {"index": 1, "mem_used_mb": 40000, "mem_total_mb": 81559},
                       {"index": 2, "uuid": "x", "error": "GPU is lost"}]}
    statuses = [c.status for c in doctor.check_gpu_memory(sample)]
    assert statuses == ["OK", "WARN", "WARN"]


@pytest.mark.slow
def test_cli_exit_code_and_broken_config_file(tmp_path: Path, coordinator: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    node.add_doctor_parser(parser.add_subparsers())
    (tmp_path / "agent.toml").write_text("coordinator_url = [unclosed\n")
    args = parser.parse_args(["doctor", "--config", str(tmp_path / "agent.toml")])
    # Given the CLI's loaded config object is absent, doctor reads the file itself
    lines: list[str] = []
    args.agent_config = None
    cfg = doctor.load_plain_config(args.config)
    assert cfg.load_error and doctor.check_config(cfg).status == "FAIL"
    args.agent_config = _cfg(tmp_path, coordinator, key="wrong")
    code = node.run_doctor(args, out=lines.append)
    assert code == 1 and "FAIL  api key" in lines[0]


def test_an_invalid_config_file_is_a_config_fail(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('coordinator_url = "ftp://x"\nmetrics_port = -1\n')
    cfg = doctor.load_for_doctor(str(tmp_path / "agent.toml"))
    verdict = doctor.check_config(cfg)
    assert verdict.status == "FAIL"
