"""The robust aggregation rule (issue 8) on plain tensors, with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from p2pcold.config import AggregationConfig, ConfigError
from p2pcold.fusion import BLOCK_VALUES, FusionError, aggregate, aggregate_block, average, bounded_weights, clip_to_center

AUTO = AggregationConfig()


def column(*values: float) -> torch.Tensor:
    """One block of one value per contributor."""
    return torch.tensor([[v] for v in values], dtype=torch.float64)


def test_weights_are_capped_at_a_multiple_of_their_median_and_normalized():
    assert bounded_weights([1.0, 1.0, 1e6], cap=4.0).tolist() == [1 / 6, 1 / 6, 4 / 6]
    assert bounded_weights([1.0, 3.0], cap=4.0).tolist() == [0.25, 0.75]  # median 2: nothing capped


def test_below_four_contributors_auto_is_the_weighted_mean_with_capped_weights():
    fused, excluded = aggregate_block(column(0.0, 3.0, 100.0), [1.0, 1.0, 1e6], AUTO)
    assert fused.item() == pytest.approx((0 + 3 + 4 * 100) / 6) and excluded == []


def test_four_contributors_clip_then_trim_one_each_side():
    # median 2 (the lower middle); distances 1, 0, 1, 998 -> median 1 -> the rogue is pulled to 2 + 3 = 5;
    # sorted 1, 2, 3, 5: trimming one each side leaves the mean of 2 and 3
    fused, _ = aggregate_block(column(1.0, 2.0, 3.0, 1000.0), [1.0] * 4, AUTO)
    assert fused.item() == pytest.approx(2.5)
    assert aggregate_block(column(1.0, 2.0, 3.0, 1000.0), [1.0] * 4, AggregationConfig(rule="mean"))[0].item() == 251.5


def test_the_kept_values_keep_their_capped_weights():
    # five contributors (cap 4 x median 2 = 8, nothing clipped), trim one each side: 10, 20, 30 keep weights 1, 2, 1
    fused, _ = aggregate_block(column(0.0, 10.0, 20.0, 30.0, 40.0), [2.0, 1.0, 2.0, 1.0, 8.0], AUTO)
    assert fused.item() == pytest.approx((10 * 1 + 20 * 2 + 30 * 1) / 4)


def sorted_trimmed_mean(rows: torch.Tensor, weights: list[float], rule: AggregationConfig) -> torch.Tensor:
    """The trimmed rule written with a stable sort along the contributors (its definition)."""
    capped = bounded_weights(weights, rule.weight_cap)
    ordered = rows.sort(dim=0, stable=True).values
    clipped = clip_to_center(rows, ordered[(len(rows) - 1) // 2], rule.norm_clip)
    rows = rows if clipped is None else clipped
    ordered, order = rows.sort(dim=0, stable=True)
    trim = max(1, int(rule.trim_fraction * len(rows)))
    middle = slice(trim, len(rows) - trim)
    return (ordered[middle] * capped[order[middle]]).sum(dim=0) / capped[order[middle]].sum(dim=0)


@pytest.mark.parametrize("contributors", [3, 4, 5, 8, 13])
def test_the_trimmed_mean_keeps_what_a_stable_sort_keeps(contributors):
    """Ties (values that no contributor changed, or that some share) are trimmed in row order, and a
    far row is clipped first: the result is the sorted definition's, to float64 rounding."""
    generator = torch.Generator().manual_seed(contributors)
    rows = torch.randn(5000, generator=generator) + 1e-3 * torch.randn(contributors, 5000, generator=generator)
    rows[:, :500] = 0.5
    rows[: contributors // 2, 500:900] = 0.25
    rows[-1, 1000:1100] *= 50.0
    weights = torch.randint(1, 9, (contributors,), generator=generator).double().tolist()
    rule = AggregationConfig(rule="trimmed_mean", trim_fraction=0.3)
    rows = rows.double()
    fused, _ = aggregate_block(rows, weights, rule)
    torch.testing.assert_close(fused, sorted_trimmed_mean(rows, weights, rule), rtol=1e-14, atol=1e-15)


def test_non_finite_contributions_and_zero_weights_are_left_out():
    fused, excluded = aggregate_block(column(1.0, 2.0, math.nan, 6.0, 100.0), [1.0, 1.0, 1.0, 1.0, 0.0], AUTO)
    assert excluded == [2]  # the zero-weight row is a receiver, not a failure
    assert fused.item() == pytest.approx(3.0)  # three finite contributors: the plain mean
    with pytest.raises(FusionError, match="no contribution"):
        aggregate_block(column(math.inf, math.nan), [1.0, 1.0], AUTO)


def test_whole_bodies_are_fused_block_by_block(caplog):
    """Norm clipping and exclusion are per block: a rogue that is wild in the second block only keeps
    its (honest-looking) first block, and the result is the per-block rule, concatenated."""
    generator = torch.Generator().manual_seed(0)
    size = BLOCK_VALUES + 1000
    honest = [{"w": torch.randn(size, generator=generator), "ids": torch.arange(3)} for _ in range(4)]
    rogue = {"w": honest[0]["w"].clone(), "ids": torch.arange(3)}
    rogue["w"][BLOCK_VALUES:] = math.nan
    states = honest + [rogue]
    fused = aggregate(states, labels=[f"p{i}" for i in range(5)])
    first = aggregate_block(torch.stack([s["w"][:BLOCK_VALUES] for s in states]), [1.0] * 5, AUTO)[0]
    second = aggregate_block(torch.stack([s["w"][BLOCK_VALUES:] for s in honest]), [1.0] * 4, AUTO)[0]
    assert torch.equal(fused["w"], torch.cat([first, second]).float())
    assert torch.equal(fused["ids"], torch.arange(3))
    assert "left out non-finite values of p4" in caplog.text


@pytest.mark.parametrize("attack", ["times_1e3", "noise", "target_with_huge_weight"])
def test_one_rogue_among_eight_stays_near_the_honest_average(attack):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(5000, generator=generator)
    honest = [{"w": base + 0.01 * torch.randn(5000, generator=generator)} for _ in range(7)]
    weights = [1.0] * 8
    if attack == "times_1e3":
        rogue = {"w": honest[0]["w"] * 1e3}
    elif attack == "noise":
        rogue = {"w": torch.randn(5000, generator=generator)}
    else:
        rogue, weights[-1] = {"w": torch.full((5000,), 7.0)}, 1e6
    honest_mean = average(honest)["w"]
    robust = aggregate(honest + [rogue], weights)["w"]
    plain = average(honest + [rogue], weights)["w"]
    assert (robust - honest_mean).abs().max() < 0.02  # within the honest peers' own spread
    assert (plain - honest_mean).abs().max() > 0.5


def test_mean_rule_equals_average_and_the_config_bounds_its_parameters():
    states = [{"w": torch.tensor([float(i), 2.0 * i])} for i in range(5)]
    assert torch.allclose(aggregate(states, [1, 2, 3, 4, 5], rule=AggregationConfig(rule="mean"))["w"], average(states, [1, 2, 3, 4, 5])["w"])
    for bad in ({"trim_fraction": 0.5}, {"weight_cap": 0.5}, {"norm_clip": 0.9}, {"robust_min_contributors": 2}, {"rule": "median"}):
        with pytest.raises(ConfigError):
            AggregationConfig(**bad)
