"""The dial-back check (swarm/reachability.py) on 127.0.0.1: a member dials a listening peer back, and
says whether it relays; the decision predicates. The real NAT is in tests/integration/test_nat.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from p2pcold.swarm import start_dht, visible_maddrs
from p2pcold.swarm.reachability import DialBack, dial_back, is_loopback_swarm, is_reachable, ports_to_check, serve_dial_back, undialable_announced

from helpers import fast_config

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def test_members_dial_back_a_listening_peer_and_report_their_relay(swarm):
    relaying, silent = fast_config(relay=True), fast_config(relay=False)
    (bootstrap,) = swarm.start(1, relaying)
    serve_dial_back(bootstrap, relaying)
    initial = visible_maddrs(bootstrap)
    second = start_dht(silent, initial)
    swarm.dhts.append(second)
    serve_dial_back(second, silent)
    port = free_port()
    client = start_dht(fast_config(port=port), initial, client_mode=True)
    swarm.dhts.append(client)

    check = dial_back(client, fast_config(port=port), initial + visible_maddrs(second))
    assert set(check.answered) == {str(bootstrap.peer_id), str(second.peer_id)}
    assert set(check.dialed_by) == set(check.answered)  # the client listens on 127.0.0.1: both reached it
    assert check.relays == (str(bootstrap.peer_id),)
    assert is_reachable(check) is True
    assert check.ports == check.dialed == (port,)

    # a port nobody listens on (a NAT router's): answered, not reached
    check = dial_back(client, fast_config(port=free_port()), initial)
    assert str(bootstrap.peer_id) in check.answered and not check.dialed_by and is_reachable(check) is False


def test_an_initial_peer_that_fails_a_first_request_is_asked_again(swarm):
    """The bootstrap's first answer is a refused stream (its service is not up yet): the check asks again
    within its timeout instead of counting the bootstrap as silent (and the peer as unreachable)."""
    config = fast_config(relay=True)
    (bootstrap,) = swarm.start(1, config)
    port = free_port()
    client = start_dht(fast_config(port=port), visible_maddrs(bootstrap), client_mode=True)
    swarm.dhts.append(client)
    late_service = threading.Timer(1.5, serve_dial_back, (bootstrap, config))
    started = time.monotonic()
    late_service.start()
    try:
        check = dial_back(client, fast_config(port=port), visible_maddrs(bootstrap))
    finally:
        late_service.join()
    assert check.answered == check.dialed_by == (str(bootstrap.peer_id),)
    assert time.monotonic() - started < fast_config().reachability_timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reachability_decisions():
    nobody = DialBack(ports=(5,), answered=(), dialed_by=(), relays=(), dialed=())
    assert is_reachable(nobody) is None
    behind_nat = DialBack(ports=(5,), answered=("a", "b"), dialed_by=(), relays=("a",), dialed=())
    assert is_reachable(behind_nat) is False
    half = DialBack(ports=(5, 6), answered=("a", "b"), dialed_by=("a",), relays=(), dialed=(5,))
    assert is_reachable(half) is True
    announced = ["/ip4/1.2.3.4/tcp/5", "/ip4/1.2.3.4/tcp/6"]
    assert undialable_announced(announced, half) == ["/ip4/1.2.3.4/tcp/6"]
    assert ports_to_check(fast_config(port=7, announce_maddrs=announced)) == [5, 6]
    assert ports_to_check(fast_config(port=7)) == [7]
    assert undialable_announced(announced, nobody) == []  # nobody answered: nothing to report
    assert is_loopback_swarm("127.0.0.1") and not is_loopback_swarm("0.0.0.0")
