"""Moshpit grid math (p2pcold.swarm.moshpit) with plain lists: rounds, cells, group bits."""

from __future__ import annotations

import pytest

from p2pcold.swarm.moshpit import MAX_ROUNDS, plan_rounds, round_group_bits, rounds_needed

ITERATION = format(7, "032b")


def names(n: int) -> list[str]:
    return [f"ds{k:02d}" for k in range(n)]


def groups_of_round(members: list[str], group_size: int, round_index: int) -> set[tuple[str, ...]]:
    return {plan_rounds(members, m, group_size).rounds[round_index].members for m in members}


def test_rounds_needed_is_the_integer_log():
    assert [rounds_needed(n, 4) for n in (1, 2, 4, 5, 15, 16, 17, 64, 65)] == [1, 1, 1, 2, 2, 2, 3, 3, 4]
    assert rounds_needed(1024, 2) == 10 and rounds_needed(1024, 32) == 2
    with pytest.raises(ValueError):
        rounds_needed(4, 1)


def test_sixteen_members_in_groups_of_four_take_two_rounds_of_four_groups():
    members = names(16)
    first, second = groups_of_round(members, 4, 0), groups_of_round(members, 4, 1)
    assert len(first) == len(second) == 4
    assert all(len(group) == 4 for group in first | second)
    assert sorted(first)[0] == ("ds00", "ds01", "ds02", "ds03")  # round 0: consecutive blocks
    for group in second:  # round 1: one member from each round-0 group
        assert sorted(next(g for g in first if m in g) for m in group) == sorted(first)
    for member in members:  # every member meets everyone through its two groups
        plan = plan_rounds(members, member, 4)
        assert len(plan.rounds) == 2 and not plan.single_group
        reached = {m for partner in plan.rounds[1].members for m in plan_rounds(members, partner, 4).rounds[0].members}
        assert reached == set(members)


def test_the_plan_does_not_depend_on_the_order_members_are_listed_in():
    members = names(16)
    assert plan_rounds(members, "ds05", 4) == plan_rounds(list(reversed(members)), "ds05", 4)


def test_fifteen_members_leave_one_cell_short():
    members = names(15)
    first, second = groups_of_round(members, 4, 0), groups_of_round(members, 4, 1)
    assert sorted(len(g) for g in first) == [3, 4, 4, 4] and sorted(len(g) for g in second) == [3, 4, 4, 4]
    assert set().union(*first) == set().union(*second) == set(members)


def test_five_members_in_groups_of_four():
    members = names(5)
    assert groups_of_round(members, 4, 0) == {("ds00", "ds01", "ds02", "ds03"), ("ds04",)}
    assert groups_of_round(members, 4, 1) == {("ds00", "ds04"), ("ds01",), ("ds02",), ("ds03",)}


def test_a_group_size_of_at_least_the_members_is_one_round_under_the_iteration_key():
    members = names(4)
    for size in (4, 8):
        plan = plan_rounds(members, "ds02", size)
        assert plan.single_group and plan.rounds[0].members == tuple(members)
        assert round_group_bits(ITERATION, plan, 0) == ITERATION  # today's single-group key
    alone = plan_rounds(["ds00"], "ds00", 4)
    assert alone.single_group and alone.rounds[0].members == ("ds00",)


def test_group_bits_differ_between_rounds_cells_and_iterations_and_agree_within_a_cell():
    members = names(16)
    bits = {}
    for member in members:
        plan = plan_rounds(members, member, 4)
        for r, group in enumerate(plan.rounds):
            key = round_group_bits(ITERATION, plan, r)
            assert set(key) <= {"0", "1"} and key.startswith(ITERATION)
            assert bits.setdefault((r, group.members), key) == key  # the same key for one cell
    assert len(set(bits.values())) == len(bits) == 8  # 2 rounds x 4 cells, all distinct
    plan = plan_rounds(members, "ds00", 4)
    assert round_group_bits(format(8, "032b"), plan, 0) != round_group_bits(ITERATION, plan, 0)


def test_members_who_plan_from_different_member_lists_never_share_a_group_key():
    """A member that sees one peer fewer at the boundary computes another grid: none of its keys may
    be one of the others' (its cells would fuse partial means with theirs)."""
    everyone, one_missing = names(4), names(3)  # both 2 rounds of pairs: the same cells but for the grid bits
    full = {round_group_bits(ITERATION, plan_rounds(everyone, m, 2), r) for m in everyone for r in range(2)}
    short = {round_group_bits(ITERATION, plan_rounds(one_missing, m, 2), r) for m in one_missing for r in range(2)}
    assert full.isdisjoint(short)
    assert plan_rounds(everyone, "ds00", 2).grid != plan_rounds(everyone, "ds00", 4).grid


def test_refuses_what_it_cannot_plan():
    with pytest.raises(ValueError):
        plan_rounds(["a", "b"], "c", 2)
    with pytest.raises(ValueError):
        plan_rounds(["a", "a", "b"], "a", 2)
    with pytest.raises(ValueError):
        plan_rounds([str(k) for k in range(2**MAX_ROUNDS + 1)], "0", 2)


def test_the_members_of_a_round_are_everyone_its_members_had_folded_in_and_malformed_entries_are_dropped():
    from p2pcold.swarm.fusion_result import GroupMember
    from p2pcold.swarm.group_fusion import contributors

    direct = {"A": GroupMember("A", 2.0, {"dataset": "a"}), "C": GroupMember("C", 2.0, {"dataset": "c"})}  # weights of round 1
    gathered = {
        "A": {"folded": [["A", 1.0, {"dataset": "a"}], ["B", 1.0, {"dataset": "b"}]]},
        "C": {"folded": [["C", 1.0, {"dataset": "c"}], ["D", 1.0, {"dataset": "d"}], ["E"], [3, 1.0, {}], ["F", "x", {}], "junk"]},
    }
    members = contributors(gathered, direct)
    assert sorted(members) == ["A", "B", "C", "D"]
    assert {peer: m.weight for peer, m in members.items()} == {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0}  # their own weights
    assert contributors({"A": {}, "C": {}}, direct) == direct  # one group: its members
