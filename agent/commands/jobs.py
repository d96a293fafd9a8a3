"""`miner-agent run`, `submit`, `status`, `cancel` and `config show`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, ExitCode, InvalidJob
from agent.jobs import Job
from agent.node.logging_setup import setup_logging

Sub = argparse._SubParsersAction  # type: ignore[type-arg]
TERMINAL = ("completed", "failed", "canceled", "expired")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML config (default /etc/miner-agent/agent.toml if it exists)")
    p.add_argument("--state-dir", type=Path, default=None, help="override state_dir")


def _client_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--coordinator", default=None, metavar="URL",
                   help="coordinator base URL (default: the agent's embedded one)")
    p.add_argument("--client-key", default=None, metavar="KEY",
                   help="client API key (default: the embedded coordinator's)")


def load(args: argparse.Namespace, **overrides: Any) -> AgentConfig:
    overrides.setdefault("state_dir", getattr(args, "state_dir", None))
    return load_config(args.config, overrides=overrides)


def add_parsers(sub: Sub) -> None:
    p = sub.add_parser(
        "run", help="run the agent daemon",
        description="Run the agent: register with the coordinator, heartbeat, poll jobs, "
        "run them in isolated processes and report their results. With no coordinator_url "
        "configured it serves the embedded reference coordinator on loopback, so "
        "`miner-agent submit` works on this machine. SIGTERM drains (a second one cancels "
        "running jobs at once).")
    _config_args(p)
    p.add_argument("--coordinator", default=None, metavar="URL", help="override coordinator_url")
    p.add_argument("--miner-id", default=None, help="override miner_id")
    p.add_argument("--burst", action="store_true",
                   help="stop once the coordinator has no work and no job runs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a job to the (embedded) coordinator",
                       description="Submit JOB.json's payload and constraints as a new job; "
                       "prints the job id. With --wait, follows it to the end.")
    _client_args(p)
    p.add_argument("job_file", metavar="JOB.json")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a job's status",
                       description="Show a job as the coordinator sees it: status, progress, "
                       "result or error. With --wait, follows it until it ends.")
    _client_args(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job",
                       description="Ask the coordinator to cancel a job; the agent running it "
                       "stops it and keeps its partial results.")
    _client_args(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("config", help="show the effective config",
                       description="Print the effective config (file, then environment, then "
                       "flags) as JSON with secrets masked.")
    _config_args(p)
    p.add_argument("action", choices=("show",), help="what to do")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load(args)
    print(json.dumps(cfg.masked(), indent=2))
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon.lifecycle import Agent
    from agent.reference.embedded import start_embedded

    cfg = load(args, coordinator_url=args.coordinator, miner_id=args.miner_id)
    setup_logging(cfg.log_format, cfg.log_level)
    coordinator = None
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
    try:
        return asyncio.run(Agent(cfg, api_key, burst=args.burst).serve())
    finally:
        if coordinator is not None:
            coordinator.stop()


def _client(args: argparse.Namespace) -> httpx.Client:
    if args.coordinator:
        if not args.client_key:
            raise ConfigError("--coordinator needs --client-key")
        url, key = args.coordinator, args.client_key
    else:
        from agent.reference.embedded import read_embedded

        info = read_embedded(load(args))
        url, key = info.url, args.client_key or info.client_key
    return httpx.Client(base_url=url, headers={"X-Api-Key": key}, timeout=10)


def _call(client: httpx.Client, method: str, path: str, **kw: Any) -> dict[str, Any]:
    try:
        resp = client.request(method, path, **kw)
    except httpx.TransportError as exc:
        raise ConfigError(f"cannot reach the coordinator at {client.base_url}: {exc}; is "
                          "`miner-agent run` running?") from None
    if resp.status_code >= 400:
        raise ConfigError(f"the coordinator answered {resp.status_code}: {resp.text[:300]}")
    data = resp.json()
    return data if isinstance(data, dict) else {}


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        raw = json.loads(Path(args.job_file).read_text())
        Job.from_dict({**raw, "job_id": raw.get("job_id") or "submitted"})
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.job_file}: {exc}", file=sys.stderr)
        return ExitCode.INVALID_JOB
    except InvalidJob as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return ExitCode.INVALID_JOB
    body = {"payload": raw["payload"], "constraints": raw.get("constraints") or {}}
    if "ttl_s" in raw:
        body["ttl_s"] = raw["ttl_s"]
    with _client(args) as client:
        job = _call(client, "POST", "/v1/jobs", json=body)
        print(job["job_id"])
        if args.wait:
            return _follow(client, job["job_id"], as_json=False)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait:
            return _follow(client, args.job_id, as_json=args.json)
        job = _call(client, "GET", f"/v1/jobs/{args.job_id}")
        _show(job, args.json)
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _call(client, "POST", f"/v1/jobs/{args.job_id}/cancel", json={})
        print(f"{args.job_id}: {job.get('status')}")
    return ExitCode.OK


def _follow(client: httpx.Client, job_id: str, as_json: bool) -> int:
    last = None
    while True:
        job = _call(client, "GET", f"/v1/jobs/{job_id}")
        line = _line(job)
        if line != last and not as_json:
            print(line, file=sys.stderr)
            last = line
        if job.get("status") in TERMINAL:
            _show(job, as_json)
            return ExitCode.OK if job["status"] == "completed" else ExitCode.FAILED
        time.sleep(0.5)


def _line(job: dict[str, Any]) -> str:
    detail = job.get("progress_detail") or {}
    parts = [f"{job['job_id']}: {job.get('status')}"]
    if job.get("progress") is not None:
        parts.append(f"{job['progress']:.0f}%")
    for key in ("stage", "message"):
        if detail.get(key):
            parts.append(str(detail[key]))
    for key, value in list((detail.get("metrics") or {}).items())[:4]:
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(_line(job))
    result = job.get("result") or {}
    if job.get("error"):
        print(f"error: {job['error'].get('code')}: {job['error'].get('message')}")
    if isinstance(result, dict) and result.get("output"):
        print(str(result["output"])[-2000:])
    pkg = result.get("package") if isinstance(result, dict) else None
    if isinstance(pkg, dict) and pkg.get("location"):
        print(f"package: {pkg['location']} (sha256 {pkg.get('zip_sha256')})")
