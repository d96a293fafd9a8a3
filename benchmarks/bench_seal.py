"""What a flood of files costs the seal, with the package's entry limit and without.

    python -m benchmarks.bench_seal [--files N] [--limit N] [--pairs N] [--dir DIR]

A job can make empty files far faster than a seal can hash, zip and list them, and
each one the seal takes costs the agent memory (its manifest line, its zip entry, its
line in output.json). This makes a package folder of ``--files`` empty files (in
folders of 1,000, under ``artifacts/``) on ``--dir``, then seals it with
``write_package`` in a fresh child process per seal, once with ``max_files=--limit``
(``max_job_files``' default) and once without a limit, the order alternating pair by
pair. Figures per arm: the seal's wall time and the child's peak RSS (``ru_maxrss``
read after the seal, less what it had after its imports), medians with the spread,
and the per-pair ratio limited/unlimited of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_core import alternate, spread

ARMS = ["limited", "unlimited"]

CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
from agent.execution.package import write_package
folder, limit = Path(sys.argv[1]), int(sys.argv[2]) or None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
info = write_package(folder, {"job_id": "flood", "status": "completed"}, max_files=limit)
took = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seal_s": took, "rss_mb": (peak - before) / 1024,
                  "packaged": len(info.manifest)}))
"""


def make_folder(root: Path, files: int) -> Path:
    folder = root / "job_flood"
    for name in ("logs", "artifacts"):
        (folder / name).mkdir(parents=True)
    (folder / "logs" / "stdout.log").write_bytes(b"made files\n")
    (folder / "result.txt").write_text("made\n")
    sub = folder / "artifacts"
    for i in range(files):
        if i % 1000 == 0:
            sub = folder / "artifacts" / f"d{i // 1000:04}"
            sub.mkdir()
        os.close(os.open(sub / f"f{i:07}", os.O_CREAT | os.O_WRONLY, 0o644))
    return folder


def seal_once(folder: Path, limit: int) -> dict[str, float]:
    for stale in (folder / "output.json", folder / "output.sha256",
                  folder.with_name(folder.name + ".zip")):
        stale.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(limit)],
                          capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout))


def main(argv: list[str] | None = None) -> int:
    from agent.execution.sealwalk import MAX_FILES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000,
                        help="empty files in the package folder (default 200000)")
    parser.add_argument("--limit", type=int, default=MAX_FILES,
                        help=f"max_files of the limited arm (default {MAX_FILES})")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of seals (default 3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to make the folder (default: the temp dir)")
    args = parser.parse_args(argv)
    print(__doc__.split("\n\n", 2)[2].strip(), end="\n\n")
    root = Path(tempfile.mkdtemp(prefix="bench-seal-", dir=args.dir))
    try:
        folder = make_folder(root, args.files)
        results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
        for pair in range(args.pairs):
            for arm in alternate(pair, ARMS):
                results[arm].append(seal_once(folder, args.limit if arm == "limited" else 0))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.files} empty files, limit {args.limit} entries, on {args.dir or 'the temp dir'}")
    for arm in ARMS:
        rows = results[arm]
        print(f"  {arm:9}: seal {spread([r['seal_s'] for r in rows], ' s')}; "
              f"peak RSS {spread([r['rss_mb'] for r in rows], ' MB', 0)}; "
              f"files packaged {int(rows[0]['packaged'])}")
    for key, label in (("seal_s", "seal time"), ("rss_mb", "peak RSS")):
        ratios = [lim[key] / max(unl[key], 1e-9)
                  for lim, unl in zip(results["limited"], results["unlimited"], strict=True)]
        print(f"  {label}, limited/unlimited per pair: {spread(ratios, 'x')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
