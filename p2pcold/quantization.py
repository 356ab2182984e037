"""Block-wise absmax quantization of float tensors, 8 or 4 bits a value, and its error feedback.

Pure torch, no network: the swarm's wire codec (`p2pcold.swarm.compression`) and the benchmarks call
these, and the tests check them on plain tensors.

The flattened tensor is cut into blocks of `block` values. Each block keeps its own scale, its largest
|value|, and each value becomes the nearest of the 2L + 1 even steps in [-scale, scale] (L = 127 for 8
bits, 7 for 4 bits). A value's error is thus at most scale / 2L: it follows the magnitude of its own
block, not the spread of the whole tensor, so a few large updates (a LayerNorm, a frequent token's
embedding) cost precision only in their own blocks, as in bitsandbytes and INTELLECT-1's int8 all-reduce.

A block that holds NaN or Inf is marked with a NaN scale and dequantizes to NaN as a whole: a
non-finite contribution stays non-finite, so the fusion's reducers leave it out
(`fusion.aggregate_block`) exactly as they would leave out the uncompressed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)
DEFAULT_BLOCK = 256  # values per scale; benchmarks/compression_error.py measures 64..4096
SCALE_BYTES = 4  # float32 scales: a delta's absmax can be far below float16's smallest normal (6e-5)


def levels(bits: int) -> int:
    """L: the codes are -L..L (an even number of steps either side of 0)."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class BlockQuantized:
    """A quantized flat tensor of `numel` float32 values."""

    codes: torch.Tensor  # uint8: code + 2**(bits-1) per value; 4 bits: two a byte, the first in the low nibble
    scales: torch.Tensor  # float32, one per block: its absmax (0 for a zero block, NaN for a non-finite one)
    numel: int
    bits: int
    block: int


def check_settings(bits: int, block: int) -> None:
    if bits not in BITS:
        raise ValueError(f"block quantization has {BITS} bits a value, not {bits}")
    if not (isinstance(block, int) and block >= 2 and block % 2 == 0):
        raise ValueError(f"a quantization block is an even number of values >= 2, not {block!r}")


def blocks_of(numel: int, block: int) -> int:
    return -(-numel // block)


def code_bytes(numel: int, bits: int) -> int:
    return numel if bits == 8 else -(-numel // 2)


def quantize(x: torch.Tensor, bits: int = 8, block: int = DEFAULT_BLOCK) -> BlockQuantized:
    """`x` (any shape, any float dtype) -> codes and one scale per block of its flattened values."""
    check_settings(bits, block)
    flat = x.detach().reshape(-1).to(torch.float32)
    numel = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, blocks_of(numel, block) * block - numel)).view(-1, block)
    finite = torch.isfinite(padded).all(dim=1)
    absmax = torch.where(finite, padded.abs().amax(dim=1), torch.nan)
    L = levels(bits)
    step = torch.where(finite & (absmax > 0), absmax, 1.0) / L
    steps = torch.where(finite[:, None], torch.round(padded / step[:, None]), 0.0).clamp_(-L, L)
    codes = (steps + 2 ** (bits - 1)).to(torch.uint8).reshape(-1)[:numel]
    if bits == 4:
        codes = _pack_nibbles(codes)
    return BlockQuantized(codes.contiguous(), absmax.contiguous(), numel, bits, block)


def check(q: BlockQuantized) -> None:
    """ValueError unless `q` is what `quantize` makes: sizes that agree, scales that are >= 0 or NaN."""
    check_settings(q.bits, q.block)
    if q.numel < 0 or q.codes.dtype != torch.uint8 or q.scales.dtype != torch.float32:
        raise ValueError("quantized tensor: negative size or wrong dtypes")
    if q.codes.numel() != code_bytes(q.numel, q.bits) or q.scales.numel() != blocks_of(q.numel, q.block):
        raise ValueError(
            f"quantized tensor of {q.numel} values: {q.codes.numel()} code bytes and {q.scales.numel()} scales "
            f"(expected {code_bytes(q.numel, q.bits)} and {blocks_of(q.numel, q.block)})"
        )
    if bool(((q.scales < 0) | torch.isinf(q.scales)).any()):
        raise ValueError("quantized tensor: a scale is negative or infinite")


def dequantize(q: BlockQuantized) -> torch.Tensor:
    """The flat float32 tensor of `q.numel` values; a NaN scale gives a block of NaN (`check` first)."""
    check(q)
    codes = _unpack_nibbles(q.codes, q.numel) if q.bits == 4 else q.codes
    L = levels(q.bits)
    steps = (codes.to(torch.float32) - 2 ** (q.bits - 1)).clamp_(-L, L)
    count = q.scales.numel()
    padded = torch.nn.functional.pad(steps, (0, count * q.block - q.numel)).view(count, q.block)
    return (padded * (q.scales / L)[:, None]).reshape(-1)[: q.numel]


def quantize_with_feedback(
    x: torch.Tensor, residual: torch.Tensor | None, bits: int = 8, block: int = DEFAULT_BLOCK
) -> tuple[BlockQuantized, torch.Tensor]:
    """Error feedback: quantize x + residual, and return what that lost as the next residual (flat).

    Over iterations, every value's errors then cancel instead of adding up. A value that is not finite
    leaves a residual of 0: one bad contribution must not poison every later one.
    """
    corrected = x.detach().reshape(-1).to(torch.float32)
    if residual is not None:
        corrected = corrected + residual.reshape(-1)
    q = quantize(corrected, bits, block)
    lost = corrected - dequantize(q)
    return q, torch.where(torch.isfinite(lost), lost, 0.0)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
