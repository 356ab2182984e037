"""Run real `p2pcold` processes (bootstrap, peers, status) on 127.0.0.1 for integration tests.

Each process starts in its own session, so its hivemind helpers and p2pd daemon share its process
group; `SwarmProcesses.reap()` kills every group it started, even after a peer was SIGKILLed and
its children were orphaned.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from toy_data import write_toy_datasets

def hear_ctrl_c() -> None:
    """In a child, before exec: SIGINT back to its default, so that the child's Python turns it into
    KeyboardInterrupt as in a terminal. A suite started in the background by a non-interactive shell
    ignores SIGINT (POSIX), and children inherit that: tests of Ctrl-C would then see it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


FAST_SWARM = {  # loopback timings: small enough for tests, with the same structure as the defaults
    "host": "127.0.0.1",  # tests stay on loopback (`p2pcold peer` alone would listen on every interface)
    "matchmaking_time": 3.0,
    "request_timeout": 1.0,
    "boundary_deadline": 45.0,
    "allreduce_timeout": 20.0,
    "next_chunk_timeout": 3.0,
    "state_download_timeout": 45.0,  # room for libp2p's dial backoff (5 s + n² s after n failed dials) to end
    "peer_wait_timeout": 60.0,
    "contributor_deadline": 90.0,
    "assignment_timeout": 120.0,
    "poll_interval": 0.3,
    "progress_ttl": 20.0,
    "shutdown_timeout": 3.0,
}


def write_run_config(folder: Path, model: str, datasets: list[str], **fields) -> Path:
    swarm = {**FAST_SWARM, **fields.pop("swarm", {})}
    config = {
        "model": model,
        "datasets": datasets,
        "iterations": 3,
        "seed": 1,
        "run_id": "itest",
        "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": 3}, "learning_rate": 1e-3, "num_threads": 1},
        "output_dir": str(folder / "reference"),
        "swarm": swarm,
        **fields,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CLI = ("-m", "p2pcold.cli")


class SwarmProcesses:
    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}

    def start(
        self, name: str, *args: str, stdout_file: Path | None = None, tag: str | None = None, program: tuple[str, ...] = CLI, launcher: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        """Start `p2pcold ARGS` logging to NAME.log (stdout too, unless `stdout_file` is given); `tag`
        marks it and all its descendants for `tagged_processes`. `program`: what Python runs instead of
        the CLI module, e.g. a test launcher that injects a fault and then runs the CLI. `launcher`: a
        command that execs Python, e.g. `ip netns exec NS` (it must exec, so that the process leads its group)."""
        log = self.folder / f"{name}.log"
        self.logs[name] = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **tag_environment(tag)}
        with open(log, "w") as err, open(stdout_file or os.devnull, "w") as out:
            proc = subprocess.Popen(
                [*launcher, sys.executable, *program, *args],
                stdout=out if stdout_file else err,
                stderr=subprocess.STDOUT if stdout_file is None else err,
                env=env,
                start_new_session=True,
                preexec_fn=hear_ctrl_c,
            )
        self.procs.append(proc)
        return proc

    def bootstrap(self, config: Path, *extra: str, timeout: float = 60, name: str = "bootstrap", launcher: tuple[str, ...] = ()) -> str:
        maddrs = self.folder / f"{name}.maddrs"
        self.start(name, "bootstrap", "--config", str(config), "--maddrs-file", str(maddrs), *extra, launcher=launcher)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if maddrs.is_file() and maddrs.read_text().strip():
                return maddrs.read_text().split()[0]
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not print its address within {timeout} s:\n{self.log(name)}")

    def peer(
        self, name: str, config: Path, dataset: str, maddr: str, *extra: str, run_dir: Path | None = None, program: tuple[str, ...] = CLI, launcher: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        run_dir = run_dir or self.folder / name
        args = ("peer", "--config", str(config), "--dataset", dataset, "--initial-peers", maddr, "--run-dir", str(run_dir), *extra)
        return self.start(name, *args, program=program, launcher=launcher)

    def log(self, name: str) -> str:
        return self.logs[name].read_text() if name in self.logs else ""

    def wait_for_log(self, name: str, pattern: str, timeout: float, proc: subprocess.Popen | None = None) -> re.Match:
        """Poll NAME.log until `pattern` (a regex, multiline) matches; fail early if `proc` exits first."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log(name), re.MULTILINE)
            if match:
                return match
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}) before logging {pattern!r}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not log {pattern!r} within {timeout} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def wait(self, proc: subprocess.Popen, name: str, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish within {timeout} s:\n{self.log(name)[-3000:]}") from None

    def reap(self) -> None:
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            # orphaned children (hivemind processes, p2pd) keep the group alive after the leader exits
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


TAG_VARIABLE = "P2PCOLD_SIM_TEST"


def tag_environment(tag: str | None) -> dict[str, str]:
    """The environment entry that marks a process and every descendant (they inherit it, p2pd included,
    even once orphaned or in sessions of their own) for `tagged_processes`."""
    return {TAG_VARIABLE: tag} if tag else {}


def tagged_processes(tag: str) -> list[str]:
    """Live processes whose environment carries `tag`, as "pid: command line".

    torch's `torch_shm_manager` is left out: torch starts it for shared-memory tensors and it exits
    by itself once its clients are gone (`kill_tagged` still kills it)."""
    found = []
    for pid, environ, state, cmdline in _processes():
        if _tag_bytes(tag) in environ and state != b"Z" and "torch_shm_manager" not in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def kill_tagged(tag: str) -> None:
    """SIGKILL every process carrying `tag` (a test's teardown)."""
    for pid, environ, _state, _cmdline in _processes():
        if _tag_bytes(tag) in environ:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue


def _tag_bytes(tag: str) -> bytes:
    return f"{TAG_VARIABLE}={tag}".encode()


def _processes():
    """(pid, environ, state, command line) of every process this user can read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_bytes().rsplit(b")", 1)[-1].split()[0]
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            yield int(entry.name), environ, state, cmdline


def process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid` (a process started by `start` leads its
    own group, which its hivemind helpers and p2pd daemon inherit)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = raw[raw.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found.append(int(entry.name))
    return found


def log_times(log: str, pattern: str) -> list[float]:
    """Seconds since midnight of the log lines (`HH:MM:SS LEVEL ...`) that match `pattern`."""
    times = []
    for line in log.splitlines():
        if re.search(pattern, line) and re.match(r"\d\d:\d\d:\d\d ", line):
            h, m, sec = map(int, line[:8].split(":"))
            times.append(h * 3600 + m * 60 + sec)
    return times


def toy_recipes(folder: Path, count: int) -> list[str]:
    return write_toy_datasets(folder / "data", count)


def scalars(log_dir: Path) -> dict[str, list[int]]:
    """TensorBoard scalars under `log_dir`: tag -> steps, as TensorBoard's own event reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[int]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found[tag] = sorted({e.step for e in accumulator.Scalars(tag)})
    return found
