"""Small helpers every layer may use: errors, process set-up, seeding, hashing, atomic files, logging.

Nothing here imports the rest of p2pcold, torch models or hivemind; torch itself is imported only
where a tensor is hashed, so that the config layer (and its errors) load in a fraction of a second.
Nothing here changes global state at import: an entry point calls `setup_process()` (and
`raise_on_sigterm()` where it must clean up).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    import torch


class P2PColdError(Exception):
    """Bad input or environment. The CLI prints the message as one line and exits with code 2."""


EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, the shell's code for "stopped by SIGTERM"

RECIPES_ENV = "P2PCOLD_RECIPES"  # a folder of the user's own recipes (and presets in runs/)


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that `finally` blocks stop daemons, threads and child processes.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (a fusion attempt
    that treats errors as a failed round and retries, a best-effort download) can swallow it."""


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in this process's main thread.

    Forked helpers (hivemind's DHT and averager processes) restore the default action themselves
    (`p2pcold.swarm._procs.reset_signal_handlers`)."""

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


class StopSignal:
    """SIGINT and SIGTERM, recorded instead of raised, for loops that only wait between bounded calls
    into hivemind: an exception raised at an arbitrary point inside hivemind's futures or pipes can
    leave a lock held, and the process then hangs in its own shutdown. `raise_if_set` turns the
    signal into KeyboardInterrupt or `Terminated` at a point of the caller's choosing."""

    def __init__(self):
        self.signum: int | None = None
        self._event = threading.Event()

    def _record(self, signum, frame) -> None:
        self.signum = signum
        self._event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        previous = {sig: signal.signal(sig, self._record) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` or until a signal arrives; True once one did."""
        return self._event.wait(seconds)

    def raise_if_set(self) -> None:
        if self.signum == signal.SIGTERM:
            raise Terminated()
        if self.signum is not None:
            raise KeyboardInterrupt()


def packaged_recipes_dir() -> Path:
    """The dataset recipes that ship inside the package (`p2pcold/recipes/`; run presets in `runs/`),
    found as package data, so that a wheel installed anywhere has them."""
    # pip installs a wheel unpacked, so the package data is a real folder (a Path), not a zip member.
    return Path(str(importlib.resources.files("p2pcold") / "recipes"))


def recipe_dirs() -> list[Path]:
    """Where recipes (and, in `runs/`, presets) named without a path are looked up, the first that
    holds a name winning: $P2PCOLD_RECIPES, which adds to or overrides the packaged ones, then the
    package's own. Read at each call, not at import, so that a variable set later is obeyed."""
    own = os.environ.get(RECIPES_ENV)
    return [Path(own), packaged_recipes_dir()] if own else [packaged_recipes_dir()]


def setup_process(verbose: bool = False) -> None:
    """What every p2pcold entry point sets up once, before any work: logging, and no progress bars
    from transformers and datasets (p2pcold draws its own; theirs, per weight load and per map, would
    interleave with it). Idempotent, and imports neither library: a command that fails on its input
    fails before loading them, and each reads these switches when it is first imported."""
    setup_logging(verbose)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"p2pcold.{name}" if not name.startswith("p2pcold") else name)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # hivemind installs its own handlers and is chatty at INFO.
    logging.getLogger("hivemind").setLevel(logging.DEBUG if verbose else logging.WARNING)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (run seed, iteration, dataset name...).

    Python's hash() is salted per process, so it cannot be used across peers.
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def state_dict_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order. Identical on every machine."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    A crash inside the block leaves `final` as it was (plus a `.tmp` folder that the next
    call removes), so a checkpoint folder is never seen half-written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise P2PColdError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P2PColdError(f"{path}: damaged, not valid JSON ({e})") from None
