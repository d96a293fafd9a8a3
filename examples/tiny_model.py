"""Build a tiny GPT-2 style model and tokenizer for the inference example, offline.

    python examples/tiny_model.py [OUT_DIR]

writes a Hugging Face model folder (config, safetensors weights, tokenizer) to OUT_DIR,
by default ``examples/models/tiny-gpt2``: the folder ``examples/models.toml`` names. The
weights are random (seeded), so the text it generates is gibberish; what the example
shows is the path a real model takes through a node: a name in the node's model
registry, a local folder, the ``inference`` runtime streaming tokens into the package.
Nothing is downloaded. It takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "tiny-gpt2"
EOS = "</s>"
UNK = "<unk>"
PAD = "<pad>"
# The tokenizer's vocabulary: the words of this text (lower-cased), so the random model
# strings real words together. A prompt word outside it becomes <unk>.
CORPUS = """
A miner runs jobs on a GPU and reports the results to the coordinator. Once upon a
time there was a small model that lived on a node. The quick brown fox jumps over the
lazy dog. Tokens stream to stdout while the model generates text. Training, inference
and batch jobs each leave a checksummed package with logs, metrics and artifacts.
"""


def build_tokenizer() -> Any:
    """A word-level tokenizer over :data:`CORPUS`, saved as a ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()  # words and punctuation, apart
    words = sorted({word for word, _ in split.pre_tokenize_str(CORPUS.lower())})
    vocab = {token: i for i, token in enumerate([UNK, PAD, EOS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = split
    core.decoder = decoders.WordPiece()  # words joined by spaces, none before "."
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS,
                                   unk_token=UNK, pad_token=PAD)


def build(out_dir: Path, seed: int = 0) -> Path:
    """Save a random 2-layer GPT-2 (0.12 M parameters) and its tokenizer in ``out_dir``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64,
                        n_layer=2, n_head=4, bos_token_id=ids(EOS), eos_token_id=ids(EOS),
                        pad_token_id=ids(PAD))
    model = GPT2LMHeadModel(config)
    # Random weights pick any token: with no EOS the run goes to max_new_tokens (every
    # run shows tokens streaming), and the special tokens are never generated.
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [ids(UNK), ids(PAD), ids(EOS)]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT,
                        help=f"where the model folder goes (default: {DEFAULT_OUT})")
    args = parser.parse_args()
    print(f"tiny model written to {build(args.out_dir)}")


if __name__ == "__main__":
    main()
