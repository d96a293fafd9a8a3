"""Flags and config loading that several command groups share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config

Sub = argparse._SubParsersAction  # type: ignore[type-arg]


def config_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--state-dir``: where a command finds the agent's setup."""
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML config (default /etc/miner-agent/agent.toml if it exists)")
    p.add_argument("--state-dir", type=Path, default=None, help="override state_dir")


def client_args(p: argparse.ArgumentParser) -> None:
    """The config flags plus which coordinator a client verb talks to, and with which key."""
    config_args(p)
    p.add_argument("--coordinator", default=None, metavar="URL",
                   help="coordinator base URL (default: the agent's embedded one)")
    p.add_argument("--client-key", default=None, metavar="KEY",
                   help="client API key (default: the embedded coordinator's)")


def load(args: argparse.Namespace, **overrides: Any) -> AgentConfig:
    """The effective config: file, then environment, then these flags."""
    overrides.setdefault("state_dir", getattr(args, "state_dir", None))
    return load_config(args.config, overrides=overrides)
