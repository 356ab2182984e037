"""Typed configuration: dataset recipes, finetuning, fusion and run settings, loaded from YAML.

Every section is a pydantic model whose fields carry their type and allowed range, so a YAML
file, a `--set KEY=VALUE` and a Python caller are checked the same way (also on assignment).
Keys that are not fields are rejected, so a typo never silently falls back to a default. Every
error is one line naming the field, the value, what is allowed and, for a YAML file, the line.
"""

from __future__ import annotations

import codecs
import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from p2pcold.utils import P2PColdError, recipe_dirs

class ConfigError(P2PColdError, ValueError):
    """A config value outside its type or range; the message is one line naming the field."""


# --------------------------------------------------------------------------- field types


def _not_a_bool(value: Any) -> Any:
    # pydantic reads `true` as 1 for a number; in a config that is always a mistake.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _number(tp: type, **bounds: Any) -> Any:
    return Annotated[tp, BeforeValidator(_not_a_bool), Field(**bounds)]


PositiveInt = _number(int, ge=1)
NonNegativeInt = _number(int, ge=0)
PositiveFloat = _number(float, gt=0)
NonNegativeFloat = _number(float, ge=0)
Fraction = _number(float, ge=0, lt=1)  # a share of something, below the whole
Seconds = _number(float, gt=0)
Text = Annotated[str, Field(min_length=1)]
TokenCount = _number(int, ge=2)  # room for the [CLS] and [SEP] tokens
Port = _number(int, ge=0, le=65535)  # 0: any free port
GroupSize = _number(int, ge=2)  # an averaging group of one averages nothing


class _Section(BaseModel):
    """Common settings: unknown keys are errors, values are checked on assignment too, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(describe(e, type(self))) from None

    # Tells pydantic this __init__ only wraps its own, so nested sections are validated in one pass
    # and an error keeps its full path (`finetune.budget.steps`).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError(describe(e, type(self))) from None


# --------------------------------------------------------------------------- sections


class RowFilter(_Section):
    """Keep rows whose `column` contains any of `keywords` (case-insensitive substring match)."""

    column: Text = "text"
    keywords: list[str] = Field(default_factory=list)


DATA_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # pandas decompresses these by extension


def file_format(path: Path) -> str | None:
    """`.csv`, `.jsonl`... for `data.csv` or `data.csv.gz`; None for anything unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSIONS
    if compressed:
        suffixes.pop()
    fmt = suffixes[-1] if suffixes else None
    if fmt not in DATA_FORMATS or (compressed and fmt == ".parquet"):  # parquet compresses internally
        return None
    return fmt


