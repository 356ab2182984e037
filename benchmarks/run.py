"""Run the benchmark suite: `make bench`, `python -m benchmarks.run` or `python benchmarks/run.py`.

    --only NAME [NAME ...]   run only these (finetune, fusion, utilisation, scaling, memory, gpu, robust,
                             robust_accuracy); the others keep their previous results in benchmarks/results.json
    --quick                  fewer repeats and configurations (a smoke test, ~5 minutes)
    --no-docs                do not regenerate docs/performance.md

Writes benchmarks/results.json and regenerates the section of docs/performance.md between the
markers. Every worker process and hivemind daemon is reaped on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

ORDER = ["finetune", "fusion", "utilisation", "scaling", "memory", "gpu", "robust", "robust_accuracy"]  # scaling and memory read the others


def _module(name: str):
    import importlib

    return importlib.import_module(
        {
            "finetune": "benchmarks.finetune_throughput",
            "fusion": "benchmarks.fusion_round",
            "utilisation": "benchmarks.utilisation",
            "scaling": "benchmarks.scaling",
            "memory": "benchmarks.memory",
            "gpu": "benchmarks.gpu",
            "robust": "benchmarks.robust",
            "robust_accuracy": "benchmarks.robust_accuracy",
        }[name]
    )


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: workers are reaped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=ORDER, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    selected = [name for name in ORDER if args.only is None or name in args.only]
    machine = common.machine_info()
    load_before = machine.pop("load_average_at_start")
    results = common.update_results(machine=machine)
    started = time.perf_counter()
    failures = []
    for name in selected:
        section_started = time.perf_counter()
        common.log(f"=== {name} ===")
        try:
            module = _module(name)
            if name in ("scaling", "memory"):
                result = module.run(args.quick, results=results)
            else:
                result = module.run(args.quick)
            entry = {"result": result}
        except KeyboardInterrupt:
            common.log(f"{name}: interrupted")
            raise
        except Exception as e:
            import traceback

            traceback.print_exc()
            failures.append(name)
            entry = {"error": f"{type(e).__name__}: {e}"}
        entry.update(seconds=round(time.perf_counter() - section_started, 1), quick=args.quick, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        results = common.update_results({name: entry})  # after each section: a crash later keeps what was measured
        common.log(f"{name}: {entry['seconds']:.0f} s")
    total = time.perf_counter() - started
    try:
        load_after = round(os.getloadavg()[0], 2)
    except OSError:
        load_after = None
    last_run = {
        "sections": selected,
        "quick": args.quick,
        "total_s": round(total, 1),
        "load_average_at_start": load_before,
        "load_average_at_end": load_after,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = common.update_results(last_run=last_run, **({"last_full_run": last_run} if selected == ORDER else {}))
    common.log(f"suite: {total:.0f} s ({total / 60:.1f} min) for {', '.join(selected)}")
    if not args.no_docs:
        from benchmarks import report

        report.write_docs(results)
        common.log(f"wrote {common.DOC_PATH.relative_to(common.ROOT)} and {common.RESULTS_PATH.relative_to(common.ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
