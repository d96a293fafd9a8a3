"""`miner-agent download`: fetch a job's package from the coordinator and check it.

The zip lands as ``job_<ID>.zip`` (written beside as ``.part`` first, so a broken
transfer never leaves a file that looks whole) with its ``job_<ID>.zip.sha256`` sidecar
(``sha256sum -c`` accepts it). Checks, always on: the bytes against the coordinator's
``X-Content-SHA256``, then every file against ``output.sha256`` and ``output.json``'s
manifest, in the zip or, with ``--extract``, in the folder it was unpacked to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

from agent.commands.client import call, job_id, json_flag, span_arg, target, verb
from agent.commands.options import Sub
from agent.coordinator.jobs_api import JobsClient
from agent.coordinator.transport import CoordinatorHTTPError
from agent.errors import ExitCode
from agent.execution.verify import VerifyReport, verify_folder, verify_zip
from agent.layout import checksum_of, job_folder
from agent.text import printable

UNPACK_MARGIN_BYTES = 256 << 20  # left free on the disk an unpacked package goes to


def add_parsers(sub: Sub) -> None:
    p = verb(sub, "download", "download a job's package and check it",
             "Download the job's result package as DIR/job_<ID>.zip (with its .sha256), check "
             "it against the coordinator's sha256 and every file against the package's "
             "manifest and checksums, and say OK or which file is wrong (exit 8). 11 when the "
             "coordinator holds no package for the job.")
    p.add_argument("--out", "--output", dest="out", type=Path, default=Path("."),
                   metavar="DIR", help="where to write it (the current folder)")
    p.add_argument("--extract", action="store_true",
                   help="also unpack it to DIR/job_<ID>/ and check the files there; a "
                   f"package that would leave DIR's disk with under {UNPACK_MARGIN_BYTES >> 20} "
                   "MiB free is not unpacked (exit 12; the zip is kept)")
    p.add_argument("--checksum", action="store_true",
                   help="the guide's spelling: checking is always on, and the .sha256 "
                   "sidecar is always written")
    json_flag(p, "print the outcome as JSON: path, sha256, size, ok, problems")
    p.set_defaults(func=cmd_download)

    p = verb(sub, "share", "print a signed, time-limited download URL for a job's package",
             "Ask the coordinator for a download URL of the job's package that works without "
             "an API key until it expires (the reference coordinator signs it; a restarted "
             "coordinator no longer honours older links). Anyone holding the URL can fetch "
             "the package: share it like a password. 11 when the job has no package.")
    p.add_argument("--expires", type=span_arg, default=3600.0, metavar="SPAN",
                   help="how long the URL works: 90s, 30m, 6h, 7d (1h; at most 30d)")
    json_flag(p, "print the URL and its expiry as JSON")
    p.set_defaults(func=cmd_share)


def cmd_share(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    with JobsClient(where.url, where.key) as client:
        answer = call(where, client.share, jid, args.expires)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["url"])
        print(f"expires {answer['expires_at']}", file=sys.stderr)
    return ExitCode.OK


def cmd_download(args: argparse.Namespace) -> int:
    jid = job_id(args)
    where = target(args)
    args.out.mkdir(parents=True, exist_ok=True)
    zip_path = args.out / f"job_{jid}.zip"
    part = zip_path.with_name(f".{zip_path.name}.part")
    with JobsClient(where.url, where.key, timeout_s=60.0) as client:
        try:
            actual, expected, size = call(where, client.download, jid, part)
        except CoordinatorHTTPError as exc:
            part.unlink(missing_ok=True)
            if exc.status == 404:
                _no_package_here(client, jid)
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, zip_path)
    checksum_of(zip_path).write_text(f"{expected or actual}  {zip_path.name}\n")
    problems = []
    if expected and expected != actual:
        problems.append(f"{zip_path.name}: sha256 {actual} is not the coordinator's "
                        f"{expected} (the transfer was damaged: download it again)")
    report, folder, not_unpacked = _check(zip_path, args.out, jid, args.extract)
    problems += report.problems
    code = _say(args, zip_path, folder, actual, size, report.checked, problems)
    if not_unpacked is not None and code == ExitCode.OK:
        print(f"not unpacked: {not_unpacked}", file=sys.stderr)
        return ExitCode.REFUSED
    return code


def _check(zip_path: Path, out: Path, jid: str,
           extract: bool) -> tuple[VerifyReport, Path | None, str | None]:
    """The zip's check, and with ``extract`` the unpacked folder's; or why it was not
    unpacked (a package a miner made may unpack to far more than it weighs)."""
    report = verify_zip(zip_path)
    if not extract or any("not a readable zip" in p or "leaves the package" in p
                          for p in report.problems):
        return report, None, None
    with zipfile.ZipFile(zip_path) as zf:
        unpacked = sum(info.file_size for info in zf.infolist())
        free = shutil.disk_usage(out).free
        if unpacked > free - UNPACK_MARGIN_BYTES:
            return report, None, (f"it unpacks to {unpacked / 2**30:.1f} GiB and {out} has "
                                  f"{free / 2**30:.1f} GiB free (keeping "
                                  f"{UNPACK_MARGIN_BYTES >> 20} MiB); the zip is kept: "
                                  "unpack it where there is room")
        zf.extractall(out)  # verify_zip refused any name that leaves the folder
        tops = {n.split("/", 1)[0] for n in zf.namelist()}
    folder = out / tops.pop() if len(tops) == 1 else job_folder(out, jid)
    return verify_folder(folder), folder, None


def _say(args: argparse.Namespace, zip_path: Path, folder: Path | None, sha: str, size: int,
         checked: int, problems: list[str]) -> int:
    if args.json:
        out: dict[str, Any] = {"job_id": job_id(args), "path": str(zip_path), "sha256": sha,
                               "size": size, "extracted": str(folder) if folder else None,
                               "ok": not problems, "checked": checked, "problems": problems}
        print(json.dumps(out, indent=2))
    else:
        for problem in problems:  # names a miner chose: shown, never acted on
            print(f"FAIL {printable(problem, one_line=True)}")
        if not problems:
            where = f", unpacked to {folder}" if folder else ""
            print(f"OK {zip_path}: {checked} files match their checksums (sha256 {sha}, "
                  f"{size} bytes{where})")
    if problems:
        print(f"{zip_path}: {len(problems)} problem(s): the package is damaged or was "
              "changed; download it again", file=sys.stderr)
        return ExitCode.VERIFY_FAILED
    return ExitCode.OK


def _no_package_here(client: JobsClient, jid: str) -> None:
    """Say where the package is when the coordinator has none (only the agent's copy)."""
    try:
        job = client.job(jid)
    except CoordinatorHTTPError:
        return  # no such job: the 404 says it
    result = job.get("result")
    block = result.get("package") if isinstance(result, dict) else None
    location = block.get("location") if isinstance(block, dict) else None
    status = job.get("status")
    if location:
        print(f"note: the coordinator holds no package for {jid}; its agent kept it at "
              f"{location}", file=sys.stderr)
    elif status not in ("completed", "failed", "canceled"):
        print(f"note: {jid} is {status}: its package comes when it ends", file=sys.stderr)
