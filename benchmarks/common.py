"""Helpers shared by the benchmarks: machine facts, robust statistics, worker subprocesses, memory.

Timings on a shared 2-core machine are noisy, so every benchmark measures its baseline and its
candidate interleaved in the same run, repeats, and reports medians and ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = ROOT / "benchmarks" / "results.json"
DOC_PATH = ROOT / "docs" / "performance.md"

# Offline everywhere: workers inherit this environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Iterable[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import hivemind
    import torch
    import transformers

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hivemind": hivemind.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": round(load, 2) if load is not None else None,
    }


# --------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss_mib(pid: int) -> float:
    """Current PSS of `pid` and all its descendants (hivemind's averager and DHT processes, p2pd), MiB.

    PSS, not RSS: forked children share the parent's pages and the averagers' shared-memory tensors,
    which RSS would count once per process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _pss_bytes(p)
        stack.extend(children.get(p, []))
    return total / 2**20


# --------------------------------------------------------------------------- networking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- worker processes


class Worker:
    """A Python subprocess in its own process group, driven over stdin/stdout with JSON lines.

    Replies are lines prefixed "@@ "; anything else the worker prints is passed through to stderr.
    `close_all()` asks it to exit, then kills the whole process group (hivemind's DHT and averager
    processes and the p2pd daemons are in it), so nothing outlives the benchmark.
    """

    def __init__(self, module: str, options: dict, name: str = "worker", prefix: tuple[str, ...] = ()):
        """`prefix`: a command to run the worker under, e.g. `ip netns exec NS` (which execs it: same pid)."""
        self.name = name
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", module, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # inherit: worker logs appear in the benchmark's stderr
            cwd=ROOT,
            start_new_session=True,  # own process group: killpg reaps its descendants
            text=True,
            bufsize=1,
        )

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        """The next reply; raises TimeoutError after `timeout` s and RuntimeError if the worker died."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no reply within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name}: exited with code {self.proc.wait(5)}")
            if line.startswith("@@ "):
                reply = json.loads(line[3:])
                if "error" in reply:
                    raise RuntimeError(f"{self.name}: {reply['error']}")
                return reply
            sys.stderr.write(f"[{self.name}] {line}")

    def call(self, message: dict, timeout: float) -> dict:
        self.send(message)
        return self.receive(timeout)

    def ask_to_exit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def kill_group(self) -> None:
        kill_group(self.proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group `proc` leads (started with start_new_session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.5)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def close_all(ws: list[Worker], grace_s: float = 20.0) -> None:
    """Ask every worker to exit at once, give them `grace_s` together, then kill their groups."""
    for w in ws:
        w.ask_to_exit()
    deadline = time.monotonic() + grace_s
    for w in ws:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for w in ws:
        w.kill_group()


def gather(ws: list[Worker], message: dict | list[dict], timeout: float) -> list[dict]:
    """Send `message` (one per worker, or the same to all) and collect every reply within `timeout`."""
    messages = message if isinstance(message, list) else [message] * len(ws)
    for w, m in zip(ws, messages):
        w.send(m)
    deadline = time.monotonic() + timeout
    return [w.receive(max(0.1, deadline - time.monotonic())) for w in ws]


# --------------------------------------------------------------------------- worker side


def reply(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(handlers: dict, setup=None) -> None:
    """Worker main loop: one JSON command per stdin line, dispatched on "cmd", until "exit"/EOF.

    The worker also exits when its parent dies (stdin closes).
    """
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "exit":
            break
        try:
            reply(handlers[name](**command))
        except Exception as e:  # report, keep serving
            import traceback

            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {e}"})


def wait_until(wall_time: float) -> None:
    delay = wall_time - time.time()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------- results


def load_results() -> dict:
    if RESULTS_PATH.is_file():
        try:
            return json.loads(RESULTS_PATH.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def save_results(results: dict) -> None:
    RESULTS_PATH.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def update_results(sections: dict | None = None, **fields) -> dict:
    """Merge this run's `sections` (name -> entry) and top-level `fields` into the file as it is now,
    so that two runs of different sections (or a long one beside a short one) keep each other's
    results; returns the merged results."""
    results = load_results()
    results.setdefault("benchmarks", {}).update(sections or {})
    results.update(fields)
    save_results(results)
    return results


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:.{digits}f}"
