"""start_dht: bootstrap, unreachable initial peers, persistent identity."""

from __future__ import annotations

import time

import pytest

from p2pcold.swarm import peer_id, start_dht, stop_dht, visible_maddrs
from p2pcold.utils import P2PColdError

from helpers import fast_config

pytestmark = [pytest.mark.network]


@pytest.mark.timeout(60)
def test_unreachable_initial_peer_is_a_clear_error(swarm):
    (first,) = swarm.start(1, fast_config())
    maddr = visible_maddrs(first)[0]
    dead = maddr.replace(f"/tcp/{maddr.split('/tcp/')[1].split('/')[0]}/", "/tcp/1/")  # nobody listens on port 1
    started = time.monotonic()
    with pytest.raises(P2PColdError, match="none of the initial peers answered"):
        start_dht(fast_config(bootstrap_timeout=5.0), [dead])
    assert time.monotonic() - started < 5.0 + fast_config().dht_startup_timeout


@pytest.mark.timeout(60)
def test_malformed_initial_peer_is_refused():
    with pytest.raises(P2PColdError, match="lacks the /p2p/"):
        start_dht(fast_config(), ["/ip4/127.0.0.1/tcp/4001"])


@pytest.mark.timeout(90)
def test_identity_path_gives_a_stable_peer_id(tmp_path):
    config = fast_config(identity_path=str(tmp_path / "peer.key"))
    dht = start_dht(config, [])
    try:
        first = peer_id(dht)
        assert visible_maddrs(dht)[0].endswith(f"/p2p/{first}")
    finally:
        stop_dht(dht)
    dht = start_dht(config, [])
    try:
        assert peer_id(dht) == first
    finally:
        stop_dht(dht)
