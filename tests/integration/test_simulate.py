"""`p2pcold simulate` end to end with tiny peers: the run folder, Ctrl-C, SIGTERM, and --resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from swarm_cli import FAST_SWARM, hear_ctrl_c, kill_tagged, scalars, tag_environment, tagged_processes, toy_recipes

pytestmark = [pytest.mark.network, pytest.mark.timeout(700)]


def write_simulation_config(tmp_path: Path, model: Path, iterations: int, steps: int | None = None, seconds: float | None = None) -> Path:
    """`seconds`: each peer finetunes that long per iteration, so that a test which interrupts the run has a
    window of (iterations - 1) * seconds to do it, however slowly the busy machine schedules the test."""
    recipes = toy_recipes(tmp_path, 4)
    config = {
        "model": str(model),
        "datasets": recipes[:3],
        "iterations": iterations,
        "seed": 1,
        "run_id": "sim",
        "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": steps, "seconds": seconds}, "learning_rate": 1e-3},
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


@pytest.fixture
def simulator():
    """Start `p2pcold simulate ...` with a tag in its environment; kill anything tagged afterwards."""
    tag = uuid.uuid4().hex

    def start(*args: str, log: Path) -> subprocess.Popen:
        env = {**os.environ, **tag_environment(tag), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        with open(log, "w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "p2pcold.cli", "simulate", *args], stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=hear_ctrl_c
            )

    start.tag = tag
    yield start
    kill_tagged(tag)


def test_simulate_stops_on_sigterm_and_ctrl_c_and_resumes_into_the_run_folder(tmp_path, tiny_model_dir, simulator):
    """One run, stopped twice and resumed twice: one swarm serves every assertion about the simulator.

    1. SIGTERM (what `kill`, systemd and job schedulers send) once every p2pd is up: it reaches only the
       simulator, since the processes it started run in sessions of their own. It stops them all,
       bootstrap included, with one line, and exits with 143.
    2. --resume, then Ctrl-C once a peer has a checkpoint: every process goes, exit 130.
    3. --resume to the end, in a private swarm whose secret the user gives: the run folder is complete,
       and the secret appears in no log, config or checkpoint."""
    iterations = 4
    config = write_simulation_config(tmp_path, tiny_model_dir, iterations=iterations, seconds=3.0)
    secret = f"sim-secret-{uuid.uuid4().hex}"
    (tmp_path / "run.secret").write_text(secret + "\n")
    (tmp_path / "run.secret").chmod(0o600)
    options = ("--secret-file", str(tmp_path / "run.secret"), "--log-dir", str(tmp_path / "tb"))
    run = tmp_path / "run"

    # 1. SIGTERM
    log = tmp_path / "sigterm.log"
    proc = simulator(str(config), *options, log=log)
    peer_logs = [run / "logs" / f"{name}.log" for name in ("peer00-toy_movies", "peer01-toy_flights", "peer02-toy_phones")]
    deadline = time.monotonic() + 200
    while not all(path.is_file() and "DHT node" in path.read_text() for path in peer_logs):  # every p2pd is up
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    output = log.read_text()
    stopping = [line for line in output.splitlines() if line.startswith("terminated:")]
    assert stopping == [f"terminated: stopping every process; continue with: p2pcold simulate --resume {run}"], output[-3000:]
    assert "Traceback" not in output
    assert_nothing_left(simulator.tag, "SIGTERM")

    # 2. Ctrl-C
    log = tmp_path / "ctrl-c.log"
    proc = simulator("--resume", str(run), *options, log=log)
    latest = run / "peers" / "peer00-toy_movies" / "latest.json"
    deadline = time.monotonic() + 200
    while not (latest.is_file() and json.loads(latest.read_text())["iteration"] >= 1):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    assert "--resume" in log.read_text()
    assert_nothing_left(simulator.tag, "Ctrl-C")
    assert json.loads(latest.read_text())["iteration"] < iterations

    # 3. to the end
    log = tmp_path / "resumed.log"
    proc = simulator("--resume", str(run), *options, log=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert json.loads(latest.read_text())["iteration"] == iterations
    results = json.loads((run / "results.json").read_text())
    assert {0, iterations} <= {r["iteration"] for r in results}
    assert {(r["mode"], r["seen"]) for r in results} == {("cold", True), ("cold", False), ("frozen", True), ("frozen", False)}
    # each fused base's rows say what its boundary produced (θ0's rows: nothing)
    assert all(r["fusion"] is None for r in results if r["iteration"] == 0)
    for r in results:
        if r["iteration"] > 0:
            assert r["fusion"]["status"] in ("ok", "solo", "failed", "adopted") and r["fusion"]["attempts"] >= 0, r
            assert set(r["fusion"]["members"]) <= {"toy_flights", "toy_movies", "toy_phones"}, r
    assert any(r["fusion"]["status"] == "ok" for r in results if r["iteration"] > 0), results  # members admit each other
    for name in ("results.csv", "accuracy.png", "gain_per_dataset.png", "config.yaml", "checkpoints/last/model.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["bootstrap.log", "evaluator.log", "peer00-toy_movies.log", "peer01-toy_flights.log", "peer02-toy_phones.log"]
    output = log.read_text()
    assert "pretrained  0" in output and f"fused       {iterations}" in output  # the closing table
    assert re.search(r"^monitor: http://127\.0\.0\.1:\d+/$", output, re.MULTILINE), output[:2000]
    assert "a private swarm" in output and "open swarm" not in output
    assert "toy_movies:" in output  # the simulator's own node joined the private DHT and read the peers' progress
    # TensorBoard: each peer's own scalars, and the evaluator's accuracy through the run's monitor
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["monitor", "peer00-toy_movies", "peer01-toy_flights", "peer02-toy_phones"]
    watched = scalars(tmp_path / "tb" / "monitor")
    assert watched["accuracy/cold/mean"] == watched["accuracy/frozen/mean"] and {0, iterations} <= set(watched["accuracy/cold/mean"]), watched
    assert scalars(tmp_path / "tb" / "peer02-toy_phones")["toy_phones/loss"] == list(range(iterations)), watched
    assert_nothing_left(simulator.tag, "the end")
    for path in [*tmp_path.glob("*.log"), *(p for p in run.rglob("*") if p.is_file())]:
        assert secret.encode() not in path.read_bytes(), path


def assert_nothing_left(tag: str, after: str) -> None:
    deadline = time.monotonic() + 5
    while tagged_processes(tag) and time.monotonic() < deadline:  # SIGKILLed processes take a moment to go
        time.sleep(0.1)
    assert tagged_processes(tag) == [], f"processes left behind after {after}"
