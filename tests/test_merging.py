"""The fusion options of p2pcold.merging, on plain tensors with hand-computed results."""

import pytest
import torch

from p2pcold.config import ConfigError, FusionConfig, RunConfig, run_contract
from p2pcold.fusion import average
from p2pcold.merging import (
    Merger,
    add_delta,
    backtrack_rejects,
    dare_drop,
    delta,
    mean_merge,
    outer_step,
    swarm_refusal,
    task_arithmetic,
    ties,
    trim,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(a, b):
    return torch.allclose(a.double(), b.double(), atol=1e-12)


D1, D2 = {"w": t(1, 2)}, {"w": t(3, 6)}


def test_delta_and_add_delta_copy_integer_buffers():
    base = {"w": torch.tensor([1.0, 2.0]), "ids": torch.tensor([0, 1])}
    body = {"w": torch.tensor([1.5, 1.0]), "ids": torch.tensor([0, 1])}
    d = delta(body, base)
    assert list(d) == ["w"] and close(d["w"], t(0.5, -1))
    back = add_delta(base, d, 2.0)
    assert back["w"].dtype == torch.float32 and close(back["w"], t(2, 0)) and torch.equal(back["ids"], base["ids"])


def test_mean_and_weighted_mean():
    assert close(mean_merge([D1, D2])["w"], t(2, 4))
    assert close(mean_merge([D1, D2], [1, 3])["w"], t(2.5, 5))  # 0.25·[1,2] + 0.75·[3,6]


def test_task_arithmetic_is_the_scaled_sum():
    assert close(task_arithmetic([D1, D2], scale=0.5)["w"], t(2, 4))  # 0.5·[4,8]
    assert close(task_arithmetic([D1, D2], [1, 3], scale=1.0)["w"], t(5, 10))  # 2·[2.5,5]


def test_trim_keeps_the_largest_magnitudes():
    assert close(trim(t(0.1, -3, 2, 0.5), 0.5), t(0, -3, 2, 0))
    assert close(trim(t(0.1, -3, 2, 0.5), 1.0), t(0.1, -3, 2, 0.5))
    assert close(trim(t(0.1, -3, 2, 0.5), 0.01), t(0, -3, 0, 0))  # at least one entry


def test_ties_elects_a_sign_and_averages_the_agreeing_entries():
    deltas = [{"w": t(1, -2, 3, 0.1)}, {"w": t(-4, 1, 2, 0.2)}, {"w": t(2, 1, -1, 0.3)}]
    # no trim: sums [-1, 0, 4, 0.6] elect [-, none, +, +]; means of the agreeing: [-4, 0, (3+2)/2, 0.2]
    assert close(ties(deltas, density=1.0)["w"], t(-4, 0, 2.5, 0.2))
    assert close(ties(deltas, density=1.0, scale=2.0)["w"], t(-8, 0, 5, 0.4))
    # density 0.5: trimmed [0,-2,3,0], [-4,0,2,0], [2,1.5,0,0]; sums [-2,-0.5,5,0]
    deltas[2] = {"w": t(2, 1.5, -1, 0.3)}
    assert close(ties(deltas, density=0.5)["w"], t(-4, -2, 2.5, 0))
    # weights: entry 2 agrees in the first two members, weights 1 and 3: (1·3 + 3·2)/4
    assert close(ties(deltas, [1, 3, 1], density=0.5)["w"][2], t(2.25)[0])


def test_dare_drops_and_rescales_with_a_seeded_mask():
    update = {"w": torch.ones(10_000, dtype=torch.float64), "b": t(2, 4)}
    dropped = dare_drop(update, 0.75, seed=7)
    values = set(dropped["w"].unique().tolist())
    assert values == {0.0, 4.0}  # dropped, or kept and rescaled by 1/(1 - 0.75)
    assert 0.2 < float((dropped["w"] != 0).double().mean()) < 0.3
    assert abs(float(dropped["w"].mean()) - 1.0) < 0.1  # unbiased in expectation
    assert all(torch.equal(dropped[n], dare_drop(update, 0.75, seed=7)[n]) for n in update)  # the same mask everywhere
    assert not torch.equal(dropped["w"], dare_drop(update, 0.75, seed=8)["w"])
    assert close(dare_drop(update, 0.0, seed=7)["b"], t(2, 4))


def test_outer_step_full_step_is_the_merged_body_itself():
    base, merged = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, -1.0])}
    fused, buffer = outer_step(base, merged, FusionConfig(), None)
    assert fused["w"] is merged["w"] and buffer is None


