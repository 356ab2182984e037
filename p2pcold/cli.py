"""`p2pcold` command line. Bad input ends with a one-line `p2pcold: error: ...` and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

from p2pcold.utils import EXIT_TERMINATED, P2PColdError, StopSignal, Terminated, atomic_write_bytes, get_logger, raise_on_sigterm, setup_process

log = get_logger("cli")

EXIT_BAD_INPUT = 2
VOLUNTEER_HOST = "0.0.0.0"  # `p2pcold peer` listens on every interface unless told otherwise
EXIT_INTERRUPTED = 130
INVITE_FILE_ENV = "P2PCOLD_INVITE_FILE"


def parse_overrides(pairs: list[str]) -> dict:
    """`--set finetune.budget.steps=20` -> {"finetune.budget.steps": 20} (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise P2PColdError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise P2PColdError(f"--set {key}: {value!r} is not a YAML value (quote strings with special characters)") from None
    return overrides


def _config_for(args: argparse.Namespace, needs_datasets: bool = True, **flags: str):
    """The run config of a command: its CONFIG file, then `--set`, then the command's own options
    (`flags`: option name -> dotted config key), all validated the same way."""
    from p2pcold.config import load_config

    return load_config(args.config, _overrides(args, flags), needs_datasets=needs_datasets)


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """`--set`, then the command's own options (`flags`: option name -> dotted config key)."""
    overrides = parse_overrides(args.set)
    for option, key in flags.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _check_before_loading(recipes: list[str], models: list[str]) -> None:
    """The checks that need no torch, so that bad input is reported in a fraction of a second: the
    recipes, and the local model folders (a run folder's checkpoints are checked when read)."""
    from p2pcold.config import check_recipes
    from p2pcold.files import check_model_folder

    check_recipes(recipes)
    for model in models:
        if Path(model).is_dir() and not (Path(model) / "latest.json").is_file():
            check_model_folder(model)


# --------------------------------------------------------------------------- config


def cmd_config_show(args: argparse.Namespace) -> int:
    from p2pcold.config import to_dict

    config = _config_for(args, needs_datasets=False)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


# --------------------------------------------------------------------------- local


def cmd_local(args: argparse.Namespace) -> int:
    from p2pcold.run_folder import check_run_folder

    config = _config_for(args, output_dir="output_dir")  # before torch is imported: bad input fails fast
    _check_before_loading([*config.datasets, *config.eval.datasets], [config.model])
    check_run_folder(config.output_dir, config)

    from tqdm.contrib.logging import logging_redirect_tqdm

    from p2pcold.local_run import LocalRun

    raise_on_sigterm()
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
    from p2pcold.run_folder import check_output_dir

    flags = {"datasets": "eval.datasets", "unseen": "eval.unseen", "modes": "eval.modes", "few_shot": "eval.few_shot", "seeds": "eval.seeds"}
    run_config = _config_for(args, needs_datasets=False, num_hidden_layers="num_hidden_layers", **flags)
    eval_config = run_config.eval
    if not eval_config.datasets:
        raise P2PColdError("evaluate: no target datasets (pass --datasets or a --config with eval.datasets)")
    _check_before_loading(eval_config.datasets, args.base)
    output = check_output_dir(args.output)  # before any work: results that cannot be written are lost
    raise_on_sigterm()
    log.info("evaluating %d base(s) on %d dataset(s)", len(args.base), len(eval_config.datasets))

    from tqdm.contrib.logging import logging_redirect_tqdm

    from p2pcold.evaluate import Evaluator
    from p2pcold.finetune import resolve_device
    from p2pcold.model import METADATA_FILE, body_state, load_body, load_tokenizer, read_metadata
    from p2pcold.results import plot_accuracy, summary_table, write_results

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
    num_layers = run_config.num_hidden_layers
    device = resolve_device(args.device)

    def load_base(source: str):  # p2pcold checkpoints already have their layer count
        return load_body(source, None if (Path(source) / METADATA_FILE).is_file() else num_layers)

    first = bases[0][1]
    tokenizer = load_tokenizer(first)
    seen = set(eval_config.datasets) - set(eval_config.unseen) if eval_config.unseen else None
    working_body = load_base(first)
    first_state = body_state(working_body)  # before the evaluator loads bases into its working body
    evaluator = Evaluator(eval_config, tokenizer, working_body, args.seed, device, seen)
    results = []
    with logging_redirect_tqdm():
        for label, source, iteration in bases:
            state = first_state if source == first else body_state(load_base(source))
            results += evaluator.evaluate(state, label, iteration)
    csv_path, json_path = write_results(results, output)
    plot = plot_accuracy(results, output / "accuracy.png", title="p2pcold evaluate")
    print(summary_table(results))
    print(f"wrote {csv_path}, {json_path}, {plot}")
    return 0


# --------------------------------------------------------------------------- swarm


SWARM_FLAGS = {  # a swarm command's option -> the config field it sets
    "run_id": "run_id",
    "host": "swarm.host",
    "port": "swarm.port",
    "identity": "swarm.identity_path",
    "announce": "swarm.announce_maddrs",
    "reachability": "swarm.reachability",
    "relay": "swarm.relay",
}


def _swarm_run_config(args: argparse.Namespace):
    """A swarm command's config from its file (or the defaults), `--set` and flags; no network."""
    _take_invite(args)
    if args.command in ("peer", "status", "monitor") and not args.initial_peers:
        raise P2PColdError(
            f"{args.command}: --initial-peers is required: the multiaddr of a bootstrap node or of any peer of the run "
            "(`p2pcold bootstrap` prints it), or an --invite-file"
        )
    # The Repository samples from the run's datasets; a peer or a status query needs only the settings.
    config = _config_for(args, needs_datasets=getattr(args, "repository", False), **SWARM_FLAGS)
    _volunteer_host(args, config)
    return config


def _volunteer_host(args: argparse.Namespace, config) -> None:
    if args.command == "peer" and "host" not in config.swarm.model_fields_set:
        config.swarm.host = VOLUNTEER_HOST  # neither the config nor a flag chose: a volunteer on a real network


def _take_invite(args: argparse.Namespace) -> None:
    """`--invite-file` (or $P2PCOLD_INVITE_FILE): the swarm's addresses, run id and secret, as `args.invite`."""
    args.invite = None
    path = getattr(args, "invite_file", None) or os.environ.get(INVITE_FILE_ENV)
    if not path:
        return
    if args.secret_file:
        raise P2PColdError("give --invite-file or --secret-file, not both: an invite holds the run's secret")
    from p2pcold.swarm.invite import read_invite

    args.invite = read_invite(path)
    if args.run_id not in (None, args.invite.run_id):
        raise P2PColdError(f"--run-id {args.run_id}: the invite is to run {args.invite.run_id!r}")
    args.run_id = args.invite.run_id
    args.initial_peers = args.initial_peers or list(args.invite.peers)


def _secret(args: argparse.Namespace):
    """The run secret of a swarm command: its invite's, else --secret-file / the environment's (None: open)."""
    from p2pcold.swarm.auth import load_secret

    invite = getattr(args, "invite", None)
    return invite.secret if invite is not None else load_secret(args.secret_file)


def _config_from_swarm(args: argparse.Namespace, local, secret):
    """The config the run's owner published in the DHT, with this volunteer's `--set` and flags on top.
    `local` (the defaults, `--set` and flags alone) gives the settings of the node that reads it."""
    from p2pcold.config import config_summary, load_published_config
    from p2pcold.swarm.run_config import fetch_run_config

    published = fetch_run_config(args.initial_peers, local.run_id, secret, local.swarm)
    config = load_published_config(published, _overrides(args, SWARM_FLAGS), where="the swarm's run config")
    _volunteer_host(args, config)
    log.info("run config from the swarm: %s", config_summary(config))
    return config


def _dataset_spec(args: argparse.Namespace):
    """`--dataset` (a recipe, or a data file whose columns `--text-column` / `--label-column` name) as a spec."""
    from p2pcold.config import load_dataset_spec

    return load_dataset_spec(args.dataset, text_column=args.text_column, label_column=args.label_column)


def cmd_peer(args: argparse.Namespace) -> int:
    config = _swarm_run_config(args)  # before torch and hivemind are imported: bad input fails fast
    dataset = _dataset_spec(args)
    secret = _secret(args)
    if args.config is None:
        config = _config_from_swarm(args, config, secret)

    from p2pcold.peer import CentralizedPeer, DecentralizedPeer

    run_dir = args.run_dir or f"runs/peer-{Path(args.dataset).stem}"
    protocol = CentralizedPeer if args.centralized else DecentralizedPeer
    peer = protocol(
        config, dataset, args.initial_peers, run_dir, device=args.device, show_progress=args.progress, secret=secret, log_dir=args.log_dir
    )
    raise_on_sigterm()
    try:
        peer.setup()
        peer.train()
    except Terminated:
        log.info("terminated; stopping")
        return EXIT_TERMINATED
    finally:
        peer.cleanup()
    print(f"peer {peer.name}: finished at iteration {peer.iteration}; checkpoints in {run_dir}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    config = _swarm_run_config(args)

    from p2pcold.swarm import run_record_validators, start_dht, stop_dht, visible_maddrs
    from p2pcold.swarm.reachability import serve_dial_back
    from p2pcold.swarm.run_config import REPUBLISH_EVERY_S, publish_run_config

    secret = _secret(args)
    raise_on_sigterm()
    dht = start_dht(config.swarm, args.initial_peers, secret=secret, record_validators=run_record_validators(config.run_id, config.iterations))
    repository = None
    try:
        serve_dial_back(dht, config.swarm)
        publish_run_config(dht, config)  # volunteers then join with an address (or an invite) alone
        maddrs = visible_maddrs(dht, config.swarm.local_rpc_timeout)
        print("bootstrap node up; peers join with:", flush=True)
        for maddr in maddrs:
            print(f"  --initial-peers {maddr}", flush=True)
        if args.maddrs_file:
            atomic_write_bytes(args.maddrs_file, ("\n".join(maddrs) + "\n").encode())
        if args.repository:
            from p2pcold.repository import Repository

            repository = Repository(config, dht, args.run_dir or "runs/repository", secret=secret)
            repository.setup()
            repository.train()
            print(f"Repository: run {config.run_id} complete at iteration {repository.iteration}", flush=True)
        else:
            while True:  # serve until SIGTERM or Ctrl-C
                time.sleep(REPUBLISH_EVERY_S)
                try:
                    publish_run_config(dht, config)
                except P2PColdError as e:  # the record lives identity_ttl: the next hour's try is in time
                    log.warning("%s; trying again in %.0f s", e, REPUBLISH_EVERY_S)
    except (Terminated, KeyboardInterrupt):
        log.info("stopping the bootstrap node")
    finally:
        if repository is not None:
            repository.cleanup()
        stop_dht(dht, grace_s=config.swarm.shutdown_timeout)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _swarm_run_config(args)
    if args.watch and args.json:
        raise P2PColdError("status: --watch refreshes the table; it does not combine with --json")
    if not args.interval > 0:
        raise P2PColdError(f"status: --interval {args.interval}: must be greater than 0")

    from p2pcold.swarm import read_progress, run_record_validators, start_dht, stop_dht

    validators = run_record_validators(config.run_id, config.iterations)
    dht = start_dht(config.swarm, args.initial_peers, client_mode=True, secret=_secret(args), record_validators=validators)
    try:
        records = read_progress(dht, config.run_id, config.swarm.dht_request_timeout, config.iterations)
        if args.json:
            print(json.dumps([dataclasses.asdict(r) for r in records], indent=2))
            return 0
        if not args.watch:
            print(status_table(config.run_id, records, time.time()))
            return 0
        with StopSignal().installed() as stop:  # until Ctrl-C (exit 130) or SIGTERM (143)
            while True:  # each read is bounded by dht_request_timeout, and a signal ends the loop after it
                # clear the screen and home the cursor (ANSI), then the whole table at once: no flicker
                print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + status_table(config.run_id, records, time.time()), flush=True)
                if stop.wait(args.interval):
                    break
                try:
                    records = read_progress(dht, config.run_id, config.swarm.dht_request_timeout, config.iterations)
                except P2PColdError as e:
                    log.warning("status not refreshed, showing the last one: %s", e)
                if stop.signum is not None:
                    break
        stop.raise_if_set()
    finally:
        stop_dht(dht, grace_s=config.swarm.shutdown_timeout)


def status_table(run_id: str, records, now: float) -> str:
    """The swarm's live peers as aligned text, one row per progress record."""
    rows = [dataclasses.asdict(r) for r in records]
    if not rows:
        return f"run {run_id}: no live peers"
    header = ["peer", "dataset", "iteration", "phase", "mode", "loss", "dev acc", "ex/s", "group", "last boundary", "last seen"]
    table = [header] + [
        [
            r["peer_id"][-8:], r["dataset"], str(r["iteration"]), r["phase"], r["mode"], _num(r["train_loss"]), _num(r["dev_accuracy"]),
            _num(r["examples_per_second"], 1), "-" if r["last_group_size"] is None else str(r["last_group_size"]), _boundary_cell(r), f"{now - r['last_seen']:.0f} s ago",
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join([f"run {run_id}: {len(rows)} live peer(s)", *lines])


def _boundary_cell(record: dict) -> str:
    """What the peer's last boundary produced, e.g. `ok/2 tries` or `failed/3 tries`."""
    if not record.get("last_fusion"):
        return "-"
    attempts = record.get("fusion_attempts") or 0
    return f"{record['last_fusion']}/{attempts} tr{'y' if attempts == 1 else 'ies'}"


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cmd_monitor(args: argparse.Namespace) -> int:
    config = _swarm_run_config(args)
    if not 0 <= args.web_port <= 65535:
        raise P2PColdError(f"monitor: --port {args.web_port}: must be between 0 and 65535")

    from p2pcold.monitor import Monitor, MonitorOptions

    secret = _secret(args)
    options = MonitorOptions(
        host=args.web_host, port=args.web_port, evaluate=args.evaluate, log_dir=args.log_dir, push_to_hub=args.push_to_hub, device=args.device
    )
    monitor = Monitor(config, args.initial_peers, args.output or f"runs/monitor-{config.run_id}", options, secret=secret)
    raise_on_sigterm()
    try:
        monitor.setup()
        print(f"monitor of run {config.run_id}: {monitor.url}", flush=True)
        monitor.run()
    except (Terminated, KeyboardInterrupt):
        log.info("stopping the monitor")
        return 0  # watching until stopped is its job, as for `bootstrap`
    finally:
        monitor.cleanup()
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    config = _swarm_run_config(args)
    peers = args.initial_peers or _maddrs_in(args.maddrs_file)
    if not peers:
        raise P2PColdError("invite: give the swarm's public addresses: --initial-peers ADDR... or --maddrs-file FILE")

    from p2pcold.swarm.invite import Invite, write_invite

    secret = _secret(args)
    if secret is None:
        raise P2PColdError(
            "invite: an invite carries the run secret: pass --secret-file (an open swarm needs none; give its address)"
        )
    write_invite(args.output, Invite(config.run_id, tuple(dict.fromkeys(peers)), secret))
    print(
        f"wrote an invite to run {config.run_id} ({len(peers)} address(es)) to {args.output}: it holds the run secret, "
        "so send it only to the volunteers you trust, over a private channel"
    )
    return 0


def _maddrs_in(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        return Path(path).read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise P2PColdError(f"{path}: cannot read the addresses ({getattr(e, 'strerror', None) or e})") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir

    from p2pcold.simulate import simulate

    return simulate(args, overrides)


# --------------------------------------------------------------------------- parser


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config field (dotted key, YAML value), e.g. {example}; `p2pcold config show` lists every field",
    )  # fmt: skip


def add_secret_option(parser: argparse.ArgumentParser, default: str = "(default: $P2PCOLD_SECRET_FILE or $P2PCOLD_SECRET; none: an open swarm)") -> None:
    parser.add_argument(
        "--secret-file", metavar="FILE",
        help=f"the run secret of a private swarm, in a file only you can read (chmod 600) {default}",
    )  # fmt: skip


def add_log_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-dir", help="write TensorBoard event files here (loss, dev accuracy, examples/s, fusion time, group size)")


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
    local.add_argument(
        "config", nargs="?", help="run config YAML or a preset's name, e.g. demo (default: all defaults; see p2pcold/recipes/runs/)"
    )
    local.add_argument("--output-dir", help="run folder (default: the config's output_dir)")
    local.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_set_option(local, "iterations=5")
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
    evaluate.add_argument("--seeds", type=int, help="repeat each evaluation with K seeds (few-shot samples, heads); report mean ± std")
    evaluate.add_argument("--config", help="a run config whose eval section (finetuning budget etc.) to use")
    evaluate.add_argument("--num-hidden-layers", type=int, help="truncate plain pretrained models to N layers")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--output", default="runs/evaluate", help="folder for results and plot")
    add_set_option(evaluate, "eval.frozen_epochs=5")
    evaluate.set_defaults(func=cmd_evaluate)

    def swarm_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="run config YAML shared by the swarm (model, iterations, finetune, swarm)")
        p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="multiaddrs of peers to join through")
        p.add_argument("--run-id", help="which run to join (default: the config's run_id)")
        add_secret_option(p)
        p.add_argument(
            "--invite-file",
            metavar="FILE",
            help="an invite from the run's operator (`p2pcold invite`): the swarm's addresses, the run id and "
            "the secret; a peer then needs no --config (default: $P2PCOLD_INVITE_FILE)",
        )
        add_set_option(p, "swarm.compression=fp16")

    def address_options(p: argparse.ArgumentParser, default_host: str) -> None:
        p.add_argument("--host", help=f"listen address (default {default_host})")
        p.add_argument("--port", type=int, help="TCP port (default: a free one; fix it to forward or open it)")
        p.add_argument("--announce", nargs="+", metavar="MADDR", help="addresses others should dial, e.g. /ip4/203.0.113.7/tcp/31337")
        p.add_argument("--identity", help="private key file for a stable peer id (created on first use)")

    peer = sub.add_parser(
        "peer",
        help="join a swarm as a contributor of one dataset",
        description="Finetune the swarm's base on your dataset each iteration and all-reduce-average the encoder "
        "with the other peers at the boundary (decentralized), or follow a Repository (--centralized).",
    )
    peer.add_argument(
        "--dataset",
        required=True,
        help="dataset recipe: a name (p2pcold/recipes/, $P2PCOLD_RECIPES) or a YAML path; or your own data file "
        "(.csv, .tsv, .json, .jsonl, .parquet), its label names read from its label column",
    )
    peer.add_argument("--text-column", help="with a data file: the column holding the text (default: text)")
    peer.add_argument("--label-column", help="with a data file: the column holding the label (default: label)")
    swarm_options(peer)
    address_options(peer, default_host=f"{VOLUNTEER_HOST}, every interface")
    peer.add_argument(
        "--reachability", choices=["auto", "public", "client"],
        help="auto (default): swarm members dial this peer back at start; if they cannot (NAT, firewall) it joins "
        "as a client through a relay. public: skip the check (port forwarded). client: always behind NAT",
    )  # fmt: skip
    peer.add_argument("--run-dir", help="this peer's checkpoints (default: runs/peer-DATASET); resumed on restart")
    peer.add_argument("--centralized", action="store_true", help="follow a Repository (p2pcold bootstrap --repository)")
    peer.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    peer.add_argument("--progress", action="store_true", help="show a finetuning progress bar")
    add_log_dir_option(peer)
    peer.set_defaults(func=cmd_peer)

    bootstrap = sub.add_parser(
        "bootstrap",
        help="run a long-lived DHT node that peers join through (optionally the Repository)",
        description="Prints (and writes) the multiaddrs to pass as --initial-peers. Stops cleanly on SIGTERM.",
    )
    swarm_options(bootstrap)
    address_options(bootstrap, default_host="127.0.0.1; 0.0.0.0 for other machines")
    bootstrap.add_argument(
        "--relay", choices=["on", "off"], help="relay for peers behind NAT (default on; see bootstrap/README.md)"
    )
    bootstrap.add_argument("--maddrs-file", help="also write the multiaddrs to this file")
    bootstrap.add_argument("--repository", action="store_true", help="also act as the paper's Repository (centralized mode)")
    bootstrap.add_argument("--run-dir", help="the Repository's checkpoints (default: runs/repository)")
    bootstrap.set_defaults(func=cmd_bootstrap)

    invite = sub.add_parser(
        "invite",
        help="write an invite file: one line that lets a volunteer join a private run",
        description="Run by the operator, who holds the run secret. Writes the swarm's addresses, the run id and "
        "the secret as one line to a file only you can read (mode 600). A volunteer joins with "
        "`p2pcold peer --dataset X --invite-file FILE` and nothing else: the run config comes from the swarm.",
    )
    swarm_options(invite)
    invite.add_argument("--maddrs-file", help="the addresses a bootstrap wrote (`p2pcold bootstrap --maddrs-file`)")
    invite.add_argument("--output", required=True, help="the invite file to write (mode 600)")
    invite.set_defaults(func=cmd_invite)

    status = sub.add_parser("status", help="show the swarm's live peers and their progress")
    swarm_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh the table until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default 2)")
    status.set_defaults(func=cmd_status)

    simulate = sub.add_parser(
        "simulate",
        help="simulate a whole swarm on this machine (the default: the offline CPU demo)",
        description="Start a bootstrap, N real peer processes on 127.0.0.1 and an evaluator process; evaluate every "
        "fused base (CoLD and CoLD-Frozen) and plot accuracy per iteration. Ctrl-C stops every process; "
        "--resume continues. Without CONFIG: the demo preset (MiniLM, offline data, CPU).",
    )
    simulate.add_argument(
        "config", nargs="?", help="run config YAML or a preset's name, e.g. transfer (default: the offline demo)"
    )
    simulate.add_argument("--peers", type=int, help="number of peer processes (default: one per dataset)")
    placement = simulate.add_mutually_exclusive_group()
    placement.add_argument("--gpus", help="comma-separated GPU indices; peers are placed round-robin (default: CPU)")
    placement.add_argument("--device", choices=["cpu"], help="run everything on the CPU (the default without --gpus)")
    simulate.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast for finetuning (CUDA)")
    simulate.add_argument("--centralized", action="store_true", help="run through a Repository (paper §2.3)")
    simulate.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped simulation")
    simulate.add_argument("--output-dir", help="run folder (default: the config's output_dir)")
    add_secret_option(simulate, "(default: a fresh one for each run)")
    simulate.add_argument("--monitor-port", type=int, default=0, help="port of the monitor's web page (default: a free one)")
    simulate.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the best fused base with a model card after each evaluation")
    add_log_dir_option(simulate)
    add_set_option(simulate, "finetune.budget.steps=20")
    simulate.set_defaults(func=cmd_simulate)

    monitor = sub.add_parser(
        "monitor",
        help="watch a swarm: a web page and JSON API of its peers, boundaries and accuracy",
        description="Joins the swarm as a client that never trains, keeps the peers' history and every boundary's "
        "fusion, and serves a self-refreshing page (and /api/state). With --evaluate it downloads and evaluates each "
        "new fused base with the run's eval settings. Stops cleanly on SIGTERM or Ctrl-C.",
    )
    swarm_options(monitor)
    # dest: not `port`/`host`, which set the swarm's own listen address in _swarm_run_config
    monitor.add_argument("--port", dest="web_port", type=int, default=8080, help="web page port (default 8080; 0: a free one)")
    monitor.add_argument("--host", dest="web_host", default="127.0.0.1", help="interface of the web page (default 127.0.0.1; 0.0.0.0 shows it to everyone)")
    monitor.add_argument("--evaluate", action="store_true", help="evaluate each new fused base (needs eval.datasets in --config)")
    monitor.add_argument("--output", help="results, plots and evaluated bases (default: runs/monitor-RUN_ID)")
    monitor.add_argument("--device", default="auto", help="of the evaluation: cpu, cuda, cuda:N or auto (default)")
    monitor.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the best evaluated base with a model card")
    add_log_dir_option(monitor)
    monitor.set_defaults(func=cmd_monitor)

    config = sub.add_parser("config", help="show a run config with every default filled in")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the resolved config (YAML) with every default",
        description="Load CONFIG (default: all defaults), apply --set, validate, and print every field.",
    )
    show.add_argument("config", nargs="?", help="run config YAML")
    add_set_option(show, "finetune.learning_rate=2e-5")
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_process(args.verbose)
    try:
        return args.func(args)
    except P2PColdError as e:
        print(f"p2pcold: error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # one line, whatever the message
        return EXIT_BAD_INPUT
    except OSError as e:  # a file or folder the checks could not foresee (disk full, permissions changed)
        print(f"p2pcold: error: {e.filename or args.command}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("p2pcold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"p2pcold: error: {args.command} stopped by SIGTERM; what it had finished is kept", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
