"""Records read from the DHT come from other peers (progress, identity, all-reduce verdicts): malformed ones
are ignored, never trusted."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from p2pcold.config import SwarmConfig
from p2pcold.swarm import PeerProgress, RunIdentity
from p2pcold.swarm.verdicts import group_step_timeout_s, verdict_failed, verdict_wait_s

PROGRESS = PeerProgress(peer_id="Qm1", dataset="sst2", iteration=3, phase="finetuning", train_loss=0.5)
IDENTITY = RunIdentity(
    run_id="r", base_model="minilm", body_hash="ab" * 32, schema_hash="cd" * 32, protocol=1, founder="Qm1", created_at=1.0
)


@pytest.mark.parametrize("good", [PROGRESS, IDENTITY])
def test_a_well_formed_record_round_trips(good):
    assert type(good).from_record(dataclasses.asdict(good)) == good


@pytest.mark.parametrize(
    "record",
    [
        None,
        "not a dict",
        {**dataclasses.asdict(PROGRESS), "iteration": "3"},  # wrong type
        {k: v for k, v in dataclasses.asdict(PROGRESS).items() if k != "phase"},  # missing field
        {**dataclasses.asdict(PROGRESS), "peer_id": 7},
    ],
)
def test_malformed_progress_is_ignored(record):
    assert PeerProgress.from_record(record) is None


@pytest.mark.parametrize(
    "record",
    [
        [1, 2],
        {**dataclasses.asdict(IDENTITY), "protocol": "1"},
        {k: v for k, v in dataclasses.asdict(IDENTITY).items() if k != "body_hash"},
    ],
)
def test_malformed_identity_is_ignored(record):
    assert RunIdentity.from_record(record) is None


def test_a_record_of_an_older_peer_without_the_newer_fields_still_parses():
    old = {k: v for k, v in dataclasses.asdict(PROGRESS).items() if k not in ("last_fusion", "last_group", "fusion_attempts", "fusion_error")}
    parsed = PeerProgress.from_record(old)
    assert parsed == PROGRESS and parsed.last_fusion is None and parsed.last_group == []
    assert PeerProgress.from_record({**dataclasses.asdict(PROGRESS), "last_group": "sst2"}) is None  # wrong type
    identity = {k: v for k, v in dataclasses.asdict(IDENTITY).items() if k not in ("contract", "contract_hash")}
    assert RunIdentity.from_record(identity) == IDENTITY


@pytest.mark.parametrize(
    "verdict, failed",
    [
        (None, False),  # not published (yet): missing, not failed
        ({"clean": True, "reason": ""}, False),
        ({"clean": False, "reason": "partial all-reduce"}, True),
        ({"clean": "yes"}, True),  # malformed verdicts from other peers count as failures
        ({}, True),
        ("clean", True),
        (1, True),
    ],
)
def test_a_verdict_counts_as_clean_only_when_it_says_so(verdict, failed):
    assert verdict_failed(verdict) is failed


def test_the_verdict_wait_covers_every_members_allreduce_and_hivemind_never_cuts_it_short():
    config = SwarmConfig()
    assert verdict_wait_s(config) >= config.allreduce_timeout + config.next_chunk_timeout
    assert group_step_timeout_s(config) > verdict_wait_s(config)


# --------------------------------------------------------------------------- bounds and owners (issue 8)


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """An owner mark and its peer id, from a p2pd identity key like start_dht's."""
    from hivemind.p2p import P2P, PeerID

    from p2pcold.swarm.records import load_signing_key, owner_subkey

    path = tmp_path_factory.mktemp("key") / "identity.key"
    P2P.generate_identity(str(path))
    return owner_subkey(load_signing_key(path)), str(PeerID.from_identity(path.read_bytes()))


@pytest.mark.parametrize(
    "change",
    [
        {"iteration": 2**32},  # beyond the group key's 32 bits
        {"iteration": -1},
        {"iteration": True},
        {"phase": "hacking"},  # not a known phase
        {"train_loss": float("nan")},
        {"dev_accuracy": 1.5},
        {"examples_per_second": float("inf")},
        {"last_group": ["x" * 201]},
        {"last_group": ["sst2"] * 2000},
        {"fusion_error": "e" * 10_000},
        {"fusion_attempts": -3},
        {"last_fusion": "stolen"},
        {"body_hash": "not-a-hash"},
        {"dataset": ""},
    ],
)
def test_progress_out_of_bounds_is_ignored(change):
    assert PeerProgress.from_record({**dataclasses.asdict(PROGRESS), **change}) is None


def test_a_progress_record_counts_only_under_its_own_peers_owner_mark(owner):
    from p2pcold.swarm.progress import progress_record_problem

    mark, peer = owner
    mine = {**dataclasses.asdict(PROGRESS), "peer_id": peer}
    assert progress_record_problem(mark, mine, iterations=10) is None
    assert "claims to be peer Qm1" in progress_record_problem(mark, dataclasses.asdict(PROGRESS), iterations=10)  # another peer's id
    assert "unsigned" in progress_record_problem(peer, mine, iterations=10)  # a plain subkey: nobody's
    assert "beyond the run's 10" in progress_record_problem(mark, {**mine, "iteration": 11}, iterations=10)


