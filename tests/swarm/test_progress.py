"""publish_progress / read_progress: one record per peer, replaced on re-publish, gone after its ttl."""

from __future__ import annotations

import dataclasses
import time

import pytest

from p2pcold.swarm import PeerProgress, peer_id, publish_progress, read_progress

from helpers import fast_config

pytestmark = [pytest.mark.network]


@pytest.mark.timeout(60)
def test_progress_is_published_replaced_and_expires(swarm):
    a, b, reader = swarm.start(3, fast_config())
    alive = PeerProgress(peer_id(a), "sst2", 3, "finetuning", train_loss=0.42, examples_per_second=120.5)
    dying = PeerProgress(peer_id(b), "mnli", 2, "averaging", dev_accuracy=0.8, last_group_size=3)
    before = time.time()
    assert publish_progress(a, "prog", alive, ttl=30.0)
    assert publish_progress(b, "prog", dying, ttl=2.0)

    records = read_progress(reader, "prog", timeout=5.0)
    assert [(r.dataset, r.iteration, r.phase) for r in records] == [("mnli", 2, "averaging"), ("sst2", 3, "finetuning")]
    assert records[1].train_loss == pytest.approx(0.42) and records[1].dev_accuracy is None
    assert records[0].last_group_size == 3 and all(r.last_seen >= before for r in records)
    assert read_progress(reader, "another-run", timeout=5.0) == []

    assert publish_progress(a, "prog", PeerProgress(peer_id(a), "sst2", 4, "done", dev_accuracy=0.9), ttl=30.0)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        records = read_progress(reader, "prog", timeout=5.0)
        if [r.peer_id for r in records] == [peer_id(a)]:
            break
        time.sleep(0.25)
    assert [(r.peer_id, r.iteration, r.phase) for r in records] == [(peer_id(a), 4, "done")]


@pytest.mark.timeout(60)
def test_a_peer_cannot_overwrite_or_impersonate_another_peers_record(swarm):
    """Issue 8: records are owned. A rogue member (b) stores a forged record under a's subkey, one under
    its own subkey that claims a's peer id, and fake peers under plain subkeys: readers see a's own
    record only, and a's re-publications still replace it."""
    from p2pcold.swarm.records import put_record, record_owner

    a, rogue, reader = swarm.start(3, fast_config())
    assert publish_progress(a, "own", PeerProgress(peer_id(a), "sst2", 1, "finetuning"), ttl=30.0)
    forged = {**dataclasses.asdict(PeerProgress(peer_id(a), "forged", 9, "done")), "last_seen": time.time()}
    put_record(rogue, "p2pcold/own/progress", record_owner(a), forged, ttl=30.0, timeout=5.0)  # unsigned: refused
    put_record(rogue, "p2pcold/own/progress", record_owner(rogue), forged, ttl=30.0, timeout=5.0)  # claims a's id
    for i in range(3):
        fake = {**dataclasses.asdict(PeerProgress(f"QmFake{i}", f"fake{i}", 1, "finetuning")), "last_seen": time.time()}
        put_record(rogue, "p2pcold/own/progress", f"QmFake{i}", fake, ttl=30.0, timeout=5.0)
    assert publish_progress(a, "own", PeerProgress(peer_id(a), "sst2", 2, "averaging"), ttl=30.0)
    records = read_progress(reader, "own", timeout=5.0)
    assert [(r.peer_id, r.dataset, r.iteration) for r in records] == [(peer_id(a), "sst2", 2)]
