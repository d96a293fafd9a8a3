"""install-service: dry run, a real install under a prefix, and an edited config refused."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from agent.commands import service
from agent.errors import ExitCode


def _run(*argv: str) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser(prog="miner-agent")
    service.add_parser(parser.add_subparsers())
    args = parser.parse_args(["install-service", *argv])
    lines: list[str] = []
    return args.func(args, out=lines.append), lines


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_dry_run_prints_every_action_and_writes_nothing(tmp_path: Path) -> None:
    code, lines = _run("--dry-run", "--prefix", str(tmp_path))
    assert code == 0
    assert list(tmp_path.iterdir()) == []
    text = "\n".join(lines)
    for expected in ("would mkdir -m 0750 " + str(tmp_path / "var/lib/miner-agent"),
                     "would write " + str(tmp_path / "etc/systemd/system/miner-agent.service"),
                     "would write " + str(tmp_path / "etc/systemd/system/miner-agent@.service"),
                     "would write " + str(tmp_path / "etc/miner-agent/agent.toml"),
                     "note: prefix install: no system user"):
        assert expected in text


def test_dry_run_on_the_system_shows_useradd_and_reload() -> None:
    # Never writes, so safe as any user; shows what root would get.
    code, lines = _run("--dry-run")
    assert code == 0
    text = "\n".join(lines)
    assert "/etc/systemd/system/miner-agent.service" in text
    if "user miner-agent exists" not in text:
        assert "would useradd --system --user-group" in text
        assert "--shell /usr/sbin/nologin" in text and "'GPU miner execution agent'" in text
    assert "systemctl enable --now miner-agent" in text


def test_prefix_install_then_reinstall_is_idempotent(tmp_path: Path) -> None:
    code, _ = _run("--prefix", str(tmp_path), "--exec-start", "/opt/miner/bin/miner-agent",
                   "--coordinator-url", "https://coord.example", "--miner-id", "m-42")
    assert code == 0
    unit = (tmp_path / "etc/systemd/system/miner-agent.service").read_text()
    assert "ExecStart=/opt/miner/bin/miner-agent run --config /etc/miner-agent/agent.toml" in unit
    config = tmp_path / "etc/miner-agent/agent.toml"
    assert 'miner_id = "m-42"' in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "var/lib/miner-agent").stat().st_mode) == 0o750
    before = _snapshot(tmp_path)
    code, lines = _run("--prefix", str(tmp_path), "--exec-start", "/opt/miner/bin/miner-agent",
                       "--coordinator-url", "https://coord.example", "--miner-id", "m-42")
    assert code == 0 and any("is up to date" in line for line in lines)
    assert _snapshot(tmp_path) == before


def test_an_unedited_config_is_upgraded_in_place(tmp_path: Path) -> None:
    assert _run("--prefix", str(tmp_path), "--miner-id", "old")[0] == 0
    # The template changes (here: a different miner id); the file was never touched by hand
    assert _run("--prefix", str(tmp_path), "--miner-id", "new")[0] == 0
    assert 'miner_id = "new"' in (tmp_path / "etc/miner-agent/agent.toml").read_text()


def test_an_edited_config_is_refused_then_kept_or_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given an install whose config the operator then edited
    assert _run("--prefix", str(tmp_path))[0] == 0
    config = tmp_path / "etc/miner-agent/agent.toml"
    edited = config.read_text().replace("jobs_per_gpu = 1", "jobs_per_gpu = 2")
    config.write_text(edited)
    (tmp_path / "etc/systemd/system/miner-agent.service").unlink()
    # When install-service runs again, it refuses, says how to proceed and writes nothing
    code, _ = _run("--prefix", str(tmp_path))
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG
    assert "was edited" in err and "--force" in err and "diff -u" in err and "--keep-config" in err
    assert config.read_text() == edited
    assert not (tmp_path / "etc/systemd/system/miner-agent.service").exists()
    # --keep-config installs the rest and leaves the file alone
    assert _run("--prefix", str(tmp_path), "--keep-config")[0] == 0
    assert config.read_text() == edited
    assert (tmp_path / "etc/systemd/system/miner-agent.service").exists()
    # --force replaces it and keeps a backup
    assert _run("--prefix", str(tmp_path), "--force")[0] == 0
    assert "jobs_per_gpu = 1" in config.read_text()
    backups = list(config.parent.glob("agent.toml.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == edited


def test_a_hand_written_config_without_our_hash_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "etc/miner-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text('coordinator_url = "https://mine.example"\n')
    assert _run("--prefix", str(tmp_path))[0] == ExitCode.CONFIG


def test_print_config_is_the_template_doctor_can_read(tmp_path: Path) -> None:
    from agent.node import doctor

    code, lines = _run("--print-config", "--miner-id", "m1",
                       "--coordinator-url", "https://coord.example")
    assert code == 0
    (tmp_path / "agent.toml").write_text(lines[0] + "\n")
    cfg = doctor.load_plain_config(tmp_path / "agent.toml")
    assert cfg.load_error is None and cfg.models == {}
    assert doctor.config_problems(cfg) == []
    assert cfg.drain_timeout_s == 120 and cfg.cancel_grace_s == 10 and cfg.metrics_port == 0


def test_values_that_would_break_the_toml_are_refused(tmp_path: Path) -> None:
    assert _run("--prefix", str(tmp_path), "--miner-id", 'x"\ny')[0] == ExitCode.CONFIG


def test_not_root_without_dry_run_or_prefix_is_refused() -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: a real install would happen")
    assert _run()[0] == ExitCode.USAGE
