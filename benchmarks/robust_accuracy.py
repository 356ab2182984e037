"""Robust fusion with MiniLM on the offline data (issue 8): what one rogue contribution costs in accuracy.

The demo's run (the `demo` preset: all-MiniLM-L6-v2, 30 steps of 16 examples per contributor, its
evaluation of CoLD and CoLD-Frozen on one seen and one unseen target) with five honest contributors,
every offline recipe that is not an evaluation-only target. One boundary: the five finetune θ0, and their
bodies are fused

- honest-only, with the paper's mean and with the run's default rule (`aggregation` defaults: a trimmed
  mean, as five contributors are at least `robust_min_contributors`);
- with a sixth, rogue contribution of each attack of `p2pcold.testing.ATTACKS` (made from θ0, as a rogue
  that never trained would), under the default rule;
- with the rogue's `target` attack under the plain mean with weights as declared (hivemind's reducer),
  to show what the defaults defend against.

Each fused base gets the run's evaluation. Fusion is `p2pcold.fusion.aggregate`, the function that every
all-reduce reducer applies to its parts (`p2pcold.swarm.robust_reduce`; the swarm-equals-reference tests
hold them equal), so the accuracy here is the swarm's.

Run alone: python -m benchmarks.run --only robust_accuracy [--quick]   (~20 min on 2 quiet cores, over
an hour under load; --quick: frozen evaluation only). A fused base equal to one already evaluated is
not evaluated again: the NaN rogue is left out of every block, so that base is the honest-only one.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import log
from p2pcold import testing
from p2pcold.config import AggregationConfig, load_config, load_dataset_spec
from p2pcold.evaluate import Evaluator
from p2pcold.finetune import Contributor, resolve_device
from p2pcold.fusion import aggregate, average
from p2pcold.model import body_state, load_body, load_tokenizer
from p2pcold.utils import state_dict_hash

HONEST = ["rotten_tomatoes", "tweets_airlines", "tweets_deflategate", "tweets_self_driving", "debates_2016_party"]
ROGUE = "rogue"


def fused_bases(theta0: dict, bodies: list[dict], rule: AggregationConfig) -> dict[str, dict]:
    """Every variant's fused base from the honest `bodies` (label -> body)."""
    honest_labels = [f"honest {i}" for i in range(len(bodies))]
    variants = {
        "honest only, mean": aggregate(bodies, labels=honest_labels, rule=AggregationConfig(rule="mean")),
        "honest only, default rule": aggregate(bodies, labels=honest_labels, rule=rule),
    }
    for attack in testing.ATTACKS:
        rogue, weight = testing.contribution(attack, theta0, seed=1)
        states, weights, labels = bodies + [rogue], [1.0] * len(bodies) + [weight], honest_labels + [ROGUE]
        variants[f"rogue {attack}, default rule"] = aggregate(states, weights, labels, rule)
        if attack == "target":
            variants[f"rogue {attack}, plain mean"] = average(states, weights, labels)
    return variants


def distance(a: dict, b: dict) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].is_floating_point())


def run(quick: bool = False) -> dict:
    torch.set_num_threads(2)  # one process on the 2 cores
    overrides = {"datasets": HONEST, **({"eval.modes": ["frozen"]} if quick else {})}
    config = load_config("demo", overrides)
    device = resolve_device("cpu")
    tokenizer = load_tokenizer(config.model)
    body = load_body(config.model, config.num_hidden_layers)
    theta0 = body_state(body)
    started = time.perf_counter()
    bodies = []
    for name in HONEST:
        contributor = Contributor(load_dataset_spec(name), tokenizer, config.finetune, config.seed)
        bodies.append(contributor.contribute(body, theta0, 0, device, show_progress=False).body)
        log(f"robust_accuracy: {name} finetuned ({time.perf_counter() - started:.0f} s)")
    variants = {"pretrained (θ0)": theta0, **fused_bases(theta0, bodies, config.aggregation)}
    reference = variants["honest only, mean"]
    evaluator = Evaluator(config.eval, tokenizer, body, config.seed, device, set(HONEST))
    rows, evaluated = [], {}  # body hash -> scores: a base equal to one already evaluated (NaN left out) is not evaluated twice
    for label, base in variants.items():
        key = state_dict_hash(base)
        if key not in evaluated:
            results = evaluator.evaluate(base, label, 1)
            evaluated[key] = {f"{r.dataset} {r.mode}": r.accuracy for r in results}
            targets = {r.dataset: ("seen" if r.seen else "unseen") for r in results}
        scores = evaluated[key]
        row = {"variant": label, "scores": scores, "mean": statistics.fmean(scores.values()), "distance": distance(base, reference)}
        rows.append(row)
        log(f"robust_accuracy: {label}: mean accuracy {row['mean']:.4f}, max |base - honest mean| {row['distance']:.3g}")
    honest = next(r["mean"] for r in rows if r["variant"] == "honest only, mean")
    worst = max(honest - r["mean"] for r in rows if r["variant"].startswith("rogue") and r["variant"].endswith("default rule"))
    return {
        "contributors": HONEST,
        "targets": targets,
        "modes": list(config.eval.modes),
        "few_shot": config.eval.few_shot,
        "rows": rows,
        "worst_drop_points": round(100 * worst, 2),
        "met": worst <= 0.01,
    }
