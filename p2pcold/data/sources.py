"""Reading a recipe's `source`: a local file, a file inside an installed package, or a hub dataset.

Whatever the source, the result is a dict of raw `datasets.Dataset`s keyed by split name; a file
is a single split. Library exceptions become one-line P2PColdErrors naming the file.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import datasets
import pandas as pd

from p2pcold.config import COMPRESSIONS, DATA_FORMATS, file_format
from p2pcold.utils import P2PColdError, get_logger

log = get_logger("data")

PKG_PREFIX = "pkg://"


def read_source(
    source: str, hub_config: str | None, encoding: str | None, train_split: str
) -> dict[str, datasets.Dataset]:
    """Raw splits of `source`. A file has no splits of its own: all its rows are `train_split`."""
    if source.startswith(PKG_PREFIX):
        return {train_split: read_file(package_file(source), encoding)}
    if is_local(source):
        return {train_split: read_file(Path(source).expanduser(), encoding)}
    return dict(load_hub(source, hub_config))


def is_local(source: str) -> bool:
    """A path, as opposed to a hub id such as `nyu-mll/glue` (which also contains a slash)."""
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", "./", "../", "~"))
        or file_format(Path(source)) is not None
    )


def package_file(source: str) -> Path:
    """Resolve `pkg://package/relative/path` without importing the package (only its location is needed)."""
    package, _, relative = source[len(PKG_PREFIX) :].partition("/")
    if not package or not relative:
        raise P2PColdError(f"{source}: expected pkg://PACKAGE/RELATIVE/PATH")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise P2PColdError(f"{source}: package {package!r} is not installed")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise P2PColdError(f"{source}: file not found (looked in {', '.join(spec.submodule_search_locations)})")


def read_file(path: Path, encoding: str | None) -> datasets.Dataset:
    if not path.is_file():
        raise P2PColdError(f"{path}: file not found")
    fmt = file_format(path)
    if fmt is None:
        supported, compressions = ", ".join(DATA_FORMATS), ", ".join(COMPRESSIONS)
        raise P2PColdError(f"{path}: unsupported file format (use {supported}; text formats may end in {compressions})")
    if path.stat().st_size == 0:
        raise P2PColdError(f"{path}: the file is empty")
    if encoding is None and fmt != ".parquet" and _looks_binary(path):
        raise P2PColdError(f"{path}: a binary file, not {fmt[1:]} text; point `source` at the data file itself")
    try:
        frame = _READERS[fmt](path, encoding)
        if frame.empty:
            header = f" (only a header: {', '.join(map(str, frame.columns))})" if len(frame.columns) else ""
            raise P2PColdError(f"{path}: holds no rows{header}")
        # Mixed-type columns (numbers and strings) cannot become Arrow columns; as strings they can.
        for column in frame.columns[frame.dtypes == object]:
            frame[column] = frame[column].astype("string")
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    except P2PColdError:
        raise
    except UnicodeDecodeError as e:
        expected = encoding or "utf-8"
        raise P2PColdError(f"{path}: not valid {expected} text ({e.reason}); set `encoding` (e.g. latin-1)") from None
    except Exception as e:  # pandas, pyarrow and the codecs each raise their own types; all mean "unreadable"
        raise P2PColdError(f"{path}: cannot read as {fmt[1:]}: {_first_line(e)}") from None


def _looks_binary(path: Path) -> bool:
    """NUL bytes near the start: no text file in an 8-bit or UTF-8 encoding has them (compressed
    files are left to their decompressor, which reports damage itself)."""
    if path.suffix.lower() in COMPRESSIONS:
        return False
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _read_csv(path: Path, encoding: str | None) -> pd.DataFrame:
    # keep_default_na=False: tweets and reviews that read "NA" or "null" stay text.
    return pd.read_csv(path, encoding=encoding, keep_default_na=False)


def _read_tsv(path: Path, encoding: str | None) -> pd.DataFrame:
    # NLP TSVs (GLUE and the like) do not quote fields; a stray quote would otherwise swallow lines.
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding=encoding, keep_default_na=False)


def _read_json(path: Path, encoding: str | None) -> pd.DataFrame:
    try:
        return pd.read_json(path, encoding=encoding, dtype=False)
    except ValueError:
        # Many `.json` data files are really JSON lines, one record per line.
        return _read_jsonl(path, encoding)


def _read_jsonl(path: Path, encoding: str | None) -> pd.DataFrame:
    return pd.read_json(path, lines=True, encoding=encoding, dtype=False)


def _read_parquet(path: Path, encoding: str | None) -> pd.DataFrame:
    return pd.read_parquet(path)


_READERS = {".csv": _read_csv, ".tsv": _read_tsv, ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def load_hub(source: str, hub_config: str | None) -> datasets.DatasetDict:
    name = f"{source}/{hub_config}" if hub_config else source
    unreachable = P2PColdError(
        f"{name}: the Hugging Face hub cannot be reached (offline); "
        f"download the data where there is a network and set `source` to the local file path"
    )
    # `datasets` reads the offline variables once, at import. Set later, they would not stop it
    # from spending a minute on network retries, so honour them here.
    if _offline_requested() and not datasets.config.HF_HUB_OFFLINE:
        raise unreachable
    try:
        return _load_dataset(source, hub_config)
    except ConnectionError:  # also what `datasets` raises in offline mode for data it has not cached
        raise unreachable from None
    except Exception as e:  # DatasetNotFoundError, a bad config name...
        raise P2PColdError(f"{name}: cannot load from the Hugging Face hub: {_first_line(e)}") from None


def _load_dataset(source: str, hub_config: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(source, hub_config)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
    # Older hub datasets (trec, financial_phrasebank...) are a loading script, which `datasets`
    # no longer runs; the hub keeps a parquet export of every public dataset on this branch.
    log.info("%s is a loading script; reading the hub's parquet export instead", source)
    return datasets.load_dataset(source, hub_config, revision="refs/convert/parquet")


def _offline_requested() -> bool:
    variables = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE") for var in variables)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
