"""Small expiring key/subkey records in the DHT, for coordination messages (e.g. the Repository's
per-iteration assignments). Every call is bounded by its `timeout`."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import hivemind
import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

STORE_RETRY_PAUSE_S = 0.5  # between the tries of a store that must land (put_record's retry_until)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # how records carry a hash (θ0, a body, a contract)


def assignment_key(run_id: str) -> str:
    """Where the Repository publishes, per iteration, who contributes and who fuses."""
    return f"p2pcold/{run_id}/assignment"


def watcher_key(run_id: str) -> str:
    """Where a monitor that evaluates says which fused base it holds: finished peers keep serving theirs
    until it has it (bounded by their boundary_deadline)."""
    return f"p2pcold/{run_id}/watchers"


def watcher_record_problem(subkey: object, value: object, iterations: int | None) -> str | None:
    """Why `value` under `subkey` is not a valid watcher record (None: it is one): owned, one iteration
    within the run (a forged one could only keep finished peers serving, up to their boundary_deadline)."""
    owner = owner_peer_id(subkey)
    if owner is None:
        return "its subkey holds no owner mark (an unsigned record)"
    held = value.get("iteration") if isinstance(value, dict) and set(value) == {"iteration"} else None
    if not isinstance(held, int) or isinstance(held, bool) or not 0 <= held <= (iterations if iterations is not None else 2**32 - 1):
        return f"from {owner}: not a fused base's iteration within the run"
    return None


def run_config_key(run_id: str) -> str:
    """Where the run's owner publishes the run's config (swarm/run_config.py)."""
    return f"p2pcold/{run_id}/config"


MAX_RUN_CONFIG_CHARS = 64_000  # a run config record as JSON; a full config is ~4 KB


def run_config_record_problem(subkey: object, value: object) -> str | None:
    """Why `value` under `subkey` is not a well-formed run config record (None: it is one)."""
    owner = owner_peer_id(subkey)
    if owner is None:
        return "no owner mark in its subkey (an unsigned record)"
    if not (isinstance(value, dict) and set(value) == {"config", "contract_hash"} and isinstance(value["config"], dict)):
        return f"from {owner}: not a run config record"
    if not isinstance(value["contract_hash"], str) or SHA256_HEX.fullmatch(value["contract_hash"]) is None:
        return f"from {owner}: its contract hash is not a sha256"
    if len(json.dumps(value, default=str)) > MAX_RUN_CONFIG_CHARS:
        return f"from {owner}: over {MAX_RUN_CONFIG_CHARS} characters"
    return None


MAX_ASSIGNMENT_NAMES = 1024  # datasets listed in one assignment
MAX_ASSIGNMENT_TEXT = 600  # chars of a failure message or a dataset name


def assignment_subkey(owner: str, iteration: int) -> str:
    """The subkey of the Repository's word about `iteration`: the iteration, then its owner mark."""
    return f"{iteration}{owner}"


def assignment_iteration(subkey: object) -> int | None:
    """The iteration an assignment's subkey is about (None: not an assignment subkey)."""
    digits = re.match(r"\d{1,10}(?=\[owner:)", subkey) if isinstance(subkey, str) else None
    return None if digits is None else int(digits.group())


def assignment_record_problem(subkey: object, value: object, iterations: int | None) -> str | None:
    """Why `value` under `subkey` is not a valid assignment of a run of `iterations` iterations (None: it is one)."""
    owner, iteration = owner_peer_id(subkey), assignment_iteration(subkey)
    if owner is None or iteration is None:
        return "its subkey is not <iteration><owner mark> (an unsigned record)"
    if not isinstance(value, dict) or value.get("iteration") != iteration or isinstance(value.get("iteration"), bool):
        return f"from {owner}: not an assignment of iteration {iteration}"
    if iterations is not None and iteration > iterations:
        return f"from {owner}: iteration {iteration} is beyond the run's {iterations}"
    known = {"iteration", "contributors", "group", "fused", "final", "failure"}
    if set(value) - known:
        return f"from {owner}: unknown fields {sorted(set(value) - known)[:5]}"
    for name in ("contributors", "group", "fused"):
        names = value.get(name, [])
        if not (isinstance(names, list) and len(names) <= MAX_ASSIGNMENT_NAMES and all(isinstance(n, str) and 0 < len(n) <= MAX_ASSIGNMENT_TEXT for n in names)):
            return f"from {owner}: {name} is not a list of dataset names"
    if not isinstance(value.get("final", False), bool) or not isinstance(value.get("failure", ""), str) or len(value.get("failure", "")) > MAX_ASSIGNMENT_TEXT:
        return f"from {owner}: final or failure out of bounds"
    return None


