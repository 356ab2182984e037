"""The decentralized peer (the default; no Repository).

join: start a DHT node, agree on the run's identity (θ0 hash, fused schema, run contract), then start
      from the newest of: its own checkpoint, the swarm's current base (state download), θ0.
each iteration i:
    before finetuning: adopt the swarm's base when the swarm is ahead, or when this peer's last
        boundary left it with its own update while another peer of iteration i fused (boundary.decide_start)
    finetune θ_i on the local dataset (the same `Contributor` the reference run uses)
    at the boundary, until `boundary_deadline`, follow boundary.decide: wait for the peers still on
        their way, all-reduce with the peers at i (retried with the same bodies after a failure, or
        after a fused body this peer refuses: one that moved a tensor more than
        `aggregation.max_update_ratio` times its own update; in Moshpit rounds of `target_group_size`
        when they are more than that),
        adopt the swarm's newer base, or keep its own update (recorded: last_fusion failed / solo)
    θ_{i+1}: checkpoint (with what the boundary produced), serve it to late joiners
at the end: adopt a fused final base if this peer's last boundary did not fuse, then keep serving
    θ_N while a live peer still needs it (bounded by `boundary_deadline`).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from p2pcold.finetune import Contribution
from p2pcold.fusion import overshoot
from p2pcold.peer.base import SwarmPeer, log
from p2pcold.results import fusion_record
from p2pcold.swarm import FusionOutcome, FusionResult, FusionStatus, Phase
from p2pcold.swarm.compression import WIRE_ERROR_SHARE, fuse_reference
from p2pcold.swarm.boundary import Adopt, Fuse, Solo, Wait, a_record_holds, decide, decide_start, partners_at, peers_behind, stragglers, swarm_is_ahead, view_is_fresh, watchers_behind
from p2pcold.swarm.moshpit import MoshpitPlan, plan_rounds
from p2pcold.swarm.state_check import StateCheck, trusted_bodies
from p2pcold.utils import state_dict_hash


class DecentralizedPeer(SwarmPeer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_group: set[str] = set()  # peer ids of the others in the last group this peer fused with
        self.stragglers: frozenset[str] = frozenset()  # peer ids waited for in vain (boundary.stragglers)

    def _load_start_state(self) -> None:
        if self.initial_peers:
            self._adopt(self.iteration + 1)
        self.averager.set_shared_state(self.iteration, self.state.base)

    def _adopt(self, at_least: int, attempts: int = 0, failure: str | None = None) -> bool:
        """Download the swarm's newest base; adopt it when its iteration is `at_least` or more. `attempts`
        and `failure`: this boundary's own fusion attempts before it, kept in the record."""
        downloaded = self._download_trusted(at_least)
        if downloaded is None:
            return False
        log.info("downloaded the swarm's base of iteration %d (we were at %d)", downloaded[0], self.iteration)
        self.state.iteration, self.state.base = downloaded
        self.last_group = set()
        record = fusion_record(FusionOutcome.ADOPTED.value, [], attempts, failure)
        self.tracker.update(
            iteration=self.iteration, last_fusion=FusionOutcome.ADOPTED, last_group=[], fusion_attempts=attempts, fusion_error=failure,
            body_hash=state_dict_hash(self.state.base), last_group_peers=[],
        )  # fmt: skip
        self.averager.set_shared_state(self.iteration, self.state.base)
        self.save_checkpoint(record)
        return True

    def _download_trusted(self, at_least: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """A base of iteration `at_least` or newer that the swarm's records vouch for (state_check), asked
        again within state_download_timeout: a donor may serve a base newer than the records this peer
        has seen yet. The members of a group republish their records one poll apart: while a record
        says that a newer base exists but none vouches for it yet, this waits one re-publication period
        (progress_ttl / 3) at most."""
        swarm = self.config.swarm
        check = StateCheck(self.config.iterations, at_least, trusted=lambda: trusted_bodies(self.tracker.snapshot().records))
        started = time.monotonic()
        deadline = started + swarm.state_download_timeout
        while time.monotonic() < deadline:
            if check.worth_asking():
                self.tracker.update(phase=Phase.DOWNLOADING)
                downloaded = self.averager.download_state(max(deadline - time.monotonic(), 1.0), check)
                if downloaded is not None:
                    return downloaded
            elif time.monotonic() - started > swarm.progress_ttl / 3 or not a_record_holds(at_least, self.tracker.snapshot().records):
                return None
            self.tracker.wait_for_update(swarm.poll_interval)
        return None

    # ------------------------------------------------------------------ train

    def train(self) -> dict[str, torch.Tensor]:
        while self.iteration < self.config.iterations:
            self.run_iteration()
        self._converge()
        self.state.wait_for_checkpoint()  # θ_N is on disk before the peer says it is done
        self.tracker.update(phase=Phase.DONE, iteration=self.iteration)
        log.info("peer %s done at iteration %d", self.peer_id, self.iteration)
        self._serve_final_state()
        return self.state.base

    def run_iteration(self) -> None:
        if self._converge():
            return
        trained = self.iteration
        contribution = self._finetune()
        self._boundary(contribution)
        self._record_dev_accuracy(trained)

    def _converge(self) -> bool:
        """Before finetuning (and at the end of the run): adopt the swarm's base when decide_start says
        so; else serve this peer's own base. True when a base was adopted."""
        swarm = self.config.swarm
        wait_until = time.monotonic() + swarm.boundary_deadline / 2
        while True:
            decision = decide_start(self.iteration, self.tracker.snapshot().peers, self.tracker.progress.last_fusion, time.monotonic(), wait_until)
            if isinstance(decision, Wait):
                self.tracker.update(phase=Phase.AVERAGING)
                self.tracker.wait_for_update(swarm.poll_interval)
                continue
            if isinstance(decision, Adopt):
                same, own = decision.iteration == self.iteration, self.tracker.progress
                # the same iteration: it replaces our unfused θ_i, and its record keeps what our last boundary tried
                tried = (own.fusion_attempts, own.fusion_error) if same else (0, None)
                if self._adopt(self.iteration if same else self.iteration + 1, *tried):
                    if same:
                        log.warning("iteration %d: our last boundary did not fuse; %s", self.iteration, decision.reason)
                    return True
            break
        if self.averager.shared_iteration != self.iteration:  # our own update: served once nothing fused exists
            self.averager.set_shared_state(self.iteration, self.state.base)
        return False

    def _boundary(self, contribution: Contribution) -> None:
        """The boundary of this iteration, bounded by `boundary_deadline`. The wait for peers still
        finetuning takes at most half of it, so that two peers that arrive up to half a deadline apart
        still meet in matchmaking; a fusion must start at least one matchmaking window before the end."""
        swarm, i = self.config.swarm, self.iteration
        self.tracker.update(phase=Phase.AVERAGING)
        started = time.monotonic()
        end = started + swarm.boundary_deadline
        last_start = end - (swarm.matchmaking_time + 1)
        wait_until = end - max(swarm.boundary_deadline / 2, swarm.matchmaking_time + 1)
        attempts, failure, warned = 0, None, False
        view, view_since, view_read = (), started, None  # the partners last decided on, since when, and the read (snapshot) that showed them
        seen: set[str] = set()  # every partner seen at this boundary: one DHT read that misses a record does not shrink the group
        # A view must hold through a second read before the peer plans from it, and for a Moshpit grid
        # for a whole matchmaking window: a grid from a partial member list meets none of the others' cells.
        settle_s = swarm.matchmaking_time if swarm.target_group_size is not None else 0.0

        self.stragglers = stragglers(self.stragglers, (), self.tracker.snapshot().peers)  # forgive those who arrived since
        while True:
            snapshot = self.tracker.snapshot()
            peers = snapshot.peers
            decision = decide(i, peers, self.last_group, time.monotonic(), wait_until, last_start, self.stragglers)
            if isinstance(decision, Wait):
                self.tracker.wait_for_update(swarm.poll_interval)
                continue
            if isinstance(decision, Adopt):
                if self._adopt(i + 1, attempts, failure):
                    log.warning("iteration %d: the swarm had already left this boundary; took its newer base", i)
                    return
                decision = Solo(f"{decision.reason}, but nothing newer could be downloaded")
            if isinstance(decision, Fuse):
                now = time.monotonic()
                if decision.partners != view:
                    view, view_since, view_read = decision.partners, now, snapshot
                read_again = snapshot is not view_read  # each read is a new snapshot; a failed one keeps the last
                if view_is_fresh(view_since, now, settle_s, wait_until, read_again):
                    if not read_again:
                        self.tracker.refresh_soon()  # the second read need not wait for the next poll
                    self.tracker.wait_for_update(swarm.poll_interval)
                    continue
                seen.update(decision.partners)
                if decision.not_waited_for and not warned:
                    log.warning("iteration %d: not waiting any longer for %s", i, ", ".join(decision.not_waited_for))
                    warned = True
                    self.stragglers = stragglers(self.stragglers, decision.not_waited_for, peers)
                plan = self._moshpit_plan(decision.partners)
                if plan is not None:
                    log.info("iteration %d: %d rounds in groups of %d among %s", i, len(plan.rounds), plan.group_size, ", ".join(sorted({*decision.partners, self.name})))

                def abort(plan=plan) -> bool:
                    """Stop looking for a group once the swarm has left this boundary, or (before a round
                    fused) once the partners at it would give another plan: another member list is
                    another grid, whose keys meet none of the others' cells (a record that came late)."""
                    peers = self.tracker.snapshot().peers
                    return swarm_is_ahead(i, peers) or self._moshpit_plan(partners_at(i, peers)) != plan

                # one group: it assembles once everyone seen here is in, not when matchmaking_time runs out
                expected = len(seen) + 1 if plan is None else None
                fused = self._fuse(contribution, end - time.monotonic(), abort=abort, plan=plan, expected_size=expected)
                attempts += fused.attempts
                refusal = self._refusal(fused, contribution) if fused.ok else None
                if refusal is not None:  # a failed fusion: logged below, and retried like any other
                    reason = f"refused the body of a group of {fused.group_size}: {refusal}"
                    fused = dataclasses.replace(fused, status=FusionStatus.FAILED, averaged=None, reason=reason)
                if fused.ok:
                    members = sorted(m.metadata.get("dataset", "?") for m in fused.members.values())
                    rounds = f" in rounds {'/'.join(fused.rounds)}" if fused.rounds else ""
                    log.info("iteration %d: fused with a group of %d%s (%s)", i, fused.group_size, rounds, ", ".join(members))
                    self.last_group = set(fused.members) - {self.peer_id}
                    base = self.state.step(fused.averaged, fused.group_size)
                    self._finish_boundary(base, fusion_record(FusionOutcome.OK.value, members, attempts, None), fused.group_size, started, sorted(fused.members))
                    return
                if fused.status is not FusionStatus.ABORTED:  # stopping the search is not a failure
                    failure = fused.reason
                log.warning("iteration %d: no fusion (%s)", i, fused.reason)
                continue  # decide again: retry with the same bodies, adopt, or give up at the deadline
            outcome = FusionOutcome.FAILED if attempts else FusionOutcome.SOLO
            if outcome is FusionOutcome.FAILED:
                log.warning("iteration %d: fusion failed after %d attempt(s) (%s); keeping our own update for now", i, attempts, failure)
            else:
                log.warning("iteration %d: no peer at this iteration (%s); keeping our own update (a group of one)", i, decision.reason)
            self.last_group = set()
            own = self.state.step(self.state.contribution(contribution.body, self.name), 1)  # a group of one
            self._finish_boundary(own, fusion_record(outcome.value, [self.name], attempts, failure or decision.reason), 1, started)
            return

    def _refusal(self, fused: FusionResult, contribution: Contribution) -> str | None:
        """Why this peer refuses a group's fused body (one line), or None when it accepts it: no tensor
        may have moved more than `aggregation.max_update_ratio` times this peer's own update of it
        (fusion.overshoot), compared before the merge's scale and the outer step, which this peer applies
        to an accepted body exactly as to its own."""
        limit = self.config.aggregation.max_update_ratio
        own, compression = self.state.contribution(contribution.body, self.name), self.config.swarm.compression
        reference = fuse_reference(compression, self.state.base)  # the wire carried own − reference
        sent_from = self.state.theta0 if reference is None else reference
        share = WIRE_ERROR_SHARE[compression]
        allowance = {name: share * (own[name].double() - sent_from[name].double()).norm().item() for name in own}
        excess = overshoot(fused.averaged, own, self.state.base, limit, allowance)
        if excess is None:
            return None
        return f"it moved {excess.tensor} {excess.ratio:.3g} times as far as our own update of it (at most {limit:g})"

    def _moshpit_plan(self, partners: tuple[str, ...]) -> MoshpitPlan | None:
        """Moshpit rounds when the boundary's members (datasets: unique per peer, so every member sorts
        the same list) outnumber one group of `target_group_size`; None: one group of everyone."""
        group_size = self.config.swarm.target_group_size
        members = sorted({*partners, self.name})
        if group_size is None or len(members) <= group_size:
            return None
        return plan_rounds(members, self.name, group_size)

    def _finish_boundary(self, base: dict[str, torch.Tensor], record: dict, group_size: int, started: float, group_peers: list[str] = ()) -> None:
        """θ_{i+1} = `base`: published with what the boundary produced, checkpointed, and served when fused
        (an unfused base is served only once `_converge` found no fused one to adopt)."""
        self.state.iteration, self.state.base = self.iteration + 1, base
        self.tracker.update(
            iteration=self.iteration,
            body_hash=state_dict_hash(base),
            last_group_peers=list(group_peers),
            last_fusion=record["status"],
            last_group=record["members"],
            last_group_size=group_size,
            fusion_attempts=record["attempts"],
            fusion_error=record["failure"],
        )
        self._log_boundary(self.iteration, group_size, time.monotonic() - started)
        if record["status"] == FusionOutcome.OK.value:
            self.averager.set_shared_state(self.iteration, base)
        self.save_checkpoint(record)

    def _serve_final_state(self) -> None:
        """Keep serving θ_N while another live peer may still need it: a slow peer, or one whose last
        boundary did not fuse (it adopts the final base instead of ending the run with its own), but not a
        straggler that boundaries stopped waiting for (a ghost, a rogue's record); and while a monitor that
        evaluates the fused bases has not downloaded it (only a fused θ_N is served)."""
        swarm = self.config.swarm
        started = time.monotonic()
        behind: tuple[str, ...] = ()
        while time.monotonic() < started + swarm.boundary_deadline:
            snapshot = self.tracker.snapshot()
            behind = peers_behind(self.iteration, [p for p in snapshot.peers if p.peer_id not in self.stragglers])
            if self.averager.shared_iteration == self.iteration:
                behind += watchers_behind(self.iteration, snapshot.watchers)
            if not behind:
                if time.monotonic() - started > 2 * swarm.poll_interval:
                    log.info("served the final base for %.0f s until every live peer had it", time.monotonic() - started)
                return
            self.tracker.wait_for_update(swarm.poll_interval)
        log.warning("stopped serving the final base after %.0f s; still behind: %s", swarm.boundary_deadline, ", ".join(behind))
