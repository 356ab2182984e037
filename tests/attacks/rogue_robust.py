"""A group member in its own process, honest or rogue, for the robust-fusion attack test (test_robust.py).

Usage: python rogue_robust.py '<json options>'. Options: initial_peers (list; empty: this member
starts the swarm and writes its multiaddrs to `maddrs_file`), run_id, config (SwarmConfig fields),
aggregation (AggregationConfig fields), seed, plays (one per iteration, from iteration 0: `honest`, or
an attack of p2pcold.testing.ATTACKS), deadline (s per fusion), out (a torch.save file: {iteration: fused body or None}),
go_file (fusing starts once it exists, so that slow start-ups do not eat the first deadline).

The rogue is built from p2pcold.swarm's own code (a BodyAverager at the run's prefix) and never calls
join_run: it only needs the bootstrap address, the run id and the public template. Every member prints
"@@ {peer_id}" once started, then one line per iteration: "@@ {iteration, status, group_size, seconds}".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from p2pcold import testing
from p2pcold.config import AggregationConfig, SwarmConfig
from p2pcold.swarm import BodyAverager, start_dht, visible_maddrs
from p2pcold.utils import setup_logging

SHAPES = {"encoder.weight": (64, 32), "encoder.bias": (32,), "embeddings.weight": (50, 16)}
GO_TIMEOUT_S = 180.0  # how long a started member waits for the test's go (every member started)


def member_body(seed: int, iteration: int) -> dict[str, torch.Tensor]:
    return testing.member_body(SHAPES, seed, iteration)


def play(attack: str, seed: int, iteration: int) -> tuple[dict[str, torch.Tensor], float]:
    """(body, declared weight) that a member sends at `iteration`."""
    return testing.contribution(attack, member_body(seed, iteration), seed)


def main() -> None:
    options = json.loads(sys.argv[1])
    setup_logging()
    config = SwarmConfig(**options.get("config", {}))
    dht = start_dht(config, options.get("initial_peers", []))
    if options.get("maddrs_file"):
        Path(options["maddrs_file"]).write_text("\n".join(visible_maddrs(dht)))
    template = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    aggregation = AggregationConfig(**options.get("aggregation", {}))
    averager = BodyAverager(dht, options["run_id"], template, config, aggregation=aggregation)
    print("@@ " + json.dumps({"peer_id": averager.peer_id}), flush=True)
    go, give_up = Path(options["go_file"]), time.monotonic() + GO_TIMEOUT_S
    while not go.exists() and time.monotonic() < give_up:  # members start up at different speeds
        time.sleep(0.1)
    fused = {}
    try:
        for iteration, attack in enumerate(options["plays"]):
            body, weight = play(attack, options["seed"], iteration)
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
