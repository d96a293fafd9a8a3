"""`miner-agent run` (the daemon) and `miner-agent config show`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from agent.commands.options import Sub, config_args, load
from agent.config import config_file
from agent.errors import ConfigError, ExitCode
from agent.execution.isolation import for_agent, set_non_dumpable
from agent.execution.sandbox import SandboxUnavailable
from agent.node.logging_setup import setup_logging


def add_parsers(sub: Sub) -> None:
    p = sub.add_parser(
        "run", help="run the agent daemon",
        description="Run the agent: register with the coordinator, heartbeat, poll jobs, "
        "run them in isolated processes and report their results. With no coordinator_url "
        "configured it serves the embedded reference coordinator on loopback, so "
        "`miner-agent submit` works on this machine. SIGTERM drains (a second one cancels "
        "running jobs at once).")
    config_args(p)
    p.add_argument("--coordinator", default=None, metavar="URL", help="override coordinator_url")
    p.add_argument("--miner-id", default=None, help="override miner_id")
    p.add_argument("--burst", action="store_true",
                   help="stop once the coordinator has no work and no job runs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="show the effective config",
                       description="Print the effective config (file, then environment, then "
                       "flags) as JSON with secrets masked.")
    config_args(p)
    p.add_argument("action", choices=("show",), help="what to do")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load(args)
    print(json.dumps(cfg.masked(), indent=2))
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here: `miner-agent status` and friends need neither the daemon nor the server.
    from agent.daemon.lifecycle import Agent
    from agent.reference.embedded import start_embedded

    cfg = load(args, coordinator_url=args.coordinator, miner_id=args.miner_id)
    setup_logging(cfg.log_format, cfg.log_level)
    set_non_dumpable()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        isolation = for_agent(cfg, config_file(args.config))
    except SandboxUnavailable as exc:
        print(f"miner-agent: {exc}", file=sys.stderr)
        return ExitCode.SANDBOX_UNAVAILABLE
    coordinator = None
    try:
        if cfg.embedded:
            coordinator, info = start_embedded(cfg)
            cfg = dataclasses.replace(cfg, coordinator_url=info.url)
            api_key: str | None = info.miner_key
            print(f"embedded coordinator on {info.url} (submit jobs with `miner-agent submit`)",
                  file=sys.stderr)
        else:
            api_key = cfg.resolved_api_key()
        if not api_key:
            raise ConfigError("no API key: set api_key_file in the config (or the systemd "
                              "credential api-key)")
        return asyncio.run(Agent(cfg, api_key, burst=args.burst, isolation=isolation).serve())
    finally:
        isolation.close()
        if coordinator is not None:
            coordinator.stop()
