"""One real p2pcold peer (`p2pcold.peer.DecentralizedPeer`) with timers, for the utilisation benchmark.

Usage: python -m benchmarks.utilisation_peer '<json options>' (driven by benchmarks/utilisation.py).
Options: dataset (recipe path), run_dir, initial_peers, slow (bool), schedule (per iteration:
{"budget": {...Budget fields}, "weighting": "uniform"|"examples", "overlap": swarm.overlap_boundary}),
swarm (SwarmConfig fields).

After setup it replies {maddrs}; on {"cmd": "train", "start_at": T} it trains from wall time T and
replies with one record per iteration: wall-clock timestamps of the iteration start, of arriving at
the boundary, of calling fuse, of the fusion's end and of the iteration end, plus the training-loop
seconds `finetune()` itself reports. The coordinator turns them into fractions. From inside hivemind's
averager process (`AveragerClock`) come the times at which the group's all-reduce began, its reduce
ended and the members' verdicts agreed.

A "slow" peer runs at half speed: a forward pre-hook on the body sleeps, before each forward pass,
as long as the previous step's real work took (so every step, training or evaluation, takes 2x).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import peak_rss_mib, reply, serve, tree_pss_mib, wait_until
from p2pcold.config import Budget, FinetuneConfig, RunConfig, SwarmConfig
from p2pcold.peer import DecentralizedPeer
from p2pcold.swarm import visible_maddrs
from p2pcold.swarm.swarm_averager import _SwarmAverager


class AveragerClock:
    """Wall-clock times of each all-reduce attempt, taken in the averager process (a forked child of
    the peer): {"began", "reduced", "agreed"} (the group was assembled and its all-reduce began; this
    member's reduce ended; every member's verdict was read, or the attempt failed), one JSON line per
    attempt in `path`, which the peer reads after each fuse()."""

    def __init__(self, path: Path) -> None:
        self.path, self.read_lines = path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        run, reduce = _SwarmAverager._run_allreduce_inplace_, _SwarmAverager._reduce

        async def timed_run(averager, *args, **kwargs):
            averager.attempt_times = {"began": time.time()}
            try:
                return await run(averager, *args, **kwargs)
            finally:
                averager.attempt_times["agreed"] = time.time()
                with contextlib.suppress(OSError), open(path, "a") as f:  # a timer never fails the all-reduce
                    f.write(json.dumps(averager.attempt_times) + "\n")

        async def timed_reduce(averager, *args, **kwargs):
            try:
                return await reduce(averager, *args, **kwargs)
            finally:
                averager.attempt_times["reduced"] = time.time()

        _SwarmAverager._run_allreduce_inplace_, _SwarmAverager._reduce = timed_run, timed_reduce

    def new_attempts(self) -> list[dict]:
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        new, self.read_lines = lines[self.read_lines :], len(lines)
        return [json.loads(line) for line in new]


class HalfSpeed:
    """Forward pre-hook: sleep as long as the real work since the previous forward took."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last: float | None = None
        self.slept = 0.0
        self.total_slept = 0.0

    def __call__(self, module, args):
        now = time.perf_counter()
        if self.last is not None:
            work = max(0.0, now - self.last - self.slept)
            time.sleep(work)
            self.slept = work
            self.total_slept += work
        self.last = time.perf_counter()


class TimedPeer(DecentralizedPeer):
    def __init__(self, *args, schedule: list[dict], slow: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule, self.slow = schedule, slow
        self.clock = AveragerClock(self.run_dir / "allreduce-times.jsonl")  # before setup() forks the averager
        self.records: list[dict] = []
        self.halfspeed = HalfSpeed() if slow else None

    def setup(self) -> None:
        super().setup()
        if self.halfspeed is not None:
            self.state.body.register_forward_pre_hook(self.halfspeed)

    def run_iteration(self, *args, **kwargs) -> None:
        plan = self.schedule[self.iteration]
        self.contributor.config.budget = Budget(**plan["budget"])
        self.config.fusion_weighting = plan["weighting"]
        self.config.swarm.overlap_boundary = plan["overlap"]
        self.record = {"iteration": self.iteration, "start": time.time()}
        super().run_iteration(*args, **kwargs)
        self.record["end"] = time.time()
        self.records.append(self.record)

    def _finetune(self, *args, **kwargs):
        if self.halfspeed is not None:
            self.halfspeed.reset()  # the boundary is not a training step
        started = time.time()
        contribution = super()._finetune(*args, **kwargs)
        r = contribution.result
        self.record.update(
            finetune_call_s=time.time() - started,  # finetune() + copying the body out, + the dev evaluation in line
            train_s=r.seconds,  # finetune()'s own training-loop time (evaluation excluded)
            examples=r.examples,
            steps=r.steps,
            stopped_by=r.stopped_by,
            arrive=time.time(),  # at the boundary: what follows is waiting for the others, then fusion
        )
        return contribution

    def _fuse(self, *args, **kwargs):
        self.record.setdefault("fuse_calls", 0)
        self.record.setdefault("fuse_call", time.time())
        self.record["fuse_calls"] += 1
        result = super()._fuse(*args, **kwargs)
        self.record.update(fused=time.time(), group_size=result.group_size, status=result.status.value, total_weight=result.total_weight)
        attempts = self.clock.new_attempts()
        if result.ok and attempts and "reduced" in attempts[-1]:
            self.record["allreduce"] = attempts[-1]  # the attempt that fused
        return result

    def _record_dev_accuracy(self, *args, **kwargs):
        started = time.time()
        super()._record_dev_accuracy(*args, **kwargs)
        if getattr(self, "record", None) is not None:  # waiting for the dev evaluation that ran during the boundary
            self.record["dev_wait_s"] = self.record.get("dev_wait_s", 0.0) + time.time() - started

    def save_checkpoint(self, *args, **kwargs):
        started = time.time()
        path = super().save_checkpoint(*args, **kwargs)
        if getattr(self, "record", None) is not None:
            self.record["checkpoint_s"] = self.record.get("checkpoint_s", 0.0) + time.time() - started
        return path


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    o = json.loads(sys.argv[1])
    torch.set_num_threads(1)  # 4 peers share 2 cores
    config = RunConfig(
        model="minilm",
        datasets=o["datasets"],
        iterations=len(o["schedule"]),
        seed=0,
        finetune=FinetuneConfig(batch_size=16, max_length=64, num_threads=1),
        run_id=o["run_id"],
        swarm=SwarmConfig(**o["swarm"]),
    )
    peer = TimedPeer(config, o["dataset"], o["initial_peers"], o["run_dir"], device="cpu", schedule=o["schedule"], slow=o["slow"])
    peer.record = None
    try:
        peer.setup()

        def train(start_at: float) -> dict:
            wait_until(start_at)
            peer.train()
            return {"records": peer.records, "slept_s": peer.halfspeed.total_slept if peer.halfspeed else 0.0}

        def memory() -> dict:
            return {"peak_rss_mib": peak_rss_mib(), "tree_pss_mib": tree_pss_mib(os.getpid())}

        reply({"ready": True, "maddrs": visible_maddrs(peer.dht)})
        serve({"train": train, "memory": memory})
    finally:
        peer.cleanup()


if __name__ == "__main__":
    main()
