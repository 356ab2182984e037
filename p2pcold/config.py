"""Typed configuration: dataset recipes, finetuning, fusion and run settings, loaded from YAML.

Every field is a named dataclass field with a default; YAML keys that are not fields are
rejected with a one-line error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from p2pcold.utils import P2PColdError

# The repository's recipe folder. An editable install (the documented one) finds it here;
# P2PCOLD_RECIPES overrides it.
REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = Path(os.environ.get("P2PCOLD_RECIPES", REPO_ROOT / "peers"))


@dataclass
class RowFilter:
    """Keep rows whose `column` contains any of `keywords` (case-insensitive substring match)."""

    column: str = "text"
    keywords: list[str] = field(default_factory=list)


@dataclass
class DatasetSpec:
    """One contributor's dataset: where it is, which columns hold text and labels, how to split it."""

    name: str = ""
    # A local file (csv, tsv, json, jsonl, parquet; .gz/.bz2/.xz/.zst too), a file inside an
    # installed package written `pkg://package/relative/path`, or a hub id such as `glue`.
    source: str = ""
    hub_config: str | None = None  # e.g. `sst2` for source `glue`
    encoding: str | None = None  # for text files that are not UTF-8 (e.g. latin-1)
    text_column: str = "text"
    text_pair_column: str | None = None  # second sentence for pair tasks (NLI, paraphrase)
    label_column: str = "label"
    # Label values in class-index order. For string labels, rows whose label is not listed are
    # dropped only when `drop_unlisted_labels` is set; otherwise they are an error.
    label_names: list[str] = field(default_factory=list)
    drop_unlisted_labels: bool = False
    filter: RowFilter | None = None
    max_examples: int | None = None  # cap on train examples (after filtering and after dev/test are carved)
    # Hub split names; missing dev/test splits are carved from train with `split_fractions`.
    train_split: str = "train"
    dev_split: str | None = "validation"
    test_split: str | None = "test"
    split_fractions: tuple[float, float] = (0.1, 0.1)  # dev, test fractions of the data
    max_eval_examples: int | None = 1000  # cap on dev and test each, for speed
    split_seed: int = 0
    # One of `num_shards` disjoint slices of train (dev and test stay whole), for federated runs
    # (§5.1). Usually set by referring to a recipe as `NAME@INDEX/COUNT`, e.g. `rotten_tomatoes@0/4`.
    shard_index: int | None = None
    num_shards: int | None = None


@dataclass
class Budget:
    """How much local finetuning one iteration gets. The first limit reached ends it."""

    steps: int | None = None  # optimizer steps
    examples: int | None = None
    epochs: float | None = None
    seconds: float | None = None  # wall clock: fast peers keep training, but runs are not reproducible

    def is_bounded(self) -> bool:
        return any(v is not None for v in (self.steps, self.examples, self.epochs, self.seconds))


@dataclass
class FinetuneConfig:
    """Local finetuning, App. B defaults: AdamW, lr 5e-5, linear decay, weight decay 0.01."""

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    batch_size: int = 16  # examples per forward pass
    gradient_accumulation: int = 1  # effective batch = batch_size * gradient_accumulation
    max_length: int = 128  # tokens; batches are padded dynamically to their longest row
    budget: Budget = field(default_factory=lambda: Budget(epochs=1))
    # Early stopping on dev accuracy (App. B): evaluate every `eval_every_examples` and stop when
    # accuracy improved by less than `early_stopping_min_delta` since the previous evaluation.
    eval_every_examples: int | None = None
    early_stopping_min_delta: float = 0.001
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes, CUDA only
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast, CUDA only
    # The task head is local and never fused. `keep`: a contributor's head carries over to its
    # next iteration; `reinit`: a fresh head every iteration.
    head: Literal["keep", "reinit"] = "reinit"
    dropout: float = 0.1
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default


