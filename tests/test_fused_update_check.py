"""Issue 27: a member accepts a fused body only when no tensor moved more than `aggregation.max_update_ratio`
times its own update (fusion.overshoot), on plain tensors; and the decentralized peer's boundary counts a
refused body as a failed fusion (its averager and records scripted here, no network)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from p2pcold import testing
from p2pcold.config import AggregationConfig, ConfigError, RunConfig, SwarmConfig, run_contract
from p2pcold.fusion import ROUNDING, aggregate, overshoot
from p2pcold.peer import DecentralizedPeer
from p2pcold.swarm import FusionResult, FusionStatus, GroupMember, PeerProgress, Phase, SwarmSnapshot

SHAPES = {"encoder.weight": (64, 32), "encoder.bias": (32,), "embeddings.weight": (50, 16)}
LIMIT = 3.0  # c for members with equal budgets


def base_body(iteration: int = 0) -> dict[str, torch.Tensor]:
    """θ_i: the part every member's body shares (testing.member_body without its own finetuning)."""
    return testing.member_body(SHAPES, 0, iteration, spread=0.0)


def honest(seed: int, iteration: int = 0) -> dict[str, torch.Tensor]:
    return testing.member_body(SHAPES, seed, iteration)


def fused_with(own: dict, others: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    """A group's body: the run's default rule over this member's and the others' contributions."""
    return aggregate([own, *(body for body, _ in others)], [1.0, *(weight for _, weight in others)])


def test_the_default_ratio_is_30_and_not_part_of_the_run_contract():
    assert AggregationConfig().max_update_ratio == 30.0
    with pytest.raises(ConfigError):
        AggregationConfig(max_update_ratio=0.5)
    strict = RunConfig(aggregation=AggregationConfig(max_update_ratio=1.5))
    assert run_contract(strict) == run_contract(RunConfig())  # what one member accepts is its own decision


@pytest.mark.parametrize("group", [2, 3, 4, 8])
def test_an_honest_group_is_accepted_by_every_member(group):
    bodies = [honest(seed) for seed in range(1, group + 1)]
    fused = aggregate(bodies)
    for own in bodies:
        assert overshoot(fused, own, base_body(), LIMIT) is None


def test_a_member_with_a_larger_budget_is_accepted_up_to_the_ratio():
    """An honest mean moves a tensor at most as far as the largest update in it: a partner whose update is
    4 times ours gives a mean at about 2.1 times ours (independent directions), 8 times about 4.1."""
    base, own = base_body(), honest(1)

    def scaled(factor: float) -> dict[str, torch.Tensor]:
        return {name: base[name] + factor * (value - base[name]) for name, value in honest(2).items()}

    assert overshoot(aggregate([own, scaled(4.0)]), own, base, LIMIT) is None
    refused = overshoot(aggregate([own, scaled(8.0)]), own, base, LIMIT)
    assert refused is not None and 3.5 < refused.ratio < 4.5


@pytest.mark.parametrize("attack", ["times_1e3", "noise", "target"])
@pytest.mark.parametrize("group", [2, 3])
def test_a_rogue_in_a_small_group_is_refused(attack, group):
    """Groups of 2 and 3 fuse with the mean (weights capped at 4 x the median): each attack of issue 8's
    table moves the mean far beyond any member's own update, in every tensor."""
    own = honest(1)
    others = [(honest(seed), 1.0) for seed in range(2, group)]
    rogue = testing.contribution(attack, honest(99), seed=99)
    refused = overshoot(fused_with(own, [*others, rogue]), own, base_body(), LIMIT)
    assert refused is not None and refused.tensor in SHAPES and refused.ratio > 10 * LIMIT
    default = AggregationConfig().max_update_ratio
    assert overshoot(fused_with(own, [*others, rogue]), own, base_body(), default) is not None


def test_a_chosen_body_moves_each_tensor_at_most_the_ratio_times_our_own_update():
    """What the check still lets a rogue do: pick any body whose mean with ours stays within the bound."""
    base, own = base_body(), honest(1)
    for factor, accepted in ((2.9, True), (3.1, False)):
        # the mean of ours and the rogue's is base + factor x our update
        target = {name: base[name] + factor * (value - base[name]) for name, value in own.items()}
        rogue = {name: 2 * target[name] - own[name] for name in own}
        assert (overshoot(aggregate([own, rogue]), own, base, LIMIT) is None) is accepted


def test_a_tensor_this_member_barely_moved_may_move_like_a_typical_one():
    """Its yardstick is what its values would have moved at this member's average rate (0.01 per value)."""
    base, own = base_body(), honest(1)
    own["encoder.bias"] = base["encoder.bias"].clone()  # e.g. a bias that only Adam's noise reaches
    partner = honest(2)  # moves it 0.01 per value, as everything else: the mean moves it 0.005 per value
    assert overshoot(aggregate([own, partner]), own, base, LIMIT) is None
    partner["encoder.bias"] = base["encoder.bias"] + 0.08  # the mean: 0.04 per value, 4 times the rate
    refused = overshoot(aggregate([own, partner]), own, base, LIMIT)
    assert refused is not None and refused.tensor == "encoder.bias"
    assert refused.ratio == pytest.approx(4.0, rel=0.02)


def test_a_member_that_moved_nothing_accepts_no_update():
    base = base_body()
    refused = overshoot(aggregate([base, honest(2)]), base, base, LIMIT)
    assert refused is not None and refused.ratio == math.inf


def test_rounding_is_not_an_update_and_nan_is_always_refused():
    base = base_body()
    own = {name: value.clone() for name, value in base.items()}  # this member moved nothing
    rounded = {name: (value.double() * (1 + ROUNDING / 4)).float() for name, value in base.items()}
    assert overshoot(rounded, own, base, LIMIT) is None
    poisoned = aggregate([honest(1), honest(2)])
    poisoned["encoder.weight"] = torch.full(SHAPES["encoder.weight"], float("nan"))
    refused = overshoot(poisoned, honest(1), base, LIMIT)
    assert refused is not None and refused.tensor == "encoder.weight" and refused.ratio == math.inf


def test_the_allowance_covers_wire_noise_and_integer_tensors_are_not_updates():
    base, own = base_body(), honest(1)
    # e.g. 8-bit compression
    noisy = {name: value + 0.05 for name, value in aggregate([own, honest(2)]).items()}
    assert overshoot(noisy, own, base, LIMIT) is not None
    allowance = {name: 0.05 * math.sqrt(value.numel()) * 1.01 for name, value in base.items()}
    assert overshoot(noisy, own, base, LIMIT, allowance) is None
    ids = {"position_ids": torch.arange(8)}
    assert overshoot({**noisy, **ids}, {**own, **ids}, {**base, **ids}, LIMIT, allowance) is None


# --------------------------------------------------------------------------- the peer's boundary


class ScriptedAverager:
    """Hands out the scripted FusionResults in turn, then the last one again, as BodyAverager.fuse would."""

    def __init__(self, outcomes: list[FusionResult]):
        self.outcomes = list(outcomes)
        self.calls = 0

    def fuse(self, body, iteration, weight, deadline_s, metadata, share_result, abort, plan, expected_size, reference):
        self.calls += 1
        time.sleep(0.05)
        return self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]  # the last one for ever


