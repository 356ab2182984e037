"""Fusion round: p2pcold's whole boundary step against bare hivemind and torch.distributed gloo.

For each body size and peer count, N peer processes (benchmarks/fusion_worker.py, one process group
each, torch on one thread) start a DHT on loopback and then run timed rounds, all peers starting
at the same wall-clock instant. Variants, interleaved (rotating order) in the same processes:

* `p2pcold-none`: `BodyAverager.fuse` (matchmaking with the iteration in the group key, all-reduce
  of body - θ0, partial-group checks, copy out) + `load_body_state` into the model: the whole
  boundary step of a p2pcold peer, exactly as `p2pcold.peer.Peer` calls it (reference=θ0).
* `bare`: `hivemind.averaging.DecentralizedAverager.step()` on the same tensors, same group size and
  timeouts, nothing around it (baseline a).
* `gloo`: `torch.distributed.all_reduce` of the same values as one flat fp32 buffer (baseline b).
* `p2pcold-fp16`, `p2pcold-8bit`: the boundary step with wire compression (MiniLM only); for these,
  rank 0 also measures the error the compression adds against the exact `p2pcold.fusion.aggregate`
  (the run's rule, which the reducers compute).

A round's time is the slowest peer's (the round is over when every peer holds the average). One
untimed warm-up round per variant opens the connections; the rest are timed.
"""

from __future__ import annotations

import time

from benchmarks.common import Worker, close_all, fmt, free_port, gather, log, median, spread

MODULE = "benchmarks.fusion_worker"
# Generous: with 8 peers plus other jobs on 2 cores, a peer can go tens of seconds without CPU time,
# and a reducer that times out turns the round into a (correctly) failed partial all-reduce.
TIMEOUTS = dict(matchmaking_time=5.0, request_timeout=3.0, allreduce_timeout=180.0, next_chunk_timeout=60.0, deadline=90.0)
DELTA_STD = 1e-3  # stand-in finetuning update per weight (AdamW at lr 5e-5 moves weights ~1e-3 per few hundred steps)
ROUND_TIMEOUT = TIMEOUTS["deadline"] + TIMEOUTS["allreduce_timeout"] + 60.0  # a round never blocks longer


def plan(quick: bool) -> list[dict]:
    """What to run: one set of peer processes per body size, and per group size the variants.

    RoBERTa-base size (~125M parameters, 0.5 GB) runs with 2 peers only: one peer process tree
    measured ~4-5 GB PSS here (the model, the θ0 reference, the shared-memory copies of two
    averagers, the all-reduce buffers in hivemind's averager process, the gloo buffer), so 4 peers
    would take ~18-21 GB of this shared 23 GB machine and 8 peers ~40 GB; and 4- or 8-peer rounds of
    0.5 GB on 2 cores would not fit the 15-minute budget. 4-1024 peers are modelled from the
    measured points instead (scaling.py). Compression is measured at 4 peers on MiniLM (the wire bytes and the error
    per value do not depend on the group size; the time does, modestly)."""
    full = ["p2pcold-none", "bare", "gloo", "p2pcold-fp16", "p2pcold-8bit"]
    basic = ["p2pcold-none", "bare", "gloo"]
    if quick:
        return [
            dict(size="minilm", groups=[dict(peers=2, repeats=1, variants=full), dict(peers=4, repeats=1, variants=basic)]),
            dict(size="roberta-base", groups=[dict(peers=2, repeats=1, variants=basic)]),
        ]
    return [
        dict(
            size="minilm",
            groups=[
                dict(peers=2, repeats=2, variants=basic),
                dict(peers=4, repeats=2, variants=full),
                dict(peers=8, repeats=2, variants=basic),
            ],
        ),
        dict(size="roberta-base", groups=[dict(peers=2, repeats=2, variants=basic)]),
    ]


