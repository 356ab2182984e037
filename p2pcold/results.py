"""Evaluation results: CSV/JSON files, a text table, and the paper-style plots (Fig. 2, 4, 10)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
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


FIELDS = [f.name for f in dataclasses.fields(EvalResult)]


def write_results(results: Sequence[EvalResult], folder: str | Path, stem: str = "results") -> tuple[Path, Path]:
    folder = Path(folder)
    rows = [dataclasses.asdict(r) for r in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({**row, "fusion": "" if row["fusion"] is None else json.dumps(row["fusion"], sort_keys=True)} for row in rows)
    atomic_write_bytes(folder / f"{stem}.csv", buffer.getvalue().encode())
    atomic_write_json(folder / f"{stem}.json", rows)
    return folder / f"{stem}.csv", folder / f"{stem}.json"


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
    """Mean accuracy per (model, iteration) row and (mode, seen/unseen) column, as aligned text."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    columns: list[str] = []
    for r in results:
        group = {True: "seen", False: "unseen", None: "all"}[r.seen]
        column = f"{'CoLD' if r.mode == 'cold' else 'Frozen'} {group}"
        if column not in columns:
            columns.append(column)
        cells[(r.model, r.iteration)][column].append(r.accuracy)
    columns.sort()
    header = ["model", "iteration", *columns]
    lines = [header]
    for (model, iteration), values in cells.items():
        lines.append([model, str(iteration), *(f"{mean(values[c]):.4f}" if values.get(c) else "-" for c in columns)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)


def _mean_curve(results: Sequence[EvalResult], mode: str, seen: bool | None) -> tuple[list[int], list[float]]:
    by_iteration: dict[int, list[float]] = defaultdict(list)
    for r in results:
        if r.mode == mode and (seen is None or r.seen == seen):
            by_iteration[r.iteration].append(r.accuracy)
    iterations = sorted(by_iteration)
    return iterations, [mean(by_iteration[i]) for i in iterations]


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
            iterations, accuracies = _mean_curve(results, mode, flag)
            if not iterations:
                continue
            line = ax.plot(iterations, accuracies, style, label=label)[0]
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
        base = {r.dataset: r.accuracy for r in results if r.mode == mode and r.iteration == 0}
        final = {r.dataset: r.accuracy for r in results if r.mode == mode and r.iteration == last}
        gains = sorted((100 * (final[d] - base[d]), d) for d in final if d in base)
        ax.bar(range(len(gains)), [g for g, _ in gains], color=["tab:green" if g >= 0 else "tab:red" for g, _ in gains])
        ax.set_xticks(range(len(gains)), [d for _, d in gains], rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{'CoLD' if mode == 'cold' else 'Frozen'}: gain at iteration {last} over pretrained")
        ax.set_ylabel("accuracy points")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fusion_record(status: str, members: list[str], attempts: int, failure: str | None) -> dict:
    """What a boundary produced, as checkpoints, results.json and progress records carry it."""
    return {"status": status, "members": sorted(members), "attempts": attempts, "failure": failure}
