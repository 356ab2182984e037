"""Small expiring key/subkey records in the DHT, for coordination messages (e.g. the Repository's
per-iteration assignments). Every call is bounded by its `timeout`."""

from __future__ import annotations

import dataclasses
from typing import Any

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.utils import P2PColdError


def assignment_key(run_id: str) -> str:
    """Where the Repository publishes, per iteration, who contributes and who fuses."""
    return f"p2pcold/{run_id}/assignment"


def watcher_key(run_id: str) -> str:
    """Where a monitor that evaluates says which fused base it holds: finished peers keep serving theirs
    until it has it (bounded by their boundary_deadline)."""
    return f"p2pcold/{run_id}/watchers"


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


def put_record(dht: hivemind.DHT, key: str, subkey: str, value: Any, ttl: float, timeout: float) -> bool:
    """Store `value` under (key, subkey) for `ttl` s; False when the DHT did not confirm in `timeout` s."""
    future = dht.store(key, value, expiration_time=get_dht_time() + ttl, subkey=subkey, return_future=True)
    try:
        return bool(future.result(timeout=timeout))
    except TimeoutError:
        future.cancel()
        return False


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
