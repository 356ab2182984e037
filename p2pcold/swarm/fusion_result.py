"""What one `BodyAverager.fuse` call returns: a typed outcome instead of exceptions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class FusionStatus(str, enum.Enum):
    OK = "ok"  # fused with a group; `averaged` holds the group's body under the run's aggregation rule
    NO_GROUP = "no_group"  # no other peer at this iteration before the deadline
    FAILED = "failed"  # a group formed, but no all-reduce attempt completed cleanly before the deadline
    ABORTED = "aborted"  # the caller's `abort` check said to stop looking (e.g. the swarm moved on)


@dataclass
class GroupMember:
    peer_id: str
    weight: float
    metadata: dict


@dataclass
class FusionResult:
    """Outcome of one `BodyAverager.fuse` call."""

    status: FusionStatus
    iteration: int
    # the fused body (new tensors; fusion.aggregate's rule); None unless OK
    averaged: dict[str, torch.Tensor] | None
    group_size: int = 0  # peers in the group that produced `averaged` (0 unless OK)
    members: dict[str, GroupMember] = field(default_factory=dict)  # by peer id, this peer included
    total_weight: float = 0.0
    attempts: int = 0  # all-reduce attempts (matchmaking rounds) made
    elapsed_s: float = 0.0
    reason: str = ""  # why it is not OK (last failure), for logs
    # Moshpit rounds: each round's status, or "alone" (a cell of one)
    rounds: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is FusionStatus.OK
