"""Peers' progress in the DHT: one subkey per peer under `p2pcold/<run_id>/progress`.

Each record expires `ttl` seconds after it was published, so a peer that stops publishing (it died
or left) disappears from `read_progress` by itself; there is no removal message to lose.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass, field

import hivemind

from p2pcold.swarm.records import dataclass_from_record, get_records, put_record
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

DEFAULT_DHT_REQUEST_TIMEOUT = 10.0  # = SwarmConfig.dht_request_timeout's default


class Phase(str, enum.Enum):
    """Every phase a peer publishes (records are plain strings on the wire: `Phase.DONE == "done"`)."""

    JOINING = "joining"  # admitted to the run, loading its start state
    DOWNLOADING = "downloading"  # downloading a newer base from the swarm (or the Repository)
    FINETUNING = "finetuning"  # training θ_i on its dataset
    AVERAGING = "averaging"  # at the boundary: waiting for the others, then the all-reduce
    WAITING = "waiting"  # centralized: waiting for the Repository's assignment of this iteration
    READY = "ready"  # centralized: finetuned, waiting for the Repository's go to fuse
    DONE = "done"  # reached the run's last iteration (may still serve the final base)


class FusionOutcome(str, enum.Enum):
    """What the peer's last boundary produced (`PeerProgress.last_fusion`)."""

    OK = "ok"  # fused with a group; `last_group` names it
    FAILED = "failed"  # a group was there but no all-reduce completed by the deadline: kept its own update
    SOLO = "solo"  # nobody else at that iteration: its own update is the base (a group of one)
    ADOPTED = "adopted"  # took a fused base from the swarm (download) instead of its own


@dataclass
class PeerProgress:
    """What a peer reports about itself; all metrics optional (None until known).

    `iteration` is the base θ_i the peer holds; the last_* fields describe the boundary that produced
    it. Fields added after the first release have defaults, so older records still parse."""

    peer_id: str
    dataset: str
    iteration: int
    phase: str  # a Phase value
    train_loss: float | None = None
    dev_accuracy: float | None = None
    examples_per_second: float | None = None
    last_group_size: int | None = None
    last_seen: float = 0.0  # unix time of the publication (publish_progress sets it)
    last_fusion: str | None = None  # a FusionOutcome value; None before the first boundary
    last_group: list[str] = field(default_factory=list)  # datasets of the last group, this peer's included
    fusion_attempts: int = 0  # all-reduce attempts made at the last boundary
    fusion_error: str | None = None  # why the last boundary did not fuse (last failure reason)
    fusion_seconds: float | None = None  # how long the last boundary took (waiting for peers and all-reduce)
    trained_iteration: int | None = None  # the iteration whose finetuning gave train_loss, dev_accuracy, examples_per_second
    mode: str = "public"  # a reachability.Mode value: `client` peers are behind NAT (dial out only)

    @classmethod
    def from_record(cls, record: object) -> "PeerProgress | None":
        progress = dataclass_from_record(cls, record)
        if progress is None or not (
            isinstance(progress.peer_id, str)
            and isinstance(progress.dataset, str)
            and isinstance(progress.iteration, int)
            and isinstance(progress.phase, str)
            and isinstance(progress.last_group, (list, tuple))
            and isinstance(progress.fusion_attempts, int)
            and isinstance(progress.mode, str)
        ):
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
    for name in ("phase", "last_fusion", "mode"):  # plain strings on the wire, not enum members
        if isinstance(record[name], enum.Enum):
            record[name] = record[name].value
    record["last_group"] = list(record["last_group"])
    for name in ("train_loss", "dev_accuracy", "examples_per_second", "fusion_seconds"):
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
