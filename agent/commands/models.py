"""`miner-agent models list|pull|rm|verify`: the local model store (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.commands.options import Sub, config_args, load
from agent.config import AgentConfig
from agent.errors import ExitCode
from agent.execution.modelfiles import users_of
from agent.execution.modelhub import pull_hub
from agent.execution.modelstore import (
    ModelStore,
    ModelStoreError,
    PullResult,
    StoredModel,
    verify_model,
)

# A ModelStoreError's code -> the command's exit code (README's table).
EXIT_OF = {
    "bad_model_name": ExitCode.USAGE,
    "model_not_found": ExitCode.NOT_FOUND,
    "source_not_found": ExitCode.NOT_FOUND,
    "hub_not_found": ExitCode.NOT_FOUND,
    "hub_unreachable": ExitCode.UNAVAILABLE,
    "hub_refused": ExitCode.REFUSED,
}

EXAMPLES = """\
examples:
  miner-agent models pull llama3.2:3b --repo meta-llama/Llama-3.2-3B-Instruct
  miner-agent models pull gpt2 --repo openai-community/gpt2 --revision main \\
      --allow-pattern '*.json' --allow-pattern '*.safetensors' --allow-pattern '*.txt'
  miner-agent models pull tiny --from /srv/models/tiny-gpt2   # no network needed
  miner-agent models list --json
  miner-agent models verify llama3.2:3b
  miner-agent models rm gpt2

