"""A swarm peer: `p2pcold peer --dataset X`. One contributor of a CoLD Fusion run, over hivemind.

Decentralized (the default; no Repository):
    join: start a DHT node, agree on the run's identity (base model, θ0 hash, fused schema), then
          start from the newest of: its own checkpoint, the swarm's current base (state download), θ0.
    each iteration i:
        finetune θ_i on the local dataset (the same `Contributor` the reference run uses)
        wait (bounded) until every live peer at iteration i has finished finetuning too
        all-reduce-average the body with the peers at iteration i (the iteration is in the group key)
        θ_{i+1} = the average; checkpoint; serve it to late joiners
    no group by the deadline -> download a newer base if the swarm moved on, else keep its own
    (a group of one); a peer behind the swarm catches up by download before it trains, and stops
    waiting at a boundary as soon as it sees that the others have left it.

Centralized (`--centralized`, the paper's §2.3 with a Repository; see repository.py):
    each iteration i: wait for the Repository's assignment, download θ_i from it; if sampled,
    finetune, report ready, wait for the Repository's go, then all-reduce with it (the Repository
    contributes weight 0, so it receives exactly the contributors' average θ_{i+1}).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from p2pcold.config import RunConfig, load_dataset_spec
from p2pcold.finetune import Contribution, Contributor, resolve_device
from p2pcold.model import (
    CheckpointMeta,
    body_state,
    latest_checkpoint,
    load_body,
    load_body_state,
    load_heads,
    load_tokenizer,
    read_metadata,
    save_run_checkpoint,
)
from p2pcold.swarm import (
    BodyAverager,
    FusionStatus,
    PeerProgress,
    RunIdentity,
    join_run,
    peer_id,
    publish_progress,
    read_progress,
    start_dht,
    stop_dht,
)
from p2pcold.swarm.records import assignment_key, get_records
from p2pcold.utils import P2PColdError, get_logger, state_dict_hash

log = get_logger("peer")


class ProgressReporter:
    """Keeps this peer's progress record alive in the DHT: re-published every third of its TTL,
    and at once on every phase change, from a daemon thread."""

    def __init__(self, dht, run_id: str, progress: PeerProgress, ttl: float, timeout: float):
        self.dht, self.run_id, self.ttl, self.timeout = dht, run_id, ttl, timeout
        self.progress = progress
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="p2pcold-progress", daemon=True)
        self._thread.start()

    def update(self, **fields) -> None:
        self.progress = replace(self.progress, **fields)
        self._wake.set()

    def _publish(self) -> None:
        try:
            publish_progress(self.dht, self.run_id, self.progress, self.ttl, self.timeout)
        except Exception as e:  # a failed heartbeat must never kill the peer
            log.debug("progress not published: %s", e)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._publish()
            self._wake.wait(self.ttl / 3)
            self._wake.clear()
        self._publish()  # the last state once (e.g. phase `done`)

    def close(self, timeout: float) -> None:
        """Stop the thread once it has published the last state; bounded by `timeout`, and at once when
        the DHT process is gone (e.g. SIGTERM reached the whole process group): a store through a dead
        DHT would only wait for its own timeout."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline and self.dht.is_alive():
            self._thread.join(0.1)


