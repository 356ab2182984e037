"""Local finetuning: one contributor's work in one iteration (§3.3, App. B).

AdamW, lr 5e-5 with linear decay, weight decay 0.01, an effective batch through gradient
accumulation, and early stopping on dev accuracy. The same procedure serves CoLD Fusion's
contributors and the CoLD evaluation (§3.3: "We follow the exact same finetuning procedure").
Deterministic on CPU for a given seed: dropout, data order and the head come from the seed.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from p2pcold.config import Budget, DatasetSpec, FinetuneConfig
from p2pcold.data import PreparedDataset, make_loader, prepare_dataset
from p2pcold.model import Classifier, ClassificationHead, body_state, hidden_size, load_body_state, new_head
from p2pcold.utils import P2PColdError, derive_seed, get_logger

log = get_logger("finetune")


@dataclass
class FinetuneResult:
    examples: int  # training examples processed (with repeats across epochs)
    steps: int  # optimizer steps
    train_loss: float  # mean loss over the run
    dev_accuracy: float | None
    seconds: float  # wall time in the training loop, evaluation excluded
    stopped_by: str  # which limit ended it: steps, examples, epochs, seconds, early_stopping

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise P2PColdError(f"device {device!r} asked for, but CUDA is not available")
    return torch.device(device)


def planned_steps(budget: Budget, train_size: int, examples_per_step: int) -> int | None:
    """Optimizer steps the budget allows, for the linear decay; None when only time bounds it."""
    limits = []
    if budget.steps is not None:
        limits.append(budget.steps)
    if budget.examples is not None:
        limits.append(math.ceil(budget.examples / examples_per_step))
    if budget.epochs is not None:
        limits.append(math.ceil(budget.epochs * train_size / examples_per_step))
    return max(1, min(limits)) if limits else None


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # As in RoBERTa/BERT finetuning: no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = _decay_groups(model, config.weight_decay)
    if config.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise P2PColdError("optimizer adamw8bit (bitsandbytes) needs a CUDA device")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise P2PColdError("optimizer adamw8bit needs bitsandbytes: pip install 'p2pcold[gpu]'") from None
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate)
    # On a GPU the fused kernel updates every parameter in a few launches instead of a few per tensor.
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type == "cuda")


def autocast(config: FinetuneConfig, device: torch.device):
    if config.precision == "bf16":
        if device.type != "cuda":
            raise P2PColdError("precision bf16 is for CUDA devices; use fp32 on CPU")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def accuracy(model: Classifier, loader, device: torch.device, config: FinetuneConfig | None = None) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    with autocast(config, device) if config else nullcontext():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            predictions = model(batch).argmax(-1)  # (B,)
            correct += int((predictions == batch["labels"]).sum())
            total += int(batch["labels"].numel())
    model.train(was_training)
    return correct / max(total, 1)


def dev_accuracy_of(model: Classifier, data: PreparedDataset, tokenizer, config: FinetuneConfig, seed: int, device: torch.device) -> float | None:
    """`model`'s accuracy on `data.dev`; None when the dataset has no dev split."""
    if not len(data.dev):
        return None
    return accuracy(model, make_loader(data.dev, tokenizer, config.batch_size, shuffle=False, seed=seed), device, config)


