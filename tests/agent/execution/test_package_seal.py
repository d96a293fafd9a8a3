"""The seal's one pass: each byte read once, the zip hashed as built, the zip the durable copy."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from agent.execution import package
from agent.execution.package import write_package
from agent.execution.sealed import read_sealed
from agent.execution.verify import verify


def _tiny_job(root: Path) -> Path:
    folder = root / "job_t"
    (folder / "logs").mkdir(parents=True)
    (folder / "artifacts").mkdir()
    (folder / "logs/stdout.log").write_bytes(b"step 1 of 1\n" * 3)
    (folder / "logs/stderr.log").write_bytes(b"")
    (folder / "result.txt").write_text("slept 1 steps\n")
    (folder / "artifacts/big.log").write_bytes(b"a line that repeats\n" * 2000)
    return folder


def _zip_sha(folder: Path) -> str:
    return hashlib.sha256(folder.with_suffix(".zip").read_bytes()).hexdigest()


def test_the_sidecar_names_the_zip_as_written_and_small_text_is_stored(tmp_path: Path) -> None:
    # Given a tiny job's folder, sealed
    folder = _tiny_job(tmp_path)
    info = write_package(folder, {"job_id": "t", "status": "completed"})
    # Then the reported and written hashes are the zip's own bytes' hash
    sidecar = (tmp_path / "job_t.zip.sha256").read_text()
    assert info.zip_sha256 == _zip_sha(folder) and sidecar == f"{info.zip_sha256}  job_t.zip\n"
    # And small text is stored (deflate would save no disk block), larger text deflated,
    # every entry with its sizes in its own header (no data descriptors)
    with zipfile.ZipFile(info.zip_path or "") as zf:
        kinds = {i.filename.split("/", 1)[1]: i.compress_type for i in zf.infolist()}
        assert all(i.flag_bits & 0x08 == 0 for i in zf.infolist())
    assert kinds["logs/stdout.log"] == kinds["result.txt"] == zipfile.ZIP_STORED
    assert kinds["artifacts/big.log"] == zipfile.ZIP_DEFLATED
    # And nothing temporary is left beside the package or in it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job_t", "job_t.zip",
                                                          "job_t.zip.sha256"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert verify(folder).ok and verify(info.zip_path or folder).ok


def test_a_zip_too_large_for_memory_spills_and_still_verifies(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    # Given a memory budget smaller than the package (8 MiB in production)
    monkeypatch.setattr(package, "_MEMORY_ZIP_BYTES", 4096)
    folder = _tiny_job(tmp_path)
    (folder / "artifacts/blob.bin").write_bytes(bytes(range(256)) * 2048)
    # When it is sealed
    info = write_package(folder, {"job_id": "t", "status": "completed"})
    # Then the zip, written through the draft file, is whole and its sidecar agrees
    assert info.zip_sha256 == _zip_sha(folder)
    assert verify(folder).ok and verify(info.zip_path or folder).ok
    with zipfile.ZipFile(info.zip_path or "") as zf:
        assert zf.read("job_t/artifacts/blob.bin") == bytes(range(256)) * 2048


def test_after_a_power_cut_the_folder_files_come_back_from_the_zip(tmp_path: Path) -> None:
    # Given a sealed package whose unsynced files a power cut left empty
    folder = _tiny_job(tmp_path)
    info = write_package(folder, {"job_id": "t", "status": "completed"})
    for name in ("output.json", "output.sha256"):
        (folder / name).write_bytes(b"")
    (tmp_path / "job_t.zip.sha256").write_bytes(b"")
    # When recovery reads it
    again = read_sealed(folder)
    # Then it reads what the seal wrote, and the folder and sidecar are whole again
    assert again is not None
    assert again.result_hash == info.result_hash and again.zip_sha256 == info.zip_sha256
    assert again.output["status"] == "completed" and again.manifest == info.manifest
    assert verify(folder).ok and verify(info.zip_path or folder).ok


def test_a_folder_never_sealed_reads_as_none(tmp_path: Path) -> None:
    # Given a job folder with an empty output.json and no zip (the crash came first)
    folder = _tiny_job(tmp_path)
    (folder / "output.json").write_bytes(b"")
    # Then recovery learns it was never sealed, and may seal it now
    assert read_sealed(folder) is None
    assert read_sealed(tmp_path / "job_absent") is None


def test_an_output_json_the_job_left_is_not_a_seal(tmp_path: Path) -> None:
    # Given a job that wrote an output.json and sidecar of its own making into its
    # package, and no zip (the agent died while it ran)
    folder = _tiny_job(tmp_path)
    forged = {"job_id": "someone-else", "status": "completed", "metrics": {"duration_ms": 9e9}}
    (folder / "output.json").write_text(json.dumps(forged))
    (folder / "output.sha256").write_text("0" * 64 + "  result.txt\n")
    # Then recovery does not take it for a seal
    assert read_sealed(folder) is None
    # And once sealed, the seal's copy is what recovery reads and puts back
    info = write_package(folder, {"job_id": "t", "status": "failed"})
    (folder / "output.json").write_text(json.dumps(forged))
    again = read_sealed(folder)
    assert again is not None and again.output["status"] == "failed"
    assert json.loads((folder / "output.json").read_text()) == info.output
    assert verify(folder).ok
