"""Toy datasets for the data-layer tests: rows, files in every supported format, specs.

A plain module (not conftest) so that tests can import the helpers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from p2pcold.config import DatasetSpec


def toy_rows(n: int = 60) -> list[dict]:
    """Distinct texts (so splits can be checked for overlap), alternating string labels."""
    return [{"text": f"review {i} was {['bad', 'good'][i % 2]}", "label": ["neg", "pos"][i % 2]} for i in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format its name asks for; pandas compresses by extension."""
    frame = pd.DataFrame(rows)
    name = path.name
    if ".tsv" in name:
        frame.to_csv(path, sep="\t", index=False)
    elif ".csv" in name:
        frame.to_csv(path, index=False)
    elif ".jsonl" in name:
        frame.to_json(path, orient="records", lines=True)
    elif ".json" in name:
        frame.to_json(path, orient="records")
    elif ".parquet" in name:
        frame.to_parquet(path, index=False)
    else:
        raise ValueError(name)
    return path


def toy_spec(source: Path | str, **fields) -> DatasetSpec:
    fields.setdefault("label_names", ["neg", "pos"])
    return DatasetSpec(name="toy", source=str(source), **fields)