def test_assignments_are_owned_and_bounded(owner):
    from p2pcold.swarm.records import assignment_iteration, assignment_record_problem, assignment_subkey

    mark, _ = owner
    subkey = assignment_subkey(mark, 4)
    assert assignment_iteration(subkey) == 4
    good = {"iteration": 4, "contributors": ["sst2"], "group": ["sst2"], "fused": ["sst2"], "final": False}
    assert assignment_record_problem(subkey, good, iterations=5) is None
    assert assignment_record_problem("4", good, iterations=5) is not None  # unsigned
    assert assignment_record_problem(subkey, {**good, "iteration": 5}, iterations=5) is not None  # subkey says 4
    assert assignment_record_problem(assignment_subkey(mark, 9), {**good, "iteration": 9}, iterations=5) is not None
    assert assignment_record_problem(subkey, {**good, "contributors": "sst2"}, iterations=5) is not None
    assert assignment_record_problem(subkey, {**good, "extra": 1}, iterations=5) is not None


def test_the_run_validator_refuses_bad_records_with_one_warning_line_per_minute(owner, caplog):
    from hivemind.dht.validation import DHTRecord
    from hivemind.dht.routing import DHTID
    from hivemind.utils.serializer import MSGPackSerializer

    from p2pcold.swarm import records
    from p2pcold.swarm.progress import progress_key
    from p2pcold.swarm.validation import run_record_validators

    mark, peer = owner
    (validator,) = run_record_validators("r", iterations=10)
    key = DHTID.generate(source=progress_key("r")).to_bytes()

    def record(subkey, value):
        return DHTRecord(key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), 0.0)

    good = {**dataclasses.asdict(PROGRESS), "peer_id": peer}
    records._last_warned.clear()
    with caplog.at_level("DEBUG", logger="p2pcold"):
        assert validator.validate(record(mark, good))
        for _ in range(5):
            assert not validator.validate(record(mark, {**good, "iteration": 2**32}))
        assert not validator.validate(DHTRecord(key, b"\xc1", b"\xc1", 0.0))  # not even msgpack
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "bad progress record" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    other_key = DHTRecord(DHTID.generate(source="someone/else").to_bytes(), b"x", b"y", 0.0)
    assert validator.validate(other_key)  # hivemind's own records are not the run's business


def test_an_identity_entry_is_owned_and_bounded(owner):
    from p2pcold.swarm.identity import identity_record_problem

    mark, _ = owner
    assert identity_record_problem(mark, dataclasses.asdict(IDENTITY)) is None
    assert identity_record_problem(mark, None) is None  # a withdrawn entry (a founder that lost the race)
    assert identity_record_problem("Qm1", dataclasses.asdict(IDENTITY)) is not None
    assert identity_record_problem(mark, {**dataclasses.asdict(IDENTITY), "created_at": float("-inf")}) is not None
    assert identity_record_problem(mark, {**dataclasses.asdict(IDENTITY), "body_hash": "short"}) is not None


# --------------------------------------------------------------------------- state downloads


def _body(value: float):
    import torch

    return {"w": torch.full((3, 2), value), "b": torch.full((2,), value)}


def _record(peer: str, iteration: int, body, group: list[str] = ()) -> PeerProgress:
    from p2pcold.utils import state_dict_hash

    return PeerProgress(peer, f"d-{peer}", iteration, "finetuning", body_hash=state_dict_hash(body), last_group_peers=list(group))


def test_the_members_of_a_fused_group_vouch_for_each_others_copy():
    """Members' fused bodies differ by rounding (hivemind adds the average as a delta to each one's own
    part): the group they both name, not the hash, vouches. A rogue naming an honest group is not in it."""
    from p2pcold.swarm.state_check import trusted_bodies

    a_copy, b_copy, garbage = _body(0.5), _body(0.5 + 1e-7), _body(9.0)
    group = sorted(["a", "b"])
    a, b = _record("a", 3, a_copy, group), _record("b", 3, b_copy, group)
    assert trusted_bodies([a, b]) == {3: frozenset([a.body_hash, b.body_hash])}
    assert trusted_bodies([a]) == {}  # its group-mate's record is gone: nothing vouches
    intruder = _record("rogue", 3, garbage, group)  # claims the honest group, but is not in it
    assert trusted_bodies([a, intruder]) == {}
    pair = _record("rogue", 3, garbage, sorted(["a", "rogue"]))  # a group that a never names
    assert trusted_bodies([a, pair]) == {}


def test_a_downloaded_body_is_adopted_only_when_two_peers_vouch_for_it():
    from p2pcold.swarm.state_check import StateCheck, trusted_bodies

    fused, garbage = _body(0.5), _body(9.0)
    records = [_record("a", 3, fused), _record("b", 3, fused), _record("rogue", 8, garbage)]
    trusted = trusted_bodies(records)
    assert trusted == {3: frozenset([_record("a", 3, fused).body_hash])}
    check = StateCheck(iterations=10, at_least=3, trusted=lambda: trusted)
    assert check.worth_asking() and check.problem(3, fused) is None
    assert "not vouched for" in check.problem(8, garbage)
    assert "not vouched for" in check.problem(3, garbage)
    assert "non-finite" in check.problem(3, _body(float("nan")))
    assert "outside 3..10" in check.problem(2**32, fused)
    assert "outside 3..10" in check.problem(2, fused)
    # one record alone (a rogue's, however many times it republishes) vouches for nothing
    assert not StateCheck(10, 4, trusted=lambda: trusted_bodies([_record("rogue", 8, garbage)] * 3)).worth_asking()
    # the centralized peer: no hash, but bounds, finiteness and its one donor
    repository = StateCheck(10, 0, only_from=frozenset(["repo"]))
    assert repository.problem(5, garbage) is None and repository.may_ask("repo") and not repository.may_ask("rogue")
