"""One peer process of the fusion-round benchmark (driven by benchmarks/fusion_round.py over stdin).

Usage: python -m benchmarks.fusion_worker '<json options>'. Options: rank, world, size
("minilm" | "roberta-base"), initial_peers, tag, delta_std, timeouts, body_in_model; optional: host
(where p2pd listens, default SwarmConfig's), allreduce_clock (a file: time each all-reduce attempt
inside the averager process, benchmarks/utilisation_peer.py's AveragerClock).

The peer holds θ0 (MiniLM's real weights, or a seeded random RoBERTa-base-size body) and its
"finetuned" body θ0 + δ_rank, δ ~ N(0, delta_std²) seeded by rank, so every process can rebuild any
peer's body (rank 0 does, to compare the fused weights with the exact `p2pcold.fusion.aggregate`).

Commands (JSON lines; replies prefixed "@@ "):
  ready      -> {maddrs}                         (sent unprompted after start-up)
  gloo       {port, groups}                      join a gloo world; one sub-group per group size
  open       {variants, group}                   create the averagers for these variants, for a
                                                 group of ranks 0..group-1
  close      {variants}                          shut them down
  round      {variant, index, start_at, check}   one timed round, started at wall time `start_at`;
                                                 check: then |fused - exact fusion| (fusion.aggregate);
                                                 with allreduce_clock, the fusing attempt's wall times
  wire       {compressions}                      serialized bytes of one full vector per compression
  memory     -> peak RSS of this process, current PSS of its process tree
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import peak_rss_mib, reply, serve, tree_pss_mib, wait_until

torch.set_num_threads(1)  # up to 8 peers share 2 cores

from p2pcold.config import SwarmConfig  # noqa: E402
from p2pcold.fusion import aggregate  # noqa: E402
from p2pcold.model import load_body, load_body_state  # noqa: E402
from p2pcold.swarm import BodyAverager, make_compression, start_dht, stop_dht, visible_maddrs  # noqa: E402


def build_model(size: str) -> torch.nn.Module:
    if size == "minilm":
        return load_body("minilm")
    if size == "roberta-base":
        from transformers import RobertaConfig, RobertaModel

        torch.manual_seed(0)  # the same θ0 in every peer
        return RobertaModel(RobertaConfig())  # 12 x 768, vocab 50265: ~124.6M parameters
    raise ValueError(f"unknown size {size!r}")


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def perturbed(theta0: dict[str, torch.Tensor], rank: int, std: float) -> dict[str, torch.Tensor]:
    """Peer `rank`'s stand-in for a finetuned body: θ0 + N(0, std²), seeded by rank."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return {k: v + torch.randn(v.shape, generator=generator) * std for k, v in theta0.items()}


def io_bytes(pid: int) -> int:
    """Bytes this process wrote and read through syscalls (sockets included): /proc/PID/io."""
    try:
        fields = dict(line.split(": ") for line in open(f"/proc/{pid}/io").read().splitlines())
        return int(fields["wchar"]) + int(fields["rchar"])
    except (OSError, KeyError, ValueError):
        return -1


