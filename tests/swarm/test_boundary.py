"""The boundary policy as tables of progress records: no network, no clock (p2pcold.swarm.boundary)."""

from __future__ import annotations

import pytest

from p2pcold.swarm import PeerProgress
from p2pcold.swarm.boundary import (
    Adopt,
    Fuse,
    Solo,
    Train,
    Wait,
    a_record_holds,
    decide,
    decide_start,
    duplicate_dataset_peers,
    peers_behind,
    watchers_behind,
    ready_contributors,
    repository_word,
    stragglers,
    view_is_fresh,
)
from p2pcold.swarm.tracker import newest_per_dataset


def peer(
    dataset: str, iteration: int, phase: str, *, last_fusion: str | None = None, last_seen: float = 100.0, peer_id: str | None = None, body: str = "f"
) -> PeerProgress:
    """A record; `body`: one hex digit standing for the base it holds (same digit, same base)."""
    body_hash = body * 64
    return PeerProgress(peer_id or f"id-{dataset}", dataset, iteration, phase, last_seen=last_seen, last_fusion=last_fusion, body_hash=body_hash)


# decide(iteration=2, peers, last_group, now, wait_until=10, deadline=20)
BOUNDARY = [
    ("empty swarm, early: a peer may not have published yet", [], set(), 0, Wait("nobody else at iteration 2 yet")),
    ("empty swarm, the wait is over", [], set(), 12, Solo("nobody else at iteration 2")),
    ("everyone at the boundary", [peer("b", 2, "averaging"), peer("c", 2, "averaging")], set(), 0, Fuse(("b", "c"))),
    ("a straggler still finetuning", [peer("b", 2, "averaging"), peer("c", 2, "finetuning")], set(), 0, Wait("peers still on their way", ("c",))),
    ("a straggler past the wait: fuse without it", [peer("b", 2, "averaging"), peer("c", 2, "finetuning")], set(), 11, Fuse(("b",), ("c",))),
    ("only stragglers, past the wait", [peer("c", 2, "finetuning")], set(), 11, Solo("nobody else at iteration 2")),
    ("a joiner and a downloader count as on their way", [peer("b", 2, "joining"), peer("c", 2, "downloading")], set(), 3, Wait("peers still on their way", ("b", "c"))),
    ("two peers ahead: adopt their base", [peer("b", 3, "finetuning"), peer("c", 3, "averaging"), peer("d", 2, "averaging")], set(), 0, Adopt(3, "the swarm is at iteration 3")),
    ("peers ahead win even past the deadline", [peer("b", 4, "done"), peer("c", 4, "done")], set(), 25, Adopt(4, "the swarm is at iteration 4")),
    ("one record far ahead is not the swarm either", [peer("rogue", 9, "done", body="9"), peer("c", 4, "done")], set(), 12, Solo("nobody else at iteration 2")),
    # issue 8: one record is not the swarm (a rogue's, a ghost's): it must not move anybody on
    ("one record ahead is not the swarm", [peer("b", 3, "finetuning"), peer("c", 2, "averaging")], set(), 0, Fuse(("c",))),
    ("one record at 2**32 - 1 moves nobody", [peer("rogue", 2**32 - 1, "done"), peer("c", 2, "averaging")], set(), 0, Fuse(("c",))),
    ("two records ahead that disagree on the base are not the swarm", [peer("r1", 8, "finetuning", body="1"), peer("r2", 8, "finetuning", body="2"), peer("c", 2, "averaging")], set(), 0, Fuse(("c",))),
    ("a rogue far ahead does not hide the group's base", [peer("rogue", 9, "done", body="9"), peer("c", 4, "done"), peer("d", 4, "done")], set(), 0, Adopt(4, "the swarm is at iteration 4")),
    ("deadline passed", [peer("b", 2, "averaging")], set(), 20, Solo("the boundary deadline passed")),
    (
        "a last-group member not yet republished",
        [peer("b", 1, "averaging"), peer("c", 2, "averaging")],
        {"id-b"},
        0,
        Wait("peers still on their way", ("b",)),
    ),
    ("a peer behind that was not in the last group is not waited for", [peer("b", 1, "finetuning"), peer("c", 2, "averaging")], set(), 0, Fuse(("c",))),
    ("a done last-group member is not waited for", [peer("b", 1, "done"), peer("c", 2, "averaging")], {"id-b"}, 0, Fuse(("c",))),
    ("a done peer at the boundary is no partner", [peer("b", 2, "done")], set(), 12, Solo("nobody else at iteration 2")),
]


