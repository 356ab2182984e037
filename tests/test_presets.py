"""Every run preset in p2pcold/recipes/runs/ loads, names only existing recipes, and opens with its command."""

from pathlib import Path

import pytest

import p2pcold
from p2pcold.config import load_dataset_spec, load_run_config
from p2pcold.utils import P2PColdError, packaged_recipes_dir, recipe_dirs

PRESETS = sorted((packaged_recipes_dir() / "runs").glob("*.yaml"))


def test_there_are_presets_for_the_demo_and_the_papers_experiments():
    names = {p.stem for p in PRESETS}
    assert {"demo", "paper-main", "paper-federated", "paper-controlled", "paper-contributors"} <= names
    assert {f"paper-unseen-fold{i}" for i in range(3)} <= names and {f"paper-few-shot-fold{i}" for i in range(3)} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(preset: Path):
    command = preset.read_text().splitlines()[0]  # the exact command that runs it, by the preset's name
    assert command.startswith("# p2pcold ") and (f" {preset.stem} " in command or preset.stem == "demo"), command
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

    config = load_run_config("transfer")

    def texts(name: str) -> set[str]:
        return {text.strip().lower() for split in load_examples(load_dataset_spec(name)).values() for text in split["text"]}

    contributed = set().union(*map(texts, config.datasets))
    assert config.iterations >= 8 and config.eval.few_shot == 100 and config.eval.seeds >= 3
    assert len(config.eval.unseen) >= 3
    for target in config.eval.unseen:
        shared = texts(target) & contributed
        assert len(shared) <= 0.01 * len(texts(target)), (target, sorted(shared)[:5])


def test_own_recipes_and_presets_add_to_and_override_the_packaged_ones(monkeypatch, tmp_path):
    packaged = packaged_recipes_dir()
    monkeypatch.delenv("P2PCOLD_RECIPES", raising=False)
    assert recipe_dirs() == [packaged] and packaged == Path(p2pcold.__file__).parent / "recipes"
    (tmp_path / "runs").mkdir()
    (tmp_path / "sst2.yaml").write_text("source: ./my-sst2.csv\nlabel_names: [neg, pos]\n")
    (tmp_path / "mine.yaml").write_text("source: ./mine.csv\nlabel_names: [a, b]\n")
    (tmp_path / "runs" / "demo.yaml").write_text("datasets: [mine]\niterations: 7\n")
    monkeypatch.setenv("P2PCOLD_RECIPES", str(tmp_path))  # set after import, still obeyed
    assert recipe_dirs() == [tmp_path, packaged]
    assert load_dataset_spec("sst2").source == "./my-sst2.csv" and load_dataset_spec("mine").name == "mine"
    assert load_dataset_spec("mnli").source == "nyu-mll/glue"  # the packaged ones stay visible
    assert load_run_config("demo").iterations == 7 and load_run_config("transfer").datasets
    with pytest.raises(P2PColdError) as error:
        load_dataset_spec("no_such_recipe")
    message = str(error.value)
    assert message.startswith("unknown dataset recipe 'no_such_recipe'") and "\n" not in message
    assert f"in {tmp_path}: mine, sst2;" in message and f"in {packaged}: ag_news, " in message
    with pytest.raises(P2PColdError, match=r"unknown run preset 'nope' \(known in .*runs: demo; in .*runs: demo, paper-"):
        load_run_config("nope")
