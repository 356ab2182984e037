"""The fused bodies that swarm tests compare: from a checkpoint, a run folder's newest checkpoint, or
the reference run (`p2pcold local` on the same config)."""

from __future__ import annotations

import torch

from p2pcold.config import load_run_config
from p2pcold.local_run import LocalRun
from p2pcold.model import body_state, latest_checkpoint, load_body


def body_at(checkpoint) -> dict[str, torch.Tensor]:
    return body_state(load_body(str(checkpoint)))


def final_body(run_dir) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None, f"no checkpoint in {run_dir}"
    return body_at(checkpoint)


def reference_body(config_path) -> dict[str, torch.Tensor]:
    run = LocalRun(load_run_config(config_path), device="cpu", show_progress=False)
    run.setup()
    return run.train()


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)