def test_outer_step_learning_rate_momentum_and_nesterov():
    base, merged = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, -1.0])}  # g = base - merged = [-2, 2]
    fused, buffer = outer_step(base, merged, FusionConfig(outer_learning_rate=0.5), None)
    assert close(fused["w"], t(2, 0)) and buffer is None
    momentum = FusionConfig(outer_momentum=0.5)
    fused, buffer = outer_step(base, merged, momentum, None)
    assert close(fused["w"], t(3, -1)) and close(buffer["w"], t(-2, 2))
    # next step: g = [3,-1] - [4,-1] = [-1, 0]; m = 0.5·[-2,2] + [-1,0] = [-2, 1]; θ = [3,-1] - [-2,1]
    fused, buffer = outer_step(fused, {"w": torch.tensor([4.0, -1.0])}, momentum, buffer)
    assert close(fused["w"], t(5, -2)) and close(buffer["w"], t(-2, 1))
    # Nesterov: u = g + μ·m = [-2,2] + 0.5·[-2,2]
    fused, _ = outer_step(base, merged, FusionConfig(outer_momentum=0.5, nesterov=True), None)
    assert close(fused["w"], t(4, -2))


def bodies():
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "ids": torch.tensor([0, 1])}
    one = {"w": torch.tensor([2.0, -1.0, 4.0, 1.1]), "ids": torch.tensor([0, 1])}
    two = {"w": torch.tensor([-3.0, 2.0, 3.0, 1.2]), "ids": torch.tensor([0, 1])}
    return base, [one, two]


def test_merger_task_arithmetic_through_an_average_equals_the_scaled_sum():
    """The all-reduce path: contributions averaged, then `finish` with the group size."""
    base, members = bodies()
    merger = Merger(FusionConfig(method="task_arithmetic", scale=0.3), run_seed=0)
    merged = merger.merge_all(members, base, 0, ["a", "b"], None, average)
    expected = add_delta(base, task_arithmetic([delta(m, base) for m in members], scale=0.3))
    assert torch.allclose(merged["w"], expected["w"]) and torch.equal(merged["ids"], base["ids"])
    # base + 0.3·([1,-2,3,0.1] + [-4,1,2,0.2])
    assert torch.allclose(merged["w"], torch.tensor([0.1, 0.7, 2.5, 1.09]))


def test_merger_dare_contribution_is_computed_at_the_contributor():
    base, members = bodies()
    merger = Merger(FusionConfig(method="dare", drop_rate=0.5), run_seed=3)
    sent = [merger.contribution(m, base, 2, name) for m, name in zip(members, ["a", "b"])]
    for m, s in zip(members, sent):
        d, k = delta(m, base)["w"], delta(s, base)["w"]
        assert all(x == 0 or abs(x - 2 * y) < 1e-5 for x, y in zip(k.tolist(), d.tolist()))
    assert torch.allclose(merger.merge_all(members, base, 2, ["a", "b"], None, average)["w"], average(sent)["w"])
    assert Merger(FusionConfig(), 0).contribution(members[0], base, 0, "a") is members[0]  # the paper sends its body


def test_merger_ties_in_one_process():
    base, members = bodies()
    merged = Merger(FusionConfig(method="ties", density=1.0), 0).merge_all(members, base, 0, ["a", "b"], None, average)
    # deltas [1,-2,3,0.1] and [-4,1,2,0.2]: signs [-,-,+,+], agreeing means [-4,-2,2.5,0.15]
    assert torch.allclose(merged["w"], torch.tensor([-3.0, -1.0, 3.5, 1.15]))


def test_backtracking_vote_is_worse_on_most_members():
    previous = {"a": 0.8, "b": 0.7, "c": 0.6}
    assert backtrack_rejects(previous, {"a": 0.7, "b": 0.6, "c": 0.9})  # worse on 2 of 3
    assert not backtrack_rejects(previous, {"a": 0.7, "b": 0.7, "c": 0.9})  # a tie is not worse
    assert not backtrack_rejects({"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.6})  # half is not most


def test_what_each_swarm_mode_refuses():
    assert swarm_refusal(FusionConfig(), centralized=False) is None
    for method in ("task_arithmetic", "dare"):
        assert swarm_refusal(FusionConfig(method=method), centralized=False) is None
    assert "second round" in swarm_refusal(FusionConfig(method="ties"), centralized=True)
    assert "vote" in swarm_refusal(FusionConfig(backtrack=True), centralized=False)
    assert "momentum" in swarm_refusal(FusionConfig(outer_momentum=0.9), centralized=False)
    assert swarm_refusal(FusionConfig(outer_momentum=0.9, nesterov=True, outer_learning_rate=0.7), centralized=True) is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"nesterov": True}, "nesterov needs outer_momentum"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"method": "slerp"}, "method"),
        ({"outer_learning_rate": 0}, "outer_learning_rate"),
        ({"density": 0}, "density"),
    ],
)
def test_bad_fusion_settings_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        RunConfig(fusion=fields)
    assert "\n" not in str(e.value)


def test_fusion_settings_are_part_of_the_run_contract():
    contract = run_contract(RunConfig(fusion={"method": "dare", "drop_rate": 0.5}, finetune={"pooling": "cls"}))
    assert contract["fusion.method"] == "dare" and contract["fusion.drop_rate"] == 0.5 and contract["finetune.pooling"] == "cls"
