"""`p2pcold` command line. Bad input ends with a one-line `p2pcold: error: ...` and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from p2pcold.utils import P2PColdError, get_logger, setup_logging

log = get_logger("cli")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def parse_overrides(pairs: list[str]) -> dict:
    """`--set finetune.budget.steps=20` -> {"finetune.budget.steps": 20} (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise P2PColdError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


# --------------------------------------------------------------------------- local


def cmd_local(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from p2pcold.config import load_run_config
    from p2pcold.local_run import LocalRun

    overrides = parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    config = load_run_config(args.config, overrides)
    run = LocalRun(config, device=args.device)
    with logging_redirect_tqdm():
        run.setup()
        run.train()
    print(run.summary())
    print(f"run folder: {run.output_dir} (checkpoints/, results.csv, accuracy.png)")
    run.cleanup()
    return 0


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from p2pcold.config import EvalConfig, RunConfig, load_run_config
    from p2pcold.evaluate import Evaluator
    from p2pcold.finetune import resolve_device
    from p2pcold.model import METADATA_FILE, body_state, load_body, load_tokenizer, read_metadata
    from p2pcold.results import plot_accuracy, summary_table, write_results

    run_config = load_run_config(args.config) if args.config else RunConfig(datasets=["-"])
    eval_config: EvalConfig = run_config.eval
    if args.datasets:
        eval_config.datasets = args.datasets
    if args.unseen is not None:
        eval_config.unseen = args.unseen
    if args.modes:
        eval_config.modes = args.modes
    if args.few_shot is not None:
        eval_config.few_shot = args.few_shot
    if not eval_config.datasets:
        raise P2PColdError("evaluate: no target datasets (pass --datasets or a --config with eval.datasets)")

    bases: list[tuple[str, str, int]] = []  # (label, model source, iteration)
    for base in args.base:
        path = Path(base)
        if (path / "latest.json").is_file():  # a run folder: every checkpoint it holds
            for ckpt in sorted((path / "checkpoints").glob("iter-*")):
                bases.append((f"{path.name}/{ckpt.name}", str(ckpt), read_metadata(ckpt).iteration))
        elif (path / METADATA_FILE).is_file():
            bases.append((base, base, read_metadata(path).iteration))
        else:
            bases.append((base, base, 0))
    num_layers = args.num_hidden_layers if args.num_hidden_layers is not None else run_config.num_hidden_layers
    device = resolve_device(args.device)
    first = bases[0][1]
    tokenizer = load_tokenizer(first)
    seen = set(eval_config.datasets) - set(eval_config.unseen) if eval_config.unseen else None
    evaluator = Evaluator(eval_config, tokenizer, load_body(first, num_layers), args.seed, device, seen)
    results = []
    with logging_redirect_tqdm():
        for label, source, iteration in bases:
            layers = None if (Path(source) / METADATA_FILE).is_file() else num_layers
            results += evaluator.evaluate(body_state(load_body(source, layers)), label, iteration)
    output = Path(args.output)
    csv_path, json_path = write_results(results, output)
    plot = plot_accuracy(results, output / "accuracy.png", title="p2pcold evaluate")
    print(summary_table(results))
    print(f"wrote {csv_path}, {json_path}, {plot}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pcold", description="CoLD Fusion as a peer-to-peer trainer over hivemind.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    local = sub.add_parser(
        "local",
        help="run CoLD Fusion in one process (the reference run)",
        description="The paper's loop in one process: sample k contributors, finetune each from the base, "
        "fuse the bodies, evaluate, checkpoint, repeat. Resumes from the run folder's last checkpoint.",
    )
    local.add_argument("config", nargs="?", help="run config YAML (default: all defaults; see peers/runs/)")
    local.add_argument("--output-dir", help="run folder (default: the config's output_dir)")
    local.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    local.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. iterations=5")
    local.set_defaults(func=cmd_local)

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate base models: CoLD (finetune all) and CoLD-Frozen (head only)",
        description="Evaluate one or more bases (model folders, checkpoints, run folders, `minilm`) on target "
        "datasets and print them side by side. Writes results.csv, results.json and accuracy.png.",
    )
    evaluate.add_argument("--base", nargs="+", required=True, help="models to evaluate (a run folder expands to its checkpoints)")
    evaluate.add_argument("--datasets", nargs="+", help="target dataset recipes")
    evaluate.add_argument("--unseen", nargs="*", help="targets no contributor trained on (splits the table and plot)")
    evaluate.add_argument("--modes", nargs="+", choices=["cold", "frozen"], help="default: both")
    evaluate.add_argument("--few-shot", type=int, help="train on only N examples per target")
    evaluate.add_argument("--config", help="a run config whose eval section (finetuning budget etc.) to use")
    evaluate.add_argument("--num-hidden-layers", type=int, help="truncate plain pretrained models to N layers")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--output", default="runs/evaluate", help="folder for results and plot")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except P2PColdError as e:
        print(f"p2pcold: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("p2pcold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
