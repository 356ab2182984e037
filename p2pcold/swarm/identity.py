"""A run's identity in the DHT: which base model and which θ0 every peer of a run must start from.

The DHT key `p2pcold/<run_id>/identity` holds one subkey per peer that joined (its peer id), each
with a copy of the identity. The *canonical* identity is the entry with the smallest
(`created_at`, `founder`) pair: every reader picks the same one from the same set of entries, so two
peers that found the key empty and published at the same moment agree on who founded the run, and
the loser (if its identity differs) is refused like any later peer. Every successful join re-publishes
the canonical identity under the joiner's own subkey with a fresh expiration, so the record lives as
long as peers keep joining (or calling `join_run` again), even after the founder has left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import hivemind
import torch
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.config import SwarmConfig, validate_swarm_config
from p2pcold.swarm.records import SHA256_HEX, dataclass_from_record, owner_peer_id, put_record, record_owner, warn_bad_record
from p2pcold.utils import P2PColdError, get_logger, state_dict_hash

logger = get_logger(__name__)

PROTOCOL_VERSION = 1  # bump when the wire semantics of p2pcold.swarm change


def body_schema_hash(body: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the fused parameters' names, dtypes and shapes in name order (no values)."""
    h = hashlib.sha256()
    for name in sorted(body):
        tensor = body[name]
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """What every peer of a run must agree on. `founder` and `created_at` are filled in by join_run."""

    run_id: str
    base_model: str  # the base model's id (hub id, path or name), as the run config spells it
    body_hash: str  # utils.state_dict_hash of θ0, the initial fused body
    schema_hash: str  # body_schema_hash: names, shapes and dtypes of the fused parameters
    protocol: int = PROTOCOL_VERSION
    founder: str = ""  # peer id of the peer that published the run first
    created_at: float = 0.0  # DHT time of that first publication
    contract_hash: str = ""  # contract_hash(contract)
    contract: dict = field(default_factory=dict, hash=False)  # config.run_contract: what must be equal across peers

    @classmethod
    def for_body(cls, run_id: str, base_model: str, body: Mapping[str, torch.Tensor], contract: Mapping[str, Any] | None = None) -> "RunIdentity":
        contract = dict(contract or {})
        return cls(
            run_id=run_id,
            base_model=base_model,
            body_hash=state_dict_hash(body),
            schema_hash=body_schema_hash(body),
            contract_hash=contract_hash(contract),
            contract=contract,
        )

    def differences(self, other: "RunIdentity") -> list[str]:
        """Human-readable differences between the swarm's identity (`self`) and a joiner's (`other`).

        The base model's *name* is not a reason to refuse on its own: peers on different machines
        spell a local model folder differently (`/home/a/model`, `./model`). θ0's hash and the
        schema decide; the names are shown next to them when those differ."""
        out = []
        checks = (
            ("protocol", "p2pcold protocol version", False),
            ("base_model", "base model", False),
            ("body_hash", "base model hash (θ0)", True),
            ("schema_hash", "fused parameter schema (names/shapes/dtypes)", True),
        )
        if self.body_hash == other.body_hash and self.schema_hash == other.schema_hash:
            checks = tuple(check for check in checks if check[0] != "base_model")
        for attr, label, is_hash in checks:
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine != theirs:
                show = (lambda v: f"{str(v)[:12]}…") if is_hash else repr
                out.append(f"{label} differs: swarm has {show(mine)}, you have {show(theirs)}")
        if self.contract_hash != other.contract_hash:
            names = sorted(set(self.contract) | set(other.contract))
            fields = [n for n in names if self.contract.get(n) != other.contract.get(n)]
            out += [f"{n} differs: swarm has {self.contract.get(n)!r}, you have {other.contract.get(n)!r}" for n in fields]
            if not fields:
                out.append(f"run contract differs: swarm has {self.contract_hash[:12]}…, you have {other.contract_hash[:12]}…")
        return out

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> "RunIdentity | None":
        identity = dataclass_from_record(cls, record)
        types_ok = identity is not None and (
            isinstance(identity.run_id, str)
            and isinstance(identity.base_model, str)
            and isinstance(identity.body_hash, str)
            and isinstance(identity.schema_hash, str)
            and isinstance(identity.protocol, int)
            and isinstance(identity.founder, str)
            and isinstance(identity.created_at, (int, float))
            and isinstance(identity.contract_hash, str)
            and isinstance(identity.contract, dict)
        )
        return identity if types_ok and not identity.problems() else None

    def problems(self) -> list[str]:
        """What is out of bounds in this record (empty: a well-formed one)."""
        checks = {
            "run_id": 0 < len(self.run_id) <= MAX_TEXT,
            "base_model": len(self.base_model) <= MAX_TEXT,
            "body_hash": SHA256_HEX.fullmatch(self.body_hash) is not None,
            "schema_hash": SHA256_HEX.fullmatch(self.schema_hash) is not None,
            "founder": len(self.founder) <= MAX_TEXT,
            "created_at": not isinstance(self.created_at, bool) and math.isfinite(self.created_at) and self.created_at >= 0,
            "contract_hash": self.contract_hash == "" or SHA256_HEX.fullmatch(self.contract_hash) is not None,
            "contract": len(json.dumps(self.contract, default=str)) <= MAX_CONTRACT_CHARS,
        }
        return [name for name, ok in checks.items() if not ok]

    def _order(self) -> tuple[float, str]:
        return (float(self.created_at), self.founder)


MAX_TEXT = 1000  # chars of a run id, model name or peer id in an identity record
MAX_CONTRACT_CHARS = 20_000  # the run contract as JSON


