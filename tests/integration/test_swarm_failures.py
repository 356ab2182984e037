"""Failures of a swarm, with real processes: a peer killed at the boundary and restarted (issue c), a late
joiner (d), a peer with another base model (e), a peer whose all-reduce failed on its side only while the
others fused (issue 9: the swarm ends with one body, not two), and a reducer that stalls mid-reduce in a
Repository's run (issue 9: the Repository fuses on retry, or stops the run with an error).

Timing is made deterministic by speed, not by sleeps: "slow" peers finetune for a fixed number of
seconds per iteration (`finetune.budget.seconds`), "fast" ones for 3 steps (well under a second), so a
fast peer always reaches a boundary first and waits there for the slow ones.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from p2pcold.model import checkpoint_path, latest_checkpoint, read_metadata
from p2pcold.testing import build_tiny_encoder
from bodies import body_at, final_body, max_diff, reference_body
from faulty_peer import INJECTED, STALLED
from swarm_cli import FAST_SWARM, SwarmProcesses, log_times, process_group, toy_recipes, write_run_config

pytestmark = [pytest.mark.network]

DEADLINE = FAST_SWARM["boundary_deadline"]


def slow(seconds: float) -> tuple[str, ...]:
    return ("--set", "finetune.budget.steps=null", "--set", f"finetune.budget.seconds={seconds}")


# --------------------------------------------------------------------------- c) kill and restart


@pytest.mark.timeout(300)
def test_peer_killed_at_the_boundary_restarts_and_catches_up(swarm, tmp_path, tiny_model_dir):
    """A peer SIGKILLed while averaging at iteration 1 leaves no process behind; the two survivors
    finish that iteration without it (a group of 2, well within boundary_deadline); restarted with the
    same --run-dir it resumes from its own checkpoint, downloads the swarm's newer base, rejoins a
    boundary and ends the run with the same body as the survivors. No log holds a traceback.

    What is guaranteed: the restarted peer resumes from its last checkpoint (never from θ0) and reaches
    the run's last iteration with the survivors' final body, provided it is back before they stop
    serving it (up to boundary_deadline after they finish): at the first boundary after it is back it
    fuses with them (normally), or, if it is back only after their last boundary (a very slow
    restart), it downloads their final body. A peer back later than that keeps its own update."""
    recipes = toy_recipes(tmp_path, 3)
    iterations, slow_s = 8, 8  # the restart has 6 boundaries (~70 s) to come back: its imports alone took 56 s under load
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, iterations=iterations)
    maddr = swarm.bootstrap(config)
    survivors = {name: swarm.peer(name, config, recipe, maddr, *slow(slow_s)) for name, recipe in (("a", recipes[0]), ("b", recipes[1]))}
    victim = swarm.peer("victim", config, recipes[2], maddr)

    # iteration 0: the fast victim waits at the boundary for both slow peers (a group of 3)
    swarm.wait_for_log("victim", r"iteration 0: fused with a group of 3", timeout=120, proc=victim)
    swarm.wait_for_log("victim", r"iteration 1: finetuned", timeout=30, proc=victim)
    time.sleep(1.0)  # it is now waiting at boundary 1 (phase "averaging"), the slow peers still finetune
    os.kill(victim.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
    victim.wait(timeout=10)
    killed_at = time.monotonic()
    deadline = killed_at + 10
    while process_group(victim.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = process_group(victim.pid)
    assert not left, f"the killed peer's hivemind processes / p2pd outlived it: {left}"
    assert read_metadata(latest_checkpoint(tmp_path / "victim")).iteration == 1

    # the survivors finish iteration 1 without the victim, bounded by boundary_deadline
    for name, proc in survivors.items():
        swarm.wait_for_log(name, r"iteration 1: fused with a group of 2", timeout=slow_s + DEADLINE + 30, proc=proc)
        log = swarm.log(name)
        (arrived,), (fused,) = log_times(log, r"iteration 1: finetuned"), log_times(log, r"iteration 1: fused")
        assert fused - arrived < DEADLINE, f"{name} waited {fused - arrived} s at boundary 1"

    # restarted once the swarm has moved on, so that it has to catch up
    restarted = swarm.peer("victim-restarted", config, recipes[2], maddr, run_dir=tmp_path / "victim")
    for name, proc in {**survivors, "victim-restarted": restarted}.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:]

    log = swarm.log("victim-restarted")
    assert re.search(r"resumed from \S*iter-0001 at iteration 1", log), log[-3000:]
    for name in ("bootstrap", "a", "b", "victim", "victim-restarted"):  # expected failures are one line each
        assert "Traceback" not in swarm.log(name), swarm.log(name)[-3000:]
    caught_up = int(re.search(r"downloaded the swarm's base of iteration (\d+) \(we were at 1\)", log).group(1))
    assert caught_up >= 2
    assert f"done at iteration {iterations}" in log
    bodies = {name: final_body(tmp_path / name) for name in ("a", "b", "victim")}
    for name in ("b", "victim"):
        assert read_metadata(latest_checkpoint(tmp_path / name)).iteration == iterations
        assert max_diff(bodies["a"], bodies[name]) <= 1e-6, name
    rejoined = [int(i) for i in re.findall(r"iteration (\d+): fused with a group of 3", log)]
    if rejoined:  # the normal case: back in a group with the survivors
        for name in survivors:
            assert re.search(rf"iteration ({'|'.join(map(str, rejoined))}): fused with a group of 3", swarm.log(name))
    else:  # restarted after the survivors' last boundary: it took their final body instead
        assert f"downloaded the swarm's base of iteration {iterations}" in log, log[-3000:]


# --------------------------------------------------------------------------- a fusion failed on one side only

FAULTY_PEER = (str(Path(__file__).with_name("faulty_peer.py")),)


@pytest.mark.timeout(300)
def test_peer_whose_fusion_failed_on_its_side_adopts_the_groups_body(swarm, tmp_path, tiny_model_dir):
    """At boundary 0 the victim's fuse() fails without joining (the group split in matchmaking), so a and
    b fuse as a group of 2 and nothing in their all-reduce tells them. The victim says that its fusion
    failed, then adopts the group's body (logged, and recorded in that checkpoint's metadata with its
    failed attempts), so that the three peers end the run with one body, not two.

    The victim is listed in the run before a and b start, so that they wait for it at boundary 0 however
    late their start-up (imports) under load; the victim waits for them at most half a boundary_deadline,
    which here leaves a and b a minute to start (a wait ends as soon as they arrive)."""
    recipes = toy_recipes(tmp_path, 3)
    iterations = 2
    swarm_fields = {"boundary_deadline": 120.0}
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, iterations=iterations, swarm=swarm_fields)
    maddr = swarm.bootstrap(config)
    procs = {"victim": swarm.peer("victim", config, recipes[2], maddr, program=(*FAULTY_PEER, "split", "0"))}
    swarm.wait_for_log("victim", r"starts at iteration 0\b", timeout=120, proc=procs["victim"])
    procs.update({name: swarm.peer(name, config, recipe, maddr) for name, recipe in (("a", recipes[0]), ("b", recipes[1]))})
    for name, proc in procs.items():
        assert swarm.wait(proc, name, timeout=150) == 0, swarm.log(name)[-3000:]
    for name in ("bootstrap", *procs):
        assert "Traceback" not in swarm.log(name), swarm.log(name)[-3000:]

    datasets = {name: read_metadata(latest_checkpoint(tmp_path / name)).extra["dataset"] for name in procs}
    for name in ("a", "b"):  # fused without the victim: left alone, it would keep a second body
        assert read_metadata(checkpoint_path(tmp_path / name, 1)).extra["fusion"]["members"] == sorted([datasets["a"], datasets["b"]])

    log = swarm.log("victim")
    assert re.search(rf"iteration 0: no fusion \({re.escape(INJECTED)}\)", log), log[-3000:]
    # the group's base, taken at boundary 0 (the others were already past it) or before finetuning
    # iteration 1 (its boundary ended first, recorded as failed)
    assert re.search(r"iteration 0: the swarm had already left this boundary; took its newer base|iteration 1: our last boundary did not fuse", log), log[-3000:]
    adopted_at = int(re.search(r"downloaded the swarm's base of iteration (\d+) \(we were at [01]\)", log).group(1))
    record = read_metadata(checkpoint_path(tmp_path / "victim", adopted_at)).extra["fusion"]
    assert record["status"] == "adopted" and record["attempts"] >= 1 and record["failure"] == INJECTED, record
    assert max_diff(body_at(checkpoint_path(tmp_path / "victim", adopted_at)), body_at(checkpoint_path(tmp_path / "a", adopted_at))) <= 1e-5

    bodies = {name: final_body(tmp_path / name) for name in procs}
    for name in procs:
        assert read_metadata(latest_checkpoint(tmp_path / name)).iteration == iterations, name
        assert max_diff(bodies["a"], bodies[name]) <= 1e-5, name


@pytest.mark.timeout(420)
def test_repository_fuses_on_retry_after_a_reducer_stalls_and_stops_the_run_when_it_never_recovers(swarm, tmp_path, tiny_model_dir):
    """A real `bootstrap --repository` run with two contributors, one of which ("victim") carries a
    reducer that stalls past the senders' reducer_timeout (the members give up on it mid-reduce).

    Stalled in the first group only: every member sees the all-reduce fail, the group retries with the
    same bodies, and the Repository records a fusion of both contributors after 2+ attempts; the run ends
    equal to the reference run. Stalled in every group: the Repository stops the run at the deadline with
    one line and a non-zero exit, and tells the peers, who stop too; nothing exits 0 with a wrong body."""
    recipes = toy_recipes(tmp_path, 2)
    runs = {"recovers": (1, 2, 60.0), "never": (10**6, 1, 15.0)}  # stalled groups, iterations, boundary_deadline
    for run, (stalled_groups, iterations, deadline) in runs.items():
        folder = tmp_path / run
        folder.mkdir()
        swarm.folder = folder
        swarm_fields = {"boundary_deadline": deadline, "contributor_deadline": 120.0}
        config = write_run_config(folder, str(tiny_model_dir), recipes, iterations=iterations, swarm=swarm_fields)
        maddr = swarm.bootstrap(config, "--repository", "--run-dir", str(folder / "repository"))
        repository = swarm.procs[-1]
        stall = (*FAULTY_PEER, "stall-reducer", str(stalled_groups))
        peers = {"victim": swarm.peer("victim", config, recipes[0], maddr, "--centralized", program=stall),
                 "honest": swarm.peer("honest", config, recipes[1], maddr, "--centralized")}
        if run == "recovers":
            for name, proc in {"repository": repository, **peers}.items():
                assert swarm.wait(proc, name, timeout=240) == 0, swarm.log("bootstrap" if proc is repository else name)[-3000:]
            assert f"{STALLED} 1 of 1" in swarm.log("victim")
            fusion = read_metadata(checkpoint_path(folder / "repository", 1)).extra["fusion"]
            assert fusion["status"] == "ok" and fusion["attempts"] >= 2 and len(fusion["members"]) == 2, fusion
            reference = reference_body(config)
            for name in ("repository", *peers):
                assert max_diff(final_body(folder / name), reference) <= 1e-5, name
        else:
            assert swarm.wait(repository, "bootstrap", timeout=240) == 2, swarm.log("bootstrap")[-3000:]
            stopped = [line for line in swarm.log("bootstrap").splitlines() if "error:" in line]
            assert len(stopped) == 1 and re.search(r"iteration 0: fusion failed after \d+ attempt\(s\) within 15 s", stopped[0]), stopped
            for name, proc in peers.items():
                assert swarm.wait(proc, name, timeout=60) != 0, swarm.log(name)[-3000:]
                assert "the Repository stopped the run at iteration 0" in swarm.log(name), swarm.log(name)[-3000:]
            assert latest_checkpoint(folder / "repository") is None or read_metadata(latest_checkpoint(folder / "repository")).iteration == 0
        for name in ("bootstrap", *peers):
            assert "Traceback" not in swarm.log(name), swarm.log(name)[-3000:]


# --------------------------------------------------------------------------- d) and e): one running swarm


@pytest.fixture(scope="module")
def running_swarm(tmp_path_factory, tiny_model_dir):
    """A bootstrap and two slow peers (3 s of finetuning per iteration), shared by the late-joiner and the
    mismatched-model tests. The run is long (100 iterations) so that a late joiner started under any load
    still finds it running; the late-joiner test stops it with SIGTERM once it has what it checks."""
    folder = tmp_path_factory.mktemp("running-swarm")
    processes = SwarmProcesses(folder)
    try:
        recipes = toy_recipes(folder, 4)
        config = write_run_config(folder, str(tiny_model_dir), recipes, iterations=100)
        maddr = processes.bootstrap(config)
        peers = {name: processes.peer(name, config, recipe, maddr, *slow(3)) for name, recipe in (("a", recipes[0]), ("b", recipes[1]))}
        yield processes, folder, config, maddr, recipes, peers
    finally:
        processes.reap()


@pytest.mark.timeout(150)
def test_peer_with_another_base_model_is_refused(running_swarm):
    processes, folder, config, maddr, recipes, peers = running_swarm
    processes.wait_for_log("a", r"starts at iteration 0", timeout=90, proc=peers["a"])
    other_model = build_tiny_encoder(folder / "other-model", seed=1)  # same architecture, other θ0
    started = time.monotonic()
    proc = processes.peer("stranger", config, recipes[3], maddr, "--set", f"model={other_model}")
    processes.wait_for_log("stranger", r"DHT node \w+ up", timeout=90, proc=proc)  # imports take most of the time
    connected = time.monotonic()
    code = processes.wait(proc, "stranger", timeout=60)
    refused, elapsed = time.monotonic() - connected, time.monotonic() - started
    log = processes.log("stranger")
    assert code == 2, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert re.fullmatch(r"p2pcold: error: cannot join run 'itest' \(founded by \w+\): .*base model hash \(θ0\) differs: swarm has [0-9a-f]{12}…, you have [0-9a-f]{12}… \(if that identity is forged, pin θ0 in the run config: swarm.theta0_hash: [0-9a-f]{64}\)", last), last
    assert "base model differs" in last  # the two folders' names are shown too, since θ0 differs
    assert "Traceback" not in log
    assert refused < 20, f"refused {refused:.0f} s after joining the DHT (join_timeout is 30 s; a refusal needs no timeout)"
    assert elapsed < 90, f"refused {elapsed:.0f} s after the start"
    assert not (folder / "stranger" / "latest.json").exists()


@pytest.mark.timeout(180)
def test_peers_that_do_not_fit_the_run_are_refused_in_bounded_time_naming_why(running_swarm):
    """Another learning rate or number of iterations (the run contract), or a second live peer on a
    dataset that already has one: each is refused with one line that names the field or the dataset."""
    processes, folder, config, maddr, recipes, peers = running_swarm
    processes.wait_for_log("a", r"starts at iteration 0", timeout=90, proc=peers["a"])
    iterations = yaml.safe_load(config.read_text())["iterations"]
    expected = {  # name: (extra args, dataset, the refusal's last line)
        "lr": (("--set", "finetune.learning_rate=0.002"), recipes[3], r".*: finetune\.learning_rate differs: swarm has 0\.001, you have 0\.002"),
        "iterations": (("--set", f"iterations={iterations + 1}"), recipes[3], rf".*: iterations differs: swarm has {iterations}, you have {iterations + 1}"),
        "twin": ((), recipes[0], r"dataset toy_\w+ already has a live peer in run 'itest' \(\w+\); .*shards.*"),
    }
    procs = {name: processes.peer(name, config, dataset, maddr, *extra) for name, (extra, dataset, _) in expected.items()}
    connected, exited = {}, {}  # monotonic times: DHT node up (imports take most of the time before), exit
    deadline = time.monotonic() + 150
    while len(exited) < len(procs) and time.monotonic() < deadline:
        for name, proc in procs.items():
            if name not in connected and re.search(r"DHT node \w+ up", processes.log(name)):
                connected[name] = time.monotonic()
            if name not in exited and proc.poll() is not None:
                exited[name] = time.monotonic()
        time.sleep(0.2)
    for name, proc in procs.items():
        log = processes.log(name)
        assert name in exited and proc.returncode == 2, log[-3000:]
        last = log.strip().splitlines()[-1]
        assert re.fullmatch(r"p2pcold: error: " + expected[name][2], last), last
        assert "Traceback" not in log
        # well within join_timeout (30 s); the twin: one re-publication period (progress_ttl / 3) plus a DHT read
        assert exited[name] - connected[name] < FAST_SWARM["progress_ttl"] / 3 + 25, f"{name} refused too late"


@pytest.mark.timeout(240)
def test_late_joiner_downloads_the_current_body_and_fuses_with_the_swarm(running_swarm):
    """A peer that joins at iteration >= 2 starts from the swarm's current base (downloaded), not θ0,
    then fuses with the others and holds the same body as they do; it loads the model from another
    folder (same weights), which the run identity accepts. Then SIGTERM stops every peer (exit 143)."""
    processes, folder, config, maddr, recipes, peers = running_swarm
    processes.wait_for_log("a", r"iteration 1: fused with a group of 2", timeout=150, proc=peers["a"])
    model_copy = shutil.copytree(read_model_path(config), folder / "model-copy")
    late = processes.peer("late", config, recipes[2], maddr, "--set", f"model={model_copy}")
    match = processes.wait_for_log("late", r"downloaded the swarm's base of iteration (\d+) \(we were at 0\)", timeout=120, proc=late)
    joined_at = int(match.group(1))
    assert joined_at >= 2
    # compare with the swarm's checkpoint of that iteration at once: peers keep only their last 2
    swarm_body = body_at(wait_for_checkpoint(folder / "a", joined_at, timeout=10))
    processes.wait_for_log("late", rf"starts at iteration {joined_at}\b", timeout=30, proc=late)
    late_checkpoint = wait_for_checkpoint(folder / "late", joined_at, timeout=20)  # written while it trains on
    assert read_metadata(late_checkpoint).iteration == joined_at
    assert max_diff(body_at(late_checkpoint), swarm_body) <= 1e-6

    fused = int(processes.wait_for_log("late", r"iteration (\d+): fused with a group of 3", timeout=60, proc=late).group(1))
    after = {name: body_at(wait_for_checkpoint(folder / name, fused + 1, timeout=20)) for name in ("a", "b", "late")}
    assert max_diff(after["a"], after["b"]) <= 1e-6 and max_diff(after["a"], after["late"]) <= 1e-6
    assert "iteration 0: finetuned" not in processes.log("late")  # it never trained from θ0

    for proc in (*peers.values(), late):
        os.killpg(proc.pid, signal.SIGTERM)
    for name, proc in {**peers, "late": late}.items():
        assert processes.wait(proc, name, timeout=30) == 143, processes.log(name)[-3000:]


def wait_for_checkpoint(run_dir, iteration: int, timeout: float):
    """checkpoints/iter-NNNN of `run_dir` once it is complete (a peer serves θ_i a moment before it saves it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = latest_checkpoint(run_dir)
        if latest is not None and read_metadata(latest).iteration >= iteration:
            return checkpoint_path(run_dir, iteration)
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} has no checkpoint of iteration {iteration} after {timeout} s")


def read_model_path(config) -> str:
    return yaml.safe_load(config.read_text())["model"]
