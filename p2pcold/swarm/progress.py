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

from p2pcold.swarm.records import dataclass_from_record, get_records, put_record
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
        progress = dataclass_from_record(cls, record)
        if progress is None or not (isinstance(progress.peer_id, str) and isinstance(progress.iteration, int)):
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
    for name in ("train_loss", "dev_accuracy", "examples_per_second"):
        value = record[name]
        if value is not None and not math.isfinite(value):
            record[name] = None  # msgpack has no NaN problem, but readers should not see NaN
    stored = put_record(dht, progress_key(run_id), progress.peer_id, record, ttl, timeout)
    if not stored:
        logger.warning("progress of %s was not stored in the DHT within %.1f s", progress.peer_id, timeout)
    return stored


def read_progress(dht: hivemind.DHT, run_id: str, timeout: float = DEFAULT_DHT_REQUEST_TIMEOUT) -> list[PeerProgress]:
    """The live (unexpired) progress records of a run, sorted by dataset then peer id.

    Raises P2PColdError when the DHT does not answer within `timeout` s (an empty list means no peer
    published recently, not a network failure)."""
    records = []
    for subkey, value in get_records(dht, progress_key(run_id), timeout).items():
        progress = PeerProgress.from_record(value)
        if progress is None or progress.peer_id != subkey:
            logger.debug("ignoring a malformed progress record from %s", subkey)
            continue
        records.append(progress)
    return sorted(records, key=lambda p: (p.dataset, p.peer_id))
