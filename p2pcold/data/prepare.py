"""Tokenized splits and their loaders, ready for finetuning and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from p2pcold.config import DatasetSpec
from p2pcold.data.examples import load_examples
from p2pcold.utils import P2PColdError


@dataclass
class PreparedDataset:
    """One recipe's splits, tokenized but unpadded: columns input_ids, attention_mask,
    token_type_ids (when the tokenizer makes them) and labels."""

    name: str
    label_names: list[str]
    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def prepare_dataset(spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreparedDataset:
    if max_length > tokenizer.model_max_length:  # the model has no position embedding past this
        limit = tokenizer.model_max_length
        raise P2PColdError(f"max_length={max_length} is more than the model reads; set finetune.max_length and eval.finetune.max_length to at most {limit}")
    examples = load_examples(spec)

    def tokenize(batch):
        pairs = batch["text_pair"] if "text_pair" in batch else None
        encoded = tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    # In memory: cached on disk, a tokenized copy per tokenizer and max_length would pile up.
    splits = {
        name: split.map(tokenize, batched=True, remove_columns=split.column_names, keep_in_memory=True)
        for name, split in examples.items()
    }
    label_names = examples["train"].features["label"].names  # the recipe's, or those its data holds
    return PreparedDataset(name=spec.name, label_names=list(label_names), **splits)


CUDA_LOADER_WORKERS = 2  # collate in the background: one process keeps up with a GPU step, two leave slack


def make_loader(
    split: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int,
    cuda: bool = False,
) -> DataLoader:
    """Batches padded to their own longest row. With shuffle, the order depends only on `seed`,
    so every process that builds this loader sees the same batches; each pass over it draws a
    new order from the same seeded generator.

    `cuda`: batches for a GPU. At small batches, reading and padding the rows is a good part of a
    step's time on the host, so worker processes collate while the GPU computes, into pinned
    memory; lengths round up to a multiple of 8, which suits the tensor cores and leaves few
    distinct shapes for the kernels to be planned for (docs/performance.md, section 6).
    """
    return DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None),
        num_workers=CUDA_LOADER_WORKERS if cuda else 0,
        pin_memory=cuda,
    )


def few_shot(split: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    """A seeded random sample of `n` examples (all of them when the split is smaller)."""
    if n < 1:
        raise P2PColdError(f"few-shot size must be at least 1, got {n}")
    return split.shuffle(seed=seed, keep_in_memory=True).select(range(min(n, len(split))))
