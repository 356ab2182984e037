"""The paper's Repository (§2.3, §3.4), for exact reproduction: `p2pcold bootstrap --repository`.

It holds θ_i and does no training. Each iteration it samples k contributors (seeded, the same
draw as the reference run's) among the connected peers, publishes the assignment, waits (with a
deadline) until the sampled contributors report that they finished finetuning, tells exactly
those to fuse, and joins their all-reduce with weight 0: it receives their average, θ_{i+1},
checkpoints it and serves it to every peer for the next iteration.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from p2pcold.config import RunConfig, load_dataset_spec, run_contract
from p2pcold.fusion import sample_contributors
from p2pcold.results import fusion_record
from p2pcold.run_state import RunState
from p2pcold.swarm import BodyAverager, FusionResult, FusionStatus, RunIdentity, SwarmTracker, join_run
from p2pcold.swarm.auth import RunSecret
from p2pcold.swarm.boundary import connected_datasets, done_datasets, ready_contributors
from p2pcold.swarm.compression import fuse_reference
from p2pcold.utils import P2PColdError, get_logger

log = get_logger("repository")


class Repository:
    """setup() -> train() -> cleanup(); runs on a started DHT node (the bootstrap's)."""

    def __init__(self, config: RunConfig, dht, run_dir: str | Path, secret: RunSecret | None = None):
        self.config = config
        self.dht = dht
        self.run_dir = Path(run_dir)
        self.secret = secret  # the DHT node's run secret (a private swarm), for the averager
        self.swarm = config.swarm
        self.state: RunState | None = None
        self.averager = self.tracker = None
        self.participants: set[str] = set()  # datasets of the peers it sampled from

    @property
    def iteration(self) -> int:
        return 0 if self.state is None else self.state.iteration

    def setup(self) -> None:
        config = self.config
        # Peers report their recipe's name; the config may list recipes by name or by path.
        self.dataset_names = sorted(load_dataset_spec(name).name for name in config.datasets)
        self.state = RunState(config, self.run_dir)
        self.state.refuse_in_swarm(centralized=True)
        if self.state.resume() is not None:
            log.info("Repository resumed at iteration %d", self.iteration)
        theta0 = self.state.theta0
        join_run(self.dht, config.run_id, RunIdentity.for_body(config.run_id, config.model, theta0, run_contract(config)), self.swarm)
        self.tracker = SwarmTracker(self.dht, config.run_id, self.swarm, iterations=config.iterations)
        self.averager = BodyAverager(
            self.dht, config.run_id, theta0, self.swarm, reference=theta0, secret=self.secret, aggregation=config.aggregation
        )
        self.averager.set_shared_state(self.iteration, self.state.base)

    def _wait_for_peers(self) -> list[str]:
        deadline = time.monotonic() + self.swarm.peer_wait_timeout
        while True:
            live = connected_datasets(self.tracker.snapshot().peers, self.dataset_names)
            if live == self.dataset_names or time.monotonic() > deadline:
                break
            self.tracker.wait_for_update(self.swarm.poll_interval)
        if not live:
            raise P2PColdError(f"no peer of the run's datasets connected within {self.swarm.peer_wait_timeout:.0f} s")
        self.participants.update(live)
        if live != self.dataset_names:
            log.warning("sampling among the connected datasets only; missing: %s", ", ".join(sorted(set(self.dataset_names) - set(live))))
        return live

    def _wait_until_ready(self, iteration: int, contributors: list[str]) -> list[str]:
        deadline = time.monotonic() + self.swarm.contributor_deadline
        while True:
            ready = ready_contributors(iteration, self.tracker.snapshot().peers, contributors)
            if ready == contributors or time.monotonic() > deadline:
                return ready
            self.tracker.wait_for_update(self.swarm.poll_interval)

    def train(self) -> None:
        while self.iteration < self.config.iterations:
            self.run_iteration()
        self.tracker.publish_assignment(self.iteration, {"iteration": self.iteration, "contributors": [], "final": True})
        log.info("Repository: run complete at iteration %d; serving θ_%d until the peers have it", self.iteration, self.iteration)
        # every peer that took part must be seen done once: one DHT read may miss a record
        not_done = set(self.participants) | set(connected_datasets(self.tracker.snapshot().peers, self.dataset_names))
        deadline = time.monotonic() + self.swarm.peer_wait_timeout
        while not_done and time.monotonic() < deadline:
            not_done -= set(done_datasets(self.tracker.wait_for_update(self.swarm.poll_interval).peers))
        if not_done:
            log.warning("stopped serving θ_%d after %.0f s; not done: %s", self.iteration, self.swarm.peer_wait_timeout, ", ".join(sorted(not_done)))

    def run_iteration(self) -> None:
        i = self.iteration
        contributors = sample_contributors(self._wait_for_peers(), self.config.contributors_per_iteration, self.config.seed, i)
        self.tracker.publish_assignment(i, {"iteration": i, "contributors": contributors})
        log.info("iteration %d: contributors %s", i, ", ".join(contributors))
        ready = self._wait_until_ready(i, contributors)
        if ready != contributors:
            log.warning("iteration %d: %s missed the deadline", i, ", ".join(sorted(set(contributors) - set(ready))))
        self.tracker.publish_assignment(i, {"iteration": i, "contributors": contributors, "group": ready})
        fusion = self._fuse(i, contributors, ready) if ready else fusion_record("skipped", [], 0, "no contributor was ready")
        self.state.iteration = i + 1
        self.state.save_checkpoint(extra={"contributors": contributors, "fused": ready, "fusion": fusion})
        self.averager.set_shared_state(self.iteration, self.state.base)

    def _fuse(self, i: int, contributors: list[str], ready: list[str]) -> dict:
        """All-reduce with the ready contributors (weight 0: the Repository receives their average),
        retried with the same base until it succeeds or `boundary_deadline` passes. A fusion that still
        fails is an error unless `swarm.on_fusion_failure` is `skip` (then θ_{i+1} = θ_i)."""
        end = time.monotonic() + self.swarm.boundary_deadline
        attempts, fused, got = 0, None, []
        while end - time.monotonic() > self.swarm.matchmaking_time + 1:
            reference = fuse_reference(self.swarm.compression, self.state.base)
            fused = self.averager.fuse(
                self.state.base,
                i,
                0.0,
                end - time.monotonic(),
                {"dataset": "(repository)"},
                share_result=False,
                expected_size=len(ready) + 1,
                reference=reference,
            )
            attempts += fused.attempts
            got = contributing_datasets(fused)
            if fused.ok and got == ready:
                break
            if fused.ok:  # a group formed while a contributor was still busy (e.g. a failed member's timeout)
                fused = dataclasses.replace(fused, status=FusionStatus.FAILED, averaged=None, reason=f"fused {got}, not the expected {ready}")
            log.warning("iteration %d: fusion attempt failed (%s); retrying until the deadline", i, fused.reason)
        if fused is not None and fused.ok:
            self.state.base = self.state.step(fused.averaged, len(got))  # the merge's scale and the outer step
            # the contributors stop retrying once they read this
            self.tracker.publish_assignment(i, {"iteration": i, "contributors": contributors, "group": ready, "fused": got})
            return fusion_record("ok", got, attempts, None)
        reason = _failure(fused)
        if self.swarm.on_fusion_failure == "skip":
            log.warning("iteration %d: fusion failed after %d attempt(s) (%s); skipped: θ_%d = θ_%d", i, attempts, reason, i + 1, i)
            return fusion_record("failed", [], attempts, reason)
        message = f"iteration {i}: fusion failed after {attempts} attempt(s) within {self.swarm.boundary_deadline:.0f} s ({reason}); set swarm.on_fusion_failure: skip to go on without it"
        self.tracker.publish_assignment(i, {"iteration": i, "contributors": contributors, "group": ready, "failure": message})
        raise P2PColdError(message)

    def cleanup(self) -> None:
        if self.tracker is not None:
            self.tracker.close(self.swarm.shutdown_timeout)
        if self.averager is not None:
            self.averager.shutdown(stop_dht=False)


def contributing_datasets(fused: FusionResult) -> list[str]:
    """The datasets whose bodies a fusion averaged (the Repository itself joins with weight 0)."""
    return sorted(m.metadata.get("dataset", "?") for m in fused.members.values() if m.weight > 0)


def _failure(fused: FusionResult | None) -> str:
    return "no time left for a fusion attempt" if fused is None else fused.reason or fused.status.value
