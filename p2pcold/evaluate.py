"""The paper's evaluation of a base model (§3.4) on target datasets.

- CoLD: finetune the whole model from the base, then test accuracy (the base-model goal).
- CoLD-Frozen: train only a new head on the frozen base (linear probing; the single-model goal).
- Few-shot (§4.3): either mode trained on only n examples.

Frozen probing encodes each example once and trains the head on the cached features: the body
is frozen, so this is the same optimisation as running the body every step, and much cheaper.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from p2pcold.config import EvalConfig, load_dataset_spec
from p2pcold.data import PreparedDataset, few_shot, make_loader, prepare_dataset
from p2pcold.finetune import accuracy, finetune
from p2pcold.model import Classifier, hidden_size, load_body_state, new_head
from p2pcold.results import EvalResult, write_results_and_plots
from p2pcold.utils import derive_seed, get_logger

log = get_logger("evaluate")


@torch.no_grad()
def encode(model: Classifier, split, tokenizer, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled body features (N, H) and labels (N,) of a split, in order."""
    model.eval()
    features, labels = [], []
    for batch in make_loader(split, tokenizer, batch_size, shuffle=False, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        features.append(model.pooled(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(features), torch.cat(labels)


def train_probe(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Train a head on cached features (N, H) -> labels (N,) with AdamW, seeded."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(head(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()


class Evaluator:
    """Evaluates base bodies on a fixed set of target datasets, prepared once."""

    def __init__(self, config: EvalConfig, tokenizer, body, seed: int, device: torch.device, seen: set[str] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.body = body  # a working body; each evaluation loads the base into it
        self.seed = seed
        self.device = device
        self.seen = seen
        self.targets: list[PreparedDataset] = [
            prepare_dataset(load_dataset_spec(name), tokenizer, config.finetune.max_length) for name in config.datasets
        ]

    def _train_split(self, data: PreparedDataset):
        if self.config.few_shot is None:
            return data.train
        return few_shot(data.train, self.config.few_shot, derive_seed(self.seed, "few-shot", data.name))

    def _seen(self, name: str) -> bool | None:
        return None if self.seen is None else name in self.seen

    def evaluate(self, base: dict[str, torch.Tensor], label: str, iteration: int) -> list[EvalResult]:
        results = []
        for data in self.targets:
            train = self._train_split(data)
            for mode in self.config.modes:
                acc = self._cold(base, data, train, iteration) if mode == "cold" else self._frozen(base, data, train)
                results.append(EvalResult(label, iteration, data.name, mode, acc, self._seen(data.name), self.config.few_shot, len(train)))
                log.info("eval %s iter %d %s %s: accuracy %.4f", label, iteration, data.name, mode, acc)
        return results

    def _model(self, base, data: PreparedDataset, purpose: str) -> Classifier:
        load_body_state(self.body, base)
        seed = derive_seed(self.seed, purpose, data.name)
        head = new_head(hidden_size(self.body), data.num_labels, seed, self.config.finetune.dropout)
        return Classifier(self.body, head, self.config.finetune.pooling).to(self.device)

    def _test_loader(self, data: PreparedDataset):
        return make_loader(data.test, self.tokenizer, self.config.finetune.batch_size, shuffle=False, seed=0)

    def _cold(self, base, data: PreparedDataset, train, iteration: int) -> float:
        model = self._model(base, data, "eval-cold-head")
        seed = derive_seed(self.seed, "eval-cold", data.name)
        finetune(model, data, self.tokenizer, self.config.finetune, seed, self.device, train_split=train, desc=f"CoLD eval {data.name}")
        return accuracy(model, self._test_loader(data), self.device, self.config.finetune)

    def _frozen(self, base, data: PreparedDataset, train) -> float:
        model = self._model(base, data, "eval-frozen-head")
        seed = derive_seed(self.seed, "eval-frozen", data.name)
        return probe_accuracy(model, train, data.test, self.tokenizer, self.config, seed, self.device)


def probe_accuracy(model: Classifier, train, test, tokenizer, config: EvalConfig, seed: int, device: torch.device) -> float:
    """CoLD-Frozen: train `model`'s head on the frozen body's cached features of `train`, then its test accuracy."""
    batch = config.finetune.batch_size
    train_x, train_y = encode(model, train, tokenizer, batch, device)
    test_x, test_y = encode(model, test, tokenizer, batch, device)
    head = model.head.cpu()
    train_probe(head, train_x, train_y, config.frozen_epochs, config.frozen_learning_rate, batch, seed)
    with torch.no_grad():
        return float((head(test_x).argmax(-1) == test_y).float().mean())


class DevScorer:
    """Backtracking's cheap score of a base on a contributor's data (§7): CoLD-Frozen trained on
    `examples` of its train split, tested on `examples` of its dev split. Seeded per dataset, so two
    bases are compared on the same examples with the same head initialisation."""

    def __init__(self, config: EvalConfig, tokenizer, body, examples: int, seed: int, device: torch.device):
        self.config = config
        self.tokenizer = tokenizer
        self.body = body  # a working body of its own
        self.examples = examples
        self.seed = seed
        self.device = device

    def score(self, base: dict[str, torch.Tensor], data: PreparedDataset) -> float:
        load_body_state(self.body, base)
        head = new_head(hidden_size(self.body), data.num_labels, derive_seed(self.seed, "backtrack-head", data.name), 0.0)
        model = Classifier(self.body, head, self.config.finetune.pooling).to(self.device)
        train = few_shot(data.train, self.examples, derive_seed(self.seed, "backtrack-train", data.name))
        dev = few_shot(data.dev, self.examples, derive_seed(self.seed, "backtrack-dev", data.name))
        return probe_accuracy(model, train, dev, self.tokenizer, self.config, derive_seed(self.seed, "backtrack-probe", data.name), self.device)


def evaluate_and_record(
    evaluator: Evaluator,
    results: Sequence[EvalResult],
    base: dict[str, torch.Tensor],
    label: str,
    iteration: int,
    folder: str | Path,
    fusion: dict | None = None,
) -> list[EvalResult]:
    """Evaluate `base` (θ_iteration), replace that iteration's rows of `results` with the new ones
    (carrying the boundary's `fusion` record), and write results files and plots into `folder`."""
    rows = [dataclasses.replace(r, fusion=fusion) for r in evaluator.evaluate(base, label, iteration)]
    results = [r for r in results if r.iteration != iteration] + rows
    write_results_and_plots(results, folder)
    return results
