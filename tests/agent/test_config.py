"""Config: file, then environment, then flags; secrets masked; errors say what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text('coordinator_url = "http://c.example:8000"\nheartbeat_interval_s = 7\n'
                        'jobs_per_gpu = 2\n[models]\n"llama3.2:3b" = "/srv/models/llama"\n')
    cfg = load_config(cfg_file, environ={"MINER_AGENT_HEARTBEAT_INTERVAL_S": "3",
                                         "MINER_AGENT_GPUS": "0,2"},
                      overrides={"jobs_per_gpu": 4})
    assert cfg.coordinator_url == "http://c.example:8000"
    assert cfg.heartbeat_interval_s == 3.0
    assert cfg.jobs_per_gpu == 4
    assert cfg.gpus == (0, 2)
    assert dict(cfg.models) == {"llama3.2:3b": "/srv/models/llama"}


def test_api_key_from_credential_file_and_masked(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "api-key").write_text("sekrit-key\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(Path("/dev/null"), environ={"MINER_AGENT_API_KEY": "other"})
    assert cfg.resolved_api_key() == "sekrit-key"
    assert cfg.masked()["api_key"] == "***"


@pytest.mark.parametrize("text, fragment", [
    ("heartbeat_interval_s = -1\n", "greater than 0"),
    ("launcher = 'magic'\n", "must be one of"),
    ("no_such_field = 1\n", "unknown config field"),
    ("coordinator_url = 'ftp://x'\n", "http://"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_config_is_refused_clearly(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path, environ={})


def test_config_show_masks_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('api_key = "do-not-print-me"\n')
    out = subprocess.run([sys.executable, "-m", "agent", "config", "show", "--config",
                          str(path)], capture_output=True, text=True, check=True)
    assert "do-not-print-me" not in out.stdout
    assert json.loads(out.stdout)["api_key"] == "***"


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "config", "show", "--config",
                          str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert out.returncode == 9
    assert "does not exist" in out.stderr and "install-service" in out.stderr


def test_relative_model_folders_are_relative_to_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "agent.toml"
    conf.parent.mkdir()
    conf.write_text('[models]\ntiny = "models/tiny"\nabs = "/srv/models/llama"\n')
    cfg = load_config(conf, environ={})
    assert dict(cfg.models) == {"tiny": str(tmp_path / "etc" / "models" / "tiny"),
                                "abs": "/srv/models/llama"}


def test_exec_binds_the_folders_a_models_file_names_as_the_runtime_reads_them(
        tmp_path: Path) -> None:
    from agent.commands.local import _model_paths

    models = tmp_path / "models.toml"
    models.write_text('[models]\ntiny = "models/tiny"\nabs = "/srv/llama"\n')
    assert _model_paths(models) == [tmp_path / "models" / "tiny", Path("/srv/llama")]
