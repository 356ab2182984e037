"""From a recipe to labelled examples: train, dev and test splits with `text`, `text_pair`, `label`.

The steps, in order: read the source, keep rows matching the recipe's filter, turn labels into
class indices (of the recipe's `label_names`, or, where it lists none, of the distinct labels of
train as text), drop rows without text, carve dev/test out of train where the source has none,
cap every split, check that the labels make a classification task. Every random choice is
seeded by `split_seed`, so every peer builds the same splits from the same recipe.
"""

from __future__ import annotations

import datasets

from p2pcold.config import DatasetSpec
from p2pcold.data.sources import read_source
from p2pcold.utils import P2PColdError, get_logger

log = get_logger("data")


def load_examples(spec: DatasetSpec) -> datasets.DatasetDict:
    raw = read_source(spec.source, spec.hub_config, spec.encoding, spec.train_split)
    if spec.train_split not in raw:
        raise _error(spec, f"no split {spec.train_split!r} (available: {', '.join(raw)})")
    labels_by_text = not spec.label_names  # named by the data: a label is its text, whatever its type
    if labels_by_text:
        spec = spec.model_copy(update={"label_names": _label_values(raw[spec.train_split], spec)})
    train = _clean(raw[spec.train_split], spec, spec.train_split, labels_by_text)
    dev = _clean_if_labelled(raw, spec.dev_split, spec, labels_by_text)
    test = _clean_if_labelled(raw, spec.test_split, spec, labels_by_text)
    train, dev, test = _carve(train, dev, test, spec)
    if spec.num_shards:  # federated contributors (§5.1): disjoint slices of train, shared dev/test
        train = train.shard(spec.num_shards, spec.shard_index, contiguous=False, keep_in_memory=True)
    splits = datasets.DatasetDict(
        train=_cap(train, spec.max_examples, spec.split_seed),
        dev=_cap(dev, spec.max_eval_examples, spec.split_seed),
        test=_cap(test, spec.max_eval_examples, spec.split_seed),
    )
    _check_labels(splits, spec)
    return splits


def _error(spec: DatasetSpec, message: str) -> P2PColdError:
    where = f"{spec.name} ({spec.source})" if spec.name else spec.source
    return P2PColdError(f"{where}: {message}")


def _clean_if_labelled(
    raw: dict[str, datasets.Dataset], split: str | None, spec: DatasetSpec, labels_by_text: bool
) -> datasets.Dataset | None:
    """A hub dev/test split, or None where it must be carved from train instead."""
    if split is None:
        return None
    if split not in raw:
        if len(raw) > 1:  # a file has no splits at all, which is expected; a hub dataset lacking one is worth a note
            log.info("%s: no split %r in %s; carving it from train", spec.name, split, spec.source)
        return None
    # GLUE and SuperGLUE hide their test labels as -1: such a split cannot score anything.
    values = raw[split].unique(spec.label_column) if spec.label_column in raw[split].column_names else []
    if values and all(isinstance(v, int) and v < 0 for v in values):
        log.info("%s: split %r of %s has no labels; carving it from train", spec.name, split, spec.source)
        return None
    return _clean(raw[split], spec, split, labels_by_text)


def _check_columns(split: datasets.Dataset, spec: DatasetSpec) -> None:
    columns = [spec.text_column, spec.label_column]
    columns += [spec.text_pair_column] if spec.text_pair_column else []
    columns += [spec.filter.column] if spec.filter else []
    for column in columns:
        if column not in split.column_names:
            raise _error(spec, f"no column {column!r} (available: {', '.join(split.column_names)})")


def _label_values(split: datasets.Dataset, spec: DatasetSpec) -> list[str]:
    """The distinct labels of a split as text, numbers in numeric order, then words in alphabetical order."""
    _check_columns(split, spec)
    texts = {_label_text(value) for value in split.unique(spec.label_column)} - {None}
    if len(texts) < 2:
        only = f"one label only ({texts.pop()})" if texts else "no labels"
        raise _error(spec, f"column {spec.label_column!r} holds {only}; a classifier needs two or more")

    def order(text: str) -> tuple:
        try:
            return (0, float(text), text)
        except ValueError:
            return (1, 0.0, text)

    return sorted(texts, key=order)


