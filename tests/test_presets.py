"""Every run preset in peers/runs/ loads, names only existing recipes, and opens with its command."""

from pathlib import Path

import pytest

from p2pcold.config import load_dataset_spec, load_run_config
from p2pcold.utils import recipes_dir

PRESETS = sorted((recipes_dir() / "runs").glob("*.yaml"))


def test_there_are_presets_for_the_demo_and_the_papers_experiments():
    names = {p.stem for p in PRESETS}
    assert {"demo", "paper-main", "paper-federated", "paper-controlled", "paper-contributors"} <= names
    assert {f"paper-unseen-fold{i}" for i in range(3)} <= names and {f"paper-few-shot-fold{i}" for i in range(3)} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(preset: Path):
    assert preset.read_text().startswith("# p2pcold ")  # the exact command that runs it
    config = load_run_config(preset)
    for reference in config.datasets + config.eval.datasets:
        load_dataset_spec(reference)
    assert set(config.eval.unseen).isdisjoint(config.datasets)
