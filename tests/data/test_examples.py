"""load_examples: filtering, labels, pairs, caps, seeded splits, and the errors for bad data."""

from __future__ import annotations

import pytest
from toy_tables import toy_rows, toy_spec, write_rows

from p2pcold.config import RowFilter, load_dataset_spec
from p2pcold.data import load_examples
from p2pcold.utils import P2PColdError


def all_texts(splits) -> list[str]:
    return [text for split in splits.values() for text in split["text"]]


def test_splits_and_columns(toy_csv):
    splits = load_examples(toy_spec(toy_csv))
    assert list(splits) == ["train", "dev", "test"]
    assert [len(s) for s in splits.values()] == [48, 6, 6]  # split_fractions (0.1, 0.1) of 60
    assert splits["train"].features["label"].dtype == "int64"
    for split in splits.values():
        assert split.column_names == ["text", "label"]
        for text, label in zip(split["text"], split["label"]):
            assert label == (1 if "good" in text else 0)


def test_same_spec_same_splits_and_disjoint(toy_csv):
    first, second = load_examples(toy_spec(toy_csv)), load_examples(toy_spec(toy_csv))
    for name in first:
        assert first[name]["text"] == second[name]["text"]
    sets = [set(s["text"]) for s in first.values()]
    assert sum(len(s) for s in sets) == len(set.union(*sets)) == 60
    other = load_examples(toy_spec(toy_csv, split_seed=1))
    assert other["test"]["text"] != first["test"]["text"]


def test_caps(tmp_path):
    path = write_rows(tmp_path / "toy.csv", toy_rows(200))
    full = load_examples(toy_spec(path))
    capped = load_examples(toy_spec(path, max_examples=50, max_eval_examples=7))
    assert [len(s) for s in capped.values()] == [50, 7, 7]
    assert set(capped["train"]["text"]) <= set(full["train"]["text"])
    # The test set is carved before any cap: capping train does not change what a model is scored on.
    assert load_examples(toy_spec(path, max_examples=50))["test"]["text"] == full["test"]["text"]


def test_sentence_pairs(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "gold": ["yes", "no"][i % 2]} for i in range(30)]
    spec = toy_spec(
        write_rows(tmp_path / "pairs.jsonl", rows),
        text_column="premise", text_pair_column="hypothesis", label_column="gold", label_names=["no", "yes"],
    )
    splits = load_examples(spec)
    assert splits["train"].column_names == ["text", "text_pair", "label"]
    for split in splits.values():
        for text, pair, label in zip(split["text"], split["text_pair"], split["label"]):
            assert pair == "h" + text[1:] and label == (1 - int(text[1:]) % 2)


def test_filter_is_case_insensitive_substring(tmp_path):
    topics = ("@United", "apple")
    rows = [{"text": f"{topic} tweet {i}", "label": ["neg", "pos"][i % 2]} for i in range(40) for topic in topics]
    spec = toy_spec(write_rows(tmp_path / "t.csv", rows), filter=RowFilter(column="text", keywords=["@UNITED"]))
    texts = all_texts(load_examples(spec))
    assert len(texts) == 40 and all(t.startswith("@United") for t in texts)


def test_filter_on_another_column(tmp_path):
    topic = ["apple", "cars", "cars"]  # two rows in three are about cars
    rows = [{"text": f"t{i}", "topic": topic[i % 3], "label": ["neg", "pos"][i % 2]} for i in range(60)]
    spec = toy_spec(write_rows(tmp_path / "t.csv", rows), filter=RowFilter(column="topic", keywords=["car"]))
    assert len(all_texts(load_examples(spec))) == 40


def test_integer_labels_are_class_indices(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(60)]
    splits = load_examples(toy_spec(write_rows(tmp_path / "t.parquet", rows), label_names=["a", "b", "c"]))
    assert sorted(set(splits["train"]["label"])) == [0, 1, 2]


def test_unlisted_labels_dropped_or_rejected(tmp_path):
    rows = toy_rows(40) + [{"text": f"plot {i}", "label": "plot"} for i in range(10)]
    path = write_rows(tmp_path / "reviews.csv", rows)
    with pytest.raises(P2PColdError, match=r"reviews\.csv.*column 'label'.*'plot'.*drop_unlisted_labels"):
        load_examples(toy_spec(path))
    texts = all_texts(load_examples(toy_spec(path, drop_unlisted_labels=True)))
    assert len(texts) == 40 and not any(t.startswith("plot") for t in texts)


def test_rows_without_text_are_dropped(tmp_path):
    rows = toy_rows(40) + [{"text": text, "label": "pos"} for text in ("", "   ", None)]
    assert len(all_texts(load_examples(toy_spec(write_rows(tmp_path / "t.jsonl", rows))))) == 40


def test_missing_column(toy_csv):
    with pytest.raises(P2PColdError, match=r"toy\.csv\): no column 'sentence' \(available: text, label\)"):
        load_examples(toy_spec(toy_csv, text_column="sentence"))


def test_empty_after_filter(toy_csv):
    spec = toy_spec(toy_csv, filter=RowFilter(column="text", keywords=["deflategate"]))
    with pytest.raises(P2PColdError, match=r"toy\.csv\): no rows left after filtering column 'text'"):
        load_examples(spec)


def test_single_label_in_train(tmp_path):
    path = write_rows(tmp_path / "one.csv", [{"text": f"t{i}", "label": "pos"} for i in range(30)])
    with pytest.raises(P2PColdError, match=r"one\.csv\): train has a single label \(pos\) in column 'label'"):
        load_examples(toy_spec(path))