def _start(size: str, world: int, tag: str) -> list[Worker]:
    options = dict(size=size, world=world, tag=tag, delta_std=DELTA_STD, timeouts=TIMEOUTS, body_in_model=size != "minilm")
    ws = [Worker(MODULE, {**options, "rank": 0, "initial_peers": []}, f"{size}/peer0")]
    try:
        first = ws[0].receive(timeout=240)
        ws += [Worker(MODULE, {**options, "rank": r, "initial_peers": first["maddrs"]}, f"{size}/peer{r}") for r in range(1, world)]
        for w in ws[1:]:
            w.receive(timeout=240)
    except BaseException:
        close_all(ws)
        raise
    ws[0].numel = first["numel"]
    return ws


def measure_size(size: str, groups: list[dict]) -> list[dict]:
    """For each group size, a fresh set of peer processes (as real peers: one averager per process).

    Fresh processes per group size, not one set re-used: after an averager was shut down, a new one
    on the same DHT in the same process intermittently found the DHT process failing every request
    (FileNotFoundError from multiprocessing's resource_sharer), which a real peer never does."""
    rows = []
    for g in groups:
        started = time.perf_counter()
        log(f"fusion {size} x{g['peers']}: starting {g['peers']} peer processes")
        try:
            ws = _start(size, g["peers"], f"{size}-{g['peers']}-{int(time.time())}")
        except Exception as e:
            log(f"fusion {size} x{g['peers']}: peers did not start: {e}")
            rows.append({"size": size, "peers": g["peers"], "error": f"{type(e).__name__}: {e}"})
            continue
        try:
            startup_s = time.perf_counter() - started
            gather(ws, {"cmd": "gloo", "port": free_port(), "groups": [g["peers"]]}, timeout=120)
            row = measure_group(ws, size, **g)
            row["startup_s"] = round(startup_s, 1)
        except Exception as e:  # one group failing must not lose the others
            log(f"fusion {size} x{g['peers']}: FAILED: {e}")
            row = {"size": size, "peers": g["peers"], "error": f"{type(e).__name__}: {e}"}
        finally:
            close_all(ws)
        rows.append(row)
        log(f"fusion {size} x{g['peers']}: {time.perf_counter() - started:.0f} s with start-up and shutdown")
    return rows


def measure_group(ws: list[Worker], size: str, peers: int, repeats: int, variants: list[str]) -> dict:
    started = time.perf_counter()
    gather(ws, {"cmd": "open", "variants": variants, "group": peers}, timeout=240)
    try:
        compressions = [v.split("-", 1)[1] for v in variants if v.startswith("p2pcold-")]
        wire = ws[0].call({"cmd": "wire", "compressions": compressions}, timeout=240)
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        warmup: dict[str, float] = {}
        failures: list[dict] = []
        for r in range(repeats + 1):  # r == 0: warm-up
            shift = r % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                start_at = time.time() + 0.5 + 0.1 * peers
                check = r == repeats and variant.startswith("p2pcold-") and size == "minilm"
                messages = [
                    {"cmd": "round", "variant": variant, "index": r, "start_at": start_at, "check": check and rank == 0}
                    for rank in range(peers)
                ]
                replies = gather(ws, messages, timeout=ROUND_TIMEOUT)  # a worker that does not answer aborts the group
                failed = [rep for rep in replies if not rep.get("ok")]
                sizes = {rep.get("group_size") for rep in replies if rep.get("ok")}
                if failed or sizes != {peers}:
                    # p2pcold refused a partial all-reduce, or a group was short: every peer has answered, so
                    # the processes are usable; record the round as failed and go on
                    reason = failed[0].get("reason") if failed else f"group sizes {sorted(sizes)}"
                    log(f"fusion {size} x{peers}: {variant} round {r} failed on {len(failed)} peer(s): {reason}")
                    failures.append({"variant": variant, "round": r, "peers_failed": len(failed), "reason": reason})
                    continue
                row = {
                    "max_s": max(rep["elapsed_s"] for rep in replies),
                    "median_s": median(rep["elapsed_s"] for rep in replies),
                    "max_late_s": max(rep["late_s"] for rep in replies),
                    "io_bytes_mean": median(rep["io_bytes"] for rep in replies) if replies[0]["io_bytes"] is not None else None,
                }
                for phase in ("write_s", "read_s", "lock_wait_s", "fuse_s", "load_s"):  # p2pcold variants: where its time goes
                    if phase in replies[0]:
                        row[phase] = median(rep[phase] for rep in replies)
                if check:
                    row["error"] = {k: replies[0][k] for k in ("max_abs_error", "mean_abs_error", "mean_abs_update")}
                if r == 0:
                    warmup[variant] = row["max_s"]
                else:
                    rounds[variant].append(row)
        memory = gather(ws, {"cmd": "memory"}, timeout=60)
    finally:
        gather(ws, {"cmd": "close", "variants": variants}, timeout=120)
    result = summarize(size, peers, repeats, variants, rounds, warmup, wire, memory)
    result["failed_rounds"] = failures
    result["total_s"] = round(time.perf_counter() - started, 1)
    t = result["time_s"]
    log(
        f"fusion {size} x{peers}: p2pcold {fmt(t.get('p2pcold-none'))} s, bare {fmt(t.get('bare'))} s, "
        f"gloo {fmt(t.get('gloo'))} s; ratio vs bare {fmt(result['ratio_vs_bare'])} ({result['total_s']} s)"
    )
    return result


