"""The seal never packages bytes from outside the job folder, even against a live swapper.

Real files and real processes: every test opens the zip, reads every member, and runs
the real ``sha256sum -c output.sha256`` from inside the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.execution.executor import folder_usage, seal_unlocking
from agent.execution.package import PackageInfo, build_manifest, write_package
from agent.execution.reclaim import remove_tree
from agent.execution.sealed import read_sealed
from tests.agent.conftest import without_privileges

SECRET = b"TOP-SECRET-OUTSIDE-THE-FOLDER-" + os.urandom(16).hex().encode()
OUTPUT = {"job_id": "s", "status": "completed"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    job = tmp_path / "jobs" / "job_s"
    (job / "logs").mkdir(parents=True)
    (job / "artifacts").mkdir()
    (job / "logs/stdout.log").write_bytes(b"step 1\n" * 100)
    (job / "result.txt").write_text("done\n")
    return job


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A 0600 secret in a directory of its own, outside the folder."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    return secret


def assert_sealed(info: PackageInfo, folder: Path) -> dict[str, bytes]:
    """No outside bytes anywhere in the package, and the package checks out; returns members."""
    output_json = (folder / "output.json").read_bytes()
    assert SECRET not in output_json
    secret_hash = hashlib.sha256(SECRET).hexdigest()
    assert all(m["sha256"] != secret_hash for m in info.manifest)
    assert all("secret" not in m["path"] for m in info.manifest)
    assert info.zip_path is not None
    with zipfile.ZipFile(info.zip_path) as zf:
        members = {item.filename: zf.read(item) for item in zf.infolist()}
    assert all(SECRET not in data for data in members.values())
    expected = {"output.json", "output.sha256", *(m["path"] for m in info.manifest)}
    assert set(members) == {f"{folder.name}/{name}" for name in expected}
    for m in info.manifest:
        data = members[f"{folder.name}/{m['path']}"]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (m["size"], m["sha256"])
    assert members[f"{folder.name}/output.json"] == output_json
    assert members[f"{folder.name}/output.sha256"] == (folder / "output.sha256").read_bytes()
    check = subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "output.sha256"],
                           cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert info.zip_sha256 == hashlib.sha256(info.zip_path.read_bytes()).hexdigest()
    return members


def test_hard_link_to_an_outside_file_is_skipped(folder: Path, outside: Path) -> None:
    # Given a second name, inside artifacts/, for a 0600 file outside the folder
    os.link(outside, folder / "artifacts/link.bin")
    # When the folder is sealed
    info = write_package(folder, OUTPUT)
    # Then the link is listed as skipped and its bytes are nowhere in the package
    assert {"path": "artifacts/link.bin", "reason": "hard link"} in info.skipped
    assert "artifacts/link.bin" not in {m["path"] for m in info.manifest}
    assert_sealed(info, folder)


def test_symlinks_to_outside_file_and_directory_are_skipped(folder: Path,
                                                            outside: Path) -> None:
    (folder / "artifacts/leak.bin").symlink_to(outside)
    (folder / "artifacts/leakdir").symlink_to(outside.parent, target_is_directory=True)
    info = write_package(folder, OUTPUT)
    assert {"path": "artifacts/leak.bin", "reason": "symlink"} in info.skipped
    assert {"path": "artifacts/leakdir", "reason": "symlink"} in info.skipped
    assert not any(m["path"].startswith("artifacts/leak") for m in info.manifest)
    assert_sealed(info, folder)


def test_folders_a_job_left_at_the_agents_own_names_are_replaced(folder: Path,
                                                                  outside: Path) -> None:
    # Given folders where the seal writes output.json, output.sha256 and their
    # temporary names, one holding a link to an outside folder (which rename cannot
    # replace: the seal failed and the job was reported without a package)
    for name in ("output.json", "output.sha256", ".output.json.tmp", ".output.sha256.tmp"):
        (folder / name / "deep").mkdir(parents=True)
        (folder / name / "deep" / "f").write_text("the job's")
    (folder / "output.json" / "out").symlink_to(outside.parent)
    # When it is sealed
    info = write_package(folder, OUTPUT)
    # Then the agent's files take those names, and nothing outside was touched
    assert_sealed(info, folder)
    assert json.loads((folder / "output.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in folder.iterdir()) == [
        "artifacts", "logs", "output.json", "output.sha256", "result.txt"]
    assert outside.read_bytes() == SECRET
    # And recovery, finding its zip, reads and puts back the same against a new plant
    (folder / "output.json").unlink()
    (folder / "output.json" / "deep").mkdir(parents=True)
    again = read_sealed(folder)
    assert again is not None and again.output == info.output
    assert json.loads((folder / "output.json").read_text()) == info.output


def test_fifo_and_socket_are_skipped_without_blocking(folder: Path) -> None:
    os.mkfifo(folder / "artifacts/pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "artifacts/sock"))
    try:
        done: list[PackageInfo] = []
        sealing = threading.Thread(target=lambda: done.append(write_package(folder, OUTPUT)),
                                   daemon=True)
        sealing.start()
        sealing.join(timeout=20)
        assert done, "sealing blocked on a FIFO or socket"
    finally:
        sock.close()
    info = done[0]
    assert {"path": "artifacts/pipe", "reason": "not a regular file"} in info.skipped
    assert {"path": "artifacts/sock", "reason": "not a regular file"} in info.skipped
    assert_sealed(info, folder)


def test_nested_binary_files_hash_and_zip_exactly(folder: Path) -> None:
    files = {
        "artifacts/a/b/c/deep.bin": os.urandom(3 << 20) + b"\x00tail",  # several chunks
        "artifacts/a/empty.bin": b"",
        "artifacts/a/b/model.safetensors": bytes(range(256)) * 5000,
        "artifacts/notes.txt": "ünïcode text\n".encode() * 1000,
        "artifacts/name with spaces.bin": os.urandom(1000),
    } | {f"artifacts/many/w{i:02}.bin": os.urandom((1 << 20) + i) for i in range(20)}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    files |= {rel: (folder / rel).read_bytes() for rel in ("logs/stdout.log", "result.txt")}
    # Times a zip cannot hold are clamped, not fatal.
    os.utime(folder / "artifacts/a/empty.bin", (0, 0))
    os.utime(folder / "artifacts/notes.txt", (0, 2**34))

    info = write_package(folder, OUTPUT)

    members = assert_sealed(info, folder)
    by_path = {m["path"]: m for m in info.manifest}
    assert set(by_path) == set(files) and info.skipped == []
    for rel, data in files.items():
        assert by_path[rel]["size"] == len(data)
        assert by_path[rel]["sha256"] == hashlib.sha256(data).hexdigest()
        assert members[f"job_s/{rel}"] == data
    written = json.loads((folder / "output.json").read_text())
    assert written["files"] == info.manifest and written["result_hash"] == info.result_hash
    # The threaded hash (no zip) names exactly the same bytes as the one-pass zip.
    assert build_manifest(folder) == (info.manifest, [])
    assert write_package(folder, OUTPUT, make_zip=False).manifest == info.manifest


# Swaps artifacts/sub with a symlink to the outside directory as fast as it can: an
# atomic exchange where the kernel has renameat2, else two renames each way.
SWAPPER = """
import ctypes, os, sys
sub, parked_dir, parked_link = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)

