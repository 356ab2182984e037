"""Utilisation: how much of each peer's wall time goes to finetuning, when one peer is 2x slower.

Four real `p2pcold.peer.Peer` processes (benchmarks/utilisation_peer.py: the real class with timers)
finetune MiniLM on loopback, torch on one thread each (4 peers share the 2 cores), one dataset each
(rotten_tomatoes recipes with different split seeds; dev sets capped at 64 examples so that the
per-iteration evaluation stays small). Peer 3 runs at half speed. The same processes run:

* (a) fixed work, the paper's setting: `Budget(steps=N)`, uniform average. Fast peers finish early
  and wait at the boundary for the slow one (`min_group_size` = 4: the group waits for everyone).
* (b) time-budgeted iterations: `Budget(seconds=T)` at two lengths, average weighted by examples
  seen, so the slow peer trains as long as the others and counts half as much; each length once with
  the boundary's work in line (`swarm.overlap_boundary: false`, the order before issue 14) and once
  overlapped (the default: dev evaluation during the all-reduce, checkpoint during the next training).

Per peer and iteration the phases are: training (finetune()'s own loop time), evaluation and copies
(the rest of the contributor's call), waiting (from its arrival at the boundary until the last peer's
arrival), averaging (from the last arrival until its fuse() returned), checkpointing, and other (DHT
progress reads, serving the new base). Averaging is split further: deciding (until the peer's records
show everyone there and it calls fuse()), matchmaking (until its group's all-reduce began), the
all-reduce (until this member's reduce ended), verdicts (until every member's verdict was read) and
copies (until fuse() returned). All timestamps are wall clock on one machine. Iterations of minutes
cannot be run here, so (b) is measured at short lengths and extrapolated with the model:
utilisation(T) = T / (T + O), O = the measured per-iteration overhead, which does not grow with T for
a time budget (checked by measuring two lengths).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import Worker, close_all, gather, log, median
from p2pcold.utils import packaged_recipes_dir

MODULE = "benchmarks.utilisation_peer"
PEERS = 4
SLOW_RANK = 3
SWARM = dict(
    min_group_size=PEERS,  # wait for all 4 (the paper's synchronous round); the group assembles once they are in
    next_chunk_timeout=30.0,  # generous: 4 peers and other work share 2 cores
    allreduce_timeout=120.0,
    boundary_deadline=120.0,
    dht_startup_timeout=120.0,
    bootstrap_timeout=60.0,
    join_timeout=60.0,
    local_rpc_timeout=60.0,
    state_download_timeout=90.0,
    shutdown_timeout=5.0,
)


def schedule(quick: bool) -> list[dict]:
    """Iteration 0 (fixed work) also opens the connections; (a) is summarised from the last one. The
    in-line iterations come first: an overlapped iteration's checkpoint is written during the next one."""
    fixed = {"budget": {"steps": 3 if quick else 4}, "weighting": "uniform", "mode": "a", "overlap": False}
    lengths = (8.0,) if quick else (10.0, 20.0)
    timed = [{"budget": {"seconds": s}, "weighting": "examples", "mode": "b", "overlap": o} for o in (False, True) for s in lengths]
    return [fixed, *timed, fixed]


def _recipes(folder: Path) -> list[str]:
    base = yaml.safe_load((packaged_recipes_dir() / "rotten_tomatoes.yaml").read_text())
    paths = []
    for i in range(PEERS):
        recipe = {**base, "split_seed": i, "max_eval_examples": 64}
        path = folder / f"rt_{i}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        paths.append(str(path))
    return paths


