"""start_dht: bootstrap, unreachable initial peers, persistent identity."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time

import pytest
from hivemind.utils import get_dht_time

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


def _send_a_store_and_exit(dht) -> None:
    dht.store("orphan", 1, get_dht_time() + 30, return_future=True)
    os._exit(0)  # before the DHT process has fetched the request's reply pipe from this process


@pytest.mark.timeout(90)
def test_requests_whose_sender_exited_are_dropped_with_one_line_and_the_dht_carries_on(swarm, tmp_path):
    """The sender's exit can hit the DHT process at several points of receiving (connection reset, socket
    file gone, EOF mid-handshake); each used to print a traceback, and the last one killed the DHT."""
    loggers = [logging.getLogger(name) for name in ("p2pcold.swarm.dht", "hivemind.dht.dht")]
    log_file = logging.FileHandler(tmp_path / "dht.log")  # inherited by the forked DHT process
    for logger in loggers:
        logger.addHandler(log_file)
    try:
        (dht,) = swarm.start(1, fast_config())
        for _ in range(5):
            sender = multiprocessing.get_context("fork").Process(target=_send_a_store_and_exit, args=(dht,))
            sender.start()
            sender.join(10)
        deadline = time.monotonic() + 10
        while "dropped a request" not in (tmp_path / "dht.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dht.is_alive() and visible_maddrs(dht)  # the DHT carries on
    finally:
        for logger in loggers:
            logger.removeHandler(log_file)
        log_file.close()
    log = (tmp_path / "dht.log").read_text()
    assert "DHT: dropped a request from a process that exited while sending it" in log, log
    assert "Traceback" not in log, log


@pytest.mark.timeout(60)
def test_a_taken_port_is_refused_before_anything_starts(swarm):
    """p2pd listens with SO_REUSEPORT, so a second node on a taken port would start and share it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    swarm.start(1, fast_config(port=port))
    started = time.monotonic()
    with pytest.raises(P2PColdError, match=f"port {port} is in use on 127.0.0.1"):
        start_dht(fast_config(port=port), [])
    assert time.monotonic() - started < 1.0  # a bind, not a daemon start
