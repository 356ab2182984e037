from __future__ import annotations

import signal
from pathlib import Path

import pytest

from p2pcold.testing import build_tiny_encoder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT encoder + WordPiece tokenizer saved as a Hugging Face folder."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


def _sigint_ignored() -> bool:
    """Whether this process ignores SIGINT at the OS level (what a child process inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


@pytest.fixture(autouse=True)
def _sigint_left_as_it_was():
    """Each test leaves Ctrl-C as it found it: a process the suite starts later inherits an ignored SIGINT
    (Python then never installs its KeyboardInterrupt handler), and a test of Ctrl-C would see it ignored."""
    before, ignored = signal.getsignal(signal.SIGINT), _sigint_ignored()
    yield
    if signal.getsignal(signal.SIGINT) is not before or _sigint_ignored() != ignored:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left SIGINT {'ignored' if _sigint_ignored() else 'changed'} in the test process")
