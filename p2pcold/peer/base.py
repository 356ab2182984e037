"""What both kinds of swarm peer share: local state first, then the swarm (DHT, run identity, the
tracker that owns this peer's view of the swarm, the averager), finetuning, checkpoints, cleanup."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch

from p2pcold.config import DatasetSpec, RunConfig, load_dataset_spec, run_contract
from p2pcold.finetune import Contribution, Contributor, resolve_device
from p2pcold.run_state import RunState
from p2pcold.scalars import ScalarLog
from p2pcold.swarm import (
    BodyAverager,
    FusionResult,
    PeerProgress,
    Phase,
    RunIdentity,
    SwarmTracker,
    join_run,
    peer_id,
    stop_dht,
)
from p2pcold.swarm.auth import RunSecret
from p2pcold.swarm.boundary import duplicate_dataset_peers
from p2pcold.swarm.compression import fuse_reference
from p2pcold.swarm.moshpit import MoshpitPlan
from p2pcold.swarm.reachability import Mode, join_swarm
from p2pcold.swarm.validation import run_record_validators
from p2pcold.utils import P2PColdError, get_logger, state_dict_hash

log = get_logger("peer")


class SwarmPeer:
    """setup() -> train() -> cleanup(); `iteration` / `base` (θ_i) live in `state` (a RunState)."""

    centralized = False  # fuses through a Repository (the fusion options it can run differ)

    def __init__(
        self,
        config: RunConfig,
        dataset: str | DatasetSpec,
        initial_peers: list[str],
        run_dir: str | Path,
        device: str | None = None,
        show_progress: bool = False,
        secret: RunSecret | None = None,
        log_dir: str | Path | None = None,
    ):
        self.config = config
        self.dataset = dataset
        self.initial_peers = list(initial_peers)
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device)
        self.show_progress = show_progress
        self.secret = secret  # the run secret of a private swarm; None: an open swarm
        self.scalars = ScalarLog(log_dir)
        self.state: RunState | None = None
        self.dht = self.averager = self.tracker = None
        self.name = dataset.name if isinstance(dataset, DatasetSpec) else Path(dataset).stem
        self.peer_id = ""
        self.mode = Mode.PUBLIC
        self._dev_accuracy: Future | None = None  # of the last finetuning; measured during the boundary

    @property
    def iteration(self) -> int:
        return 0 if self.state is None else self.state.iteration

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        if config.finetune.num_threads:
            torch.set_num_threads(config.finetune.num_threads)
        # Local work first: a bad recipe, model or run folder fails before anything touches the network.
        self.state = RunState(config, self.run_dir, keep_last=config.keep_checkpoints)
        self.state.refuse_in_swarm(self.centralized)
        spec = load_dataset_spec(self.dataset)
        self.contributor = Contributor(spec, self.state.tokenizer, config.finetune, config.seed)
        self.name = spec.name
        self.state.resume()
        self.contributor.head_state = self.state.heads.get(self.name)

        swarm = config.swarm
        validators = run_record_validators(config.run_id, config.iterations)
        self.dht, self.mode = join_swarm(swarm, self.initial_peers, secret=self.secret, record_validators=validators)
        self.peer_id = peer_id(self.dht)
        identity = RunIdentity.for_body(config.run_id, config.model, self.state.theta0, run_contract(config))
        join_run(self.dht, config.run_id, identity, swarm)
        self.tracker = SwarmTracker(self.dht, config.run_id, swarm, iterations=config.iterations, assignment_writers=self._assignment_writers())
        self._refuse_a_second_peer_on_this_dataset()
        # only a peer that was let in is listed in the run's progress (and waited for at boundaries)
        self.tracker.start_publishing(PeerProgress(self.peer_id, self.name, self.iteration, Phase.JOINING, mode=self.mode, body_hash=state_dict_hash(self.state.base)))
        self.averager = BodyAverager(
            self.dht, config.run_id, self.state.theta0, swarm, reference=self.state.theta0, secret=self.secret, aggregation=config.aggregation
        )
        self._load_start_state()
        log.info("peer %s (%s) starts at iteration %d", self.peer_id, self.name, self.iteration)

    def _assignment_writers(self) -> list[str] | None:
        """Whose assignments count (None: nobody writes any in this protocol)."""
        return None

    def _refuse_a_second_peer_on_this_dataset(self) -> None:
        """Two live peers on one dataset would fuse it twice. A record of this dataset left by a peer
        that died (e.g. this one, before a restart) is never re-published: waiting one re-publication
        period (a third of progress_ttl) tells the two apart."""
        swarm = self.config.swarm
        snapshot = self.tracker.wait_for_update(swarm.dht_request_timeout)
        first_seen = {p.peer_id: p.last_seen for p in snapshot.records if p.dataset == self.name}
        deadline = time.monotonic() + swarm.progress_ttl / 3 + 2 * swarm.poll_interval + swarm.dht_request_timeout
        while any(p.dataset == self.name for p in snapshot.records) and time.monotonic() < deadline:
            live = duplicate_dataset_peers(snapshot.records, self.name, first_seen)
            if live:
                raise P2PColdError(
                    f"dataset {self.name} already has a live peer in run {self.config.run_id!r} ({live[0]}); "
                    "give each peer its own dataset, or split it into shards (NAME@INDEX/COUNT)"
                )
            snapshot = self.tracker.wait_for_update(swarm.poll_interval)

    # ------------------------------------------------------------------ train (train() and _load_start_state() are each protocol's)

    def _finetune(self) -> Contribution:
        """Finetune θ_i. With `overlap_boundary`, the previous checkpoint was written meanwhile, and the dev
        accuracy is measured while the boundary runs (`_record_dev_accuracy` after it)."""
        overlap = self.config.swarm.overlap_boundary
        self.tracker.update(phase=Phase.FINETUNING, iteration=self.iteration)
        contribution = self.contributor.contribute(
            self.state.body, self.state.base, self.iteration, self.device, self.show_progress, evaluate_dev=not overlap
        )
        self.state.wait_for_checkpoint()  # a checkpoint overlaps training only, never a boundary
        r = contribution.result
        self.tracker.update(train_loss=r.train_loss, examples_per_second=r.examples_per_second, trained_iteration=self.iteration)
        for tag, value in (("loss", r.train_loss), ("examples_per_second", r.examples_per_second)):
            self.scalars.add(f"{self.name}/{tag}", value, self.iteration)
        log.info(
            "iteration %d: finetuned %s, loss %.4f, %d examples at %.1f ex/s",
            self.iteration, self.name, r.train_loss, r.examples, r.examples_per_second,
        )  # fmt: skip
        self._dev_accuracy = _in_daemon_thread(self.contributor.dev_accuracy) if overlap else _resolved(r.dev_accuracy)
        return contribution

    def _record_dev_accuracy(self, trained: int) -> None:
        """Publish the dev accuracy of iteration `trained`'s finetuning; waits for it when it is still measured."""
        future, self._dev_accuracy = self._dev_accuracy, None
        if future is None:
            return
        accuracy = future.result()
        self.tracker.update(dev_accuracy=accuracy)
        self.scalars.add(f"{self.name}/dev_accuracy", accuracy, trained)
        log.info("iteration %d: dev acc %s", trained, "-" if accuracy is None else f"{accuracy:.4f}")

    def _weight(self, contribution: Contribution) -> float:
        return float(contribution.result.examples) if self.config.fusion_weighting == "examples" else 1.0

    def _fuse(self, contribution: Contribution, deadline_s: float, abort=None, plan: MoshpitPlan | None = None, expected_size: int | None = None) -> FusionResult:
        self.tracker.update(phase=Phase.AVERAGING)
        metadata = {"dataset": self.name, "examples": contribution.result.examples}
        # share_result=False: the caller decides what this peer serves, and under which iteration.
        body = self.state.contribution(contribution.body, self.name)  # the merge method's part at the contributor
        reference = fuse_reference(self.config.swarm.compression, self.state.base)
        options = dict(share_result=False, abort=abort, plan=plan, expected_size=expected_size, reference=reference)
        return self.averager.fuse(body, self.iteration, self._weight(contribution), deadline_s, metadata, **options)

    def _log_boundary(self, produced: int, group_size: int, seconds: float) -> None:
        """The boundary that produced θ_`produced`: its time and group, in the record and the event files."""
        self.tracker.update(fusion_seconds=seconds)
        self.scalars.add(f"{self.name}/fusion_seconds", seconds, produced)
        self.scalars.add(f"{self.name}/group_size", group_size, produced)
        self.scalars.flush()

    # ------------------------------------------------------------------ checkpoint and cleanup

    def save_checkpoint(self, fusion: dict | None = None) -> Path:
        heads = {self.name: self.contributor.head_state} if self.contributor.head_state is not None else None
        extra = {"dataset": self.name, "peer_id": self.peer_id, "fusion": fusion}
        return self.state.save_checkpoint(heads, extra, background=self.config.swarm.overlap_boundary)  # written while the next iteration trains

    def cleanup(self) -> None:
        """Bounded: stops the tracker's thread, the averager, the DHT node and its p2pd daemon, then finishes
        the checkpoint being written (last: a failed write is raised once everything else has stopped)."""
        timeout = self.config.swarm.shutdown_timeout
        self.scalars.close()
        if self.tracker is not None:
            self.tracker.close(timeout)
        if self.averager is not None:
            self.averager.shutdown(stop_dht=False)
        if self.dht is not None:
            stop_dht(self.dht, grace_s=timeout)
        if self.state is not None:
            self.state.close()


def _resolved(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _in_daemon_thread(work: Callable[[], Any]) -> Future:
    """`work()` in a daemon thread: it only reads, so a stopping peer never waits for it."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as e:  # handed to whoever waits for the result
            future.set_exception(e)

    threading.Thread(target=run, name="dev-evaluation", daemon=True).start()
    return future
