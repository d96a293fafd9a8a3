"""The `miner-agent` command: parses, loads config, maps errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import agent
from agent.commands import jobs, local, node, run, service
from agent.errors import AgentError, ExitCode

# Each entry adds one subcommand; its module stays importable without torch.
PARSERS: list[Callable[[argparse._SubParsersAction], object]] = [  # type: ignore[type-arg]
    local.add_exec_parser,
    local.add_verify_parser,
    run.add_parsers,
    jobs.add_parsers,
    service.add_parser,
    node.add_doctor_parser,
    node.add_bench_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miner-agent",
        description="GPU miner execution agent: runs coordinator jobs in isolated processes "
        "with live logs, progress, immediate cancel and checksummed result packages.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(ExitCode.USAGE)
    if not logging.getLogger().handlers:
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except AgentError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        code = ExitCode.CONFIG if exc.code == "config_error" else ExitCode.FAILED
    except KeyboardInterrupt:
        code = ExitCode.CANCELED
    sys.exit(int(code))
