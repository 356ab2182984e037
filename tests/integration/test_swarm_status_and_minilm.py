"""`p2pcold status` on a running swarm (issue f), and two real MiniLM peers on real data (issue g)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModel

from p2pcold.model import body_state, latest_checkpoint, load_body, read_metadata
from swarm_cli import toy_recipes, write_run_config

pytestmark = [pytest.mark.network]


def run_status(swarm, name, config, maddr, *extra, timeout=90) -> tuple[int, str]:
    """Run `p2pcold status` to completion: (exit code, stdout)."""
    out = swarm.folder / f"{name}.out"
    proc = swarm.start(name, "status", "--config", str(config), "--initial-peers", maddr, *extra, stdout_file=out)
    return swarm.wait(proc, name, timeout=timeout), out.read_text()


@pytest.mark.timeout(240)
def test_status_lists_the_running_peers(swarm, tmp_path, tiny_model_dir):
    recipes = toy_recipes(tmp_path, 2)
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, iterations=2)
    maddr = swarm.bootstrap(config)
    slow = ("--set", "finetune.budget.steps=null", "--set", "finetune.budget.seconds=10")
    peers = {name: swarm.peer(name, config, recipe, maddr, *slow) for name, recipe in (("p0", recipes[0]), ("p1", recipes[1]))}
    ids = {}
    for name, proc in peers.items():
        match = swarm.wait_for_log(name, r"peer (\w+) \((\w+)\) starts at iteration 0", timeout=120, proc=proc)
        ids[match.group(1)] = match.group(2)
    assert sorted(ids.values()) == ["toy_flights", "toy_movies"]

    # both forms at once, while the peers finetune iteration 0 (or 1, on a slow machine)
    out = {"text": swarm.folder / "status-text.out", "json": swarm.folder / "status-json.out"}
    procs = {
        "text": swarm.start("status-text", "status", "--config", str(config), "--initial-peers", maddr, stdout_file=out["text"]),
        "json": swarm.start("status-json", "status", "--config", str(config), "--initial-peers", maddr, "--json", stdout_file=out["json"]),
    }
    for kind, proc in procs.items():
        assert swarm.wait(proc, f"status-{kind}", timeout=90) == 0, swarm.log(f"status-{kind}")[-3000:]

    text = out["text"].read_text()
    assert "run itest: 2 live peer(s)" in text, text
    header, *rows = text.splitlines()[1:]
    assert header.split()[:4] == ["peer", "dataset", "iteration", "phase"]
    listed = {}
    for row in rows:
        short_id, dataset, iteration, phase = row.split()[:4]
        listed[dataset] = (short_id, int(iteration), phase)
    assert set(listed) == {"toy_flights", "toy_movies"}, text
    for peer, dataset in ids.items():
        short_id, iteration, phase = listed[dataset]
        assert peer.endswith(short_id) and iteration in (0, 1) and phase in ("finetuning", "averaging"), text

    records = json.loads(out["json"].read_text())
    assert {r["peer_id"]: r["dataset"] for r in records} == ids
    for record in records:
        assert record["iteration"] in (0, 1) and record["phase"] in ("finetuning", "averaging")
        assert set(record) >= {"peer_id", "dataset", "iteration", "phase", "train_loss", "dev_accuracy", "last_group_size", "last_seen"}

    for name, proc in peers.items():
        assert swarm.wait(proc, name, timeout=120) == 0, swarm.log(name)[-3000:]
    # finished peers stay listed, as done at the last iteration, until their records expire (progress_ttl)
    code, stdout = run_status(swarm, "status-done", config, maddr, "--json")
    assert code == 0
    done = {r["dataset"]: r for r in json.loads(stdout)}
    assert {d: (r["iteration"], r["phase"], r["last_group_size"]) for d, r in done.items()} == {
        "toy_flights": (2, "done", 2),
        "toy_movies": (2, "done", 2),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_minilm_peers_on_real_data_end_with_the_same_body(swarm, tmp_path):
    config = write_run_config(
        tmp_path,
        "minilm",
        ["rotten_tomatoes", "tweets_airlines"],
        num_hidden_layers=2,
        iterations=2,
        finetune={"batch_size": 8, "max_length": 32, "budget": {"steps": 4}, "learning_rate": 5e-5, "num_threads": 1},
    )
    maddr = swarm.bootstrap(config)
    peers = {name: swarm.peer(name, config, name, maddr) for name in ("rotten_tomatoes", "tweets_airlines")}
    for name, proc in peers.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:]
        log = swarm.log(name)
        assert re.findall(r"iteration (\d): fused with a group of 2", log) == ["0", "1"], log[-3000:]

    checkpoints = [latest_checkpoint(tmp_path / name) for name in peers]
    bodies = []
    for checkpoint in checkpoints:
        assert read_metadata(checkpoint).iteration == 2
        model = AutoModel.from_pretrained(checkpoint)  # a plain Hugging Face folder
        assert model.config.num_hidden_layers == 2
        bodies.append(body_state(model))
    assert bodies[0].keys() == bodies[1].keys()
    for name in bodies[0]:
        assert torch.allclose(bodies[0][name], bodies[1][name], atol=1e-6), name
    theta0 = body_state(load_body("minilm", 2))
    assert max((bodies[0][n] - theta0[n]).abs().max().item() for n in theta0) > 1e-5  # they did train
