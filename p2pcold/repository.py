"""The paper's Repository (§2.3, §3.4), for exact reproduction: `p2pcold bootstrap --repository`.

It holds θ_i and does no training. Each iteration it samples k contributors (seeded, the same
draw as the reference run's) among the connected peers, publishes the assignment, waits (with a
deadline) until the sampled contributors report that they finished finetuning, tells exactly
those to fuse, and joins their all-reduce with weight 0: it receives their average, θ_{i+1},
checkpoints it and serves it to every peer for the next iteration.
"""

from __future__ import annotations

import time
from pathlib import Path

from p2pcold.config import RunConfig, load_dataset_spec
from p2pcold.fusion import sample_contributors
from p2pcold.model import (
    CheckpointMeta,
    body_state,
    latest_checkpoint,
    load_body,
    load_body_state,
    load_tokenizer,
    read_metadata,
    save_run_checkpoint,
)
from p2pcold.swarm import BodyAverager, RunIdentity, join_run, read_progress
from p2pcold.swarm.records import assignment_key, put_record
from p2pcold.utils import P2PColdError, get_logger, state_dict_hash

log = get_logger("repository")


class Repository:
    """setup() -> train() -> cleanup(); runs on a started DHT node (the bootstrap's)."""

    def __init__(self, config: RunConfig, dht, run_dir: str | Path):
        self.config = config
        self.dht = dht
        self.run_dir = Path(run_dir)
        self.swarm = config.swarm
        self.averager = None

    def setup(self) -> None:
        config = self.config
        # Peers report their recipe's name; the config may list recipes by name or by path.
        self.dataset_names = sorted(load_dataset_spec(name).name for name in config.datasets)
        self.tokenizer = load_tokenizer(config.model)
        self.body = load_body(config.model, config.num_hidden_layers)
        theta0 = body_state(self.body)
        self.base_hash = state_dict_hash(theta0)
        self.iteration, self.base = 0, theta0
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            meta = read_metadata(checkpoint)
            if meta.base_hash != self.base_hash:
                raise P2PColdError(f"{checkpoint}: checkpoint was made from another base model")
            self.iteration, self.base = meta.iteration, body_state(load_body(str(checkpoint)))
            log.info("Repository resumed from %s at iteration %d", checkpoint, self.iteration)
        join_run(self.dht, config.run_id, RunIdentity.for_body(config.run_id, config.model, theta0), self.swarm)
        self.averager = BodyAverager(self.dht, config.run_id, theta0, self.swarm, reference=theta0)
        self.averager.set_shared_state(self.iteration, self.base)

    def _publish(self, iteration: int, record: dict) -> None:
        if not put_record(self.dht, assignment_key(self.config.run_id), str(iteration), record, self.swarm.assignment_timeout, self.swarm.dht_request_timeout):
            raise P2PColdError(f"could not publish the assignment of iteration {iteration} in the DHT")

    def _connected(self) -> dict[str, str]:
        """dataset -> phase of every live peer of this run."""
        return {p.dataset: p.phase for p in read_progress(self.dht, self.config.run_id, self.swarm.dht_request_timeout)}

    def _wait_for_peers(self) -> list[str]:
        wanted = set(self.dataset_names)
        deadline = time.monotonic() + self.swarm.peer_wait_timeout
        while True:
            live = set(self._connected()) & wanted
            if live == wanted or time.monotonic() > deadline:
                break
            time.sleep(self.swarm.poll_interval)
        if not live:
            raise P2PColdError(f"no peer of the run's datasets connected within {self.swarm.peer_wait_timeout:.0f} s")
        if live != wanted:
            log.warning("sampling among the connected datasets only; missing: %s", ", ".join(sorted(wanted - live)))
        return sorted(live)

    def _wait_until_ready(self, iteration: int, contributors: list[str]) -> list[str]:
        deadline = time.monotonic() + self.swarm.contributor_deadline
        while True:
            records = read_progress(self.dht, self.config.run_id, self.swarm.dht_request_timeout)
            ready = sorted({p.dataset for p in records if p.iteration == iteration and p.phase == "ready"} & set(contributors))
            if ready == contributors or time.monotonic() > deadline:
                return ready
            time.sleep(self.swarm.poll_interval)

    def train(self) -> None:
        while self.iteration < self.config.iterations:
            self.run_iteration()
        self._publish(self.iteration, {"iteration": self.iteration, "contributors": [], "final": True})
        log.info("Repository: run complete at iteration %d; serving θ_%d until the peers have it", self.iteration, self.iteration)
        deadline = time.monotonic() + self.swarm.peer_wait_timeout
        while time.monotonic() < deadline and any(phase != "done" for phase in self._connected().values()):
            time.sleep(self.swarm.poll_interval)

    def run_iteration(self) -> None:
        i = self.iteration
        contributors = sample_contributors(self._wait_for_peers(), self.config.contributors_per_iteration, self.config.seed, i)
        self._publish(i, {"iteration": i, "contributors": contributors})
        log.info("iteration %d: contributors %s", i, ", ".join(contributors))
        ready = self._wait_until_ready(i, contributors)
        if ready != contributors:
            log.warning("iteration %d: %s missed the deadline", i, ", ".join(sorted(set(contributors) - set(ready))))
        self._publish(i, {"iteration": i, "contributors": contributors, "group": ready})
        if ready:
            fused = self.averager.fuse(self.base, i, 0.0, self.swarm.boundary_deadline, {"dataset": "(repository)"}, share_result=False)
            got = sorted(m.metadata.get("dataset", "?") for m in fused.members.values() if m.weight > 0)
            if fused.ok and got == ready:
                self.base = fused.averaged
            elif fused.ok:
                log.warning("iteration %d: fused %s, not the expected %s", i, got, ready)
                self.base = fused.averaged
            else:
                log.warning("iteration %d: fusion failed (%s); θ_%d = θ_%d", i, fused.reason, i + 1, i)
        self.iteration = i + 1
        self.save_checkpoint(contributors=contributors, fused=ready)
        self.averager.set_shared_state(self.iteration, self.base)

    def save_checkpoint(self, **extra) -> Path:
        load_body_state(self.body, self.base)
        meta = CheckpointMeta(iteration=self.iteration, run_id=self.config.run_id, base_model=self.config.model, base_hash=self.base_hash, extra=extra)
        return save_run_checkpoint(self.run_dir, self.body, self.tokenizer, meta)

    def cleanup(self) -> None:
        if self.averager is not None:
            self.averager.shutdown(stop_dht=False)