def run(quick: bool = False) -> dict:
    plan = schedule(quick)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pcold-util-") as tmp:
        folder = Path(tmp)
        datasets = _recipes(folder)
        common = dict(datasets=datasets, schedule=plan, run_id=f"util-{int(time.time())}", swarm=SWARM)
        options = [
            {**common, "dataset": datasets[r], "run_dir": str(folder / f"peer{r}"), "slow": r == SLOW_RANK}
            for r in range(PEERS)
        ]
        log(f"utilisation: starting {PEERS} peers (peer {SLOW_RANK} at half speed)")
        ws: list[Worker] = []
        try:
            ws.append(Worker(MODULE, {**options[0], "initial_peers": []}, "util/peer0"))
            first = ws[0].receive(timeout=300)
            ws += [Worker(MODULE, {**o, "initial_peers": first["maddrs"]}, f"util/peer{r}") for r, o in enumerate(options) if r]
            for w in ws[1:]:
                w.receive(timeout=300)
            setup_s = time.perf_counter() - started
            log(f"utilisation: peers up in {setup_s:.0f} s; training {len(plan)} iterations")
            budget = sum(p["budget"].get("seconds", 60.0) * 2 + 150 for p in plan)  # bounded, generous
            results = gather(ws, {"cmd": "train", "start_at": time.time() + 2.0}, timeout=budget)
            memory = gather(ws, {"cmd": "memory"}, timeout=60)
        finally:
            close_all(ws)
    out = analyse(plan, [r["records"] for r in results])
    out["setup_s"] = round(setup_s, 1)
    out["total_s"] = round(time.perf_counter() - started, 1)
    out["peak_rss_mib"] = [round(m["peak_rss_mib"]) for m in memory]
    out["tree_pss_mib"] = [round(m["tree_pss_mib"]) for m in memory]
    out["slow_rank"] = SLOW_RANK
    out["swarm"] = SWARM
    log(f"utilisation: done in {out['total_s']:.0f} s")
    return out


def analyse(plan: list[dict], records: list[list[dict]]) -> dict:
    iterations = []
    for i, step in enumerate(plan):
        rows = [peer_records[i] for peer_records in records]
        last_arrival = max(r["arrive"] for r in rows)
        peers = []
        for rank, r in enumerate(rows):
            total = r["end"] - r["start"]
            phases = {
                "train": r["train_s"],
                "eval_copy": r["finetune_call_s"] - r["train_s"] + r.get("dev_wait_s", 0.0),
                "wait": last_arrival - r["arrive"],
                "averaging": r["fused"] - last_arrival,
                "checkpoint": r.get("checkpoint_s", 0.0),
            }
            phases["other"] = total - sum(phases.values())
            averaging = averaging_split(r, last_arrival)
            peers.append(
                {
                    "rank": rank,
                    "slow": rank == SLOW_RANK,
                    "total_s": total,
                    "seconds": phases,
                    "averaging_s": averaging,
                    "fraction": {k: v / total for k, v in phases.items()},
                    "examples": r["examples"],
                    "steps": r["steps"],
                    "group_size": r["group_size"],
                    "status": r["status"],
                }
            )
        iterations.append(
            {"iteration": i, "mode": step["mode"], "budget": step["budget"], "weighting": step["weighting"], "overlap": step["overlap"], "peers": peers}
        )

    def summary(its: list[dict]) -> dict:
        fast = [p for it in its for p in it["peers"] if not p["slow"]]
        slow = [p for it in its for p in it["peers"] if p["slow"]]
        every = fast + slow
        splits = [p["averaging_s"] for p in every if p["averaging_s"]]

        def frac(group, key):
            return median(p["fraction"][key] for p in group)

        return {
            "train_fraction_fast": frac(fast, "train"),
            "train_fraction_slow": frac(slow, "train"),
            "train_fraction_all": median(p["fraction"]["train"] for p in every),
            "wait_fraction_fast": frac(fast, "wait"),
            "wait_fraction_slow": frac(slow, "wait"),
            "averaging_fraction": frac(every, "averaging"),
            "eval_copy_fraction": frac(every, "eval_copy"),
            "checkpoint_fraction": frac(every, "checkpoint"),
            "other_fraction": frac(every, "other"),
            "iteration_s": median(p["total_s"] for p in every),
            "train_s_fast": median(p["seconds"]["train"] for p in fast),
            "train_s_slow": median(p["seconds"]["train"] for p in slow),
            # everything but training, per iteration: what the extrapolation treats as fixed
            "overhead_s": median(p["total_s"] - p["seconds"]["train"] for p in every),
            "overhead_s_excluding_wait": median(p["total_s"] - p["seconds"]["train"] - p["seconds"]["wait"] for p in every),
            # the boundary alone: all but the finetune() call (training + its dev evaluation + copies)
            "boundary_overhead_s": median(p["total_s"] - p["seconds"]["train"] - p["seconds"]["eval_copy"] for p in every),
            "examples_fast": median(p["examples"] for p in fast),
            "examples_slow": median(p["examples"] for p in slow),
            "group_sizes": sorted({p["group_size"] for p in every}),
            "averaging_split_s": {part: median(s[part] for s in splits) for part in AVERAGING_PARTS} if splits else {},
        }

    fixed = [it for it in iterations if it["mode"] == "a"]
    timed = [it for it in iterations if it["mode"] == "b"]
    out = {
        "iterations": iterations,
        # iteration 0 also opens the connections between the peers: (a) is summarised without it
        "fixed_work": summary(fixed[1:] or fixed),
        "time_budget": {str(it["budget"]["seconds"]): summary([it]) for it in timed if not it["overlap"]},
        "time_budget_overlapped": {str(it["budget"]["seconds"]): summary([it]) for it in timed if it["overlap"]},
        "target_fraction": 0.97,
        "target_iteration_s": 120.0,
    }
    out["model"] = extrapolate(out)
    return out