def test_bad_split_fractions(toy_csv):
    with pytest.raises(P2PColdError, match="split_fractions"):
        load_examples(toy_spec(toy_csv, split_fractions=(0.6, 0.5)))


def hub_rows(n: int, label=None) -> list[dict]:
    return [{"text": f"hub {i}", "label": i % 2 if label is None else label} for i in range(n)]


def test_hub_splits_are_used_as_given(fake_hub):
    fake_hub({"train": hub_rows(50), "validation": hub_rows(8), "test": hub_rows(6)})
    splits = load_examples(toy_spec("some/hub-dataset"))
    assert [len(s) for s in splits.values()] == [50, 8, 6]


def test_hub_test_with_hidden_labels_is_carved(fake_hub):
    fake_hub({"train": hub_rows(50), "validation": hub_rows(8), "test": hub_rows(9, label=-1)})
    splits = load_examples(toy_spec("nyu-mll/glue"))
    assert [len(s) for s in splits.values()] == [45, 8, 5]


def test_hub_missing_train_split(fake_hub):
    fake_hub({"train_r1": hub_rows(50)})
    with pytest.raises(P2PColdError, match=r"no split 'train' \(available: train_r1\)"):
        load_examples(toy_spec("facebook/anli"))


def test_eval_label_never_seen_in_train(fake_hub):
    train = hub_rows(50, label=0) + hub_rows(50, label=1)
    fake_hub({"train": train, "validation": hub_rows(4, label=2), "test": hub_rows(4)}, label_names=("a", "b", "c"))
    with pytest.raises(P2PColdError, match=r"dev has label\(s\) c in column 'label' that train never shows"):
        load_examples(toy_spec("some/hub-dataset", label_names=["a", "b", "c"]))


def test_too_few_rows_to_carve(tmp_path):
    path = write_rows(tmp_path / "tiny.csv", toy_rows(2))
    with pytest.raises(P2PColdError, match=r"tiny\.csv\): only 2 usable rows"):
        load_examples(toy_spec(path))


def test_shards_split_train_disjointly_and_share_dev_and_test(tmp_path):
    from collections import Counter

    from p2pcold.config import load_dataset_spec
    from toy_data import write_toy_dataset

    recipe = str(write_toy_dataset(tmp_path, "toy_movies", "movies", rows=200))
    shards = [load_examples(load_dataset_spec(f"{recipe}@{i}/3")) for i in range(3)]
    whole = load_examples(load_dataset_spec(recipe))
    assert load_dataset_spec(f"{recipe}@1/3").name == "toy_movies@1of3"
    together = Counter(text for s in shards for text in s["train"]["text"])
    assert together == Counter(whole["train"]["text"])  # the shards partition train
    assert all(0 < len(s["train"]) < len(whole["train"]) for s in shards)
    assert all(s["test"]["text"] == whole["test"]["text"] for s in shards)


def test_bad_shard_reference_is_one_line():
    from p2pcold.config import load_dataset_spec

    with pytest.raises(P2PColdError, match="NAME@INDEX/COUNT"):
        load_dataset_spec("rotten_tomatoes@3/3")


def test_a_data_file_is_a_recipe_named_by_the_file_and_labelled_by_its_data(tmp_path):
    stars = [5, 1, 3, 10]
    rows = [{"review": f"review {i}", "stars": stars[i % 4], "extra": "x"} for i in range(80)]
    csv = write_rows(tmp_path / "my_reviews.csv", rows)
    spec = load_dataset_spec(f"{csv}", text_column="review", label_column="stars")
    assert (spec.name, spec.source, spec.label_names) == ("my_reviews", str(csv.resolve()), [])
    splits = load_examples(spec)
    names = splits["train"].features["label"].names
    assert names == ["1", "3", "5", "10"]  # numbers in numeric order, each its own class
    for split in splits.values():
        assert split.features["label"].names == names
        for text, label in zip(split["text"], split["label"]):
            assert names[label] == str(stars[int(text.split()[1]) % 4])

    tweets = toy_rows(60) + [{"text": "unlabelled", "label": ""}]  # a row without a label is dropped
    jsonl = write_rows(tmp_path / "tweets.jsonl", tweets)
    splits = load_examples(load_dataset_spec(str(jsonl)))  # the columns `text` and `label`
    assert splits["train"].features["label"].names == ["neg", "pos"] and len(all_texts(splits)) == 60
    for split in splits.values():
        assert all(label == (1 if "good" in text else 0) for text, label in zip(split["text"], split["label"]))


def test_data_file_references_are_checked(tmp_path):
    with pytest.raises(P2PColdError, match=r"nope\.csv: data file not found"):
        load_dataset_spec(str(tmp_path / "nope.csv"))
    with pytest.raises(P2PColdError, match=r"rotten_tomatoes: a recipe names its own columns"):
        load_dataset_spec("rotten_tomatoes", label_column="stars")
    with pytest.raises(P2PColdError, match=r"label_names=\['a', 'b', 'a'\]: .*lists a twice"):
        toy_spec("x.csv", label_names=["a", "b", "a"])
    path = write_rows(tmp_path / "one.csv", [{"text": f"t{i}", "label": "pos"} for i in range(30)])
    with pytest.raises(P2PColdError, match=r"one\.csv\): column 'label' holds one label only \(pos\); a classifier needs two"):
        load_examples(load_dataset_spec(str(path)))
