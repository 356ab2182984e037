"""The CoLD Fusion aggregation math (§2.3): θ_{i+1} = Σ_c w_c θ_i^c / Σ_c w_c, and its robust form.

Pure functions over state dicts (name -> tensor). No network, no model code: the in-process
reference run and the tests call these directly, and the swarm's all-reduce must agree with them.

`aggregate` is what a boundary computes (issue 8): it works block by block (`BLOCK_VALUES`
contiguous values of each flattened tensor), and `aggregate_block` is the whole rule for one block.
Every all-reduce reducer receives exactly such blocks (its parts; `p2pcold.swarm.robust_reduce`) and
calls `aggregate_block` on them, so the swarm computes what the local run computes.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from p2pcold.config import AggregationConfig
from p2pcold.utils import P2PColdError, derive_seed, get_logger

log = get_logger(__name__)

# Values per block of a flattened tensor: the unit of norm clipping and of non-finite exclusion. The
# swarm sets hivemind's all-reduce part size to exactly this many values, so that each reducer sees
# whole blocks. 2**17 float32 values = hivemind's default part of 512 KiB.
BLOCK_VALUES = 2**17

StateDict = Mapping[str, torch.Tensor]


class FusionError(P2PColdError):
    """Bodies that cannot be averaged: different schemas or non-finite values."""


def schema(state: StateDict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) per tensor, in name order: what two bodies must share to be fused."""
    return [(name, tuple(state[name].shape), str(state[name].dtype)) for name in sorted(state)]


def check_same_schema(states: Sequence[StateDict], labels: Sequence[str] | None = None) -> None:
    labels = list(labels or [f"body {i}" for i in range(len(states))])
    reference, ref_label = states[0], labels[0]
    for state, label in zip(states[1:], labels[1:]):
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        if missing or extra:
            name = (missing or extra)[0]
            where = f"{label} lacks" if missing else f"{label} has extra"
            raise FusionError(f"cannot fuse: {where} tensor {name!r} (compared with {ref_label})")
        for name in sorted(reference):
            a, b = reference[name], state[name]
            if a.shape != b.shape:
                raise FusionError(f"cannot fuse tensor {name!r}: shape {tuple(b.shape)} in {label}, {tuple(a.shape)} in {ref_label}")
            if a.dtype != b.dtype:
                raise FusionError(f"cannot fuse tensor {name!r}: dtype {b.dtype} in {label}, {a.dtype} in {ref_label}")


