"""The all-reduce's wire compression: `make_compression(name)` for `swarm.compression`, and
`BlockQuantization`, hivemind's codec for p2pcold's block-wise quantization (`p2pcold.quantization`).

hivemind decodes every received part, and encodes every reply of a reducer, with the codec it has
registered for the part's `CompressionType`; there is no slot for a codec of one's own. p2pcold's
travels in the BLOCKWISE_8BIT slot (hivemind's codec there needs bitsandbytes, which p2pcold never
uses): `install_codec` registers the run's `BlockQuantization` in it, in the averager process only.
The header of each part names its bits and block, so a part of another setting is refused.

A received part comes from another peer: `extract` bounds and checks it (its size, its buffer's length,
its settings, its scales) and raises ValueError on anything `compress` does not make. hivemind then bans
the sender from that all-reduce, which fails it as partial: a malformed part is rejected like any other.
A NaN scale is what `compress` makes of a block holding NaN or Inf: it decodes to NaN, and the reducers
leave that contribution out as they would the uncompressed one.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.compression import Uniform8BitQuantization
from hivemind.compression import serialization as _serialization
from hivemind.proto import runtime_pb2

from p2pcold.fusion import BLOCK_VALUES
from p2pcold.quantization import SCALE_BYTES, BlockQuantized, dequantize, quantize
from p2pcold.utils import P2PColdError

COMPRESSIONS = ("none", "fp16", "8bit", "block8", "block4")
# values per scale on the wire: it divides fusion.BLOCK_VALUES, so every all-reduce part is whole blocks
BLOCK = 256
_HEADER = np.dtype([("bits", "<u1"), ("pad", "<u1", 3), ("block", "<u4")])
_SLOT = "BLOCKWISE_8BIT"


def make_compression(name: str) -> CompressionBase:
    """`none` -> exact fp32; `fp16` -> Float16Compression; `8bit` -> Uniform8BitQuantization;
    `block8` / `block4` -> BlockQuantization of 8 / 4 bits a value, one scale per BLOCK values.

    Uniform (mean ± 3σ in 256 even bins) rather than Quantile8Bit: on MiniLM's weights both lose
    ~6.6-6.8 % relative RMS, on Gaussian finetuning deltas uniform is better (1.6 % vs 2.8 %), and it
    compresses ~4x faster (0.5 s vs 2.2 s per 22.7 M values on this machine).
    """
    if name == "none":
        return NoCompression()
    if name == "fp16":
        return Float16Compression()
    if name == "8bit":
        return Uniform8BitQuantization()
    if name in ("block8", "block4"):
        return BlockQuantization(int(name[len("block"):]))
    raise P2PColdError(f"swarm: unknown compression {name!r}")


def is_lossy(name: str) -> bool:
    """A compression that changes the values."""
    return name != "none"


# How far a codec may move a fused tensor, as a share of the norm of what its members sent (their update from
# the call's reference), with a margin: two legs (to the reducer and back). fp16 rounds each value to 11 bits;
# `8bit` lost 1.6-6.8 % relative RMS a leg; block8's and block4's largest errors were 2.5-2.9 % and 45-53 % of
# the mean update on real MiniLM updates (docs/performance.md), their RMS errors far less.
WIRE_ERROR_SHARE = {"none": 0.0, "fp16": 2.0**-9, "8bit": 0.25, "block8": 0.1, "block4": 1.0}


def fuse_reference(name: str, base: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor] | None:
    """What a peer passes to `BodyAverager.fuse` as `reference`: with a lossy compression the base of
    the iteration being fused (θ_i), so that only this iteration's update is quantized, not everything
    since θ0; exact fusion keeps the averager's own reference (θ0), bit for bit as before."""
    return base if is_lossy(name) else None


class BlockQuantization(CompressionBase):
    """Block-wise absmax quantization of float32 parts: a header (bits, block), one float32 scale per
    block, then the codes (`p2pcold.quantization`). A part holds at most `max_values` values."""

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT

    def __init__(self, bits: int, block: int = BLOCK, max_values: int = BLOCK_VALUES):
        if BLOCK_VALUES % block:
            raise ValueError(f"a quantization block of {block} values does not divide a part of {BLOCK_VALUES}")
        quantize(torch.zeros(0), bits, block)  # checks the settings
        self.bits, self.block, self.max_values = bits, block, max_values

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        q = quantize(tensor, self.bits, self.block)
        header = np.zeros(1, dtype=_HEADER)
        header["bits"], header["block"] = self.bits, self.block
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=b"".join((header.tobytes(), q.scales.numpy().tobytes(), q.codes.numpy().tobytes())),
            size=tensor.shape,
            dtype="float32",
            requires_grad=tensor.requires_grad,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized_tensor.size)
        numel = math.prod(shape)
        if serialized_tensor.dtype != "float32" or not 0 <= numel <= self.max_values:
            raise ValueError(f"block-quantized part: {serialized_tensor.dtype} of shape {shape[:8]}")
        buffer = serialized_tensor.buffer
        if len(buffer) < _HEADER.itemsize:
            raise ValueError("block-quantized part: no header")
        header = np.frombuffer(buffer, dtype=_HEADER, count=1)[0]
        if (int(header["bits"]), int(header["block"])) != (self.bits, self.block):
            raise ValueError(f"block-quantized part of {header['bits']} bits in blocks of {header['block']}")
        blocks = -(-numel // self.block)
        scales_end = _HEADER.itemsize + SCALE_BYTES * blocks
        scales = torch.from_numpy(np.frombuffer(buffer, dtype="<f4", offset=_HEADER.itemsize, count=blocks).copy())
        codes = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, offset=scales_end).copy())
        values = dequantize(BlockQuantized(codes, scales, numel, self.bits, self.block))  # checks the sizes
        return values.reshape(shape).requires_grad_(serialized_tensor.requires_grad)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        """Bytes per value over float32's 4 (the header is left out: parts are BLOCK_VALUES long)."""
        return (self.bits / 8 + SCALE_BYTES / self.block) / 4

    def __repr__(self) -> str:
        return f"p2pcold.BlockQuantization(bits={self.bits}, block={self.block})"


def install_codec(compression: CompressionBase) -> None:
    """In this process, hivemind decodes and encodes the parts in `compression`'s slot with it (called in
    the averager process, which (de)serializes every part of its all-reduces). Other codecs: nothing."""
    if isinstance(compression, BlockQuantization):
        _serialization._BASE_COMPRESSION_TYPES[_SLOT] = compression
