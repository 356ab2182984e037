"""Moshpit rounds: the groups of a boundary larger than one group, as pure grid math.

The n members of a boundary (their dataset names, sorted: every member computes the same list) are
placed in a g^d grid, d = ceil(log_g n): member k sits at the base-g digits of k, least significant
digit first. In round r a member averages with the members whose coordinates differ from its own on
axis r only (its *cell*: its coordinates with axis r removed). Round 0 groups consecutive blocks of g
members, round 1 takes one member from each round-0 group, and so on. With every round weighted by
the total weight its group fused, a full grid (n = g^d) holds the exact weighted global mean after d
rounds (Ryabinin et al. 2021, "Moshpit SGD"); a partial grid holds it wherever a member's later
groups cover every earlier group (docs/protocol.md).

Each (iteration, grid, round, cell) has its own hivemind group bits, so different rounds, cells and
iterations never meet, and neither do members whose views of the boundary differ (another member
list is another grid: its cells would mix partial means). One round (g >= n) keeps the single-group
key of a boundary: the iteration's bits alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

ROUND_BITS = 4  # group bits that number the round
GRID_BITS = 16  # group bits that name the grid (a hash of the member list and the group size)
MAX_ROUNDS = 2**ROUND_BITS  # g=2 covers 65,536 members


@dataclass(frozen=True)
class RoundGroup:
    """One member's group in one round: the cell it shares with `members` (itself included)."""

    index: int  # the round, 0-based
    cell: tuple[int, ...]  # the member's grid coordinates with axis `index` removed
    members: tuple[str, ...]  # the names in this cell, sorted


@dataclass(frozen=True)
class MoshpitPlan:
    """The rounds one member runs at one boundary."""

    member: str
    group_size: int  # g: the most members of one cell
    rounds: tuple[RoundGroup, ...]
    grid: str  # GRID_BITS bits that only the members who planned from the same member list share

    @property
    def single_group(self) -> bool:
        return len(self.rounds) == 1


def rounds_needed(members: int, group_size: int) -> int:
    """d = ceil(log_g n), at least 1; integer arithmetic (no float log rounding)."""
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 members, got group size {group_size}")
    rounds, capacity = 1, group_size
    while capacity < members:
        rounds, capacity = rounds + 1, capacity * group_size
    return rounds


def grid_coordinates(index: int, group_size: int, rounds: int) -> tuple[int, ...]:
    """The base-g digits of `index`, least significant first (axis r is round r's)."""
    digits = []
    for _ in range(rounds):
        index, digit = divmod(index, group_size)
        digits.append(digit)
    return tuple(digits)


def cell_of(coordinates: tuple[int, ...], round_index: int) -> tuple[int, ...]:
    return coordinates[:round_index] + coordinates[round_index + 1 :]


def plan_rounds(members: Sequence[str], member: str, group_size: int) -> MoshpitPlan:
    """`member`'s rounds among `members` (names, unique; any order: they are sorted here)."""
    names = sorted(members)
    if len(set(names)) != len(names):
        raise ValueError("the members of a boundary must have unique names")
    if member not in names:
        raise ValueError(f"{member!r} is not one of the members")
    if len(names) == 1:
        return MoshpitPlan(member, group_size, (RoundGroup(0, (), (member,)),), grid_bits(names, group_size))
    rounds = rounds_needed(len(names), group_size)
    if rounds > MAX_ROUNDS:
        raise ValueError(f"{len(names)} members in groups of {group_size} need {rounds} rounds; at most {MAX_ROUNDS}")
    coordinates = {name: grid_coordinates(k, group_size, rounds) for k, name in enumerate(names)}
    mine = coordinates[member]
    plan = []
    for r in range(rounds):
        cell = cell_of(mine, r)
        plan.append(RoundGroup(r, cell, tuple(name for name in names if cell_of(coordinates[name], r) == cell)))
    return MoshpitPlan(member, group_size, tuple(plan), grid_bits(names, group_size))


def grid_bits(names: Sequence[str], group_size: int) -> str:
    """GRID_BITS bits of a hash of the sorted member list and g: the same for every member that planned alike."""
    digest = hashlib.sha256("\n".join([str(group_size), *names]).encode()).digest()
    return format(int.from_bytes(digest[:4], "big") >> (32 - GRID_BITS), f"0{GRID_BITS}b")


def round_group_bits(iteration_bits: str, plan: MoshpitPlan, round_index: int) -> str:
    """hivemind group bits of `plan`'s round: the iteration's bits, then (with several rounds) the
    grid's bits, the round number and the cell's digits in binary."""
    if plan.single_group:
        return iteration_bits
    digit_bits = max(1, (plan.group_size - 1).bit_length())
    cell = plan.rounds[round_index].cell
    return iteration_bits + plan.grid + format(round_index, f"0{ROUND_BITS}b") + "".join(format(digit, f"0{digit_bits}b") for digit in cell)

