"""Scaling: a model of fusion time from the measured 2-8 peer points out to 64-1024 volunteer peers.

No new measurement: it reads the fusion-round rows.

Measured (loopback, all peers on one 2-core machine): a butterfly all-reduce among n peers makes
every peer send, and receive, B = 2 (n-1)/n x payload bytes. The peers share the two cores, so the
loopback time is modelled as t = a + n B / (2 c): a fixed latency a (matchmaking, connection set-up,
copies) plus the CPU work of all n peers on two cores at c bytes/s per core (serialising, hashing and
moving the bytes through p2pd). a and c are fitted by least squares to the p2pcold-none points; the
plain t = a + B / thr fit is reported beside it for comparison.

Projected (volunteers, one machine and one link each), two ways to average P peers:
* flat: one all-reduce of all P (target_group_size >= P: one group per boundary);
  a peer moves B = 2 (P-1)/P x payload each way, t = a + B / min(link bandwidth, c);
* Moshpit rounds (p2pcold's, target_group_size = g < P; docs/protocol.md): d = ceil(log_g P) rounds
  in groups of g, each a full all-reduce of its cell with the same per-round latency a (a full cell
  assembles as soon as its members are in); t = d x (a + B_g / min(link bandwidth, c)),
  B_g = 2 (g-1)/g x payload. Two groupings: g = ceil(sqrt(P)) (2 rounds) and g = 4 (the tested one).
With pipelining a peer's own core (rate c, fitted above) caps a fast link.
"""

from __future__ import annotations

from p2pcold.swarm.moshpit import rounds_needed

PAYLOADS = {"minilm": 22_713_216, "roberta-base": 124_644_864}  # fused float parameters
BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "8bit": 1.0}  # 8bit: plus a 1 KiB codebook per 512 KiB part
LINKS = {"100 Mbit/s": 100e6 / 8, "1 Gbit/s": 1e9 / 8}
SWARMS = [(64, 8), (128, 12), (256, 16), (512, 23), (1024, 32)]  # (peers, group size g = ceil(sqrt(P)): 2 Moshpit rounds)
SMALL_GROUP = 4  # the other grouping: more rounds of small groups (the size tests/swarm/test_moshpit_swarm.py runs)


def sent_bytes(peers: int, payload_bytes: float) -> float:
    return 2 * (peers - 1) / peers * payload_bytes


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def fit(rows: list[dict], variant: str = "p2pcold-none", cores: int = 2) -> dict | None:
    points = [
        (r["size"], r["peers"], sent_bytes(r["peers"], r["fp32_bytes"]), r["time_s"][variant])
        for r in rows
        if r.get("time_s", {}).get(variant) is not None
    ]
    if len(points) < 2:
        return None
    # CPU-shared model: t = a + n B / (cores c)
    a, slope = _least_squares([n * b for _, n, b, _ in points], [t for *_, t in points])
    c = 1 / (slope * cores) if slope > 0 else float("inf")
    # plain model: t = a + B / thr
    a2, slope2 = _least_squares([b for _, _, b, _ in points], [t for *_, t in points])
    thr = 1 / slope2 if slope2 > 0 else float("inf")
    checks = [
        {
            "size": size,
            "peers": n,
            "sent_mb": b / 1e6,
            "measured_s": t,
            "cpu_model_s": a + n * b / (cores * c),
            "plain_model_s": a2 + b / thr,
        }
        for size, n, b, t in points
    ]
    return {"variant": variant, "latency_s": a, "core_bytes_per_s": c, "plain_latency_s": a2, "plain_bytes_per_s": thr, "checks": checks}


def project(model: dict) -> list[dict]:
    """Per swarm size, body and compression: (1) one flat group of all P peers (target_group_size
    unset or >= P: one all-reduce per boundary); (2) Moshpit rounds in groups of g = ceil(sqrt(P)),
    (3) and of 4. Latency `a` is the fitted one, measured with <= 8 peers; it will grow with a flat
    group's size (P - 1 connections per peer, a leader admitting P - 1 followers), not a round's."""
    a, c = max(model["latency_s"], 0.0), model["core_bytes_per_s"]
    rows = []
    for peers, group in SWARMS:
        rounds, small_rounds = rounds_needed(peers, group), rounds_needed(peers, SMALL_GROUP)
        for size, params in PAYLOADS.items():
            for compression, bpv in BYTES_PER_VALUE.items():
                flat = sent_bytes(peers, params * bpv)
                per_round = sent_bytes(group, params * bpv)
                per_small_round = sent_bytes(SMALL_GROUP, params * bpv)
                row = {
                    "peers": peers,
                    "group": group,
                    "rounds": rounds,
                    "size": size,
                    "compression": compression,
                    "flat_mb": flat / 1e6,
                    "mb_per_round": per_round / 1e6,
                    "small_rounds": small_rounds,
                    "flat": {},
                    "moshpit": {},
                    "moshpit_small": {},
                }
                for link, bandwidth in LINKS.items():
                    row["flat"][link] = a + flat / min(bandwidth, c)
                    row["moshpit"][link] = rounds * (a + per_round / min(bandwidth, c))
                    row["moshpit_small"][link] = small_rounds * (a + per_small_round / min(bandwidth, c))
                rows.append(row)
    return rows


def analyse(fusion: dict) -> dict:
    rows = fusion.get("rows", [])
    models = {v: fit(rows, v) for v in ("p2pcold-none", "bare", "gloo")}
    main = models["p2pcold-none"]
    return {
        "fits": {k: v for k, v in models.items() if v},
        "projection": project(main) if main else [],
        "swarms": SWARMS,
        "links": list(LINKS),
    }


def run(quick: bool = False, results: dict | None = None) -> dict:
    fusion = (results or {}).get("benchmarks", {}).get("fusion", {}).get("result")
    if not fusion:
        return {"skipped": "no fusion-round results to fit; run the fusion benchmark first"}
    return analyse(fusion)
