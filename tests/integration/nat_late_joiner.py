"""A late joiner behind NAT (run inside the test's home namespace): join the swarm through the
reachability check, say so in the run's progress (a finished peer keeps serving its final base while a
live peer is behind it), download the swarm's state until it reaches the run's last iteration, save it.

usage: nat_late_joiner.py RUN_CONFIG INITIAL_PEER OUT_FILE
"""

from __future__ import annotations

import sys
import time

import torch

from p2pcold.config import load_run_config
from p2pcold.model import body_state, load_body
from p2pcold.swarm import BodyAverager, PeerProgress, Phase, SwarmTracker, peer_id, stop_dht
from p2pcold.swarm.reachability import join_swarm


def main(config_path: str, initial_peer: str, out: str) -> None:
    config = load_run_config(config_path, {"swarm.host": "0.0.0.0"}, needs_datasets=False)
    swarm = config.swarm
    theta0 = body_state(load_body(config.model, config.num_hidden_layers))
    dht, mode = join_swarm(swarm, [initial_peer])
    tracker = averager = None
    try:
        tracker = SwarmTracker(dht, config.run_id, swarm)
        tracker.start_publishing(PeerProgress(peer_id(dht), "late-joiner", 0, Phase.DOWNLOADING, mode=mode))
        averager = BodyAverager(dht, config.run_id, theta0, swarm, reference=theta0)
        print(f"late joiner: mode {mode.value}", flush=True)
        deadline = time.monotonic() + 4 * swarm.boundary_deadline
        iteration = -1
        while iteration < config.iterations and time.monotonic() < deadline:
            downloaded = averager.download_state()
            if downloaded is not None and downloaded[0] > iteration:
                iteration, body = downloaded
                print(f"late joiner: downloaded the base of iteration {iteration}", flush=True)
            time.sleep(1.0)  # until a donor serves the last iteration
        if iteration >= 0:
            torch.save({"iteration": iteration, "body": body}, out)
        tracker.update(phase=Phase.DONE, iteration=max(iteration, 0))
    finally:
        if tracker is not None:
            tracker.close(swarm.shutdown_timeout)
        if averager is not None:
            averager.shutdown(stop_dht=False)
        stop_dht(dht, grace_s=swarm.shutdown_timeout)


if __name__ == "__main__":
    main(*sys.argv[1:])
