"""What each wire compression does to real MiniLM finetuning updates (issue 24).

The demo's run (`peers/runs/demo.yaml`: all-MiniLM-L6-v2, batches of 16 examples of 64 tokens, here
STEPS steps) finetunes θ0 on rotten_tomatoes with p2pcold's own `Contributor`; that body is θ_1 (a group
of one), which tweets_airlines finetunes in iteration 1. Each update is sent the way the all-reduce sends it: every tensor cut
into parts of `fusion.BLOCK_VALUES` values, each part through the compression's own `compress` and
`extract` (`p2pcold.swarm.compression.make_compression`). Reported per compression:

- bytes per value on the wire (the serialized parts' `ByteSize`, headers included);
- the max and mean |error| of the received update, and max |error| / mean |update|;
- at iteration 1, the same for body − θ_1 (what lossy modes send now) and for body − θ0 (before issue 24).

A second table sweeps the block size of `block8` / `block4` (64 .. 4096 values a scale) on the same
updates with `p2pcold.quantization` directly.

Run: python -m benchmarks.compression_error   (19 min on the 2 shared cores under load 8-19, 11.5 of
them the two finetunings; prints both tables and
writes benchmarks/compression_error.json)
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.common import ROOT, log
from p2pcold.config import load_config, load_dataset_spec
from p2pcold.finetune import Contributor, resolve_device
from p2pcold.fusion import BLOCK_VALUES
from p2pcold.model import body_state, load_body, load_tokenizer
from p2pcold.quantization import SCALE_BYTES, dequantize, quantize
from p2pcold.swarm import _compat
from p2pcold.swarm.compression import COMPRESSIONS, make_compression
from p2pcold.utils import setup_process

DATASETS = ["rotten_tomatoes", "tweets_airlines"]
STEPS = 24
BLOCKS = [64, 128, 256, 512, 1024, 4096]
OUT = ROOT / "benchmarks" / "compression_error.json"


def flat(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [state[name].detach().reshape(-1).to(torch.float32) for name in sorted(state)]


def sent(name: str, update: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """What the reducers receive of `update` under compression `name`, and the bytes it took."""
    from hivemind.compression import CompressionInfo

    compression, received, size = make_compression(name), [], 0
    for tensor in update:
        info = CompressionInfo.from_tensor(tensor)
        parts = []
        for index, start in enumerate(range(0, tensor.numel(), BLOCK_VALUES)):
            message = compression.compress(tensor[start : start + BLOCK_VALUES], info.get_part(index, BLOCK_VALUES))
            size += message.ByteSize()
            parts.append(compression.extract(message).reshape(-1))
        received.append(torch.cat(parts))
    return received, size


def errors(update: list[torch.Tensor], received: list[torch.Tensor]) -> dict:
    count = sum(t.numel() for t in update)
    mean_update = sum(t.abs().sum().item() for t in update) / count
    max_error = max((r - t).abs().max().item() for t, r in zip(update, received))
    mean_error = sum((r - t).abs().sum().item() for t, r in zip(update, received)) / count
    return {"max_abs_error": max_error, "mean_abs_error": mean_error, "mean_abs_update": mean_update, "max_error_over_mean_update": max_error / mean_update}


def row(label: str, name: str, update: list[torch.Tensor]) -> dict:
    received, size = sent(name, update)
    values = sum(t.numel() for t in update)
    return {"update": label, "compression": name, "bytes_per_value": size / values, **errors(update, received)}


def block_sweep(label: str, update: list[torch.Tensor]) -> list[dict]:
    rows = []
    for bits in (8, 4):
        for block in BLOCKS:
            received = [dequantize(quantize(t, bits, block)) for t in update]
            rows.append({"update": label, "bits": bits, "block": block, "bytes_per_value": bits / 8 + SCALE_BYTES / block, **errors(update, received)})
    return rows


def finetuned_updates() -> dict[str, list[torch.Tensor]]:
    torch.set_num_threads(2)
    config = load_config(ROOT / "peers/runs/demo.yaml", {"datasets": DATASETS, "finetune.budget.steps": STEPS})
    device, tokenizer = resolve_device("cpu"), load_tokenizer(config.model)
    body = load_body(config.model, config.num_hidden_layers)
    theta0 = body_state(body)
    started = time.perf_counter()
    bodies = {}
    for iteration, (name, base) in enumerate(((DATASETS[0], theta0), (DATASETS[1], None))):
        contributor = Contributor(load_dataset_spec(name), tokenizer, config.finetune, config.seed)
        base = base if base is not None else bodies[DATASETS[0]]  # θ_1: the first update, a group of one
        bodies[name] = contributor.contribute(body, base, iteration, device, show_progress=False, evaluate_dev=False).body
        log(f"compression_error: {name} finetuned θ_{iteration} ({time.perf_counter() - started:.0f} s)")
    theta1, last = bodies[DATASETS[0]], bodies[DATASETS[1]]

    def minus(a, b):
        return [x - y for x, y in zip(flat(a), flat(b))]

    return {
        f"{DATASETS[0]}, θ^c − θ0 (iteration 0)": minus(theta1, theta0),
        f"{DATASETS[1]}, θ^c − θ_1 (iteration 1)": minus(last, theta1),
        f"{DATASETS[1]}, θ^c − θ0 (iteration 1)": minus(last, theta0),
    }


def run() -> dict:
    _compat.apply()  # hivemind's 8-bit decoder on numpy >= 2.4
    updates = finetuned_updates()
    rows = [row(label, name, update) for label, update in updates.items() for name in COMPRESSIONS]
    sweep = [r for label, update in list(updates.items())[:2] for r in block_sweep(label, update)]
    return {"values": sum(t.numel() for t in next(iter(updates.values()))), "rows": rows, "block_sweep": sweep}


def report(result: dict) -> str:
    lines = [
        f"{result['values']:,} values per update",
        "| update | compression | bytes per value | max abs error | mean abs error | mean abs update | max error / mean update |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['update']} | {r['compression']} | {r['bytes_per_value']:.3f} | {r['max_abs_error']:.2e} | "
            f"{r['mean_abs_error']:.2e} | {r['mean_abs_update']:.2e} | {100 * r['max_error_over_mean_update']:.1f} % |"
        )
    lines += ["", "| update | bits | block | bytes per value | max abs error | mean abs error | max error / mean update |", "|---|---|---|---|---|---|---|"]
    for r in result["block_sweep"]:
        lines.append(
            f"| {r['update']} | {r['bits']} | {r['block']} | {r['bytes_per_value']:.3f} | {r['max_abs_error']:.2e} | "
            f"{r['mean_abs_error']:.2e} | {100 * r['max_error_over_mean_update']:.1f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    setup_process()
    result = run()
    OUT.write_text(json.dumps(result, indent=1))
    print(report(result))


if __name__ == "__main__":
    main()