@pytest.mark.parametrize("situation, peers, last_group, now, expected", BOUNDARY, ids=[row[0] for row in BOUNDARY])
def test_decide_at_the_boundary(situation, peers, last_group, now, expected):
    assert decide(2, peers, last_group, now, wait_until=10, deadline=20) == expected


# decide_start(iteration=3, peers, last_fusion, now, wait_until=10)
START = [
    ("fused last time", [peer("b", 3, "finetuning", last_fusion="failed")], "ok", 0, Train()),
    ("first iteration", [], None, 0, Train()),
    ("the swarm is ahead: catch up", [peer("b", 5, "finetuning"), peer("c", 5, "averaging")], "ok", 0, Adopt(5, "the swarm is at iteration 5")),
    ("one peer ahead is not the swarm", [peer("b", 5, "finetuning")], "ok", 0, Train()),
    (
        "our fusion failed, another peer of the same iteration fused: adopt its body",
        [peer("b", 3, "averaging", last_fusion="ok")],
        "failed",
        0,
        Adopt(3, "b fused at boundary 2; taking the group's base"),
    ),
    ("a solo peer also adopts a fused body", [peer("b", 3, "finetuning", last_fusion="ok")], "solo", 12, Adopt(3, "b fused at boundary 2; taking the group's base")),
    ("our fusion failed, a partner still at the boundary", [peer("b", 2, "averaging")], "failed", 0, Wait("peers still at boundary 2", ("b",))),
    ("our fusion failed, the wait is over", [peer("b", 2, "averaging")], "failed", 10, Train()),
    ("both sides failed: nobody fused, keep ours", [peer("b", 3, "finetuning", last_fusion="failed")], "failed", 0, Train()),
    ("we adopted last time", [peer("b", 3, "finetuning", last_fusion="ok")], "adopted", 0, Train()),
]


@pytest.mark.parametrize("situation, peers, last_fusion, now, expected", START, ids=[row[0] for row in START])
def test_decide_before_finetuning(situation, peers, last_fusion, now, expected):
    assert decide_start(3, peers, last_fusion, now, wait_until=10) == expected


# decide(iteration=2, ..., not_waiting_for=...): a ghost (a record that says "finetuning" forever)
GHOST = [
    ("a ghost is waited for once", [peer("b", 2, "averaging"), peer("ghost", 2, "finetuning")], frozenset(), 0, Wait("peers still on their way", ("ghost",))),
    ("then no more", [peer("b", 2, "averaging"), peer("ghost", 2, "finetuning")], frozenset({"id-ghost"}), 0, Fuse(("b",))),
    ("a ghost alone costs no wait either", [peer("ghost", 2, "finetuning")], frozenset({"id-ghost"}), 0, Wait("nobody else at iteration 2 yet")),
]


@pytest.mark.parametrize("situation, peers, stragglers, now, expected", GHOST, ids=[row[0] for row in GHOST])
def test_a_ghost_costs_one_bounded_wait(situation, peers, stragglers, now, expected):
    assert decide(2, peers, set(), now, wait_until=10, deadline=20, not_waiting_for=stragglers) == expected


def test_a_straggler_is_waited_for_again_once_it_reaches_a_boundary():
    swarm = [peer("b", 2, "averaging"), peer("ghost", 2, "finetuning")]
    missed = stragglers(frozenset(), ("ghost",), swarm)
    assert missed == {"id-ghost"}
    assert stragglers(missed, (), swarm) == {"id-ghost"}  # still finetuning: still not waited for
    assert stragglers(missed, (), [peer("ghost", 3, "averaging")]) == frozenset()  # it got there: forgiven


