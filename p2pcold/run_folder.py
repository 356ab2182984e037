"""Output folders, checked before any work starts: can they be written, and whose run do they hold?

A run folder is recognised by its `config.yaml`, not by the path it was given by: the same folder
reached through an absolute path, a relative one or a symlink is the same run. Nothing here writes
until the caller has started successfully (`write_run_config`), so a failed start leaves the folder
as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from p2pcold.config import RunConfig, to_dict
from p2pcold.utils import P2PColdError, atomic_write_bytes

CONFIG_FILE = "config.yaml"
# The folder's path is not part of the run: the same run may be reached by several paths.
NOT_PART_OF_THE_RUN = ("output_dir",)


def check_output_dir(path: str | os.PathLike) -> Path:
    """`path` is, or can become, a folder this process can write; nothing is created or changed."""
    path = Path(path).expanduser()
    existing = Path(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == Path(os.path.abspath(path)) else f"lies under {existing}, which is a file"
        raise P2PColdError(f"{path}: cannot be an output folder: it {where}; choose another folder")
    try:  # the only reliable test (root passes os.access everywhere; /proc refuses new entries)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".p2pcold-write-test-"))
    except OSError as e:
        raise P2PColdError(f"{path}: cannot write in {existing} ({e.strerror}); choose another folder") from None
    return path


def check_run_folder(path: str | os.PathLike, config: RunConfig) -> Path:
    """A writable folder that is empty of runs or holds this same run (resumable); else one line
    naming the fields that differ."""
    path = check_output_dir(path)
    saved = read_run_config(path)
    if saved is None:
        return path
    current = _flatten(to_dict(config))
    # a field added to p2pcold after the folder's run started holds its default there
    saved = {**{k: v for k, v in _flatten(to_dict(RunConfig())).items() if k not in saved}, **saved}
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k) and k.split(".")[0] not in NOT_PART_OF_THE_RUN)
    if differing:
        shown = ", ".join(f"{k} ({saved.get(k)!r} there, {current.get(k)!r} now)" for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise P2PColdError(f"{path} holds a run with a different config: {shown}{more}; choose another output_dir")
    return path


def read_run_config(path: Path) -> dict | None:
    """The flattened config a run folder was started with; None for a folder without one."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise P2PColdError(f"{file}: damaged; restore it, or move the folder away to start afresh")
    return _flatten(data)


def write_run_config(path: str | os.PathLike, config: RunConfig) -> None:
    """Record the run's config in its folder, once the run has started."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        atomic_write_bytes(file, yaml.safe_dump(to_dict(config), sort_keys=True).encode())


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
