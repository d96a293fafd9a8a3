"""Text-generation inference with a local Hugging Face causal LM.

Payload (what coordinators send)::

    {"type": "inference", "prompt": "...", "model": "llama3.2:3b",
     "max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
     "do_sample": true, "repetition_penalty": 1.1, "seed": 1, "precision": "auto",
     "stop": ["\\n\\n"], "chat": false, "messages": [{"role": "user", "content": "..."}]}

Only one of ``prompt``/``messages`` is required; without ``model`` the node's
default model runs (``MINER_DEFAULT_MODEL``, config ``default_model``), and a node
with none fails ``invalid_job``. ``do_sample``
defaults to true when a positive ``temperature`` is given. ``chat: true`` (or
``messages``) applies the tokenizer's chat template. Device keys (``precision``,
``seed``, ``tf32``, ``device``) are read by :mod:`runtimes.device`.

Models resolve by name through the node's registry (:func:`load_model_registry`),
never from a hub. The generated text streams to stdout (flushed every ~50 ms)
and is appended to result.txt as it comes, so a kill keeps it; a cancel stops
at the next token and keeps the text so far (the package is marked partial).

``max_new_tokens`` is cut to what the model's context leaves after the prompt
(metrics ``max_new_tokens``, ``capped_by_context``, ``context_length``); a prompt
that fills the context fails ``prompt_too_long``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtimes.base import JobContext, JobFailed

if TYPE_CHECKING:
    import torch

FLUSH_INTERVAL_S = 0.05
MAX_NEW_TOKENS_LIMIT = 32768
# Where model configs keep their context length, most common first. Hugging Face's
# attribute maps already alias n_positions/n_ctx to max_position_embeddings for GPT-2.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                "max_sequence_length", "seq_length", "seq_len", "block_size")


# -- the node's model registry ----------------------------------------------------

def load_model_registry(environ: Mapping[str, str]) -> dict[str, str]:
    """Model name -> local folder, from ``MINER_MODELS_FILE`` then ``MINER_MODELS``.

    ``MINER_MODELS`` is a JSON object. ``MINER_MODELS_FILE`` is a JSON or TOML
    file holding such a table at the top level or under ``models``; relative
    folders in it are relative to the file. ``MINER_MODELS`` wins on a clash.
    """
    registry: dict[str, str] = {}
    file_name = environ.get("MINER_MODELS_FILE", "").strip()
    if file_name:
        path = Path(file_name).expanduser()
        table = _registry_table(_read_registry_file(path), str(path))
        registry.update({name: str((path.parent / folder).expanduser())
                         for name, folder in table.items()})
    raw = environ.get("MINER_MODELS", "").strip()
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _registry_error("MINER_MODELS", f"not JSON: {exc}") from None
        registry.update({name: str(Path(folder).expanduser())
                         for name, folder in _registry_table(parsed, "MINER_MODELS").items()})
    return registry


def _read_registry_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _registry_error(str(path), f"unreadable: {exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError both are
        raise _registry_error(str(path), f"not valid {path.suffix or 'JSON'}: {exc}") from None


def _registry_table(parsed: Any, where: str) -> dict[str, str]:
    if isinstance(parsed, dict) and isinstance(parsed.get("models"), dict):
        parsed = parsed["models"]
    if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        raise _registry_error(where, "must map model names to folder paths (strings)")
    return dict(parsed)


def _registry_error(where: str, why: str) -> JobFailed:
    return JobFailed("model_not_found", f"this node's model registry ({where}) is unusable: {why}")


def resolve_model(payload: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, Path]:
    """The model's name and local folder; ``model_path`` only with MINER_ALLOW_MODEL_PATH=1."""
    if payload.get("model_path"):
        if environ.get("MINER_ALLOW_MODEL_PATH", "") != "1":
            raise JobFailed("invalid_job", "payload.model_path is not allowed on this node; "
                            "name a model instead")
        path = Path(str(payload["model_path"])).expanduser()
        name = str(payload.get("model") or path.name)
    else:
        name = _wanted_model(payload, environ)
        registry = load_model_registry(environ)
        if name not in registry:
            have = ", ".join(sorted(registry)) or "no models"
            raise JobFailed("model_not_found", f"model {name!r} is not on this node; it has: "
                            f"{have}", model=name, available=sorted(registry))
        path = Path(registry[name])
    if not path.is_dir():
        raise JobFailed("model_not_found", f"model {name!r}: folder {path} is missing",
                        model=name)
    return name, path


