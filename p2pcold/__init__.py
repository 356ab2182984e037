"""p2pcold: CoLD Fusion (collaborative descent) as a peer-to-peer trainer over hivemind.

The public objects are importable from here (see docs/api.md); each is imported on first use, so
`import p2pcold` stays light (no torch, no hivemind) until one is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "RunConfig": "p2pcold.config",
    "FinetuneConfig": "p2pcold.config",
    "Budget": "p2pcold.config",
    "EvalConfig": "p2pcold.config",
    "SwarmConfig": "p2pcold.config",
    "SimulateConfig": "p2pcold.config",
    "DatasetSpec": "p2pcold.config",
    "load_config": "p2pcold.config",
    "load_dataset_spec": "p2pcold.config",
    "to_dict": "p2pcold.config",
    "P2PColdError": "p2pcold.utils",
    "LocalRun": "p2pcold.local_run",
    "Evaluator": "p2pcold.evaluate",
    "EvalResult": "p2pcold.results",
    "summary_table": "p2pcold.results",
    "DecentralizedPeer": "p2pcold.peer",
    "CentralizedPeer": "p2pcold.peer",
    "Repository": "p2pcold.repository",
    "Simulation": "p2pcold.simulate",
    "evaluate_and_record": "p2pcold.evaluate",
    "load_body": "p2pcold.model",
    "load_tokenizer": "p2pcold.model",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'p2pcold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
