"""The `miner-agent` command: parses, loads config, maps errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

import agent
from agent.errors import AgentError, ConfigError, ExitCode, InvalidJob

# stdout closed early (`| head`): what `yes | head -1` reports for `yes` (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE



def parsers(command: str | None) -> list[Callable[[argparse._SubParsersAction], object]]:  # type: ignore[type-arg]
    """What adds each subcommand; each module stays importable without torch.

    Imported here, not at the top: `exec` imports only its own module, so its job
    starts ~0.15 s sooner (the others pull in the coordinator client, httpx, the daemon).
    """
    from agent.commands import local

    if command == "exec":
        return [local.add_exec_parser]
    from agent.commands import (
        control,
        coordinator,
        download,
        follow,
        history,
        jobs,
        models,
        node,
        run,
        service,
        uninstall,
    )

    return [local.add_exec_parser, local.add_verify_parser, run.add_parsers,
            control.add_parsers, jobs.add_parsers, history.add_parsers, follow.add_parsers,
            download.add_parsers, service.add_parser, uninstall.add_parser,
            coordinator.add_parser, node.add_doctor_parser, node.add_bench_parser,
            models.add_parser]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miner-agent",
        description="GPU miner execution agent: runs coordinator jobs in isolated processes "
        "with live logs, progress, immediate cancel and checksummed result packages.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in parsers(command):
        add(sub)
    return parser


def exit_code(exc: AgentError) -> ExitCode:
    """The one mapping from an error to the command's exit code (README's table)."""
    from agent.coordinator.transport import AuthError, CoordinatorHTTPError, CoordinatorUnavailable
    from agent.daemon.control import AgentNotRunning, ControlDenied

    if isinstance(exc, CoordinatorUnavailable | AgentNotRunning):
        return ExitCode.UNAVAILABLE  # nothing answered: the coordinator or agent is down
    if isinstance(exc, CoordinatorHTTPError):
        if exc.status == 404:
            return ExitCode.NOT_FOUND
        return ExitCode.UNAVAILABLE if exc.status >= 500 else ExitCode.REFUSED
    if isinstance(exc, AuthError | ControlDenied):
        return ExitCode.REFUSED
    if isinstance(exc, InvalidJob):
        return ExitCode.INVALID_JOB
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG
    return ExitCode.FAILED


def run_command(argv: list[str] | None = None) -> int | str | None:
    """Parse, run one command and return its exit code; errors become their codes."""
    given = sys.argv[1:] if argv is None else argv
    first = next((a for a in given if not a.startswith("-")), None)
    parser = build_parser(first)
    args = parser.parse_args(given)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.USAGE
    if not logging.getLogger().handlers:
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except AgentError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return ExitCode.CANCELED


def main(argv: list[str] | None = None) -> None:
    try:
        try:
            code = run_command(argv)
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            code = exc.code
        sys.stdout.flush()  # a reader that left shows here, not at interpreter exit
    except BrokenPipeError:
        # `miner-agent status X --wait | head -1`: the reader has gone. Python's documented
        # recipe: point stdout at devnull so the exit's own flush cannot fail again, and
        # end quietly with the status a shell tool killed by SIGPIPE has.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)
