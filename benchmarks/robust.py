"""Robust fusion (issue 8): 8 group members, 1 of them Byzantine, robust aggregation vs the plain mean.

Per attack of `p2pcold.testing.ATTACKS` (body x 1e3, N(0, 1) noise, a chosen body declaring weight 1e6,
NaN), one all-reduce of 8 member processes on 127.0.0.1 in which member 7 plays the attack, once with
each aggregation rule (`robust`: AggregationConfig(), the trimmed mean; `mean`: the paper's mean with
capped weights; `plain`: the mean with weights as declared, as hivemind's own reducer computes it). Reported: member 0's distance from the honest-only average (members 0-6), max and
RMS over every value, next to the honest members' own spread.

Cost: fusion-round time of all-honest rounds, robust vs mean, interleaved in the same swarm (each
member holds both averagers), on a body shaped like the tiny test encoder and, unless --quick, a
body of 2M values (16 parts of 2**17 values, so every reducer holds several parts).

Run alone: python -m benchmarks.run --only robust [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from benchmarks.common import Worker, close_all, gather, log, median
from p2pcold import testing
from p2pcold.fusion import average

MODULE = "benchmarks.robust_worker"
PEERS = 8
ROGUE = PEERS - 1  # the last member plays the attacks
HONEST = list(range(PEERS - 1))
CONFIG = {  # loopback timings for 8 processes on a loaded 2-core machine; a group needs all 8
    "matchmaking_time": 3.0, "request_timeout": 1.5, "next_chunk_timeout": 5.0, "allreduce_timeout": 30.0,
    "boundary_deadline": 60.0, "dht_request_timeout": 5.0, "local_rpc_timeout": 20.0, "shutdown_timeout": 3.0,
    "target_group_size": PEERS, "min_group_size": PEERS, "poll_interval": 0.3,
}  # fmt: skip
START_DELAY_S = 2.0  # every member starts its fusion at the same wall time, this long after the command


def tiny_encoder_shapes() -> dict[str, tuple[int, ...]]:
    from p2pcold.model import body_state, load_body

    with tempfile.TemporaryDirectory() as folder:
        body = body_state(load_body(str(testing.build_tiny_encoder(folder))))
    return {name: tuple(value.shape) for name, value in body.items()}


def honest_spread(shapes: dict, iteration: int) -> float:
    """How far the honest members' own bodies are from their average (max over values)."""
    bodies = [testing.member_body(shapes, seed, iteration) for seed in HONEST]
    mean = average(bodies)
    return max((body[n] - mean[n]).abs().max().item() for body in bodies for n in mean)


class Swarm:
    """PEERS member processes, member 0 started first (the others bootstrap from it)."""

    def __init__(self, size: str, shapes: dict):
        options = {"shapes": {n: list(s) for n, s in shapes.items()}, "honest_seeds": HONEST, "config": CONFIG, "run_id": f"bench-robust-{size}"}
        self.workers = [Worker(MODULE, {**options, "rank": 0, "initial_peers": []}, f"{size}/member0")]
        try:
            first = self.workers[0].receive(timeout=240)
            self.workers += [
                Worker(MODULE, {**options, "rank": r, "initial_peers": first["maddrs"]}, f"{size}/member{r}") for r in range(1, PEERS)
            ]
            for w in self.workers[1:]:
                w.receive(timeout=240)
        except BaseException:
            close_all(self.workers)
            raise
        self.iteration = 0

    def round(self, variant: str, rogue_play: str = "honest") -> list[dict]:
        """One fusion of all members (member ROGUE plays `rogue_play`); member 0 measures its distance."""
        self.iteration += 1
        start_at = time.time() + START_DELAY_S
        messages = [
            {"cmd": "round", "variant": variant, "iteration": self.iteration, "start_at": start_at,
             "play": rogue_play if rank == ROGUE else "honest", "check": rank == 0}  # fmt: skip
            for rank in range(PEERS)
        ]
        return gather(self.workers, messages, timeout=START_DELAY_S + CONFIG["boundary_deadline"] + 90)

    def close(self) -> None:
        close_all(self.workers)


def attacks(swarm: Swarm, shapes: dict) -> list[dict]:
    rows = []
    for attack in testing.ATTACKS:
        row = {"attack": attack}
        for variant in ("robust", "mean", "plain"):
            replies = swarm.round(variant, attack)
            if variant == "robust":
                row["honest_spread"] = honest_spread(shapes, swarm.iteration)
            honest = [r for rank, r in enumerate(replies) if rank != ROGUE]
            row[variant] = {
                "ok": sum(r["status"] == "ok" for r in honest),
                "status": replies[0]["status"],
                "max_error": replies[0].get("max_error"),
                "rms_error": replies[0].get("rms_error"),
            }
        log(f"robust: {attack}: max error robust {row['robust']['max_error']}, mean {row['mean']['max_error']}, plain {row['plain']['max_error']}")
        rows.append(row)
    return rows


def timing(swarm: Swarm, repeats: int) -> dict:
    """The slowest member's fusion time per round, robust and mean interleaved (order alternating)."""
    times: dict[str, list[float]] = {"robust": [], "mean": []}
    ratios = []
    for variant in ("robust", "mean"):
        swarm.round(variant)  # warm-up: opens the connections of this variant's averagers
    for index in range(repeats):
        order = ("robust", "mean") if index % 2 == 0 else ("mean", "robust")
        this = {}
        for variant in order:
            replies = swarm.round(variant)
            if all(r["status"] == "ok" for r in replies):
                this[variant] = max(r["seconds"] for r in replies)
                times[variant].append(this[variant])
        if len(this) == 2:
            ratios.append(this["robust"] / this["mean"])
    return {
        "repeats": repeats,
        "robust_s": median(times["robust"]),
        "mean_s": median(times["mean"]),
        "ratio": statistics.median(ratios) if ratios else None,
        "failed_rounds": 2 * repeats - len(times["robust"]) - len(times["mean"]),
    }


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    tiny = tiny_encoder_shapes()
    sizes = [("tiny encoder", tiny)] + ([] if quick else [("2M values", {"dense.weight": (2000, 1000)})])
    result = {"peers": PEERS, "rogues": 1, "attacks": [], "timing": []}
    for size, shapes in sizes:
        log(f"robust: {size}: starting {PEERS} members")
        swarm = Swarm(size.split()[0], shapes)
        try:
            if size == "tiny encoder":
                result["attacks"] = attacks(swarm, shapes)
            row = timing(swarm, 3 if quick else 5)
            row.update(size=size, params=sum(torch.Size(s).numel() for s in shapes.values()))
            log(f"robust: {size}: robust {row['robust_s']:.2f} s, mean {row['mean_s']:.2f} s, ratio {row['ratio']}")
            result["timing"].append(row)
        finally:
            swarm.close()
    return result