class StaticTracker:
    """One partner at the boundary of iteration 0; each read is a new snapshot."""

    def __init__(self):
        self.partner = PeerProgress("QmPartner", "partner", 0, Phase.AVERAGING)
        self.progress = SimpleNamespace(last_fusion=None)

    def snapshot(self) -> SwarmSnapshot:
        return SwarmSnapshot(peers=(self.partner,), records=(self.partner,))

    def wait_for_update(self, timeout: float) -> SwarmSnapshot:
        time.sleep(min(timeout, 0.01))
        return self.snapshot()

    def update(self, **fields) -> None:
        pass

    def refresh_soon(self) -> None:
        pass


def boundary_peer(outcomes: list[FusionResult], own: dict, tmp_path) -> tuple[DecentralizedPeer, list]:
    swarm = SwarmConfig(matchmaking_time=0.2, request_timeout=0.1, boundary_deadline=2.0, poll_interval=0.01)
    config = RunConfig(swarm=swarm, aggregation=AggregationConfig(max_update_ratio=LIMIT))
    peer = DecentralizedPeer(config, "mine", [], tmp_path)
    base = base_body()
    # the paper's fusion options: what a member sends is its body, θ_{i+1} the group's average itself
    peer.state = SimpleNamespace(
        iteration=0, base=base, theta0=base, contribution=lambda body, name: body, step=lambda mean, k: mean
    )
    peer.tracker, peer.averager = StaticTracker(), ScriptedAverager(outcomes)
    finished: list = []
    peer._finish_boundary = lambda body, record, *rest: finished.append((body, record))
    return peer, finished


def fused_result(averaged: dict) -> FusionResult:
    members = {p: GroupMember(p, 1.0, {"dataset": p}) for p in ("QmMine", "QmPartner")}
    return FusionResult(FusionStatus.OK, 0, averaged, group_size=2, members=members, attempts=1)


def test_the_peer_refuses_a_poisoned_body_and_fuses_at_the_retry(tmp_path, caplog):
    own, partner = honest(1), honest(2)
    poisoned = fused_with(own, [testing.contribution("times_1e3", partner, seed=2)])
    clean = aggregate([own, partner])
    peer, finished = boundary_peer([fused_result(poisoned), fused_result(clean)], own, tmp_path)
    peer._boundary(SimpleNamespace(body=own, result=SimpleNamespace(examples=10)))
    assert peer.averager.calls == 2
    [(body, record)] = finished
    assert body is clean
    assert record == {"status": "ok", "members": ["QmMine", "QmPartner"], "attempts": 2, "failure": None}
    refused = [line for line in caplog.messages if "refused the body of a group of 2" in line]
    assert len(refused) == 1 and "no fusion (refused the body of a group of 2: it moved encoder" in refused[0]
    assert "times as far as our own update of it (at most 3)" in refused[0]


def test_a_body_refused_until_the_deadline_leaves_the_peer_its_own_update(tmp_path):
    own, partner = honest(1), honest(2)
    poisoned = fused_with(own, [testing.contribution("noise", partner, seed=2)])
    peer, finished = boundary_peer([fused_result(poisoned)], own, tmp_path)
    peer._boundary(SimpleNamespace(body=own, result=SimpleNamespace(examples=10)))
    [(body, record)] = finished
    assert body is own  # θ_{i+1} = its own update (the paper's step of a group of one)
    assert record["status"] == "failed" and record["members"] == ["mine"] and record["attempts"] >= 3
    assert record["failure"].startswith("refused the body of a group of 2: it moved ")
