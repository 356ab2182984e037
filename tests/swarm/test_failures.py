"""Faults injected into real all-reduces on 127.0.0.1: a member killed (SIGKILL, whole process group) or
stopped (SIGSTOP) in the middle of one, and a failure that only one member of the group sees."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hivemind.utils.mpfuture import SharedBytes

from p2pcold.swarm import FusionStatus, _procs, visible_maddrs
from p2pcold.swarm.verdicts import group_step_timeout_s

from helpers import FAST, fast_config, fuse_all, weighted_mean

pytestmark = [pytest.mark.network, pytest.mark.slow]

WORKER = Path(__file__).with_name("peer_worker.py")
# 1M floats = 8 parts of hivemind's 512 KB, so every member of a 3-group reduces a slice and sees
# the failure itself (with a single part only the reducing peer would notice; see docs).
SIZE = 1_000_000


def _read_replies(stream, sink: queue.Queue) -> None:
    for line in stream:
        if line.startswith("@@ "):
            sink.put(json.loads(line[3:]))


def start_worker(options: dict) -> tuple[subprocess.Popen, queue.Queue]:
    """A peer in its own process group: its main process, DHT, averager and p2pd can be killed together."""
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    replies: queue.Queue = queue.Queue()
    threading.Thread(target=_read_replies, args=(worker.stdout, replies), daemon=True).start()
    return worker, replies


def process_group(pgid: int) -> set[int]:
    """Live (non-zombie) processes of a process group."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


FILLS = (1.0, 2.0, 30.0)  # the bodies' values: two in-process members, then the worker


class WorkerFusion:
    """Two in-process members and one worker process (which may carry an injected fault) fuse at
    iteration 0. `during(fusion)` runs in the test's thread while they fuse."""

    def __init__(self, swarm, run_id: str, worker_options: dict, overrides: dict, deadline: float, size: int):
        self.config = fast_config(**overrides)
        self.deadline = deadline
        dhts = swarm.start(2, self.config)
        self.worker, self.replies = start_worker(
            dict(
                initial_peers=visible_maddrs(dhts[0]),
                run_id=run_id,
                config={**FAST, **overrides},
                template={"w": [size]},
                **worker_options,
            )
        )
        ready = self.replies.get(timeout=60)
        assert ready["ready"]
        self.fills = {ready["peer_id"]: FILLS[2]}
        template = {"w": torch.zeros(size)}
        self.members = [swarm.averager(dht, run_id, template, self.config) for dht in dhts]
        self.fills.update({member.peer_id: fill for member, fill in zip(self.members, FILLS)})
        self.bodies = [{"w": torch.full((size,), fill)} for fill in FILLS[:2]]
        self.members_done_at: float | None = None  # when the in-process members returned

    def run(self, during) -> tuple[list, dict | None]:
        """(the in-process members' FusionResults, the worker's reply or None when it died)."""
        command = {"cmd": "fuse", "iteration": 0, "weight": 1.0, "deadline": self.deadline, "fill": FILLS[2]}
        outcome: dict = {}
        give_up = time.monotonic() + self.deadline + group_step_timeout_s(self.config) + 30  # fuse's own bound
        try:
            self.worker.stdin.write(json.dumps(command) + "\n")
            self.worker.stdin.flush()
            fusing = threading.Thread(
                target=lambda: outcome.update(
                    results=fuse_all(self.members, self.bodies, [0, 0], [1.0, 1.0], self.deadline),
                    done_at=time.monotonic(),
                )
            )
            fusing.start()
            during(self)
            fusing.join(timeout=give_up - time.monotonic())
            self.members_done_at = outcome["done_at"]
            try:
                alive = self.worker.poll() is None
                reply = self.replies.get(timeout=max(0.0, give_up - time.monotonic())) if alive else None
            except queue.Empty:
                reply = None
        finally:
            if self.worker.poll() is None:
                os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=10)
        return outcome["results"], reply

    def expected_value(self, members) -> float:
        return sum(self.fills[peer] for peer in members) / len(members)


