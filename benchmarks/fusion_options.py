"""The fusion options on the transfer preset (issue 13): each trained by `p2pcold local`, its θ8 evaluated
with the preset's evaluation, and all of them set against the pretrained MiniLM in one table and plot.

    python -m benchmarks.fusion_options --folder runs/options            # train and evaluate (12-16 min an option)
    python -m benchmarks.fusion_options --folder runs/options --report   # only the table and plot

One process at a time: a training run and an evaluation side by side on 2 cores each ran 5x slower.
A training run keeps no evaluation (`eval.datasets=[]`); `p2pcold evaluate` then scores its θ8 with
the preset's eval section and seed, so every option meets the same few-shot samples and heads. The
baseline θ0 and the paper's defaults come from a full `p2pcold simulate transfer`
run (`--baseline`): θ0 evaluated twice gave the same digits, and `p2pcold local` equals the swarm.
Pooling changes the evaluation's head too, so its θ0 is evaluated again with CLS pooling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, log
from p2pcold.utils import packaged_recipes_dir

PRESET = packaged_recipes_dir() / "runs" / "transfer.yaml"
OPTIONS = {  # name -> (label, --set of the training run, extra arguments of its evaluation)
    "task_arithmetic": ("task arithmetic, λ = 0.5", ["fusion.method=task_arithmetic", "fusion.scale=0.5"], []),
    "ties": ("TIES, density 0.2, λ = 1 (local only)", ["fusion.method=ties", "fusion.density=0.2"], []),
    "dare": ("DARE, drop rate 0.9", ["fusion.method=dare", "fusion.drop_rate=0.9"], []),
    "nesterov": ("outer step η = 0.7, Nesterov μ = 0.5 (not decentralized)", ["fusion.outer_learning_rate=0.7", "fusion.outer_momentum=0.5", "fusion.nesterov=true"], []),
    "backtrack": ("backtracking, step 0 (local only)", ["fusion.backtrack=true"], []),
    "cls": ("CLS pooling (against θ0 with CLS)", ["finetune.pooling=cls"], ["--set", "eval.finetune.pooling=cls"]),
}
SIMULATED = {"transfer": "mean, η = 1 (the paper; simulate)", "transfer-outer05": "mean, η = 0.5 (simulate)"}


def cli(*args: str, log_path: Path) -> None:
    with open(log_path, "w") as out:
        code = subprocess.run([sys.executable, "-m", "p2pcold.cli", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        raise SystemExit(f"fusion_options: `p2pcold {args[0]}` exited with {code}; see {log_path}")


def train_and_evaluate(folder: Path, name: str) -> None:
    _, sets, eval_args = OPTIONS[name]
    run = folder / name
    cli("local", str(PRESET), "--output-dir", str(run), *[a for s in ["eval.datasets=[]", "eval.unseen=[]", *sets] for a in ("--set", s)], log_path=folder / f"{name}.log")
    bases = (["minilm"] if name == "cls" else []) + [str(sorted((run / "checkpoints").glob("iter-*"))[-1])]
    cli("evaluate", "--config", str(PRESET), "--seed", "0", "--output", str(folder / f"eval-{name}"), "--base", *bases, *eval_args, log_path=folder / f"eval-{name}.log")


def by_target(path: Path, iteration: int) -> dict:
    rows = json.loads(path.read_text()) if path.is_file() else []
    return {(r["dataset"], r["mode"]): r for r in rows if r["iteration"] == iteration}


def gains(base: dict, fused: dict) -> dict:
    """Points gained per (mode, kind): mean over targets, worst target, and the std over seeds of the
    mean gain (seed k of every base shares its few-shot sample and head, so gains pair up by seed)."""
    out = {}
    for mode in ("cold", "frozen"):
        for seen in (False, True):
            keys = [k for k in fused if k[1] == mode and fused[k]["seen"] == seen]
            points = [100 * (fused[k]["accuracy"] - base[k]["accuracy"]) for k in keys]
            by_seed = [statistics.fmean(100 * (fused[k]["seed_accuracies"][s] - base[k]["seed_accuracies"][s]) for k in keys) for s in range(len(fused[keys[0]]["seed_accuracies"]))]
            out[mode, seen] = (statistics.fmean(points), min(points), statistics.stdev(by_seed) if len(by_seed) > 1 else 0.0)
    return out


def report(folder: Path, baseline: Path) -> list[tuple[str, dict]]:
    theta0 = by_target(baseline / "transfer" / "results.json", 0)
    rows = [(label, gains(theta0, by_target(baseline / run / "results.json", 8))) for run, label in SIMULATED.items() if (baseline / run / "results.json").is_file()]
    for name, (label, _, _) in OPTIONS.items():
        results = folder / f"eval-{name}" / "results.json"
        if results.is_file():
            own_theta0 = by_target(results, 0) if name == "cls" else theta0
            rows.append((label, gains(own_theta0, by_target(results, 8))))
    print("| fusion | CoLD unseen: mean ± seed std / worst target | Frozen unseen: mean ± seed std / worst target | CoLD seen | Frozen seen |")
    print("|---|---|---|---|---|")
    for label, g in rows:
        unseen = [f"{g[mode, False][0]:+.1f} ± {g[mode, False][2]:.1f} / {g[mode, False][1]:+.1f}" for mode in ("cold", "frozen")]
        print(f"| {label} | {unseen[0]} | {unseen[1]} | {g['cold', True][0]:+.1f} ± {g['cold', True][2]:.1f} | {g['frozen', True][0]:+.1f} ± {g['frozen', True][2]:.1f} |")
    plot(rows, ROOT / "docs" / "transfer-options.png")
    return rows


def plot(rows: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(("cold", False), "CoLD, unseen"), (("frozen", False), "Frozen, unseen"), (("cold", True), "CoLD, seen"), (("frozen", True), "Frozen, seen")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 0.5 * len(rows) + 1.8), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        means = [g[key][0] for _, g in rows]
        ax.barh(range(len(rows)), means, color=["tab:blue" if i == 0 else "tab:gray" for i in range(len(rows))])
        if not key[1]:  # unseen: the worst target as a marker
            ax.plot([g[key][1] for _, g in rows], range(len(rows)), "v", color="tab:red", label="worst target")
            ax.legend(loc="lower right", fontsize=8)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("θ8 − pretrained (points)")
    axes[0].set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Fusion options on the transfer preset: gain over pretrained MiniLM at θ8 (100 shots, 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"fusion_options: wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="training runs and evaluations go here")
    parser.add_argument("--baseline", type=Path, default=ROOT / "runs", help="holds the simulated runs `transfer` (and `transfer-outer05`)")
    parser.add_argument("--only", nargs="*", choices=sorted(OPTIONS), default=sorted(OPTIONS))
    parser.add_argument("--report", action="store_true", help="only build the table and plot from what --folder holds")
    args = parser.parse_args()
    if not args.report:
        args.folder.mkdir(parents=True, exist_ok=True)
        for name in args.only:
            log(f"fusion_options: {name}")
            train_and_evaluate(args.folder, name)
    report(args.folder, args.baseline)


if __name__ == "__main__":
    main()
