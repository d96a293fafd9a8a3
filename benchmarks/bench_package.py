"""A large package through the coordinator: the memory it costs, and its download time.

    python -m benchmarks.bench_package [--mb N] [--downloads D]

Setup: as in bench_logs: a real daemon (`miner-agent run`, two CPU slots) serving
(1) the reference coordinator as its own process, every extension, no rate limits, and
(2) its embedded coordinator, which lives in the agent's own process.

Workload: one `command` job that writes N MB (default 200) of random bytes into its
artifacts, so its package zip (stored, not deflated: random bytes do not shrink) is
about N MB. The agent seals it and uploads it (`PUT .../package`); then a client
downloads it D times (default 3) over `GET /v1/jobs/{id}/download`, reading 1 MiB
pieces, and checks its sha256 against `X-Content-SHA256`.

Figures: the peak RSS (VmHWM, /proc/PID/status) of the agent process, and of the
coordinator process where it is one, after the upload and after the downloads; the
download's wall time, median and spread (min-max) over the D downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.reference.model import EXTENSIONS
from benchmarks.bench_logs import Node
from benchmarks.loopback import status_kib


def mb(pid: int) -> float:
    return status_kib(pid, "VmHWM") * 1024 / 1e6


def run_job(node: Node, size: int) -> str:
    script = f'head -c {size} /dev/urandom > "$MINER_ARTIFACTS_DIR/random.bin"'
    payload = {"type": "command", "argv": ["sh", "-c", script]}
    resp = node.http.post("/v1/jobs", json={"payload": payload})
    resp.raise_for_status()
    job_id = str(resp.json()["job_id"])
    deadline = time.monotonic() + 600
    while (view := node.http.get(f"/v1/jobs/{job_id}").json())["status"] != "completed":
        if view["status"] in ("failed", "canceled") or time.monotonic() > deadline:
            raise RuntimeError(f"the job did not complete: {view['status']} "
                               f"{view.get('error')}; see {node.log.name}")
        time.sleep(0.1)
    if not view.get("package"):
        raise RuntimeError(f"the job completed without a package; see {node.log.name}")
    return job_id


def download(node: Node, job_id: str) -> float:
    t0 = time.monotonic()
    digest = hashlib.sha256()
    with node.http.stream("GET", f"/v1/jobs/{job_id}/download", timeout=120) as resp:
        resp.raise_for_status()
        for piece in resp.iter_bytes(1 << 20):
            digest.update(piece)
        expected = resp.headers["X-Content-SHA256"]
    seconds = time.monotonic() - t0
    if digest.hexdigest() != expected:
        raise RuntimeError("the download does not match its X-Content-SHA256")
    return seconds


def measure(root: Path, extensions: str | None, size: int, downloads: int) -> dict[str, Any]:
    node = Node(root, extensions)
    try:
        job_id = run_job(node, size)
        got: dict[str, Any] = {"package_mb": node.http.get(f"/v1/jobs/{job_id}").json()
                               ["package"]["size"] / 1e6,
                               "agent_upload_mb": mb(node.agent.pid)}
        if node.coord is not None:
            got["coordinator_upload_mb"] = mb(node.coord.pid)
        got["seconds"] = [download(node, job_id) for _ in range(downloads)]
        got["agent_download_mb"] = mb(node.agent.pid)
        if node.coord is not None:
            got["coordinator_download_mb"] = mb(node.coord.pid)
        return got
    finally:
        node.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200,
                        help="MB of random bytes the job writes (default 200; the reference "
                             "coordinator takes packages up to 256 MiB)")
    parser.add_argument("--downloads", type=int, default=3, help="downloads (default 3)")
    args = parser.parse_args()
    print(__doc__.split("\n\n", 2)[2].rstrip())
    with tempfile.TemporaryDirectory(prefix="bench-package-") as tmp:
        for name, extensions in (("separate", ",".join(EXTENSIONS)), ("embedded", None)):
            got = measure(Path(tmp) / name, extensions, args.mb * 1000 * 1000, args.downloads)
            secs = got["seconds"]
            print(f"\n== {name} coordinator: a {got['package_mb']:.1f} MB package ==")
            print(f"agent peak RSS after the upload      : {got['agent_upload_mb']:7.1f} MB")
            print(f"agent peak RSS after the downloads   : {got['agent_download_mb']:7.1f} MB")
            if "coordinator_upload_mb" in got:
                print(f"coordinator peak RSS after the upload: "
                      f"{got['coordinator_upload_mb']:7.1f} MB")
                print(f"coordinator peak RSS after downloads : "
                      f"{got['coordinator_download_mb']:7.1f} MB")
            print(f"download wall time                   : median {statistics.median(secs):.2f} s"
                  f"  spread {min(secs):.2f}-{max(secs):.2f} s  (n={len(secs)})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
