"""publish_progress / read_progress: one record per peer, replaced on re-publish, gone after its ttl."""

from __future__ import annotations

import time

import pytest

from p2pcold.swarm import PeerProgress, peer_id, publish_progress, read_progress

from helpers import fast_config

pytestmark = [pytest.mark.network]


@pytest.mark.timeout(60)
def test_progress_is_published_replaced_and_expires(swarm):
    a, b, reader = swarm.start(3, fast_config())
    alive = PeerProgress(peer_id(a), "sst2", 3, "training", train_loss=0.42, examples_per_second=120.5)
    dying = PeerProgress(peer_id(b), "mnli", 2, "fusing", dev_accuracy=0.8, last_group_size=3)
    before = time.time()
    assert publish_progress(a, "prog", alive, ttl=30.0)
    assert publish_progress(b, "prog", dying, ttl=2.0)

    records = read_progress(reader, "prog", timeout=5.0)
    assert [(r.dataset, r.iteration, r.phase) for r in records] == [("mnli", 2, "fusing"), ("sst2", 3, "training")]
    assert records[1].train_loss == pytest.approx(0.42) and records[1].dev_accuracy is None
    assert records[0].last_group_size == 3 and all(r.last_seen >= before for r in records)
    assert read_progress(reader, "another-run", timeout=5.0) == []

    assert publish_progress(a, "prog", PeerProgress(peer_id(a), "sst2", 4, "evaluating", dev_accuracy=0.9), ttl=30.0)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        records = read_progress(reader, "prog", timeout=5.0)
        if [r.peer_id for r in records] == [peer_id(a)]:
            break
        time.sleep(0.25)
    assert [(r.peer_id, r.iteration, r.phase) for r in records] == [(peer_id(a), 4, "evaluating")]
