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


@pytest.mark.slow
def test_transfer_presets_unseen_targets_are_unseen():
    """The transfer preset's unseen targets share (almost) no text with its contributors: the
    debate targets only one-word replies ("Right.", "Yes."), tweets_apple some airline tweets that
    mention an iPhone (18 of its 3,258)."""
    from p2pcold.data import load_examples

    config = load_run_config(recipes_dir() / "runs" / "transfer.yaml")

    def texts(name: str) -> set[str]:
        return {text.strip().lower() for split in load_examples(load_dataset_spec(name)).values() for text in split["text"]}

    contributed = set().union(*map(texts, config.datasets))
    assert config.iterations >= 8 and config.eval.few_shot == 100 and config.eval.seeds >= 3
    assert len(config.eval.unseen) >= 3
    for target in config.eval.unseen:
        shared = texts(target) & contributed
        assert len(shared) <= 0.01 * len(texts(target)), (target, sorted(shared)[:5])
