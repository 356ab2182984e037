"""TensorBoard scalars: `--log-dir` on `peer`, `monitor` and `simulate` (torch.utils.tensorboard)."""

from __future__ import annotations

from pathlib import Path

from p2pcold.utils import P2PColdError


class ScalarLog:
    """Event files in `log_dir` (None: writes nothing). `step` is the iteration a value belongs to."""

    def __init__(self, log_dir: str | Path | None):
        self._writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise P2PColdError("--log-dir needs the tensorboard package: pip install tensorboard") from None
        try:
            self._writer = SummaryWriter(str(log_dir), flush_secs=10)
        except OSError as e:
            raise P2PColdError(f"--log-dir {log_dir}: cannot write there ({e.strerror or e})") from None

    def add(self, tag: str, value: float | None, step: int, walltime: float | None = None) -> None:
        if self._writer is not None and value is not None:
            self._writer.add_scalar(tag, float(value), step, walltime=walltime)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
