import json

import pytest
import torch

from p2pcold.config import RunConfig, from_dict
from p2pcold.local_run import LocalRun
from p2pcold.model import body_state, load_body, read_metadata
from p2pcold.results import read_results
from p2pcold.utils import P2PColdError, state_dict_hash
from toy_data import write_toy_datasets


def make_config(tmp_path, tiny_model_dir, output="run", **overrides) -> RunConfig:
    recipes = write_toy_datasets(tmp_path / "data", 3)
    data = {
        "model": str(tiny_model_dir),
        "datasets": recipes,
        "contributors_per_iteration": 2,
        "iterations": 3,
        "seed": 1,
        "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": 3}, "learning_rate": 1e-3, "head": "keep"},
        "eval": {"datasets": [recipes[0]], "modes": ["cold", "frozen"], "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": 2}}, "frozen_epochs": 2},
        "output_dir": str(tmp_path / output),
    }
    data.update(overrides)
    return from_dict(RunConfig, data)


def run_to_end(config: RunConfig) -> LocalRun:
    run = LocalRun(config, device="cpu", show_progress=False)
    run.setup()
    run.train()
    return run


def test_run_writes_checkpoints_results_and_plot(tmp_path, tiny_model_dir):
    run = run_to_end(make_config(tmp_path, tiny_model_dir))
    out = run.output_dir
    assert json.loads((out / "latest.json").read_text())["iteration"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-0001", "iter-0002", "iter-0003"]
    results = json.loads((out / "results.json").read_text())
    assert sorted({r["iteration"] for r in results}) == [0, 1, 2, 3]
    assert {r["mode"] for r in results} == {"cold", "frozen"}
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "results.csv").is_file()
    history = json.loads((out / "iterations.json").read_text())
    assert [len(h["contributors"]) for h in history] == [2, 2, 2]  # k=2 sampled per iteration
    # what each boundary produced, next to the evaluation rows of that iteration and in the checkpoint
    for row in results:
        fusion = row["fusion"]
        assert fusion is None if row["iteration"] == 0 else fusion == {"status": "ok", "members": sorted(history[row["iteration"] - 1]["contributors"]), "attempts": 1, "failure": None}
    assert read_metadata(out / "checkpoints" / "iter-0003").extra["fusion"]["members"] == sorted(history[2]["contributors"])
    old_rows = [{k: v for k, v in r.items() if k != "fusion"} for r in results]  # a results.json written before the field
    (tmp_path / "old.json").write_text(json.dumps(old_rows))
    assert [r.fusion for r in read_results(tmp_path / "old.json")] == [None] * len(results)
    assert "CoLD" in run.summary()
    fused = load_body(str(out / "checkpoints" / "iter-0003"))
    assert state_dict_hash(body_state(fused)) == state_dict_hash(run.base)


def test_fused_base_is_the_average_of_the_contributors(tmp_path, tiny_model_dir, monkeypatch):
    """One iteration, checked against an independent average of the contributions."""
    from p2pcold import local_run

    captured = []
    real_aggregate = local_run.aggregate

    def spy(states, weights=None, labels=None, rule=None):
        captured.extend(states)
        return real_aggregate(states, weights, labels, rule)

    monkeypatch.setattr(local_run, "aggregate", spy)
    run = run_to_end(make_config(tmp_path, tiny_model_dir, iterations=1, contributors_per_iteration=None, eval={}))
    assert len(captured) == 3
    for name, fused in run.base.items():
        if fused.is_floating_point():
            expected = sum(state[name] for state in captured) / 3
            assert torch.allclose(fused, expected, atol=1e-6), name
    assert not any(name.startswith("head") or "out_proj" in name for name in run.base)  # heads never fused


def test_killed_and_resumed_run_is_bit_identical(tmp_path, tiny_model_dir):
    straight = run_to_end(make_config(tmp_path, tiny_model_dir, output="straight"))

    config = make_config(tmp_path, tiny_model_dir, output="interrupted")
    first = LocalRun(config, device="cpu", show_progress=False)
    first.setup()
    first.run_iteration()  # "killed" after one iteration: only its checkpoint survives
    del first
    resumed = run_to_end(config)
    assert resumed.iteration == 3
    for name in straight.base:
        assert torch.equal(straight.base[name], resumed.base[name]), name
    straight_results = json.loads((straight.output_dir / "results.json").read_text())
    resumed_results = json.loads((resumed.output_dir / "results.json").read_text())
    assert straight_results == resumed_results


def test_output_dir_of_another_run_is_refused(tmp_path, tiny_model_dir):
    run_to_end(make_config(tmp_path, tiny_model_dir, iterations=1, eval={}))
    with pytest.raises(P2PColdError, match="different config"):
        LocalRun(make_config(tmp_path, tiny_model_dir, iterations=1, seed=2, eval={}), device="cpu").setup()
