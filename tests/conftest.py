from __future__ import annotations

from pathlib import Path

import pytest

from p2pcold.testing import build_tiny_encoder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT encoder + WordPiece tokenizer saved as a Hugging Face folder."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(autouse=True)
def _sigint_left_as_it_was():
    """Each test leaves Ctrl-C as it found it: a process the suite starts later inherits an ignored SIGINT
    (Python then never installs its KeyboardInterrupt handler), and a test of Ctrl-C would see it ignored.
    hivemind's averager sets SIG_IGN for good in the process that starts it from the main thread."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left SIGINT handled by {after!r} (was {before!r})")
