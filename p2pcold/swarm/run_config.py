"""The run's config in the DHT: what a volunteer's peer trains with when it is given no config file.

Whoever starts a run (`p2pcold bootstrap`, which `simulate` starts too) publishes the run's config
under `p2pcold/<run_id>/config`, in a subkey it owns: hivemind's RSASignatureValidator refuses any
store of it that the owner's key did not sign. A peer trusts only the record of the *run owner*, the
node whose address it was given (`--initial-peers` or an invite names it by peer id): anyone else's
record is ignored. The record carries the hash of the run contract it implies, which the peer checks
against the config itself, and `join_run` then checks against the run identity that every peer agreed on.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import hivemind

from p2pcold.config import RunConfig, SwarmConfig, from_dict, published_config, run_contract
from p2pcold.swarm.auth import RunSecret
from p2pcold.swarm.dht import start_dht, stop_dht
from p2pcold.swarm.identity import contract_hash
from p2pcold.swarm.records import (
    get_records,
    maddr_peer_ids,
    owner_peer_id,
    put_record,
    record_owner,
    run_config_key,
    run_config_record_problem,
    warn_bad_record,
)
from p2pcold.swarm.validation import run_record_validators
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

REPUBLISH_EVERY_S = 3600.0  # the owner stores its record again this often (it expires after identity_ttl)


def run_config_record(config: RunConfig) -> dict[str, Any]:
    return {"config": published_config(config), "contract_hash": contract_hash(run_contract(config))}


def publish_run_config(dht: hivemind.DHT, config: RunConfig) -> None:
    """Store the run's config under this node's own subkey, retried until `publish_timeout`."""
    swarm = config.swarm
    stored = put_record(
        dht,
        run_config_key(config.run_id),
        record_owner(dht),
        run_config_record(config),
        ttl=swarm.identity_ttl,
        timeout=swarm.dht_request_timeout,
        retry_until=time.monotonic() + swarm.publish_timeout,
    )
    if not stored:
        raise P2PColdError(
            f"swarm: could not publish the run config in the DHT within publish_timeout={swarm.publish_timeout:.0f} s"
        )


def read_run_config(dht: hivemind.DHT, run_id: str, owners: Sequence[str], swarm: SwarmConfig) -> dict:
    """The config that one of `owners` (peer ids) published for run `run_id`, checked: well formed,
    a valid RunConfig of that run, and equal to the contract hash it was published with."""
    if not owners:
        raise P2PColdError("no run config without a run owner: give --initial-peers addresses that end in /p2p/<peer id>")
    records = get_records(dht, run_config_key(run_id), swarm.dht_request_timeout)
    found, ignored = None, 0
    for subkey, value in records.items():
        problem = run_config_record_problem(subkey, value)
        if problem is None and owner_peer_id(subkey) in owners:
            found, owner = value, owner_peer_id(subkey)
        else:
            ignored += 1
            warn_bad_record("run config", "%s", problem or f"from {owner_peer_id(subkey)}, who is not the run owner")
    if found is None:
        others = f" ({ignored} record(s) of others ignored)" if ignored else ""
        raise P2PColdError(
            f"the swarm holds no run config of run {run_id!r} from its owner {_short(owners)}{others}; "
            "was the run started with `p2pcold bootstrap --config`? Otherwise pass --config"
        )
    return checked_run_config(found, run_id, f"the run config published by {_short([owner])}")


def checked_run_config(record: dict, run_id: str, where: str) -> dict:
    """The config in a well-formed `record`, once it is a valid RunConfig of run `run_id` whose
    contract hashes to the record's contract hash (else one line naming `where`)."""
    config = from_dict(RunConfig, record["config"], where=where)
    if config.run_id != run_id:
        raise P2PColdError(f"{where} is for run {config.run_id!r}, not {run_id!r}")
    if contract_hash(run_contract(config)) != record["contract_hash"]:
        raise P2PColdError(f"{where} does not match the contract hash it was published with: refusing a tampered config")
    return record["config"]


def fetch_run_config(initial_peers: Sequence[str], run_id: str, secret: RunSecret | None, swarm: SwarmConfig) -> dict:
    """The run config published by the run owner, the node behind `initial_peers` (their /p2p/ peer
    ids), read through a short-lived client node with this peer's `swarm` settings (its timeouts and
    host; any free port, a fresh key: its own port and identity are for the node that trains)."""
    reader = swarm.model_copy(update={"port": 0, "identity_path": None, "announce_maddrs": []})
    validators = run_record_validators(run_id, iterations=None)
    dht = start_dht(reader, initial_peers, client_mode=True, secret=secret, record_validators=validators)
    try:
        return read_run_config(dht, run_id, maddr_peer_ids(initial_peers), swarm)
    finally:
        stop_dht(dht, grace_s=swarm.shutdown_timeout)


def _short(peer_ids: Sequence[str]) -> str:
    return ", ".join(f"…{peer[-8:]}" for peer in peer_ids)