def dataclass_from_record(cls: type, record: object) -> Any:
    """`cls` built from a DHT record holding one value per field, or None for anything else (records
    come from other peers: a malformed one is ignored, never trusted). A field with a default may be
    missing (a record from an older peer); one without a default may not."""
    if not isinstance(record, dict):
        return None
    try:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record or not _has_default(f)})
    except (KeyError, TypeError):
        return None


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def put_record(dht: hivemind.DHT, key: str, subkey: str, value: Any, ttl: float, timeout: float, *, retry_until: float | None = None) -> bool:
    """Store `value` under (key, subkey) for `ttl` s; False when the DHT did not confirm it. One try of at
    most `timeout` s, repeated until `retry_until` (a time.monotonic() deadline) when one is given.

    `retry_until` is for the records that peers wait on (the Repository's word): on a loaded swarm a store
    fails now and then (the nearest nodes do not answer hivemind's RPC in time), and one failed try must
    not stop a run. Each try expires `ttl` s after it is made, since a node that took an unconfirmed try
    refuses a value that expires no later."""
    deadline = time.monotonic() + timeout if retry_until is None else retry_until
    while True:
        future = dht.store(key, value, expiration_time=get_dht_time() + ttl, subkey=subkey, return_future=True)
        try:
            if future.result(timeout=max(min(timeout, deadline - time.monotonic()), 0.0)):
                return True
        except TimeoutError:
            future.cancel()
        if retry_until is None or time.monotonic() + STORE_RETRY_PAUSE_S >= deadline:
            return False
        logger.info("a store of %r was not confirmed by the DHT; trying again", key)
        time.sleep(STORE_RETRY_PAUSE_S)


def get_records(dht: hivemind.DHT, key: str, timeout: float) -> dict[str, Any]:
    """All unexpired subkey -> value records under `key` ({} when there are none)."""
    future = dht.get(key, latest=True, return_future=True)
    try:
        found = future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise P2PColdError(f"swarm: the DHT did not answer for {key!r} within {timeout:.1f} s") from None
    if found is None or not isinstance(found.value, dict):
        return {}
    now = get_dht_time()
    return {str(sub): item.value for sub, item in found.value.items() if getattr(item, "expiration_time", now) >= now}


# --------------------------------------------------------------------------- owner-bound records
#
# A record whose subkey holds `[owner:<RSA public key>]` is *owned*: hivemind's RSASignatureValidator
# (installed by start_dht) refuses any store of it that the owner did not sign, so no other peer can
# write or overwrite it. The owner's key is also its p2pd identity, so the peer id of the owner follows
# from the subkey (`owner_peer_id`): a record that claims another peer id than its owner's is forged.

OWNER_MARK = re.compile(r"\[owner:(.+?)\]")
MAX_WARNINGS_PER_MINUTE = 1  # per kind of bad record: a rogue must not flood the log either
_last_warned: dict[str, float] = {}


def load_signing_key(identity_path: str | Path) -> RSAPrivateKey:
    """The RSA private key of a p2pd identity file (the file hivemind's P2P.generate_identity writes)."""
    try:
        key = crypto_pb2.PrivateKey.FromString(Path(identity_path).read_bytes())
        if key.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        signing_key = RSAPrivateKey.__new__(RSAPrivateKey)
        signing_key.__setstate__({"_private_key": key.data})  # the DER bytes, as RSAPrivateKey pickles itself
        return signing_key
    except Exception as e:  # protobuf and the key parsers raise several types; all mean "not our key"
        raise P2PColdError(f"{identity_path}: the identity key is not an RSA key that can sign DHT records ({e})") from None


def owner_subkey(signing_key: RSAPrivateKey) -> str:
    """The subkey that marks a record as owned by `signing_key` (RSASignatureValidator's format)."""
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", signing_key.get_public_key().to_bytes()).decode()


@functools.lru_cache(maxsize=4096)
def owner_peer_id(subkey: object) -> str | None:
    """The peer id of the owner marked in `subkey`, or None when it holds no (valid) owner mark."""
    if isinstance(subkey, bytes):
        subkey = subkey.decode(errors="replace")
    if not isinstance(subkey, str):
        return None
    found = OWNER_MARK.findall(subkey)
    if len(found) != 1:
        return None
    try:
        public_key = serialization.load_ssh_public_key(found[0].encode())
    except (ValueError, TypeError):
        return None
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return str(PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))))


def maddr_peer_ids(maddrs) -> list[str]:
    """The peer ids in the `/p2p/<peer id>` parts of `maddrs`."""
    return [str(Multiaddr(str(maddr)).value_for_protocol("p2p")) for maddr in maddrs if "/p2p/" in str(maddr)]


def record_owner(dht: hivemind.DHT) -> str:
    """This node's owner subkey (start_dht sets it; the DHT signs what is stored under it)."""
    owner = getattr(dht, "record_owner", None)
    if not owner:
        raise P2PColdError("swarm: this DHT node has no signing key (start it with p2pcold.swarm.start_dht)")
    return owner


def warn_bad_record(kind: str, message: str, *args) -> None:
    """One warning line per `kind` of bad record per minute; the rest go to the debug log."""
    now = time.monotonic()
    if now - _last_warned.get(kind, float("-inf")) >= 60.0 / MAX_WARNINGS_PER_MINUTE:
        _last_warned[kind] = now
        logger.warning("ignoring a bad %s record: " + message + " (further ones for a minute: debug log)", kind, *args)
    else:
        logger.debug("ignoring a bad %s record: " + message, kind, *args)
