"""`miner-agent coordinator`: the reference coordinator, standalone, for a small lab fleet.

The same code the agent embeds when no coordinator_url is configured, served on its own:
port 8731 and ``<state_dir>/coordinator.db`` by default, keys from the environment.
``python -m agent.coordinator.reference`` is the older spelling of the same server.
"""

from __future__ import annotations

import argparse

from agent.commands.options import Sub, config_args, load
from agent.reference.standalone import DESCRIPTION, KEYS_EPILOG, add_arguments, serve


def add_parser(sub: Sub) -> None:
    p = sub.add_parser("coordinator", help="serve the reference coordinator standalone",
                       description=f"{DESCRIPTION} Point agents at it with coordinator_url "
                       "and clients with --coordinator URL --client-key KEY. SIGTERM or "
                       "Ctrl-C stops it.", epilog=KEYS_EPILOG)
    config_args(p)
    add_arguments(p, port=8731, db_help="SQLite file (default: <state_dir>/coordinator.db)")
    p.set_defaults(func=cmd_coordinator)


def cmd_coordinator(args: argparse.Namespace) -> int:
    db = args.db
    if db is None:
        cfg = load(args)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        db = str(cfg.state_dir / "coordinator.db")
    # Imported here: building the CLI's parser must not import the server.
    from agent.reference.coordinator import ReferenceCoordinator

    return serve(args, db, ReferenceCoordinator)
