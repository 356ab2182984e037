"""Fusion options beyond the paper's mean (§7 and the model-merging literature), over task deltas.

A contributor's delta is δ_c = θ_i^c − θ_i (its finetuned body minus the base it started from).
The paper's fusion is θ_{i+1} = θ_i + mean_c δ_c. The options here change that in three places:

- a merge method on the deltas: `mean` (the paper), `task_arithmetic` (λ·Σ δ_c, Ilharco et al.),
  `ties` (trim to the largest entries, elect a sign per entry, mean of the agreeing deltas; Yadav
  et al.) and `dare` (drop entries at random and rescale the rest, then the mean; Yu et al.);
- an outer step on the merged base: θ_{i+1} = θ_i + η·(merged − θ_i), with optional (Nesterov)
  momentum on the pseudo-gradient θ_i − merged (DiLoCo);
- backtracking: `backtrack_rejects` says whether a fused base scored worse on most members.

What a swarm's all-reduce can compute (it only ever averages bodies): `dare` drops and rescales each
delta at its contributor before the all-reduce; `task_arithmetic` is the all-reduced mean scaled by
λ·k afterwards; `ties` elects a sign from the sum of all trimmed deltas before it can average them,
which takes a second round the swarm does not run, so it is refused there (`swarm_refusal`).

Pure functions over state dicts (name -> tensor), computed in float64 and cast back; integer
tensors (position id buffers) are not deltas and are copied from the base.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from p2pcold.config import FusionConfig
from p2pcold.fusion import FusionError, check_same_schema, normalized_weights
from p2pcold.utils import derive_seed

StateDict = Mapping[str, torch.Tensor]

# Methods whose merge is the all-reduced mean of per-contributor transforms, then one scale.
ALL_REDUCE_METHODS = ("mean", "task_arithmetic", "dare")


def _float_names(state: StateDict) -> list[str]:
    return [name for name in sorted(state) if state[name].is_floating_point()]


def delta(body: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    """body − base over the float tensors, in float64."""
    check_same_schema([base, body], ["base", "body"])
    return {name: body[name].double() - base[name].double() for name in _float_names(base)}


def add_delta(base: StateDict, update: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """base + scale·update, in each tensor's own dtype; tensors without an update are copied."""
    out = {}
    for name in sorted(base):
        if name in update:
            out[name] = (base[name].double() + scale * update[name]).to(base[name].dtype)
        else:
            out[name] = base[name].detach().clone()
    return out


# --------------------------------------------------------------------------- merge methods over deltas