def exchange():
    if libc.renameat2(-100, sub.encode(), -100, parked_link.encode(), 2):  # RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), "renameat2")

def two_renames():
    os.rename(sub, parked_dir)
    os.rename(parked_link, sub)
    os.rename(sub, parked_link)
    os.rename(parked_dir, sub)

try:
    exchange()
    exchange()
    swap = exchange
except (AttributeError, OSError):
    swap = two_renames
print("swapping", swap.__name__, flush=True)
while True:
    swap()
"""


class Swapper:
    """A separate process swapping artifacts/sub for a symlink to an outside directory."""

    def __init__(self, sub: Path, parked: Path, outside_dir: Path) -> None:
        self.sub, self.parked_dir, self.parked_link = sub, parked / "dir", parked / "link"
        parked.mkdir()
        self.parked_link.symlink_to(outside_dir, target_is_directory=True)
        self.proc = subprocess.Popen([sys.executable, "-c", SWAPPER, str(sub),
                                      str(self.parked_dir), str(self.parked_link)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("swapping")

    def stop(self) -> None:
        """Kill it and put the real directory back, wherever the kill left it."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()  # reaps it and closes its pipe
        for real in (self.parked_dir, self.parked_link):
            if real.is_dir() and not real.is_symlink():
                if self.sub.is_symlink():
                    self.sub.unlink()
                real.rename(self.sub)