def test_a_fresh_view_of_the_partners_is_waited_on_for_one_window_within_the_boundarys_wait():
    # view_is_fresh(view_since, now, settle_s=3, wait_until=10)
    assert view_is_fresh(5.0, 6.0, 3.0, 10.0)  # seen for 1 s: a record may still be on its way
    assert not view_is_fresh(5.0, 8.5, 3.0, 10.0)  # unchanged for a whole window: plan
    assert not view_is_fresh(9.0, 10.5, 3.0, 10.0)  # past the boundary's wait: plan with what is there
    # one group (settle_s=0): the view only has to hold through one more read
    assert view_is_fresh(5.0, 5.1, 0.0, 10.0, read_again=False)
    assert not view_is_fresh(5.0, 5.1, 0.0, 10.0, read_again=True)
    assert view_is_fresh(5.0, 8.5, 3.0, 10.0, read_again=False)  # a window is not a second read


def test_a_record_ahead_is_worth_a_moment_only_when_it_exists():
    assert a_record_holds(3, [peer("rogue", 8, "finetuning", body="1")])  # not vouched for, but worth a look
    assert not a_record_holds(3, [peer("b", 2, "averaging")])  # a fresh swarm: start at once


def test_a_dead_peer_is_simply_absent_and_a_restarted_peer_counts_once():
    """An expired record is gone from the snapshot; a restarted peer's old record (same dataset, other
    peer id) is shadowed by its newer one, and this peer's own dataset is not among the others."""
    records = [
        peer("b", 1, "averaging", peer_id="old-b", last_seen=50.0),
        peer("b", 2, "averaging", peer_id="new-b", last_seen=90.0),
        peer("a", 0, "averaging", peer_id="my-old-self", last_seen=40.0),
    ]
    others = newest_per_dataset(records, exclude_dataset="a")
    assert [(p.peer_id, p.iteration) for p in others] == [("new-b", 2)]
    assert decide(2, others, {"old-b"}, 0, 10, 20) == Fuse(("b",))


def test_peers_behind_keep_the_final_base_served():
    peers = [peer("b", 4, "averaging"), peer("c", 5, "done"), peer("d", 5, "averaging", last_fusion="failed"), peer("e", 5, "averaging", last_fusion="ok")]
    assert peers_behind(5, peers) == ("b", "d")
    assert peers_behind(5, [peer("c", 5, "done", last_fusion="failed")]) == ()


def test_an_evaluating_monitor_without_the_final_base_keeps_it_served():
    assert watchers_behind(5, {"12D3KooWmonitorA": 4, "12D3KooWmonitorB": 5}) == ("monitor monitorA",)
    assert watchers_behind(5, {}) == ()
    assert watchers_behind(5, None) == ("monitors (not read yet)",)  # a snapshot from before the peer was done


def test_a_second_live_peer_on_the_dataset_is_told_from_a_record_left_behind():
    left_behind = peer("a", 1, "averaging", peer_id="dead", last_seen=10.0)
    other_dataset = peer("b", 1, "averaging", peer_id="b", last_seen=30.0)
    first_seen = {"dead": 10.0, "alive": 20.0}
    assert duplicate_dataset_peers([left_behind, other_dataset], "a", first_seen) == ()
    assert duplicate_dataset_peers([left_behind, peer("a", 1, "finetuning", peer_id="alive", last_seen=27.0)], "a", first_seen) == ("alive",)
    assert duplicate_dataset_peers([peer("a", 0, "joining", peer_id="newcomer", last_seen=30.0)], "a", first_seen) == ("newcomer",)


def test_the_repository_side():
    peers = [peer("a", 1, "ready"), peer("b", 1, "finetuning"), peer("c", 0, "ready")]
    assert ready_contributors(1, peers, ["a", "b", "c"]) == ["a"]
    assignments = {1: {"iteration": 1, "contributors": ["a", "b"]}}
    assert repository_word(assignments, 1, "contributors") == assignments[1]
    assert repository_word(assignments, 1, "group") is None and repository_word(assignments, 2, "contributors") is None
