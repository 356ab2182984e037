"""Tiny random encoders for tests and benchmarks: a real BERT architecture and a real WordPiece
tokenizer, small enough to finetune in milliseconds on a CPU. Saved as a Hugging Face folder so
every code path (including separate peer processes) loads it exactly like a pretrained model.

Also the bodies of honest and rogue group members, for the robust-fusion attack tests and benchmark."""

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


# --------------------------------------------------------------------------- group members for attack tests

ATTACKS = ("times_1e3", "noise", "target", "nan")  # what a rogue member sends (issue 8's table)
ROGUE_WEIGHT = 1e6  # the weight the `target` attack declares
TARGET = 7.0  # every value of the `target` attack's body


def member_body(shapes: dict[str, tuple[int, ...]], seed: int, iteration: int, spread: float = 0.01) -> dict[str, torch.Tensor]:
    """An honest member's body at `iteration`: the body every member shares at that iteration plus its own
    finetuning, of about `spread` per value. Any process rebuilds any member's body from (seed, iteration)."""
    common = torch.Generator().manual_seed(10_000 + iteration)
    own = torch.Generator().manual_seed(seed * 1000 + iteration)
    return {
        name: torch.randn(shape, generator=common) + spread * torch.randn(shape, generator=own)
        for name, shape in shapes.items()
    }


def contribution(play: str, body: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """(body, declared weight) that a member sends: `honest` sends `body` with weight 1, an attack of ATTACKS
    sends body x 1e3, N(0, 1) noise, TARGET everywhere with ROGUE_WEIGHT, or NaN."""
    if play == "honest":
        return body, 1.0
    if play == "times_1e3":
        return {name: value * 1e3 for name, value in body.items()}, 1.0
    if play == "noise":
        noise = torch.Generator().manual_seed(seed)
        return {name: torch.randn(value.shape, generator=noise) for name, value in body.items()}, 1.0
    if play == "target":
        return {name: torch.full_like(value, TARGET) for name, value in body.items()}, ROGUE_WEIGHT
    if play == "nan":
        return {name: torch.full_like(value, float("nan")) for name, value in body.items()}, 1.0
    raise ValueError(f"unknown play {play!r} (honest, {', '.join(ATTACKS)})")