def identity_record_problem(subkey: object, value: object) -> str | None:
    """Why `value` under `subkey` is not a valid identity entry (None: it is one, or a withdrawn one)."""
    owner = owner_peer_id(subkey)
    if owner is None:
        return "no owner mark in its subkey (an unsigned record)"
    if value is not None and RunIdentity.from_record(value) is None:
        return f"from {owner}: not a well-formed run identity"
    return None


def contract_hash(contract: Mapping[str, Any]) -> str:
    """sha256 of the contract's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(dict(contract), sort_keys=True, default=str).encode()).hexdigest()


def identity_key(run_id: str) -> str:
    return f"p2pcold/{run_id}/identity"


def join_run(dht: hivemind.DHT, run_id: str, identity: RunIdentity, config: SwarmConfig) -> RunIdentity:
    """Join run `run_id` with `identity`, or found it if the DHT has no identity for it yet.

    Returns the swarm's canonical identity (equal to `identity` in every compared field). Raises
    P2PColdError naming each field that differs (e.g. "base model hash (θ0) differs: swarm has
    1a2b…, you have 3c4d…"), or when the DHT does not answer within `config.join_timeout` seconds.
    Calling it again (e.g. every iteration) refreshes this peer's copy of the record.
    """
    validate_swarm_config(config)
    if not run_id:
        raise P2PColdError("swarm: run_id is empty")
    if identity.run_id != run_id:
        raise P2PColdError(f"swarm: identity is for run {identity.run_id!r}, not {run_id!r}")
    pinned = config.theta0_hash
    if pinned is not None and identity.body_hash != pinned:
        raise P2PColdError(
            f"cannot join run {run_id!r}: your base model hash (θ0) {identity.body_hash[:12]}… is not the one the run config pins "
            f"(swarm.theta0_hash {pinned[:12]}…)"
        )
    deadline = time.monotonic() + config.join_timeout
    key, me, owner = identity_key(run_id), str(dht.peer_id), record_owner(dht)

    entries = _pinned(_read_entries(dht, key, deadline, config), identity, pinned, run_id)
    founded = not entries
    if founded:
        candidate = dataclasses.replace(identity, founder=me, created_at=get_dht_time())
        _store(dht, key, owner, candidate.to_record(), deadline, config)
        logger.info("run %r: no identity in the DHT, publishing ours as founder", run_id)
        # a rival founder that read the key empty at the same time shows up here
        time.sleep(min(config.identity_settle_time, max(0.0, deadline - time.monotonic())))
        entries = _pinned(_read_entries(dht, key, deadline, config), identity, pinned, run_id)
        entries.setdefault(me, candidate)

    canonical = min(entries.values(), key=RunIdentity._order)
    differences = canonical.differences(identity)
    if differences:
        if founded:  # we raced a founder and lost: withdraw our entry
            _store(dht, key, owner, None, deadline, config, must=False)
        forged_theta0 = not pinned and canonical.body_hash != identity.body_hash  # the only lock-out a pin cures
        hint = f" (if that identity is forged, pin θ0 in the run config: swarm.theta0_hash: {identity.body_hash})" if forged_theta0 else ""
        raise P2PColdError(f"cannot join run {run_id!r} (founded by {canonical.founder}): " + "; ".join(differences) + hint)
    _store(dht, key, owner, canonical.to_record(), deadline, config)
    return canonical


def _pinned(entries: dict[str, RunIdentity], identity: RunIdentity, pinned: str | None, run_id: str) -> dict[str, RunIdentity]:
    """With θ0 pinned by the run config, the config is the authority, not the earliest entry: entries
    that differ from this peer's identity (θ0, schema or contract) are ignored, their writers named in
    one warning line. Without a pin, every entry counts."""
    if pinned is None:
        return entries
    forged = sorted(peer for peer, entry in entries.items() if entry.differences(identity))
    if forged:
        logger.warning(
            "run %r: ignoring %d identity record(s) that differ from the run config pinned by swarm.theta0_hash (written by %s)",
            run_id, len(forged), ", ".join(forged[:3]) + ("…" if len(forged) > 3 else ""),
        )  # fmt: skip
    return {peer: entry for peer, entry in entries.items() if peer not in forged}


def _read_entries(dht: hivemind.DHT, key: str, deadline: float, config: SwarmConfig) -> dict[str, RunIdentity]:
    timeout = min(config.dht_request_timeout, deadline - time.monotonic())
    if timeout <= 0:
        raise P2PColdError(f"swarm: could not read the run identity within join_timeout={config.join_timeout:.0f} s")
    future = dht.get(key, latest=True, return_future=True)
    try:
        found = future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise P2PColdError(
            f"swarm: the DHT did not return the run identity within {timeout:.1f} s (join_timeout={config.join_timeout:.0f} s)"
        ) from None
    entries: dict[str, RunIdentity] = {}
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            problem = identity_record_problem(subkey, value)
            if problem:
                warn_bad_record("identity", "%s", problem)
            elif value is not None:
                entries[owner_peer_id(subkey)] = RunIdentity.from_record(value)
    return entries


def _store(dht, key, subkey, value, deadline, config, must: bool = True) -> None:
    """Store our entry (None: withdraw it), retried until `deadline`: on a busy swarm one store now and
    then goes unconfirmed, and a joiner has the whole join_timeout, not one try."""
    if deadline <= time.monotonic() and not must:
        return
    stored = put_record(dht, key, subkey, value, ttl=config.identity_ttl, timeout=config.dht_request_timeout, retry_until=deadline)
    if not stored and must:
        raise P2PColdError(f"swarm: could not publish the run identity in the DHT within join_timeout={config.join_timeout:.0f} s")
