"""The wire codec of block-wise quantization (no network): round trips, malformed parts from another peer,
hivemind's registry, and the robust rule over dequantized parts."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression import serialization

from p2pcold.config import AggregationConfig
from p2pcold.fusion import BLOCK_VALUES, aggregate_block
from p2pcold.swarm.compression import BLOCK, BlockQuantization, fuse_reference, install_codec, make_compression
from p2pcold.utils import P2PColdError


def _round_trip(compression, tensor):
    return compression.extract(compression.compress(tensor, CompressionInfo.from_tensor(tensor)))


@pytest.mark.parametrize("name, bytes_per_value", [("block8", 1 + 4 / BLOCK), ("block4", 0.5 + 4 / BLOCK)])
def test_a_part_round_trips_within_its_blocks_error_and_costs_the_estimated_bytes(name, bytes_per_value):
    compression = make_compression(name)
    part = torch.randn(BLOCK_VALUES, generator=torch.Generator().manual_seed(0)) * 1e-3
    serialized = compression.compress(part, CompressionInfo.from_tensor(part))
    assert len(serialized.buffer) == pytest.approx(BLOCK_VALUES * bytes_per_value, abs=16)
    assert compression.estimate_compression_ratio(CompressionInfo.from_tensor(part)) == bytes_per_value / 4
    back = compression.extract(serialized)
    levels = 127 if name == "block8" else 7
    assert back.shape == part.shape and (back - part).abs().max() <= part.abs().max() / (2 * levels) * 1.0001


def test_odd_shapes_and_an_empty_part_round_trip():
    compression = BlockQuantization(4)
    for shape in [(0,), (1,), (3, 7), (BLOCK + 1,)]:
        tensor = torch.randn(shape)
        assert _round_trip(compression, tensor).shape == tensor.shape


def _malformed(compression, part):
    """Serialized parts that no honest peer sends."""
    good = compression.compress(part, CompressionInfo.from_tensor(part))

    def edited(**fields):
        message = type(good)()
        message.CopyFrom(good)
        for key, value in fields.items():
            if key == "size":
                del message.size[:]
                message.size.extend(value)
            else:
                setattr(message, key, value)
        return message

    scales_at = 8
    negative = bytearray(good.buffer)
    negative[scales_at : scales_at + 4] = torch.tensor([-1.0]).numpy().tobytes()
    infinite = bytearray(good.buffer)
    infinite[scales_at : scales_at + 4] = torch.tensor([float("inf")]).numpy().tobytes()
    return {
        "more values than its buffer holds": edited(size=[part.numel() * 2]),
        "a truncated buffer": edited(buffer=good.buffer[:-3]),
        "a longer buffer": edited(buffer=good.buffer + b"\0" * 5),
        "no header": edited(buffer=b"\1"),
        "another bit width": edited(buffer=bytes([12 - compression.bits]) + good.buffer[1:]),
        "another block": edited(buffer=good.buffer[:4] + (64).to_bytes(4, "little") + good.buffer[8:]),
        "a huge size": edited(size=[BLOCK_VALUES + 1]),
        "another dtype": edited(dtype="int64"),
        "a negative scale": edited(buffer=bytes(negative)),
        "an infinite scale": edited(buffer=bytes(infinite)),
    }


@pytest.mark.parametrize("bits", [8, 4])
def test_a_malformed_part_raises_value_error_so_that_hivemind_rejects_it(bits):
    compression = BlockQuantization(bits)
    part = torch.randn(3 * BLOCK + 10)
    for what, message in _malformed(compression, part).items():
        with pytest.raises(ValueError):
            compression.extract(message)
            pytest.fail(what)


def test_a_nan_scale_decodes_to_nan_so_the_reducers_leave_the_contribution_out():
    compression = BlockQuantization(8)
    part = torch.ones(2 * BLOCK)
    part[3] = float("nan")
    back = _round_trip(compression, part)
    assert bool(torch.isnan(back[:BLOCK]).all()) and bool((back[BLOCK:] == 1).all())
    others = [torch.full((2 * BLOCK,), float(v)) for v in (1, 2, 3, 4)]
    fused, excluded = aggregate_block(torch.stack([back, *others]), [1.0] * 5, AggregationConfig())
    assert excluded == [0] and bool(torch.isfinite(fused).all())


@pytest.mark.parametrize("name", ["block8", "block4"])
def test_the_robust_rule_over_dequantized_parts_stays_as_close_to_the_exact_one_as_its_inputs(name):
    """The reducers dequantize before the rule, so it sees values in the same units as uncompressed ones:
    the trimmed mean moves no further than its inputs did, and a rogue part is still cut down."""
    generator = torch.Generator().manual_seed(2)
    parts = torch.randn(5, 4 * BLOCK, generator=generator) * 1e-3 * torch.tensor([[1.0], [2.0], [0.5], [1.5], [1.0]])
    compression = make_compression(name)
    received = torch.stack([_round_trip(compression, p) for p in parts])
    exact, _ = aggregate_block(parts, [1.0] * 5, AggregationConfig())
    fused, _ = aggregate_block(received, [1.0] * 5, AggregationConfig())
    assert (fused - exact).abs().max() <= (received - parts).abs().max() * 1.0001

    rogue = torch.cat([parts[:4], parts[4:] * 1000])
    received = torch.stack([_round_trip(compression, p) for p in rogue])
    exact, _ = aggregate_block(rogue, [1.0] * 5, AggregationConfig())
    fused, _ = aggregate_block(received, [1.0] * 5, AggregationConfig())
    assert (fused - exact).abs().mean() * 20 < (received.mean(dim=0) - exact).abs().mean()


def test_the_codec_is_installed_in_hiveminds_slot_and_round_trips_through_its_registry():
    registry = serialization._BASE_COMPRESSION_TYPES
    kept = dict(registry)
    try:
        compression = BlockQuantization(4)
        install_codec(compression)
        install_codec(make_compression("8bit"))  # another codec changes nothing
        part = torch.randn(1000)
        serialized = serialize_torch_tensor(part, compression.compression_type)  # a reducer's reply
        assert serialized.buffer[0] == 4
        assert torch.equal(deserialize_torch_tensor(serialized), _round_trip(compression, part))
    finally:
        registry.clear()
        registry.update(kept)


def test_the_settings_and_the_reference_choice():
    with pytest.raises(P2PColdError, match="unknown compression"):
        make_compression("block3")
    with pytest.raises(ValueError):
        BlockQuantization(8, block=3 * 64)  # does not divide a part
    base = {"w": torch.zeros(2)}
    assert fuse_reference("none", base) is None  # exact fusion: the averager's θ0, as before
    assert all(fuse_reference(name, base) is base for name in ("fp16", "8bit", "block8", "block4"))


def test_every_compression_a_run_can_choose_has_a_codec_and_a_wire_error_share():
    """The fused-update check (fusion.overshoot) allows each compression its wire error: a compression
    without a share would end a peer's boundary with a KeyError instead of a fusion."""
    from typing import get_args

    from p2pcold.config import SwarmConfig
    from p2pcold.swarm.compression import COMPRESSIONS, WIRE_ERROR_SHARE

    choosable = set(get_args(SwarmConfig.model_fields["compression"].annotation))
    assert choosable == set(COMPRESSIONS) == set(WIRE_ERROR_SHARE)
    for name in choosable:
        make_compression(name)
