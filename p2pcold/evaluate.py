"""The paper's evaluation of a base model (§3.4) on target datasets.

- CoLD: finetune the whole model from the base, then test accuracy (the base-model goal).
- CoLD-Frozen: train only a new head on the frozen base (linear probing; the single-model goal).
- Few-shot (§4.3): either mode trained on only n examples.

Frozen probing encodes each example once and trains the head on the cached features: the body
is frozen, so this is the same optimisation as running the body every step, and much cheaper.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from p2pcold.config import EvalConfig, RunConfig, load_dataset_spec
from p2pcold.data import PreparedDataset, few_shot, make_loader, prepare_dataset
from p2pcold.finetune import accuracy, finetune
from p2pcold.model import Classifier, hidden_size, load_body_state, new_head
from p2pcold.results import EvalResult, write_results_and_plots
from p2pcold.utils import atomic_directory, derive_seed, get_logger

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

    def _train_split(self, data: PreparedDataset, seed_index: int):
        if self.config.few_shot is None:
            return data.train
        return few_shot(data.train, self.config.few_shot, derive_seed(*self._seed_parts(seed_index, "few-shot", data.name)))

    def _seed_parts(self, seed_index: int, *parts: str) -> tuple:
        """The seed's parts for one draw; seed 0 keeps the parts a single-seed evaluation always
        used, so `eval.seeds: 1` evaluates exactly as before seeds existed."""
        return (self.seed, *parts) if seed_index == 0 else (self.seed, *parts, f"seed-{seed_index}")

    def _seen(self, name: str) -> bool | None:
        return None if self.seen is None else name in self.seen

    def evaluate(self, base: dict[str, torch.Tensor], label: str, iteration: int) -> list[EvalResult]:
        """One row per target and mode; with `eval.seeds` > 1, the mean over the seeds, with each
        seed's accuracy. Seed k draws the same few-shot sample and head for every base, so bases
        are compared on equal terms seed by seed."""
        results = []
        for data in self.targets:
            accuracies: dict[str, list[float]] = {mode: [] for mode in self.config.modes}
            for seed_index in range(self.config.seeds):
                train = self._train_split(data, seed_index)
                for mode in self.config.modes:
                    evaluate_mode = self._cold if mode == "cold" else self._frozen
                    accuracies[mode].append(evaluate_mode(base, data, train, seed_index))
            for mode, values in accuracies.items():
                row = EvalResult.over_seeds(label, iteration, data.name, mode, values, self._seen(data.name), self.config.few_shot, len(train))
                results.append(row)
                log.info("eval %s iter %d %s %s: accuracy %s", label, iteration, data.name, mode, row.accuracy_text())
        return results

    def _model(self, base, data: PreparedDataset, purpose: str, seed_index: int) -> Classifier:
        load_body_state(self.body, base)
        seed = derive_seed(*self._seed_parts(seed_index, purpose, data.name))
        head = new_head(hidden_size(self.body), data.num_labels, seed, self.config.finetune.dropout)
        return Classifier(self.body, head, self.config.finetune.pooling).to(self.device)

    def _test_loader(self, data: PreparedDataset):
        return make_loader(data.test, self.tokenizer, self.config.finetune.batch_size, shuffle=False, seed=0)

    def _cold(self, base, data: PreparedDataset, train, seed_index: int) -> float:
        model = self._model(base, data, "eval-cold-head", seed_index)
        seed = derive_seed(*self._seed_parts(seed_index, "eval-cold", data.name))
        finetune(model, data, self.tokenizer, self.config.finetune, seed, self.device, train_split=train, desc=f"CoLD eval {data.name}")
        return accuracy(model, self._test_loader(data), self.device, self.config.finetune)

    def _frozen(self, base, data: PreparedDataset, train, seed_index: int) -> float:
        model = self._model(base, data, "eval-frozen-head", seed_index)
        seed = derive_seed(*self._seed_parts(seed_index, "eval-frozen", data.name))
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


def evaluation_due(iteration: int, every: int, iterations: int) -> bool:
    """Which bases a run evaluates: θ0 (the baseline every gain is measured against), every
    `every`-th fused base (0: none in between) and the last one."""
    return iteration == 0 or iteration == iterations or (every > 0 and iteration % every == 0)


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


class RunEvaluation:
    """A run's evaluation: θ0, then each fused base, kept in `folder` as results.csv / results.json, the
    plots, `checkpoints/last` and (with `simulate.keep_best`) `checkpoints/best`.

    One evaluator, two callers: the simulator's evaluator process (bases from a peer's run folder) and
    `p2pcold monitor --evaluate` (bases downloaded from the swarm). Resumes from folder/results.json."""

    def __init__(self, config: RunConfig, folder: str | Path, device: torch.device):
        from p2pcold.model import body_state, load_body, load_tokenizer
        from p2pcold.results import read_results

        self.config = config
        self.folder = Path(folder)
        path = self.folder / "results.json"
        self.results: list[EvalResult] = read_results(path) if path.is_file() else []
        seen = {load_dataset_spec(d).name for d in config.datasets}
        body = load_body(config.model, config.num_hidden_layers)
        self.theta0 = body_state(body)  # before the evaluator loads bases into its working body
        self.evaluator = Evaluator(config.eval, load_tokenizer(config.model), body, config.seed, device, seen)

    @property
    def last_iteration(self) -> int:
        return max((r.iteration for r in self.results), default=0)

    def is_due(self, iteration: int) -> bool:
        return iteration > self.last_iteration and evaluation_due(iteration, self.config.eval.every, self.config.iterations)

    def next_checkpoint(self, source: Path) -> tuple[int, Path] | None:
        """The first complete checkpoint in the run folder `source` that is due for evaluation; None
        until one is written. The caller keeps them until evaluated, so none is skipped however far
        behind the evaluation falls."""
        from p2pcold.model import checkpoint_path, latest_checkpoint, read_metadata

        newest = latest_checkpoint(source)
        if newest is None:
            return None
        for iteration in range(self.last_iteration + 1, read_metadata(newest).iteration + 1):
            path = checkpoint_path(source, iteration)
            if self.is_due(iteration) and path.is_dir():
                return iteration, path
        return None

    def evaluate_next(self, source: Path, starting: Callable[[int], None] = lambda iteration: None) -> int | None:
        """Evaluate the next due checkpoint of the run folder `source` (`starting(iteration)` first), then
        delete the older checkpoints there, which only the evaluation needed. Its iteration, or None
        when none is ready yet."""
        ready = self.next_checkpoint(source)
        if ready is None:
            return None
        iteration, checkpoint = ready
        starting(iteration)
        self.evaluate_checkpoint(checkpoint, iteration)
        for old in (Path(source) / "checkpoints").glob("iter-*"):
            if int(old.name.split("-")[1]) < iteration:
                shutil.rmtree(old, ignore_errors=True)
        return iteration

    def evaluate_pretrained(self) -> None:
        if not any(r.iteration == 0 for r in self.results):
            self.results = evaluate_and_record(self.evaluator, self.results, self.theta0, "pretrained", 0, self.folder)

    def evaluate_checkpoint(self, checkpoint: Path, iteration: int) -> None:
        """Copy the fused base to checkpoints/last, evaluate it, and keep it as checkpoints/best when best."""
        from p2pcold.model import body_state, load_body, read_metadata

        last = self.folder / "checkpoints" / "last"
        copy_checkpoint(checkpoint, last)
        fusion = read_metadata(last).extra.get("fusion")
        self.results = evaluate_and_record(self.evaluator, self.results, body_state(load_body(str(last))), "fused", iteration, self.folder, fusion)
        if self.config.simulate.keep_best and best_iteration(self.results) == iteration:
            copy_checkpoint(last, self.folder / "checkpoints" / "best")


def best_iteration(results: Sequence[EvalResult]) -> int:
    """The iteration with the best mean accuracy in the first mode (the later one on a tie)."""
    by_iteration: dict[int, list[float]] = {}
    for r in results:
        if r.mode == results[0].mode:
            by_iteration.setdefault(r.iteration, []).append(r.accuracy)
    return max(by_iteration, key=lambda i: (sum(by_iteration[i]) / len(by_iteration[i]), i))


def copy_checkpoint(checkpoint: Path, destination: Path) -> None:
    with atomic_directory(destination) as tmp:
        for item in checkpoint.iterdir():
            shutil.copy2(item, tmp / item.name)
