"""Fixes for hivemind 1.1.x on current numpy, applied once when `p2pcold.swarm` is imported.

hivemind's `Quantization.extract` (used by Uniform8BitQuantization and Quantile8BitQuantization on the
*receiving* side of every all-reduce) does `int(np.frombuffer(buf, count=1))`. numpy >= 2.4 refuses to
convert a 1-element 1-D array to a Python int, so every 8-bit all-reduce fails with a TypeError. The
fix below reads element [0] instead; the wire format is unchanged, so patched and unpatched peers
(on older numpy) interoperate. It is applied only if a round-trip probe fails.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from hivemind.compression import CompressionInfo, Uniform8BitQuantization
from hivemind.compression import quantization as _quantization

_applied = False


def _extract_fixed(self, serialized_tensor):  # same body as hivemind's, with [0] on the codebook size
    codebook_size = int(np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
    quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
    codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
    return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


def _quantization_round_trip_works() -> bool:
    probe = torch.linspace(-1.0, 1.0, 64)
    compression = Uniform8BitQuantization()
    try:
        compression.extract(compression.compress(probe, CompressionInfo.from_tensor(probe)))
        return True
    except TypeError:
        return False


def apply() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    import warnings

    with warnings.catch_warnings():  # torch warns that quantize_per_tensor is deprecated; hivemind uses it
        warnings.simplefilter("ignore")
        if not _quantization_round_trip_works():
            _quantization.Quantization.extract = _extract_fixed
    # hivemind logs an expected "could not find a group" as an ERROR with a traceback; p2pcold reports
    # that outcome itself (FusionResult.status == NO_GROUP), so the duplicate is dropped.
    logging.getLogger("hivemind.averaging.averager").addFilter(_DropFilter("could not find a group"))
    # p2pcold uses target_group_size = number of expected peers, which need not be a power of 2
    logging.getLogger("hivemind.averaging.key_manager").addFilter(_DropFilter("power of 2"))


class _DropFilter(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)
