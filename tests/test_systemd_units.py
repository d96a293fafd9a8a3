"""The shipped units: the directives an operator relies on, and systemd-analyze's verdict."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.commands import service

UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"


def directives(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given (units may repeat keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.fixture(params=service.UNITS)
def unit(request: pytest.FixtureRequest) -> Path:
    return UNIT_DIR / request.param


def _one(d: dict[str, list[str]], key: str) -> str:
    (value,) = d[key]
    return value


def test_lifecycle_directives(unit: Path) -> None:
    d = directives(unit)
    assert _one(d, "Service.Type") == "notify"
    assert _one(d, "Service.NotifyAccess") == "main"
    assert _one(d, "Service.WatchdogSec") == "30"
    assert _one(d, "Service.Restart") == "on-failure"
    assert int(_one(d, "Service.RestartSec")) > 0
    assert int(_one(d, "Unit.StartLimitBurst")) > 0 and "Unit.StartLimitIntervalSec" in d
    assert _one(d, "Service.KillMode") == "mixed"
    assert _one(d, "Service.User") == "miner-agent"
    assert _one(d, "Service.SupplementaryGroups").split() == ["video", "render"]
    assert _one(d, "Service.ExecStart").startswith("/usr/local/bin/miner-agent run --config ")


def _template_int(template: str, key: str) -> int:
    match = re.search(rf"^{key} = (\d+)", template, re.M)
    assert match, key
    return int(match.group(1))


def test_stop_timeout_covers_drain_and_cancel_grace(unit: Path) -> None:
    # The defaults in the config template, so a changed default fails here first.
    template = service.render_config()
    drain, grace = (_template_int(template, k) for k in ("drain_timeout_s", "cancel_grace_s"))
    assert (drain, grace) == (120, 10)
    assert int(_one(directives(unit), "Service.TimeoutStopSec")) >= drain + grace + 20


def test_devices_and_directories(unit: Path) -> None:
    d = directives(unit)
    assert _one(d, "Service.DevicePolicy") == "closed"
    allowed = d["Service.DeviceAllow"]
    for node in ("char-nvidia* rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw",
                 "/dev/nvidia-uvm-tools rw", "/dev/nvidia-modeset rw"):
        assert node in allowed
    assert "Service.PrivateDevices" not in d  # it would hide /dev/nvidia*
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert _one(d, f"Service.{key}").startswith("miner-agent")
    assert _one(d, "Service.ConfigurationDirectory") == "miner-agent"
    assert _one(d, "Service.LoadCredential").startswith("api-key:/etc/miner-agent/")


def test_hardening_without_memory_deny_write_execute(unit: Path) -> None:
    d = directives(unit)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "ProtectKernelLogs": "yes", "RestrictSUIDSGID": "yes",
                       "LockPersonality": "yes", "RestrictRealtime": "yes",
                       "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
                       "AmbientCapabilities": ""}.items():
        assert _one(d, f"Service.{key}") == value, key
    # CUDA and JIT compilers need W+X mappings; the reason is written in the unit.
    assert "Service.MemoryDenyWriteExecute" not in d
    assert "MemoryDenyWriteExecute" in unit.read_text()


# What the job sandbox does from inside the unit: bubblewrap unshares these, and the
# fork server inside it unshares mount, pid and net again per job.
SANDBOX_NAMESPACES = {"user", "mnt", "pid", "net"}
ALL_NAMESPACES = {"cgroup", "ipc", "net", "mnt", "pid", "user", "uts", "time"}
# bubblewrap mounts and pivots; unshare, setns and clone3 come with @process.
SANDBOX_SYSCALLS = {"@mount", "mount", "umount2", "pivot_root", "unshare", "setns", "clone3"}
FALSE = {"no", "false", "0", "off"}


def _allowed_namespaces(value: str) -> set[str]:
    """The namespace types a RestrictNamespaces= value lets the unit create."""
    if value in FALSE:
        return ALL_NAMESPACES
    if value in {"yes", "true", "1", "on"}:
        return set()
    if value.startswith("~"):
        return ALL_NAMESPACES - set(value[1:].split())
    return set(value.split())


def test_allowed_namespaces_reads_every_form() -> None:
    assert _allowed_namespaces("yes") == set()
    assert _allowed_namespaces("no") == ALL_NAMESPACES
    assert _allowed_namespaces("~user net") == ALL_NAMESPACES - {"user", "net"}
    assert _allowed_namespaces("user mnt") == {"user", "mnt"}


def test_sandbox_can_run_in_the_unit(unit: Path) -> None:
    d = directives(unit)
    # The agent makes supervisor/ and jobs/<job>/ below the unit's own cgroup.
    assert _one(d, "Service.Delegate") == "yes"
    # "yes" would make /sys/fs/cgroup read-only, delegated subtree included.
    assert d.get("Service.ProtectControlGroups", ["no"]) == ["no"]
    (restrict,) = d["Service.RestrictNamespaces"]
    assert SANDBOX_NAMESPACES <= _allowed_namespaces(restrict), restrict
    assert "time" not in _allowed_namespaces(restrict)
    for value in d.get("Service.SystemCallFilter", []):
        calls = set(value.lstrip("~").split())
        if value.startswith("~"):
            assert not calls & SANDBOX_SYSCALLS, value
        else:
            assert "@mount" in calls, value
    # bubblewrap reads /proc/sys, and the driver's libraries /proc/driver/nvidia.
    assert "Service.ProcSubset" not in d
    assert "Service.PrivateUsers" not in d


# Keys that differ by design between the single unit and the per-instance template.
PER_INSTANCE = {"ExecStart", "StateDirectory", "CacheDirectory", "LogsDirectory",
                "LoadCredential"}


def _shared(d: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: v for k, v in d.items()
            if k.startswith("Service.") and k.split(".", 1)[1] not in PER_INSTANCE}


def test_units_agree_outside_per_instance_keys() -> None:
    # The security directives above among them: a fix to one unit reaches both.
    single, template = (directives(UNIT_DIR / name) for name in service.UNITS)
    assert _shared(single) == _shared(template)
    assert set(single) == set(template)


def test_template_unit_is_per_instance() -> None:
    d = directives(UNIT_DIR / "miner-agent@.service")
    assert _one(d, "Service.ExecStart").endswith("--config /etc/miner-agent/%i.toml")
    assert _one(d, "Service.StateDirectory") == "miner-agent/%i"
    assert _one(d, "Service.LoadCredential") == "api-key:/etc/miner-agent/%i.api-key"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    # ExecStart must name an existing executable for verify; the install path does that.
    exe = shutil.which("true") or "/bin/true"
    names = []
    for name in service.UNITS:
        text = service.render_unit((UNIT_DIR / name).read_text(), exe)
        target = name.replace("@.service", "@gpu0.service")  # verify an instance
        (tmp_path / target).write_text(text)
        names.append(str(tmp_path / target))
    out = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True,
                         text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values: any output at all is a finding.
    assert out.returncode == 0 and (out.stdout + out.stderr).strip() == "", out.stderr
