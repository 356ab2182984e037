"""The CoLD Fusion aggregation math (§2.3): θ_{i+1} = Σ_c w_c θ_i^c / Σ_c w_c.

Pure functions over state dicts (name -> tensor). No network, no model code: the in-process
reference run, the Repository and the tests call these directly, and the swarm's all-reduce
must agree with them.
"""

from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

import torch

from p2pcold.utils import P2PColdError, derive_seed

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
            for state, label in zip(states[1:], labels[1:]):
                if not torch.equal(state[name], first):
                    raise FusionError(f"cannot fuse non-float tensor {name!r}: {label} differs from {labels[0]}")
            fused[name] = first.detach().clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for state, c in zip(states, coefficients):
            total.add_(state[name].detach().to("cpu", torch.float64), alpha=c)
        fused[name] = total.to(first.dtype)
    return fused


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
