"""The cost of owned, signed and validated DHT records (issue 8), as a ratio in one run.

Two small swarms of DHT nodes on loopback, in this process, started the same way:
* `signed`: p2pcold's nodes (`start_dht` with `run_record_validators`): progress records under the
  writer's owner mark, signed by hivemind's RSASignatureValidator, checked by every storing and
  reading node (`publish_progress` / `read_progress`, as a peer's tracker calls them);
* `plain`: bare `hivemind.DHT` nodes without validators, the same record under a plain subkey
  (p2pcold's records before issue 8).
Each round stores one record per writer and reads the key back from another node; the variants are
interleaved and the medians compared.

    python -m benchmarks.signed_records [--nodes 3] [--rounds 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import hivemind

from benchmarks.common import log, median
from p2pcold.config import SwarmConfig
from p2pcold.swarm import PeerProgress, Phase, publish_progress, read_progress, run_record_validators, start_dht, stop_dht, visible_maddrs
from p2pcold.swarm.progress import progress_key
from p2pcold.swarm.records import get_records, put_record

RUN, ITERATIONS, TTL, TIMEOUT = "bench-signed", 100, 60.0, 30.0


def signed_swarm(n: int, config: SwarmConfig) -> list[hivemind.DHT]:
    validators = run_record_validators(RUN, ITERATIONS)
    nodes = [start_dht(config, [], record_validators=validators)]
    nodes += [start_dht(config, visible_maddrs(nodes[0]), record_validators=validators) for _ in range(n - 1)]
    return nodes


def plain_swarm(n: int) -> list[hivemind.DHT]:
    nodes = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    maddrs = [str(m) for m in nodes[0].get_visible_maddrs()]
    nodes += [hivemind.DHT(start=True, initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(n - 1)]
    return nodes


def record(dht, iteration: int) -> PeerProgress:
    return PeerProgress(str(dht.peer_id), f"d-{str(dht.peer_id)[-6:]}", iteration, Phase.FINETUNING, train_loss=0.5, body_hash="ab" * 32)


def signed_round(nodes, iteration: int) -> tuple[float, float]:
    started = time.perf_counter()
    for dht in nodes[1:]:
        assert publish_progress(dht, RUN, record(dht, iteration), TTL, TIMEOUT)
    stored = time.perf_counter()
    assert len(read_progress(nodes[0], RUN, TIMEOUT, ITERATIONS)) == len(nodes) - 1
    return stored - started, time.perf_counter() - stored


def plain_round(nodes, iteration: int) -> tuple[float, float]:
    started = time.perf_counter()
    for dht in nodes[1:]:
        value = {**dataclasses.asdict(record(dht, iteration)), "phase": "finetuning", "last_seen": time.time()}
        assert put_record(dht, progress_key(RUN), str(dht.peer_id), value, TTL, TIMEOUT)
    stored = time.perf_counter()
    assert len(get_records(nodes[0], progress_key(RUN), TIMEOUT)) == len(nodes) - 1
    return stored - started, time.perf_counter() - stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    config = SwarmConfig()
    swarms = {"signed": signed_swarm(args.nodes, config), "plain": plain_swarm(args.nodes)}
    rounds = {"signed": signed_round, "plain": plain_round}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in swarms}
    try:
        for i in range(args.rounds + 1):  # round 0 warms the connections up
            for name in (("signed", "plain") if i % 2 else ("plain", "signed")):
                took = rounds[name](swarms[name], i)
                if i:
                    times[name].append(took)
        result = {}
        for name, pairs in times.items():
            result[name] = {"store_s": median(p[0] for p in pairs) / (args.nodes - 1), "get_s": median(p[1] for p in pairs)}
        for what in ("store_s", "get_s"):
            result[f"ratio_{what}"] = result["signed"][what] / result["plain"][what]
        log(
            f"{args.nodes} nodes, {args.rounds} rounds: store {result['signed']['store_s'] * 1e3:.1f} ms signed vs "
            f"{result['plain']['store_s'] * 1e3:.1f} ms plain (x{result['ratio_store_s']:.2f}); get "
            f"{result['signed']['get_s'] * 1e3:.1f} ms vs {result['plain']['get_s'] * 1e3:.1f} ms (x{result['ratio_get_s']:.2f})"
        )
        print(result)
    finally:
        for dht in swarms["signed"]:
            stop_dht(dht, grace_s=3.0)
        for dht in swarms["plain"]:
            dht.shutdown()


if __name__ == "__main__":
    main()
