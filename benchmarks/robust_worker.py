"""One group member of the robust-fusion benchmark (driven by benchmarks/robust.py over stdin).

Usage: python -m benchmarks.robust_worker '<json options>'. Options: rank, shapes (name -> shape),
honest_seeds (the ranks whose bodies make the honest-only average), initial_peers, config (SwarmConfig
fields), run_id.

The member holds three averagers on three run ids: `robust` (AggregationConfig(): trimmed mean from 4
contributors), `mean` (rule `mean`: the paper's weighted mean, declared weights capped) and `plain`
(weights as declared), so the variants run in the same swarm, interleaved. Bodies are `p2pcold.testing.member_body(shapes, rank, i)`.

Commands (JSON lines; replies prefixed "@@ "):
  ready   -> {maddrs}                                    (sent unprompted after start-up)
  round   {variant, iteration, play, start_at, check}    fuse at wall time `start_at`, sending
          -> {status, group_size, seconds, [max_error, rms_error]}   `play` (honest or an attack);
                                                         check: distance to the honest-only average
"""

from __future__ import annotations

import json
import sys
import time

import torch

from benchmarks.common import reply, serve, wait_until

torch.set_num_threads(1)  # 8 members share 2 cores

from p2pcold import testing  # noqa: E402
from p2pcold.config import AggregationConfig, SwarmConfig  # noqa: E402
from p2pcold.fusion import average  # noqa: E402
from p2pcold.swarm import BodyAverager, start_dht, stop_dht, visible_maddrs  # noqa: E402

ROGUE_DEADLINE_S = 20.0  # long enough to be in the group, short enough not to hold up the next round
VARIANTS = {  # plain: weights as declared (a cap no weight reaches), as hivemind's own reducer; NaN still left out
    "robust": AggregationConfig(),
    "mean": AggregationConfig(rule="mean"),
    "plain": AggregationConfig(rule="mean", weight_cap=1e300),
}


def main() -> None:
    options = json.loads(sys.argv[1])
    rank, honest_seeds = options["rank"], options["honest_seeds"]
    shapes = {name: tuple(shape) for name, shape in options["shapes"].items()}
    config = SwarmConfig(**options["config"])
    dht = start_dht(config, options["initial_peers"])
    template = {name: torch.zeros(shape) for name, shape in shapes.items()}
    averagers = {
        name: BodyAverager(dht, f"{options['run_id']}-{name}", template, config, aggregation=rule)
        for name, rule in VARIANTS.items()
    }
    reply({"maddrs": visible_maddrs(dht)})

    def fuse_round(variant: str, iteration: int, play: str, start_at: float, check: bool) -> dict:
        body = testing.member_body(shapes, rank, iteration)
        sent, weight = testing.contribution(play, body, rank)
        wait_until(start_at)
        started = time.perf_counter()
        # the rogue gets back what it broke (its NaN + the fused delta) and would retry alone until the deadline
        deadline = config.boundary_deadline if play == "honest" else ROGUE_DEADLINE_S
        result = averagers[variant].fuse(sent, iteration, weight, deadline)
        out = {"status": result.status.value, "group_size": result.group_size, "seconds": time.perf_counter() - started}
        if check and result.ok:
            honest = average([testing.member_body(shapes, seed, iteration) for seed in honest_seeds])
            errors = torch.cat([(result.averaged[n].double() - honest[n].double()).flatten() for n in honest])
            out.update(max_error=errors.abs().max().item(), rms_error=errors.square().mean().sqrt().item())
        return out

    try:
        serve({"round": fuse_round})
    finally:
        for averager in averagers.values():
            averager.shutdown(stop_dht=False)
        stop_dht(dht, grace_s=config.shutdown_timeout)


if __name__ == "__main__":
    main()
