"""Fixtures for the swarm tests: real hivemind peers on 127.0.0.1, and process hygiene.

Every test is checked for leaked processes. Two kinds are tracked:
- direct children of the pytest process (hivemind's DHT and averager processes are forks of it);
- every process carrying this session's P2PCOLD_TEST_TAG in its environment: exec'd descendants
  (p2pd daemons, peer_worker.py subprocesses and their forks) inherit it, even once orphaned.
After each test, anything new that is still alive after a short grace period is SIGKILLed and
reported as a warning. psutil is not needed (/proc is read directly).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
import warnings
from pathlib import Path

import pytest

TAG = "P2PCOLD_TEST_TAG"
os.environ.setdefault(TAG, uuid.uuid4().hex)
_TAG_BYTES = f"{TAG}={os.environ[TAG]}".encode()

from p2pcold.swarm._procs import _stat  # noqa: E402

from helpers import Swarm  # noqa: E402

# --------------------------------------------------------------------------- process hygiene


def _tracked_processes() -> dict[int, tuple[int, str]]:
    """pid -> (starttime, name) of live processes this session started (see module docstring)."""
    me, found = os.getpid(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        info = _stat(pid)
        if info is None:
            continue
        comm, ppid, starttime = info
        tagged = False
        if ppid != me:
            try:
                tagged = _TAG_BYTES in (entry / "environ").read_bytes()
            except OSError:
                continue
        if ppid == me or tagged:
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmdline = comm
            if "resource_tracker" in cmdline or "forkserver" in cmdline or "torch_shm_manager" in cmdline:
                continue  # session-wide helpers of multiprocessing and torch.share_memory_()
            found[pid] = (starttime, comm)
    return found


def _reap_zombies() -> None:
    # joins finished multiprocessing children (hivemind's DHT and averager processes). No blanket
    # os.waitpid(-1): it would steal exit statuses multiprocessing and subprocess still expect.
    multiprocessing.active_children()


@pytest.fixture(autouse=True)
def reap_processes():
    before = _tracked_processes()
    yield
    deadline = time.monotonic() + 3.0
    while True:
        _reap_zombies()
        leaked = {
            pid: info for pid, info in _tracked_processes().items() if pid not in before or before[pid][0] != info[0]
        }
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid, (starttime, comm) in leaked.items():
        info = _stat(pid)
        if info is not None and info[2] == starttime:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if leaked:
        time.sleep(0.2)
        _reap_zombies()
        names = ", ".join(f"{comm}[{pid}]" for pid, (_, comm) in sorted(leaked.items()))
        warnings.warn(f"killed processes the test left running: {names}", stacklevel=1)


# --------------------------------------------------------------------------- peers


@pytest.fixture
def swarm():
    peers = Swarm()
    try:
        yield peers
    finally:
        peers.close()