class Peer:
    """setup() -> train() -> cleanup(). `base` is θ_i, the body this peer starts iteration i from."""

    def __init__(
        self,
        config: RunConfig,
        dataset: str,
        initial_peers: list[str],
        run_dir: str | Path,
        device: str | None = None,
        centralized: bool = False,
        show_progress: bool = False,
    ):
        self.config = config
        self.dataset = dataset
        self.initial_peers = list(initial_peers)
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device)
        self.centralized = centralized
        self.show_progress = show_progress
        self.iteration = 0
        self.dht = self.averager = self.reporter = None
        self.last_group: set[str] = set()  # peer ids of the others in the last group this peer fused with

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        if config.finetune.num_threads:
            torch.set_num_threads(config.finetune.num_threads)
        # Local work first: a bad recipe or model fails before anything touches the network.
        self.tokenizer = load_tokenizer(config.model)
        self.body = load_body(config.model, config.num_hidden_layers)
        self.theta0 = body_state(self.body)
        self.base_hash = state_dict_hash(self.theta0)
        spec = load_dataset_spec(self.dataset)
        self.contributor = Contributor(spec, self.tokenizer, config.finetune, config.seed)
        self.name = spec.name

        swarm = config.swarm
        self.dht = start_dht(swarm, self.initial_peers)
        self.peer_id = peer_id(self.dht)
        join_run(self.dht, config.run_id, RunIdentity.for_body(config.run_id, config.model, self.theta0), swarm)
        # only a peer that was let in is listed in the run's progress (and waited for at boundaries)
        self.reporter = ProgressReporter(
            self.dht, config.run_id, PeerProgress(self.peer_id, self.name, 0, "joining"), swarm.progress_ttl, swarm.dht_request_timeout
        )
        self.averager = BodyAverager(self.dht, config.run_id, self.theta0, swarm, reference=self.theta0)
        self._load_start_state()
        log.info("peer %s (%s) starts at iteration %d", self.peer_id, self.name, self.iteration)

    def _load_start_state(self) -> None:
        self.iteration, self.base = 0, self.theta0
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            meta = read_metadata(checkpoint)
            if meta.base_hash != self.base_hash or meta.run_id != self.config.run_id:
                raise P2PColdError(f"{checkpoint}: checkpoint belongs to another run or base model; use another --run-dir")
            self.iteration, self.base = meta.iteration, body_state(load_body(str(checkpoint)))
            head = load_heads(checkpoint).get(self.name)
            if head is not None:
                self.contributor.head_state = head
            log.info("resumed from %s at iteration %d", checkpoint, self.iteration)
        if self.initial_peers and not self.centralized:
            self._adopt_newer_state()
        if not self.centralized:  # with a Repository, only the Repository serves θ_i
            self.averager.set_shared_state(self.iteration, self.base)

    def _adopt_newer_state(self) -> bool:
        """Download the swarm's newest base; adopt it when it is ahead of ours."""
        self.reporter.update(phase="downloading")
        downloaded = self.averager.download_state()
        if downloaded is None or downloaded[0] <= self.iteration:
            return False
        log.info("downloaded the swarm's base of iteration %d (we were at %d)", downloaded[0], self.iteration)
        self.iteration, self.base = downloaded
        self.last_group = set()
        self.reporter.update(iteration=self.iteration)
        self.averager.set_shared_state(self.iteration, self.base)
        self.save_checkpoint()
        return True

    # ------------------------------------------------------------------ train

    def train(self) -> dict[str, torch.Tensor]:
        while self.iteration < self.config.iterations:
            if self.centralized:
                self.run_centralized_iteration()
            else:
                self.run_iteration()
        self.reporter.update(phase="done", iteration=self.iteration)
        log.info("peer %s done at iteration %d", self.peer_id, self.iteration)
        if not self.centralized:
            self._serve_final_state()
        return self.base

    def _serve_final_state(self) -> None:
        """Keep serving θ_N while another live peer is still behind: one whose last all-reduce failed on
        its side after ours succeeded, or a straggler, can then download the final body instead of
        ending the run with its own. Bounded by `boundary_deadline`."""
        swarm = self.config.swarm
        started = time.monotonic()
        behind: list[str] = []
        while time.monotonic() < started + swarm.boundary_deadline:
            behind = sorted(p.dataset for p in self._other_peers() if p.iteration < self.iteration and p.phase != "done")
            if not behind:
                if time.monotonic() - started > 2 * swarm.poll_interval:
                    log.info("served the final base for %.0f s until every live peer had it", time.monotonic() - started)
                return
            time.sleep(swarm.poll_interval)
        log.warning("stopped serving the final base after %.0f s; still behind: %s", swarm.boundary_deadline, ", ".join(behind))

    def _other_peers(self) -> list[PeerProgress]:
        """The live progress records of the other peers, newest per dataset (a restarted peer's previous
        record lives on until it expires), this peer's dataset excluded. Empty when the DHT is silent."""
        try:
            records = read_progress(self.dht, self.config.run_id, self.config.swarm.dht_request_timeout)
        except P2PColdError as e:
            log.warning("%s", e)
            return []
        newest: dict[str, PeerProgress] = {}
        for record in records:
            if record.dataset != self.name and (record.dataset not in newest or record.last_seen > newest[record.dataset].last_seen):
                newest[record.dataset] = record
        return list(newest.values())

    def _swarm_is_ahead(self) -> bool:
        return any(p.iteration > self.iteration for p in self._other_peers())

    def _wait_at_boundary(self, deadline: float) -> bool:
        """Wait until no live peer at this iteration is still finetuning (or joining), so that the group
        forms with everyone instead of whoever arrived first; bounded by `deadline` (monotonic).
        The members of this peer's last group count as on their way even while their records still show
        the previous iteration (a fast finetune can end before they have published the new one).
        Returns True when the swarm is already past this iteration (this peer is the straggler)."""
        poll = self.config.swarm.poll_interval
        while True:
            others = self._other_peers()
            if any(p.iteration > self.iteration for p in others):
                return True
            pending = sorted(
                p.dataset
                for p in others
                if (p.iteration == self.iteration and p.phase in ("joining", "downloading", "finetuning"))
                or (p.peer_id in self.last_group and p.iteration < self.iteration and p.phase != "done")
            )
            if not pending or time.monotonic() + poll > deadline:
                if pending:
                    log.warning("iteration %d: not waiting any longer for %s", self.iteration, ", ".join(pending))
                return False
            time.sleep(poll)

    def _finetune(self) -> Contribution:
        self.reporter.update(phase="finetuning", iteration=self.iteration)
        contribution = self.contributor.contribute(self.body, self.base, self.iteration, self.device, self.show_progress)
        r = contribution.result
        self.reporter.update(train_loss=r.train_loss, dev_accuracy=r.dev_accuracy, examples_per_second=r.examples_per_second)
        log.info(
            "iteration %d: finetuned %s, loss %.4f, dev acc %s, %d examples at %.1f ex/s",
            self.iteration, self.name, r.train_loss, "-" if r.dev_accuracy is None else f"{r.dev_accuracy:.4f}", r.examples, r.examples_per_second,
        )
        return contribution

    def _weight(self, contribution: Contribution) -> float:
        return float(contribution.result.examples) if self.config.fusion_weighting == "examples" else 1.0

    def _fuse(self, contribution: Contribution, deadline_s: float | None = None, abort=None):
        self.reporter.update(phase="averaging")
        metadata = {"dataset": self.name, "examples": contribution.result.examples}
        # share_result=False: this peer serves θ_{i+1} under its own iteration label, set by the caller.
        return self.averager.fuse(contribution.body, self.iteration, self._weight(contribution), deadline_s, metadata, share_result=False, abort=abort)

    def run_iteration(self) -> None:
        """One decentralized iteration: finetune, all-reduce at the boundary, checkpoint.

        The whole boundary (waiting for the others, then the all-reduce's matchmaking) is bounded by
        `boundary_deadline`; the wait for peers still finetuning takes at most half of it, so that two
        peers that arrive up to half a deadline apart still meet in matchmaking."""
        if self._swarm_is_ahead() and self._adopt_newer_state():
            return
        contribution = self._finetune()
        swarm, i = self.config.swarm, self.iteration
        self.reporter.update(phase="averaging")
        end = time.monotonic() + swarm.boundary_deadline
        if self._wait_at_boundary(end - max(swarm.boundary_deadline / 2, swarm.matchmaking_time + 1)) and self._adopt_newer_state():
            log.warning("iteration %d: the swarm had already left this boundary; took its newer base", i)
            return
        fused = self._fuse(contribution, max(end - time.monotonic(), swarm.matchmaking_time + 1), abort=self._swarm_is_ahead)
        if fused.status is FusionStatus.ABORTED:
            log.warning("iteration %d: the swarm moved on while we looked for a group", i)
            if self._adopt_newer_state():
                return
            if end - time.monotonic() > swarm.matchmaking_time + 1:  # nothing newer to download after all: try again
                fused = self._fuse(contribution, end - time.monotonic())
        if fused.ok:
            self.base = fused.averaged
            log.info("iteration %d: fused with a group of %d (%s)", self.iteration, fused.group_size, ", ".join(sorted(m.metadata.get("dataset", "?") for m in fused.members.values())))
            self.reporter.update(last_group_size=fused.group_size)
            self.last_group = set(fused.members) - {self.peer_id}
        else:
            log.warning("iteration %d: no fusion (%s)", self.iteration, fused.reason)
            if self._adopt_newer_state():
                return  # the swarm moved on: take its base rather than push a stale update
            log.warning("iteration %d: no peer at this iteration; keeping our own update (a group of one)", self.iteration)
            self.base = contribution.body
            self.reporter.update(last_group_size=1)
            self.last_group = set()
        self.iteration += 1
        self.averager.set_shared_state(self.iteration, self.base)
        self.save_checkpoint()

    # ------------------------------------------------------------------ centralized mode

    def _wait_for_assignment(self, iteration: int, field: str) -> dict:
        """Poll the Repository's record for `iteration` until it has `field`; bounded."""
        swarm = self.config.swarm
        deadline = time.monotonic() + swarm.assignment_timeout
        while time.monotonic() < deadline:
            record = get_records(self.dht, assignment_key(self.config.run_id), swarm.dht_request_timeout).get(str(iteration))
            if isinstance(record, dict) and field in record:
                return record
            time.sleep(swarm.poll_interval)
        raise P2PColdError(f"no word from the Repository about iteration {iteration} within {swarm.assignment_timeout:.0f} s")

    def run_centralized_iteration(self) -> None:
        i = self.iteration
        self.reporter.update(phase="waiting", iteration=i)
        assignment = self._wait_for_assignment(i, "contributors")
        downloaded = self.averager.download_state()
        if downloaded is None or downloaded[0] < i:
            raise P2PColdError(f"could not download θ_{i} from the Repository")
        if downloaded[0] > i:  # the Repository is ahead (we restarted): catch up
            self.iteration, self.base = downloaded
            self.save_checkpoint()
            return
        self.base = downloaded[1]
        if self.name in assignment["contributors"]:
            contribution = self._finetune()
            self.reporter.update(phase="ready", iteration=i)
            go = self._wait_for_assignment(i, "group")
            if self.name in go["group"]:
                fused = self._fuse(contribution, self.config.swarm.boundary_deadline)
                if fused.ok:
                    self.reporter.update(last_group_size=fused.group_size - 1)  # the Repository is not a contributor
                else:
                    log.warning("iteration %d: fusion with the Repository failed (%s)", i, fused.reason)
        # θ_{i+1} comes from the Repository at the start of the next iteration, for every peer alike.
        self.iteration = i + 1
        if self.iteration == self.config.iterations:
            self._wait_for_assignment(self.iteration, "contributors")  # the Repository has published θ_N
            final = self.averager.download_state()
            if final is None or final[0] != self.iteration:
                raise P2PColdError(f"could not download the final θ_{self.iteration} from the Repository")
            self.base = final[1]
        self.save_checkpoint()

    # ------------------------------------------------------------------ checkpoint and cleanup

    def save_checkpoint(self) -> Path:
        load_body_state(self.body, self.base)
        meta = CheckpointMeta(iteration=self.iteration, run_id=self.config.run_id, base_model=self.config.model, base_hash=self.base_hash, extra={"dataset": self.name, "peer_id": self.peer_id})
        heads = {self.name: self.contributor.head_state} if self.contributor.head_state is not None else None
        return save_run_checkpoint(self.run_dir, self.body, self.tokenizer, meta, heads, keep_last=self.config.keep_checkpoints)

    def cleanup(self) -> None:
        """Bounded: stops the progress thread, the averager, the DHT node and its p2pd daemon."""
        timeout = self.config.swarm.shutdown_timeout
        if self.reporter is not None:
            self.reporter.close(timeout)
        if self.averager is not None:
            self.averager.shutdown(stop_dht=False)
        if self.dht is not None:
            stop_dht(self.dht, grace_s=timeout)
