"""RobustPartReducer (no network): the reducer's bookkeeping with fusion.aggregate_block in place of a sum."""

from __future__ import annotations

import asyncio
import math

import torch
from hivemind.averaging.partition import TensorPartContainer

from p2pcold.config import AggregationConfig
from p2pcold.fusion import BLOCK_VALUES, aggregate_block
from p2pcold.swarm.compression import make_compression
from p2pcold.swarm.robust_reduce import RobustPartReducer, part_size_bytes


def reduce(parts_by_sender: list[list[torch.Tensor]], weights: list[float], banned: tuple[int, ...] = ()):
    """Run one reducer over every sender's parts (as the all-reduce's streams would, concurrently)."""
    excluded: list[int] = []

    async def main():
        reducer = RobustPartReducer([p.shape for p in parts_by_sender[0]], len(parts_by_sender), AggregationConfig(), excluded.append)
        for sender in banned:
            reducer.on_sender_failed(sender)

        async def send(sender: int):
            return [await reducer.accumulate_part(sender, i, part, weights[sender]) for i, part in enumerate(parts_by_sender[sender])]

        senders = [s for s in range(len(parts_by_sender)) if s not in banned]
        results = await asyncio.gather(*(send(s) for s in senders))
        assert reducer.finished.is_set()
        return results

    return asyncio.run(main()), excluded


def test_each_part_is_the_rule_over_the_senders_copies_and_nan_is_left_out():
    generator = torch.Generator().manual_seed(0)
    parts = [[torch.randn(5, generator=generator), torch.randn(3, generator=generator)] for _ in range(5)]
    parts[4][1] = torch.full((3,), math.nan)  # sender 4: finite first part, NaN second
    weights = [1.0, 1.0, 1.0, 1.0, 1e6]
    results, excluded = reduce(parts, weights)
    for part in (0, 1):
        expected, _ = aggregate_block(torch.stack([p[part] for p in parts]), weights, AggregationConfig())
        for fused in results:  # every sender receives the same fused part
            assert torch.equal(fused[part], expected.float())
    assert excluded == [4]


def test_a_banned_sender_is_left_out_as_in_hivemind():
    parts = [[torch.tensor([float(s)])] for s in range(5)]
    results, excluded = reduce(parts, [1.0] * 5, banned=(4,))
    assert excluded == [] and all(r[0].item() == 1.5 for r in results)  # trimmed mean of 0, 1, 2, 3


def test_hivemind_cuts_parts_of_exactly_one_block_for_every_compression():
    tensors = [torch.zeros(2 * BLOCK_VALUES + 5), torch.zeros(7)]
    for name in ("none", "fp16", "8bit", "block8", "block4"):
        compression = make_compression(name)
        container = TensorPartContainer(tensors, (1.0,), compression=compression, part_size_bytes=part_size_bytes(compression))
        assert [len(part) for part in container.get_raw_input_parts(0)] == [BLOCK_VALUES, BLOCK_VALUES, 5, 7], name


def test_a_part_of_the_wrong_shape_is_refused_and_its_sender_banned_without_stalling_the_others():
    parts = [[torch.full((4,), float(s)), torch.full((2,), float(s))] for s in range(3)]

    async def both():
        reducer = RobustPartReducer([p.shape for p in parts[0]], 3, AggregationConfig(), lambda sender: None)
        with_error = None
        try:
            await reducer.accumulate_part(2, 0, torch.zeros(5), 1.0)
        except ValueError as e:
            with_error = e
            reducer.on_sender_failed(2)

        async def send(sender):
            return [await reducer.accumulate_part(sender, i, part, 1.0) for i, part in enumerate(parts[sender])]

        results = await asyncio.gather(send(0), send(1))
        return with_error, results, reducer.finished.is_set()

    error, results, finished = asyncio.run(both())
    assert isinstance(error, ValueError) and finished
    assert all(r[0].tolist() == [0.5] * 4 and r[1].tolist() == [0.5] * 2 for r in results)
