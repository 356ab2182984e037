"""Memory: peak RSS per peer (CPU), and on a GPU the optimizer and precision rows.

CPU rows come from the peer processes of the other benchmarks, which report their own VmHWM
(/proc/self/status) and the PSS of their process tree (the peer plus hivemind's DHT and averager
processes and p2pd): the fusion-round peers (MiniLM, RoBERTa-base size) and the utilisation peers
(real `p2pcold.peer.Peer` processes finetuning MiniLM and fusing).

GPU rows run only when `torch.cuda.is_available()`: peak CUDA memory and throughput of `finetune()`
on a RoBERTa-base-size body (random weights; MiniLM's tokenizer, whose ids fit RoBERTa's vocabulary)
with AdamW vs bitsandbytes AdamW8bit, in fp32 and bf16 autocast.
"""

from __future__ import annotations

import time

NO_GPU = "not measured: no GPU in this session"


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


def gpu_rows(quick: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": NO_GPU}
    from transformers import RobertaConfig, RobertaModel

    from p2pcold.config import Budget, FinetuneConfig, load_dataset_spec
    from p2pcold.data import prepare_dataset
    from p2pcold.finetune import finetune
    from p2pcold.model import Classifier, load_tokenizer, new_head

    tokenizer = load_tokenizer("minilm")
    data = prepare_dataset(load_dataset_spec("rotten_tomatoes"), tokenizer, 128)
    data.dev = data.dev.select([])
    steps = 10 if quick else 30
    rows = []
    device = torch.device("cuda")
    for optimizer in ("adamw", "adamw8bit"):
        for precision in ("fp32", "bf16"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            model = Classifier(RobertaModel(RobertaConfig()), new_head(768, data.num_labels, seed=0))
            config = FinetuneConfig(batch_size=32, max_length=128, optimizer=optimizer, precision=precision, budget=Budget(steps=steps))
            row = {"optimizer": optimizer, "precision": precision, "batch": 32, "max_length": 128, "steps": steps}
            try:
                finetune(model, data, tokenizer, config, seed=0, device=device)  # warm-up (kernels, allocator)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                result = finetune(model, data, tokenizer, config, seed=1, device=device)
                torch.cuda.synchronize()
                row.update(
                    examples_per_s=result.examples / (time.perf_counter() - started),
                    peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20,
                )
            except Exception as e:  # e.g. bitsandbytes missing: report the row as failed, keep going
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            del model
    return {"device": torch.cuda.get_device_name(0), "rows": rows}


def run(quick: bool = False, results: dict | None = None) -> dict:
    return {"cpu": cpu_rows(results), "gpu": gpu_rows(quick)}
