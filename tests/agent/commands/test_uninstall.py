"""uninstall-service: against what install-service wrote under a temporary root."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.commands import service, uninstall

UNIT_DIR = "etc/systemd/system"


def _run(command: str, *argv: str) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser(prog="miner-agent")
    sub = parser.add_subparsers()
    service.add_parser(sub)
    uninstall.add_parser(sub)
    args = parser.parse_args([command, *argv])
    lines: list[str] = []
    return args.func(args, out=lines.append), lines


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """An install under tmp_path, enabled (with one instance), with a drop-in and state."""
    assert _run("install-service", "--prefix", str(tmp_path))[0] == 0
    units = tmp_path / UNIT_DIR
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    for name in ("miner-agent.service", "miner-agent@gpu0-3.service"):
        (wants / name).symlink_to(units / name.replace("gpu0-3", ""))
    (wants / "sshd.service").symlink_to("/lib/systemd/system/sshd.service")
    (units / "miner-agent.service.d").mkdir()
    (units / "miner-agent.service.d" / "override.conf").write_text("[Service]\n")
    (tmp_path / "etc/miner-agent/api-key").write_text("secret\n")
    (tmp_path / "var/lib/miner-agent/journal.db").write_text("")
    return tmp_path


def test_dry_run_lists_every_step_and_changes_nothing(installed: Path) -> None:
    before = _files(installed)
    code, lines = _run("uninstall-service", "--dry-run", "--purge", "--prefix", str(installed))
    assert code == 0
    assert _files(installed) == before
    units = installed / UNIT_DIR
    assert lines == [
        f"would remove {units}/multi-user.target.wants/miner-agent.service",
        f"would remove {units}/multi-user.target.wants/miner-agent@gpu0-3.service",
        f"would remove {units}/miner-agent.service",
        f"would remove {units}/miner-agent@.service",
        f"would remove {units}/miner-agent.service.d and everything in it",
        f"would remove {installed}/etc/miner-agent and everything in it",
        f"would remove {installed}/var/lib/miner-agent and everything in it",
        f"would remove {installed}/var/cache/miner-agent and everything in it",
        f"would remove {installed}/var/log/miner-agent and everything in it",
        "note: prefix uninstall: the system user 'miner-agent' is left",
    ]


def test_without_purge_the_units_go_and_the_nodes_own_stays(installed: Path) -> None:
    code, lines = _run("uninstall-service", "--prefix", str(installed))
    assert code == 0
    left = _files(installed)
    assert not any("miner-agent.service" in f or "miner-agent@" in f for f in left
                   if ".service.d" not in f)
    assert f"{UNIT_DIR}/multi-user.target.wants/sshd.service" in left  # not ours
    assert {"etc/miner-agent/agent.toml", "etc/miner-agent/api-key",
            "var/lib/miner-agent/journal.db", f"{UNIT_DIR}/miner-agent.service.d"} <= left
    assert lines[-1].startswith(f"note: kept: {installed}/etc/miner-agent, ")
    assert lines[-1].endswith("and the user miner-agent (--purge removes them)")


def test_purge_removes_everything_install_wrote_then_has_nothing_to_do(
        installed: Path) -> None:
    code, _ = _run("uninstall-service", "--purge", "--prefix", str(installed))
    assert code == 0
    assert _files(installed) == {"etc", "etc/systemd", UNIT_DIR,
                                 f"{UNIT_DIR}/multi-user.target.wants",
                                 f"{UNIT_DIR}/multi-user.target.wants/sshd.service",
                                 "var", "var/lib", "var/cache", "var/log"}
    code, lines = _run("uninstall-service", "--purge", "--prefix", str(installed))
    assert code == 0 and all(line.startswith("note: ") for line in lines), lines


def test_on_the_system_a_dry_run_shows_systemctl_and_userdel() -> None:
    # Never changes anything, so safe as any user: shows what root would get.
    code, lines = _run("uninstall-service", "--dry-run", "--purge")
    assert code == 0
    if shutil.which("systemctl"):
        assert lines[0].startswith("would systemctl stop ")
        assert lines[0].endswith(" 'miner-agent@*.service'")
        assert "would systemctl daemon-reload" in lines
    else:
        assert lines[0] == "note: no systemctl here: stop the agent yourself"
    assert ("would userdel miner-agent" in lines) == service.user_exists("miner-agent")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may uninstall for real")
def test_the_real_cli_refuses_a_real_uninstall_without_root() -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "uninstall-service"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "run as root, or use --dry-run or --prefix" in done.stderr


def test_the_real_cli_has_help() -> None:
    done = subprocess.run([sys.executable, "-m", "agent", "uninstall-service", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--purge" in done.stdout and "--dry-run" in done.stdout
