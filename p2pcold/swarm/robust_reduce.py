"""The all-reduce's reducers apply `p2pcold.fusion.aggregate_block` instead of hivemind's weighted sum.

In hivemind's butterfly all-reduce every member reduces one slice of the vector: each sender streams it
that slice in parts, and hivemind's `TensorPartReducer` adds each part into a running sum weighted by
whatever weight the sender declares. `RobustPartReducer` keeps the same bookkeeping (part order,
banned senders, timeouts) but buffers the group's copies of the current part and, once all arrived,
fuses them with the run's `AggregationConfig`: declared weights capped, non-finite contributions
left out, trimmed mean with norm clipping from 4 contributors on (`auto`).

Parts are exactly `fusion.BLOCK_VALUES` values of one tensor (`part_size_bytes`), the blocks of
`fusion.aggregate`, so the swarm computes what the local run computes. Memory: a reducer holds
group_size copies of one part (group_size x 512 KiB), never more.

A contribution left out for NaN or Inf is not a failure of the all-reduce: every reducer decides it
from the same values, so every member receives the same fused body (the verdicts stay clean), and the
sender is named in one warning line per all-reduce on each reducer that saw it.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionBase, CompressionInfo

from p2pcold.config import AggregationConfig
from p2pcold.fusion import BLOCK_VALUES, FusionError, aggregate_block
from p2pcold.utils import get_logger

logger = get_logger(__name__)


def part_size_bytes(compression: CompressionBase) -> int:
    """hivemind's `part_size_bytes` that makes every part `BLOCK_VALUES` float32 values long.

    hivemind cuts each tensor into parts of int(part_size_bytes / (4 bytes x compression ratio))
    values; the ratio is the same for every float32 tensor of a fixed compression.
    """
    ratio = compression.estimate_compression_ratio(CompressionInfo.from_tensor(torch.zeros(1, dtype=torch.float32)))
    size = BLOCK_VALUES * 4 * ratio
    if size != int(size) or int(int(size) / (4 * ratio)) != BLOCK_VALUES:
        raise ValueError(f"compression ratio {ratio} does not give whole parts of {BLOCK_VALUES} values")
    return int(size)


class RobustPartReducer(TensorPartReducer):
    """hivemind's TensorPartReducer with the running sum replaced by `aggregate_block` over the buffered
    parts. `on_excluded(sender_index)` is called for each sender whose part held NaN or Inf."""

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        rule: AggregationConfig,
        on_excluded: Callable[[int], None],
    ):
        self._rule, self._on_excluded = rule, on_excluded
        self._received: dict[int, tuple[torch.Tensor, float]] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._received = {}
        super().reset_accumulators()
        self.accumulator = None  # parts are buffered, not summed

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Buffer a sender's part; once every current sender's arrived, return the fused part. A part of
        another shape or a non-float dtype is refused (ValueError) before it counts as received: hivemind
        then bans its sender, and the others' parts are fused without it."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        if tensor_part.shape != self.part_shapes[part_index] or not tensor_part.is_floating_point():
            raise ValueError(f"sender {sender_index} sent part {part_index} as {tensor_part.dtype} {tuple(tensor_part.shape)[:4]}")
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # the previous parts are still being fused
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._received[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = sorted(self._received)
        values = torch.stack([self._received[i][0].reshape(-1) for i in senders])
        shape = self.part_shapes[self.current_part_index]
        try:
            fused, excluded = aggregate_block(values, [self._received[i][1] for i in senders], self._rule)
        except FusionError as e:  # no finite contribution at all: nothing to fuse in this part
            self.current_part_future.set_exception(AllreduceException(f"part {self.current_part_index}: {e}"))
        else:
            self.current_part_future.set_result(fused.to(torch.float32).reshape(shape))
            for row in excluded:
                self._on_excluded(senders[row])
        self.reset_accumulators()


class RobustAllReduceRunner(AllReduceRunner):
    """AllReduceRunner whose reducer is a `RobustPartReducer` for `rule`; `excluded_senders` lists the
    peers whose contribution this member's reducer left out for NaN or Inf."""

    def __init__(self, *, rule: AggregationConfig, **kwargs):
        super().__init__(**kwargs)
        unused = self.tensor_part_reducer
        unused.finished.set()  # never used: its finalize() would report "received 0 % of input tensors"
        self.excluded_senders: set = set()
        self.tensor_part_reducer = RobustPartReducer(unused.part_shapes, unused.num_senders, rule, self._exclude)

    def _exclude(self, sender_index: int) -> None:
        peer = self.sender_peer_ids[sender_index]
        if peer not in self.excluded_senders:
            self.excluded_senders.add(peer)
            logger.warning("fusion: left out the contribution of peer %s: it holds NaN or Inf", peer)
