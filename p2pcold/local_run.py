"""The in-process reference run: the paper's CoLD Fusion loop (§2.3, §3.4) in one process.

Each iteration samples k contributors (seeded), finetunes each from the current base θ_i,
fuses their bodies into θ_{i+1} (the run's `fusion` options; with `fusion.backtrack`, a fused base
worse on most members' dev sets is rejected), evaluates it, and checkpoints. Every networked mode
(decentralized swarm, centralized Repository) must reproduce this run, so it is kept
deterministic and resumable: a run killed and resumed ends bit-identical to one never stopped.

Run folder:
    config.yaml             the resolved config (a resumed run must match it)
    checkpoints/iter-NNNN/  θ_N as a Hugging Face folder (+ heads.safetensors, p2pcold.json)
    latest.json             the newest complete checkpoint, written after it
    iterations.json         per iteration: contributors, their finetuning figures, the backtracking scores
    results.csv / .json     evaluation rows; accuracy.png, gain_per_dataset.png
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import torch
from tqdm.auto import tqdm

from p2pcold.config import RunConfig, load_dataset_spec
from p2pcold.evaluate import DevScorer, Evaluator, evaluate_and_record, evaluation_due
from p2pcold.finetune import Contributor, resolve_device
from p2pcold.fusion import aggregate, sample_contributors
from p2pcold.merging import add_delta, backtrack_rejects, delta
from p2pcold.results import EvalResult, fusion_record, read_results, summary_table
from p2pcold.run_folder import check_run_folder, write_run_config
from p2pcold.run_state import RunState
from p2pcold.utils import atomic_write_json, get_logger, read_json

log = get_logger("local_run")


class LocalRun:
    """setup() -> train() -> cleanup(); `base` holds θ_i between iterations."""

    def __init__(self, config: RunConfig, device: str | None = None, show_progress: bool = True):
        self.config = config
        self.device = resolve_device(device)
        self.show_progress = show_progress
        self.output_dir = Path(config.output_dir)
        self.results: list[EvalResult] = []
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        if config.finetune.num_threads:
            torch.set_num_threads(config.finetune.num_threads)
        check_run_folder(self.output_dir, config)
        self.state = RunState(config, self.output_dir)
        self.tokenizer = self.state.tokenizer
        specs = [load_dataset_spec(name) for name in config.datasets]
        log.info("preparing %d contributor datasets", len(specs))
        self.contributors = {spec.name: Contributor(spec, self.tokenizer, config.finetune, config.seed) for spec in specs}
        self.evaluator = None
        if config.eval.datasets:
            # The evaluator loads each base into a working body of its own.
            self.evaluator = Evaluator(config.eval, self.tokenizer, copy.deepcopy(self.state.body), config.seed, self.device, set(self.contributors))
        if config.fusion.backtrack:
            self.scorer = DevScorer(config.eval, self.tokenizer, copy.deepcopy(self.state.body), config.fusion.backtrack_examples, config.seed, self.device)
        write_run_config(self.output_dir, self.config)  # started: the folder is this run's from now on
        if self.state.resume() is not None:
            self._resume()
        elif self.evaluator:
            self._evaluate("pretrained")

    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def base(self) -> dict[str, torch.Tensor]:
        return self.state.base

    def _resume(self) -> None:
        for name, head in self.state.heads.items():
            if name in self.contributors:
                self.contributors[name].head_state = head
        self.history = [h for h in self._read_json("iterations.json", []) if h["iteration"] < self.iteration]
        if (self.output_dir / "results.json").is_file():
            self.results = [r for r in read_results(self.output_dir / "results.json") if r.iteration <= self.iteration]

    def _read_json(self, name: str, default):
        path = self.output_dir / name
        return read_json(path) if path.is_file() else default

    # ------------------------------------------------------------------ train

    def train(self) -> dict[str, torch.Tensor]:
        config = self.config
        bar = tqdm(total=config.iterations, initial=self.iteration, desc="CoLD Fusion", unit="iter", disable=not self.show_progress or None)
        while self.iteration < config.iterations:
            self.run_iteration()
            bar.update(1)
        bar.close()
        return self.base

    def run_iteration(self) -> None:
        i = self.iteration
        names = sample_contributors(list(self.contributors), self.config.contributors_per_iteration, self.config.seed, i)
        log.info("iteration %d: contributors %s", i, ", ".join(names))
        contributions = [
            self.contributors[name].contribute(self.state.body, self.base, i, self.device, self.show_progress) for name in names
        ]
        weights = [c.result.examples for c in contributions] if self.config.fusion_weighting == "examples" else None
        fuse = functools.partial(aggregate, rule=self.config.aggregation)
        merged = self.state.merger.merge_all([c.body for c in contributions], self.base, i, names, weights, fuse)
        momentum = self.state.momentum
        fused = self.state.step_from_merged(merged)
        backtrack = None
        if self.config.fusion.backtrack:
            fused, backtrack = self._backtrack(names, fused, momentum)
        self.state.base = fused
        self.state.iteration = i + 1
        self.history.append(
            {
                "iteration": i,
                "fusion": fusion_record("ok", names, 1, None),
                "backtrack": backtrack,
                "contributors": {
                    c.dataset: {**dataclasses.asdict(c.result), "examples_per_second": c.result.examples_per_second}
                    for c in contributions
                },
            }
        )
        for c in contributions:
            log.info(
                "iteration %d %s: loss %.4f dev acc %s, %d examples, %.1f ex/s",
                i, c.dataset, c.result.train_loss, _fmt(c.result.dev_accuracy), c.result.examples, c.result.examples_per_second,
            )
        if self.evaluator and evaluation_due(self.iteration, self.config.eval.every, self.config.iterations):
            self._evaluate("fused")
        self.save_checkpoint()

    def _backtrack(self, names: list[str], fused: dict[str, torch.Tensor], momentum) -> tuple[dict[str, torch.Tensor], dict]:
        """§7: score θ_i and the fused base on each member's dev set; when the fused one is worse on most
        members, take θ_i + backtrack_step·(fused − θ_i) and keep θ_i's momentum buffer."""
        previous = {name: self.scorer.score(self.base, self.contributors[name].data) for name in names}
        scores = {name: self.scorer.score(fused, self.contributors[name].data) for name in names}
        rejected = backtrack_rejects(previous, scores)
        step = self.config.fusion.backtrack_step if rejected else 1.0
        if rejected:
            log.warning("iteration %d: the fused base scored worse on most members; backtracking (step %.2f)", self.iteration, step)
            fused = self.base if step == 0 else add_delta(self.base, delta(fused, self.base), step)
            self.state.momentum = momentum
        return fused, {"previous": previous, "fused": scores, "rejected": rejected, "step": step}

    def _evaluate(self, label: str) -> None:
        fusion = self.history[-1]["fusion"] if self.history and self.iteration > 0 else None
        self.results = evaluate_and_record(self.evaluator, self.results, self.base, label, self.iteration, self.output_dir, fusion)

    # ------------------------------------------------------------------ checkpoint

    def save_checkpoint(self) -> Path:
        """Write θ_i and the heads, then point latest.json at it: a crash in between loses nothing."""
        last = self.history[-1] if self.history else {}
        heads = {name: c.head_state for name, c in self.contributors.items() if c.head_state is not None}
        atomic_write_json(self.output_dir / "iterations.json", self.history)
        return self.state.save_checkpoint(heads, extra={"history": last, "fusion": last.get("fusion"), "backtrack": last.get("backtrack")})

    def summary(self) -> str:
        return summary_table(self.results) if self.results else "(no evaluation configured)"

    def cleanup(self) -> None:
        del self.contributors, self.evaluator


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