class DatasetSpec(_Section):
    """One contributor's dataset: where it is, which columns hold text and labels, how to split it."""

    name: str = ""
    # A local file (csv, tsv, json, jsonl, parquet; .gz/.bz2/.xz/.zst too), a file inside an
    # installed package written `pkg://package/relative/path`, or a hub id such as `glue`.
    source: str = ""
    hub_config: str | None = None  # e.g. `sst2` for source `glue`
    encoding: str | None = None  # for text files that are not UTF-8 (e.g. latin-1)
    text_column: Text = "text"
    text_pair_column: str | None = None  # second sentence for pair tasks (NLI, paraphrase)
    label_column: Text = "label"
    # Label values in class-index order. For string labels, rows whose label is not listed are
    # dropped only when `drop_unlisted_labels` is set; otherwise they are an error. Empty: the
    # distinct values of train's label column, sorted (p2pcold.data infers them when it reads the rows).
    label_names: list[str] = Field(default_factory=list)
    drop_unlisted_labels: bool = False
    filter: RowFilter | None = None
    max_examples: PositiveInt | None = None  # cap on train examples (after filtering and after dev/test are carved)
    # Hub split names; missing dev/test splits are carved from train with `split_fractions`.
    train_split: Text = "train"
    dev_split: str | None = "validation"
    test_split: str | None = "test"
    split_fractions: tuple[Fraction, Fraction] = (0.1, 0.1)  # dev, test fractions of the data
    max_eval_examples: PositiveInt | None = 1000  # cap on dev and test each, for speed
    split_seed: NonNegativeInt = 0
    # One of `num_shards` disjoint slices of train (dev and test stay whole), for federated runs
    # (§5.1). Usually set by referring to a recipe as `NAME@INDEX/COUNT`, e.g. `rotten_tomatoes@0/4`.
    shard_index: NonNegativeInt | None = None
    num_shards: PositiveInt | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError("must be a text encoding Python knows, e.g. utf-8 or latin-1") from None
        return value

    @field_validator("label_names")
    @classmethod
    def _distinct_labels(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} twice; each class has one name")
        return value

    @field_validator("split_fractions", mode="before")
    @classmethod
    def _two_fractions(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("must be two fractions [dev, test], e.g. [0.1, 0.1]")
        return value

    @field_validator("split_fractions")
    @classmethod
    def _some_left_for_train(cls, value: tuple[float, float]) -> tuple[float, float]:
        if sum(value) >= 1:
            raise ValueError("dev + test must leave some data for train (a sum below 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if self.shard_index is not None and self.num_shards is not None and self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index={self.shard_index} must be below num_shards={self.num_shards}")
        return self


class Budget(_Section):
    """How much local finetuning one iteration gets. The first limit reached ends it."""

    steps: PositiveInt | None = None  # optimizer steps
    examples: PositiveInt | None = None
    epochs: PositiveFloat | None = None
    seconds: Seconds | None = None  # wall clock: fast peers keep training, but runs are not reproducible

    def is_bounded(self) -> bool:
        return any(v is not None for v in (self.steps, self.examples, self.epochs, self.seconds))


class FinetuneConfig(_Section):
    """Local finetuning, App. B defaults: AdamW, lr 5e-5, linear decay, weight decay 0.01."""

    learning_rate: PositiveFloat = 5e-5
    weight_decay: NonNegativeFloat = 0.01
    warmup_ratio: Fraction = 0.0
    batch_size: PositiveInt = 16  # examples per forward pass
    gradient_accumulation: PositiveInt = 1  # effective batch = batch_size * gradient_accumulation
    # Tokens; batches are padded dynamically to their longest row. At most the model's positions
    # (checked when the tokenizer is loaded).
    max_length: TokenCount = 128
    budget: Budget = Field(default_factory=lambda: Budget(epochs=1))
    # Early stopping on dev accuracy (App. B): evaluate every `eval_every_examples` and stop when
    # accuracy improved by less than `early_stopping_min_delta` since the previous evaluation.
    eval_every_examples: PositiveInt | None = None
    early_stopping_min_delta: NonNegativeFloat = 0.001
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes, CUDA only
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast, CUDA only
    # The task head is local and never fused. `keep`: a contributor's head carries over to its
    # next iteration; `reinit`: a fresh head every iteration.
    head: Literal["keep", "reinit"] = "reinit"
    dropout: Fraction = 0.1
    # How the head reads the body: `mean` of the token states (MiniLM was trained as a mean-pooled
    # sentence encoder) or the first token's state, `cls` (the paper's RoBERTa head).
    pooling: Literal["mean", "cls"] = "mean"
    num_threads: PositiveInt | None = None  # torch CPU threads; None leaves torch's default


class AggregationConfig(_Section):
    """How one boundary's contributions become θ_{i+1} (issue 8): `p2pcold.fusion.aggregate`.

    The local run and every all-reduce reducer compute the same rule, so every field but
    `max_update_ratio` is in the run contract: peers with different rules would hold different bodies
    after the same boundary. `max_update_ratio` is what one member accepts, decided by it alone.
    """

    # `mean`: the paper's weighted mean (one rogue member moves it anywhere). `trimmed_mean`: per value,
    # the `trim_fraction` highest and lowest contributions are dropped after norm clipping. `auto`:
    # `trimmed_mean` once at least `robust_min_contributors` contribute, `mean` below (trimming 1 of 3
    # would make the median of three honest peers, not their average).
    rule: Literal["auto", "mean", "trimmed_mean"] = "auto"
    # 4: the smallest group in which one Byzantine member is outvoted on both sides of every value.
    robust_min_contributors: _number(int, ge=3) = 4
    # Share of contributions dropped on EACH side of every value (at least one); it tolerates that many
    # rogue members. Below 0.5 so that some contribution is always kept.
    trim_fraction: _number(float, gt=0, lt=0.5) = 0.25
    # A declared weight counts at most this multiple of the group's median declared weight, in every
    # rule: weights arrive from the senders and are never trusted as sent (a 1e6 weight took over the
    # mean). 4 leaves `fusion_weighting: examples` alone for datasets within 4x of the median size.
    weight_cap: _number(float, ge=1) = 4.0
    # trimmed_mean only: a contribution whose distance from the group's per-value median exceeds this
    # multiple of the median such distance is pulled back to it (per block, see fusion.BLOCK_VALUES).
    norm_clip: _number(float, ge=1) = 3.0
    # A member accepts a fused body only when, for every tensor, the group's average moved it at most this
    # multiple of the member's own update (L2 norms of θ_{i+1} − θ_i against θ^c − θ_i, before the merge's
    # scale and the outer step; fusion.overshoot). Else the fusion counts as failed: a group of 2 or 3
    # fuses with the mean, and one rogue in it would move the body anywhere. An honest mean moves no
    # tensor further than the largest honest update: 30 passes members whose budgets differ 100x (honest
    # ratios up to 15 measured; 1.05 with equal budgets, where 3 is enough), and refuses each of issue
    # 27's attacks (ratios of 307 and more). Not in the run contract: it decides only what this member
    # accepts.
    max_update_ratio: _number(float, ge=1) = 30.0


class EvalConfig(_Section):
    """The paper's evaluation (§3.4): CoLD finetunes the whole model, CoLD-Frozen the head only."""

    datasets: list[Text] = Field(default_factory=list)  # target recipes
    unseen: list[Text] = Field(default_factory=list)  # of `datasets`, those no contributor trains on
    modes: Annotated[list[Literal["cold", "frozen"]], Field(min_length=1)] = Field(default_factory=lambda: ["cold", "frozen"])
    few_shot: PositiveInt | None = None  # train the evaluation on only this many examples
    # Repeat each target's evaluation with this many seeds: each draws its own few-shot sample and
    # head initialisation, and results carry the mean and the spread over them. 1: one seeded draw.
    seeds: PositiveInt = 1
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    frozen_epochs: PositiveInt = 20  # head-only training runs over cached features, so it is cheap
    frozen_learning_rate: PositiveFloat = 1e-3  # a lone linear head needs a larger step than 5e-5
    every: NonNegativeInt = 1  # evaluate the fused base every N iterations (0: none between θ0 and the last)


class FusionConfig(_Section):
    """How contributions become θ_{i+1} (p2pcold.merging, docs/science.md). The defaults are the
    paper's: the mean of the bodies, a full outer step, no momentum, no backtracking."""

    # mean: the paper; task_arithmetic: base + scale·Σ deltas; ties: trim, elect sign, disjoint
    # mean (`p2pcold local` only); dare: drop deltas' entries at drop_rate and rescale, then the mean.
    method: Literal["mean", "task_arithmetic", "ties", "dare"] = "mean"
    scale: _number(float, gt=0, le=10) = 1.0  # λ of task_arithmetic and ties
    density: _number(float, gt=0, le=1) = 0.2  # share of each delta's entries TIES keeps (by magnitude)
    drop_rate: Fraction = 0.9  # share of each delta's entries DARE drops
    # θ_{i+1} = θ_i + outer_learning_rate·(merged − θ_i), with optional momentum (DiLoCo-style)
    outer_learning_rate: _number(float, gt=0, le=2) = 1.0
    outer_momentum: Fraction = 0.0
    nesterov: bool = False
    # §7 backtracking (`p2pcold local` only): score the fused base against θ_i on each member's dev
    # set (a linear probe on frozen features); when it is worse on most members, take
    # θ_i + backtrack_step·(fused − θ_i) instead (0: keep θ_i).
    backtrack: bool = False
    backtrack_step: Fraction = 0.0
    backtrack_examples: PositiveInt = 200  # train and dev examples per member for the probe

    @model_validator(mode="after")
    def _consistent(self) -> FusionConfig:
        if self.nesterov and not self.outer_momentum:
            raise ValueError("nesterov needs outer_momentum above 0")
        return self


class SimulateConfig(_Section):
    """`p2pcold simulate`: a whole swarm of real peer processes on one machine."""

    peers: PositiveInt | None = None  # peer processes, one dataset each (None: one per dataset)
    centralized: bool = False  # run through a Repository (the paper's §2.3) instead of all-reduce among peers
    keep_best: bool = True  # keep a copy of the best evaluated base besides the last
    refresh_seconds: Seconds = 2.0  # progress display period


class RunConfig(_Section):
    """One CoLD Fusion run (§2.3, §3.4): which contributors, how many iterations, how to fuse."""

    model: Text = "minilm"  # local folder, hub id, or `minilm` (the offline all-MiniLM-L6-v2)
    # Keep only the first N pretrained layers (faster demos); at most the model's (checked at load).
    num_hidden_layers: PositiveInt | None = None
    datasets: list[Text] = Field(default_factory=list)  # contributor recipes (names or YAML paths)
    contributors_per_iteration: PositiveInt | None = None  # k sampled per iteration; None: all of them
    iterations: PositiveInt = 3
    seed: NonNegativeInt = 0
    fusion_weighting: Literal["uniform", "examples"] = "uniform"
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)  # how contributions are combined
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: Text = "runs/local"
    run_id: Text = "p2pcold"
    keep_checkpoints: PositiveInt | None = 2  # newest checkpoints a peer keeps in its run folder (None: all)
    swarm: SwarmConfig = Field(default_factory=lambda: SwarmConfig())  # networked modes only
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)