def summarize(size, peers, repeats, variants, rounds, warmup, wire, memory) -> dict:
    per_vector = wire["bytes_per_vector"]
    times = {v: (median(r["max_s"] for r in rows) if rows else None) for v, rows in rounds.items()}

    def paired_ratio(a: str, b: str) -> float | None:
        """Median of per-repeat ratios (a failed round drops its pair)."""
        if a not in rounds or b not in rounds:
            return None
        pairs = [(x["max_s"], y["max_s"]) for x, y in zip(rounds[a], rounds[b])] if len(rounds[a]) == len(rounds[b]) else []
        if not pairs:  # rounds lost on one side: compare medians instead
            return times[a] / times[b] if times.get(a) and times.get(b) else None
        return median(x / y for x, y in pairs)

    compression = {}
    for variant in variants:
        if not variant.startswith("p2pcold-"):
            continue
        name = variant.split("-", 1)[1]
        compression[name] = {
            "time_s": times[variant],
            "ratio_vs_none": paired_ratio(variant, "p2pcold-none"),
            "bytes_per_vector": per_vector[name],
            # butterfly all-reduce: a peer sends (n-1)/n of its vector to the other reducers and
            # returns its reduced 1/n to n-1 peers; it receives the same amount
            "sent_bytes_per_peer": 2 * (peers - 1) / peers * per_vector[name],
            "measured_io_bytes_per_peer": median(r["io_bytes_mean"] for r in rounds[variant]) if rounds[variant] else None,
            **next((r["error"] for r in reversed(rounds[variant]) if "error" in r), {}),
        }
    return {
        "size": size,
        "peers": peers,
        "params": wire["numel"],
        "fp32_bytes": 4 * wire["numel"],
        "repeats": repeats,
        "time_s": times,
        "time_range_s": {v: spread(r["max_s"] for r in rows) for v, rows in rounds.items() if rows},
        "warmup_s": warmup,
        # p2pcold-none, median over rounds of the per-round median over peers: its own copies
        "phases_s": {
            phase: median(r.get(phase) for r in rounds.get("p2pcold-none", []))
            for phase in ("write_s", "read_s", "lock_wait_s", "fuse_s", "load_s")
        },
        "ratio_vs_bare": paired_ratio("p2pcold-none", "bare"),
        "ratio_vs_gloo": paired_ratio("p2pcold-none", "gloo"),
        "bare_vs_gloo": paired_ratio("bare", "gloo"),
        "compression": compression,
        "peak_rss_mib": [round(m["peak_rss_mib"]) for m in memory],  # the peer's main process
        "tree_pss_mib": [round(m["tree_pss_mib"]) for m in memory],  # with its hivemind processes
        "rounds": rounds,
    }


