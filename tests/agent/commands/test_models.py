"""`miner-agent models` as an operator runs it: real processes, a hub on loopback, and
inference jobs that find a stored model by name through `exec` and the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser
from agent.reference.coordinator import ReferenceCoordinator
from tests.agent.daemon.helpers import AgentProcess, Client, start_coordinator
from tests.agent.execution.hubserver import FakeRepo, serve_hub

CLI = [sys.executable, "-m", "agent"]
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": os.urandom(20000),
         "tokenizer/tokenizer.json": b'{"version": "1.0"}', "README.md": b"# tiny\n"}


def models_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`miner-agent models ARGS` with the store under tmp_path and no inherited hub setup
    (TRANSFORMERS_OFFLINE too: huggingface_hub reads it as HF_HUB_OFFLINE, and an
    in-process inference test of the same worker sets both)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MINER_AGENT_", "HF_", "HUGGING_FACE", "TRANSFORMERS_"))}
    base.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_CACHE_DIR": str(
        tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env})
    return subprocess.run([*CLI, "models", *args], env=base, capture_output=True, text=True,
                          timeout=60)


def lock_entries(tmp_path: Path) -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads((tmp_path / "cache/models/models.lock").read_text())
    return list(data["models"])


def test_pull_downloads_from_a_hub_with_huggingface_hub_and_pins_the_commit(
        tmp_path: Path) -> None:
    with serve_hub([FakeRepo("acme/tiny", FILES, commit=COMMIT)]) as hub:
        # When a model is pulled by branch, then it is fetched at the commit it resolves to
        done = models_cli(tmp_path, "pull", "tiny:1b", "--repo", "acme/tiny",
                          HF_ENDPOINT=hub.url)
        assert done.returncode == 0, done.stderr
        assert "GET /api/models/acme/tiny/revision/main" in hub.requests
        assert {f"GET /acme/tiny/resolve/{COMMIT}/{name}" for name in FILES} <= set(
            hub.requests)
        (entry,) = lock_entries(tmp_path)
        assert entry["source"] == {"kind": "hub", "repo": "acme/tiny", "revision": "main",
                                   "commit": COMMIT, "allow_patterns": []}
        assert {f["path"]: f["sha256"] for f in entry["files"]} == {
            name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
        folder = tmp_path / "cache/models" / entry["folder"]
        assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
        assert not (folder / ".cache").exists()  # huggingface_hub's bookkeeping stays out
        # A re-pull by commit is checked against the lock file: no request at all
        hub.requests.clear()
        again = models_cli(tmp_path, "pull", "tiny:1b", "--repo", "acme/tiny", "--revision",
                           COMMIT, HF_ENDPOINT=hub.url)
        assert again.returncode == 0 and "already stored, verified" in again.stdout
        assert hub.requests == []
        # and offline, the branch stands for the commit an earlier pull resolved it to
        offline = models_cli(tmp_path, "pull", "tiny:1b", "--repo", "acme/tiny",
                             HF_HUB_OFFLINE="1")
        assert offline.returncode == 0 and "already stored" in offline.stdout
        # --allow-pattern downloads only what matches (fnmatch: * spans folders too)
        some = models_cli(tmp_path, "pull", "tiny-config", "--repo", "acme/tiny",
                          "--allow-pattern", "*.json", HF_ENDPOINT=hub.url)
        assert some.returncode == 0, some.stderr
    listed = json.loads(models_cli(tmp_path, "list", "--json").stdout)
    assert {r["name"]: r["files"] for r in listed} == {"tiny:1b": 4, "tiny-config": 2}
    assert listed[0]["revision"] == f"main@{COMMIT[:12]}"
    assert models_cli(tmp_path, "verify").returncode == 0


def test_a_gated_repo_needs_hf_token(tmp_path: Path) -> None:
    with serve_hub([FakeRepo("acme/gated", FILES)], token="hf_secret") as hub:
        refused = models_cli(tmp_path, "pull", "g", "--repo", "acme/gated",
                             HF_ENDPOINT=hub.url)
        assert refused.returncode == 12, refused.stderr
        assert "hub_refused" in refused.stderr and "HF_TOKEN" in refused.stderr
        done = models_cli(tmp_path, "pull", "g", "--repo", "acme/gated",
                          HF_ENDPOINT=hub.url, HF_TOKEN="hf_secret")
        assert done.returncode == 0, done.stderr
        assert "hf_secret" not in done.stdout + done.stderr


def test_hub_failures_say_what_to_do_next(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    down = models_cli(tmp_path, "pull", "m", "--repo", "acme/tiny", HF_ENDPOINT=dead)
    assert down.returncode == 10, down.stderr
    assert "--from" in down.stderr and "HF_ENDPOINT" in down.stderr
    offline = models_cli(tmp_path, "pull", "m", "--repo", "acme/tiny", HF_HUB_OFFLINE="1")
    assert offline.returncode == 10 and "--from" in offline.stderr
    with serve_hub([FakeRepo("acme/tiny", FILES)]) as hub:
        missing = models_cli(tmp_path, "pull", "m", "--repo", "acme/nope", HF_ENDPOINT=hub.url)
        no_rev = models_cli(tmp_path, "pull", "m", "--repo", "acme/tiny", "--revision", "v9",
                            HF_ENDPOINT=hub.url)
    assert missing.returncode == 11 and "check --repo" in missing.stderr
    assert no_rev.returncode == 11
    bad = models_cli(tmp_path, "pull", "../escape", "--repo", "acme/tiny")
    assert bad.returncode == 2 and "bad_model_name" in bad.stderr
    bad_repo = models_cli(tmp_path, "pull", "m", "--repo", "../../etc")
    assert bad_repo.returncode == 2
    for done in (down, offline, missing, no_rev, bad, bad_repo):
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache/models/models.lock").exists()


def test_verify_rm_and_list_from_the_command_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "weights.bin").write_bytes(b"w" * 5000)
    config = tmp_path / "agent.toml"
    config.write_text(f'[models]\n"m:1" = "{tmp_path / "elsewhere"}"\nonly = "/srv/only"\n')
    assert models_cli(tmp_path, "pull", "m:1", "--from", str(src)).returncode == 0
    table = models_cli(tmp_path, "list", MINER_AGENT_CONFIG=str(config)).stdout
    assert "config [models] wins" in table and "/srv/only" in table
    (entry,) = lock_entries(tmp_path)
    weights = tmp_path / "cache/models" / entry["folder"] / "weights.bin"
    weights.write_bytes(b"x" * 5000)
    broken = models_cli(tmp_path, "verify", "m:1")
    assert broken.returncode == 8 and "FAIL m:1: weights.bin" in broken.stdout
    assert "pull it again" in broken.stderr
    # rm refuses while a process has the model open, unless --force
    holder = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); "
                               "print(1, flush=True); sys.stdin.read()", str(weights)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        busy = models_cli(tmp_path, "rm", "m:1")
        assert busy.returncode == 1 and str(holder.pid) in busy.stderr
        assert "--force" in busy.stderr and weights.exists()
    finally:
        holder.communicate("", timeout=10)
    assert models_cli(tmp_path, "rm", "m:1").returncode == 0
    assert not weights.parent.exists()
    gone = models_cli(tmp_path, "rm", "m:1")
    assert gone.returncode == 11 and "models list" in gone.stderr
    assert models_cli(tmp_path, "verify", "m:1").returncode == 11


@pytest.mark.parametrize("verb", ["list", "pull", "rm", "verify"])
def test_every_models_verb_has_help_with_examples(verb: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["models", verb, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "miner-agent models pull" in text


# -- jobs find stored models by name --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples' tiny GPT-2 (random weights, a word-level tokenizer), built offline."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-gpt2"
    done = subprocess.run([sys.executable, str(EXAMPLES / "tiny_model.py"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


INFERENCE = {"type": "inference", "model": "stored:tiny", "prompt": "once upon a time",
             "max_new_tokens": 8, "seed": 1}


@pytest.mark.slow
def test_exec_runs_inference_on_a_model_from_the_store(tmp_path: Path, tiny_gpt2: Path) -> None:
    assert models_cli(tmp_path, "pull", "stored:tiny", "--from", str(tiny_gpt2)).returncode == 0
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "stored", "payload": INFERENCE}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINER_AGENT_")}
    env.update({"MINER_AGENT_CONFIG": "/dev/null", "MINER_AGENT_CACHE_DIR": str(
        tmp_path / "cache")})
    done = subprocess.run([*CLI, "exec", str(job), "--out", str(tmp_path / "out"), "--json",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["status"] == "completed"
    assert output["metrics"]["tokens_generated"] == 8


@pytest.fixture
def core(tmp_path: Path) -> Iterator[ReferenceCoordinator]:
    coord = start_coordinator(tmp_path / "coord", extensions=())
    yield coord
    coord.stop()


@pytest.mark.slow
def test_the_daemon_advertises_and_serves_a_stored_model(
        core: ReferenceCoordinator, tmp_path: Path, tiny_gpt2: Path,
        agents: list[AgentProcess]) -> None:
    # Given a model pulled into the store of an agent's cache dir
    state = tmp_path / "state"
    done = models_cli(state, "pull", "stored:tiny", "--from", str(tiny_gpt2))
    assert done.returncode == 0, done.stderr
    client = Client(core)
    job_id = client.submit(INFERENCE)
    # When the agent runs until the coordinator has nothing for it
    agent = AgentProcess(core.base_url, state, burst=True, cpu_slots=1)
    agents.append(agent)
    assert agent.wait(120) == 0, agent.log()
    # Then it advertised the stored name (dispatch matched the job's model on it) and ran it
    miner = core.store.miner("miner-1")
    assert miner is not None and "stored:tiny" in miner["capabilities"]["models"]
    job = client.job(job_id)
    assert job["status"] == "completed", job
