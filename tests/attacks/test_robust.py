"""Issue 8, robust fusion: a rogue member of the all-reduce cannot move the honest members' body, and its
NaN is left out instead of stopping the fusion. Real processes on 127.0.0.1 (`rogue_robust.py`)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from rogue_robust import member_body, play  # noqa: E402
from swarm_cli import SwarmProcesses  # noqa: E402

from p2pcold import testing  # noqa: E402
from p2pcold.fusion import aggregate, average  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow]

LAUNCHER = str(Path(__file__).resolve().parent / "rogue_robust.py")
ATTACKS = list(testing.ATTACKS)  # the rogue's play at iterations 0, 1, 2, 3: x 1e3, noise, target + 1e6, NaN
HONEST_SEEDS = (1, 2, 3)
HONEST_DEADLINE_S, ROGUE_DEADLINE_S = 40.0, 15.0  # per boundary
CONFIG = {  # loopback timings; a group needs all four members
    "matchmaking_time": 2.0, "request_timeout": 1.0, "next_chunk_timeout": 2.0, "allreduce_timeout": 15.0,
    "boundary_deadline": 40.0, "dht_request_timeout": 5.0, "local_rpc_timeout": 10.0, "shutdown_timeout": 3.0,
    "target_group_size": 4, "min_group_size": 4, "poll_interval": 0.3,
}  # fmt: skip


@pytest.fixture
def processes(tmp_path):
    procs = SwarmProcesses(tmp_path)
    yield procs
    procs.reap()


def start_member(processes: SwarmProcesses, name: str, seed: int, plays: list[str], initial_peers: list[str]):
    options = {
        "run_id": "robust-attacks", "config": CONFIG, "seed": seed, "plays": plays, "initial_peers": initial_peers,
        # the rogue's own result is NaN at the NaN boundary: it would retry alone until its deadline
        "deadline": ROGUE_DEADLINE_S if name == "rogue" else HONEST_DEADLINE_S,
        "out": str(processes.folder / f"{name}.pt"), "go_file": str(processes.folder / "go"),
        "maddrs_file": "" if initial_peers else str(processes.folder / "maddrs.txt"),
    }  # fmt: skip
    return processes.start(name, json.dumps(options), program=(LAUNCHER,))


def reports(processes: SwarmProcesses, name: str) -> list[dict]:
    """The member's "@@" lines: its peer id, then one per iteration."""
    return [json.loads(line[3:]) for line in processes.log(name).splitlines() if line.startswith("@@ ")]


@pytest.mark.timeout(240)
def test_a_rogue_member_cannot_move_the_fused_body_and_its_nan_is_left_out(processes):
    """3 honest members + 1 rogue that plays body x 1e3, N(0, 1) noise, a chosen body with weight 1e6,
    then NaN, one attack per boundary. The honest members' fused body stays, value by value, within
    the honest bodies' own range around their average (a trimmed mean of 4 that drops one on each side
    keeps only values between two honest ones), and equals `fusion.aggregate` of the four bodies (the
    local run's math); the NaN boundary fuses the other three exactly."""
    honest = [f"honest{i}" for i in range(3)]
    first = start_member(processes, honest[0], HONEST_SEEDS[0], ["honest"] * 4, [])
    maddrs = processes.folder / "maddrs.txt"
    deadline = time.monotonic() + 90
    while not (maddrs.is_file() and maddrs.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, processes.log(honest[0])[-3000:]
        time.sleep(0.2)
    initial = maddrs.read_text().split()[:1]
    procs = {honest[0]: first}
    for name, seed in zip(honest[1:], HONEST_SEEDS[1:]):
        procs[name] = start_member(processes, name, seed, ["honest"] * 4, initial)
    procs["rogue"] = start_member(processes, "rogue", 99, ATTACKS, initial)
    deadline = time.monotonic() + 120
    for name, proc in procs.items():  # every member started (its first "@@" line): go
        while not reports(processes, name):
            assert proc.poll() is None and time.monotonic() < deadline, processes.log(name)[-3000:]
            time.sleep(0.2)
    (processes.folder / "go").touch()
    for name, proc in procs.items():
        assert processes.wait(proc, name, timeout=200) == 0, processes.log(name)[-3000:]

    for name in honest:
        statuses = [(r["iteration"], r["status"], r["group_size"]) for r in reports(processes, name)[1:]]
        assert statuses == [(i, "ok", 4) for i in range(4)], processes.log(name)[-3000:]
    fused = {name: torch.load(processes.folder / f"{name}.pt") for name in honest}
    for iteration, attack in enumerate(ATTACKS):
        bodies = [member_body(seed, iteration) for seed in HONEST_SEEDS]
        honest_mean = average(bodies)
        rogue_body, rogue_weight = play(attack, 99, iteration)
        reference = aggregate([*bodies, rogue_body], [1.0, 1.0, 1.0, rogue_weight])  # what a local run computes
        for name in honest:
            body = fused[name][iteration]
            assert max((body[t] - reference[t]).abs().max().item() for t in body) < 1e-5, (attack, name)
            for tensor, value in body.items():
                assert bool(torch.isfinite(value).all()), (attack, name, tensor)
                stacked = torch.stack([b[tensor] for b in bodies])
                honest_range = stacked.max(dim=0).values - stacked.min(dim=0).values
                error = (value - honest_mean[tensor]).abs()
                bound = 1e-5 if attack == "nan" else honest_range + 1e-5
                assert bool((error <= bound).all()), (attack, name, tensor, float((error - bound).max()))
    # the NaN sender is named in one warning line by each reducer that received a NaN part: at most one per
    # attempt (under load a first attempt can come back partial and the group retries with the same bodies)
    line = f"left out the contribution of peer {reports(processes, 'rogue')[0]['peer_id']}: it holds NaN or Inf"
    logs = {name: processes.log(name) for name in honest}
    named = [name for name, text in logs.items() if "left out the contribution" in text]
    assert named, "no honest reducer logged the NaN contribution"
    for name in named:
        attempts = 1 + len(re.findall(rf"fusion at iteration {ATTACKS.index('nan')}, attempt \d+ failed", logs[name]))
        left_out = [entry for entry in logs[name].splitlines() if "left out the contribution" in entry]
        assert len(left_out) <= attempts and all(line in entry for entry in left_out), logs[name][-2000:]
    assert "Traceback" not in "".join(logs.values())
