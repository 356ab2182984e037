"""Evaluation results: CSV/JSON files, a text table, and the paper-style plots (Fig. 2, 4, 10)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Sequence

from p2pcold.utils import P2PColdError, atomic_write_bytes, atomic_write_json, read_json


@dataclass
class EvalResult:
    model: str  # what was evaluated, e.g. "pretrained" or "fused"
    iteration: int  # the base's iteration (0: the pretrained model)
    dataset: str
    mode: str  # cold | frozen
    accuracy: float
    seen: bool | None  # did a contributor train on this dataset? None when unknown
    few_shot: int | None
    train_examples: int
    # What the boundary that produced this base did: {"members": [...], "attempts": n, "status": ...,
    # "failure": ...} (None for θ0, and in files written before it was recorded).
    fusion: dict | None = None
    # `accuracy` is the mean of these, one per evaluation seed (`eval.seeds`); empty in files
    # written before seeds existed, which had one.
    seed_accuracies: list[float] = field(default_factory=list)
    accuracy_std: float | None = None  # sample standard deviation over the seeds; None for one seed

    @classmethod
    def over_seeds(
        cls, model: str, iteration: int, dataset: str, mode: str, accuracies: Sequence[float],
        seen: bool | None, few_shot: int | None, train_examples: int,
    ) -> EvalResult:
        spread = stdev(accuracies) if len(accuracies) > 1 else None
        return cls(model, iteration, dataset, mode, mean(accuracies), seen, few_shot, train_examples,
                   seed_accuracies=list(accuracies), accuracy_std=spread)

    def per_seed(self) -> list[float]:
        return self.seed_accuracies or [self.accuracy]

    def accuracy_text(self) -> str:
        """`0.8125`, or `0.8125 ± 0.0102 (3 seeds)`."""
        if self.accuracy_std is None:
            return f"{self.accuracy:.4f}"
        return f"{self.accuracy:.4f} ± {self.accuracy_std:.4f} ({len(self.seed_accuracies)} seeds)"


FIELDS = [f.name for f in dataclasses.fields(EvalResult)]


def write_results(results: Sequence[EvalResult], folder: str | Path, stem: str = "results") -> tuple[Path, Path]:
    folder = Path(folder)
    rows = [dataclasses.asdict(r) for r in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({**row, "fusion": _json_cell(row["fusion"]), "seed_accuracies": _json_cell(row["seed_accuracies"])} for row in rows)
    atomic_write_bytes(folder / f"{stem}.csv", buffer.getvalue().encode())
    atomic_write_json(folder / f"{stem}.json", rows)
    return folder / f"{stem}.csv", folder / f"{stem}.json"


def _json_cell(value) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True)


def read_results(path: str | Path) -> list[EvalResult]:
    """Rows of a results.json, also one written before a field with a default existed."""
    rows = read_json(path)
    try:
        return [EvalResult(**row) for row in rows]
    except TypeError:  # not a list of rows with EvalResult's fields
        raise P2PColdError(f"{path}: damaged results file; restore it or move it away") from None


def write_results_and_plots(results: Sequence[EvalResult], folder: str | Path) -> None:
    """results.csv / .json, accuracy.png, and gain_per_dataset.png once a fused base was evaluated."""
    folder = Path(folder)
    write_results(results, folder)
    plot_accuracy(results, folder / "accuracy.png")
    if any(r.iteration > 0 for r in results):
        plot_gain_per_dataset(results, folder / "gain_per_dataset.png")


def summary_table(results: Sequence[EvalResult]) -> str:
    """Mean accuracy per (model, iteration) row and (mode, seen/unseen) column, as aligned text; with
    several evaluation seeds, ± the standard deviation of that mean over the seeds."""
    cells: dict[tuple[str, int], dict[str, list[EvalResult]]] = defaultdict(lambda: defaultdict(list))
    columns: list[str] = []
    for r in results:
        group = {True: "seen", False: "unseen", None: "all"}[r.seen]
        column = f"{'CoLD' if r.mode == 'cold' else 'Frozen'} {group}"
        if column not in columns:
            columns.append(column)
        cells[(r.model, r.iteration)][column].append(r)
    columns.sort()
    header = ["model", "iteration", *columns]
    lines = [header]
    for (model, iteration), rows in cells.items():
        lines.append([model, str(iteration), *(_mean_text(rows[c]) if rows.get(c) else "-" for c in columns)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)


def _mean_text(rows: Sequence[EvalResult]) -> str:
    spread = seed_spread(rows)
    value = f"{mean(r.accuracy for r in rows):.4f}"
    return value if spread is None else f"{value} ± {spread:.4f}"


def seed_spread(rows: Sequence[EvalResult]) -> float | None:
    """The standard deviation over seeds of the mean accuracy of `rows` (seed k's mean is over each
    row's k-th seed); None unless every row has the same number of seeds, and more than one."""
    counts = {len(r.per_seed()) for r in rows}
    if len(counts) != 1 or counts == {1}:
        return None
    per_seed = zip(*(r.per_seed() for r in rows))
    return stdev(mean(values) for values in per_seed)


def _mean_curve(results: Sequence[EvalResult], mode: str, seen: bool | None) -> tuple[list[int], list[float], list[float | None]]:
    """Per iteration: the mean accuracy over the matching rows and its spread over seeds."""
    by_iteration: dict[int, list[EvalResult]] = defaultdict(list)
    for r in results:
        if r.mode == mode and (seen is None or r.seen == seen):
            by_iteration[r.iteration].append(r)
    iterations = sorted(by_iteration)
    means = [mean(r.accuracy for r in by_iteration[i]) for i in iterations]
    return iterations, means, [seed_spread(by_iteration[i]) for i in iterations]


def plot_accuracy(results: Sequence[EvalResult], path: str | Path, title: str = "CoLD Fusion") -> Path:
    """Accuracy per iteration for CoLD and Frozen against the pretrained model (iteration 0),
    one panel per group (all, or seen and unseen): the paper's Fig. 2 and Fig. 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    has_seen_split = any(r.seen is not None for r in results)
    groups = [("seen", True), ("unseen", False)] if has_seen_split else [("all targets", None)]
    groups = [(name, flag) for name, flag in groups if any(flag is None or r.seen == flag for r in results)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (name, flag) in zip(axes[0], groups):
        for mode, style, label in (("cold", "-o", "CoLD (finetuned)"), ("frozen", ":s", "CoLD-Frozen (head only)")):
            iterations, accuracies, spreads = _mean_curve(results, mode, flag)
            if not iterations:
                continue
            line = ax.plot(iterations, accuracies, style, label=label)[0]
            if any(spread is not None for spread in spreads):  # ± one standard deviation over the seeds
                low = [a - (d or 0.0) for a, d in zip(accuracies, spreads)]
                high = [a + (d or 0.0) for a, d in zip(accuracies, spreads)]
                ax.fill_between(iterations, low, high, color=line.get_color(), alpha=0.15)
            if iterations[0] == 0:
                ax.axhline(accuracies[0], color=line.get_color(), linestyle="--", alpha=0.6, label=f"pretrained ({mode})")
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gain_per_dataset(results: Sequence[EvalResult], path: str | Path) -> Path:
    """Per-dataset gain of the last iteration over the pretrained model, sorted (the paper's Fig. 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(r.iteration for r in results)
    modes = sorted({r.mode for r in results})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        base = {r.dataset: r for r in results if r.mode == mode and r.iteration == 0}
        final = {r.dataset: r for r in results if r.mode == mode and r.iteration == last}
        gains = sorted((100 * (final[d].accuracy - base[d].accuracy), _gain_spread(base[d], final[d]), d) for d in final if d in base)
        errors = [spread or 0.0 for _, spread, _ in gains] if any(spread is not None for _, spread, _ in gains) else None
        ax.bar(range(len(gains)), [g for g, _, _ in gains], yerr=errors, capsize=3,
               color=["tab:green" if g >= 0 else "tab:red" for g, _, _ in gains])
        ax.set_xticks(range(len(gains)), [d for _, _, d in gains], rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{'CoLD' if mode == 'cold' else 'Frozen'}: gain at iteration {last} over pretrained")
        ax.set_ylabel("accuracy points")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _gain_spread(base: EvalResult, final: EvalResult) -> float | None:
    """Standard deviation over seeds of the gain in points: seed k evaluated both bases on the same
    few-shot sample, so the gains pair up seed by seed."""
    before, after = base.per_seed(), final.per_seed()
    if len(before) != len(after) or len(before) < 2:
        return None
    return 100 * stdev(a - b for a, b in zip(after, before))


def fusion_record(status: str, members: list[str], attempts: int, failure: str | None) -> dict:
    """What a boundary produced, as checkpoints, results.json and progress records carry it."""
    return {"status": status, "members": sorted(members), "attempts": attempts, "failure": failure}
