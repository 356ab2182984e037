"""SwarmTracker: one thread reads the run's records and publishes this peer's own, on real DHT nodes."""

from __future__ import annotations

import time

import pytest

from p2pcold.swarm import PeerProgress, Phase, SwarmTracker, peer_id, stop_dht
from p2pcold.utils import P2PColdError

from helpers import fast_config, unconfirmed

pytestmark = [pytest.mark.network]


def wait_for(tracker: SwarmTracker, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    snapshot = tracker.snapshot()
    while not predicate(snapshot):
        assert time.monotonic() < deadline, f"no such snapshot within {timeout} s: {snapshot}"
        snapshot = tracker.wait_for_update(1.0)
    return snapshot


@pytest.mark.timeout(90)
def test_trackers_see_each_other_and_a_failed_read_keeps_the_last_view(swarm, caplog):
    config = fast_config(poll_interval=0.2, progress_ttl=6.0)
    a, b, c = swarm.start(3, config)
    trackers = [
        SwarmTracker(a, "track", config, PeerProgress(peer_id(a), "sst2", 0, Phase.JOINING)),
        SwarmTracker(b, "track", config, PeerProgress(peer_id(b), "mnli", 0, Phase.JOINING)),
    ]
    repository = SwarmTracker(c, "track", config)  # publishes no record of its own
    try:
        seen = wait_for(trackers[0], lambda s: [p.dataset for p in s.peers] == ["mnli"])
        assert seen.taken_at > 0 and all(p.peer_id != peer_id(a) for p in seen.records)

        trackers[1].update(phase=Phase.AVERAGING, iteration=1, last_fusion="ok", last_group=["mnli", "sst2"], fusion_attempts=2)
        record = wait_for(trackers[0], lambda s: s.peers and s.peers[0].iteration == 1).peers[0]
        assert (record.phase, record.last_fusion, record.last_group, record.fusion_attempts) == ("averaging", "ok", ["mnli", "sst2"], 2)

        repository.publish_assignment(1, {"iteration": 1, "contributors": ["sst2"]})
        assert wait_for(trackers[1], lambda s: 1 in s.assignments).assignments[1]["contributors"] == ["sst2"]
        assert {p.dataset for p in wait_for(repository, lambda s: len(s.peers) == 2).peers} == {"sst2", "mnli"}

        # the node under trackers[0] dies: its reads fail, it keeps the last snapshot and says so once
        last = trackers[0].snapshot()
        stop_dht(a, grace_s=1.0)
        time.sleep(3 * config.poll_interval + config.dht_request_timeout)
        assert trackers[0].snapshot() == last
        assert sum("swarm view not refreshed" in r.getMessage() for r in caplog.records) <= 1

        # b's record expires from the others' view once it stops publishing
        trackers[1].close(timeout=5.0)
        wait_for(repository, lambda s: [p.dataset for p in s.peers] == ["sst2"] or not s.peers, timeout=config.progress_ttl + 15)
    finally:
        started = time.monotonic()
        for tracker in (*trackers, repository):
            tracker.close(timeout=5.0)
        assert time.monotonic() - started < 16


@pytest.mark.timeout(60)
def test_a_read_asked_for_comes_before_the_next_poll(swarm):
    """refresh_soon(): the boundary confirms a view with a second read at once, not one poll later."""
    config = fast_config(poll_interval=30.0)
    (node,) = swarm.start(1, config)
    tracker = SwarmTracker(node, "soon", config, PeerProgress(peer_id(node), "sst2", 0, Phase.JOINING))
    try:
        first = wait_for(tracker, lambda s: s.taken_at > 0)
        asked = time.time()
        tracker.refresh_soon()
        wait_for(tracker, lambda s: s.taken_at > asked > first.taken_at, timeout=10.0)  # the next poll is 30 s away
    finally:
        tracker.close(timeout=5.0)


@pytest.mark.timeout(60)
def test_the_repositorys_word_is_stored_again_until_the_dht_confirms_it(swarm, monkeypatch):
    """A store that the DHT does not confirm (its nearest nodes busy) is tried again within publish_timeout;
    one that never lands is one error line naming that timeout, in bounded time."""
    config = fast_config(poll_interval=0.2, publish_timeout=4.0, dht_request_timeout=1.0)
    a, b = swarm.start(2, config)
    store, tries = a.store, []

    def unconfirmed_twice(*args, **kwargs):
        """The first try lands but is not confirmed in time, the second is lost, the third is confirmed."""
        tries.append(args[0])
        if len(tries) == 1:
            store(*args, **kwargs).result(timeout=10)
        return unconfirmed() if len(tries) <= 2 else store(*args, **kwargs)

    monkeypatch.setattr(a, "store", unconfirmed_twice)
    repository, reader = SwarmTracker(a, "word", config), SwarmTracker(b, "word", config)
    try:
        repository.publish_assignment(0, {"iteration": 0, "contributors": ["sst2"]})
        assert len(tries) == 3
        assert wait_for(reader, lambda s: 0 in s.assignments).assignments[0]["contributors"] == ["sst2"]

        monkeypatch.setattr(a, "store", lambda *args, **kwargs: unconfirmed())
        started = time.monotonic()
        with pytest.raises(P2PColdError, match=r"could not publish the assignment of iteration 1 in the DHT within 4 s"):
            repository.publish_assignment(1, {"iteration": 1, "contributors": ["sst2"]})
        assert config.publish_timeout - 1.0 <= time.monotonic() - started <= config.publish_timeout + config.dht_request_timeout + 1.0
    finally:
        for tracker in (repository, reader):
            tracker.close(timeout=5.0)