@dataclass
class EvalConfig:
    """The paper's evaluation (§3.4): CoLD finetunes the whole model, CoLD-Frozen the head only."""

    datasets: list[str] = field(default_factory=list)  # target recipes
    unseen: list[str] = field(default_factory=list)  # of `datasets`, those no contributor trains on
    modes: list[Literal["cold", "frozen"]] = field(default_factory=lambda: ["cold", "frozen"])
    few_shot: int | None = None  # train the evaluation on only this many examples
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    frozen_epochs: int = 20  # head-only training runs over cached features, so it is cheap
    frozen_learning_rate: float = 1e-3  # a lone linear head needs a larger step than 5e-5
    every: int = 1  # evaluate the base every N iterations (0: only at the end)


@dataclass
class SimulateConfig:
    """`p2pcold simulate`: a whole swarm of real peer processes on one machine."""

    peers: int | None = None  # peer processes, one dataset each (None: one per dataset)
    centralized: bool = False  # run through a Repository (the paper's §2.3) instead of all-reduce among peers
    keep_best: bool = True  # keep a copy of the best evaluated base besides the last
    refresh_seconds: float = 2.0  # progress display period


@dataclass
class RunConfig:
    """One CoLD Fusion run (§2.3, §3.4): which contributors, how many iterations, how to fuse."""

    model: str = "minilm"  # local folder, hub id, or `minilm` (the offline all-MiniLM-L6-v2)
    num_hidden_layers: int | None = None  # keep only the first N pretrained layers (faster demos)
    datasets: list[str] = field(default_factory=list)  # contributor recipes (names or YAML paths)
    contributors_per_iteration: int | None = None  # k sampled per iteration; None: all of them
    iterations: int = 3
    seed: int = 0
    fusion_weighting: Literal["uniform", "examples"] = "uniform"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/local"
    run_id: str = "p2pcold"
    keep_checkpoints: int | None = 2  # newest checkpoints a peer keeps in its run folder (None: all)
    swarm: SwarmConfig = field(default_factory=lambda: SwarmConfig())  # networked modes only
    simulate: SimulateConfig = field(default_factory=SimulateConfig)


# --------------------------------------------------------------------------- YAML loading


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, checking as it goes."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise P2PColdError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise P2PColdError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise P2PColdError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(a, v, where) for a, v in zip(typing.get_args(tp), value))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise P2PColdError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise P2PColdError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise P2PColdError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise P2PColdError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise P2PColdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise P2PColdError(f"{path}: expected a YAML mapping at the top level")
    return data


