"""Tokenized splits, dynamically padded loaders with seeded shuffling, few-shot samples."""

from __future__ import annotations

import pytest
import torch
from toy_tables import toy_spec, write_rows
from transformers import AutoTokenizer

from p2pcold.data import few_shot, make_loader, prepare_dataset
from p2pcold.utils import P2PColdError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def prepared(tmp_path, tokenizer):
    # Texts of very different lengths, so that padding is visible.
    rows = [{"text": "good " * (1 + i % 9) + "movie", "label": ["neg", "pos"][i % 2]} for i in range(80)]
    return prepare_dataset(toy_spec(write_rows(tmp_path / "toy.csv", rows)), tokenizer, max_length=16)


def test_prepared_columns_unpadded(prepared):
    assert prepared.name == "toy" and prepared.label_names == ["neg", "pos"] and prepared.num_labels == 2
    assert [len(s) for s in (prepared.train, prepared.dev, prepared.test)] == [64, 8, 8]
    assert set(prepared.train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = {len(ids) for ids in prepared.train["input_ids"]}
    assert len(lengths) > 1 and max(lengths) <= 16
    assert all(all(mask) for mask in prepared.train["attention_mask"])


def test_label_names_from_the_data(tmp_path, tokenizer):
    rows = [{"text": f"movie {i}", "label": ["b", "a", "c"][i % 3]} for i in range(60)]
    prepared = prepare_dataset(toy_spec(write_rows(tmp_path / "toy.csv", rows), label_names=[]), tokenizer, max_length=16)
    assert prepared.label_names == ["a", "b", "c"] and prepared.num_labels == 3


def test_truncation(tmp_path, tokenizer):
    rows = [{"text": "good " * 100, "label": ["neg", "pos"][i % 2]} for i in range(20)]
    prepared = prepare_dataset(toy_spec(write_rows(tmp_path / "long.csv", rows)), tokenizer, max_length=12)
    assert {len(ids) for ids in prepared.train["input_ids"]} == {12}


def test_pairs_get_both_segments(tmp_path, tokenizer):
    rows = [{"a": "the movie", "b": "a film", "label": ["neg", "pos"][i % 2]} for i in range(20)]
    spec = toy_spec(write_rows(tmp_path / "pairs.csv", rows), text_column="a", text_pair_column="b")
    row = prepare_dataset(spec, tokenizer, max_length=32).train[0]
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2 and set(row["token_type_ids"]) == {0, 1}


def test_loader_pads_each_batch_to_its_longest_row(prepared, tokenizer):
    loader = make_loader(prepared.train, tokenizer, batch_size=8, shuffle=False, seed=0)
    widths = set()
    for i, batch in enumerate(loader):
        rows = prepared.train.select(range(i * 8, min((i + 1) * 8, len(prepared.train))))
        lengths = [len(ids) for ids in rows["input_ids"]]
        assert batch["input_ids"].shape == (len(lengths), max(lengths))
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        assert batch["labels"].tolist() == rows["labels"]
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 1  # padded per batch, not to one global length


def order(loader) -> list[int]:
    return torch.cat([batch["input_ids"][:, 1] * 1000 + batch["attention_mask"].sum(1) for batch in loader]).tolist()


def test_seeded_shuffle(prepared, tokenizer):
    def loader(seed):
        return make_loader(prepared.train, tokenizer, batch_size=8, shuffle=True, seed=seed)

    a, b = loader(3), loader(3)
    assert order(a) == order(b)  # same seed, same batches: what two peer processes see
    assert order(a) == order(b)  # and the same sequence of orders pass after pass
    assert order(loader(4)) != order(loader(3))
    fresh = loader(3)
    assert order(fresh) != order(fresh)  # each pass draws a new order


def test_few_shot(prepared):
    sample = few_shot(prepared.train, 10, seed=1)
    assert len(sample) == 10 and sample["input_ids"] == few_shot(prepared.train, 10, seed=1)["input_ids"]
    assert len(few_shot(prepared.train, 1000, seed=1)) == len(prepared.train)
    with pytest.raises(P2PColdError):
        few_shot(prepared.train, 0, seed=1)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # no accelerator here: pinning is skipped
def test_cuda_loader_same_batches_padded_to_a_multiple_of_8(prepared, tokenizer):
    def batches(cuda):
        return list(make_loader(prepared.train, tokenizer, batch_size=8, shuffle=True, seed=5, cuda=cuda))

    plain, for_gpu = batches(False), batches(True)  # for_gpu: collated by worker processes
    assert len(plain) == len(for_gpu)
    for a, b in zip(plain, for_gpu):
        assert b["input_ids"].shape[1] % 8 == 0 and b["input_ids"].shape[1] >= a["input_ids"].shape[1]
        assert b["labels"].tolist() == a["labels"].tolist()  # same rows in the same order
        assert b["attention_mask"].sum(1).tolist() == a["attention_mask"].sum(1).tolist()  # padding only
        width = a["input_ids"].shape[1]
        assert torch.equal(b["input_ids"][:, :width], a["input_ids"])
