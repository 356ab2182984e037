"""A public bootstrap node: a persistent identity keeps its multiaddr across restarts, SIGTERM stops it
cleanly (exit 0, nothing left behind). See bootstrap/README.md."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from swarm_cli import process_group

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_bootstrap(swarm, name: str, *args: str, timeout: float = 60) -> tuple[object, list[str]]:
    maddrs = swarm.folder / f"{name}.maddrs"
    proc = swarm.start(name, "bootstrap", "--maddrs-file", str(maddrs), *args)
    deadline = time.monotonic() + timeout
    while not (maddrs.is_file() and maddrs.read_text().strip()):
        assert proc.poll() is None, swarm.log(name)
        assert time.monotonic() < deadline, f"no address within {timeout} s:\n{swarm.log(name)}"
        time.sleep(0.2)
    return proc, maddrs.read_text().split()


def stop(swarm, proc, name: str) -> float:
    """SIGTERM the node; assert it exits 0 and leaves no process (p2pd included); return the time it took."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert swarm.wait(proc, name, timeout=30) == 0, swarm.log(name)[-3000:]
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 5
    while process_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_group(proc.pid), "the bootstrap node left processes behind"
    return elapsed


def test_identity_file_keeps_the_address_across_restarts_and_sigterm_stops_cleanly(swarm, tmp_path):
    key, port = tmp_path / "bootstrap.key", free_port()
    args = ("--host", "127.0.0.1", "--port", str(port), "--identity", str(key))

    first, maddrs = start_bootstrap(swarm, "first", *args)
    assert key.is_file()  # created on first use
    assert maddrs and all(m.startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/") for m in maddrs), maddrs
    assert f"--initial-peers {maddrs[0]}" in swarm.log("first")  # the line an operator copies
    assert stop(swarm, first, "first") < 10

    second, again = start_bootstrap(swarm, "second", *args)
    assert again == maddrs  # same peer id, same port: the --initial-peers line peers keep stays valid
    assert stop(swarm, second, "second") < 10

    third, other = start_bootstrap(swarm, "third", "--port", str(port))  # no identity: a new peer id
    assert other[0].rsplit("/p2p/", 1)[1] != maddrs[0].rsplit("/p2p/", 1)[1]
    stop(swarm, third, "third")
