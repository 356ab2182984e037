"""Memory: peak RSS per peer (CPU). The GPU rows (AdamW vs AdamW8bit, fp32 vs bf16) are in gpu.py.

CPU rows come from the peer processes of the other benchmarks, which report their own VmHWM
(/proc/self/status) and the PSS of their process tree (the peer plus hivemind's DHT and averager
processes and p2pd): the fusion-round peers (MiniLM, RoBERTa-base size) and the utilisation peers
(real `p2pcold.peer.Peer` processes finetuning MiniLM and fusing).
"""

from __future__ import annotations


def cpu_rows(results: dict) -> list[dict]:
    benchmarks = (results or {}).get("benchmarks", {})
    rows = []
    for r in benchmarks.get("fusion", {}).get("result", {}).get("rows", []):
        rows.append(
            {
                "what": f"fusion-round peer, {r['size']} body, {r['peers']} peers (averagers: {', '.join(v for v in r['time_s'])})",
                "peak_rss_mib": max(r["peak_rss_mib"]),
                "tree_pss_mib": max(r["tree_pss_mib"]),
            }
        )
    util = benchmarks.get("utilisation", {}).get("result", {})
    if util.get("peak_rss_mib"):
        rows.append(
            {
                "what": "p2pcold Peer (MiniLM finetune, batch 16 x 64 tokens, + fusion, 4 peers)",
                "peak_rss_mib": max(util["peak_rss_mib"]),
                "tree_pss_mib": max(util["tree_pss_mib"]),
            }
        )
    return rows


def run(quick: bool = False, results: dict | None = None) -> dict:
    return {"cpu": cpu_rows(results)}
