"""What a private swarm's defences cost a fusion round: `python -m benchmarks.auth [--peers 3] [--rounds 6]`.

Two swarms of tiny peers on loopback run in the same process tree at the same time: an open one and
a private one (a run secret: DHT token authorizer, member tags published, averaging RPCs gated on
the caller's peer id). Their rounds alternate (which swarm goes first rotates), so both see the same
machine load. A round is `BodyAverager.fuse` on every peer at once (one thread each, the group
assembles at `target_group_size` = all peers); its time is the slowest peer's. The first round is
reported apart: it includes each averager's first member-tag lookups, which later rounds answer
from the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.config import SwarmConfig
from p2pcold.swarm import BodyAverager, start_dht, stop_dht, visible_maddrs
from p2pcold.swarm.auth import RunSecret, new_secret_text

SHAPES = {f"layer{i}.weight": (256, 256) for i in range(4)}  # 262k values, 1 MiB per body
DHT_READS = 40
TIMEOUTS = dict(matchmaking_time=3.0, request_timeout=2.0, next_chunk_timeout=10.0, allreduce_timeout=60.0, boundary_deadline=60.0)


class TinySwarm:
    def __init__(self, name: str, peers: int, secret: RunSecret | None, poll_interval: float):
        self.name, self.dhts, self.averagers = name, [], []
        config = SwarmConfig(**TIMEOUTS, target_group_size=peers, min_group_size=peers, poll_interval=poll_interval)
        started = time.perf_counter()
        try:
            for _ in range(peers):
                initial = visible_maddrs(self.dhts[0]) if self.dhts else []
                self.dhts.append(start_dht(config, initial, secret=secret))
                template = {n: torch.zeros(s) for n, s in SHAPES.items()}
                self.averagers.append(BodyAverager(self.dhts[-1], f"bench-{name}", template, config, secret=secret))
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - started

    def round(self, iteration: int) -> float:
        """One fusion round of every peer; the slowest peer's time (raises if a peer did not fuse)."""
        bodies = [{n: torch.randn(s) for n, s in SHAPES.items()} for _ in self.averagers]
        with ThreadPoolExecutor(len(self.averagers)) as pool:
            futures = [pool.submit(a.fuse, b, iteration, 1.0, TIMEOUTS["boundary_deadline"]) for a, b in zip(self.averagers, bodies)]
            results = [f.result(timeout=300) for f in futures]
        failed = [r.reason for r in results if not r.ok or r.group_size != len(self.averagers)]
        if failed:
            raise RuntimeError(f"{self.name} round {iteration} failed: {failed[0]}")
        return max(r.elapsed_s for r in results)

    def dht_get_s(self, reads: int) -> float:
        """Median time of one DHT read of a record stored by the first peer, from the last peer (with a
        secret each request and response is signed with the node's RSA key and checked)."""
        key = f"bench-{self.name}-record"
        self.dhts[0].store(key, "x" * 64, get_dht_time() + 600)
        times = []
        for _ in range(reads):
            started = time.perf_counter()
            self.dhts[-1].get(key, latest=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def close(self) -> None:
        for averager in self.averagers:
            averager.shutdown(stop_dht=False)
        for dht in self.dhts:
            stop_dht(dht, grace_s=3.0)


def measure(peers: int, rounds: int, poll_interval: float) -> dict:
    swarms = []
    try:
        secret = RunSecret(new_secret_text().encode())
        swarms = [TinySwarm("open", peers, None, poll_interval), TinySwarm("private", peers, secret, poll_interval)]
        times: dict[str, list[float]] = {s.name: [] for s in swarms}
        for r in range(rounds):
            for swarm in swarms[r % 2 :] + swarms[: r % 2]:
                times[swarm.name].append(swarm.round(r))
        startup = {s.name: s.startup_s for s in swarms}
        dht_get = {s.name: s.dht_get_s(DHT_READS) for s in swarms}
    finally:
        for swarm in swarms:
            swarm.close()
    first = {name: t[0] for name, t in times.items()}
    later = {name: statistics.median(t[1:]) for name, t in times.items()}
    pairs = [p / o for p, o in zip(times["private"][1:], times["open"][1:])]
    return {
        "peers": peers,
        "rounds": rounds,
        "poll_interval": poll_interval,
        "values_per_body": sum(a * b for a, b in SHAPES.values()),
        "startup_s": startup,
        "dht_get_median_s": dht_get,
        "first_round_s": first,
        "later_round_median_s": later,
        "later_round_ratio_private_vs_open": statistics.median(pairs),
        "first_round_ratio_private_vs_open": first["private"] / first["open"],
        "all_rounds_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[3])
    parser.add_argument("--rounds", type=int, default=12)
    # a member reads the group's verdicts this often: each DHT request costs a little more in a private
    # swarm (two RSA signatures), enough for a verdict to miss a read and wait for the next one
    parser.add_argument("--poll-interval", type=float, default=SwarmConfig().poll_interval)
    args = parser.parse_args()
    for peers in args.peers:
        print(json.dumps(measure(peers, args.rounds, args.poll_interval), indent=1), flush=True)


if __name__ == "__main__":
    main()
