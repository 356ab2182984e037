"""The dial-back check (swarm/reachability.py) on 127.0.0.1: a member dials a listening peer back, and
says whether it relays; the decision predicates. The real NAT is in tests/integration/test_nat.py."""

from __future__ import annotations

import pytest

from p2pcold.swarm import start_dht, visible_maddrs
from p2pcold.swarm.reachability import DialBack, dial_back, is_loopback_swarm, is_reachable, serve_dial_back, undialable_announced

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
    client = start_dht(fast_config(), initial, client_mode=True)
    swarm.dhts.append(client)

    check = dial_back(client, fast_config(), initial + visible_maddrs(second))
    assert set(check.answered) == {str(bootstrap.peer_id), str(second.peer_id)}
    assert set(check.dialed_by) == set(check.answered)  # the client listens on 127.0.0.1: both reached it
    assert check.relays == (str(bootstrap.peer_id),)
    assert is_reachable(check) is True
    assert set(check.dialed) <= set(check.addresses) and check.dialed


def test_reachability_decisions():
    nobody = DialBack(addresses=("/ip4/10.0.0.2/tcp/5",), answered=(), dialed_by=(), relays=(), dialed=())
    assert is_reachable(nobody) is None
    behind_nat = DialBack(addresses=("/ip4/10.0.0.2/tcp/5",), answered=("a", "b"), dialed_by=(), relays=("a",), dialed=())
    assert is_reachable(behind_nat) is False
    half = DialBack(addresses=("/ip4/1.2.3.4/tcp/5",), answered=("a", "b"), dialed_by=("a",), relays=(), dialed=("/ip4/1.2.3.4/tcp/5/p2p/X",))
    assert is_reachable(half) is True
    announced = ["/ip4/1.2.3.4/tcp/5", "/ip4/5.6.7.8/tcp/5"]
    assert undialable_announced(announced, half) == ["/ip4/5.6.7.8/tcp/5"]
    assert undialable_announced(announced, nobody) == []  # nobody answered: nothing to report
    assert is_loopback_swarm("127.0.0.1") and not is_loopback_swarm("0.0.0.0")
