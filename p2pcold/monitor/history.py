"""What the monitor remembers of a swarm: every peer it has seen (not only while its progress record
lives), each peer's metrics over time, and what each iteration boundary produced.

Pure bookkeeping: `observe` takes progress records (anything with PeerProgress's fields), `view` returns
the JSON the web page and the API serve."""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from statistics import mean
from typing import Iterable, Sequence

from p2pcold.results import EvalResult, fusion_record

MAX_POINTS_PER_PEER = 5000  # a long run keeps its newest points; the page stays small
METRICS = ("train_loss", "dev_accuracy", "examples_per_second")


def _point(record: dict, observed_at: float) -> dict:
    return {"time": observed_at, "iteration": record["iteration"], "phase": record["phase"], **{m: record[m] for m in METRICS}}


def _changed(previous: dict | None, point: dict) -> bool:
    return previous is None or any(previous[k] != point[k] for k in ("iteration", "phase", *METRICS))


class SwarmHistory:
    """Thread-safe: the monitor's loop observes, the web server's threads read `view()`."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._lock = threading.Lock()
        self._latest: dict[str, dict] = {}  # peer id -> newest record (with first_seen)
        self._series: dict[str, list[dict]] = defaultdict(list)  # peer id -> points, one per change
        self._boundaries: dict[int, dict[str, dict]] = defaultdict(dict)  # iteration produced -> dataset -> fusion
        self._results: list[dict] = []
        self._evaluating: int | None = None

    def observe(self, records: Iterable, observed_at: float) -> list[tuple[dict, dict | None]]:
        """Take in a swarm snapshot; return (record, its new boundary entry or None) for each peer whose
        record changed, so that callers can log what is new exactly once."""
        changed = []
        with self._lock:
            for progress in records:
                record = dataclasses.asdict(progress) if dataclasses.is_dataclass(progress) else dict(progress)
                peer = record["peer_id"]
                previous = self._latest.get(peer)
                if previous is not None and record["last_seen"] <= previous["last_seen"]:
                    continue  # the same publication (or an older copy of it)
                record["first_seen"] = previous["first_seen"] if previous else observed_at
                self._latest[peer] = record
                point = _point(record, observed_at)
                series = self._series[peer]
                if not _changed(series[-1] if series else None, point):
                    continue
                series.append(point)
                del series[:-MAX_POINTS_PER_PEER]
                changed.append((record, self._note_boundary(record, observed_at)))
        return changed

    def _note_boundary(self, record: dict, observed_at: float) -> dict | None:
        if not record.get("last_fusion") or record["iteration"] == 0:
            return None
        boundary = self._boundaries[record["iteration"]]
        if record["dataset"] in boundary:
            return None
        entry = {
            "peer_id": record["peer_id"],
            "status": record["last_fusion"],
            "members": list(record.get("last_group") or []),
            "group_size": record.get("last_group_size"),
            "attempts": record.get("fusion_attempts", 0),
            "error": record.get("fusion_error"),
            "seconds": record.get("fusion_seconds"),
            "seen_at": observed_at,
        }
        boundary[record["dataset"]] = entry
        return entry

    def set_results(self, results: Sequence[EvalResult]) -> None:
        with self._lock:
            self._results = [dataclasses.asdict(r) for r in results]
            self._evaluating = None

    def set_evaluating(self, iteration: int | None) -> None:
        with self._lock:
            self._evaluating = iteration

    def fusion_of(self, iteration: int) -> dict | None:
        """What the boundary that produced θ_iteration did, as the first peer seen after it reported it."""
        with self._lock:
            entries = list(self._boundaries.get(iteration, {}).values())
        if not entries:
            return None
        first = min(entries, key=lambda e: e["seen_at"])
        return fusion_record(first["status"], first["members"], first["attempts"], first["error"])

    def contributors(self) -> list[str]:
        with self._lock:
            return sorted({r["dataset"] for r in self._latest.values()})

    def view(self, now: float, live_ids: set[str]) -> dict:
        """The page's data. `live_ids`: the peers whose progress records are still live."""
        with self._lock:
            peers = [{**r, "live": r["peer_id"] in live_ids} for r in sorted(self._latest.values(), key=lambda r: (r["dataset"], r["peer_id"]))]
            return {
                "run_id": self.run_id,
                "now": now,
                "peers": peers,
                "series": {r["dataset"]: list(self._series[r["peer_id"]]) for r in peers},
                "boundaries": [
                    {"iteration": it, "peers": dict(sorted(by_dataset.items()))} for it, by_dataset in sorted(self._boundaries.items())
                ],
                "accuracy": accuracy_curves(self._results),
                "evaluating": self._evaluating,
            }


def accuracy_curves(rows: Sequence[dict]) -> dict:
    """{mode: {"points": [[iteration, mean accuracy], ...], "pretrained": θ0's mean or None}} over all targets."""
    by_mode: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_mode[row["mode"]][row["iteration"]].append(row["accuracy"])
    curves = {}
    for mode, by_iteration in sorted(by_mode.items()):
        points = [[it, mean(values)] for it, values in sorted(by_iteration.items())]
        curves[mode] = {"points": points, "pretrained": mean(by_iteration[0]) if 0 in by_iteration else None}
    return curves