def wait_for_file(path: Path, timeout: float) -> None:
    wait_until = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < wait_until:
        time.sleep(0.02)
    assert path.exists(), f"{path.name} never appeared: the worker never entered an all-reduce with the others"


def assert_one_fused_body(fusion: WorkerFusion, results, reply) -> None:
    """Every member that reports OK holds the mean of its group's bodies, and all of them the same one."""
    fused_values = set()
    for result in results:
        if result.ok:
            expected = fusion.expected_value(result.members)
            assert torch.allclose(result.averaged["w"], torch.full_like(result.averaged["w"], expected))
            fused_values.add(round(expected, 5))
    if reply is not None and reply["status"] == "ok":
        expected = fusion.expected_value(reply["members"])
        assert reply["min"] == pytest.approx(expected) and reply["max"] == pytest.approx(expected)
        fused_values.add(round(expected, 5))
    assert len(fused_values) <= 1, f"members report OK with different bodies: {sorted(fused_values)}"


@pytest.mark.timeout(120)
def test_survivors_of_a_killed_peer_refuse_the_partial_average_and_regroup(swarm, tmp_path):
    marker = tmp_path / "victim-in-allreduce"
    overrides = dict(matchmaking_time=3.0, target_group_size=3, min_group_size=2)
    fusion = WorkerFusion(swarm, "kill", dict(stall_marker=str(marker)), overrides, 30.0, SIZE)
    killed = {}

    def kill_victim(fusion):
        wait_for_file(marker, 20.0)
        os.killpg(fusion.worker.pid, signal.SIGKILL)
        killed["at"] = time.monotonic()

    results, _ = fusion.run(kill_victim)
    recovered_after = fusion.members_done_at - killed["at"]
    expected = weighted_mean(fusion.bodies, [1.0, 1.0])  # the victim's 30.0 must not leak in
    for result in results:
        assert result.status is FusionStatus.OK, result.reason
        # The number of attempts is left free. Usually 2: the partial all-reduce was refused, then the
        # survivors regrouped. Seen too: 1 (the victim's group was assembled with a follower that had
        # already left it for the other survivor's group) and 3 (the survivors' own first all-reduce timed
        # out a sender and was retried). What matters is the body and the recovery time below.
        assert result.group_size == 2 and set(result.members) == {s.peer_id for s in fusion.members}
        assert torch.equal(result.averaged["w"], expected["w"])
        assert result.elapsed_s < fusion.deadline
    # measured: ~5.3 s = sender timeout (2 s) + matchmaking (3 s); each survivor saw the failure itself
    config = fusion.config
    assert recovered_after < 2 * config.next_chunk_timeout + config.matchmaking_time + 10


@pytest.mark.timeout(150)
def test_a_member_stopped_past_the_reducer_timeout_never_leaves_two_fused_bodies(swarm, tmp_path):
    """The worker's averager is SIGSTOPped inside the all-reduce for longer than the reducer timeout
    (2 x next_chunk_timeout), then resumed: the others exclude it and time out on its slice. Whoever
    reports OK holds its group's exact mean; the two others always end fused."""
    marker = tmp_path / "paused-in-allreduce"
    overrides = dict(matchmaking_time=3.0, target_group_size=3, min_group_size=2)
    fusion = WorkerFusion(swarm, "pause", dict(pause_marker=str(marker), pause_hold_s=0.5), overrides, 25.0, SIZE)
    stopped_s = 2 * fusion.config.next_chunk_timeout + 1.0

    def stop_then_resume(fusion):
        wait_for_file(marker, 20.0)
        averager_pid = int(marker.read_text())
        os.kill(averager_pid, signal.SIGSTOP)
        try:
            time.sleep(stopped_s)
        finally:
            os.kill(averager_pid, signal.SIGCONT)

    results, reply = fusion.run(stop_then_resume)
    assert reply is not None, "the stopped worker died"
    for result in results:
        assert result.status is FusionStatus.OK, result.reason
        assert result.attempts >= 2  # the first all-reduce, with the stopped member, failed for both
    assert reply["status"] in ("ok", "failed", "no_group"), reply
    assert_one_fused_body(fusion, results, reply)


