"""Block-wise absmax quantization (p2pcold.quantization) on plain tensors."""

import dataclasses

import pytest
import torch

from p2pcold.quantization import BlockQuantized, dequantize, levels, quantize, quantize_with_feedback


def _bound(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Each value's error bound: its block's absmax / 2L (plus float32 rounding)."""
    flat = x.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    absmax = padded.abs().amax(dim=1, keepdim=True).expand(-1, block).reshape(-1)[: flat.numel()]
    return absmax / (2 * levels(bits)) * (1 + 1e-5) + 1e-12


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [2, 64, 256, 4096])
def test_round_trip_error_is_bounded_by_each_blocks_own_scale(bits, block):
    generator = torch.Generator().manual_seed(bits * block)
    # blocks of very different magnitudes: each must keep its own precision
    x = torch.randn(3 * 4096 + 5, generator=generator) * torch.logspace(-6, 0, 3 * 4096 + 5)
    q = quantize(x, bits, block)
    back = dequantize(q)
    assert back.shape == (x.numel(),) and back.dtype == torch.float32
    assert bool(((back - x).abs() <= _bound(x, bits, block)).all())


def test_8bit_is_much_finer_than_4bit_and_the_sizes_are_as_documented():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q8, q4 = quantize(x, 8, 256), quantize(x, 4, 256)
    assert q8.codes.numel() == 1000 and q4.codes.numel() == 500 and q8.scales.numel() == 4
    err8, err4 = (dequantize(q8) - x).abs().mean(), (dequantize(q4) - x).abs().mean()
    assert err8 * 10 < err4


def test_4bit_codes_are_packed_two_a_byte_low_nibble_first():
    x = torch.tensor([-1.0, 1.0, 0.0])  # codes -7, +7, 0 -> stored 1, 15, 8
    q = quantize(x, 4, 4)
    assert q.codes.tolist() == [1 | (15 << 4), 8]
    assert dequantize(q).tolist() == [-1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", [8, 4])
def test_zeros_and_empty_tensors_round_trip_exactly(bits):
    assert bool((dequantize(quantize(torch.zeros(300), bits, 64)) == 0).all())
    empty = quantize(torch.zeros(0), bits, 64)
    assert empty.codes.numel() == 0 and empty.scales.numel() == 0 and dequantize(empty).numel() == 0


def test_lengths_that_are_not_a_multiple_of_the_block():
    for n in (1, 63, 65, 257):
        x = torch.linspace(-2, 3, n)
        back = dequantize(quantize(x, 4, 64))
        assert back.numel() == n and bool(((back - x).abs() <= _bound(x, 4, 64)).all())


def test_shape_and_dtype_are_flattened_to_float32():
    x = torch.randn(4, 5, dtype=torch.float64)
    back = dequantize(quantize(x, 8, 8))
    assert back.shape == (20,) and torch.allclose(back, x.reshape(-1).float(), atol=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_makes_its_block_nan_and_leaves_the_others_intact(bad):
    x = torch.ones(12)
    x[5] = bad
    q = quantize(x, 8, 4)
    assert torch.isnan(q.scales[1]) and bool(torch.isfinite(q.scales[[0, 2]]).all())
    back = dequantize(q)
    assert bool(torch.isnan(back[4:8]).all()) and back[:4].tolist() == [1.0] * 4 and back[8:].tolist() == [1.0] * 4


def test_dequantize_refuses_inconsistent_or_absurd_input():
    q = quantize(torch.randn(100), 8, 16)
    for bad in (
        dataclasses.replace(q, numel=101),  # sizes disagree
        dataclasses.replace(q, codes=q.codes[:-1]),
        dataclasses.replace(q, scales=q.scales[:-1]),
        dataclasses.replace(q, scales=torch.full_like(q.scales, -1.0)),  # a negative absmax
        dataclasses.replace(q, scales=torch.full_like(q.scales, float("inf"))),
        dataclasses.replace(q, bits=3),
        dataclasses.replace(q, block=7),
        dataclasses.replace(q, codes=q.codes.to(torch.int32)),
    ):
        with pytest.raises(ValueError):
            dequantize(bad)


def test_codes_outside_the_quantizers_range_stay_within_the_scale():
    q = BlockQuantized(torch.tensor([0, 255], dtype=torch.uint8), torch.tensor([2.0]), 2, 8, 2)
    assert dequantize(q).tolist() == [-2.0, 2.0]  # code -128 is clamped to -127


def test_error_feedback_carries_what_was_lost_into_the_next_contribution():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(512, generator=generator) * 1e-3
    q, residual = quantize_with_feedback(x, None, 4, 64)
    assert torch.allclose(residual, x - dequantize(q))
    # the same update sent every iteration: with feedback the sum of what was sent tracks the true sum
    sent, residual = torch.zeros(512), None
    for _ in range(20):
        q, residual = quantize_with_feedback(x, residual, 4, 64)
        sent += dequantize(q)
    without = 20 * dequantize(quantize(x, 4, 64))
    assert (sent - 20 * x).abs().max() <= residual.abs().max() + 1e-9
    assert (sent - 20 * x).abs().max() * 5 < (without - 20 * x).abs().max()


def test_error_feedback_drops_a_non_finite_residual():
    x = torch.ones(8)
    x[0] = float("nan")
    _, residual = quantize_with_feedback(x, torch.zeros(8), 8, 4)
    assert bool(torch.isfinite(residual).all()) and residual[:4].tolist() == [0.0] * 4
