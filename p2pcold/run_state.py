"""One run's state on disk and in memory, shared by LocalRun, both peers and the Repository.

θ0 (tokenizer, body, its state and hash), resuming from the run folder's newest checkpoint (which
must belong to the same run and base model), the run's fusion options (`contribution` before the
average, `step` after it, with the outer momentum buffer checkpointed beside θ_i) and `save_checkpoint`
(in line, or in one writer thread while the caller trains on).
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from p2pcold.config import RunConfig
from p2pcold.merging import Merger, outer_step, swarm_refusal
from p2pcold.model import (
    CheckpointMeta,
    body_state,
    checkpoint_path,
    latest_checkpoint,
    load_body,
    load_heads,
    load_outer_state,
    load_tokenizer,
    read_metadata,
    save_run_checkpoint,
)
from p2pcold.utils import P2PColdError, get_logger, state_dict_hash

log = get_logger("run_state")


class RunState:
    """`base` is θ_i, the body of `iteration`; `body` is the working model the checkpoints are written from."""

    def __init__(self, config: RunConfig, run_dir: str | Path, keep_last: int | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self._writer: ThreadPoolExecutor | None = None  # started by the first background write
        self._pending: Future | None = None
        self.tokenizer = load_tokenizer(config.model)
        self.body = load_body(config.model, config.num_hidden_layers)
        self.theta0 = body_state(self.body)
        self.base_hash = state_dict_hash(self.theta0)
        self.iteration, self.base = 0, self.theta0
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # from the resumed checkpoint
        self.merger = Merger(config.fusion, config.seed)
        self.momentum: dict[str, torch.Tensor] | None = None  # the outer step's buffer (fusion.outer_momentum)

    def refuse_in_swarm(self, centralized: bool) -> None:
        """A one-line error when the swarm mode cannot run the configured fusion options exactly."""
        problem = swarm_refusal(self.config.fusion, centralized)
        if problem:
            raise P2PColdError(problem)

    def contribution(self, body: dict[str, torch.Tensor], dataset: str) -> dict[str, torch.Tensor]:
        """What a contributor's finetuned `body` of this iteration puts into the average."""
        return self.merger.contribution(body, self.base, self.iteration, dataset)

    def step(self, mean: dict[str, torch.Tensor], contributors: int) -> dict[str, torch.Tensor]:
        """θ_{i+1} from the average of `contributors` contributions: the merge method's scale, then the
        outer step (which advances the momentum buffer). The caller sets `iteration` and `base`."""
        return self.step_from_merged(self.merger.finish(mean, self.base, contributors))

    def step_from_merged(self, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fused, self.momentum = outer_step(self.base, merged, self.config.fusion, self.momentum)
        return fused

    def resume(self) -> CheckpointMeta | None:
        """Load the newest checkpoint of the run folder, if any; refuse one of another run or base model."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return None
        meta = read_metadata(path)
        if meta.run_id != self.config.run_id:
            raise P2PColdError(f"{path}: checkpoint belongs to run {meta.run_id!r}, not {self.config.run_id!r}; use another run folder")
        if meta.base_hash != self.base_hash:
            raise P2PColdError(f"{path}: checkpoint was made from another base model (hash {meta.base_hash[:12]}); use another run folder")
        self.iteration, self.base = meta.iteration, body_state(load_body(str(path)))
        self.heads = load_heads(path)
        # None also where no fusion has stepped yet; a centralized peer's checkpoints never hold one (the Repository's do)
        self.momentum = load_outer_state(path)
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return meta

    def save_checkpoint(
        self, heads: dict[str, dict[str, torch.Tensor]] | None = None, extra: dict | None = None, *, background: bool = False
    ) -> Path:
        """Write `base` as the checkpoint of `iteration` (atomically; `latest.json` points at it after).

        `background`: return once the previous write is done and this one has started in the writer
        thread (one write at a time); `wait_for_checkpoint` waits for it. A process killed meanwhile
        resumes from the previous checkpoint."""
        meta = CheckpointMeta(
            iteration=self.iteration, run_id=self.config.run_id, base_model=self.config.model, base_hash=self.base_hash, extra=dict(extra or {})
        )
        # `base`, the heads and the momentum buffer are replaced at each iteration, never changed in place,
        # so the writer may read them while the working body trains.
        write = functools.partial(
            save_run_checkpoint, self.run_dir, self.body, self.tokenizer, meta, heads or None, self.keep_last, self.momentum, self.base
        )
        self.wait_for_checkpoint()
        if not background:
            return write()
        self._writer = self._writer or ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending = self._writer.submit(write)
        return checkpoint_path(self.run_dir, self.iteration)

    def wait_for_checkpoint(self) -> None:
        """Return once the checkpoint being written in the background (if any) is on disk; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the pending checkpoint write and stop the writer thread."""
        try:
            self.wait_for_checkpoint()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
