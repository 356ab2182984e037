"""Records read from the DHT come from other peers (progress, identity, all-reduce verdicts): malformed ones
are ignored, never trusted."""

from __future__ import annotations

import dataclasses

import pytest

from p2pcold.config import SwarmConfig
from p2pcold.swarm import PeerProgress, RunIdentity
from p2pcold.swarm.averaging import group_step_timeout_s, verdict_failed, verdict_wait_s

PROGRESS = PeerProgress(peer_id="Qm1", dataset="sst2", iteration=3, phase="training", train_loss=0.5)
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
