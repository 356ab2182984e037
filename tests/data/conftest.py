"""Fixtures for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from toy_tables import toy_rows, write_rows


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_rows(tmp_path / "toy.csv", toy_rows())


@pytest.fixture
def fake_hub(monkeypatch):
    """Make `load_examples` see hub-like splits (integer ClassLabel labels) without a network."""

    def install(splits: dict[str, list[dict]], label_names=("neg", "pos")) -> None:
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))}
        )
        loaded = {name: datasets.Dataset.from_list(rows, features=features) for name, rows in splits.items()}
        monkeypatch.setattr("p2pcold.data.examples.read_source", lambda *args: dict(loaded))

    return install
