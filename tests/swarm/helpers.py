"""Shared helpers for the swarm tests (bodies, concurrent fusion)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from p2pcold.config import SwarmConfig
from p2pcold.swarm import BodyAverager, start_dht, stop_dht, visible_maddrs


SHAPES = {"encoder.layer.0.weight": (8, 4), "encoder.layer.0.bias": (4,), "embeddings.weight": (10, 3)}


def unconfirmed() -> Future:
    """What DHT.store returns when no node accepted the record (stands in for `dht.store`)."""
    future = Future()
    future.set_result(False)
    return future


def make_body(seed: int, shapes=SHAPES, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in shapes.items()}


def weighted_mean(bodies, weights) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {name: sum(w * b[name].double() for w, b in zip(weights, bodies)).div(total).float() for name in bodies[0]}


def fuse_all(averagers, bodies, iterations, weights, deadline, metadata=None, wait_s=120.0, **options):
    """Run fuse() on every averager at once (one thread each, `options` passed on); return results in order."""
    metadata = metadata or [{} for _ in averagers]
    with ThreadPoolExecutor(len(averagers)) as pool:
        futures = [
            pool.submit(averager.fuse, body, iteration, weight, deadline, meta, **options)
            for averager, body, iteration, weight, meta in zip(averagers, bodies, iterations, weights, metadata)
        ]
        return [future.result(timeout=wait_s) for future in futures]


# Short timeouts so that the whole folder runs in about a minute on a loaded 2-core machine.
FAST = dict(
    matchmaking_time=2.0,
    request_timeout=1.0,
    next_chunk_timeout=2.0,
    allreduce_timeout=15.0,
    boundary_deadline=20.0,
    join_timeout=10.0,
    identity_settle_time=0.5,
    state_download_timeout=10.0,
    dht_request_timeout=5.0,
    local_rpc_timeout=10.0,
    shutdown_timeout=3.0,
)


def fast_config(**overrides) -> SwarmConfig:
    return SwarmConfig(**{**FAST, **overrides})


class Swarm:
    """DHT nodes bootstrapped from the first one, and averagers on them; all stopped at teardown."""

    def __init__(self) -> None:
        self.dhts: list = []
        self.averagers: list[BodyAverager] = []

    def start(self, n: int, config: SwarmConfig) -> list:
        new = []
        for _ in range(n):
            initial = visible_maddrs(self.dhts[0]) if self.dhts else []
            dht = start_dht(config, initial)
            self.dhts.append(dht)
            new.append(dht)
        return new

    def averager(self, dht, run_id: str, template, config: SwarmConfig, **kwargs) -> BodyAverager:
        averager = BodyAverager(dht, run_id, template, config, **kwargs)
        self.averagers.append(averager)
        return averager

    def close(self) -> None:
        # in parallel: each stop waits on its own processes, and a 16-peer swarm stopped one by one took 23 s
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda averager: averager.shutdown(stop_dht=False), self.averagers))
            list(pool.map(lambda dht: stop_dht(dht, grace_s=3.0), self.dhts))
