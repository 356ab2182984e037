"""A group member in its own process, honest or rogue, for the robust-fusion attack tests and benchmark.

Usage: python rogue_robust.py '<json options>'. Options: initial_peers (list; empty: this member
starts the swarm and writes its multiaddrs to `maddrs_file`), run_id, config (SwarmConfig fields),
aggregation (AggregationConfig fields), seed, plays (one per iteration, from iteration 0: `honest`, or
an attack of PLAYS), deadline (s per fusion), out (a torch.save file: {iteration: fused body or None}).

The rogue is built from p2pcold.swarm's own code (a BodyAverager at the run's prefix) and never calls
join_run: it only needs the bootstrap address, the run id and the public template. Every member prints
"@@ {peer_id}" once started, then one line per iteration: "@@ {iteration, status, group_size, seconds}".
"""

from __future__ import annotations

import json
import sys
import time

import torch

SHAPES = {"encoder.weight": (64, 32), "encoder.bias": (32,), "embeddings.weight": (50, 16)}
SPREAD = 0.01  # honest members differ from the common body by about this much per value
ROGUE_WEIGHT = 1e6  # the weight the `target` attack declares
TARGET = 7.0  # every value of the `target` attack's body


def member_body(seed: int, iteration: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    """An honest member's body at `iteration`: the common body of that iteration plus its own finetuning."""
    common = torch.Generator().manual_seed(10_000 + iteration)
    own = torch.Generator().manual_seed(seed * 1000 + iteration)
    return {
        name: torch.randn(shape, generator=common) + SPREAD * torch.randn(shape, generator=own)
        for name, shape in shapes.items()
    }


def play(attack: str, seed: int, iteration: int, shapes=SHAPES) -> tuple[dict[str, torch.Tensor], float]:
    """(body, declared weight) that a member sends at `iteration`."""
    body = member_body(seed, iteration, shapes)
    if attack == "honest":
        return body, 1.0
    if attack == "times_1e3":
        return {name: value * 1e3 for name, value in body.items()}, 1.0
    if attack == "noise":
        noise = torch.Generator().manual_seed(seed)
        return {name: torch.randn(value.shape, generator=noise) for name, value in body.items()}, 1.0
    if attack == "target":
        return {name: torch.full_like(value, TARGET) for name, value in body.items()}, ROGUE_WEIGHT
    if attack == "nan":
        return {name: torch.full_like(value, float("nan")) for name, value in body.items()}, 1.0
    raise ValueError(f"unknown play {attack!r}")


PLAYS = ("honest", "times_1e3", "noise", "target", "nan")


def main() -> None:
    options = json.loads(sys.argv[1])
    from pathlib import Path

    from p2pcold.config import AggregationConfig, SwarmConfig
    from p2pcold.swarm import BodyAverager, start_dht, visible_maddrs
    from p2pcold.utils import setup_logging

    setup_logging()
    config = SwarmConfig(**options.get("config", {}))
    shapes = {name: tuple(shape) for name, shape in options.get("shapes", SHAPES).items()}
    dht = start_dht(config, options.get("initial_peers", []))
    if options.get("maddrs_file"):
        Path(options["maddrs_file"]).write_text("\n".join(visible_maddrs(dht)))
    template = {name: torch.zeros(shape) for name, shape in shapes.items()}
    aggregation = AggregationConfig(**options.get("aggregation", {}))
    averager = BodyAverager(dht, options["run_id"], template, config, aggregation=aggregation)
    print("@@ " + json.dumps({"peer_id": averager.peer_id}), flush=True)
    fused = {}
    try:
        for iteration, attack in enumerate(options["plays"]):
            body, weight = play(attack, options["seed"], iteration, shapes)
            started = time.monotonic()
            result = averager.fuse(body, iteration, weight, options["deadline"])
            fused[iteration] = result.averaged
            line = {"iteration": iteration, "status": result.status.value, "group_size": result.group_size,
                    "seconds": round(time.monotonic() - started, 3), "reason": result.reason}  # fmt: skip
            print("@@ " + json.dumps(line), flush=True)
    finally:
        torch.save(fused, options["out"])
        averager.shutdown()


if __name__ == "__main__":
    main()
