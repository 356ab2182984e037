"""A rogue member (it holds the run secret) that attacks the run config the owner published.

Usage: P2PCOLD_SECRET_FILE=... python rogue_config.py RUN_ID MADDR READY_FILE

With two DHT nodes of its own it stores, under the run's config key:
  tampered   under its own subkey: the owner's config with another learning rate, and the owner's
             contract hash (for a peer that takes this rogue for the run owner);
  overwrite  under the owner's subkey: the same tampered record (the owner never signed it);
  oversized  under its second node's subkey: a valid record padded past the bound;
  unsigned   under a plain subkey.
It writes READY_FILE ("<its first node's address> <whether the overwrite was stored>") and waits for
SIGTERM.
"""

from __future__ import annotations

import copy
import signal
import sys
import time
from pathlib import Path

from p2pcold.config import SwarmConfig
from p2pcold.swarm import start_dht, stop_dht, visible_maddrs
from p2pcold.swarm.auth import load_secret
from p2pcold.swarm.records import MAX_RUN_CONFIG_CHARS, get_records, put_record, record_owner, run_config_key


def main(run_id: str, maddr: str, ready_file: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    swarm, secret = SwarmConfig(), load_secret()
    nodes = [start_dht(swarm, [maddr], secret=secret) for _ in range(2)]
    try:
        key = run_config_key(run_id)
        (owner, published), = get_records(nodes[0], key, 10).items()
        tampered = copy.deepcopy(published)
        tampered["config"]["finetune"]["learning_rate"] *= 10
        put_record(nodes[0], key, record_owner(nodes[0]), tampered, ttl=600, timeout=10)
        overwritten = put_record(nodes[0], key, owner, tampered, ttl=600, timeout=10)
        padded = {**published, "config": {**published["config"], "padding": "x" * MAX_RUN_CONFIG_CHARS}}
        put_record(nodes[1], key, record_owner(nodes[1]), padded, ttl=600, timeout=10)
        put_record(nodes[1], key, "rogue", tampered, ttl=600, timeout=10)
        Path(ready_file).write_text(f"{visible_maddrs(nodes[0], 10)[0]} {overwritten}\n")
        while True:
            time.sleep(1.0)
    finally:
        for dht in nodes:
            stop_dht(dht, grace_s=2.0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
