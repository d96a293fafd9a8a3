"""Verify a result package, folder or zip, and say which file is wrong."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.execution.package import HASH_CHUNK, sha256_file
from agent.layout import CHECKSUMS, OUTPUT_JSON, checksum_of


@dataclass
class VerifyReport:
    """The verdict: ``ok`` and one line per problem."""

    path: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_checksums(text: str) -> list[tuple[str, str]]:
    """``sha256sum`` lines (``HEX  NAME`` or ``HEX *NAME``) as (hex, name)."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if not sep or len(digest) != 64 or not name:
            raise ValueError(f"{CHECKSUMS} line {number} is not 'SHA256  NAME'")
        entries.append((digest.lower(), name))
    return entries


def _unsafe(name: str) -> bool:
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts or name.startswith("/")


def verify_folder(folder: Path) -> VerifyReport:
    report = VerifyReport(folder)
    sums = folder / CHECKSUMS
    if not sums.is_file():
        report.problems.append(f"{CHECKSUMS}: missing (not a result package?)")
        return report
    try:
        entries = parse_checksums(sums.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        report.problems.append(str(exc))
        return report
    for digest, name in entries:
        report.checked += 1
        path = folder / name
        if _unsafe(name):
            report.problems.append(f"{name}: path leaves the package")
        elif path.is_symlink() or not path.is_file():
            report.problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            report.problems.append(f"{name}: checksum mismatch")
    _check_manifest(report, entries, (folder / OUTPUT_JSON).read_bytes()
                    if (folder / OUTPUT_JSON).is_file() else None)
    return report


def _check_manifest(report: VerifyReport, entries: list[tuple[str, str]],
                    output_json: bytes | None) -> None:
    """output.json's own manifest must agree with output.sha256."""
    if output_json is None:
        report.problems.append(f"{OUTPUT_JSON}: missing")
        return
    if OUTPUT_JSON not in {name for _, name in entries}:
        report.problems.append(f"{OUTPUT_JSON}: not covered by {CHECKSUMS}")
    try:
        files = json.loads(output_json).get("files", [])
    except (ValueError, AttributeError):
        report.problems.append(f"{OUTPUT_JSON}: not valid JSON")
        return
    listed = {name: digest for digest, name in entries}
    for item in files:
        name = item.get("path")
        if listed.get(name) != item.get("sha256"):
            report.problems.append(f"{name}: {OUTPUT_JSON} and {CHECKSUMS} disagree")


def verify_zip(zip_path: Path) -> VerifyReport:
    report = VerifyReport(zip_path)
    side = checksum_of(zip_path)
    if side.is_file():
        expected = side.read_text().split()[0].lower() if side.read_text().split() else ""
        if sha256_file(zip_path) != expected:
            report.problems.append(f"{zip_path.name}: checksum mismatch with {side.name}")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        report.problems.append(f"{zip_path.name}: not a readable zip ({exc})")
        return report
    with zf:
        _verify_zip_entries(zf, report)
    return report


def _verify_zip_entries(zf: zipfile.ZipFile, report: VerifyReport) -> None:
    names = zf.namelist()
    bad = [n for n in names if _unsafe(n)]
    if bad:
        report.problems.extend(f"{n}: path leaves the package" for n in bad)
        return
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        report.problems.append("zip must hold exactly one job_<ID>/ folder")
        return
    top = tops.pop()
    try:
        entries = parse_checksums(zf.read(f"{top}/{CHECKSUMS}").decode())
    except KeyError:
        report.problems.append(f"{CHECKSUMS}: missing")
        return
    except (ValueError, UnicodeDecodeError) as exc:
        report.problems.append(str(exc))
        return
    for digest, name in entries:
        report.checked += 1
        member = f"{top}/{name}"
        if member not in names:
            report.problems.append(f"{name}: missing")
            continue
        h = hashlib.sha256()
        with zf.open(member) as fh:
            while chunk := fh.read(HASH_CHUNK):
                h.update(chunk)
        if h.hexdigest() != digest:
            report.problems.append(f"{name}: checksum mismatch")
    out = f"{top}/{OUTPUT_JSON}"
    _check_manifest(report, entries, zf.read(out) if out in names else None)


def verify(path: Path) -> VerifyReport:
    """Verify a package folder or its zip."""
    if path.is_dir():
        return verify_folder(path)
    if path.is_file():
        return verify_zip(path)
    report = VerifyReport(path)
    report.problems.append(f"{path}: no such file or folder")
    return report