class _Timed:
    """Wraps a bound method and sums the seconds spent in it (p2pcold's own copies inside fuse)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


class _TimedLock:
    """Proxy for the averager's `lock_averaged_tensors` in this process: sums the seconds spent
    waiting to acquire it (the averager process may still hold it when `step()` has returned)."""

    def __init__(self, lock):
        self.lock, self.waited = lock, 0.0

    def acquire(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.lock.acquire(*args, **kwargs)
        finally:
            self.waited += time.perf_counter() - started

    def release(self):
        return self.lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class FusionPeer:
    def __init__(self, options: dict):
        self.o = options
        self.rank, self.world = options["rank"], options["world"]
        self.group = self.world  # peers taking part in the rounds of the open averagers (ranks 0..group-1)
        self.gloo_groups: dict[int, object] = {}
        self.model = build_model(options["size"])
        self.theta0 = float_state(self.model)
        self.body = perturbed(self.theta0, self.rank, options["delta_std"])
        if options.get("body_in_model"):
            # large bodies: the model's own tensors serve as the body and θ0 is not kept (saves two
            # copies per peer). The fused average then replaces the body each round and the body
            # itself is the reference: that changes values, not timings (no error check here).
            load_body_state(self.model, self.body)
            self.body = {k: v for k, v in self.model.state_dict().items() if k in self.theta0}
            self.theta0 = self.body
        self.numel = sum(v.numel() for v in self.theta0.values())
        t = options["timeouts"]
        self.config = SwarmConfig(
            **({"host": options["host"]} if "host" in options else {}),
            compression="none",
            matchmaking_time=t["matchmaking_time"],
            request_timeout=t["request_timeout"],
            allreduce_timeout=t["allreduce_timeout"],
            next_chunk_timeout=t["next_chunk_timeout"],
            boundary_deadline=t["deadline"],
            dht_startup_timeout=120.0,
            bootstrap_timeout=60.0,
            local_rpc_timeout=60.0,
            shutdown_timeout=5.0,
        )
        self.clock = None
        if options.get("allreduce_clock"):  # before any averager forks its process
            from benchmarks.utilisation_peer import AveragerClock

            self.clock = AveragerClock(Path(options["allreduce_clock"]))
        # (group, fusion.aggregate of its bodies): built once per group, by error()
        self.exact: tuple[int, dict[str, torch.Tensor]] | None = None
        self.dht = start_dht(self.config, options["initial_peers"])
        self.averagers: dict[str, object] = {}
        self.flat: torch.Tensor | None = None

    # ---------------------------------------------------------------- averagers

    def open(self, variants: list[str], group: int) -> dict:
        """Averagers for a group of `group` peers (ranks 0..group-1), with their own prefixes."""
        started = time.perf_counter()
        self.group = group
        # assemble as soon as the whole group is in, and never average with fewer
        base = {**self.config.__dict__, "target_group_size": group, "min_group_size": group}
        for variant in variants:
            if variant.startswith("p2pcold-"):
                compression = variant.split("-", 1)[1]
                config = SwarmConfig(**{**base, "compression": compression})
                run_id = f"bench-{self.o['tag']}-{group}-{compression}"
                # As p2pcold's Peer does: θ0 is the template and the reference (deltas are averaged).
                averager = BodyAverager(self.dht, run_id, self.theta0, config, reference=self.theta0)
                averager._tensors.write = _Timed(averager._tensors.write)  # body - θ0 into shared memory
                averager._tensors.read = _Timed(averager._tensors.read)  # shared memory + θ0 out
                averager._averager.lock_averaged_tensors = _TimedLock(averager._averager.lock_averaged_tensors)
                self.averagers[variant] = averager
            elif variant == "bare":
                from hivemind.averaging import DecentralizedAverager

                c = SwarmConfig(**base)
                self.averagers[variant] = DecentralizedAverager(
                    [self.body[k].clone() for k in sorted(self.body)],
                    self.dht,
                    prefix=f"bare-{self.o['tag']}-{group}",
                    start=True,
                    target_group_size=c.target_group_size,
                    min_group_size=c.min_group_size,
                    min_matchmaking_time=c.matchmaking_time,
                    request_timeout=c.request_timeout,
                    allreduce_timeout=c.allreduce_timeout,
                    next_chunk_timeout=c.next_chunk_timeout,
                    sender_timeout=c.next_chunk_timeout,
                    reducer_timeout=2 * c.next_chunk_timeout,
                    shutdown_timeout=c.shutdown_timeout,
                )
                self.averagers[variant].wait_until_ready(timeout=60)
            elif variant == "gloo":
                pass  # the flat buffer is made before each gloo round and freed after it
            else:
                raise ValueError(variant)
        return {"open_s": time.perf_counter() - started}

    def close(self, variants: list[str]) -> dict:
        for variant in variants:
            averager = self.averagers.pop(variant, None)
            if isinstance(averager, BodyAverager):
                averager.shutdown(stop_dht=False)
            elif averager is not None:
                averager.shutdown()
            if variant == "gloo":
                self.flat = None
        return {}

    def _averager_pid(self, variant: str) -> int | None:
        averager = self.averagers.get(variant)
        if isinstance(averager, BodyAverager):
            return averager._averager.pid
        return getattr(averager, "pid", None)

    # ---------------------------------------------------------------- rounds

    def gloo(self, port: int, groups: list[int]) -> dict:
        """Join the gloo world and create one sub-group per group size (a collective call)."""
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=self.rank, world_size=self.world,
            timeout=datetime.timedelta(seconds=self.o["timeouts"]["allreduce_timeout"]),
        )  # fmt: skip
        for size in sorted(set(groups)):
            self.gloo_groups[size] = dist.group.WORLD if size == self.world else dist.new_group(list(range(size)))
        return {}

    def round(self, variant: str, index: int, start_at: float, check: bool = False) -> dict:
        if variant == "gloo":
            self.flat = torch.cat([self.body[k].reshape(-1) for k in sorted(self.body)])
        try:
            return self._round(variant, index, start_at, check)
        finally:
            self.flat = None

    def _round(self, variant: str, index: int, start_at: float, check: bool) -> dict:
        pid = self._averager_pid(variant)
        io_before = io_bytes(pid) if pid else -1
        wait_until(start_at)
        late_s = time.time() - start_at
        started = time.perf_counter()
        info: dict = {}
        if variant.startswith("p2pcold-"):
            # p2pcold's boundary step: matchmaking + all-reduce (fuse) + loading the average into the model
            averager = self.averagers[variant]
            averager._tensors.write.seconds = averager._tensors.read.seconds = 0.0
            averager._averager.lock_averaged_tensors.waited = 0.0
            result = averager.fuse(self.body, iteration=index, weight=1.0, share_result=False)
            if not result.ok:
                return {"ok": False, "reason": result.reason, "elapsed_s": time.perf_counter() - started}
            fused_at = time.perf_counter()
            load_body_state(self.model, result.averaged)
            info = {
                "group_size": result.group_size,
                "attempts": result.attempts,
                "write_s": averager._tensors.write.seconds,
                "read_s": averager._tensors.read.seconds,
                "lock_wait_s": averager._averager.lock_averaged_tensors.waited,  # part of write_s + read_s
                "fuse_s": fused_at - started,
                "load_s": time.perf_counter() - fused_at,
            }
            attempts = self.clock.new_attempts() if self.clock else []
            if attempts and "reduced" in attempts[-1]:
                info["allreduce"] = attempts[-1]  # the attempt that fused: {began, reduced, agreed}
        elif variant == "bare":
            gathered = self.averagers[variant].step(weight=1.0, timeout=self.config.boundary_deadline)
            info = {"group_size": len(gathered or {})}
        elif variant == "gloo":
            import torch.distributed as dist

            dist.all_reduce(self.flat, group=self.gloo_groups[self.group])
            self.flat.div_(self.group)
            info = {"group_size": self.group}
        elapsed = time.perf_counter() - started
        io_after = io_bytes(pid) if pid else -1
        if check and variant.startswith("p2pcold-"):
            info.update(self.error())  # after the timing: the model now holds this variant's fused body
        return {"ok": True, "elapsed_s": elapsed, "late_s": late_s, "io_bytes": io_after - io_before if pid else None, **info}

    # ---------------------------------------------------------------- checks

    def error(self) -> dict:
        """Max and mean |fused - exact| over all values, against p2pcold.fusion.aggregate of every body
        (the default rule, as the averagers here: a trimmed mean from 4 bodies)."""
        if self.exact is None or self.exact[0] != self.group:
            self.exact = None  # the previous group's, freed before the next is built
            bodies = [perturbed(self.theta0, r, self.o["delta_std"]) for r in range(self.group)]
            self.exact = (self.group, aggregate(bodies))
            del bodies
        exact = self.exact[1]
        fused = {k: v for k, v in self.model.state_dict().items() if k in exact}
        max_err, abs_sum, delta_abs_sum = 0.0, 0.0, 0.0
        for name, target in exact.items():
            diff = (fused[name].double() - target.double()).abs()
            max_err = max(max_err, float(diff.max()))
            abs_sum += float(diff.sum())
            delta_abs_sum += float((target.double() - self.theta0[name].double()).abs().sum())
        return {
            "max_abs_error": max_err,
            "mean_abs_error": abs_sum / self.numel,
            "mean_abs_update": delta_abs_sum / self.numel,  # |exact fusion - θ0|: how far fusion moves
        }

    def wire(self, compressions: list[str]) -> dict:
        """Serialized size of one full vector (the averaged delta), split into hivemind's parts."""
        from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
        from hivemind.compression import CompressionInfo

        out = {}
        for name in compressions:
            compression = make_compression(name)
            total = 0
            for key in sorted(self.body):
                tensor = (self.body[key] - self.theta0[key]).reshape(-1)
                info = CompressionInfo.from_tensor(tensor)
                per_part = int(DEFAULT_PART_SIZE_BYTES / (tensor.element_size() * compression.estimate_compression_ratio(info)))
                for index, part in enumerate(tensor.split(per_part)):
                    total += compression.compress(part, info.get_part(index, per_part)).ByteSize()
            out[name] = total
        return {"bytes_per_vector": out, "numel": self.numel}

    def memory(self) -> dict:
        return {"peak_rss_mib": peak_rss_mib(), "tree_pss_mib": tree_pss_mib(os.getpid())}

    def shutdown(self) -> None:
        for variant in list(self.averagers):
            try:
                self.close([variant])
            except Exception:
                pass
        stop_dht(self.dht, grace_s=5.0)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    # why a reducer fails (hivemind logs the cause at DEBUG only); a few lines per round otherwise
    logging.getLogger("hivemind.averaging.allreduce").setLevel(logging.DEBUG)
    options = json.loads(sys.argv[1])
    peer = FusionPeer(options)
    try:
        reply({"ready": True, "maddrs": visible_maddrs(peer.dht), "numel": peer.numel})
        serve(
            {
                "gloo": peer.gloo,
                "open": peer.open,
                "close": peer.close,
                "round": peer.round,
                "wire": peer.wire,
                "memory": peer.memory,
            }
        )
    finally:
        peer.shutdown()


if __name__ == "__main__":
    main()
