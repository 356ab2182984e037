"""A swarm peer's boundary work off the critical path (`swarm.overlap_boundary`): checkpoints written in
the background while the working body trains, and the dev accuracy measured after finetuning, give what
the in-line order gives; a process killed at any moment of a background write resumes from an intact one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import torch

from p2pcold.config import Budget, FinetuneConfig, load_dataset_spec
from p2pcold.finetune import Contributor
from p2pcold.model import body_state, latest_checkpoint, load_body, load_tokenizer, read_metadata
from p2pcold.run_state import RunState
from p2pcold.utils import state_dict_hash
from test_run_folders import tiny_run
from toy_data import write_toy_dataset


def test_a_background_checkpoint_holds_the_base_while_the_working_body_trains(tmp_path, tiny_model_dir):
    config = tiny_run(tmp_path, tiny_model_dir, tmp_path / "run")
    state = RunState(config, tmp_path / "run")
    state.iteration, state.base = 1, {name: value + 0.5 for name, value in state.theta0.items()}
    path = state.save_checkpoint(extra={"note": "first"}, background=True)
    with torch.no_grad():  # what the next iteration's training does to the working body meanwhile
        for parameter in state.body.parameters():
            parameter.add_(1.0)
    state.iteration, state.base = 2, {name: value - 0.5 for name, value in state.theta0.items()}
    second = state.save_checkpoint(extra={"note": "second"}, background=True)  # waits for the first write
    state.close()

    for checkpoint, iteration, offset in ((path, 1, 0.5), (second, 2, -0.5)):
        meta = read_metadata(checkpoint)
        assert meta.iteration == iteration
        written = body_state(load_body(str(checkpoint)))
        expected = {name: value + offset for name, value in state.theta0.items()}
        assert all(torch.equal(written[name], expected[name]) for name in expected)
        assert meta.body_hash == state_dict_hash(written)
    assert latest_checkpoint(tmp_path / "run") == second


WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_run_folders import tiny_run
    from p2pcold.run_state import RunState
    tmp = Path({tmp!r})
    state = RunState(tiny_run(tmp, {model!r}, tmp / "run"), tmp / "run", keep_last=2)
    state.resume()
    print("ready", flush=True)
    while True:
        state.iteration += 1
        state.base = {{name: value + state.iteration for name, value in state.theta0.items()}}
        state.save_checkpoint(background=True)
    """
)


def test_a_peer_killed_during_background_writes_resumes_from_an_intact_checkpoint(tmp_path, tiny_model_dir):
    script = WRITER.format(tests=os.path.dirname(__file__), tmp=str(tmp_path), model=str(tiny_model_dir))
    rng, reached = random.Random(0), []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.3, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        checkpoint = latest_checkpoint(tmp_path / "run")
        meta = read_metadata(checkpoint)
        written = body_state(load_body(str(checkpoint)))
        assert meta.body_hash == state_dict_hash(written)
        assert torch.equal(written["embeddings.word_embeddings.weight"], load_body(str(tiny_model_dir)).embeddings.word_embeddings.weight + meta.iteration)
        reached.append(meta.iteration)
    assert reached == sorted(reached) and reached[-1] > reached[0], f"each restart resumes and goes on: {reached}"


def test_the_dev_accuracy_measured_after_finetuning_equals_the_in_line_one(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    spec = load_dataset_spec(str(write_toy_dataset(tmp_path / "data", "toy_movies", "movies")))
    config = FinetuneConfig(batch_size=8, max_length=16, budget=Budget(steps=3))
    body = load_body(str(tiny_model_dir))
    base = body_state(body)
    device = torch.device("cpu")
    in_line = Contributor(spec, tokenizer, config, run_seed=0).contribute(body, base, 0, device, show_progress=False)
    later = Contributor(spec, tokenizer, config, run_seed=0)
    deferred = later.contribute(body, base, 0, device, show_progress=False, evaluate_dev=False)
    assert deferred.result.dev_accuracy is None
    assert in_line.result.dev_accuracy is not None and later.dev_accuracy() == in_line.result.dev_accuracy
    assert all(torch.equal(deferred.body[name], in_line.body[name]) for name in base)
