"""A public bootstrap node: a persistent identity keeps its multiaddr across restarts, SIGTERM stops it
cleanly (exit 0, nothing left behind), and so it does a peer (exit 143); a second node on a taken port
is refused. See bootstrap/README.md."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest

from swarm_cli import kill_tagged, process_group, tagged_processes, toy_recipes, write_run_config

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


def stop(swarm, proc, name: str, whole_group: bool, code: int = 0) -> float:
    """SIGTERM a process (its main process, or its whole process group as systemd's default KillMode and
    `kill -TERM -PGID` do); assert it exits with `code` and leaves no process (p2pd included); return the
    time taken."""
    started = time.monotonic()
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert swarm.wait(proc, name, timeout=30) == code, swarm.log(name)[-3000:]
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 5
    while process_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_group(proc.pid), "the bootstrap node left processes behind"
    return elapsed


def test_identity_file_keeps_the_address_across_restarts_and_sigterm_stops_cleanly(swarm, tmp_path, tiny_model_dir):
    key, port = tmp_path / "bootstrap.key", free_port()
    args = ("--host", "127.0.0.1", "--port", str(port), "--identity", str(key))

    first, maddrs = start_bootstrap(swarm, "first", *args)
    assert key.is_file()  # created on first use
    assert maddrs and all(m.startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/") for m in maddrs), maddrs
    assert f"--initial-peers {maddrs[0]}" in swarm.log("first")  # the line an operator copies
    assert stop(swarm, first, "first", whole_group=False) < 10

    second, again = start_bootstrap(swarm, "second", *args)
    assert again == maddrs  # same peer id, same port: the --initial-peers line peers keep stays valid

    # a peer joins through the restarted node and waits, alone, at its first boundary; SIGTERM (to its
    # main process, as systemd's KillMode=mixed does) stops it at once with exit code 143
    recipes = toy_recipes(tmp_path, 1)
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, iterations=1)
    peer = swarm.peer("peer", config, recipes[0], again[0])
    swarm.wait_for_log("peer", r"iteration 0: finetuned", timeout=90, proc=peer)
    time.sleep(1.0)  # now looking for a group (for up to boundary_deadline)
    assert stop(swarm, peer, "peer", whole_group=False, code=143) < 10

    assert stop(swarm, second, "second", whole_group=True) < 10
    for name in ("first", "second", "peer"):
        assert "Traceback" not in swarm.log(name), swarm.log(name)


def test_a_second_node_on_a_taken_port_is_refused_with_one_line(swarm, tmp_path):
    """p2pd listens with SO_REUSEPORT: without a check, a second node would start on the same port and
    take half of the first one's incoming connections. It is refused before it starts anything."""
    port = free_port()
    first, maddrs = start_bootstrap(swarm, "first", "--host", "127.0.0.1", "--port", str(port))
    tag = uuid.uuid4().hex
    try:
        started = time.monotonic()
        second = swarm.start("second", "bootstrap", "--host", "127.0.0.1", "--port", str(port), tag=tag)
        assert swarm.wait(second, "second", timeout=60) == 2, swarm.log("second")
        elapsed = time.monotonic() - started
        lines = swarm.log("second").strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("p2pcold: error: ") and f"port {port} is in use" in lines[0], lines
        assert elapsed < 30, f"refused after {elapsed:.0f} s"  # mostly imports; the check itself is a bind
        assert tagged_processes(tag) == [], "the refused node left processes behind"
    finally:
        kill_tagged(tag)
    # the first node is untouched: its address still reaches it
    status = swarm.start("status", "status", "--initial-peers", maddrs[0], "--json")
    assert swarm.wait(status, "status", timeout=60) == 0, swarm.log("status")
    assert first.poll() is None
    assert stop(swarm, first, "first", whole_group=True) < 10
