"""The iteration boundary as a pure policy: what a peer does next, given a snapshot of the others.

No I/O and no clock of its own: every function takes the other peers' progress records (a
`SwarmSnapshot.peers`: newest per dataset, this peer excluded) and the times it needs, so the rules
are tested with tables of records (tests/swarm/test_boundary.py). docs/protocol.md has the table.

At the boundary of iteration i (this peer has finetuned θ_i), `decide` returns
    Adopt  the swarm is past i (two peers' records vouch for a newer base): download it instead of
           pushing a stale update
    Solo   the deadline passed, or nobody else is at i: keep this peer's own update
    Wait   peers at i are still joining / downloading / finetuning, or members of the last group have
           not republished yet: wait for them (until `wait_until`), so the group forms with everyone
    Fuse   others are at i: all-reduce with them (again after a failed attempt, until the deadline)
Before finetuning iteration i, `decide_start` returns Adopt (the swarm is ahead, or this peer's last
boundary failed and another peer of iteration i fused), Wait (that may still happen) or Train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

from p2pcold.swarm.progress import FusionOutcome, PeerProgress, Phase
from p2pcold.swarm.state_check import trusted_bodies

STILL_COMING = (Phase.JOINING, Phase.DOWNLOADING, Phase.FINETUNING)  # on their way to the boundary
KEPT_OWN_UPDATE = (FusionOutcome.FAILED, FusionOutcome.SOLO)  # outcomes that leave a second body alive


@dataclass(frozen=True)
class Wait:
    reason: str
    pending: tuple[str, ...] = ()  # datasets waited for


@dataclass(frozen=True)
class Fuse:
    partners: tuple[str, ...]  # datasets at this iteration, ready to fuse
    not_waited_for: tuple[str, ...] = ()  # still pending, but the wait is over


@dataclass(frozen=True)
class Adopt:
    iteration: int  # the iteration of the base to download
    reason: str


@dataclass(frozen=True)
class Solo:
    reason: str


@dataclass(frozen=True)
class Train:
    """Finetune from this peer's own base."""


Decision = Wait | Fuse | Adopt | Solo | Train


# --------------------------------------------------------------------------- predicates


def vouched_iteration(peers: Iterable[PeerProgress]) -> int:
    """The newest iteration of a base that another peer's record vouches for (state_check.trusted_bodies:
    the same hash, or the same fused group); -1 when none. One record alone (a rogue's, a ghost's), or
    records that disagree, never move a peer on, and a base this says exists is one that state_check
    lets it adopt."""
    return max(trusted_bodies(peers), default=-1)


def swarm_is_ahead(iteration: int, peers: Iterable[PeerProgress]) -> bool:
    return vouched_iteration(peers) > iteration


def a_record_holds(at_least: int, peers: Iterable[PeerProgress]) -> bool:
    """Whether any record, vouched for or not, holds a base of iteration `at_least` or newer (worth
    waiting a moment for the records that would vouch for it)."""
    return any(p.iteration >= at_least for p in peers)


def pending_peers(iteration: int, peers: Iterable[PeerProgress], last_group: Iterable[str]) -> tuple[str, ...]:
    """Datasets to wait for at boundary `iteration`: live peers at it still on their way, and members of
    this peer's last group (peer ids) whose records still show an earlier iteration (a fast finetune
    can end before they have published the new one)."""
    last_group = set(last_group)
    return tuple(
        sorted(
            p.dataset
            for p in peers
            if (p.iteration == iteration and p.phase in STILL_COMING)
            or (p.peer_id in last_group and p.iteration < iteration and p.phase != Phase.DONE)
        )
    )


def partners_at(iteration: int, peers: Iterable[PeerProgress]) -> tuple[str, ...]:
    """Datasets of the live peers at `iteration` that are at the boundary (or past finetuning)."""
    return tuple(sorted(p.dataset for p in peers if p.iteration == iteration and p.phase not in STILL_COMING and p.phase != Phase.DONE))


def view_is_fresh(view_since: float, now: float, settle_s: float, wait_until: float, read_again: bool = True) -> bool:
    """Whether the partners seen at a boundary (unchanged since `view_since`) may still lack the records
    of peers that arrived just before: worth waiting for, while the boundary's wait lasts, until the
    view has held for `settle_s` and through a read after the one that first showed it (`read_again`).
    A read can miss a record; a plan of groups smaller than the swarm needs a whole window, since
    another member list is another grid."""
    return now < wait_until and (now - view_since < settle_s or not read_again)


def fused_peers(iteration: int, peers: Iterable[PeerProgress]) -> tuple[str, ...]:
    """Datasets of the peers holding a base of `iteration` that a group fused (their last boundary was OK)."""
    return tuple(sorted(p.dataset for p in peers if p.iteration == iteration and p.last_fusion == FusionOutcome.OK))


def still_averaging(iteration: int, peers: Iterable[PeerProgress]) -> tuple[str, ...]:
    """Datasets of the peers still at boundary `iteration` (they may yet fuse or be republishing)."""
    return tuple(sorted(p.dataset for p in peers if p.iteration == iteration and p.phase == Phase.AVERAGING))


