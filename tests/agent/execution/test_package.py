"""Packages: manifest, checksums, zip, and verify catching tampering."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.execution.package import write_package
from agent.execution.verify import verify


@pytest.fixture
def package(tmp_path: Path) -> Path:
    folder = tmp_path / "job_x"
    (folder / "logs").mkdir(parents=True)
    (folder / "artifacts/sub").mkdir(parents=True)
    (folder / "logs/stdout.log").write_bytes(b"hello\n" * 1000)
    (folder / "logs/stderr.log").write_bytes(b"")
    (folder / "result.txt").write_text("result\n")
    (folder / "artifacts/sub/w.bin").write_bytes(bytes(range(256)) * 4096)
    (folder / "artifacts/name with spaces.txt").write_text("ok")
    write_package(folder, {"job_id": "x", "status": "completed"})
    return folder


def test_fresh_package_verifies_as_folder_and_zip(package: Path) -> None:
    assert verify(package).ok
    assert verify(package.with_name("job_x.zip")).ok
    check = subprocess.run(["sha256sum", "-c", "--strict", "output.sha256"], cwd=package)
    assert check.returncode == 0
    manifest = json.loads((package / "output.json").read_text())["files"]
    assert {"path": "artifacts/sub/w.bin", "size": 1048576} == {
        k: v for k, v in next(m for m in manifest if m["path"] == "artifacts/sub/w.bin").items()
        if k != "sha256"}


def test_tampered_file_is_named(package: Path) -> None:
    with open(package / "artifacts/sub/w.bin", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff")
    report = verify(package)
    assert not report.ok
    assert report.problems == ["artifacts/sub/w.bin: checksum mismatch"]
    assert subprocess.run(["sha256sum", "-c", "output.sha256"], cwd=package,
                          capture_output=True).returncode != 0


def test_missing_file_and_edited_manifest_are_named(package: Path) -> None:
    (package / "result.txt").unlink()
    out = json.loads((package / "output.json").read_text())
    out["status"] = "failed"
    (package / "output.json").write_text(json.dumps(out))
    problems = verify(package).problems
    assert "result.txt: missing" in problems
    assert "output.json: checksum mismatch" in problems


def test_tampered_zip_is_rejected(package: Path, tmp_path: Path) -> None:
    src = package.with_name("job_x.zip")
    bad = tmp_path / "bad" / "job_x.zip"
    bad.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("result.txt"):
                data = b"forged\n"
            zout.writestr(item, data)
    report = verify(bad)
    assert report.problems == ["result.txt: checksum mismatch"]
    # With the original sidecar beside it, the zip's own hash also fails.
    (bad.parent / "job_x.zip.sha256").write_text(
        src.with_name("job_x.zip.sha256").read_text())
    assert any("job_x.zip: checksum mismatch" in p for p in verify(bad).problems)


def test_zip_with_escaping_paths_is_rejected(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("job_x/../../etc/passwd", "x")
    assert any("leaves the package" in p for p in verify(evil).problems)


def test_verify_cli_exit_codes(package: Path) -> None:
    cli = [sys.executable, "-m", "agent", "verify", str(package)]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    (package / "result.txt").write_text("changed\n")
    bad = subprocess.run(cli, capture_output=True, text=True)
    assert bad.returncode == 8 and "FAIL result.txt: checksum mismatch" in bad.stdout