@pytest.fixture
def swapper(folder: Path, tmp_path: Path) -> Iterator[Swapper]:
    sub, mirror = folder / "artifacts/sub", tmp_path / "mirror"
    sub.mkdir()
    mirror.mkdir()
    for i in range(300):
        (sub / f"f{i:03}.bin").write_bytes(b"job's own bytes %d\n" % i)
        # Outside, the same names hold the secret: a path resolved twice finds a file.
        (mirror / f"f{i:03}.bin").write_bytes(SECRET)
        (mirror / f"f{i:03}.bin").chmod(0o600)
    running = Swapper(sub, tmp_path / "parked", mirror)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_directory_swapped_for_symlink_in_a_loop_never_leaks(folder: Path,
                                                             swapper: Swapper) -> None:
    # Given a live process swapping artifacts/sub for a symlink to an outside directory
    for i in range(40):
        (folder / f"artifacts/before/{i:02}").mkdir(parents=True)
        (folder / f"artifacts/before/{i:02}/x.bin").write_bytes(b"x" * i)
    secret_hash = hashlib.sha256(SECRET).hexdigest()
    races = interfered = 0
    deadline = time.monotonic() + 3.0
    # When the folder is sealed over and over while it swaps
    while races < 200 and time.monotonic() < deadline:
        info = write_package(folder, OUTPUT)
        races += 1
        # Then no package ever holds a byte of the outside directory
        with zipfile.ZipFile(folder.with_name("job_s.zip")) as zf:
            assert [n for n in zf.namelist() if SECRET in zf.read(n)] == []
        assert SECRET not in (folder / "output.json").read_bytes()
        assert [m["path"] for m in info.manifest if m["sha256"] == secret_hash] == []
        seen = {s["reason"] for s in info.skipped if s["path"] == "artifacts/sub"}
        assert seen <= {"symlink", "changed during sealing"}
        in_sub = sum(m["path"].startswith("artifacts/sub/") for m in info.manifest)
        interfered += bool(seen) or in_sub != 300
    assert swapper.proc.poll() is None, "the swapper stopped early"
    swapper.stop()
    assert races >= 20 and interfered > 0, (races, interfered)
    # Once it is stopped, the last package checks out, and a fresh seal has all of sub/.
    assert_sealed(info, folder)
    final = write_package(folder, OUTPUT)
    assert sum(m["path"].startswith("artifacts/sub/") for m in final.manifest) == 300
    assert_sealed(final, folder)


