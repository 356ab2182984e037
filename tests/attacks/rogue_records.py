"""A rogue participant of a run, built from p2pcold.swarm's own code; it never calls `join_run`.

Usage: python rogue_records.py CONFIG MADDR READY_FILE

It knows what any stranger knows (the bootstrap address, the run id, the public base model) and runs
three DHT nodes of its own, each with its own key, for the attacks of issue 8 on records and state:

  garbage  serves a body of random values at iteration 8 and publishes a record at 8 with its hash;
           forges the run identity (created_at = 0, another θ0); overwrites the honest peers' progress
           records and adds fake peers (plain subkeys)
  nan      serves a NaN body at iteration 8 and publishes a record at 8 with its hash
  huge     serves a state at iteration 2**32 and publishes a record at 2**32; then plays the ghost: a
           record at the honest peers' iteration that says "finetuning", forever

It writes READY_FILE (its nodes' peer ids, one a line) once the identity is forged and every state is
served, then repeats its records every second until SIGTERM.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

import torch

from p2pcold.config import load_run_config
from p2pcold.run_state import RunState
from p2pcold.swarm import BodyAverager, PeerProgress, Phase, peer_id, publish_progress, start_dht, stop_dht
from p2pcold.swarm.identity import RunIdentity, body_schema_hash, identity_key
from p2pcold.swarm.progress import progress_key
from p2pcold.swarm.records import get_records, owner_peer_id, put_record, record_owner
from p2pcold.utils import state_dict_hash

HUGE = 2**32


def serve(averager: BodyAverager, iteration: int, body: dict[str, torch.Tensor]) -> None:
    """Serve `body` as the state of `iteration`, past set_shared_state's range check (a rogue may)."""
    averager._served.set(iteration, body)
    averager._averager.state_sharing_priority = float(iteration)
    averager._averager.allow_state_sharing = True


def record(dht, dataset: str, iteration: int, phase: str, body_hash: str | None = None) -> dict:
    progress = PeerProgress(peer_id(dht), dataset, iteration, phase, body_hash=body_hash)
    return {**dataclasses.asdict(progress), "last_seen": time.time()}


def main(config_path: str, maddr: str, ready_file: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = load_run_config(config_path)
    swarm, run_id = config.swarm, config.run_id
    theta0 = RunState(config, Path(ready_file).parent / "rogue-run").theta0  # the public base model
    garbage = {name: torch.randn_like(t) * 10 for name, t in theta0.items()}
    nan = {name: torch.full_like(t, float("nan")) for name, t in theta0.items()}
    nodes = {name: start_dht(swarm, [maddr]) for name in ("garbage", "nan", "huge")}
    averagers = {name: BodyAverager(dht, run_id, theta0, swarm) for name, dht in nodes.items()}
    try:
        g, n, h = nodes["garbage"], nodes["nan"], nodes["huge"]
        forged = RunIdentity(run_id, config.model, "0" * 64, body_schema_hash(theta0), founder=peer_id(g), created_at=0.0)
        put_record(g, identity_key(run_id), record_owner(g), forged.to_record(), ttl=3600, timeout=10)
        serve(averagers["garbage"], 8, garbage)
        serve(averagers["nan"], 8, nan)
        serve(averagers["huge"], HUGE, garbage)
        put_record(h, progress_key(run_id), record_owner(h), record(h, "huge", HUGE, "done"), ttl=3600, timeout=10)
        Path(ready_file).write_text("\n".join(peer_id(dht) for dht in nodes.values()) + "\n")
        rogues = {peer_id(dht) for dht in nodes.values()}
        while True:
            publish_progress(g, run_id, PeerProgress(peer_id(g), "rogue-garbage", 8, Phase.FINETUNING, body_hash=state_dict_hash(garbage)), 60, 5)
            publish_progress(n, run_id, PeerProgress(peer_id(n), "rogue-nan", 8, Phase.FINETUNING, body_hash=state_dict_hash(nan)), 60, 5)
            honest = {sub: value for sub, value in get_records(g, progress_key(run_id), 5).items() if owner_peer_id(sub) not in rogues}
            for subkey, value in honest.items():  # overwrite every honest record with one of ours
                put_record(g, progress_key(run_id), subkey, {**value, "dataset": "forged", "iteration": 8}, ttl=60, timeout=5)
            for i in range(3):  # and add fake peers
                put_record(g, progress_key(run_id), f"QmFakePeer{i}", record(g, f"fake{i}", 1, "averaging"), ttl=60, timeout=5)
            # the ghost: always "finetuning", at the newest iteration an honest peer reports
            newest = max((v.get("iteration", 0) for v in honest.values() if isinstance(v, dict)), default=0)
            # (a longer ttl than the record at 2**32 it replaces: the DHT keeps the later-expiring value)
            publish_progress(h, run_id, PeerProgress(peer_id(h), "ghost", min(newest, config.iterations), Phase.FINETUNING), 7200, 5)
            time.sleep(1.0)
    finally:
        for averager in averagers.values():
            averager.shutdown(stop_dht=False)
        for dht in nodes.values():
            stop_dht(dht, grace_s=2.0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
