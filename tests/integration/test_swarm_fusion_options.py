"""The fusion options a swarm can compute reproduce the reference run; the others are refused in one line."""

import subprocess
import sys

import pytest

from bodies import final_body, reference_body
from swarm_cli import toy_recipes, write_run_config
from test_swarm_modes import assert_close, run_with_repository

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


def test_decentralized_task_arithmetic_with_an_outer_step_equals_the_reference_run(swarm, tmp_path, tiny_model_dir):
    """Task arithmetic is the all-reduced mean scaled by λ·k; DARE-free so every body is a plain average."""
    recipes = toy_recipes(tmp_path, 3)
    fusion = {"method": "task_arithmetic", "scale": 0.4, "outer_learning_rate": 0.8}
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, fusion=fusion, swarm={"min_group_size": 3})
    maddr = swarm.bootstrap(config)
    peers = {f"peer{i}": swarm.peer(f"peer{i}", config, recipe, maddr) for i, recipe in enumerate(recipes)}
    for name, proc in peers.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:]
        assert "fused with a group of 3" in swarm.log(name)
    reference = reference_body(config)
    for name in peers:
        assert_close(final_body(tmp_path / name), reference)


def test_repository_with_dare_and_nesterov_momentum_equals_the_reference_run(swarm, tmp_path, tiny_model_dir):
    """DARE drops at each contributor before the all-reduce; the Repository holds the momentum buffer."""
    recipes = toy_recipes(tmp_path, 3)
    fusion = {"method": "dare", "drop_rate": 0.5, "outer_learning_rate": 0.7, "outer_momentum": 0.5, "nesterov": True}
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, contributors_per_iteration=2, fusion=fusion)
    peers = run_with_repository(swarm, tmp_path, config, recipes)
    reference = reference_body(config)
    assert_close(final_body(tmp_path / "repository"), reference)
    for name in peers:
        assert_close(final_body(tmp_path / name), reference)


def test_a_decentralized_peer_refuses_outer_momentum_in_one_line(tmp_path, tiny_model_dir):
    recipes = toy_recipes(tmp_path, 1)
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, fusion={"outer_momentum": 0.9})
    unreachable = "/ip4/127.0.0.1/tcp/9/p2p/QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"  # refused before any dial
    args = ["peer", "--config", str(config), "--dataset", recipes[0], "--run-dir", str(tmp_path / "peer"), "--initial-peers", unreachable]
    done = subprocess.run([sys.executable, "-m", "p2pcold.cli", *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("p2pcold: error: fusion.outer_momentum needs one momentum buffer")
    assert "Traceback" not in done.stderr