# --------------------------------------------------------------------------- errors


def describe(error: ValidationError, model: type[BaseModel], where: str = "", lines: dict | None = None) -> str:
    """One line for pydantic's errors: where (file and line, or `--set KEY`), the field, the value, what is allowed.

    `lines` maps a field path (a tuple of keys) to the place it came from, e.g. `run.yaml line 7`."""
    problems = error.errors()
    first = problems[0]
    path = tuple(first["loc"])
    place = _place(path, lines or {}) or where
    prefix = f"{place}: " if place else ""
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    if first["type"] == "extra_forbidden":
        parent = path[:-1]
        unknown = [str(p["loc"][-1]) for p in problems if p["type"] == "extra_forbidden" and tuple(p["loc"][:-1]) == parent]
        known = sorted(_section_at(model, parent).model_fields)
        section = f" in {_dotted(parent)}" if parent else ""
        return f"{prefix}unknown field(s) {', '.join(unknown)}{section} (known: {', '.join(known)})"
    message = first["msg"].removeprefix("Value error, ")
    for pydantic_words, ours in _PLAIN_WORDS:
        message = message.replace(pydantic_words, ours)
    if first["type"] == "missing":
        return f"{prefix}{_dotted(path)} is missing{more}"
    value = first.get("input")
    shown = "" if isinstance(value, (dict, BaseModel)) else f"={value!r}"
    if place == f"--set {_dotted(path)}":  # the option already names the field
        return f"--set {_dotted(path)}{shown}: {message}{more}"
    field = f"{_dotted(path)}{shown}: " if path else ""
    return f"{prefix}{field}{message}{more}"


