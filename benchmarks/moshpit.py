"""Fusion time of one boundary: one group of all n peers against Moshpit rounds in groups of 4.

    python -m benchmarks.moshpit [--peers 4 8 16] [--values 2000000] [--repeats 2]

Not part of `benchmarks.run` (it starts up to 16 peers; run it on its own, briefly). Every peer is a
DHT node (with its p2pd daemon) and a BodyAverager process on 127.0.0.1, all on this machine's
cores. For each swarm size the same peers fuse `repeats` boundaries each way, interleaved (one
group, then rounds, then one group...). A boundary's time is its slowest peer's `fuse` time. Also
checked: every peer ends with the exact mean (max deviation reported). Prints a markdown table and
writes benchmarks/moshpit.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/moshpit.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import ROOT, log  # noqa: E402
from p2pcold.config import AggregationConfig, SwarmConfig  # noqa: E402
from p2pcold.swarm import BodyAverager, start_dht, stop_dht, visible_maddrs  # noqa: E402
from p2pcold.swarm.moshpit import plan_rounds  # noqa: E402

GROUP = 4
DEADLINE = 60.0
CONFIG = dict(matchmaking_time=2.0, request_timeout=1.0, next_chunk_timeout=5.0, allreduce_timeout=60.0, dht_request_timeout=5.0, local_rpc_timeout=20.0, shutdown_timeout=3.0)


def boundary(averagers, names, bodies, iteration: int, plans) -> tuple[float, float]:
    """(the slowest peer's fuse time, the largest deviation from the exact mean)."""
    with ThreadPoolExecutor(len(averagers)) as pool:
        futures = [
            pool.submit(a.fuse, body, iteration, 1.0, DEADLINE, {"dataset": name}, share_result=False, plan=plan)
            for a, name, body, plan in zip(averagers, names, bodies, plans)
        ]
        results = [f.result(timeout=3 * DEADLINE) for f in futures]
    exact = torch.stack([b["w"] for b in bodies]).double().mean(0)
    failed = [r.reason for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"a boundary failed: {failed[0]}")
    return max(r.elapsed_s for r in results), max(float((r.averaged["w"].double() - exact).abs().max()) for r in results)


def measure(peers: int, values: int, repeats: int) -> dict:
    config = SwarmConfig(**CONFIG, target_group_size=peers, min_group_size=2)
    names = [f"ds{k:02d}" for k in range(peers)]
    dhts, averagers = [start_dht(config, [])], []
    try:
        with ThreadPoolExecutor(8) as pool:
            dhts += list(pool.map(lambda _: start_dht(config, visible_maddrs(dhts[0])), range(peers - 1)))
            template = {"w": torch.zeros(values)}
            mean = AggregationConfig(rule="mean")
            averagers += list(pool.map(lambda dht: BodyAverager(dht, "moshpit-bench", template, config, aggregation=mean), dhts))
        generator = torch.Generator().manual_seed(peers)
        bodies = [{"w": torch.randn(values, generator=generator)} for _ in names]
        modes = {"one group": [None] * peers, f"groups of {GROUP}": [plan_rounds(names, name, GROUP) for name in names]}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        errors: dict[str, float] = {mode: 0.0 for mode in modes}
        iteration = 0
        for _ in range(repeats + 1):  # the first boundary of each mode warms up (connections), not counted
            for mode, plans in modes.items():
                took, error = boundary(averagers, names, bodies, iteration, plans)
                iteration += 1
                if iteration > len(modes):
                    times[mode].append(took)
                errors[mode] = max(errors[mode], error)
                log(f"{peers} peers, {mode}: {took:.2f} s (max deviation {error:.1e})")
        rounds = len(plan_rounds(names, names[0], GROUP).rounds)
        return {"peers": peers, "values": values, "rounds": rounds, "times_s": times, "median_s": {m: statistics.median(t) for m, t in times.items()}, "max_error": errors}
    finally:
        for averager in averagers:
            averager.shutdown(stop_dht=False)
        for dht in dhts:
            stop_dht(dht, grace_s=3.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--values", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    rows = [measure(n, args.values, args.repeats) for n in args.peers]
    (ROOT / "benchmarks" / "moshpit.json").write_text(json.dumps({"rows": rows, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    print(f"| peers | rounds in groups of {GROUP} | one group (s) | groups of {GROUP} (s) | rounds / one group | max deviation from the mean |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        one, rounds = r["median_s"]["one group"], r["median_s"][f"groups of {GROUP}"]
        print(f"| {r['peers']} | {r['rounds']} | {one:.2f} | {rounds:.2f} | {rounds / one:.2f} | {max(r['max_error'].values()):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
