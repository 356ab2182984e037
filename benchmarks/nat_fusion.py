"""A fusion round with one member behind a NAT vs all public: same body, same group size (2).

Runs in the network namespaces of benchmarks/netns.py (needs root, `ip`, `iptables`). A bootstrap
node and peer A sit in the public namespace; peer B sits either in the public namespace too (`public`)
or in the home namespace behind the router's MASQUERADE, where the reachability check makes it a
client (`nat`: it dials out only, so A reduces the whole vector). Each round both peers call
`BodyAverager.fuse` at the same wall-clock instant; a round's time is the slower peer's. One untimed
warm-up round opens the connections.

usage: sudo python -m benchmarks.nat_fusion [--params N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import log, median
from benchmarks.netns import PUBLIC_IP, NatTopology, missing_requirement

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP_PORT = 31400
PERIOD_S = 8.0  # one round every PERIOD_S seconds, at the same instant on both peers
SWARM = dict(matchmaking_time=3.0, request_timeout=1.0, allreduce_timeout=60.0, next_chunk_timeout=20.0, target_group_size=2, min_group_size=2)


def worker(role: str, host: str, initial: str, out: str, params: int, rounds: int, start_at: float) -> None:
    import torch

    from p2pcold.config import SwarmConfig
    from p2pcold.swarm import BodyAverager, stop_dht, visible_maddrs
    from p2pcold.swarm.dht import start_dht
    from p2pcold.swarm.reachability import join_swarm, serve_dial_back

    config = SwarmConfig(host=host, port=BOOTSTRAP_PORT if role == "bootstrap" else 0, **SWARM)
    if role == "bootstrap":
        dht = start_dht(config, [])
        serve_dial_back(dht, config)
        Path(out).write_text(visible_maddrs(dht)[0])
        time.sleep(max(0.0, start_at + (rounds + 2) * PERIOD_S + 30 - time.time()))
        stop_dht(dht)
        return
    dht, mode = join_swarm(config, [initial])
    torch.manual_seed(0 if role == "a" else 1)
    template = {"w": torch.zeros(params)}
    averager = BodyAverager(dht, "nat-bench", template, config)
    times = []
    try:
        for round_index in range(rounds + 1):
            time.sleep(max(0.0, start_at + round_index * PERIOD_S - time.time()))
            body = {"w": torch.randn(params)}
            result = averager.fuse(body, round_index, 1.0, PERIOD_S - 1.0)
            if not result.ok:
                raise RuntimeError(f"round {round_index}: {result.status} {result.reason}")
            if round_index:  # the first round is the warm-up
                times.append(result.elapsed_s)
    finally:
        averager.shutdown()
    Path(out).write_text(json.dumps({"mode": mode.value, "times": times}))


def run_variant(topology: NatTopology, variant: str, params: int, rounds: int, folder: Path) -> list[float]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    procs = []

    def start(ns: str, role: str, host: str, initial: str, start_at: float) -> Path:
        out = folder / f"{variant}-{role}.out"
        command = [*topology.exec_in(ns), sys.executable, "-m", "benchmarks.nat_fusion", "worker", role, host, initial, str(out), str(params), str(rounds), str(start_at)]
        with open(folder / f"{variant}-{role}.log", "w") as log_file:
            procs.append(subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
        return out

    try:
        start_at = time.time() + 60.0  # both peers up (imports, DHT, reachability check) before round 0
        maddr_file = start(topology.public, "bootstrap", PUBLIC_IP, "-", start_at)
        deadline = time.monotonic() + 60
        while not (maddr_file.is_file() and maddr_file.read_text()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no bootstrap address: {(folder / f'{variant}-bootstrap.log').read_text()[-2000:]}")
            time.sleep(0.2)
        maddr = maddr_file.read_text()
        outs = [start(topology.public, "a", PUBLIC_IP, maddr, start_at)]
        if variant == "nat":
            outs.append(start(topology.home, "b", "0.0.0.0", maddr, start_at))
        else:
            outs.append(start(topology.public, "b", PUBLIC_IP, maddr, start_at))
        for proc in procs[1:]:
            proc.wait(timeout=start_at - time.time() + (rounds + 2) * PERIOD_S + 60)
        results = [json.loads(out.read_text()) for out in outs]
        log(f"{variant}: peer modes {[r['mode'] for r in results]}")
        return [max(pair) for pair in zip(*(r["times"] for r in results))]
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        role, host, initial, out, params, rounds, start_at = sys.argv[2:]
        worker(role, host, initial, out, int(params), int(rounds), float(start_at))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=22_700_000, help="body size in float32 values (default: MiniLM's)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    missing = missing_requirement()
    if missing:
        sys.exit(f"nat_fusion: {missing}")
    topology = NatTopology()
    try:
        topology.create()
        with tempfile.TemporaryDirectory() as folder:
            rounds = {variant: run_variant(topology, variant, args.params, args.rounds, Path(folder)) for variant in ("public", "nat")}
    finally:
        topology.delete()
    for variant, times in rounds.items():
        log(f"{variant}: rounds {', '.join(f'{t:.2f}' for t in times)} s")
    medians = {variant: median(times) for variant, times in rounds.items()}
    print(
        f"| fusion round, group of 2, {args.params / 1e6:.1f}M fp32 | all public {medians['public']:.2f} s | "
        f"one behind NAT (client) {medians['nat']:.2f} s | ratio {medians['nat'] / medians['public']:.2f} |"
    )


if __name__ == "__main__":
    main()
