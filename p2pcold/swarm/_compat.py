"""Fixes for hivemind 1.1.x, applied once per process by `apply()`, which `start_dht` calls (every
hivemind object p2pcold makes needs a DHT first, and the averager processes forked later inherit the fixes).
Nothing is changed at import.

* hivemind's `Quantization.extract` (used by Uniform8BitQuantization and Quantile8BitQuantization on the
  *receiving* side of every all-reduce) does `int(np.frombuffer(buf, count=1))`. numpy >= 2.4 refuses to
  convert a 1-element 1-D array to a Python int, so every 8-bit all-reduce fails with a TypeError. The
  fix below reads element [0] instead; the wire format is unchanged, so patched and unpatched peers
  (on older numpy) interoperate. It is applied only if a round-trip probe fails.
* hivemind logs outcomes that p2pcold expects and reports itself as ERRORs with tracebacks; see
  `_ExpectedOutcomes` and `_CancelledStepCleanup`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException
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
    """Apply every fix in this process; a second call does nothing."""
    global _applied
    if _applied:
        return
    _applied = True
    import warnings

    with warnings.catch_warnings():  # torch warns that quantize_per_tensor is deprecated; hivemind uses it
        warnings.simplefilter("ignore")
        if not _quantization_round_trip_works():
            _quantization.Quantization.extract = _extract_fixed
    logging.getLogger("hivemind.averaging.averager").addFilter(_ExpectedOutcomes())
    # p2pcold uses target_group_size = number of expected peers, which need not be a power of 2
    logging.getLogger("hivemind.averaging.key_manager").addFilter(_DropFilter("power of 2"))
    cancelled_step = _CancelledStepCleanup()
    logging.getLogger("hivemind.utils.asyncio").addFilter(cancelled_step)
    logging.getLogger("asyncio").addFilter(cancelled_step)


def is_applied() -> bool:
    return _applied


class _ExpectedOutcomes(logging.Filter):
    """hivemind's averager logs, as ERRORs with a traceback, outcomes that p2pcold expects:

    * a step that found no group or whose all-reduce failed (a member died or timed out, a partial
      all-reduce), logged once per attempt and again when the step gives up. `BodyAverager.fuse`
      reports each attempt in one line and retries, so these records are dropped.
    * a state donor that does not answer: `load_state_from_peers` asks the donors listed in the DHT in
      turn, and a donor that exited (a peer SIGKILLed and restarted finds its own dead predecessor
      listed, at the same iteration as the live donors, until the entry expires) fails the request. The
      download goes on with the next donor, so that record becomes one warning line without traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (AllreduceException, MatchmakingException)):
            return False
        if error is not None and str(record.msg).startswith("Failed to download state from"):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


class _CancelledStepCleanup(logging.Filter):
    """When a step is cancelled in matchmaking (`group_fusion.cancel_step`: the swarm left the boundary),
    hivemind closes its matchmaking tasks while they await their own cancellation. That logs, from the
    averager process, a GeneratorExit traceback per task (`await_cancelled`), "Task was destroyed but it
    is pending!" for hivemind's averaging tasks, and a stream's "aclose(): asynchronous generator is
    already running". The step's outcome is already reported (`fuse` says it stopped looking), so these
    records are dropped; any other asyncio error is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.name == "hivemind.utils.asyncio":
            return not isinstance(error, GeneratorExit)
        message = str(record.msg)
        if message.startswith("Task was destroyed but it is pending!"):
            return "hivemind/averaging/" not in message
        if message.startswith("Task exception was never retrieved"):
            return not (isinstance(error, RuntimeError) and str(error) == "aclose(): asynchronous generator is already running")
        return True


class _DropFilter(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)
