"""Tiny random encoders for tests and benchmarks: a real BERT architecture and a real WordPiece
tokenizer, small enough to finetune in milliseconds on a CPU. Saved as a Hugging Face folder so
every code path (including separate peer processes) loads it exactly like a pretrained model."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast  # one class in transformers 5

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = (
    "the a an and or not is was are be to of in on for with this that it movie film good bad great "
    "terrible awesome awful love hate plot story actor flight delay late airline united apple iphone "
    "car cars driverless self driving football game ball deflated patriots happy sad neutral yes no "
    "but very really so too just fun boring best worst"
).split()


def build_tiny_encoder(
    path: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised BERT encoder and its tokenizer to `path`; return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _SPECIAL + list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase] + _WORDS
    vocab += [c for c in string.digits + string.punctuation]
    vocab = list(dict.fromkeys(vocab))
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    return path
