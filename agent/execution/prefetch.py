"""Fetch a job's http(s) inputs into the node's cache before its sandbox starts.

Inside a job the shared cache is read-only: downloads by sha256 are fetched and
verified outside the job's sandbox, here, in the agent's own process. A job then
finds each input it names verified under ``cache_dir/sha256/<hex>``. An input
this misses or fails on is not lost: the job fetches it again into its own
cache dir (``$MINER_JOB_CACHE_DIR``) and reports its own ``input_error``, so
:func:`prefetch` never raises; it returns what went wrong.

Only the references a built-in runtime reads are fetched, so a payload cannot
make the agent download what no runtime will use. Keep :data:`INPUTS` in step
with the runtimes (``grep -n "fetch(" runtimes/*.py``):

* ``batch_inference`` (runtimes/batch.py ``fetch_input``): ``payload.model``
  (``{uri, sha256}`` for a torchscript or exported model), ``payload.model.weights``
  (format ``builtin``) and ``payload.inputs``;
* ``training`` (runtimes/train_spec.py, then datasets.py and checkpoint.py):
  ``payload.dataset`` and ``payload.resume_from``.

A reference counts when it is an object whose ``uri`` is an http(s) URL and
whose ``sha256`` is a non-empty string; anything else is left to the job, which
fails or fetches it as it does today. Payloads are strangers' JSON: no type is
trusted, and the walk is a fixed table of key paths, so its size is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# One module of runtimes/ for the agent (it imports httpx, never torch); its errors too.
from runtimes.fetch import JobCancelled, JobFailed, fetch

logger = logging.getLogger(__name__)

# payload.type -> the key paths, from the payload's top, of the inputs its runtime fetches
INPUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "batch_inference": (("model",), ("model", "weights"), ("inputs",)),
    "training": (("dataset",), ("resume_from",)),
}
MAX_URI_CHARS = 8192
MAX_SHA_CHARS = 128  # room for 'sha256:' and spaces; longer is the job's own error


@dataclass(frozen=True)
class InputRef:
    """One http(s) input named with its sha256, and where in the payload it was."""

    where: str
    uri: str
    sha256: str


@dataclass(frozen=True)
class PrefetchResult:
    """What :func:`prefetch` did: the verified cache paths, and one message per failure."""

    fetched: tuple[Path, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def find_inputs(payload: object) -> list[InputRef]:
    """The http(s) inputs with a sha256 that ``payload``'s built-in runtime will fetch."""
    if not isinstance(payload, dict):
        return []
    paths = INPUTS.get(payload["type"]) if isinstance(payload.get("type"), str) else None
    found: list[InputRef] = []
    for path in paths or ():
        ref = _at(payload, path)
        uri, sha = ref.get("uri"), ref.get("sha256")
        if (isinstance(uri, str) and len(uri) <= MAX_URI_CHARS and _is_http(uri)
                and isinstance(sha, str) and 0 < len(sha.strip()) <= MAX_SHA_CHARS):
            found.append(InputRef("payload." + ".".join(path), uri, sha))
    return found


def prefetch(payload: object, cache_dir: Path, max_bytes: int, *, timeout_s: float = 60.0,
             cancelled: Callable[[], bool] | None = None) -> PrefetchResult:
    """Fetch and verify every input of :func:`find_inputs` into ``cache_dir``.

    Blocking and thread-safe (the agent runs it with ``asyncio.to_thread``); the
    per-file locks of :mod:`runtimes.fetch` keep two jobs from fetching one blob
    twice. ``timeout_s`` bounds each network wait, not the whole download;
    ``cancelled()`` is polled while downloading and stops the remaining inputs.
    Never raises for a bad input or a failed download.
    """
    fetched: list[Path] = []
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    for ref in find_inputs(payload):
        if (ref.uri, ref.sha256) in seen:
            continue
        seen.add((ref.uri, ref.sha256))
        try:
            outcome = _one(ref, cache_dir, max_bytes, timeout_s, cancelled)
        except JobCancelled:
            logger.info("prefetch canceled at %s", ref.where)
            errors.append(f"{ref.where}: prefetch canceled")
            break
        if isinstance(outcome, Path):
            fetched.append(outcome)
        else:
            errors.append(outcome)
    return PrefetchResult(tuple(fetched), tuple(errors))


def _one(ref: InputRef, cache_dir: Path, max_bytes: int, timeout_s: float,
         cancelled: Callable[[], bool] | None) -> Path | str:
    """The verified cache path of one input, or the failure's message (URI redacted)."""
    safe = redact(ref.uri)
    try:
        path = fetch(ref.uri, ref.sha256, cache_dir, max_bytes, timeout_s=timeout_s,
                     cancelled=cancelled, fallback=False)
    except JobFailed as exc:
        message = f"{ref.where}: {exc.message.replace(ref.uri, safe)}"
    except JobCancelled:
        raise
    except Exception as exc:  # a hostile URI may fail below fetch's own checks
        detail = str(exc).replace(ref.uri, safe)[:300]
        message = f"{ref.where}: {safe}: {type(exc).__name__}: {detail}"
    else:
        logger.info("prefetched %s (%s) as %s", ref.where, safe, path.name)
        return path
    logger.warning("prefetch failed: %s", message)
    return message


def redact(uri: str) -> str:
    """``uri`` without user info, query or fragment, which may carry credentials."""
    try:
        parts = urlsplit(uri)
        hidden = parts.query or parts.fragment or "@" in parts.netloc
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=host, query="", fragment="").geturl() + (
            "?<redacted>" if hidden else "")
    except ValueError:
        return "<unparsable uri>"


def _at(payload: dict[object, object], path: tuple[str, ...]) -> dict[object, object]:
    """The object at ``path`` in ``payload``, or an empty dict when any step is not one."""
    node: object = payload
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _is_http(uri: str) -> bool:
    try:
        return urlsplit(uri).scheme in ("http", "https")
    except ValueError:
        return False
