"""Every job in examples/ runs through the real `miner-agent exec` and leaves a valid package.

The tiny model and the batch files are built into a temporary folder by the same scripts
examples/README.md tells a newcomer to run, so the test never writes into the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.execution.verify import verify
from runtimes.inference import load_model_registry
from runtimes.registry import BUILTIN_RUNTIMES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLI = [sys.executable, "-m", "agent"]
BATCH_JOB = "batch/batch-inference-job.json"  # written by batch_job.py, not kept in git


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny model, a models file naming it, and the batch job."""
    root = tmp_path_factory.mktemp("examples")
    for script, out in (("tiny_model.py", root / "tiny-gpt2"), ("batch_job.py", root / "batch")):
        done = subprocess.run([sys.executable, str(EXAMPLES / script), str(out)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    # Absolute: `exec` binds a models file's folders into the sandbox only when they
    # are absolute, and /tmp is covered there.
    (root / "models.toml").write_text(f'tiny-gpt2 = "{root / "tiny-gpt2"}"\n')
    return root


def run_example(job_file: Path, out: Path, *flags: str) -> dict[str, object]:
    """`miner-agent exec JOB --out OUT`; the package's output.json once it is verified."""
    done = subprocess.run([*CLI, "exec", str(job_file), "--out", str(out), "--quiet", *flags],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(job_file.read_text())["job_id"]
    folder = out / f"job_{job_id}"
    for package in (folder, folder.with_suffix(".zip")):
        report = verify(package)
        assert report.ok, report.problems
    output: dict[str, object] = json.loads((folder / "output.json").read_text())
    return output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sleep-job.json", "train-job.json", "command-job.json"])
def test_self_contained_example_completes(tmp_path: Path, name: str) -> None:
    output = run_example(EXAMPLES / name, tmp_path)
    assert output["status"] == "completed"


@pytest.mark.slow
def test_inference_example_generates_with_the_tiny_model(tmp_path: Path, built: Path) -> None:
    output = run_example(EXAMPLES / "inference-job.json", tmp_path,
                         "--models", str(built / "models.toml"))
    assert output["status"] == "completed"
    metrics = output["metrics"]
    assert isinstance(metrics, dict) and metrics["tokens_generated"] == 48
    assert (tmp_path / "job_sample-inference" / "result.txt").read_text().strip()


@pytest.mark.slow
def test_batch_example_writes_every_output(tmp_path: Path, built: Path) -> None:
    # The batch files live under /tmp, which the sandbox covers; from the checkout
    # (examples/batch/) the job runs sandboxed, as examples/README.md shows.
    run_example(built / BATCH_JOB, tmp_path, "--no-sandbox")
    index = json.loads((tmp_path / "job_sample-batch" / "artifacts" / "outputs" /
                        "index.json").read_text())
    assert index["complete"] is True


def test_there_is_an_example_per_payload_type() -> None:
    kept = [json.loads(p.read_text())["payload"]["type"] for p in EXAMPLES.glob("*.json")]
    assert sorted({*kept, "batch_inference"}) == sorted(BUILTIN_RUNTIMES)
    assert "batch_inference" not in kept  # its job file is written by batch_job.py


def test_models_file_names_the_folder_tiny_model_builds() -> None:
    # A relative folder in a models file is relative to the file, not to the cwd.
    spec = importlib.util.spec_from_file_location("tiny_model", EXAMPLES / "tiny_model.py")
    assert spec is not None and spec.loader is not None
    tiny_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_model)  # its imports are argparse and pathlib only
    registry = load_model_registry({"MINER_MODELS_FILE": str(EXAMPLES / "models.toml")})
    assert registry == {"tiny-gpt2": str(tiny_model.DEFAULT_OUT)}