def _label_text(value) -> str | None:
    """A label as text (`3` for 3 or 3.0); None for a missing or blank one."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = None if value is None else str(value).strip()
    return text or None


def _clean(split: datasets.Dataset, spec: DatasetSpec, split_name: str, labels_by_text: bool) -> datasets.Dataset:
    """Filter, select and rename columns, map labels to indices, drop rows without text."""
    _check_columns(split, spec)
    if spec.filter:
        split = _keep_matching(split, spec)

    renames = {spec.text_column: "text"}
    if spec.text_pair_column:
        renames[spec.text_pair_column] = "text_pair"
    renames[spec.label_column] = "label"
    split = split.select_columns(list(renames)).rename_columns({k: v for k, v in renames.items() if k != v})

    split = _to_class_indices(split, spec, labels_by_text)
    has_pair = spec.text_pair_column is not None

    def usable(batch):
        keep = [label >= 0 and _nonempty(text) for label, text in zip(batch["label"], batch["text"])]
        if has_pair:
            keep = [k and _nonempty(pair) for k, pair in zip(keep, batch["text_pair"])]
        return keep

    split = split.filter(usable, batched=True)
    if len(split) == 0:
        raise _error(spec, f"split {split_name!r} has no rows with both text and a listed label")
    return split


def _keep_matching(split: datasets.Dataset, spec: DatasetSpec) -> datasets.Dataset:
    column, keywords = spec.filter.column, [k.lower() for k in spec.filter.keywords]
    if not keywords:
        raise _error(spec, f"filter on column {column!r} lists no keywords")

    def matches(batch):
        return [value is not None and any(k in str(value).lower() for k in keywords) for value in batch[column]]

    kept = split.filter(matches, batched=True)
    if len(kept) == 0:
        raise _error(spec, f"no rows left after filtering column {column!r} for {spec.filter.keywords}")
    return kept


def _to_class_indices(split: datasets.Dataset, spec: DatasetSpec, labels_by_text: bool) -> datasets.Dataset:
    """String labels are looked up in label_names; integer labels already are class indices, unless
    the names came from the data (`labels_by_text`), where every label is looked up as text and rows
    without a label are dropped.

    Unlisted labels become -1 (dropped later) when the recipe allows it, else they are an error.
    """
    names = spec.label_names
    index = {name: i for i, name in enumerate(names)}

    def class_index(value) -> int:
        if isinstance(value, str) or labels_by_text:
            return index.get(_label_text(value), -1)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value if isinstance(value, int) and 0 <= value < len(names) else -1

    # Unique values first: cheap in Arrow, and it names the offending labels in the error.
    mapping = {value: class_index(value) for value in split.unique("label")}
    unlisted = [value for value, i in mapping.items() if i < 0 and not (labels_by_text and _label_text(value) is None)]
    if unlisted and not spec.drop_unlisted_labels:
        shown = ", ".join(repr(v) for v in unlisted[:5]) + (", ..." if len(unlisted) > 5 else "")
        raise _error(
            spec,
            f"column {spec.label_column!r} has labels not in label_names {names}: {shown} "
            f"(set drop_unlisted_labels: true to drop those rows)",
        )
    features = split.features.copy()
    features["label"] = datasets.ClassLabel(names=names)  # the names travel with the rows
    return split.map(
        lambda batch: {"label": [mapping.get(v, -1) for v in batch["label"]]},
        batched=True,
        features=features,
    )


def _nonempty(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _carve(
    train: datasets.Dataset, dev: datasets.Dataset | None, test: datasets.Dataset | None, spec: DatasetSpec
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """Take the missing dev/test splits from a seeded shuffle of train.

    Test comes first in the shuffled order, so the test set depends only on the data and the
    seed, not on the dev fraction or on any cap.
    """
    if dev is not None and test is not None:
        return train, dev, test
    dev_fraction, test_fraction = spec.split_fractions
    if not (0 < dev_fraction < 1 and 0 < test_fraction < 1 and dev_fraction + test_fraction < 1):
        fractions = list(spec.split_fractions)
        raise _error(spec, f"split_fractions {fractions} must be two fractions in (0, 1) summing to less than 1")
    shuffled = train.shuffle(seed=spec.split_seed, keep_in_memory=True)
    n = len(shuffled)
    n_test = max(1, round(n * test_fraction)) if test is None else 0
    n_dev = max(1, round(n * dev_fraction)) if dev is None else 0
    if n_test + n_dev >= n:
        raise _error(spec, f"only {n} usable rows: too few to carve out dev and test splits")
    if test is None:
        test = shuffled.select(range(n_test))
    if dev is None:
        dev = shuffled.select(range(n_test, n_test + n_dev))
    return shuffled.select(range(n_test + n_dev, n)), dev, test


def _cap(split: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or len(split) <= limit:
        return split
    return split.shuffle(seed=seed, keep_in_memory=True).select(range(limit))


def _check_labels(splits: datasets.DatasetDict, spec: DatasetSpec) -> None:
    names = spec.label_names
    seen = set(splits["train"].unique("label"))
    if len(seen) < 2:
        only = ", ".join(names[i] for i in seen) or "none"
        column = spec.label_column
        raise _error(spec, f"train has a single label ({only}) in column {column!r}; a classifier needs two or more")
    for split_name in ("dev", "test"):
        unseen = sorted(set(splits[split_name].unique("label")) - seen)
        if unseen:
            labels = ", ".join(names[i] for i in unseen)
            column = spec.label_column
            raise _error(spec, f"{split_name} has label(s) {labels} in column {column!r} that train never shows")
