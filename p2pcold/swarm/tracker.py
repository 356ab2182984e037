"""A peer's one view of the swarm (like hivemind's ProgressTracker).

One daemon thread reads the run's progress records and the Repository's assignments from the DHT
every `poll_interval` and re-publishes this peer's own progress record (every third of its ttl, and
at once after `update`). Callers read immutable snapshots and block on `wait_for_update` instead of
sleeping; nothing else in a peer or the Repository reads the DHT. A failed DHT read is one warning
line and keeps the last snapshot: it never raises into the caller.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Collection, Mapping

import hivemind

from p2pcold.config import SwarmConfig
from p2pcold.swarm.progress import PeerProgress, publish_progress, read_progress
from p2pcold.swarm.records import (
    assignment_iteration,
    assignment_key,
    assignment_record_problem,
    assignment_subkey,
    get_records,
    owner_peer_id,
    put_record,
    record_owner,
    warn_bad_record,
    watcher_key,
    watcher_record_problem,
)
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class SwarmSnapshot:
    """The swarm as seen at `taken_at` (unix time).

    `peers`: the other live peers, newest record per dataset (a restarted peer's previous record lives
    on until it expires), this peer's dataset excluded. `records`: every live record but this peer's
    own, undeduplicated. `assignments`: the Repository's record per iteration. `watchers`: monitor peer id
    -> the iteration of the fused base it holds; read only once this peer is done (only then it matters),
    None in a snapshot whose read began before."""

    peers: tuple[PeerProgress, ...] = ()
    records: tuple[PeerProgress, ...] = ()
    assignments: Mapping[int, Mapping] = field(default_factory=lambda: MappingProxyType({}))
    watchers: Mapping[str, int] | None = None
    taken_at: float = 0.0


def newest_per_dataset(records, exclude_dataset: str | None) -> tuple[PeerProgress, ...]:
    newest: dict[str, PeerProgress] = {}
    for record in records:
        if record.dataset != exclude_dataset and (record.dataset not in newest or record.last_seen > newest[record.dataset].last_seen):
            newest[record.dataset] = record
    return tuple(sorted(newest.values(), key=lambda p: p.dataset))


def trusted_watchers(records: Mapping[str, object], iterations: int | None) -> dict[str, int]:
    """Monitor peer id -> the fused base it holds, from well-formed, owned watcher records."""
    return {
        owner_peer_id(subkey): value["iteration"]
        for subkey, value in records.items()
        if watcher_record_problem(subkey, value, iterations) is None
    }


class SwarmTracker:
    """Owns the DHT reads of one process. `progress` is this peer's own record, published from the
    thread; None until `start_publishing` (a peer not yet admitted; the Repository never publishes one).

    `iterations`: the run's length, which bounds every record's iteration. `assignment_writers`: peer
    ids whose assignments count (the Repository's; None: any owner's)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        config: SwarmConfig,
        progress: PeerProgress | None = None,
        *,
        iterations: int | None = None,
        assignment_writers: Collection[str] | None = None,
    ):
        self.dht, self.run_id, self.config = dht, run_id, config
        self.iterations = iterations
        self.assignment_writers = None if assignment_writers is None else frozenset(assignment_writers)
        self._progress = progress
        self._watching: int | None = None  # a monitor's newest fused base, published instead of a progress record
        self._snapshot = SwarmSnapshot()
        self._refreshed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._read_failing = False
        self._last_publish = float("-inf")
        self._thread = threading.Thread(target=self._loop, name="p2pcold-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side

    @property
    def progress(self) -> PeerProgress | None:
        return self._progress

    def start_publishing(self, progress: PeerProgress) -> None:
        self._progress = progress
        self._last_publish = float("-inf")
        self._wake.set()

    def update(self, **fields) -> None:
        """Change this peer's record; the thread publishes it at once."""
        if self._progress is None:
            raise P2PColdError("swarm: this tracker publishes no progress record")
        self._progress = dataclasses.replace(self._progress, **fields)
        self._last_publish = float("-inf")
        self._wake.set()

    def watch(self, iteration: int) -> None:
        """As a monitor that evaluates (never a peer): publish that it holds the fused base of
        `iteration`, so that finished peers keep serving a newer one until it has downloaded it."""
        self._watching = iteration
        self._last_publish = float("-inf")
        self._wake.set()

    def refresh_soon(self) -> None:
        """Read the DHT again now rather than at the next poll (e.g. to confirm a view once)."""
        self._wake.set()

    def snapshot(self) -> SwarmSnapshot:
        return self._snapshot

    def wait_for_update(self, timeout: float) -> SwarmSnapshot:
        """The next snapshot, or the current one after `timeout` s (also when the thread has stopped)."""
        with self._refreshed:
            if self._thread.is_alive():
                self._refreshed.wait(timeout)
            return self._snapshot

    def publish_assignment(self, iteration: int, record: dict) -> None:
        """The Repository's word about `iteration` (contributors, group, final, failure), for every peer;
        stored again until the DHT confirms it, within `publish_timeout`."""
        config = self.config
        subkey = assignment_subkey(record_owner(self.dht), iteration)
        retry_until = time.monotonic() + config.publish_timeout
        key = assignment_key(self.run_id)
        if not put_record(self.dht, key, subkey, record, config.assignment_timeout, config.dht_request_timeout, retry_until=retry_until):
            raise P2PColdError(f"could not publish the assignment of iteration {iteration} in the DHT within {config.publish_timeout:.0f} s")
        self._wake.set()

    def close(self, timeout: float) -> None:
        """Stop the thread once it has published the last state; bounded by `timeout`, and at once when
        the DHT process is gone (e.g. SIGTERM reached the whole process group): a store through a dead
        DHT would only wait for its own timeout."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline and self.dht.is_alive():
            self._thread.join(0.1)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if time.monotonic() - self._last_publish >= self.config.progress_ttl / 3:
                    self._publish()
                self._refresh()
                self._wake.wait(self.config.poll_interval)
                self._wake.clear()
            self._publish()  # the last state once (e.g. phase `done`)
        finally:
            with self._refreshed:
                self._refreshed.notify_all()

    def _publish(self) -> None:
        progress, watching, config = self._progress, self._watching, self.config
        if progress is None and watching is None:
            return
        self._last_publish = time.monotonic()
        try:
            if progress is not None:
                publish_progress(self.dht, self.run_id, progress, config.progress_ttl, config.dht_request_timeout)
            else:
                put_record(self.dht, watcher_key(self.run_id), record_owner(self.dht), {"iteration": watching}, config.progress_ttl, config.dht_request_timeout)
        except Exception as e:  # a failed heartbeat must never kill the peer
            logger.debug("progress not published: %s", e)

    def _trusted_assignments(self, records: Mapping[str, object]) -> dict[int, Mapping]:
        """Iteration -> the Repository's word, from well-formed assignments of a trusted writer."""
        trusted = {}
        for subkey, value in records.items():
            problem = assignment_record_problem(subkey, value, self.iterations)
            writer = owner_peer_id(subkey)
            if problem is None and self.assignment_writers is not None and writer not in self.assignment_writers:
                problem = f"from {writer}, who is not the Repository"
            if problem:
                warn_bad_record("assignment", "%s", problem)
                continue
            trusted[assignment_iteration(subkey)] = value
        return trusted

    def _refresh(self) -> None:
        timeout = self.config.dht_request_timeout
        try:
            records = read_progress(self.dht, self.run_id, timeout, self.iterations)
            assignments = get_records(self.dht, assignment_key(self.run_id), timeout)
            me = self._progress
            watchers = get_records(self.dht, watcher_key(self.run_id), timeout) if me is not None and me.phase == "done" else None
        except Exception as e:  # the DHT is slow or gone: keep the last view
            if not self._read_failing:
                logger.warning("swarm view not refreshed, keeping the last one: %s", e)
            self._read_failing = True
            return
        self._read_failing = False
        others = [r for r in records if me is None or r.peer_id != me.peer_id]
        snapshot = SwarmSnapshot(
            peers=newest_per_dataset(others, None if me is None else me.dataset),
            records=tuple(others),
            assignments=MappingProxyType(self._trusted_assignments(assignments)),
            watchers=None if watchers is None else MappingProxyType(trusted_watchers(watchers, self.iterations)),
            taken_at=time.time(),
        )
        with self._refreshed:
            self._snapshot = snapshot
            self._refreshed.notify_all()
