"""Process bookkeeping through /proc (Linux; hivemind's bundled p2pd is Linux-only anyway).

Used to find and kill the p2pd daemon a DHT process started, so that no shutdown path can leave an
orphaned daemon behind (hivemind terminates the DHT process with SIGTERM when it does not stop in
time, which orphans its p2pd child), and what each forked hivemind process sets up first
(`setup_forked_child`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

_PROC = Path("/proc")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, starttime) of a live process, or None."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (3rd field of stat); ppid is the 4th, starttime the 22nd
    if fields[0] == "Z":
        return None
    return comm, int(fields[1]), int(fields[19])


def children(pid: int, comm: str | None = None) -> list[tuple[int, int]]:
    """(pid, starttime) of the live direct children of `pid`, optionally only those named `comm`."""
    if not _PROC.is_dir():
        return []
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        info = _stat(int(entry.name))
        if info is not None and info[1] == pid and (comm is None or info[0] == comm):
            found.append((int(entry.name), info[2]))
    return found


def is_same_process(pid: int, starttime: int) -> bool:
    info = _stat(pid)
    return info is not None and info[2] == starttime


def kill(pid: int, starttime: int, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; never touches a recycled pid."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        if not is_same_process(pid, starttime):
            return
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not is_same_process(pid, starttime):
                return
            time.sleep(0.05)


def reset_signal_handlers() -> None:
    """In a forked background process: restore SIGTERM's default action.

    A fork inherits its parent's Python signal handlers. The CLI turns SIGTERM into an exception in
    the main process (so that `finally` blocks stop everything); in hivemind's DHT or averager
    process that handler would raise inside the asyncio loop when SIGTERM reaches the whole process
    group (systemd's default KillMode, `kill -TERM -PGID`), leaving a broken process that only dies
    after the parent's shutdown grace period. With the default action the child simply exits; the
    parent's bounded shutdown then finds it gone and kills any p2pd daemon left.
    """
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread of this process
        pass


def exit_when_orphaned(parent_pid: int, period_s: float = 1.0) -> None:
    """In a background process: exit (killing its own p2pd children first) once `parent_pid` is gone.

    hivemind's DHT and averager processes are forks that outlive a SIGKILLed parent: they (and the
    DHT's p2pd daemon) would keep the port, the peer id and the averaging handlers alive forever.
    """

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent_pid:
                for pid, starttime in children(os.getpid()):
                    kill(pid, starttime, grace_s=0.5)
                os._exit(0)

    threading.Thread(target=watch, name="p2pcold-orphan-watchdog", daemon=True).start()


def own_shared_bytes_lock() -> None:
    """In a forked background process: give hivemind's SharedBytes (taken by every MPFuture created) a
    lock of this process's own.

    hivemind makes that lock with `mp.Lock()` at import, so the host and every process forked from it
    share one semaphore, although what it guards (the process's own buffer) is per process. A child
    killed while inside it (an averager stopped after a start-up slower than its timeout, a shutdown
    past its grace) leaves it held for good, and the host's next MPFuture, so its next DHT request,
    waits forever: seen once under load, where one slow averager start hung every later in-process test.
    """
    import multiprocessing

    from hivemind.utils.mpfuture import SharedBytes

    SharedBytes._lock = multiprocessing.Lock()


def setup_forked_child(parent_pid: int) -> None:
    """What every hivemind process p2pcold forks (a DHT, an averager) does first, in `run()`."""
    reset_signal_handlers()
    exit_when_orphaned(parent_pid)
    own_shared_bytes_lock()
