"""Which downloaded state a peer may adopt: pure checks, tested with plain tensors and records.

A state donor is any peer that announces itself; nothing proves that what it serves is the swarm's
fused body. A body is adopted only when
  * its iteration lies within the run (at most `iterations`) and is the one the caller needs or newer,
  * every value is finite, and
  * its hash (utils.state_dict_hash) is *vouched for* by the progress records (`trusted_bodies`):
    another peer publishes the same hash, or another member of the group that fused it names the same
    group. After a real fusion one honest donor is thus enough for a late joiner: the other members'
    records vouch for what it serves.
    A donor serving anything else (garbage, NaN, a body no record vouches for) is refused and the
    next donor is asked.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from p2pcold.swarm.progress import PeerProgress
from p2pcold.utils import state_dict_hash

TRUST_QUORUM = 2  # peers whose records must vouch for a body


def trusted_bodies(records: Iterable[PeerProgress]) -> dict[int, frozenset[str]]:
    """iteration -> the hashes of the bases that the records vouch for. A record's base (its iteration
    and body_hash) is vouched for when another peer's record
      * publishes the same hash at that iteration (an exact copy: a peer that adopted it), or
      * names the same fused group at that iteration, with both peers in it (`last_group_peers`):
        members of a group hold one base, equal up to rounding, and each serves its own copy.
    One record alone (a rogue's, however often it republishes) vouches for nothing."""
    records = [r for r in records if r.body_hash]
    by_hash: dict[tuple[int, str], set[str]] = defaultdict(set)
    by_group: dict[tuple[int, tuple[str, ...]], set[str]] = defaultdict(set)
    for r in records:
        by_hash[(r.iteration, r.body_hash)].add(r.peer_id)
        group = tuple(r.last_group_peers)
        if len(group) >= TRUST_QUORUM and r.peer_id in group:
            by_group[(r.iteration, group)].add(r.peer_id)
    trusted: dict[int, set[str]] = defaultdict(set)
    for r in records:
        copies = len(by_hash[(r.iteration, r.body_hash)])
        members = len(by_group.get((r.iteration, tuple(r.last_group_peers)), ()))
        if copies >= TRUST_QUORUM or (r.peer_id in r.last_group_peers and members >= TRUST_QUORUM):
            trusted[r.iteration].add(r.body_hash)
    return {iteration: frozenset(hashes) for iteration, hashes in trusted.items()}


@dataclass(frozen=True)
class StateCheck:
    """What a downloaded (iteration, body) must satisfy; `trusted` is called at check time (the swarm's
    records move on while a download runs). `trusted=None`: no hash check (the centralized peer asks
    only the Repository, `only_from`)."""

    iterations: int
    at_least: int
    trusted: Callable[[], Mapping[int, frozenset[str]]] | None = None
    only_from: frozenset[str] | None = None  # the donors that may be asked (None: any)

    def may_ask(self, donor: str) -> bool:
        return self.only_from is None or donor in self.only_from

    def worth_asking(self) -> bool:
        """Whether any trusted body is new enough (otherwise no download can pass the check)."""
        if self.trusted is None:
            return True
        return any(self.at_least <= iteration <= self.iterations for iteration in self.trusted())

    def problem(self, iteration: int, body: Mapping[str, torch.Tensor]) -> str | None:
        """Why (iteration, body) must not be adopted; None when it may be."""
        if not self.at_least <= iteration <= self.iterations:
            return f"iteration {iteration} is outside {self.at_least}..{self.iterations}"
        bad = next((name for name, tensor in body.items() if not bool(torch.isfinite(tensor).all())), None)
        if bad is not None:
            return f"tensor {bad!r} holds non-finite values"
        if self.trusted is not None:
            body_hash = state_dict_hash(body)
            if body_hash not in self.trusted().get(iteration, frozenset()):
                return f"its hash {body_hash[:12]}… is not vouched for by the records at iteration {iteration}"
        return None
