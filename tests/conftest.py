from __future__ import annotations

from pathlib import Path

import pytest

from p2pcold.testing import build_tiny_encoder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT encoder + WordPiece tokenizer saved as a Hugging Face folder."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))