def _wanted_model(payload: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """The model the payload names, else the node's default (``MINER_DEFAULT_MODEL``)."""
    wanted = payload.get("model")
    if wanted is None or wanted == "":  # omitted, as AITBC's CLI does without --model
        default = environ.get("MINER_DEFAULT_MODEL", "").strip()
        if not default:
            raise JobFailed("invalid_job", "payload.model is missing and this node has no "
                            "default model (config field default_model, "
                            "MINER_AGENT_DEFAULT_MODEL); name a model in the payload")
        return default
    if not isinstance(wanted, str):
        raise JobFailed("invalid_job", f"payload.model must be a model name (a string), "
                        f"not {type(wanted).__name__}")
    return wanted


# -- the request ------------------------------------------------------------------

@dataclass
class GenerationRequest:
    """A validated inference payload."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    # Set by fit_to_context once the model is known.
    context_length: int | None = None
    capped_by_context: bool = False

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> GenerationRequest:
        """Validate ``payload``; raises ``JobFailed("invalid_job")`` naming the bad key."""
        prompt, messages = payload.get("prompt"), payload.get("messages")
        if messages is None and payload.get("chat") and isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        if messages is not None and not (isinstance(messages, list) and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise JobFailed("invalid_job", "payload.messages must be a list of "
                            "{role, content} objects")
        if messages is None and not isinstance(prompt, str):
            raise JobFailed("invalid_job", "payload.prompt must be a string (or give messages)")
        max_new = payload.get("max_new_tokens", 256)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or \
                not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
            raise JobFailed("invalid_job", f"payload.max_new_tokens must be a whole number in "
                            f"1..{MAX_NEW_TOKENS_LIMIT}, not {max_new!r}")
        stop = payload.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise JobFailed("invalid_job", "payload.stop must be a string or a list of strings")
        return cls(prompt=prompt if isinstance(prompt, str) else None, messages=messages,
                   max_new_tokens=max_new, stop=stop, sampling=_sampling(payload))


def context_length(config: Any) -> int | None:
    """The model's context in tokens, from the first of :data:`CONTEXT_KEYS` its config
    sets; ``None`` when it names none (relative positions, no fixed limit)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_to_context(request: GenerationRequest, prompt_tokens: int,
                   context: int | None) -> GenerationRequest:
    """``request`` with ``max_new_tokens`` cut to what ``context`` leaves after the prompt.

    Generating past the context indexes past the position table (an ``IndexError``
    mid-run) or silently degrades, so the cap is applied up front and recorded.
    Raises ``JobFailed("prompt_too_long")`` when the prompt leaves no room at all.
    """
    if context is None:
        return request
    if prompt_tokens >= context:
        raise JobFailed("prompt_too_long", f"the prompt is {prompt_tokens} tokens; the model's "
                        f"context is {context} tokens, which leaves none to generate",
                        prompt_tokens=prompt_tokens, context_length=context)
    room = context - prompt_tokens
    return replace(request, context_length=context,
                   max_new_tokens=min(request.max_new_tokens, room),
                   capped_by_context=request.max_new_tokens > room)


def _sampling(payload: Mapping[str, Any]) -> dict[str, Any]:
    numbers = {key: payload[key] for key in ("temperature", "top_p", "top_k",
                                              "repetition_penalty")
               if payload.get(key) is not None}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise JobFailed("invalid_job", f"payload.{key} must be a number >= 0, not {value!r}")
    temperature = numbers.get("temperature")
    do_sample = payload.get("do_sample")
    if do_sample is None:
        do_sample = temperature is not None and temperature > 0
    if not do_sample:  # greedy: sampling knobs would only draw warnings
        return {"do_sample": False, **({"repetition_penalty": numbers["repetition_penalty"]}
                                       if "repetition_penalty" in numbers else {})}
    if temperature == 0:
        raise JobFailed("invalid_job", "payload.temperature must be > 0 when do_sample is true")
    return {"do_sample": True, **numbers}


# -- streaming --------------------------------------------------------------------

class TextSink:
    """Buffers generated text; flushes to stdout and result.txt every ~50 ms."""

    def __init__(self, ctx: JobContext, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._ctx = ctx
        self._interval_s = interval_s
        self._buffer: list[str] = []
        self._last_flush = 0.0  # the first token goes out at once (time to first token)
        self.text = ""

    def write(self, text: str) -> None:
        if not text:
            return
        self.text += text
        self._buffer.append(text)
        if time.monotonic() - self._last_flush >= self._interval_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        chunk = "".join(self._buffer)
        self._buffer.clear()
        self._ctx.append_result(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()


class TokenStreamer:
    """A ``generate`` streamer: decodes new tokens, cuts at stop strings, counts, reports.

    It also serves as the stopping criterion: generation ends at the next token
    once a stop string appeared or a cancel was asked for.
    """

    def __init__(self, ctx: JobContext, tokenizer: Any, sink: TextSink, max_new_tokens: int,
                 stop: list[str]) -> None:
        self._ctx, self._tokenizer, self._sink = ctx, tokenizer, sink
        self._max_new = max_new_tokens
        self._stop = stop
        self._tokens: list[int] = []
        self._emitted = 0
        self._decoded = ""  # the text of the tokens before _read_at
        self._prefix_at = self._read_at = 0
        self._prompt_seen = False
        self.stopped_by_string = False
        self.t_first_token: float | None = None

    @property
    def tokens_generated(self) -> int:
        return len(self._tokens)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt itself
            self._prompt_seen = True
            return
        if self.stopped_by_string:
            return
        if self.t_first_token is None:
            self.t_first_token = time.monotonic()
        self._tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)
        n = len(self._tokens)
        self._ctx.progress(n / self._max_new, stage="generating", tokens_generated=n)

    def end(self) -> None:
        self._emit(final=True)
        self._sink.flush()

    def _emit(self, final: bool) -> None:
        text = self._text(final)
        if text.endswith("\ufffd") and not final:
            return  # a multi-byte character is still incomplete
        cut = self._find_stop(text)
        if cut is not None:
            text, self.stopped_by_string, final = text[:cut], True, True
        safe = len(text) if final else len(text) - self._held_back(text)
        if safe > self._emitted:
            self._sink.write(text[self._emitted:safe])
            self._emitted = safe

    def _text(self, final: bool) -> str:
        """The text so far, decoding only a short window of tokens per step.

        Decoding every token from the start costs O(n) per token, a visible share of
        a fast GPU's token step late in a long answer. The window starts one step
        back, so what a token adds is told apart from how the tokenizer joins it to
        its neighbours (leading spaces, multi-byte characters split across tokens).
        """
        decode = self._tokenizer.decode
        prefix = decode(self._tokens[self._prefix_at:self._read_at], skip_special_tokens=True)
        window = decode(self._tokens[self._prefix_at:], skip_special_tokens=True)
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):
            self._decoded += window[len(prefix):]
            self._prefix_at, self._read_at = self._read_at, len(self._tokens)
        return self._decoded

    def _find_stop(self, text: str) -> int | None:
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that could begin a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def should_stop(self) -> bool:
        """True once a stop string appeared or a cancel was asked for."""
        return self.stopped_by_string or self._ctx.cancelled


def _stopping_criteria(streamer: TokenStreamer) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStreamer(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            import torch

            return torch.full((input_ids.shape[0],), streamer.should_stop(), dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([StopOnStreamer()])


# -- the runtime ------------------------------------------------------------------

def run(ctx: JobContext) -> None:
    """Generate text for ``ctx.payload``; see the module docstring for the payload."""
    # Belt and braces: local_files_only already forbids downloads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    request = GenerationRequest.from_payload(ctx.payload)
    name, folder = resolve_model(ctx.payload, os.environ)
    from runtimes import device as dev

    setup = dev.select_device(ctx, ctx.payload)
    ctx.progress(0.0, stage="loading", message=f"loading {name}")
    t0 = time.monotonic()
    with dev.oom_guard(setup):
        tokenizer, model = load_model(name, folder, setup)
    generate_for(ctx, request, Loaded(name, tokenizer, model, time.monotonic() - t0), setup)


@dataclass
class Loaded:
    """A model ready to generate: its name, tokenizer, model, and what loading it took."""

    name: str
    tokenizer: Any
    model: Any
    load_time_s: float
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. the warm worker's cache hit


def generate_for(ctx: JobContext, request: GenerationRequest, loaded: Loaded, setup: Any) -> None:
    """Generate for ``request`` with a loaded model: stream, record metrics, honour cancel.

    Shared by :func:`run` (a job's own process) and the warm model worker
    (:mod:`runtimes.warm`), so both produce the same text, events and metrics.
    """
    from runtimes import device as dev

    name, tokenizer, model, load_time_s = (loaded.name, loaded.tokenizer, loaded.model,
                                           loaded.load_time_s)
    ctx.check_cancel()
    input_ids = encode_prompt(tokenizer, request).to(setup.device)
    request = fit_to_context(request, input_ids.shape[-1], context_length(model.config))
    dev.reset_peak_memory(setup)
    sink = TextSink(ctx)
    streamer = TokenStreamer(ctx, tokenizer, sink, request.max_new_tokens, request.stop)
    ctx.progress(0.0, stage="generating")
    t_start = time.monotonic()
    try:
        with dev.oom_guard(setup):
            generate(model, tokenizer, input_ids, request, streamer)
        dev.synchronize(setup)
    finally:
        streamer.end()  # whatever was decoded reaches stdout and result.txt, even on error
    elapsed = time.monotonic() - t_start
    ctx.set_metrics(**_metrics(name, streamer, request, input_ids.shape[-1], load_time_s,
                               t_start, elapsed, ctx.cancelled), **dev.peak_memory_metrics(setup),
                    **loaded.metrics)
    if ctx.cancelled:
        ctx.mark_partial()
        return
    ctx.progress(1.0, stage="done")


def load_model(name: str, folder: Path, setup: Any) -> tuple[Any, Any]:
    """Tokenizer and model from a local folder, on the setup's device and dtype."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers 4.56 renamed torch_dtype to dtype.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, **{dtype_key: setup.weights_dtype})
    except (OSError, ValueError) as exc:
        raise JobFailed("model_not_found", f"model {name!r} at {folder} could not be loaded: "
                        f"{str(exc).strip().splitlines()[0][:300]}", model=name) from None
    model.to(setup.device)
    model.eval()
    return tokenizer, model


def encode_prompt(tokenizer: Any, request: GenerationRequest) -> torch.Tensor:
    """The prompt as a (1, n) id tensor, through the chat template when asked."""
    if request.messages is None:
        return tokenizer(request.prompt, return_tensors="pt")["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise JobFailed("invalid_job", "this model has no chat template; send a plain prompt")
    text = tokenizer.apply_chat_template(request.messages, tokenize=False,
                                         add_generation_prompt=True)
    # The template already holds any BOS token.
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def generate(model: Any, tokenizer: Any, input_ids: torch.Tensor, request: GenerationRequest,
             streamer: TokenStreamer) -> None:
    """Run ``model.generate``, feeding ``streamer``; stops early on a stop string or cancel."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                       max_new_tokens=request.max_new_tokens, pad_token_id=pad,
                       streamer=streamer, stopping_criteria=_stopping_criteria(streamer),
                       **request.sampling)


def _metrics(name: str, streamer: TokenStreamer, request: GenerationRequest, prompt_tokens: int,
             load_time_s: float, t_start: float, elapsed: float,
             cancelled: bool) -> dict[str, Any]:
    n = streamer.tokens_generated
    if cancelled:
        reason = "canceled"
    elif streamer.stopped_by_string:
        reason = "stop"
    else:
        reason = "length" if n >= request.max_new_tokens else "eos"
    ttft = None if streamer.t_first_token is None else \
        round((streamer.t_first_token - t_start) * 1000, 1)
    return {"model": name, "tokens_generated": n, "prompt_tokens": int(prompt_tokens),
            "tokens_per_s": round(n / elapsed, 2) if elapsed > 0 else None,
            "time_to_first_token_ms": ttft, "load_time_s": round(load_time_s, 3),
            "generation_time_s": round(elapsed, 3), "stop_reason": reason,
            "max_new_tokens": request.max_new_tokens,
            "capped_by_context": request.capped_by_context,
            "context_length": request.context_length}
