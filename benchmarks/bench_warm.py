"""Warm model workers: a job on a loaded model against a bare ``generate()``, paired.

    python -m benchmarks.bench_warm [--quick] [--device cpu|cuda] [--repeat N]
                                    [--tokens N] [--sandbox on|off]

Model: a random GPT-2 (hidden 384, 4 layers, a word-level tokenizer) built and saved
to a temporary folder, so a token step is measurable and nothing is downloaded.

Each pair runs the same greedy prompt twice, in alternating order:

- bare: ``model.generate()`` in this process, on the model loaded once here with the
  inference runtime's own loader (same device and dtype); a streamer notes the first
  new token. Time to first token counts from before the prompt is tokenized.
- warm: an ``inference`` job through :class:`agent.execution.warm.WarmRun` into the
  warm worker (the way the daemon runs it, package included), on the model the worker
  already holds. Time to first token counts from the job's submit (``run()``) to the
  first generated text reaching the agent; tokens/s is the job's own metric (new
  tokens over prefill plus decode, as bare).

Figures: (a) submit-to-first-token, warm minus bare, per pair (target: within 50 ms);
(b) tokens/s, warm over bare, per pair (target >= 0.99x); medians with the spread
(min..max); p95 only from 20 pairs up. (c) for contrast, the cold path: the worker's
start plus the first job (model loaded), and a second model's load in a warm worker.
Benchmarks never fail a build: a figure below target is printed, not raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import Outcome
from agent.execution.executor import ExecutorConfig, JobReport
from agent.execution.sandbox import SandboxPolicy
from agent.execution.warm import WarmPool, WarmRun, WarmSettings
from agent.jobs import Job

PROMPT = "the quick brown fox jumps over the lazy dog"
WORDS = sorted(set("the quick brown fox jumps over the lazy dog a miner runs jobs on a gpu "
                   "and reports results tokens stream to stdout while the model generates "
                   "text".split()))
TTFT_TARGET_MS = 50.0
RATE_TARGET = 0.99


def build_model(folder: Path, hidden: int = 384, layers: int = 4) -> Path:
    """A random GPT-2 with no end token (every run goes to max_new_tokens), saved offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + WORDS)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=2048, n_embd=hidden,
                        n_layer=layers, n_head=6, pad_token_id=1, bos_token_id=2,
                        eos_token_id=None)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    with torch.no_grad():  # tied embeddings: special tokens score 0, words win (visible text)
        model.transformer.wte.weight[:len(specials)] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Bare:
    """The model loaded once in this process, as the inference runtime loads it."""

    def __init__(self, folder: Path, device: str, scratch: Path) -> None:
        from runtimes import device as dev
        from runtimes.base import EventChannel, JobContext
        from runtimes.inference import load_model

        ctx = JobContext({"job_id": "bare", "payload": {}}, scratch, scratch, EventChannel(None))
        self.setup = dev.select_device(ctx, {"device": device})
        self.tokenizer, self.model = load_model("bench", folder, self.setup)

    def generate(self, tokens: int) -> tuple[float, float]:
        """One greedy run: (ms to the first new token, new tokens per second)."""
        import torch

        from runtimes import device as dev

        t0 = time.monotonic()
        ids = self.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(self.setup.device)
        first = FirstToken()
        t_gen = time.monotonic()
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                streamer=first)
        dev.synchronize(self.setup)
        elapsed = time.monotonic() - t_gen
        assert first.at is not None
        return (first.at - t0) * 1000, tokens / elapsed