def resolve_recipe_path(name_or_path: str) -> Path:
    """A dataset recipe by name (`peers/NAME.yaml`) or by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise P2PColdError(f"{name_or_path}: recipe file not found")
        return candidate
    path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise P2PColdError(f"unknown dataset recipe {name_or_path!r} (known in {RECIPES_DIR}: {', '.join(known)})")
    return path


def load_dataset_spec(reference: str) -> DatasetSpec:
    """A recipe by name or path; `NAME@INDEX/COUNT` selects one shard of its train split."""
    name_or_path, _, shard = reference.partition("@")
    path = resolve_recipe_path(name_or_path)
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    spec = from_dict(DatasetSpec, data, where=str(path))
    if not spec.source:
        raise P2PColdError(f"{path}: `source` is required")
    if shard:
        index, _, count = shard.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise P2PColdError(f"{reference}: a shard is written NAME@INDEX/COUNT with INDEX < COUNT, e.g. {name_or_path}@0/4")
        spec.shard_index, spec.num_shards = int(index), int(count)
        spec.name = f"{spec.name}@{index}of{count}"
    return spec


def load_run_config(path: str | os.PathLike | None, overrides: dict | None = None, needs_datasets: bool = True) -> RunConfig:
    """A run config from YAML (None: all defaults), with dotted-key overrides applied on top.

    `needs_datasets=False` for a single peer, a bootstrap node or `status`, which need the run's
    settings but not its list of contributors."""
    data = load_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = from_dict(RunConfig, data, where=str(path or "run config"))
    validate_run_config(config, needs_datasets)
    return config


def validate_run_config(config: RunConfig, needs_datasets: bool = True) -> None:
    if needs_datasets and not config.datasets:
        raise P2PColdError("run config: `datasets` lists no contributor recipe")
    if len(set(config.datasets)) != len(config.datasets):
        raise P2PColdError("run config: `datasets` lists a recipe twice")
    k = config.contributors_per_iteration
    if k is not None and config.datasets and not 1 <= k <= len(config.datasets):
        raise P2PColdError(f"run config: contributors_per_iteration={k} must be between 1 and {len(config.datasets)}")
    if config.iterations < 1:
        raise P2PColdError("run config: iterations must be at least 1")
    if not config.finetune.budget.is_bounded():
        raise P2PColdError("run config: finetune.budget sets no limit (steps, examples, epochs or seconds)")
    missing = sorted(set(config.eval.unseen) - set(config.eval.datasets))
    if missing:
        raise P2PColdError(f"run config: eval.unseen names {', '.join(missing)}, which eval.datasets does not list")


# --------------------------------------------------------------------------- swarm (hivemind)
# Settings of the peer-to-peer layer, `p2pcold.swarm`. Every network wait there is bounded by one
# of the timeouts below (seconds); none waits forever. See docs/protocol-primitives.md.


@dataclass
class SwarmConfig:
    """How a peer joins the swarm, forms averaging groups and bounds every network wait."""

    # --- addresses and identity
    host: str = "127.0.0.1"  # interface p2pd listens on; `0.0.0.0` (or `::`) for other machines
    port: int = 0  # TCP port p2pd listens on; 0 picks a free one (a bootstrap peer wants a fixed one)
    # Addresses other peers should dial, e.g. `/ip4/203.0.113.7/tcp/31337`; needed when `host` is
    # 0.0.0.0 or behind NAT. Empty: p2pd announces what it listens on.
    announce_maddrs: list[str] = field(default_factory=list)
    # Private key file giving a stable peer id (created on first use). A bootstrap peer needs one so
    # that its multiaddr, which contains the peer id, stays valid across restarts. None: a random id.
    identity_path: str | None = None

    # --- averaging
    # Wire compression of the all-reduce: `none` (exact fp32), `fp16` (Float16Compression) or `8bit`
    # (Uniform8BitQuantization; pass reference=θ0 to BodyAverager with lossy modes, see
    # docs/protocol-primitives.md). State downloads are always sent uncompressed.
    compression: Literal["none", "fp16", "8bit"] = "none"
    # A group assembles as soon as it has this many peers (None: no cap; it assembles when the leader's
    # `matchmaking_time` runs out). Set it to the number of peers you expect at a boundary.
    target_group_size: int | None = None
    # Smaller groups are disbanded and matchmaking retried until the boundary deadline. Set it to the
    # number of expected peers to wait for all of them (the caller then falls back when one is missing).
    min_group_size: int = 2

    # --- timeouts (seconds)
    dht_startup_timeout: float = 60.0  # p2pd daemon start (hivemind's default 15 s is too short on a loaded box)
    bootstrap_timeout: float = 20.0  # reaching the initial peers, on top of dht_startup_timeout
    join_timeout: float = 15.0  # fetching/publishing the run identity in the DHT (whole join_run call)
    identity_settle_time: float = 1.0  # first peer re-reads its identity after this long to catch a rival founder
    identity_ttl: float = 7 * 24 * 3600.0  # DHT expiration of the identity record; each join_run refreshes it
    matchmaking_time: float = 5.0  # a leader waits this long for followers before assembling (min_matchmaking_time)
    request_timeout: float = 3.0  # one matchmaking request to a would-be leader; must be < matchmaking_time
    allreduce_timeout: float = 60.0  # the all-reduce once a group is formed (whole exchange of tensors)
    # A group member that sends no next chunk within this long is excluded (sender timeout; reducers get
    # twice this). Also the per-chunk timeout of state downloads (hivemind's own logic there is inverted,
    # so it is always set explicitly).
    next_chunk_timeout: float = 10.0
    boundary_deadline: float = 120.0  # how long a peer waits at an iteration boundary for a group
    state_download_timeout: float = 60.0  # a whole state download (donor discovery + transfer)
    state_declare_period: float = 30.0  # a state donor re-announces itself this often (its DHT record's lifetime)
    progress_ttl: float = 60.0  # a peer's progress record expires after this long unless re-published
    # --- centralized mode (the Repository, paper §2.3)
    peer_wait_timeout: float = 60.0  # the Repository waits this long for every configured dataset's peer to connect
    contributor_deadline: float = 3600.0  # the Repository waits this long for the sampled contributors to finish
    # What the Repository does when an iteration's fusion still fails at boundary_deadline (after retries):
    # `error` stops the run with a one-line error (non-zero exit); `skip` keeps θ_{i+1} = θ_i and goes on.
    on_fusion_failure: Literal["error", "skip"] = "error"
    assignment_timeout: float = 7200.0  # a peer waits this long for the Repository's next assignment or go
    poll_interval: float = 0.5  # how often a waiting process re-reads a DHT record
    dht_request_timeout: float = 10.0  # one DHT get/store (progress records, identity reads inside join_timeout)
    local_rpc_timeout: float = 15.0  # a call into hivemind's own background processes (pipes, locks)
    shutdown_timeout: float = 10.0  # graceful stop of the averager / DHT before they are killed


def validate_swarm_config(config: SwarmConfig) -> None:
    """Reject settings hivemind would deadlock or assert on, with one-line messages."""
    if config.compression not in ("none", "fp16", "8bit"):
        raise P2PColdError(f"swarm: compression={config.compression!r} is not one of none, fp16, 8bit")
    if config.on_fusion_failure not in ("error", "skip"):
        raise P2PColdError(f"swarm: on_fusion_failure={config.on_fusion_failure!r} is not one of error, skip")
    if not 0 <= config.port <= 65535:
        raise P2PColdError(f"swarm: port={config.port} is not a TCP port")
    if config.min_group_size < 2:
        raise P2PColdError("swarm: min_group_size must be at least 2")
    if config.target_group_size is not None and config.target_group_size < config.min_group_size:
        raise P2PColdError("swarm: target_group_size must be at least min_group_size")
    timeouts = (
        "dht_startup_timeout", "bootstrap_timeout", "join_timeout", "identity_ttl", "matchmaking_time",
        "request_timeout", "allreduce_timeout", "next_chunk_timeout", "boundary_deadline",
        "state_download_timeout", "state_declare_period", "progress_ttl", "dht_request_timeout",
        "peer_wait_timeout", "contributor_deadline", "assignment_timeout", "poll_interval",
        "local_rpc_timeout", "shutdown_timeout",
    )  # fmt: skip
    for name in timeouts:
        if not getattr(config, name) > 0:
            raise P2PColdError(f"swarm: {name} must be positive")
    if config.identity_settle_time < 0:
        raise P2PColdError("swarm: identity_settle_time must not be negative")
    if config.request_timeout >= config.matchmaking_time:
        raise P2PColdError("swarm: request_timeout must be below matchmaking_time (hivemind matchmaking can deadlock)")
    if config.boundary_deadline <= config.matchmaking_time:
        raise P2PColdError("swarm: boundary_deadline must exceed matchmaking_time")


# --------------------------------------------------------------------------- the run contract

# Fields every peer of a run must share, or their fused bodies mean different things. Not in it: the
# model's name (θ0's hash decides, and machines spell local folders differently), the dataset, and
# finetune.budget (a contributor's share of work: peers may finetune for different lengths).
CONTRACT_FIELDS = (
    "num_hidden_layers", "iterations", "contributors_per_iteration", "fusion_weighting", "seed",
    "finetune.learning_rate", "finetune.weight_decay", "finetune.warmup_ratio", "finetune.batch_size",
    "finetune.gradient_accumulation", "finetune.max_length", "finetune.head", "finetune.dropout",
    "finetune.optimizer", "finetune.precision",
)  # fmt: skip


def run_contract(config) -> dict:
    """`CONTRACT_FIELDS` of a run config, by dotted name (scalars only)."""
    contract = {}
    for name in CONTRACT_FIELDS:
        value = config
        for part in name.split("."):
            value = getattr(value, part)
        contract[name] = value
    return contract
