"""Peers' progress in the DHT: one subkey per peer under `p2pcold/<run_id>/progress`.

Each record expires `ttl` seconds after it was published, so a peer that stops publishing (it died
or left) disappears from `read_progress` by itself; there is no removal message to lose.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

DEFAULT_DHT_REQUEST_TIMEOUT = 10.0  # = SwarmConfig.dht_request_timeout's default


@dataclass
class PeerProgress:
    """What a peer reports about itself; all metrics optional (None until known)."""

    peer_id: str
    dataset: str
    iteration: int
    phase: str  # e.g. "joining", "training", "fusing", "downloading", "evaluating", "done"
    train_loss: float | None = None
    dev_accuracy: float | None = None
    examples_per_second: float | None = None
    last_group_size: int | None = None
    last_seen: float = 0.0  # unix time of the publication (publish_progress sets it)

    @classmethod
    def from_record(cls, record: object) -> "PeerProgress | None":
        if not isinstance(record, dict):
            return None
        try:
            progress = cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError):
            return None
        if not (isinstance(progress.peer_id, str) and isinstance(progress.iteration, int)):
            return None
        return progress


def progress_key(run_id: str) -> str:
    return f"p2pcold/{run_id}/progress"


def publish_progress(
    dht: hivemind.DHT,
    run_id: str,
    progress: PeerProgress,
    ttl: float,
    timeout: float = DEFAULT_DHT_REQUEST_TIMEOUT,
) -> bool:
    """Publish (or replace) this peer's record, expiring after `ttl` s. Best effort: returns False
    (and logs) when the DHT did not confirm the store within `timeout` s, instead of raising."""
    if ttl <= 0:
        raise P2PColdError("swarm: progress ttl must be positive")
    record = dataclasses.asdict(dataclasses.replace(progress, last_seen=time.time()))
    # plain Python types only (msgpack cannot encode numpy or torch scalars); NaN/inf become None
    record.update(peer_id=str(record["peer_id"]), dataset=str(record["dataset"]), phase=str(record["phase"]))
    record["iteration"] = int(record["iteration"])
    if record["last_group_size"] is not None:
        record["last_group_size"] = int(record["last_group_size"])
    for name in ("train_loss", "dev_accuracy", "examples_per_second"):
        value = record[name]
        record[name] = float(value) if value is not None and math.isfinite(float(value)) else None
    future = dht.store(
        progress_key(run_id), record, expiration_time=get_dht_time() + ttl, subkey=progress.peer_id, return_future=True
    )
    try:
        stored = bool(future.result(timeout=timeout))
    except TimeoutError:
        future.cancel()
        stored = False
    if not stored:
        logger.warning("progress of %s was not stored in the DHT within %.1f s", progress.peer_id, timeout)
    return stored


def read_progress(dht: hivemind.DHT, run_id: str, timeout: float = DEFAULT_DHT_REQUEST_TIMEOUT) -> list[PeerProgress]:
    """The live (unexpired) progress records of a run, sorted by dataset then peer id.

    Raises P2PColdError when the DHT does not answer within `timeout` s (an empty list means no peer
    published recently, not a network failure)."""
    future = dht.get(progress_key(run_id), latest=True, return_future=True)
    try:
        found = future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise P2PColdError(f"swarm: the DHT did not return progress records within {timeout:.1f} s") from None
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    records = []
    for subkey, item in found.value.items():
        if getattr(item, "expiration_time", now) < now:
            continue
        progress = PeerProgress.from_record(getattr(item, "value", None))
        if progress is None or progress.peer_id != str(subkey):
            logger.debug("ignoring a malformed progress record from %s", subkey)
            continue
        records.append(progress)
    return sorted(records, key=lambda p: (p.dataset, p.peer_id))