class FirstToken:
    """A ``generate`` streamer that notes when the first new token came."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, _value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.at is None:  # the first call is the prompt itself
            self.at = time.monotonic()

    def end(self) -> None:
        return None


@dataclass
class Warm:
    """The warm side: a pool and the executor config the daemon would use."""

    pool: WarmPool
    cfg: ExecutorConfig
    device: str
    count: int = 0

    async def job(self, model: str, tokens: int) -> tuple[JobReport, float | None]:
        """One job; returns its report and ms from submit to its first text at the agent."""
        self.count += 1
        job = Job.from_dict({"job_id": f"warm-{self.count}", "payload": {
            "type": "inference", "model": model, "prompt": PROMPT, "max_new_tokens": tokens,
            "do_sample": False, "device": self.device}})
        run = self.pool.run_for(job, self.cfg, [], gpu_ids=None, environ=dict(os.environ),
                                created_at=time.time())
        assert isinstance(run, WarmRun)
        t0 = time.monotonic()
        report = await run.run()
        if report.outcome is not Outcome.COMPLETED:
            raise SystemExit(f"the warm job failed: {report.error_code}: {report.error_message}")
        first = run.warm.first_text_at if run.warm is not None else None
        return report, None if first is None else (first - t0) * 1000


def spread(values: list[float], digits: int = 1) -> str:
    line = (f"median {statistics.median(values):.{digits}f}, min {min(values):.{digits}f}, "
            f"max {max(values):.{digits}f}, n {len(values)}")
    if len(values) >= 20:
        line += f", p95 {statistics.quantiles(values, n=20)[18]:.{digits}f}"
    return line


async def measure(args: argparse.Namespace, root: Path) -> None:
    models = {"bench": build_model(root / "bench"), "other": build_model(root / "other")}
    sandbox = None
    if args.sandbox == "on":
        sandbox = SandboxPolicy(jobs_root=root / "jobs", work_root=root / "work",
                                read_only=tuple(models.values()))
    cfg = ExecutorConfig(root / "jobs", work_root=root / "work", sandbox=sandbox,
                         contract_env={"MINER_MODELS": json.dumps(
                             {k: str(v) for k, v in models.items()})})
    cfg.out_root.mkdir(parents=True)
    (root / "work").mkdir()
    warm = Warm(WarmPool(WarmSettings(root / "warm")), cfg, args.device)
    try:
        await report_cold(warm, args.tokens)
        bare = Bare(models["bench"], args.device, root / "bare")
        bare.generate(args.tokens)  # this process's first run warms its allocator too
        await pairs(warm, bare, args)
    finally:
        await warm.pool.close()


async def report_cold(warm: Warm, tokens: int) -> None:
    t0 = time.monotonic()
    first, _ = await warm.job("bench", tokens)
    total = (time.monotonic() - t0) * 1000
    other, _ = await warm.job("other", tokens)
    print(f"(c) cold, for contrast: worker start + first job {total:.0f} ms (model load "
          f"{first.output['metrics']['model_load_ms']:.0f} ms); a second model's first job "
          f"in the warm worker loads it in {other.output['metrics']['model_load_ms']:.0f} ms")
    await warm.job("bench", tokens)  # back to the benchmark's model (loaded: a cache hit)


async def pairs(warm: Warm, bare: Bare, args: argparse.Namespace) -> None:
    ttft_diff, rates, warm_ttft, bare_ttft = [], [], [], []
    for i in range(args.repeat):
        if i % 2 == 0:  # alternate the order: neither side always runs second
            b_ttft, b_rate = bare.generate(args.tokens)
            report, w_ttft = await warm.job("bench", args.tokens)
        else:
            report, w_ttft = await warm.job("bench", args.tokens)
            b_ttft, b_rate = bare.generate(args.tokens)
        metrics = report.output["metrics"]
        assert metrics["model_cached"] is True and w_ttft is not None, report.folder
        ttft_diff.append(w_ttft - b_ttft)
        rates.append(float(metrics["tokens_per_s"]) / b_rate)
        warm_ttft.append(w_ttft)
        bare_ttft.append(b_ttft)
    print(f"(a) submit to first token, ms: warm {spread(warm_ttft)}; bare {spread(bare_ttft)}")
    verdict = "meets" if statistics.median(ttft_diff) <= TTFT_TARGET_MS else "MISSES"
    print(f"    warm minus bare, per pair: {spread(ttft_diff)}  "
          f"(target <= {TTFT_TARGET_MS:.0f} ms: {verdict})")
    verdict = "meets" if statistics.median(rates) >= RATE_TARGET else "MISSES"
    print(f"(b) tokens/s, warm over bare, per pair: {spread(rates, 3)}  "
          f"(target >= {RATE_TARGET}x: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 3)[3])
    parser.add_argument("--quick", action="store_true", help="5 pairs of 32 tokens")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, help="pairs (default 20; 5 with --quick)")
    parser.add_argument("--tokens", type=int, help="new tokens per run (default 128; 32 quick)")
    parser.add_argument("--sandbox", choices=("on", "off"), default="off",
                        help="run the worker in bubblewrap, as the daemon does by default")
    args = parser.parse_args()
    args.repeat = args.repeat or (5 if args.quick else 20)
    args.tokens = args.tokens or (32 if args.quick else 128)
    print(f"bench_warm: {args.repeat} pairs, {args.tokens} greedy tokens each, device "
          f"{args.device}, worker sandbox {args.sandbox}; GPT-2 hidden 384 x 4 layers, "
          "random weights, built offline")
    print("method: bare = generate() in this warm process; warm = an inference job through "
          "WarmRun into the warm worker holding the model; pairs alternate order; figures "
          "are per-pair differences/ratios")
    root = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        asyncio.run(measure(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