def copy_costs(repeats: int = 3) -> list[dict]:
    """p2pcold's own work around the all-reduce, in this process on one thread, no network.

    Calls the real `SharedTensors.write` / `read` (`BodyAverager`'s copies) with a plain lock, then the
    finiteness check `GroupFusion.attempt` runs and `load_body_state`'s copy; and,
    interleaved, single-pass versions of the same work (`torch.sub(..., out=)`, `torch.add`), to show
    what fusing the passes would save."""
    import torch

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [
            _copy_cost(size, shapes, repeats)
            for size, shapes in {
                "minilm": [(30522, 384), (512, 384)] + [(384, 384)] * 24 + [(1536, 384)] * 12 + [(384,)] * 60,
                "roberta-base": [(50265, 768), (514, 768)] + [(768, 768)] * 48 + [(3072, 768)] * 24 + [(768,)] * 120,
            }.items()
        ]
    finally:
        torch.set_num_threads(saved_threads)


def _copy_cost(size: str, shapes: list[tuple[int, ...]], repeats: int) -> dict:
    """One body size of `copy_costs`; its tensors are freed when it returns."""
    import threading

    import torch

    from p2pcold.config import SwarmConfig
    from p2pcold.swarm.body_tensors import BodySchema, SharedTensors

    names = [f"t{i:03d}" for i in range(len(shapes))]
    generator = torch.Generator().manual_seed(0)
    reference = {n: torch.randn(shape, generator=generator) for n, shape in zip(names, shapes)}
    body = {n: t + 1e-3 for n, t in reference.items()}
    model = {n: torch.empty_like(t) for n, t in reference.items()}
    lock = threading.Lock()
    config = SwarmConfig(allreduce_timeout=60.0, local_rpc_timeout=60.0)
    shared = SharedTensors(BodySchema(reference), config, reference)

    def current():
        shared.write(body, lock, 60.0)
        averaged = shared.read(lock)
        assert all(bool(torch.isfinite(t).all()) for t in averaged.values())
        for n in names:
            model[n].copy_(averaged[n])  # load_body_state

    def single_pass():
        for n, tensor in zip(names, shared.tensors):
            torch.sub(body[n], reference[n], out=tensor)
        for n, tensor in zip(names, shared.tensors):
            torch.add(tensor, reference[n], out=model[n])  # straight into the model
        assert all(bool(torch.isfinite(model[n]).all()) for n in names)

    times: dict[str, list[float]] = {"current": [], "single_pass": []}
    for _ in range(repeats):
        for name, fn in (("current", current), ("single_pass", single_pass)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {
        "size": size,
        "params": sum(t.numel() for t in reference.values()),
        "current_s": median(times["current"]),
        "single_pass_s": median(times["single_pass"]),
    }


def run(quick: bool = False) -> dict:
    results, errors = [], []
    for item in plan(quick):
        try:
            rows = measure_size(**item)
        except Exception as e:  # e.g. the peers did not start
            log(f"fusion {item['size']}: FAILED: {e}")
            rows = [{"size": item["size"], "peers": g["peers"], "error": f"{type(e).__name__}: {e}"} for g in item["groups"]]
        results += [r for r in rows if "error" not in r]
        errors += [r for r in rows if "error" in r]
    valid = [r["ratio_vs_bare"] for r in results if r["ratio_vs_bare"] is not None]
    return {
        "rows": results,
        "copies": copy_costs(2 if quick else 3),
        "errors": errors,
        "timeouts": TIMEOUTS,
        "delta_std": DELTA_STD,
        "target_ratio_vs_bare": 1.2,
        "target_met": bool(valid) and max(valid) <= 1.2,
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", default=None)
    parser.add_argument("--peers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.size:
        full = ["p2pcold-none", "bare", "gloo", "p2pcold-fp16", "p2pcold-8bit"]
        out = measure_size(args.size, [dict(peers=args.peers or 2, repeats=args.repeats, variants=full)])
    else:
        out = run(args.quick)
    print(json.dumps(out, indent=2, default=str))