def mean_merge(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Σ_c w_c δ_c with the weights normalized (uniform when None): the paper's fusion."""
    coefficients = normalized_weights(weights, len(deltas))
    return {name: sum(c * d[name] for c, d in zip(coefficients, deltas)) for name in sorted(deltas[0])}


def task_arithmetic(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """λ·Σ_c δ_c (uniform weights); with weights, λ·k·Σ_c w_c δ_c, the same total with other shares."""
    return {name: scale * len(deltas) * d for name, d in mean_merge(deltas, weights).items()}


def trim(update: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density·n) largest |entries| (at least one), zero the rest (TIES' trim)."""
    keep = max(1, round(density * update.numel()))
    if keep >= update.numel():
        return update.clone()
    threshold = update.abs().flatten().kthvalue(update.numel() - keep + 1).values
    return torch.where(update.abs() >= threshold, update, torch.zeros_like(update))


def ties(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None, density: float = 0.2, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """TIES-merging: trim each δ_c per tensor, elect each entry's sign from the sum of the trimmed
    deltas, then the (weighted) mean over the contributors whose trimmed entry has that sign; λ·it."""
    coefficients = normalized_weights(weights, len(deltas))
    merged = {}
    for name in sorted(deltas[0]):
        trimmed = torch.stack([trim(d[name], density) for d in deltas])  # (C, ...)
        w = torch.tensor(coefficients, dtype=torch.float64).view(-1, *([1] * (trimmed.dim() - 1)))
        elected = torch.sign((w * trimmed).sum(0))
        agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
        share = (w * agrees).sum(0)
        merged[name] = scale * torch.where(share > 0, (w * trimmed * agrees).sum(0) / share.clamp(min=1e-300), torch.zeros_like(share))
    return merged


def dare_drop(update: Mapping[str, torch.Tensor], drop_rate: float, seed: int) -> dict[str, torch.Tensor]:
    """DARE: zero each entry with probability `drop_rate`, rescale the kept ones by 1/(1 − drop_rate).
    Seeded, tensor by tensor in name order, so every process draws the same mask for a contributor."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(update):
        kept = torch.rand(update[name].shape, generator=generator, dtype=torch.float64) >= drop_rate
        out[name] = torch.where(kept, update[name] / (1.0 - drop_rate), torch.zeros_like(update[name]))
    return out


def dare_seed(run_seed: int, iteration: int, dataset: str) -> int:
    return derive_seed(run_seed, "dare", iteration, dataset)


# --------------------------------------------------------------------------- the outer step


def outer_step(
    base: StateDict, merged: StateDict, config: FusionConfig, momentum: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """θ_{i+1} = θ_i − η·u with the pseudo-gradient g = θ_i − merged and u = g (no momentum),
    m (momentum: m ← μm + g) or g + μm (Nesterov). Returns (θ_{i+1}, the new momentum buffer).
    η = 1 without momentum returns `merged` itself: the paper's step, bit for bit."""
    eta, mu = config.outer_learning_rate, config.outer_momentum
    if eta == 1.0 and mu == 0.0:
        return dict(merged), None
    gradient = {name: base[name].double() - merged[name].double() for name in _float_names(base)}
    if mu == 0.0:
        return add_delta(base, gradient, -eta), None
    previous = momentum or {name: torch.zeros_like(g) for name, g in gradient.items()}
    buffer = {name: mu * previous[name].double() + g for name, g in gradient.items()}
    step = {name: g + mu * buffer[name] for name, g in gradient.items()} if config.nesterov else buffer
    return add_delta(base, step, -eta), buffer


# --------------------------------------------------------------------------- one run's fusion


class Merger:
    """A run's fusion options applied the same way by the local run, both peers and the Repository.

    For the all-reduce methods a fusion is: each contributor sends `contribution(...)`, the bodies are
    averaged (locally or by the swarm), and `finish(mean, k)` gives the merged body. `merge_all` is
    the whole of it in one process, and the only way to compute `ties`."""

    def __init__(self, config: FusionConfig, run_seed: int):
        self.config = config
        self.run_seed = run_seed

    @property
    def is_paper(self) -> bool:
        return self.config.method == "mean"

    def contribution(self, body: StateDict, base: StateDict, iteration: int, dataset: str) -> StateDict:
        """What a contributor hands to the average: its body, or for `dare` base + its dropped delta."""
        if self.config.method != "dare":
            return body
        dropped = dare_drop(delta(body, base), self.config.drop_rate, dare_seed(self.run_seed, iteration, dataset))
        return add_delta(body_like(base, body), dropped)

    def finish(self, mean: StateDict, base: StateDict, contributors: int) -> StateDict:
        """The merged body from the average of `contributors` contributions."""
        if self.config.method != "task_arithmetic":
            return mean
        return add_delta(body_like(base, mean), delta(mean, base), self.config.scale * contributors)

    def merge_all(
        self, bodies: Sequence[StateDict], base: StateDict, iteration: int, datasets: Sequence[str], weights: Sequence[float] | None, average
    ) -> StateDict:
        """The merged body of `bodies` in one process; `average(states, weights, labels=...)` combines the
        contributions: the run's aggregation rule (fusion.aggregate), the same one the swarm's reducers apply,
        passed in so that the local run goes through it (and through a test's spy)."""
        if self.config.method == "ties":
            deltas = [delta(body, base) for body in bodies]
            return add_delta(body_like(base, bodies[0]), ties(deltas, weights, self.config.density, self.config.scale))
        sent = [self.contribution(body, base, iteration, name) for body, name in zip(bodies, datasets)]
        return self.finish(average(sent, weights, labels=list(datasets)), base, len(bodies))


def body_like(base: StateDict, body: StateDict) -> dict[str, torch.Tensor]:
    """`base` with `body`'s integer tensors, which fusion copies rather than merges."""
    return {name: base[name] if base[name].is_floating_point() else body[name] for name in base}


# --------------------------------------------------------------------------- backtracking and the swarm


def backtrack_rejects(previous: Mapping[str, float], fused: Mapping[str, float]) -> bool:
    """True when the fused base scored below the previous one on most (more than half) members."""
    if set(previous) != set(fused) or not previous:
        raise FusionError(f"backtracking needs the same members' scores before and after, got {sorted(previous)} and {sorted(fused)}")
    worse = sum(fused[name] < previous[name] for name in previous)
    return worse * 2 > len(previous)


def swarm_refusal(config: FusionConfig, centralized: bool) -> str | None:
    """Why a swarm mode cannot run these options exactly (one line), or None when it can."""
    mode = "centralized (Repository)" if centralized else "decentralized"
    if config.method not in ALL_REDUCE_METHODS:
        return f"fusion.method={config.method} needs every delta before averaging (a second round); the {mode} swarm averages in one all-reduce: use it with `p2pcold local`"
    if config.backtrack:
        return f"fusion.backtrack needs every member's vote on the fused base, which the {mode} swarm does not collect: use it with `p2pcold local`"
    if config.outer_momentum and not centralized:
        return "fusion.outer_momentum needs one momentum buffer shared by every peer, which a peer that joins or adopts a base cannot download: use it with `p2pcold local` or the centralized mode"
    return None