def check_finite(state: StateDict, label: str = "body") -> None:
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FusionError(f"cannot fuse tensor {name!r} of {label}: it holds NaN or Inf")


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise FusionError(f"cannot fuse: {len(weights)} weights for {count} bodies")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise FusionError(f"cannot fuse: weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [w / total for w in weights]


def average(
    states: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted average of bodies (uniform when `weights` is None), accumulated in float64.

    `weights` are typically 1 per contributor (the paper) or each contributor's number of
    training examples (`fusion_weighting: examples`). Integer tensors (e.g. position ids
    buffers) must agree across bodies and are copied, not averaged.
    """
    if not states:
        raise FusionError("cannot fuse: no bodies given")
    labels = list(labels or [f"body {i}" for i in range(len(states))])
    check_same_schema(states, labels)
    for state, label in zip(states, labels):
        check_finite(state, label)
    coefficients = normalized_weights(weights, len(states))
    fused: dict[str, torch.Tensor] = {}
    for name in sorted(states[0]):
        first = states[0][name]
        if not first.is_floating_point():
            fused[name] = _agreed_copy(states, labels, name)
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for state, c in zip(states, coefficients):
            total.add_(state[name].detach().to("cpu", torch.float64), alpha=c)
        fused[name] = total.to(first.dtype)
    return fused


def aggregate(
    states: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    rule: AggregationConfig | None = None,
) -> dict[str, torch.Tensor]:
    """θ_{i+1} from the contributions `states` under `rule` (default: AggregationConfig()), block by block.

    `weights` as in `average` (None: 1 each). A contribution holding NaN or Inf in a block is left out of
    that block (named in one warning line); the others are fused. Non-float tensors must agree and are
    copied. Raises FusionError only when some block has no finite contribution at all.
    """
    if not states:
        raise FusionError("cannot fuse: no bodies given")
    rule = rule or AggregationConfig()
    labels = list(labels or [f"body {i}" for i in range(len(states))])
    check_same_schema(states, labels)
    declared = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    normalized_weights(declared, len(states))  # the caller's own weights: refuse nonsense loudly
    fused: dict[str, torch.Tensor] = {}
    excluded: set[int] = set()
    for name in sorted(states[0]):
        first = states[0][name]
        if not first.is_floating_point():
            fused[name] = _agreed_copy(states, labels, name)
            continue
        flat = [state[name].detach().reshape(-1).to("cpu") for state in states]
        out = torch.empty(first.numel(), dtype=torch.float64)
        for start in range(0, first.numel(), BLOCK_VALUES):
            block = torch.stack([values[start : start + BLOCK_VALUES] for values in flat])
            try:
                out[start : start + BLOCK_VALUES], left_out = aggregate_block(block, declared, rule)
            except FusionError as e:
                raise FusionError(f"cannot fuse tensor {name!r}: {e}") from None
            excluded.update(left_out)
        fused[name] = out.reshape(first.shape).to(first.dtype)
    if excluded:
        log.warning("fusion: left out non-finite values of %s", ", ".join(labels[i] for i in sorted(excluded)))
    return fused


def aggregate_block(
    values: torch.Tensor, weights: Sequence[float], rule: AggregationConfig
) -> tuple[torch.Tensor, list[int]]:
    """The fused block (float64) of `values` (contributors x block values), and which contributors were
    left out because the block holds NaN or Inf in their row.

    1. Contributors with a weight <= 0 (they receive without contributing) or non-finite values drop out.
    2. Weights are capped at `rule.weight_cap` x their median, then normalized.
    3. `mean`: the weighted mean. `trimmed_mean` (or `auto` with at least `robust_min_contributors`):
       each row's distance from the per-value (lower) median is clipped to `rule.norm_clip` x the median
       distance; then, per value, the `trim_fraction` lowest and highest are dropped (at least one each
       side; of equal values, the first rows sort first) and the rest averaged with their weights.
    """
    values = values.to(torch.float64)
    finite = torch.isfinite(values).all(dim=1).tolist()
    positive = [math.isfinite(w) and w > 0 for w in weights]
    excluded = [i for i, (ok, pos) in enumerate(zip(finite, positive)) if pos and not ok]
    kept = [i for i, (ok, pos) in enumerate(zip(finite, positive)) if pos and ok]
    if not kept:
        raise FusionError("no contribution with a positive weight and finite values")
    rows = values[kept]
    capped = bounded_weights([weights[i] for i in kept], rule.weight_cap)
    if not is_robust(rule, len(kept)):
        return (rows * capped[:, None]).sum(dim=0), excluded
    ranks = stable_ranks(rows)
    clipped = clip_to_center(rows, value_of_rank(rows, ranks, (len(kept) - 1) // 2), rule.norm_clip)
    if clipped is not None:  # a row pulled in can change places with another
        rows, ranks = clipped, stable_ranks(clipped)
    trim = max(1, int(rule.trim_fraction * len(kept)))
    total, kept_weight = torch.zeros_like(rows[0]), torch.zeros_like(rows[0])
    for row, rank, weight in zip(rows, ranks, capped.tolist()):
        middle = ((rank >= trim) & (rank < len(kept) - trim)).to(rows.dtype)
        total += middle * row * weight
        kept_weight += middle * weight
    return total / kept_weight, excluded


def stable_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each value's place (0 = smallest) among its column's values, ties in row order: where a stable
    sort along dim 0 puts it. Pairwise comparisons of whole rows: for the few rows of a group they are
    a few times faster than sorting along dim 0 (the reducers run this at every boundary)."""
    ranks = torch.zeros(rows.shape, dtype=torch.int32)
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            j_after_i = rows[j] >= rows[i]  # on a tie, the later row sorts after
            ranks[j] += j_after_i
            ranks[i] += ~j_after_i
    return ranks


def value_of_rank(rows: torch.Tensor, ranks: torch.Tensor, place: int) -> torch.Tensor:
    """Per column, the value at `place` of the stable sort (`ranks` from `stable_ranks`)."""
    chosen = torch.zeros_like(rows[0])
    for row, rank in zip(rows, ranks):
        chosen = torch.where(rank == place, row, chosen)
    return chosen


def is_robust(rule: AggregationConfig, contributors: int) -> bool:
    """Whether `rule` trims for this many contributors (at least 3 are needed to trim one each side)."""
    if contributors < 3 or rule.rule == "mean":
        return False
    return rule.rule == "trimmed_mean" or contributors >= rule.robust_min_contributors


def bounded_weights(weights: Sequence[float], cap: float) -> torch.Tensor:
    """Positive weights capped at `cap` x their median, normalized to sum to 1 (float64)."""
    limit = cap * statistics.median(weights)
    capped = torch.tensor([min(w, limit) for w in weights], dtype=torch.float64)
    return capped / capped.sum()


def clip_to_center(rows: torch.Tensor, center: torch.Tensor, multiple: float) -> torch.Tensor | None:
    """`rows` with each row pulled back towards `center` (the per-value median) until its distance from it
    is at most `multiple` x the median of those distances; None when no row is beyond that."""
    offsets = rows - center
    distances = offsets.norm(dim=1)
    limit = multiple * statistics.median(distances.tolist())
    beyond = distances > limit
    if not bool(beyond.any()):
        return None
    scale = torch.where(beyond, limit / distances.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    return center + offsets * scale[:, None]


# float32 keeps 24 bits: a fused value cast back from float64 is off by at most 2**-24 of itself. A fused
# update within 16 times that of the base's norm is rounding, not an update.
ROUNDING = 2.0**-20


@dataclass(frozen=True)
class Overshoot:
    """The tensor whose fused update is largest against what this peer's own update allows it."""

    tensor: str
    ratio: float  # its fused update (less the allowances) over its yardstick; inf when this peer moved none


def overshoot(
    fused: StateDict,
    own: StateDict,
    base: StateDict,
    limit: float,
    allowance: Mapping[str, float] | None = None,
) -> Overshoot | None:
    """Whether a fused body is acceptable to a member of its group (issue 27): None when every float tensor
    moved at most `limit` times its yardstick, else the tensor that exceeds it the most.

    `own` is what this member put into the average and `base` the θ_i both started from. A tensor t's
    yardstick is the larger of this member's own update of it, ||own_t − base_t||, and of what t's share
    of values would have moved at this member's update's average rate, ||own − base|| x sqrt(n_t / n)
    (L2 norms; n: the float values of the body): a tensor that this member's training barely moved,
    and others' moved more (a bias no gradient reaches but Adam's noise, a layer norm), may move as
    much as a typical one. An honest mean moves a tensor no further than the largest honest update of
    it, so it passes while no honest member moved a tensor over `limit` times as far as this one.
    `allowance`: per-tensor wire noise the caller expects (lossy compression), on top of float32
    rounding (ROUNDING x ||base_t||). A non-finite fused tensor always exceeds.
    """
    check_same_schema([base, own, fused], ["base", "own", "fused"])
    allowance = allowance or {}
    names = [name for name in sorted(base) if base[name].is_floating_point()]
    own_moves = {name: (own[name].double() - base[name].double()).norm().item() for name in names}
    values = sum(base[name].numel() for name in names)
    rate = math.sqrt(sum(move**2 for move in own_moves.values()) / max(values, 1))  # per value, RMS
    worst: Overshoot | None = None
    for name in names:
        reference = base[name].double()
        moved = (fused[name].double() - reference).norm().item()
        yardstick = max(own_moves[name], rate * math.sqrt(reference.numel()))
        excess = moved - allowance.get(name, 0.0) - ROUNDING * reference.norm().item()
        if excess <= limit * yardstick:  # False for NaN: a non-finite tensor is refused
            continue
        ratio = excess / yardstick if yardstick > 0 and math.isfinite(excess) else math.inf
        if worst is None or ratio > worst.ratio:
            worst = Overshoot(name, ratio)
    return worst


def _agreed_copy(states: Sequence[StateDict], labels: Sequence[str], name: str) -> torch.Tensor:
    first = states[0][name]
    for state, label in zip(states[1:], labels[1:]):
        if not torch.equal(state[name], first):
            raise FusionError(f"cannot fuse non-float tensor {name!r}: {label} differs from {labels[0]}")
    return first.detach().clone()


def max_abs_difference(a: StateDict, b: StateDict) -> float:
    """Largest elementwise |a - b| over all tensors, e.g. to measure compression error."""
    check_same_schema([a, b], ["a", "b"])
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].numel())


def sample_contributors(names: Sequence[str], k: int | None, seed: int, iteration: int) -> list[str]:
    """The k contributors of `iteration` (§3.4: "several datasets are sampled"), seeded.

    Every process computes the same sample from (names, k, seed, iteration), which is how the
    Repository and the in-process reference run agree on who contributes.
    """
    ordered = sorted(names)
    if k is None or k >= len(ordered):
        return ordered
    return sorted(random.Random(derive_seed(seed, "sample", iteration)).sample(ordered, k))