The hub is reached as huggingface_hub does: HF_ENDPOINT names a mirror, HF_TOKEN a
token for gated or private models, HF_HUB_OFFLINE=1 forbids downloads. Exit codes: 0 ok,
1 failed, 2 bad name, 8 verify failed, 10 hub unreachable, 11 not found, 12 refused.
A running agent serves models pulled after its start once it is restarted.
"""


def add_parser(sub: Sub) -> None:
    p = sub.add_parser(
        "models", help="manage the local model store (list, pull, rm, verify)",
        description="The local model store: models pulled from the Hugging Face hub or "
        "copied from a folder, by the names clients send (llama3.2:3b), each file's "
        "sha256 kept in the store's lock file. Inference jobs find a model by name in "
        "the store and in config [models] (config wins a clash); jobs see it read-only.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="models_command", metavar="VERB")
    p.set_defaults(func=lambda _args: _usage(p))

    q = _verb(verbs, "list", "what is stored, and every name jobs can use",
              "List every name inference jobs can use: the store's models (source, "
              "revision, size, files, folder) and config [models] entries.")
    q.add_argument("--json", action="store_true", help="print a JSON list instead")
    q.set_defaults(func=cmd_list)

    q = _verb(verbs, "pull", "download a model from the hub (or copy a folder) by name",
              "Store a model under NAME: download REPO at REVISION with huggingface_hub "
              "(resumable: run it again after an interruption), or copy --from a local "
              "folder. Every file's sha256 goes into the lock file. Pulling what is "
              "already stored intact is a no-op.")
    q.add_argument("name", metavar="NAME", help="the name clients send, e.g. llama3.2:3b")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--repo", metavar="OWNER/REPO", help="a Hugging Face hub model repo")
    src.add_argument("--from", dest="source", type=Path, metavar="FOLDER",
                     help="copy this local folder instead (air-gapped nodes)")
    q.add_argument("--revision", default="main", metavar="REV",
                   help="branch, tag or commit sha with --repo (default main); recorded "
                   "as the commit it resolves to")
    q.add_argument("--allow-pattern", action="append", default=[], metavar="GLOB",
                   help="with --repo, download only files matching GLOB (repeatable)")
    q.set_defaults(func=cmd_pull)

    q = _verb(verbs, "rm", "remove a stored model's name (and its files)",
              "Remove NAME from the store. Its folder is renamed away and deleted once no "
              "other name shares it. A model some process has open (a running job, the "
              "warm worker) is refused unless --force; drain the agent first.")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--force", action="store_true", help="remove it even if it is in use")
    q.set_defaults(func=cmd_rm)

    q = _verb(verbs, "verify", "check stored files against their sha256",
              "Hash every file of NAME (default: every stored model) again and compare "
              "with the lock file. Exit 8 when a file changed, is missing or was added; "
              "pull the model again to repair it.")
    q.add_argument("name", metavar="NAME", nargs="?")
    q.set_defaults(func=cmd_verify)


def _verb(verbs: Sub, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    q = verbs.add_parser(name, help=help_text, description=description, epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    config_args(q)
    q.add_argument("--store", type=Path, default=None, metavar="DIR",
                   help="the store's folder (default: config model_store_dir, else "
                   "<cache_dir>/models)")
    return q


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return ExitCode.USAGE


def _setup(args: argparse.Namespace) -> tuple[AgentConfig, ModelStore]:
    cfg = load(args, model_store_dir=args.store)
    return cfg, ModelStore.of(cfg)


def _failed(exc: ModelStoreError) -> int:
    print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
    return EXIT_OF.get(exc.code, ExitCode.FAILED)


def cmd_pull(args: argparse.Namespace) -> int:
    _, store = _setup(args)
    try:
        if args.source is not None:
            result = store.pull_local(args.name, args.source)
        else:
            result = pull_hub(store, args.name, args.repo, args.revision, args.allow_pattern)
    except ModelStoreError as exc:
        return _failed(exc)
    _print_pull(args.name, store, result)
    return ExitCode.OK


def _print_pull(name: str, store: ModelStore, result: PullResult) -> None:
    model = result.model
    what = "stored" if result.changed else "already stored, verified"
    print(f"{name}: {what}: {len(model.files)} files, {_size(model.size)} "
          f"({_source(model)}) in {store.folder_of(model)}")
    for folder in result.replaced:
        print(f"removed {folder}: no name uses it any more")


def cmd_list(args: argparse.Namespace) -> int:
    cfg, store = _setup(args)
    try:
        rows = _rows(cfg, store)
    except ModelStoreError as exc:
        return _failed(exc)
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    if not rows:
        print(f"no models: none stored in {store.root} and none in config [models]; "
              "`miner-agent models pull --help` shows how to add one")
        return ExitCode.OK
    table = [("NAME", "SOURCE", "REVISION", "SIZE", "FILES", "PATH")]
    for r in rows:
        note = " (config [models] wins)" if r["shadowed_by_config"] else ""
        table.append((r["name"], r["source"], r["revision"] or "-",
                      "-" if r["size"] is None else _size(r["size"]),
                      "-" if r["files"] is None else str(r["files"]), r["path"] + note))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5])
    return ExitCode.OK


def _rows(cfg: AgentConfig, store: ModelStore) -> list[dict[str, Any]]:
    """One row per name: the store's models, then config's names the store lacks."""
    rows: list[dict[str, Any]] = []
    for model in store.models():
        src = model.source
        revision = (f"{src.get('revision')}@{str(src.get('commit'))[:12]}"
                    if src.get("kind") == "hub" else None)
        for name in model.names:
            rows.append({"name": name, "source": _source(model), "revision": revision,
                         "commit": src.get("commit"), "size": model.size,
                         "files": len(model.files), "path": str(store.folder_of(model)),
                         "pulled_at": model.pulled_at, "in_config": name in cfg.models,
                         "shadowed_by_config": name in cfg.models
                         and cfg.models[name] != str(store.folder_of(model))})
    stored = {r["name"] for r in rows}
    for name, folder in sorted(cfg.models.items()):
        if name not in stored:
            rows.append({"name": name, "source": "config", "revision": None, "commit": None,
                         "size": None, "files": None, "path": folder, "pulled_at": None,
                         "in_config": True, "shadowed_by_config": False})
    return sorted(rows, key=lambda r: str(r["name"]))


def cmd_rm(args: argparse.Namespace) -> int:
    _, store = _setup(args)
    try:
        model = store.find(args.name)
        if model is None:
            raise ModelStoreError(f"no stored model is named {args.name!r}; `miner-agent "
                                  "models list` shows what is stored", "model_not_found")
        pids = [] if args.force or len(model.names) > 1 else users_of(store.folder_of(model))
        if pids:
            print(f"error: model_in_use: {args.name} is open in process(es) "
                  f"{', '.join(map(str, pids))} (a running job or the warm worker); drain "
                  "the agent (`miner-agent drain --wait`) or pass --force", file=sys.stderr)
            return ExitCode.FAILED
        _, deleted = store.remove(args.name)
    except ModelStoreError as exc:
        return _failed(exc)
    others = ", ".join(n for n in model.names if n != args.name)
    print(f"removed {args.name}" + ("" if deleted else f" (its files stay: {others} use them)"))
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    _, store = _setup(args)
    try:
        models = store.models()
    except ModelStoreError as exc:
        return _failed(exc)
    if args.name is not None:
        models = [m for m in models if args.name in m.names]
        if not models:
            return _failed(ModelStoreError(f"no stored model is named {args.name!r}",
                                           "model_not_found"))
    if not models:
        print(f"no models stored in {store.root}")
    code = ExitCode.OK
    for model in models:
        problems = verify_model(store, model)
        label = ", ".join(model.names)
        for problem in problems:
            print(f"FAIL {label}: {problem}")
        if problems:
            print(f"{label}: {len(problems)} problem(s); pull it again to repair it "
                  f"(`miner-agent models pull {model.names[0]} ...`)", file=sys.stderr)
            code = ExitCode.VERIFY_FAILED
        else:
            print(f"OK {label}: {len(model.files)} files match their sha256")
    return code


def _source(model: StoredModel) -> str:
    src = model.source
    return f"hub:{src.get('repo')}" if src.get("kind") == "hub" else f"local:{src.get('path')}"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