_PLAIN_WORDS = (
    ("Input should be", "must be"),
    ("greater than or equal to", "at least"),
    ("less than or equal to", "at most"),
    ("List should have at least 1 item after validation, not 0", "must list at least one value"),
)


def _dotted(path: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def _place(path: tuple, lines: dict) -> str | None:
    """The known place of `path`, of a `--set` below it, or of its nearest parent."""
    if path not in lines:
        below = [place for key, place in lines.items() if key[: len(path)] == path and place.startswith("--set ")]
        if below:
            return below[0]
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _section_at(model: type[BaseModel], path: tuple) -> type[BaseModel]:
    for key in path:
        annotation = model.model_fields[key].annotation
        model = next(a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel))
    return model


# --------------------------------------------------------------------------- YAML loading


def from_dict(cls: type[BaseModel], data: dict, where: str = "config", lines: dict | None = None) -> Any:
    """Validate `data` as `cls`; errors become one-line ConfigErrors (`lines`: see `describe`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, cls, where, lines)) from None


def to_dict(obj: BaseModel) -> dict:
    """Every field, defaults included, as plain YAML/JSON values."""
    return obj.model_dump(mode="json")


def load_yaml(path: str | os.PathLike) -> dict:
    return _read_yaml(path)[0]


def _read_yaml(path: str | os.PathLike) -> tuple[dict, dict]:
    """The mapping in a YAML file and the line of every key in it: {(key, subkey...): "FILE line N"}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise P2PColdError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise P2PColdError(f"{path}: is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise P2PColdError(f"{path}: not a YAML text file (binary or not UTF-8)") from None
    except OSError as e:
        raise P2PColdError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise P2PColdError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise P2PColdError(f"{path}: expected a YAML mapping (key: value lines) at the top level")
    lines: dict[tuple, str] = {}
    _key_lines(node, (), str(path), lines)
    return data, lines


def _key_lines(node: yaml.Node, path: tuple, file: str, lines: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[(*path, key.value)] = f"{file} line {key.start_mark.line + 1}"
            _key_lines(value, (*path, key.value), file, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = f"{file} line {item.start_mark.line + 1}"
            _key_lines(item, (*path, i), file, lines)


def apply_overrides(data: dict, overrides: dict, lines: dict) -> None:
    """Set dotted keys (`finetune.budget.steps`) in `data`; errors then name `--set KEY`."""
    for dotted, value in overrides.items():
        keys = tuple(dotted.split("."))
        if not all(keys):
            raise P2PColdError(f"--set {dotted}: a key is written SECTION.FIELD, e.g. finetune.budget.steps")
        node = data
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise P2PColdError(f"--set {dotted}: {'.'.join(keys[: depth + 1])} is a value, not a section")
        node[keys[-1]] = value
        for known in [k for k in lines if k[: len(keys)] == keys]:
            del lines[known]  # the YAML's lines below the key no longer apply
        lines[keys] = f"--set {dotted}"


def resolve_recipe_path(name_or_path: str) -> Path:
    """A dataset recipe by path, or by name: `NAME.yaml` in the recipe folders (`utils.recipe_dirs`)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise P2PColdError(f"{name_or_path}: recipe file not found")
        return candidate
    return _named_yaml(name_or_path, "dataset recipe")


def resolve_run_config_path(name_or_path: str | os.PathLike) -> Path:
    """A run config by path, or a preset by name (`demo`, `transfer`: `runs/NAME.yaml` in the recipe folders)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists() or os.sep in str(name_or_path):
        return candidate  # reading it reports a missing one
    return _named_yaml(str(name_or_path), "run preset", "runs")


def _named_yaml(name: str, kind: str, subfolder: str = "") -> Path:
    """`NAME.yaml` in the first of the recipe folders that holds it; else one line listing every name they hold."""
    folders = [folder / subfolder for folder in recipe_dirs()]
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    names = {folder: ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none" for folder in folders}
    known = "; ".join(f"in {folder}: {listed}" for folder, listed in names.items())
    raise P2PColdError(f"unknown {kind} {name!r} (known {known})")


def data_file_spec(path: str, text_column: str = "text", label_column: str = "label") -> DatasetSpec:
    """A local data file as a recipe: its rows are one pool (dev and test are carved from it), its name is
    the file's, and its label names are the distinct values of its label column."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise P2PColdError(f"{path}: " + ("a folder, not a data file" if file.is_dir() else "data file not found"))
    extension = file.suffixes[-2:] if file.suffix.lower() in COMPRESSIONS else file.suffixes[-1:]  # .csv.gz, .csv
    fields = {"name": file.name[: -len("".join(extension))], "source": str(file.resolve())}
    return from_dict(DatasetSpec, {**fields, "text_column": text_column, "label_column": label_column}, where=str(path))


def load_dataset_spec(
    reference: str | DatasetSpec, text_column: str | None = None, label_column: str | None = None
) -> DatasetSpec:
    """A recipe by name or path, or a data file (`data_file_spec`; `text_column` and `label_column` name
    its columns); `NAME@INDEX/COUNT` selects one shard of its train split. A spec is returned as it is."""
    if isinstance(reference, DatasetSpec):
        return reference
    name_or_path, _, shard = reference.partition("@")
    named = {"text_column": text_column, "label_column": label_column}
    columns = {key: value for key, value in named.items() if value is not None}
    if file_format(Path(name_or_path)) is not None:
        spec = data_file_spec(name_or_path, **columns)
    elif columns:
        formats = ", ".join(DATA_FORMATS)
        raise P2PColdError(
            f"{name_or_path}: a recipe names its own columns (text_column, label_column); "
            f"the column options are for a data file ({formats})"
        )
    else:
        path = resolve_recipe_path(name_or_path)
        data, lines = _read_yaml(path)
        data.setdefault("name", path.stem)
        spec = from_dict(DatasetSpec, data, where=str(path), lines=lines)
        if not spec.source:
            raise P2PColdError(f"{path}: `source` is required")
    if shard:
        index, _, count = shard.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise P2PColdError(f"{reference}: a shard is written NAME@INDEX/COUNT with INDEX < COUNT, e.g. {name_or_path}@0/4")
        spec.shard_index, spec.num_shards = int(index), int(count)
        spec.name = f"{spec.name}@{index}of{count}"
    return spec


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, needs_datasets: bool = True) -> RunConfig:
    """A run config from YAML or a preset's name (None: all defaults), with dotted-key overrides applied on top.

    `needs_datasets=False` for a single peer, a bootstrap node, `status` or `evaluate`, which need
    the run's settings but not its list of contributors."""
    path = resolve_run_config_path(path) if path is not None else None
    data, lines = _read_yaml(path) if path is not None else ({}, {})
    apply_overrides(data, overrides or {}, lines)
    config = from_dict(RunConfig, data, where=str(path or "run config"), lines=lines)
    validate_run_config(config, needs_datasets)
    return config


load_run_config = load_config  # the name the recipes and tests have always used


def check_recipes(names: list[str]) -> None:
    """Read each recipe, so that a bad one is reported before any model is loaded."""
    for name in dict.fromkeys(names):
        load_dataset_spec(name)


def validate_run_config(config: RunConfig, needs_datasets: bool = True) -> None:
    if needs_datasets and not config.datasets:
        raise P2PColdError("run config: `datasets` lists no contributor recipe")
    if len(set(config.datasets)) != len(config.datasets):
        raise P2PColdError("run config: `datasets` lists a recipe twice")
    k = config.contributors_per_iteration
    if k is not None and config.datasets and not 1 <= k <= len(config.datasets):
        raise P2PColdError(f"run config: contributors_per_iteration={k} must be between 1 and {len(config.datasets)} (the number of datasets)")
    for name, budget in (("finetune.budget", config.finetune.budget), ("eval.finetune.budget", config.eval.finetune.budget)):
        if not budget.is_bounded():
            raise P2PColdError(f"run config: {name} sets no limit (steps, examples, epochs or seconds)")
    missing = sorted(set(config.eval.unseen) - set(config.eval.datasets))
    if missing:
        raise P2PColdError(f"run config: eval.unseen names {', '.join(missing)}, which eval.datasets does not list")


# --------------------------------------------------------------------------- swarm (hivemind)
# Settings of the peer-to-peer layer, `p2pcold.swarm`. Every network wait there is bounded by one
# of the timeouts below (seconds); none waits forever. See docs/protocol-primitives.md.


class SwarmConfig(_Section):
    """How a peer joins the swarm, forms averaging groups and bounds every network wait."""

    # --- addresses and identity
    host: Text = "127.0.0.1"  # interface p2pd listens on; `0.0.0.0` (or `::`) for other machines
    port: Port = 0  # TCP port p2pd listens on; 0 picks a free one (a bootstrap peer wants a fixed one)
    # Addresses other peers should dial, e.g. `/ip4/203.0.113.7/tcp/31337`; needed when `host` is
    # 0.0.0.0 or behind NAT. Empty: p2pd announces what it listens on.
    announce_maddrs: list[str] = Field(default_factory=list)
    # Private key file giving a stable peer id (created on first use). A bootstrap peer needs one so
    # that its multiaddr, which contains the peer id, stays valid across restarts. None: a random id.
    identity_path: str | None = None
    # --- reachability (peers behind NAT, docs/protocol.md "Volunteers behind NAT")
    # `auto`: at start, swarm members dial this peer's addresses back; a peer they cannot dial joins as a
    # client (dials out only: it fuses and downloads state but never reduces or serves state) with
    # libp2p relays on. `public` / `client` skip the check. A swarm on 127.0.0.1 is always public.
    reachability: Literal["auto", "public", "client"] = "auto"
    relay: bool = True  # a publicly reachable node relays for members behind NAT (libp2p circuit relay v2)
    # sha256 of θ0 (utils.state_dict_hash; `p2pcold: error: ... pin θ0 ...` prints it) that this run must
    # start from. Pinned, the run config is the authority on the run's identity: an identity record in
    # the DHT that differs from it (a forged one included) is ignored instead of refusing this peer.
    theta0_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    # --- averaging
    # Wire compression of the all-reduce: `none` (exact fp32), `fp16` (Float16Compression), `8bit`
    # (hivemind's Uniform8BitQuantization: one grid per part, mean ± 3σ), `block8` / `block4` (8 / 4 bits
    # a value with one absmax scale per 256 values: swarm/compression.py). A lossy mode sends each peer's
    # body minus the base of the iteration being fused, not minus θ0 (docs/protocol-primitives.md).
    # State downloads are always sent uncompressed.
    compression: Literal["none", "fp16", "8bit", "block8", "block4"] = "none"
    # None: one group of everyone at a boundary, which assembles as soon as the peers the records show
    # there are all in (else when the leader's `matchmaking_time` runs out). Set below the number of
    # peers at a boundary, the decentralized peers fuse in Moshpit rounds of groups this size
    # (ceil(log_g n) rounds; docs/protocol.md), after a settle wait of one matchmaking_time.
    target_group_size: GroupSize | None = None
    # Smaller groups are disbanded and matchmaking retried until the boundary deadline. Set it to the
    # number of expected peers to wait for all of them (the caller then falls back when one is missing).
    min_group_size: GroupSize = 2

    # --- timeouts (seconds)
    dht_startup_timeout: Seconds = 60.0  # p2pd daemon start (hivemind's default 15 s is too short on a loaded box)
    bootstrap_timeout: Seconds = 20.0  # reaching the initial peers, on top of dht_startup_timeout
    # the whole join_run: two identity reads and two stores, each up to dht_request_timeout on a loaded box
    join_timeout: Seconds = 30.0
    identity_settle_time: NonNegativeFloat = 1.0  # first peer re-reads its identity after this long to catch a rival founder
    identity_ttl: Seconds = 7 * 24 * 3600.0  # DHT expiration of the identity record; each join_run refreshes it
    matchmaking_time: Seconds = 5.0  # a leader waits this long for followers before assembling (min_matchmaking_time)
    request_timeout: Seconds = 3.0  # one matchmaking request to a would-be leader; must be < matchmaking_time
    allreduce_timeout: Seconds = 60.0  # the all-reduce once a group is formed (whole exchange of tensors)
    # A group member that sends no next chunk within this long is excluded (sender timeout; reducers get
    # twice this). Also the per-chunk timeout of state downloads (hivemind's own logic there is inverted,
    # so it is always set explicitly).
    next_chunk_timeout: Seconds = 10.0
    boundary_deadline: Seconds = 120.0  # how long a peer waits at an iteration boundary for a group
    state_download_timeout: Seconds = 60.0  # a whole state download (donor discovery + transfer)
    state_declare_period: Seconds = 30.0  # a state donor re-announces itself this often (its DHT record's lifetime)
    reachability_timeout: Seconds = 20.0  # the whole dial-back check at start (every member asked in parallel)
    dial_back_timeout: Seconds = 5.0  # a member's TCP dial of one of this peer's addresses; below reachability_timeout
    progress_ttl: Seconds = 60.0  # a peer's progress record expires after this long unless re-published
    # A peer measures its dev accuracy while the boundary's all-reduce runs, and writes each checkpoint
    # while the next iteration trains (docs/protocol.md, "The boundary"). false: both in line, before the
    # boundary and before the next iteration: the same results, more time not training.
    overlap_boundary: bool = True
    # --- centralized mode (the Repository, paper §2.3)
    peer_wait_timeout: Seconds = 60.0  # the Repository waits this long for every configured dataset's peer to connect
    contributor_deadline: float = 3600.0  # the Repository waits this long for the sampled contributors to finish
    # What the Repository does when an iteration's fusion still fails at boundary_deadline (after retries):
    # `error` stops the run with a one-line error (non-zero exit); `skip` keeps θ_{i+1} = θ_i and goes on.
    on_fusion_failure: Literal["error", "skip"] = "error"
    assignment_timeout: Seconds = 7200.0  # a peer waits this long for the Repository's next assignment or go
    poll_interval: Seconds = 0.5  # how often a waiting process re-reads a DHT record
    dht_request_timeout: Seconds = 10.0  # one DHT get/store (progress records, identity reads inside join_timeout)
    publish_timeout: Seconds = 60.0  # a record peers wait on (the Repository's word) is stored again until the DHT confirms it
    local_rpc_timeout: Seconds = 15.0  # a call into hivemind's own background processes (pipes, locks)
    shutdown_timeout: Seconds = 10.0  # graceful stop of the averager / DHT before they are killed


    @model_validator(mode="after")
    def _consistent(self) -> SwarmConfig:
        """Settings hivemind would deadlock or assert on."""
        if self.target_group_size is not None and self.target_group_size < self.min_group_size:
            raise ValueError(f"target_group_size={self.target_group_size} must be at least min_group_size={self.min_group_size}")
        if self.request_timeout >= self.matchmaking_time:
            raise ValueError(
                f"request_timeout={self.request_timeout} must be below matchmaking_time={self.matchmaking_time} (hivemind matchmaking can deadlock)"
            )
        if self.dial_back_timeout >= self.reachability_timeout:
            raise ValueError(f"dial_back_timeout={self.dial_back_timeout} must be below reachability_timeout={self.reachability_timeout}")
        if self.boundary_deadline <= self.matchmaking_time:
            raise ValueError(f"boundary_deadline={self.boundary_deadline} must exceed matchmaking_time={self.matchmaking_time}")
        return self


RunConfig.model_rebuild()  # it names SwarmConfig, defined after it


def validate_swarm_config(config: SwarmConfig) -> None:
    """Check a SwarmConfig again (its fields may have been set without validation), with one-line messages."""
    from_dict(SwarmConfig, config.model_dump(), where="swarm")


# --------------------------------------------------------------------------- the run contract

# Fields every peer of a run must share, or their fused bodies mean different things. Not in it: the
# model's name (θ0's hash decides, and machines spell local folders differently), the dataset, and
# finetune.budget (a contributor's share of work: peers may finetune for different lengths).
CONTRACT_FIELDS = (
    "num_hidden_layers", "iterations", "contributors_per_iteration", "fusion_weighting", "seed",
    "finetune.learning_rate", "finetune.weight_decay", "finetune.warmup_ratio", "finetune.batch_size",
    "finetune.gradient_accumulation", "finetune.max_length", "finetune.head", "finetune.dropout",
    "finetune.optimizer", "finetune.precision", "finetune.pooling",
    "fusion.method", "fusion.scale", "fusion.density", "fusion.drop_rate", "fusion.outer_learning_rate",
    "fusion.outer_momentum", "fusion.nesterov",
    "aggregation.rule", "aggregation.robust_min_contributors", "aggregation.trim_fraction",
    "aggregation.weight_cap", "aggregation.norm_clip",
    "swarm.compression",  # the wire codec, and whether peers send updates from θ_i or bodies from θ0
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


# --------------------------------------------------------------------------- the run config a swarm publishes

# Fields that belong to one node, not to the run: where it listens, its key, its folders and threads.
# The config a run's owner publishes leaves them out, and a volunteer sets them with flags.
NODE_FIELDS = (
    "output_dir",
    "keep_checkpoints",
    "simulate",
    "finetune.num_threads",
    "swarm.host",
    "swarm.port",
    "swarm.announce_maddrs",
    "swarm.identity_path",
    "swarm.reachability",
    "swarm.relay",
)


def published_config(config: RunConfig) -> dict:
    """What a run's owner publishes in the DHT: every field of `config` but the NODE_FIELDS."""
    data = to_dict(config)
    for name in NODE_FIELDS:
        *parents, last = name.split(".")
        section = data
        for part in parents:
            section = section[part]
        section.pop(last)
    return data


def load_published_config(data: dict, overrides: dict, where: str) -> RunConfig:
    """A run config from the record a swarm published, with this node's `overrides` on top.

    Overrides are checked like `--set` on a file; one that changes a run-contract field is refused,
    naming it: the swarm would refuse this peer at join for the same reason, after a model load."""
    published = from_dict(RunConfig, data, where=where)
    lines: dict[tuple, str] = {}
    data = copy.deepcopy(data)  # fields it leaves out stay unset: a peer's defaults (its host) still apply
    apply_overrides(data, overrides, lines)
    config = from_dict(RunConfig, data, where=where, lines=lines)
    validate_run_config(config, needs_datasets=False)
    mine, theirs = run_contract(config), run_contract(published)
    changed = [name for name in CONTRACT_FIELDS if mine[name] != theirs[name]]
    if changed:
        name = changed[0]
        raise ConfigError(
            f"--set {name}={mine[name]!r}: {name} is part of the run contract ({where} has {theirs[name]!r}); "
            "a volunteer may change only what is theirs (device, budget, threads, folders, addresses)"
        )
    return config


def config_summary(config: RunConfig) -> str:
    """One line with what a volunteer cares about in a run config."""
    finetune, budget = config.finetune, config.finetune.budget
    limits = [f"{value} {name}" for name, value in budget.model_dump().items() if value is not None]
    layers = f" ({config.num_hidden_layers} layers)" if config.num_hidden_layers else ""
    return (
        f"run {config.run_id}: model {config.model}{layers}, {config.iterations} iterations, "
        f"finetuning {' / '.join(limits)} per iteration at lr {finetune.learning_rate:g}, "
        f"batch {finetune.batch_size}, max {finetune.max_length} tokens, {finetune.precision}; "
        f"fusion {config.fusion.method}, aggregation {config.aggregation.rule}, "
        f"compression {config.swarm.compression}"
    )