def peers_behind(iteration: int, peers: Iterable[PeerProgress]) -> tuple[str, ...]:
    """Datasets of the live peers that may still need this peer's base of `iteration`: those behind it,
    and those at it that kept their own update at the last boundary (they adopt a fused base)."""
    return tuple(
        sorted(
            p.dataset
            for p in peers
            if p.phase != Phase.DONE and (p.iteration < iteration or (p.iteration == iteration and p.last_fusion in KEPT_OWN_UPDATE))
        )
    )


def watchers_behind(iteration: int, watchers: Mapping[str, int] | None) -> tuple[str, ...]:
    """The monitors that evaluate fused bases and do not hold the one of `iteration` yet; `watchers`
    None (not read yet) counts as one such, so that a finished peer never leaves before it knows."""
    if watchers is None:
        return ("monitors (not read yet)",)
    return tuple(sorted(f"monitor {peer[-8:]}" for peer, held in watchers.items() if held < iteration))


def stragglers(known: Collection[str], missed: Iterable[str], peers: Iterable[PeerProgress]) -> frozenset[str]:
    """Peer ids not to wait for at the next boundaries: `known` ones and the datasets a wait just missed
    (`missed`, as in Fuse.not_waited_for), minus those whose record now shows them at a boundary
    (averaging): a slow peer is waited for again once it proves that it gets there."""
    missed = set(missed)
    peers = list(peers)
    arrived = {p.peer_id for p in peers if p.phase == Phase.AVERAGING}
    return frozenset((set(known) | {p.peer_id for p in peers if p.dataset in missed}) - arrived)


def duplicate_dataset_peers(records: Iterable[PeerProgress], dataset: str, first_seen: Mapping[str, float]) -> tuple[str, ...]:
    """Peer ids of the other live peers on `dataset`: their record was published again since this peer
    first saw it (`first_seen`: peer id -> last_seen then), or appeared only later. The record a
    restarted peer left behind is never re-published; it only expires."""
    return tuple(sorted(p.peer_id for p in records if p.dataset == dataset and p.last_seen > first_seen.get(p.peer_id, float("-inf"))))


# --------------------------------------------------------------------------- decisions


def decide(
    iteration: int,
    peers: Sequence[PeerProgress],
    last_group: Iterable[str],
    now: float,
    wait_until: float,
    deadline: float,
    not_waiting_for: Collection[str] = (),
) -> Decision:
    """What to do at boundary `iteration` at time `now` (the caller's clock; `wait_until` <= `deadline`).

    `last_group`: peer ids of the others in this peer's last group. `not_waiting_for`: peer ids this
    peer waited for in vain at an earlier boundary (`stragglers`): a record that says "finetuning"
    forever (a ghost) costs one bounded wait, not one per boundary."""
    if swarm_is_ahead(iteration, peers):
        newest = vouched_iteration(peers)
        return Adopt(newest, f"the swarm is at iteration {newest}")
    if now >= deadline:
        return Solo("the boundary deadline passed")
    pending = pending_peers(iteration, [p for p in peers if p.peer_id not in not_waiting_for], last_group)
    waiting = now < wait_until
    if pending and waiting:
        return Wait("peers still on their way", pending)
    partners = tuple(d for d in partners_at(iteration, peers) if d not in pending)
    if partners:
        return Fuse(partners, pending)
    if waiting:  # a peer that just arrived may not have published its record yet
        return Wait(f"nobody else at iteration {iteration} yet")
    return Solo(f"nobody else at iteration {iteration}")


def decide_start(
    iteration: int,
    peers: Sequence[PeerProgress],
    last_fusion: str | None,
    now: float,
    wait_until: float,
) -> Decision:
    """What to do before finetuning `iteration` (and at the end of the run, with iteration = N).

    A peer whose last boundary left it with its own update (failed or solo) adopts a fused base of the
    same iteration when another peer reports one, so that the swarm does not keep two bodies alive; it
    waits for that (until `wait_until`) while peers are still at the previous boundary."""
    if swarm_is_ahead(iteration, peers):
        newest = vouched_iteration(peers)
        return Adopt(newest, f"the swarm is at iteration {newest}")
    if last_fusion not in KEPT_OWN_UPDATE:
        return Train()
    fused = fused_peers(iteration, peers)
    if fused:
        return Adopt(iteration, f"{', '.join(fused)} fused at boundary {iteration - 1}; taking the group's base")
    if last_fusion == FusionOutcome.FAILED and now < wait_until:
        averaging = still_averaging(iteration - 1, peers)
        if averaging:
            return Wait(f"peers still at boundary {iteration - 1}", averaging)
    return Train()


# --------------------------------------------------------------------------- the Repository's side


def connected_datasets(peers: Iterable[PeerProgress], wanted: Iterable[str]) -> list[str]:
    return sorted({p.dataset for p in peers} & set(wanted))


def ready_contributors(iteration: int, peers: Iterable[PeerProgress], contributors: Iterable[str]) -> list[str]:
    """The sampled contributors that reported they finished finetuning `iteration`."""
    return sorted({p.dataset for p in peers if p.iteration == iteration and p.phase == Phase.READY} & set(contributors))


def done_datasets(peers: Iterable[PeerProgress]) -> list[str]:
    return sorted(p.dataset for p in peers if p.phase == Phase.DONE)


def repository_word(assignments: Mapping[int, Mapping], iteration: int, field: str) -> Mapping | None:
    """The Repository's record for `iteration` once it holds `field` (e.g. contributors, group), else None."""
    record = assignments.get(iteration)
    return record if isinstance(record, Mapping) and field in record else None
