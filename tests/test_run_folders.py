"""Run folders and the files in them: resume falls back to the newest intact checkpoint, the same
folder is one run by any path, a failed start leaves the folder as it was; typed config values."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import yaml

from p2pcold.config import RunConfig, from_dict, load_config, to_dict
from p2pcold.local_run import LocalRun
from p2pcold.model import checkpoint_path, latest_checkpoint
from p2pcold.utils import P2PColdError
from test_local_run import run_to_end
from toy_data import write_toy_datasets


def tiny_run(tmp_path, model, output, **fields) -> RunConfig:
    data = {
        "model": str(model),
        "datasets": write_toy_datasets(tmp_path / "data", 2),
        "iterations": 2,
        "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": 1}},
        "output_dir": str(output),
        **fields,
    }
    return from_dict(RunConfig, data)


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, tiny_model_dir, caplog):
    config = tiny_run(tmp_path, tiny_model_dir, tmp_path / "run")
    run_to_end(config)
    weights = checkpoint_path(tmp_path / "run", 2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that filled up
    assert latest_checkpoint(tmp_path / "run") == checkpoint_path(tmp_path / "run", 1)
    with caplog.at_level(logging.WARNING, logger="p2pcold"):
        resumed = run_to_end(config)
    assert "using the newest intact checkpoint" in caplog.text and "iter-0001" in caplog.text
    assert resumed.iteration == 2 and latest_checkpoint(tmp_path / "run") == checkpoint_path(tmp_path / "run", 2)


def test_same_folder_by_another_path_is_the_same_run(tmp_path, tiny_model_dir, monkeypatch):
    run_to_end(tiny_run(tmp_path, tiny_model_dir, tmp_path / "run", iterations=1))
    os.symlink(tmp_path / "run", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for path in ("run", "link", str(tmp_path / "link")):
        again = LocalRun(tiny_run(tmp_path, tiny_model_dir, path, iterations=1), device="cpu", show_progress=False)
        again.setup()
        assert again.iteration == 1


def test_a_failed_start_leaves_the_folder_as_it_was(tmp_path, tiny_model_dir):
    config = tiny_run(tmp_path, tiny_model_dir, tmp_path / "run", datasets=[str(tmp_path / "missing.yaml")])
    with pytest.raises(P2PColdError, match="missing.yaml"):
        LocalRun(config, device="cpu").setup()
    assert not (tmp_path / "run").exists()


def test_a_config_mismatch_names_the_fields(tmp_path, tiny_model_dir):
    run_to_end(tiny_run(tmp_path, tiny_model_dir, tmp_path / "run", iterations=1))
    other = tiny_run(tmp_path, tiny_model_dir, tmp_path / "run", iterations=1, seed=3)
    with pytest.raises(P2PColdError, match=r"different config: seed \(0 there, 3 now\)"):
        LocalRun(other, device="cpu").setup()


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    (tmp_path / "run.yaml").write_text("finetune:\n  learning_rate: 2e-5\n")
    config = load_config(tmp_path / "run.yaml", {"eval.frozen_learning_rate": "1e-3"}, needs_datasets=False)
    assert config.finetune.learning_rate == 2e-5 and config.eval.frozen_learning_rate == 1e-3
    config.finetune.learning_rate = "3e-5"
    assert config.finetune.learning_rate == 3e-5


def test_set_learning_rate_trains_and_config_show_prints_every_default(tmp_path, tiny_model_dir):
    config = tiny_run(tmp_path, tiny_model_dir, tmp_path / "run", iterations=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({k: v for k, v in to_dict(config).items() if k in ("model", "datasets", "iterations", "finetune", "output_dir")}))
    command = [sys.executable, "-m", "p2pcold.cli"]
    shown = subprocess.run([*command, "config", "show", str(tmp_path / "run.yaml"), "--set", "finetune.learning_rate=2e-5"], capture_output=True, text=True, check=True)
    printed = yaml.safe_load(shown.stdout)
    assert printed["finetune"]["learning_rate"] == 2e-5 and printed.keys() == to_dict(RunConfig()).keys()
    assert printed["swarm"] == to_dict(RunConfig().swarm)  # every default, not only the file's fields
    done = subprocess.run([*command, "local", str(tmp_path / "run.yaml"), "--set", "finetune.learning_rate=2e-5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["finetune"]["learning_rate"] == 2e-5
    assert latest_checkpoint(tmp_path / "run") == checkpoint_path(tmp_path / "run", 1)


def test_a_folder_started_before_a_field_existed_holds_its_default(tmp_path):
    from p2pcold.run_folder import check_run_folder, write_run_config

    config = RunConfig(output_dir=str(tmp_path / "run"))
    write_run_config(tmp_path / "run", config)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["fusion"], saved["finetune"]["pooling"]  # a run started before the fusion options
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    check_run_folder(tmp_path / "run", config)
    config.fusion.method = "ties"
    with pytest.raises(P2PColdError, match=r"fusion.method \('mean' there, 'ties' now\)"):
        check_run_folder(tmp_path / "run", config)
