"""Finding a group at a boundary and fusing with it: attempts, retries, and Moshpit rounds.

`GroupFusion` drives the averager process (`swarm_averager._SwarmAverager`) for `BodyAverager.fuse`:
an attempt is one matchmaking + all-reduce round under one group key; a failed group retries with the
same body until the deadline (every member saw the failure, through the verdicts, and retries too);
a boundary larger than one group fuses in Moshpit rounds (`moshpit.py`), each cell of the grid under
its own group bits, every round weighted by what the previous one fused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Mapping

import torch
from hivemind.averaging.control import StepControl
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.serializer import MSGPackSerializer

from p2pcold.config import SwarmConfig
from p2pcold.swarm.body_tensors import SharedTensors
from p2pcold.swarm.fusion_result import FusionResult, FusionStatus, GroupMember
from p2pcold.swarm.group_key import iteration_group_bits
from p2pcold.swarm.moshpit import MoshpitPlan, round_group_bits
from p2pcold.swarm.swarm_averager import _SwarmAverager, ensure_running
from p2pcold.swarm.verdicts import group_step_timeout_s
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

GATHER_VERSION = 1  # the "v" of the metadata each member gathers to its group
_ABORTED = "stopped looking for a group: the caller's abort check fired"

Body = Mapping[str, torch.Tensor]


def gather_metadata(iteration: int, weight: float, metadata: Mapping[str, Any] | None) -> dict:
    """What this member tells its group (hivemind's `gather`); P2PColdError unless msgpack can send it."""
    gather = {
        "v": GATHER_VERSION, "iteration": iteration, "weight": float(weight), "metadata": dict(metadata or {})
    }
    try:
        MSGPackSerializer.dumps(gather)
    except Exception as e:
        raise P2PColdError(f"swarm: fusion metadata is not serializable with msgpack ({e})") from None
    return gather


def cancel_step(control: StepControl) -> None:
    """Cancel a step so that its matchmaking stops. hivemind's `StepControl.cancel()` wakes the averager
    (its cancel future) before it marks the step cancelled; a step woken in between finds it not
    cancelled and looks on, under whatever key is current, until its deadline."""
    MPFuture.cancel(control)  # the shared state first: hivemind's check reads it
    control.cancel()


def contributors(gathered: Mapping, direct: dict[str, GroupMember]) -> dict[str, GroupMember]:
    """Everyone whose body a group's result holds: its members, and in Moshpit rounds whoever each
    member had folded in before (the "folded" list it gathered: peer id, its own weight, metadata)."""
    everyone: dict[str, GroupMember] = {}
    for info in gathered.values():
        for entry in info.get("folded") or ():
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                continue
            peer, weight, metadata = entry
            if isinstance(peer, str) and isinstance(metadata, dict) and isinstance(weight, (int, float)):
                everyone.setdefault(peer, GroupMember(peer, float(weight), dict(metadata)))
    for peer, member in direct.items():
        everyone.setdefault(peer, member)
    return everyone


class GroupFusion:
    """Matchmaking and all-reduce attempts of one averager, with `tensors` as its shared memory."""

    def __init__(self, config: SwarmConfig, averager: _SwarmAverager, tensors: SharedTensors, peer_id: str):
        self.config, self.averager, self.tensors, self.peer_id = config, averager, tensors, peer_id

    def fuse(
        self,
        body: Body,
        iteration: int,
        weight: float,
        gather: dict,
        end: float,
        abort: Callable[[], bool] | None,
        plan: MoshpitPlan | None,
        expected_size: int | None,
    ) -> FusionResult:
        """One group under the iteration's key, or Moshpit rounds with a `plan` of several."""
        if plan is None or plan.single_group:
            bits = iteration_group_bits(iteration)
            return self.group(body, iteration, bits, weight, gather, end, abort, expected_size=expected_size)
        return self.rounds(body, iteration, weight, gather, end, abort, plan)

    def rounds(self, body, iteration, weight, gather, end, abort, plan: MoshpitPlan) -> FusionResult:
        """Moshpit rounds: round r fuses the body of round r-1 in this peer's cell of round r, weighted by
        the total weight its previous group fused, so that a full grid ends with the weighted global mean.
        Each round has an equal share of the time left. A round that finds no group or fails keeps the
        current body and weight for the next one: a lost member costs its group's round only."""
        current, current_weight = body, weight
        # whose bodies `current` holds
        members = {self.peer_id: GroupMember(self.peer_id, weight, gather["metadata"])}
        attempts, outcomes, fused, status, reason = 0, [], False, FusionStatus.NO_GROUP, ""
        for group in plan.rounds:
            if len(group.members) < 2:
                outcomes.append("alone")
                continue
            now = time.monotonic()
            round_end = now + (end - now) / (len(plan.rounds) - group.index)
            if round_end - now <= self.config.matchmaking_time + 0.1:
                outcomes.append(FusionStatus.NO_GROUP.value)
                reason = f"no time left for round {group.index}"
                continue
            # "folded": who this member's body already holds, so that the last round knows everyone who fused
            folded = [[m.peer_id, m.weight, m.metadata] for m in members.values()]
            round_gather = {**gather, "weight": current_weight, "round": group.index, "folded": folded}
            bits = round_group_bits(iteration_group_bits(iteration), plan, group.index)
            # once this peer fused in a round, others that finish their last round before it are the rounds'
            # normal course, not a swarm that left the boundary: `abort` is for a peer that fused nowhere yet
            round_abort = None if fused else abort
            cell = len(group.members)
            result = self.group(
                current, iteration, bits, current_weight, round_gather, round_end, round_abort, cell_size=cell
            )
            attempts += result.attempts
            outcomes.append(result.status.value)
            if result.ok:
                current, current_weight, fused = result.averaged, result.total_weight, True
                members.update(result.members)
                continue
            reason = f"round {group.index}: {result.reason}"
            if result.status is FusionStatus.ABORTED:
                status = FusionStatus.ABORTED
                break
            if result.status is FusionStatus.FAILED:
                status = FusionStatus.FAILED
            logger.warning(
                "fusion at iteration %d: %s; the next round goes on with this peer's current body",
                iteration,
                reason,
            )
        if not fused:
            return FusionResult(
                status=status, iteration=iteration, averaged=None, attempts=attempts, reason=reason,
                rounds=outcomes,
            )
        return FusionResult(
            status=FusionStatus.OK,
            iteration=iteration,
            averaged=dict(current),
            group_size=len(members),
            members=members,
            total_weight=current_weight,
            attempts=attempts,
            reason=reason,
            rounds=outcomes,
        )

    def group(
        self,
        body,
        iteration,
        bits,
        weight,
        gather,
        end,
        abort,
        cell_size: int | None = None,
        expected_size: int | None = None,
    ) -> FusionResult:
        """Fuse with the group under `bits` until `end`, retrying a failed group with the same body.

        `cell_size`: a Moshpit cell's members. For the first half of the time left only the whole cell
        assembles: a smaller group would be a split cell (two leaders, each with part of the members,
        both fusing a partial mean) as often as a cell with a lost member. After that, whoever of the
        cell is there (at least min_group_size) fuses. `expected_size`: see `BodyAverager.fuse`."""
        config = self.config
        attempts, status = 0, FusionStatus.NO_GROUP
        reason = "no other peer at this iteration before the deadline"
        whole_cell_until = None if cell_size is None else time.monotonic() + (end - time.monotonic()) / 2
        # an attempt needs at least one matchmaking window (hivemind asserts scheduled time < deadline)
        window = config.matchmaking_time + 0.1
        while end - time.monotonic() > window:
            attempts += 1
            whole_cell = whole_cell_until is not None and whole_cell_until - time.monotonic() > window
            if cell_size is not None:
                group = (cell_size, cell_size if whole_cell else min(config.min_group_size, cell_size))
            elif expected_size is not None:
                group = (max(expected_size, config.min_group_size), config.min_group_size)
            else:
                group = None
            attempt_end = whole_cell_until if whole_cell else end
            outcome = self.attempt(body, iteration, bits, weight, gather, attempt_end, abort, group)
            if isinstance(outcome, FusionResult):
                outcome.attempts = attempts
                return outcome
            began_allreduce, message = outcome
            reason = message
            if message is _ABORTED:
                status = FusionStatus.ABORTED
                break
            if not began_allreduce and "could not find a group" in message:
                if whole_cell:
                    continue  # not all of the cell came: from now on the members that did will do
                break  # the step already waited for a group until the (retry) deadline
            if began_allreduce:
                # Every member of the group saw this failure too (the verdicts): they all retry with
                # their same bodies until the deadline, so the retry keeps the whole remaining window.
                status = FusionStatus.FAILED
            logger.warning(
                "fusion at iteration %d, attempt %d failed: %s; retrying", iteration, attempts, message
            )
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        return FusionResult(
            status=status, iteration=iteration, averaged=None, attempts=attempts, reason=reason
        )

    def attempt(
        self, body, iteration, bits, weight, gather, end, abort=None, group=None
    ) -> FusionResult | tuple[bool, str]:
        """One matchmaking + all-reduce round: a FusionResult on success, else (began_allreduce, reason).
        `group`: (target, minimum) group size of a Moshpit cell; None: the config's."""
        config, averager = self.config, self.averager
        ensure_running(averager)
        if not self.tensors.write(body, averager.lock_averaged_tensors, end - time.monotonic()):
            return False, "the averaged tensors stayed locked by a previous all-reduce"
        target_size, min_size = (config.target_group_size, config.min_group_size) if group is None else group
        settle_s = max(0.0, min(config.local_rpc_timeout / 2, end - time.monotonic()))
        try:
            settling = averager.set_group(bits, target_size, min_size, settle_s)
            settled = settling.result(timeout=config.local_rpc_timeout)
        except TimeoutError:
            return False, f"the averager process did not answer within {config.local_rpc_timeout:.0f} s"
        if not settled:
            return False, f"a cancelled step's matchmaking was still running after {settle_s:.1f} s"
        remaining = end - time.monotonic()
        if remaining <= config.matchmaking_time + 0.05:  # hivemind asserts scheduled time < deadline
            return False, "could not find a group before the deadline"
        control = averager.step(
            gather=gather, weight=weight, timeout=remaining, allow_retries=False, wait=False
        )
        bound = remaining + group_step_timeout_s(config) + config.local_rpc_timeout
        give_up = time.monotonic() + bound
        try:
            while True:
                wait_s = max(0.0, give_up - time.monotonic())
                if abort is not None:
                    wait_s = min(wait_s, config.poll_interval)
                try:
                    gathered = control.result(timeout=wait_s)
                    break
                except TimeoutError:
                    if control.done():
                        raise  # the step itself failed with a TimeoutError
                    if time.monotonic() >= give_up:
                        cancel_step(control)
                        late = f"the averaging step did not finish within {bound:.0f} s"
                        return control.began_allreduce, late
                    looking = abort is not None and not control.began_allreduce
                    # began_allreduce is read again after abort(): the group may have assembled meanwhile
                    if looking and abort() and not control.began_allreduce:
                        cancel_step(control)
                        return False, _ABORTED
        except (Exception, asyncio.CancelledError) as e:
            # hivemind raises AllreduceException / MatchmakingException / TimeoutError, and CancelledError
            # (a BaseException) when the matchmaking of a step cancelled just before (an abort) is still
            # winding down as this one starts; each is one failed attempt, retried within the deadline.
            return control.began_allreduce, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return self._result(body, iteration, gathered)

    def _result(self, body, iteration, gathered) -> FusionResult | tuple[bool, str]:
        """The OK result of an all-reduce that every member called clean, or why its output is unusable."""
        members: dict[str, GroupMember] = {}
        for peer, info in (gathered or {}).items():
            if not isinstance(info, dict) or info.get("iteration") != iteration:
                return True, f"group member {peer} sent malformed metadata or another iteration: {info!r}"
            weight, metadata = float(info.get("weight", 0.0)), dict(info.get("metadata") or {})
            members[str(peer)] = GroupMember(str(peer), weight, metadata)
        total_weight = sum(member.weight for member in members.values())
        members = contributors(gathered, members)
        if total_weight <= 0:
            return True, "no member of the group contributed (all weights are 0)"
        averaged = self.tensors.read(self.averager.lock_averaged_tensors)
        if averaged is None:
            return True, "the averaged tensors stayed locked"
        if not all(bool(torch.isfinite(t).all()) for t in averaged.values()):
            return True, "the all-reduce produced non-finite values"
        return FusionResult(
            status=FusionStatus.OK,
            iteration=iteration,
            averaged={name: averaged[name] for name in body},  # the caller's name order
            group_size=len(members),
            members=members,
            total_weight=total_weight,
        )