AVERAGING_PARTS = ("deciding", "matchmaking", "all-reduce", "verdicts", "copies")


def averaging_split(record: dict, last_arrival: float) -> dict:
    """One peer's averaging phase (last arrival -> fuse() returned) in AVERAGING_PARTS; {} without the
    times of the attempt that fused."""
    times = record.get("allreduce")
    if not times or "fuse_call" not in record:
        return {}
    marks = [last_arrival, max(last_arrival, record["fuse_call"]), times["began"], times["reduced"], times["agreed"], record["fused"]]
    return {part: end - start for part, start, end in zip(AVERAGING_PARTS, marks, marks[1:])}


def extrapolate(out: dict) -> dict:
    """utilisation(T) = T / (T + O) for time budgets, in line and overlapped; fast peers under fixed
    work: T / (2T + O)."""
    model = {}
    for key, label in (("time_budget", ""), ("time_budget_overlapped", "overlapped_")):
        timed = out[key]
        o = median(s["overhead_s"] for s in timed.values())
        model.update(
            {
                f"{label}overhead_s_by_length": {k: s["overhead_s"] for k, s in timed.items()},
                f"{label}overhead_s": o,
                f"{label}time_budget_at_120s": 120.0 / (120.0 + o),
                f"{label}time_budget_at_600s": 600.0 / (600.0 + o),
                f"{label}time_budget_length_for_97pct_s": 97.0 / 3.0 * o,  # T / (T + O) >= 0.97  <=>  T >= 32.3 O
            }
        )
    timed = out["time_budget"]
    o_b = median(s["boundary_overhead_s"] for s in timed.values())
    model["boundary_overhead_s"] = o_b
    model["finetune_call_at_120s"] = 120.0 / (120.0 + o_b)
    model["finetune_call_length_for_97pct_s"] = 97.0 / 3.0 * o_b
    overlapped = [s["averaging_split_s"] for s in out["time_budget_overlapped"].values() if s["averaging_split_s"]]
    if overlapped:  # the floor: what the all-reduce alone would leave at 2-minute iterations
        allreduce = median(s["all-reduce"] for s in overlapped)
        model["overlapped_allreduce_s"] = allreduce
        model["allreduce_alone_at_120s"] = 120.0 / (120.0 + allreduce)
    model["overhead_s_for_97pct_at_120s"] = 120.0 * 3.0 / 97.0
    f = out["fixed_work"]
    o_fixed = f["overhead_s_excluding_wait"]
    model["fixed_work_fast_at_120s"] = 120.0 / (2 * 120.0 + o_fixed)  # the slow peer takes 2 x 120 s
    model["fixed_work_slow_at_120s"] = 240.0 / (240.0 + o_fixed)
    model["target_met_at_120s"] = model["overlapped_time_budget_at_120s"] >= out["target_fraction"]
    return model


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))
