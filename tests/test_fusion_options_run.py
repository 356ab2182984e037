"""The fusion options in the reference run: an exact resume with the outer momentum buffer, and
backtracking that rejects a harmful fusion (§7)."""

import pytest
import torch

from p2pcold.local_run import LocalRun
from p2pcold.merging import Merger
from p2pcold.model import load_outer_state, read_metadata
from p2pcold.simulate import plan_peers
from p2pcold.utils import P2PColdError
from test_local_run import make_config, run_to_end

PROBE = {"frozen_epochs": 15, "frozen_learning_rate": 0.05, "finetune": {"batch_size": 32, "max_length": 16, "budget": {"steps": 1}}}


def test_momentum_and_dare_run_resumes_bit_identical(tmp_path, tiny_model_dir):
    fusion = {"method": "dare", "drop_rate": 0.5, "outer_learning_rate": 0.8, "outer_momentum": 0.5, "nesterov": True}
    straight = run_to_end(make_config(tmp_path, tiny_model_dir, output="straight", fusion=fusion, eval={}))

    config = make_config(tmp_path, tiny_model_dir, output="interrupted", fusion=fusion, eval={})
    first = LocalRun(config, device="cpu", show_progress=False)
    first.setup()
    first.run_iteration()
    first.run_iteration()  # "killed" here: θ_2 and its momentum buffer are on disk
    del first
    resumed = run_to_end(config)
    assert resumed.iteration == 3
    assert all(torch.equal(straight.base[n], resumed.base[n]) for n in straight.base)
    buffer = load_outer_state(resumed.output_dir / "checkpoints" / "iter-0003")
    assert buffer is not None and all(torch.equal(buffer[n], straight.state.momentum[n]) for n in buffer)
    assert any(bool(t.abs().sum() > 0) for t in buffer.values())


@pytest.mark.parametrize("step", [0.0, 0.5])
def test_backtracking_rejects_a_harmful_fusion(tmp_path, tiny_model_dir, monkeypatch, step):
    """A fusion that zeroes the body (constant features: chance on every member) is rejected."""

    def harmful(self, bodies, base, iteration, datasets, weights, average):
        return {name: torch.zeros_like(t) if t.is_floating_point() else t for name, t in base.items()}

    monkeypatch.setattr(Merger, "merge_all", harmful)
    fusion = {"backtrack": True, "backtrack_step": step, "backtrack_examples": 64}
    config = make_config(tmp_path, tiny_model_dir, iterations=1, contributors_per_iteration=None, fusion=fusion, eval=PROBE)
    run = run_to_end(config)
    record = run.history[0]["backtrack"]
    assert record["rejected"] and record["step"] == step, record
    assert sum(record["fused"][n] < record["previous"][n] for n in record["previous"]) >= 2
    theta0 = run.state.theta0
    for name, tensor in run.base.items():
        expected = theta0[name] * (1 - step) if tensor.is_floating_point() else theta0[name]
        assert torch.allclose(tensor, expected), name
    assert read_metadata(run.output_dir / "checkpoints" / "iter-0001").extra["backtrack"] == record


def test_backtracking_keeps_a_fusion_that_is_no_worse(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(Merger, "merge_all", lambda self, bodies, base, *rest: dict(base))  # θ_{i+1} = θ_i: the same scores
    config = make_config(tmp_path, tiny_model_dir, iterations=1, fusion={"backtrack": True}, eval=PROBE)
    record = run_to_end(config).history[0]["backtrack"]
    assert not record["rejected"] and record["step"] == 1.0 and record["fused"] == record["previous"]


def test_simulate_refuses_what_a_swarm_cannot_compute(tmp_path, tiny_model_dir):
    with pytest.raises(P2PColdError, match="^simulate: fusion.method=ties needs every delta"):
        plan_peers(make_config(tmp_path, tiny_model_dir, fusion={"method": "ties"}), None, None)
    config = make_config(tmp_path, tiny_model_dir, fusion={"outer_momentum": 0.9}, simulate={"centralized": True})
    assert len(plan_peers(config, None, None)) == 3  # the Repository holds the one momentum buffer
