"""`p2pcold simulate` end to end with tiny peers: the run folder, Ctrl-C, and --resume."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from swarm_cli import FAST_SWARM, toy_recipes

pytestmark = [pytest.mark.network, pytest.mark.timeout(400)]


def write_simulation_config(tmp_path: Path, model: Path, iterations: int, steps: int) -> Path:
    recipes = toy_recipes(tmp_path, 4)
    config = {
        "model": str(model),
        "datasets": recipes[:3],
        "iterations": iterations,
        "seed": 1,
        "run_id": "sim",
        "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": steps}, "learning_rate": 1e-3},
        "eval": {
            "datasets": [recipes[0], recipes[3]],
            "unseen": [recipes[3]],
            "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": 2}},
            "frozen_epochs": 2,
        },
        "output_dir": str(tmp_path / "run"),
        "swarm": FAST_SWARM,
        "simulate": {"refresh_seconds": 0.5},
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tagged_processes(tag: str) -> list[str]:
    """Live processes whose environment carries `tag`: every descendant of the simulator, p2pd included.

    torch's `torch_shm_manager` is left out: torch starts it for shared-memory tensors and it exits
    by itself once its clients are gone (the fixture still kills it)."""
    needle = f"P2PCOLD_SIM_TEST={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle not in (entry / "environ").read_bytes():
                    continue
                state = (entry / "stat").read_bytes().rsplit(b")", 1)[-1].split()[0]
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if state != b"Z" and "torch_shm_manager" not in cmdline:
                found.append(f"{entry.name}: {cmdline[:120]}")
    return found


@pytest.fixture
def simulator():
    """Start `p2pcold simulate ...` with a tag in its environment; kill anything tagged afterwards."""
    tag = uuid.uuid4().hex

    def start(*args: str, log: Path) -> subprocess.Popen:
        env = {**os.environ, "P2PCOLD_SIM_TEST": tag, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, "-m", "p2pcold.cli", "simulate", *args], stdout=out, stderr=subprocess.STDOUT, env=env)

    start.tag = tag
    yield start
    needle = f"P2PCOLD_SIM_TEST={tag}".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def test_three_tiny_peers_produce_the_run_folder(tmp_path, tiny_model_dir, simulator):
    config = write_simulation_config(tmp_path, tiny_model_dir, iterations=2, steps=3)
    log = tmp_path / "simulate.log"
    proc = simulator(str(config), log=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert sorted({r["iteration"] for r in results}) == [0, 1, 2]
    assert {(r["mode"], r["seen"]) for r in results} == {("cold", True), ("cold", False), ("frozen", True), ("frozen", False)}
    # each fused base's rows say what its boundary produced (θ0's rows: nothing)
    assert all(r["fusion"] is None for r in results if r["iteration"] == 0)
    for r in results:
        if r["iteration"] > 0:
            assert r["fusion"]["status"] in ("ok", "solo", "failed", "adopted") and r["fusion"]["attempts"] >= 0, r
            assert set(r["fusion"]["members"]) <= {"toy_flights", "toy_movies", "toy_phones"}, r
    for name in ("results.csv", "accuracy.png", "gain_per_dataset.png", "config.yaml", "checkpoints/last/model.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["bootstrap.log", "evaluator.log", "peer00-toy_movies.log", "peer01-toy_flights.log", "peer02-toy_phones.log"]
    output = log.read_text()
    assert "pretrained  0" in output and "fused       2" in output  # the closing table
    assert tagged_processes(simulator.tag) == []


def test_ctrl_c_stops_every_process_and_resume_finishes(tmp_path, tiny_model_dir, simulator):
    config = write_simulation_config(tmp_path, tiny_model_dir, iterations=4, steps=20)
    run = tmp_path / "run"
    log = tmp_path / "first.log"
    proc = simulator(str(config), log=log)
    latest = run / "peers" / "peer00-toy_movies" / "latest.json"
    deadline = time.monotonic() + 200
    while not (latest.is_file() and json.loads(latest.read_text())["iteration"] >= 1):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert proc.wait(timeout=60) == 130
    assert "--resume" in log.read_text()
    time.sleep(1.0)
    assert tagged_processes(simulator.tag) == [], "processes left behind after Ctrl-C"
    stopped_at = json.loads(latest.read_text())["iteration"]
    assert stopped_at < 4

    resumed = simulator("--resume", str(run), log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert json.loads(latest.read_text())["iteration"] == 4
    results = json.loads((run / "results.json").read_text())
    assert max(r["iteration"] for r in results) == 4 and 0 in {r["iteration"] for r in results}