def finetune(
    model: Classifier,
    data: PreparedDataset,
    tokenizer,
    config: FinetuneConfig,
    seed: int,
    device: torch.device,
    train_body: bool = True,
    train_split=None,
    desc: str | None = None,
    evaluate_dev: bool = True,
) -> FinetuneResult:
    """Train `model` (body and head, or the head only) in place on `data.train` within the budget.

    `train_split` replaces `data.train` (e.g. a few-shot subset). Returns throughput and
    accuracy figures; the trained weights stay in `model`. `evaluate_dev=False` leaves the final dev
    accuracy out (None), for a caller that measures it later (`dev_accuracy`).
    """
    train = data.train if train_split is None else train_split
    if len(train) == 0:
        raise P2PColdError(f"dataset {data.name}: no training examples")
    torch.manual_seed(seed)
    model.to(device).train()
    model.body.requires_grad_(train_body)
    examples_per_step = config.batch_size * config.gradient_accumulation
    total_steps = planned_steps(config.budget, len(train), examples_per_step)
    optimizer = make_optimizer(model, config, device)
    warmup = int(config.warmup_ratio * total_steps) if total_steps else 0

    def lr_factor(step: int) -> float:
        if total_steps is None:
            return 1.0  # time-only budget: no horizon to decay towards
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    dev_loader = make_loader(data.dev, tokenizer, config.batch_size, shuffle=False, seed=seed) if len(data.dev) else None
    budget = config.budget
    examples = steps = micro = 0
    # The running loss stays on the device: reading it every step would make the host wait for the
    # GPU, so the next batch could not be collated and launched while the current one computes.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64: as exact as a Python float sum
    loss_count = 0
    last_eval_examples = 0
    previous_dev: float | None = None
    stopped_by = ""
    training_seconds = 0.0
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, unit="step", leave=False, disable=desc is None or None)

    def budget_reached() -> str:
        if budget.steps is not None and steps >= budget.steps:
            return "steps"
        if budget.examples is not None and examples >= budget.examples:
            return "examples"
        if budget.epochs is not None and examples >= budget.epochs * len(train):
            return "epochs"
        if budget.seconds is not None and training_seconds >= budget.seconds:
            return "seconds"
        return ""

    epoch = 0
    while not stopped_by:
        loader = make_loader(train, tokenizer, config.batch_size, shuffle=True, seed=seed + epoch, cuda=device.type == "cuda")
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(config, device):
                logits = model(batch)  # (B, C)
                loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
            (loss / config.gradient_accumulation).backward()
            loss_sum += loss.detach()
            loss_count += 1
            examples += int(batch["labels"].numel())
            micro += 1
            if micro % config.gradient_accumulation == 0:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                bar.update(1)
                if not bar.disable:  # only a visible bar needs the loss on the host
                    bar.set_postfix(loss=f"{float(loss_sum) / loss_count:.3f}", refresh=False)
            training_seconds = time.perf_counter() - started
            if config.eval_every_examples and dev_loader and examples - last_eval_examples >= config.eval_every_examples:
                eval_started = time.perf_counter()
                last_eval_examples = examples
                dev = accuracy(model, dev_loader, device, config)
                if previous_dev is not None and dev - previous_dev < config.early_stopping_min_delta:
                    stopped_by = "early_stopping"
                previous_dev = dev
                started += time.perf_counter() - eval_started  # evaluation time is not training time
            stopped_by = stopped_by or budget_reached()
            if stopped_by:
                break
        epoch += 1
    bar.close()
    train_loss = float(loss_sum) / max(loss_count, 1)  # waits for the device's last step
    training_seconds = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    model.body.requires_grad_(True)
    dev_accuracy = dev_accuracy_of(model, data, tokenizer, config, seed, device) if evaluate_dev else None
    return FinetuneResult(
        examples=examples,
        steps=steps,
        train_loss=train_loss,
        dev_accuracy=dev_accuracy,
        seconds=training_seconds,
        stopped_by=stopped_by,
    )


# --------------------------------------------------------------------------- one contributor


@dataclass
class Contribution:
    """What a contributor hands to fusion after one iteration: its finetuned body and its figures."""

    dataset: str
    iteration: int
    body: dict[str, torch.Tensor]  # CPU copies; the head never leaves the contributor
    result: FinetuneResult


class Contributor:
    """One dataset's contributor: its prepared data, its local head, its per-iteration seeds.

    The in-process reference run, the swarm peer and the Repository's peers all call
    `contribute`, so a contributor's update depends only on (base body, dataset, run seed,
    iteration) and every mode reproduces the reference run.
    """

    def __init__(self, spec: DatasetSpec, tokenizer, config: FinetuneConfig, run_seed: int):
        self.name = spec.name
        self.tokenizer = tokenizer
        self.config = config
        self.run_seed = run_seed
        self.data = prepare_dataset(spec, tokenizer, config.max_length)
        self.head_state: dict[str, torch.Tensor] | None = None  # kept across iterations with head: keep
        self._finetuned: tuple | None = None  # (model, seed, device) of the last contribute, for dev_accuracy

    def _head(self, hidden: int, iteration: int) -> ClassificationHead:
        reinit = self.config.head == "reinit" or self.head_state is None
        seed_parts = (self.run_seed, "head", self.name) + ((iteration,) if self.config.head == "reinit" else ())
        head = new_head(hidden, self.data.num_labels, derive_seed(*seed_parts), self.config.dropout)
        if not reinit:
            head.load_state_dict(self.head_state)
        return head

    def contribute(
        self, body, base: dict[str, torch.Tensor], iteration: int, device: torch.device, show_progress: bool = True, evaluate_dev: bool = True
    ) -> Contribution:
        """Finetune `base` (loaded into the working `body`) on this dataset for one iteration's budget.

        `evaluate_dev=False` leaves the dev accuracy to a later `dev_accuracy(...)` call on the same
        working model (a swarm peer measures it while the boundary's all-reduce runs)."""
        load_body_state(body, base)
        model = Classifier(body, self._head(hidden_size(body), iteration), self.config.pooling)
        seed = derive_seed(self.run_seed, "finetune", iteration, self.name)
        result = finetune(
            model,
            self.data,
            self.tokenizer,
            self.config,
            seed=seed,
            device=device,
            desc=f"iter {iteration} {self.name}" if show_progress else None,
            evaluate_dev=evaluate_dev,
        )
        self._finetuned = (model, seed, device)
        if self.config.head == "keep":
            self.head_state = {k: v.detach().to("cpu", copy=True) for k, v in model.head.state_dict().items()}
        return Contribution(self.name, iteration, body_state(body), result)

    def dev_accuracy(self) -> float | None:
        """The last finetuned model's dev accuracy, as `contribute(evaluate_dev=True)` reports it. Valid
        until the working body is loaded again (the next `contribute`)."""
        model, seed, device = self._finetuned
        return dev_accuracy_of(model, self.data, self.tokenizer, self.config, seed, device)
