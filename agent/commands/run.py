"""`miner-agent run` (the daemon) and `miner-agent config show`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any

from agent.aio import new_event_loop
from agent.clock import within
from agent.commands.options import Sub, config_args, load
from agent.config import AgentConfig, config_file
from agent.errors import ConfigError, ExitCode
from agent.execution.isolation import bound_heap, for_agent, set_non_dumpable
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
    from agent.daemon.reload import ConfigSource
    from agent.reference.embedded import start_embedded

    def read_config() -> AgentConfig:  # at start, and again at each SIGHUP
        return load(args, coordinator_url=args.coordinator, miner_id=args.miner_id)

    cfg = loaded = read_config()
    setup_logging(cfg.log_format, cfg.log_level)
    set_non_dumpable()
    bound_heap()
    # `kill -QUIT <pid>` writes every thread's stack to stderr (the journal) and goes on:
    # what an operator (or a test) needs to see where a stuck agent is.
    faulthandler.register(signal.SIGQUIT, all_threads=True, chain=False)
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
        # Embedded: the key is the embedded coordinator's own, never re-read from config.
        source = ConfigSource(read_config, loaded=loaded, key_from_config=coordinator is None)
        loop = new_event_loop(cfg.event_loop)
        code = run_bounded(Agent(cfg, api_key, burst=args.burst, isolation=isolation,
                                 source=source).serve(), loop)
    finally:
        isolation.close()
        if coordinator is not None:
            coordinator.stop()
    exit_within(EXIT_WATCHDOG_S, code)
    exit_past_lingering_threads(code)
    return code


EXIT_WATCHDOG_S = 10.0


def exit_within(seconds: float, code: int) -> None:
    """The agent has stopped: if the process is still alive ``seconds`` from now, it
    writes every thread's stack to stderr and exits with ``code`` anyway.

    Interpreter exit runs atexit hooks and finalizers the agent does not control; none of
    them may keep a stopped agent alive past systemd's stop timeout.
    """
    def watchdog() -> None:
        time.sleep(seconds)
        logging.getLogger(__name__).error("still alive %.0f s after stopping; stacks follow, "
                                          "then a forced exit", seconds)
        faulthandler.dump_traceback(all_threads=True)
        sys.stderr.flush()
        os._exit(int(code))

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


def run_bounded(main: Coroutine[Any, Any, int],
                loop: asyncio.AbstractEventLoop | None = None, cleanup_s: float = 5.0) -> int:
    """``asyncio.run``, but its cleanup cannot hold the process up.

    On Python 3.11, ``asyncio.run`` waits without limit for the loop's default
    executor's threads; one stuck in a blocking call (a resolver, a file system that
    stopped answering) would keep a stopped agent alive. ``loop``: a new one of its
    own, which it closes (default: the stdlib's).
    """
    loop = loop or asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=cleanup_s))
            loop.run_until_complete(within(loop.shutdown_asyncgens(), cleanup_s))
            loop.run_until_complete(within(loop.shutdown_default_executor(),
                                                     cleanup_s))
        except TimeoutError:
            logging.getLogger(__name__).warning("event loop cleanup took over %.0f s; "
                                                "leaving it", cleanup_s)
        finally:
            loop.close()


def exit_past_lingering_threads(code: int) -> None:
    """Everything is closed: a thread still running must not keep the process alive.

    Interpreter exit joins non-daemon threads (executor workers among them); one stuck
    in a blocking call would hold a stopped agent up past systemd's stop timeout. Such
    threads are named in the log, and the process exits with its code regardless.
    """
    lingering = [t.name for t in threading.enumerate()
                 if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not lingering:
        return
    logging.getLogger(__name__).warning("exiting past %d thread(s) still running: %s",
                                        len(lingering), ", ".join(lingering))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))
