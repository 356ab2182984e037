"""The centralized peer (`--centralized`, the paper's §2.3 with a Repository; see repository.py).

each iteration i: wait for the Repository's assignment, download θ_i from it; if sampled, finetune,
report ready, wait for the Repository's go, then all-reduce with it (the Repository contributes
weight 0, so it receives exactly the contributors' average θ_{i+1}), retried until the deadline or
until the Repository has moved on. The Repository's word comes through the tracker's snapshot; when
it reports that an iteration's fusion failed for good, the peer stops with that one line.
"""

from __future__ import annotations

import time

import torch

from p2pcold.peer.base import SwarmPeer, log
from p2pcold.results import fusion_record
from p2pcold.swarm import FusionOutcome, FusionStatus, Phase
from p2pcold.swarm.boundary import repository_word
from p2pcold.swarm.records import maddr_peer_ids
from p2pcold.swarm.state_check import StateCheck
from p2pcold.utils import P2PColdError


class CentralizedPeer(SwarmPeer):
    centralized = True

    def _load_start_state(self) -> None:
        """θ_i comes from the Repository each iteration; only the Repository serves it."""

    def _assignment_writers(self) -> list[str]:
        """The Repository is the node this peer was pointed at: only its (signed) assignments count."""
        return maddr_peer_ids(self.initial_peers)

    def train(self) -> dict[str, torch.Tensor]:
        while self.iteration < self.config.iterations:
            self.run_iteration()
        self.state.wait_for_checkpoint()  # θ_N is on disk before the peer says it is done
        self.tracker.update(phase=Phase.DONE, iteration=self.iteration)
        log.info("peer %s done at iteration %d", self.peer_id, self.iteration)
        return self.state.base

    def _wait_for_assignment(self, iteration: int, field: str) -> dict:
        """The Repository's record for `iteration` once it has `field`; bounded by assignment_timeout."""
        swarm = self.config.swarm
        deadline = time.monotonic() + swarm.assignment_timeout
        while time.monotonic() < deadline:
            assignments = self.tracker.snapshot().assignments
            for i in range(iteration, iteration - 2, -1):  # the word about this iteration, or the fusion before it
                stopped = repository_word(assignments, i, "failure")
                if stopped is not None:
                    raise P2PColdError(f"the Repository stopped the run at iteration {i}: {stopped['failure']}")
            record = repository_word(assignments, iteration, field)
            if record is not None:
                return dict(record)
            self.tracker.wait_for_update(swarm.poll_interval)
        raise P2PColdError(f"no word from the Repository about iteration {iteration} within {swarm.assignment_timeout:.0f} s")

    def _download(self, iteration: int) -> tuple[int, dict[str, torch.Tensor]]:
        """θ_iteration (or newer) from the Repository; asked again until state_download_timeout, since the
        Repository's word about an iteration can reach this peer before its state announcement does."""
        swarm = self.config.swarm
        deadline = time.monotonic() + swarm.state_download_timeout
        while True:
            # bounded and finite, and from the Repository only (whose word is signed); no other donor counts
            check = StateCheck(iterations=self.config.iterations, at_least=iteration, only_from=frozenset(self._assignment_writers()))
            downloaded = self.averager.download_state(max(deadline - time.monotonic(), 1.0), check)
            if downloaded is not None and downloaded[0] >= iteration:
                return downloaded
            if time.monotonic() >= deadline:
                got = "nothing" if downloaded is None else f"θ_{downloaded[0]}"
                raise P2PColdError(f"could not download θ_{iteration} from the Repository within {swarm.state_download_timeout:.0f} s (got {got})")
            self.tracker.wait_for_update(swarm.poll_interval)

    def run_iteration(self) -> None:
        i = self.iteration
        self.tracker.update(phase=Phase.WAITING, iteration=i)
        assignment = self._wait_for_assignment(i, "contributors")
        downloaded = self._download(i)
        if downloaded[0] > i:  # the Repository is ahead (we restarted): catch up
            self.state.iteration, self.state.base = downloaded
            self.save_checkpoint(fusion_record(FusionOutcome.ADOPTED.value, [], 0, None))
            return
        self.state.base = downloaded[1]
        record = None
        if self.name in assignment["contributors"]:
            contribution = self._finetune()
            self.tracker.update(phase=Phase.READY, iteration=i)
            go = self._wait_for_assignment(i, "group")
            if self.name in go["group"]:
                record = self._fuse_with_repository(contribution, group_size=len(go["group"]) + 1)  # with the Repository
            self._record_dev_accuracy(i)
        # θ_{i+1} comes from the Repository at the start of the next iteration, for every peer alike.
        self.state.iteration = i + 1
        if self.iteration == self.config.iterations:
            self._wait_for_assignment(self.iteration, "contributors")  # the Repository has published θ_N
            final = self._download(self.iteration)
            if final[0] != self.iteration:
                raise P2PColdError(f"could not download the final θ_{self.iteration} from the Repository")
            self.state.base = final[1]
        self.save_checkpoint(record)

    def _fuse_with_repository(self, contribution, group_size: int) -> dict:
        """All-reduce with the Repository and the other contributors of this iteration, until the
        Repository says it holds θ_{i+1} (its word `fused`) or the deadline passes. An all-reduce can
        fail on the Repository's side only; this peer then joins its retry with the same body (the same
        inputs give the same mean), instead of moving on with a result the Repository never got."""
        swarm, i = self.config.swarm, self.iteration
        started = time.monotonic()
        end = started + swarm.boundary_deadline
        attempts, ok, reason = 0, None, ""

        def repository_has_it() -> bool:
            return repository_word(self.tracker.snapshot().assignments, i, "fused") is not None

        while not repository_has_it() and end - time.monotonic() > swarm.matchmaking_time + 1:
            fused = self._fuse(contribution, end - time.monotonic(), abort=repository_has_it, expected_size=group_size)
            attempts += fused.attempts
            if fused.ok:
                ok = fused
                # the Repository's word normally follows at once; without it, it failed on its side and retries
                window = time.monotonic() + swarm.matchmaking_time + 2 * swarm.next_chunk_timeout
                while not repository_has_it() and time.monotonic() < min(window, end):
                    self.tracker.wait_for_update(swarm.poll_interval)
            elif fused.status is not FusionStatus.ABORTED:
                reason = fused.reason
                log.warning("iteration %d: fusion with the Repository failed (%s)", i, fused.reason)
        word = repository_word(self.tracker.snapshot().assignments, i, "fused")
        if word is not None:
            members = sorted(word["fused"])
            self.tracker.update(last_group_size=len(members), last_fusion=FusionOutcome.OK, last_group=members, fusion_attempts=attempts, fusion_error=None)
            self._log_boundary(i + 1, len(members), time.monotonic() - started)
            return fusion_record(FusionOutcome.OK.value, members, attempts, None)
        reason = reason or ("the Repository did not confirm the fusion" if ok else "no fusion before the deadline")
        self.tracker.update(last_fusion=FusionOutcome.FAILED, last_group=[], fusion_attempts=attempts, fusion_error=reason)
        return fusion_record(FusionOutcome.FAILED.value, [], attempts, reason)