@pytest.mark.timeout(120)
def test_a_failure_seen_by_one_member_only_fails_the_group_everywhere_and_all_retry_together(swarm):
    """The root cause of issue 9: hivemind lets each member decide alone whether an all-reduce
    succeeded. Here the worker's side fails once after a clean reduce (as a reducer timeout seen by it
    alone would). Its verdict makes the two others fail too, and the three regroup with their same bodies."""
    overrides = dict(matchmaking_time=2.0, target_group_size=3, min_group_size=3)
    fusion = WorkerFusion(swarm, "one-side", dict(fail_own_side_once=True), overrides, 30.0, 4096)
    results, reply = fusion.run(lambda fusion: None)
    everyone = set(fusion.fills)
    assert reply is not None and reply["status"] == "ok", reply
    # the injected failure costs every member one attempt; under load a later attempt can fail for real too
    assert reply["attempts"] >= 2 and set(reply["members"]) == everyone
    for result in results:
        assert result.status is FusionStatus.OK, result.reason
        assert result.attempts == reply["attempts"] and set(result.members) == everyone
    assert_one_fused_body(fusion, results, reply)
    assert reply["min"] == pytest.approx(sum(FILLS) / 3)


@pytest.mark.timeout(60)
def test_a_peer_whose_main_process_dies_leaves_no_process_behind():
    """hivemind's DHT/averager forks and the p2pd daemon would outlive a SIGKILLed main process
    forever (measured); p2pcold's watchdogs make them exit within about a second."""
    worker, replies = start_worker(dict(run_id="orphans", config=FAST, template={"w": [4]}))
    try:
        assert replies.get(timeout=60)["ready"]
        group = process_group(worker.pid)
        assert len(group) >= 4  # main process, DHT process, its p2pd, averager process
        os.kill(worker.pid, signal.SIGKILL)  # only the main process
        worker.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while process_group(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_group(worker.pid)
    finally:
        if process_group(worker.pid):
            os.killpg(worker.pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_a_forked_child_killed_inside_hiveminds_shared_bytes_lock_leaves_the_host_free(monkeypatch):
    """Every MPFuture takes hivemind's SharedBytes lock, an `mp.Lock` that the host shares with what it
    forks. A child killed inside it left it held (control), and then the host's next DHT request waited
    forever; with `own_shared_bytes_lock`, what p2pcold's DHT and averager processes call first, a dead
    child holds only its own."""
    fork = multiprocessing.get_context("fork")
    for own_lock in (False, True):
        monkeypatch.setattr(SharedBytes, "_lock", fork.Lock())  # this test's own: the control leaves it held
        held = fork.Event()
        child = fork.Process(target=_die_holding_the_shared_bytes_lock, args=(own_lock, held), daemon=True)
        child.start()
        assert held.wait(30), "the child never took the lock"
        child.kill()
        child.join(5)
        free = SharedBytes._lock.acquire(timeout=2.0)
        if free:
            SharedBytes._lock.release()
        assert free == own_lock


@pytest.mark.timeout(60)
def test_p2pcolds_dht_process_has_a_shared_bytes_lock_of_its_own(swarm):
    """The wiring of the test above: what the DHT process sets up first gives it its own lock."""
    dht = swarm.start(1, fast_config())[0]
    assert dht.run_coroutine(_shared_bytes_lock_handle) != SharedBytes._lock._semlock.handle


async def _shared_bytes_lock_handle(_dht, _node) -> int:  # runs in the DHT process
    return SharedBytes._lock._semlock.handle


def _die_holding_the_shared_bytes_lock(own_lock: bool, held) -> None:
    if own_lock:
        _procs.own_shared_bytes_lock()
    SharedBytes._lock.acquire()
    held.set()
    time.sleep(60)
