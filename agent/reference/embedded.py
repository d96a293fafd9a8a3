"""The embedded default: with no coordinator configured, serve the reference one locally.

`miner-agent run` starts the reference coordinator in-process on loopback, backed
by SQLite in the state directory, with keys generated once and kept (mode 0600)
in ``<state_dir>/embedded.json``. `submit`, `status` and `cancel` find it there.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.reference.coordinator import ReferenceCoordinator

KEYS_FILE = "embedded.json"


@dataclass(frozen=True)
class EmbeddedInfo:
    url: str
    miner_key: str
    client_key: str


def keys_path(cfg: AgentConfig) -> Path:
    return cfg.state_dir / KEYS_FILE


def _load_or_create_keys(cfg: AgentConfig) -> dict[str, str]:
    path = keys_path(cfg)
    if path.is_file():
        return dict(json.loads(path.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {"miner_key": secrets.token_urlsafe(24), "client_key": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh)
    return keys


def start_embedded(cfg: AgentConfig) -> tuple[ReferenceCoordinator, EmbeddedInfo]:
    """Start the reference coordinator for this node; returns it and how to reach it."""
    keys = _load_or_create_keys(cfg)
    coordinator = ReferenceCoordinator(
        str(cfg.state_dir / "coordinator.db"),
        api_keys={"miner": keys["miner_key"], "client": keys["client_key"]},
        host=cfg.embedded_host, port=cfg.embedded_port,
        # The node's own retention holds for its embedded coordinator's copies too.
        retain_days=cfg.keep_packages_days,
        retain_bytes=(cfg.keep_packages_max_mb << 20) or None)
    try:
        url = coordinator.start()
    except OSError as exc:
        raise ConfigError(f"cannot serve the embedded coordinator on {cfg.embedded_host}:"
                          f"{cfg.embedded_port}: {exc.strerror}; is another agent running? "
                          "set embedded_port or coordinator_url") from None
    info = EmbeddedInfo(url, keys["miner_key"], keys["client_key"])
    path = keys_path(cfg)
    data = json.loads(path.read_text())
    data["url"] = url
    tmp = path.with_name(".embedded.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
    return coordinator, info


def read_embedded(cfg: AgentConfig) -> EmbeddedInfo:
    """How a local command reaches a running agent's embedded coordinator."""
    path = keys_path(cfg)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no embedded coordinator found ({path} is missing): start the "
                          "agent with `miner-agent run`, or pass --coordinator and "
                          "--client-key") from None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: run as the agent's user (or root)") from None
    url = data.get("url") or f"http://{cfg.embedded_host}:{cfg.embedded_port}"
    return EmbeddedInfo(url, data["miner_key"], data["client_key"])
