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

from p2pcold.swarm.records import SHA256_HEX, dataclass_from_record, get_records, owner_peer_id, put_record, record_owner, warn_bad_record
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
    body_hash: str | None = None  # utils.state_dict_hash of the base θ_iteration this peer holds (and serves)
    # peer ids of the group that fused this base, this peer's included, sorted (empty unless last_fusion is ok):
    # members' bodies differ by rounding, so the group, not the hash, tells that they hold one base
    last_group_peers: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: object) -> "PeerProgress | None":
        """The record parsed, or None unless every field has its type and lies within its bounds
        (docs/protocol.md, "Record schemas"); `problems` says why."""
        progress = dataclass_from_record(cls, record)
        return progress if progress is not None and not progress.problems() else None

    def problems(self) -> list[str]:
        """What is out of bounds in this record (empty: a well-formed record)."""
        checks = {
            "peer_id": _text(self.peer_id, MAX_ID_CHARS),
            "dataset": _text(self.dataset, MAX_NAME_CHARS),
            "iteration": _integer(self.iteration, 0, MAX_ITERATION),
            "phase": _plain(self.phase) in _PHASES,
            "train_loss": _metric(self.train_loss, 0.0, math.inf),
            "dev_accuracy": _metric(self.dev_accuracy, 0.0, 1.0),
            "examples_per_second": _metric(self.examples_per_second, 0.0, math.inf),
            "last_group_size": self.last_group_size is None or _integer(self.last_group_size, 0, MAX_GROUP),
            "last_seen": _metric(self.last_seen, 0.0, math.inf) and self.last_seen is not None,
            "last_fusion": self.last_fusion is None or _plain(self.last_fusion) in _OUTCOMES,
            "last_group": isinstance(self.last_group, (list, tuple))
            and len(self.last_group) <= MAX_GROUP
            and all(_text(name, MAX_NAME_CHARS) for name in self.last_group),
            "fusion_attempts": _integer(self.fusion_attempts, 0, MAX_ATTEMPTS),
            "fusion_error": self.fusion_error is None or _text(self.fusion_error, MAX_ERROR_CHARS),
            "last_group_peers": isinstance(self.last_group_peers, (list, tuple))
            and len(self.last_group_peers) <= MAX_GROUP
            and all(_text(peer, MAX_ID_CHARS) for peer in self.last_group_peers),
            "fusion_seconds": _metric(self.fusion_seconds, 0.0, math.inf),
            "trained_iteration": self.trained_iteration is None or _integer(self.trained_iteration, 0, MAX_ITERATION),
            "mode": self.mode in _MODES,
            "body_hash": self.body_hash is None or (isinstance(self.body_hash, str) and SHA256_HEX.fullmatch(self.body_hash) is not None),
        }
        return [name for name, ok in checks.items() if not ok]


# Bounds of a progress record: generous for honest peers, small enough that no record can flood a reader.
# the group key's 32 bits (group_key.ITERATION_BITS); a run's own bound is lower
MAX_ITERATION = 2**32 - 1
MAX_ID_CHARS, MAX_NAME_CHARS, MAX_ERROR_CHARS = 100, 200, 600
MAX_GROUP = 1024
MAX_ATTEMPTS = 10**6
_PHASES = frozenset(p.value for p in Phase)
_OUTCOMES = frozenset(o.value for o in FusionOutcome)
_MODES = frozenset(("public", "client"))  # reachability.Mode values (that module sits above this one)


def _plain(value: object) -> object:
    """An enum member's wire value (`Phase.DONE` -> "done"); anything else as it is."""
    return value.value if isinstance(value, enum.Enum) else value


def _text(value: object, max_chars: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_chars


def _integer(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _metric(value: object, low: float, high: float) -> bool:
    """None (not known yet) or a finite number within [low, high]."""
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high


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
    (and logs) when the DHT did not confirm the store within `timeout` s, instead of raising.

    The record is owned (its subkey is this node's owner mark, and the DHT signs it): no other peer
    can overwrite it, and readers drop a record whose peer id is not its owner's."""
    if ttl <= 0:
        raise P2PColdError("swarm: progress ttl must be positive")
    record = dataclasses.asdict(dataclasses.replace(progress, last_seen=time.time()))
    for name in ("phase", "last_fusion", "mode"):  # plain strings on the wire, not enum members
        if isinstance(record[name], enum.Enum):
            record[name] = record[name].value
    record["last_group"], record["last_group_peers"] = list(record["last_group"]), list(record["last_group_peers"])
    for name in ("train_loss", "dev_accuracy", "examples_per_second", "fusion_seconds"):
        value = record[name]
        if value is not None and not math.isfinite(value):
            record[name] = None  # msgpack has no NaN problem, but readers should not see NaN
    problems = PeerProgress(**record).problems()
    if problems:
        raise P2PColdError(f"swarm: this peer's progress record is out of bounds ({', '.join(problems)})")
    stored = put_record(dht, progress_key(run_id), record_owner(dht), record, ttl, timeout)
    if not stored:
        logger.warning("progress of %s was not stored in the DHT within %.1f s", progress.peer_id, timeout)
    return stored


def read_progress(
    dht: hivemind.DHT, run_id: str, timeout: float = DEFAULT_DHT_REQUEST_TIMEOUT, iterations: int | None = None
) -> list[PeerProgress]:
    """The live (unexpired) progress records of a run, sorted by dataset then peer id.

    Only well-formed records written by the peer they describe count; `iterations` (the run's number
    of iterations) bounds their iteration. Any other record is ignored with one warning line.
    Raises P2PColdError when the DHT does not answer within `timeout` s (an empty list means no peer
    published recently, not a network failure)."""
    records = []
    for subkey, value in get_records(dht, progress_key(run_id), timeout).items():
        problem = progress_record_problem(subkey, value, iterations)
        if problem:
            warn_bad_record("progress", "%s", problem)
            continue
        records.append(PeerProgress.from_record(value))
    return sorted(records, key=lambda p: (p.dataset, p.peer_id))


def progress_record_problem(subkey: object, value: object, iterations: int | None) -> str | None:
    """Why the record `value` under `subkey` is not a valid progress record of a run of `iterations`
    iterations (None: it is one). Used by readers and by the DHT's record validator alike."""
    owner = owner_peer_id(subkey)
    if owner is None:
        return "no owner mark in its subkey (an unsigned record)"
    progress = dataclass_from_record(PeerProgress, value)
    if progress is None:
        return f"from {owner}: not a progress record"
    problems = progress.problems()
    if problems:
        return f"from {owner}: out of bounds: {', '.join(problems)}"
    if progress.peer_id != owner:
        return f"from {owner}: claims to be peer {progress.peer_id}"
    if iterations is not None and progress.iteration > iterations:
        return f"from {owner}: iteration {progress.iteration} is beyond the run's {iterations}"
    return None