def test_a_flood_of_files_is_cut_at_max_files_and_the_agents_own_are_kept(
        folder: Path) -> None:
    # Given a job that made 300 files, 200 of them in a folder named to sort before logs/
    (folder / "logs/stderr.log").write_bytes(b"warn\n")
    for i in range(200):
        (folder / "aaa" / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (folder / "aaa" / f"d{i % 4}" / f"f{i:03}").write_bytes(b"x")
    for i in range(100):
        (folder / "artifacts" / f"a{i:03}").write_bytes(b"y")
    # When the folder is sealed with a limit of 50 entries
    info = write_package(folder, OUTPUT, max_files=50)
    # Then it holds what the first 50 were (aaa/, aaa/d0/ and 48 files of it), then the
    # logs and result.txt past the stop, no more
    paths = [m["path"] for m in info.manifest]
    assert paths[:48] == [f"aaa/d0/f{4 * i:03}" for i in range(48)]
    assert paths[48:] == ["result.txt", "logs/stdout.log", "logs/stderr.log"]
    # And the stop is listed once, with the first entry it left out
    assert info.skipped == [{"path": "aaa/d0/f192",
                             "reason": "past max_job_files: this and every later entry "
                                       "left out"}]
    assert_sealed(info, folder)
    # And without a limit every file is packaged
    assert len(write_package(folder, OUTPUT, max_files=None).manifest) == 303


def test_files_past_max_bytes_are_left_out_and_the_agents_own_kept(folder: Path) -> None:
    # Given a job that made a sparse file of 2 GiB at no cost (truncate), files that
    # fill a 1 MiB budget before result.txt, a file that fits after the sparse one, and
    # logs past the budget on their own
    with open(folder / "artifacts/sparse", "wb") as sparse:
        sparse.truncate(2 << 30)
    (folder / "artifacts/a-fill").write_bytes(b"f" * ((1 << 20) - 5))
    (folder / "artifacts/b-big").write_bytes(b"b" * 100)
    (folder / "logs/stderr.log").write_bytes(b"e" * (2 << 20))
    # When the folder is sealed with max_bytes = 1 MiB
    started = time.monotonic()
    info = write_package(folder, OUTPUT, max_bytes=1 << 20)
    # Then the sparse file and the one that no longer fits are left out, each listed;
    # result.txt (its share set aside first) and the logs are kept whole
    assert time.monotonic() - started < 10  # 2 GiB read and zipped took ~12 s
    assert [m["path"] for m in info.manifest] == [
        "artifacts/a-fill", "logs/stderr.log", "logs/stdout.log", "result.txt"]
    assert info.skipped == [{"path": path, "reason": "past max_job_output_mb: left out"}
                            for path in ("artifacts/b-big", "artifacts/sparse")]
    assert info.zip_path is not None and info.zip_path.stat().st_size < 4 << 20
    assert_sealed(info, folder)
    # And the folder still holds what was left out, for the operator to look at
    assert (folder / "artifacts/sparse").stat().st_size == 2 << 30


def test_links_count_against_max_files_too(folder: Path) -> None:
    # Given 5,000 symlinks (never packaged, but each one a name for the walk)
    for i in range(5000):
        os.symlink("/etc/hostname", folder / "artifacts" / f"l{i:04}")
    # When the folder is sealed with a limit of 100 entries
    info = write_package(folder, OUTPUT, max_files=100)
    # Then the walk stops after 100, lists 99 links and the stop, and keeps the agent's own
    assert len(info.skipped) == 100 and info.skipped[-1]["path"] == "artifacts/l0099"
    assert info.skipped[-1]["reason"].startswith("past max_job_files")
    assert [m["path"] for m in info.manifest] == ["result.txt", "logs/stdout.log"]
    assert_sealed(info, folder)


def test_left_out_entries_are_listed_up_to_a_bound_then_counted(folder: Path) -> None:
    # Given 1,010 symlinks (each left out, each a line in skipped)
    for i in range(1010):
        os.symlink("/etc/hostname", folder / "artifacts" / f"l{i:04}")
    # When the folder is sealed
    info = write_package(folder, OUTPUT)
    # Then the first 1,000 are listed, and one more line counts the rest
    assert len(info.skipped) == 1001
    assert info.skipped[999] == {"path": "artifacts/l0999", "reason": "symlink"}
    assert info.skipped[1000] == {"path": "...", "reason": "10 more entries left out "
                                  "(only the first 1000 are listed)"}
    assert json.loads((folder / "output.json").read_text())["skipped"] == info.skipped
    assert_sealed(info, folder)


def make_locked_job(root: Path) -> Path:
    """A job folder whose job took its own permissions away: a folder of mode 000 and
    one of 600 (listed, not entered) in artifacts/, and the folder's own top at 500."""
    job = root / "jobs" / "job_locked"
    (job / "logs").mkdir(parents=True)
    (job / "logs" / "stdout.log").write_text("ran\n")
    (job / "result.txt").write_text("done\n")
    for name, mode in (("sealed", 0o000), ("dark", 0o600)):
        (job / "artifacts" / name).mkdir(parents=True)
        (job / "artifacts" / name / "weights.bin").write_bytes(b"w" * 1000)
        (job / "artifacts" / name).chmod(mode)
    job.chmod(0o500)
    return job


def test_a_package_whose_job_locked_it_is_still_sealed(tmp_path: Path) -> None:
    # Given a job that locked its package's folders (the seal met EACCES and the job
    # was reported without a package)
    def seal() -> dict[str, Any]:
        job = make_locked_job(tmp_path)
        info = seal_unlocking(job, dict(OUTPUT))
        assert info is not None
        return {"files": [m["path"] for m in info.manifest], "skipped": info.skipped}

    # When it is sealed by the agent's own user (no capability: modes hold)
    sealed = without_privileges(seal)
    # Then the folders were opened back up and everything the job wrote is in it
    assert sealed["files"] == ["artifacts/dark/weights.bin", "artifacts/sealed/weights.bin",
                               "logs/stdout.log", "result.txt"], sealed
    folder = tmp_path / "jobs" / "job_locked"
    check = subprocess.run(["sha256sum", "-c", "--strict", "output.sha256"], cwd=folder,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_tree_whose_job_locked_it_is_still_removed(tmp_path: Path) -> None:
    # Given the same folders, a job's scratch or an old package (rmtree left them)
    def remove() -> bool:
        job = make_locked_job(tmp_path)
        remove_tree(job)
        return os.path.lexists(job)

    # Then removing it as the agent's user leaves nothing
    assert without_privileges(remove) is False
    assert list((tmp_path / "jobs").iterdir()) == []


def test_a_folder_a_job_locked_hides_nothing_from_its_quota(tmp_path: Path) -> None:
    # Given the same folders while the job runs (its 2,000 bytes in locked folders were
    # invisible to the quota's walk, so a job could write past max_job_output_mb)
    def usage() -> list[int]:
        job = make_locked_job(tmp_path)
        return list(folder_usage(job))

    # Then the walk, as the agent's user, counts every byte and every entry
    size, entries = without_privileges(usage)
    assert size == 2 * 1000 + len("ran\n") + len("done\n")
    assert entries == 8  # logs, its log, result.txt, artifacts, 2 folders, 2 files
