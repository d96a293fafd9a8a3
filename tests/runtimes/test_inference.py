"""Text generation with tiny random Llama and GPT-2 models and a tokenizer built offline."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from runtimes.base import EventChannel, JobContext, JobFailed
from runtimes.inference import (
    GenerationRequest,
    context_length,
    load_model_registry,
    resolve_model,
    run,
)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a miner runs jobs on a gpu and reports results",
    "tokens stream to stdout while the model generates text",
    "user assistant system hello world cancel stop partial",
]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over SENTENCES, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llm(folder: Path, seed: int = 0, context: int = 8192) -> Path:
    """Save a random 2-layer Llama and a word-level tokenizer under ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, pad_token_id=1, bos_token_id=2,
                         eos_token_id=None)  # no EOS: runs go to max_new_tokens
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_gpt2(folder: Path, context: int) -> Path:
    """Save a random 1-layer GPT-2: learned positions, so a token past ``context`` is an
    IndexError rather than a quietly stretched rotary angle."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=32,
                        n_layer=1, n_head=4, pad_token_id=1, bos_token_id=2, eos_token_id=None)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def short_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("short-gpt2"), context=32)


def make_ctx(tmp_path: Path, payload: dict[str, Any]) -> JobContext:
    """A context for a run in this process, pinned to the CPU.

    Hiding GPUs (tests/conftest.py) cannot reach this process once CUDA is initialised,
    and on a GPU the runtime would load bf16 weights.
    """
    return JobContext({"job_id": "t", "payload": {"device": "cpu", **payload}},
                      tmp_path / "pkg", tmp_path, EventChannel(None))


def generate_text(tmp_path: Path, tiny_llm: Path, monkeypatch: pytest.MonkeyPatch,
                  **payload: Any) -> tuple[str, JobContext]:
    monkeypatch.setenv("MINER_MODELS", json.dumps({"tiny": str(tiny_llm)}))
    ctx = make_ctx(tmp_path, {"type": "inference", "model": "tiny", **payload})
    run(ctx)
    return ctx.result_path.read_text(), ctx


def test_registry_merges_file_and_env(tmp_path):
    (tmp_path / "models.toml").write_text('[models]\n"llama3.2:3b" = "llama"\nother = "/o"\n')
    env = {"MINER_MODELS_FILE": str(tmp_path / "models.toml"),
           "MINER_MODELS": json.dumps({"other": "/elsewhere"})}
    assert load_model_registry(env) == {"llama3.2:3b": str(tmp_path / "llama"),
                                        "other": "/elsewhere"}
    (tmp_path / "models.json").write_text(json.dumps({"a": "/a"}))
    assert load_model_registry({"MINER_MODELS_FILE": str(tmp_path / "models.json")}) == {
        "a": "/a"}
    with pytest.raises(JobFailed, match="registry"):
        load_model_registry({"MINER_MODELS": "[1, 2]"})


def test_unknown_model_names_what_the_node_has(tmp_path):
    env = {"MINER_MODELS": json.dumps({"b": str(tmp_path), "a": str(tmp_path)})}
    with pytest.raises(JobFailed) as info:
        resolve_model({"model": "x"}, env)
    assert info.value.code == "model_not_found"
    assert info.value.message == "model 'x' is not on this node; it has: a, b"


def test_model_path_needs_the_node_to_allow_it(tmp_path):
    with pytest.raises(JobFailed, match="not allowed"):
        resolve_model({"model_path": str(tmp_path)}, {})
    assert resolve_model({"model_path": str(tmp_path)}, {"MINER_ALLOW_MODEL_PATH": "1"}) == (
        tmp_path.name, tmp_path)


def test_payload_validation():
    assert GenerationRequest.from_payload({"prompt": "p"}).max_new_tokens == 256
    assert GenerationRequest.from_payload({"prompt": "p", "temperature": 0.5}).sampling == {
        "do_sample": True, "temperature": 0.5}
    chat = GenerationRequest.from_payload({"prompt": "hi", "chat": True})
    assert chat.messages == [{"role": "user", "content": "hi"}]
    for bad in ({"prompt": 3}, {"prompt": "p", "max_new_tokens": 0},
                {"prompt": "p", "stop": [1]}, {"prompt": "p", "top_p": -1}):
        with pytest.raises(JobFailed) as info:
            GenerationRequest.from_payload(bad)
        assert info.value.code == "invalid_job"


def test_greedy_generation_writes_text_and_metrics(tmp_path, tiny_llm, monkeypatch):
    text, ctx = generate_text(tmp_path, tiny_llm, monkeypatch, prompt="the quick brown fox",
                              max_new_tokens=12, do_sample=False)
    assert 0 < len(text.split()) <= 12  # word-level; specials decode to nothing
    m = ctx.metrics
    assert m["tokens_generated"] == 12 and m["prompt_tokens"] == 4
    assert m["stop_reason"] == "length" and m["tokens_per_s"] > 0
    assert m["time_to_first_token_ms"] >= 0 and m["load_time_s"] > 0
    assert m["device"]["kind"] == "cpu" and m["peak_rss_mb"] > 0
    assert not ctx.partial
    again, _ = generate_text(tmp_path / "again", tiny_llm, monkeypatch,
                             prompt="the quick brown fox", max_new_tokens=12)
    assert again == text  # greedy is deterministic


def test_stop_string_cuts_the_text_before_it(tmp_path, tiny_llm, monkeypatch):
    full, _ = generate_text(tmp_path / "full", tiny_llm, monkeypatch, prompt="a miner runs",
                            max_new_tokens=30)
    words = full.split()
    stop_word = next(w for w in words[3:] if w != words[0])
    text, ctx = generate_text(tmp_path / "cut", tiny_llm, monkeypatch, prompt="a miner runs",
                              max_new_tokens=30, stop=[" " + stop_word])
    assert text == full[:full.find(" " + stop_word)]
    assert ctx.metrics["stop_reason"] == "stop"
    assert ctx.metrics["tokens_generated"] < 30


def test_chat_template_and_sampling_with_seed(tmp_path, tiny_llm, monkeypatch):
    messages = [{"role": "user", "content": "hello world"}]
    one, ctx = generate_text(tmp_path / "1", tiny_llm, monkeypatch, messages=messages,
                             max_new_tokens=8, temperature=1.0, top_k=5, seed=7)
    two, _ = generate_text(tmp_path / "2", tiny_llm, monkeypatch, messages=messages,
                           max_new_tokens=8, temperature=1.0, top_k=5, seed=7)
    assert one == two and 0 < len(one.split()) <= 8
    # "user hello world assistant": the template was applied
    assert ctx.metrics["prompt_tokens"] == 4


def test_job_process_unknown_model_fails_with_its_code(run_job, tmp_path):
    result = run_job("runtimes.inference:run", {"type": "inference", "model": "llama3.2:3b",
                                                "prompt": "hi"},
                     env={"MINER_MODELS": json.dumps({"tiny": str(tmp_path)})})
    assert result.exit_code == 1
    assert result.finished["error_code"] == "model_not_found"
    assert result.finished["error_message"] == (
        "model 'llama3.2:3b' is not on this node; it has: tiny")


@pytest.mark.slow
def test_cancel_mid_generation_keeps_the_text_so_far(run_job, tiny_llm):
    # Given a long generation in a real job process
    def cancel_once_tokens_flow(event: dict[str, Any], proc: Any) -> None:
        if event.get("stage") == "generating" and not sent and \
                event.get("metrics", {}).get("tokens_generated", 0) > 0:
            sent.append(True)
            # Not at once: a signal landing while the job still holds the event
            # channel's lock (it just wrote this event) deadlocks base.EventChannel.
            threading.Timer(0.05, os.killpg, (proc.pid, signal.SIGTERM)).start()

    sent: list[bool] = []

    # When it is sent SIGTERM while tokens stream
    result = run_job("runtimes.inference:run",
                     {"type": "inference", "model": "tiny", "prompt": "cancel stop",
                      "max_new_tokens": 6000},
                     env={"MINER_MODELS": json.dumps({"tiny": str(tiny_llm)})},
                     on_event=cancel_once_tokens_flow)
    # Then it stops early, says canceled and partial, and keeps every token it made
    assert result.exit_code == 3, result.stderr
    assert result.finished["outcome"] == "canceled" and result.finished["partial"] is True
    made = result.finished["metrics"]["tokens_generated"]
    assert 0 < made < 6000
    text = (result.package_dir / "result.txt").read_text()
    # special tokens a random model emits decode to nothing, hence <=
    assert 0 < len(text.split()) <= made and result.stdout == text
    assert result.finished["metrics"]["stop_reason"] == "canceled"
    device = result.named("device")[0]
    assert device["kind"] == "cpu" and "CUDA_VISIBLE_DEVICES=''" in device["reason"]


@pytest.mark.slow
def test_end_to_end_through_the_executor(tmp_path, tiny_llm):
    from agent.execution.executor import run_job_sync
    from agent.jobs import Job
    from tests.runtimes.conftest import REPO_ROOT

    job = Job.from_dict({"job_id": "inference-e2e", "payload": {
        "type": "inference", "model": "tiny", "prompt": "hello world", "max_new_tokens": 16}})
    report = run_job_sync(job, tmp_path / "out", launcher="spawn",
                          contract_env={"MINER_MODELS": json.dumps({"tiny": str(tiny_llm)})},
                          environ={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                   "CUDA_VISIBLE_DEVICES": ""})
    assert report.outcome.value == "completed", report.error_message
    assert report.output["metrics"]["tokens_generated"] == 16
    text = (report.folder / "result.txt").read_text()
    assert text.strip()
    assert (report.folder / "logs" / "stdout.log").read_text() == text


def test_default_max_new_tokens_is_capped_at_the_context(tmp_path, short_gpt2, monkeypatch):
    # Given a 32-position model and a 4-token prompt, with the default 256 new tokens
    # When it generates
    text, ctx = generate_text(tmp_path, short_gpt2, monkeypatch, prompt="the quick brown fox")
    # Then it fills the context and completes (no IndexError past position 32)
    m = ctx.metrics
    assert m["prompt_tokens"] == 4 and m["tokens_generated"] == 28
    assert m["max_new_tokens"] == 28 and m["capped_by_context"] is True
    assert m["context_length"] == 32 and m["stop_reason"] == "length"
    assert 0 < len(text.split()) <= 28 and not ctx.partial


def test_a_request_inside_the_context_is_not_capped(tmp_path, short_gpt2, monkeypatch):
    _, ctx = generate_text(tmp_path, short_gpt2, monkeypatch, prompt="the quick brown fox",
                           max_new_tokens=28)
    m = ctx.metrics
    assert m["tokens_generated"] == 28 and m["max_new_tokens"] == 28
    assert m["capped_by_context"] is False


def test_llama_context_comes_from_max_position_embeddings(tmp_path, monkeypatch):
    small = build_tiny_llm(tmp_path / "model", context=16)
    _, ctx = generate_text(tmp_path / "run", small, monkeypatch, prompt="hello world",
                           max_new_tokens=100)
    assert ctx.metrics["tokens_generated"] == 14 and ctx.metrics["capped_by_context"] is True


@pytest.mark.parametrize("words", [32, 40])
def test_a_prompt_that_fills_the_context_fails_prompt_too_long(tmp_path, short_gpt2,
                                                               monkeypatch, words):
    prompt = " ".join((SENTENCES[0].split() * 10)[:words])
    with pytest.raises(JobFailed) as info:
        generate_text(tmp_path, short_gpt2, monkeypatch, prompt=prompt)
    assert info.value.code == "prompt_too_long"
    assert info.value.message == (f"the prompt is {words} tokens; the model's context is 32 "
                                  "tokens, which leaves none to generate")
    assert info.value.details == {"prompt_tokens": words, "context_length": 32}
    assert not (tmp_path / "pkg" / "result.txt").exists()  # failed before generating


def test_context_length_reads_the_config_field_each_family_uses():
    from types import SimpleNamespace

    assert context_length(SimpleNamespace(max_position_embeddings=4096)) == 4096
    assert context_length(SimpleNamespace(n_positions=1024)) == 1024
    assert context_length(SimpleNamespace(n_ctx=2048)) == 2048
    assert context_length(SimpleNamespace(max_seq_len=512)) == 512
    assert context_length(SimpleNamespace(seq_length=8192)) == 8192
    assert context_length(SimpleNamespace(block_size=64)) == 64
    assert context_length(SimpleNamespace(hidden_size=32)) is None
    assert context_length(SimpleNamespace(max_position_embeddings=None, n_ctx=128)) == 128


def test_a_payload_without_model_runs_the_node_default(tmp_path, tiny_llm, monkeypatch):
    # Given a node whose config names a default model (the agent passes it on as
    # MINER_DEFAULT_MODEL), and a payload that names none, as AITBC's CLI sends it
    monkeypatch.setenv("MINER_MODELS", json.dumps({"tiny": str(tiny_llm)}))
    monkeypatch.setenv("MINER_DEFAULT_MODEL", "tiny")
    ctx = make_ctx(tmp_path, {"type": "inference", "prompt": "hello world",
                              "max_new_tokens": 4})
    # When it runs
    run(ctx)
    # Then the default model generated the text
    assert ctx.metrics["model"] == "tiny" and ctx.metrics["tokens_generated"] == 4
    assert ctx.result_path.read_text().strip()


def test_model_resolution_with_and_without_a_default(tmp_path):
    env = {"MINER_MODELS": json.dumps({"tiny": str(tmp_path), "other": str(tmp_path)})}
    with_default = {**env, "MINER_DEFAULT_MODEL": "tiny"}
    # A payload that names a model gets that model, default or not
    assert resolve_model({"model": "other"}, with_default) == ("other", tmp_path)
    # A missing or empty model falls back to the default
    assert resolve_model({}, with_default) == ("tiny", tmp_path)
    assert resolve_model({"model": None}, with_default) == ("tiny", tmp_path)
    assert resolve_model({"model": ""}, with_default) == ("tiny", tmp_path)
    # Without a default, a missing model is invalid_job naming the config field
    with pytest.raises(JobFailed) as info:
        resolve_model({}, env)
    assert info.value.code == "invalid_job" and "default_model" in info.value.message
    # A model that is not a name is invalid_job, default or not
    with pytest.raises(JobFailed) as info:
        resolve_model({"model": 7}, with_default)
    assert info.value.code == "invalid_job"
    # A default the registry lacks is model_not_found, naming what the node has
    with pytest.raises(JobFailed) as info:
        resolve_model({}, {**env, "MINER_DEFAULT_MODEL": "gone"})
    assert info.value.code == "model_not_found" and "'gone'" in info.value.message
