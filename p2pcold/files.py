"""Checks of the files p2pcold reads, at the boundary: one line naming a damaged file and what to do.

Only the standard library: the CLI runs them before torch is imported, so a damaged model or
checkpoint is reported in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from p2pcold.utils import P2PColdError

HEADS_FILE = "heads.safetensors"  # a run's per-dataset task heads, next to the body's weights
# p2pcold writes only safetensors; these are checked before use.
WEIGHT_FILES = ("model.safetensors", HEADS_FILE)


def check_safetensors(file: str | Path) -> None:
    """A safetensors file whose header parses and whose size matches it: not truncated, not random bytes.

    Reads only the header, so a multi-GB checkpoint is checked in microseconds."""
    file = Path(file)
    damaged = f"{file}: damaged weights file"
    try:
        with open(file, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 2 <= header_size <= min(100_000_000, file.stat().st_size - 8):
                raise P2PColdError(f"{damaged} (truncated or not safetensors)")
            header = json.loads(f.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise P2PColdError(f"{damaged} (its header is not safetensors)") from None
    except OSError as e:
        raise P2PColdError(f"{file}: cannot read ({e.strerror})") from None
    try:
        entries = [entry for name, entry in header.items() if name != "__metadata__"]
        end = max((int(entry["data_offsets"][1]) for entry in entries), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # valid JSON, but not a safetensors header
        raise P2PColdError(f"{damaged} (its header is not safetensors)") from None
    expected = 8 + header_size + end
    if file.stat().st_size != expected:
        raise P2PColdError(f"{damaged} ({file.stat().st_size} bytes where its header promises {expected}: truncated?)")


def check_model_folder(folder: str | Path) -> None:
    """Its config.json and weight files are intact (raises a one-line P2PColdError naming the file)."""
    folder = Path(folder)
    try:
        json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise P2PColdError(f"{folder}: not a Hugging Face model folder (no config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise P2PColdError(f"{folder / 'config.json'}: damaged (not JSON); replace the folder with an intact copy") from None
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            check_safetensors(folder / name)
