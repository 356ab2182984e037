"""Issue 23, the run config from the swarm: a rogue member (rogue_config.py) attacks the config record
that the run's owner (`p2pcold bootstrap --config`) published.

One swarm serves every case:
  * a tampered, an oversized and an unsigned record beside the owner's, and an attempt to overwrite
    the owner's: a reader that trusts the owner gets the owner's config, unchanged;
  * a peer that takes the rogue for the run owner (its address as --initial-peers) is refused with one
    line: the rogue's record does not match the contract hash it carries.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # the CLI swarm helpers

from p2pcold.config import load_run_config, published_config  # noqa: E402
from p2pcold.swarm.auth import read_secret_file  # noqa: E402
from p2pcold.swarm.run_config import fetch_run_config  # noqa: E402
from swarm_cli import SwarmProcesses, write_run_config  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

ROGUE = str(Path(__file__).parent / "rogue_config.py")


def test_a_rogue_members_config_records_are_refused(tmp_path):
    secret_file = tmp_path / "run.secret"
    secret_file.write_text(uuid.uuid4().hex + "\n")
    secret_file.chmod(0o600)
    config_path = write_run_config(tmp_path, "minilm", ["rotten_tomatoes"])
    config = load_run_config(config_path)
    processes = SwarmProcesses(tmp_path)
    try:
        owner = processes.bootstrap(config_path, "--secret-file", str(secret_file))
        processes.wait_for_log("bootstrap", "peers join with", timeout=60)
        ready = tmp_path / "rogue.ready"
        env = ("env", f"P2PCOLD_SECRET_FILE={secret_file}")
        rogue = processes.start("rogue", "itest", owner, str(ready), program=(ROGUE,), launcher=env)
        deadline = time.monotonic() + 120
        while not ready.is_file() and rogue.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.is_file(), processes.log("rogue")[-3000:]
        rogue_maddr, overwritten = ready.read_text().split()
        assert overwritten == "False"  # the owner's subkey takes only what the owner signed

        secret = read_secret_file(secret_file)
        fetched = fetch_run_config([owner], "itest", secret, config.swarm)
        assert fetched == published_config(config)

        trusting_the_rogue = ("--initial-peers", rogue_maddr, "--run-id", "itest", "--secret-file", str(secret_file))
        victim = processes.start(
            "victim", "peer", "--dataset", "rotten_tomatoes", *trusting_the_rogue, "--host", "127.0.0.1"
        )
        assert processes.wait(victim, "victim", timeout=120) == 2
        log = processes.log("victim")
        assert log.count("p2pcold: error:") == 1 and "refusing a tampered config" in log and "Traceback" not in log
    finally:
        processes.reap()
