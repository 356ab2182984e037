"""The Repository's answer to a fusion that keeps failing: retried until the deadline, then an error
(published to the peers) unless `swarm.on_fusion_failure: skip`. The averager is scripted here; the
real all-reduce failures are injected in tests/swarm/test_failures.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from p2pcold.config import RunConfig, SwarmConfig
from p2pcold.repository import Repository
from p2pcold.swarm import FusionResult, FusionStatus, GroupMember
from p2pcold.utils import P2PColdError


class ScriptedAverager:
    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    def fuse(self, body, iteration, weight, deadline_s, metadata, share_result, expected_size, reference):
        self.calls += 1
        self.expected_size = expected_size
        return self.outcomes.pop(0) if self.outcomes else failed()


class RecordingTracker:
    def __init__(self):
        self.published = {}

    def publish_assignment(self, iteration, record):
        self.published[iteration] = record


def failed() -> FusionResult:
    return FusionResult(FusionStatus.FAILED, 0, None, attempts=1, reason="partial all-reduce: a reducer failed")


def repository(outcomes, on_fusion_failure="error") -> Repository:
    swarm = SwarmConfig(matchmaking_time=0.2, request_timeout=0.1, boundary_deadline=1.5, on_fusion_failure=on_fusion_failure)
    repo = Repository(RunConfig(swarm=swarm), dht=None, run_dir="unused")
    # the paper's fusion: θ_{i+1} is the contributors' average itself (RunState.step with the default options)
    repo.state = SimpleNamespace(base={"w": torch.zeros(2)}, iteration=0, step=lambda mean, contributors: mean)
    repo.averager, repo.tracker = ScriptedAverager(outcomes), RecordingTracker()
    return repo


def test_a_failed_fusion_is_retried_and_the_retry_is_used():
    averaged = {"w": torch.ones(2)}
    members = {"r": GroupMember("r", 0.0, {"dataset": "(repository)"}), "a": GroupMember("a", 1.0, {"dataset": "a"})}
    repo = repository([failed(), FusionResult(FusionStatus.OK, 0, averaged, group_size=2, members=members, attempts=1)])
    record = repo._fuse(0, ["a", "c"], ["a"])
    assert record == {"status": "ok", "members": ["a"], "attempts": 2, "failure": None}
    assert repo.state.base is averaged and repo.averager.calls == 2
    assert repo.averager.expected_size == 2  # the ready contributor and the Repository: assembled once both are in
    assert repo.tracker.published[0] == {"iteration": 0, "contributors": ["a", "c"], "group": ["a"], "fused": ["a"]}  # the peers stop retrying


def test_a_fusion_still_failing_at_the_deadline_stops_the_run_and_tells_the_peers():
    repo = repository([])
    with pytest.raises(P2PColdError, match=r"^iteration 0: fusion failed after \d+ attempt\(s\) within 2 s \(partial all-reduce: a reducer failed\); set swarm.on_fusion_failure: skip"):
        repo._fuse(0, ["a", "b"], ["a", "b"])
    assert repo.averager.calls >= 2  # retried until the deadline
    assert "fusion failed" in repo.tracker.published[0]["failure"] and repo.tracker.published[0]["group"] == ["a", "b"]


def test_skip_keeps_the_base_and_records_the_failure():
    repo = repository([], on_fusion_failure="skip")
    base = repo.state.base
    record = repo._fuse(0, ["a", "c"], ["a"])
    assert record["status"] == "failed" and record["attempts"] >= 2 and "reducer failed" in record["failure"]
    assert repo.state.base is base and repo.tracker.published == {}
