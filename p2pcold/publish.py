"""Publishing a run's best fused base to the Hugging Face Hub, with a model card.

The card is built from the run folder alone (config.yaml, results.json), so it can be checked
without a network. An upload that cannot happen (offline, no token, no access) is one warning line:
publishing is a side effect of a run, never a reason to stop it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from p2pcold.config import RunConfig, load_dataset_spec
from p2pcold.results import EvalResult, summary_table
from p2pcold.utils import get_logger

log = get_logger("publish")

CITATION = """@article{don-yehiya2022cold,
  title   = {ColD Fusion: Collaborative Descent for Distributed Multitask Finetuning},
  author  = {Don-Yehiya, Shachar and Venezian, Elad and Raffel, Colin and Slonim, Noam and Katz, Yoav and Choshen, Leshem},
  journal = {arXiv preprint arXiv:2212.01378},
  year    = {2022}
}"""


def model_card(config: RunConfig, results: Sequence[EvalResult], iteration: int, contributors: Sequence[str]) -> str:
    """README.md of the published base: what it is, how it was made, how it scores, whom to credit."""
    rows = [r for r in results if r.iteration in (0, iteration)]
    fused = sorted({r.iteration for r in results if r.iteration > 0})
    names = sorted(load_dataset_spec(d).name for d in config.datasets) if not contributors else sorted(contributors)
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [p2pcold, cold-fusion, collaborative-descent]",
        "---",
        f"# p2pcold run `{config.run_id}`: fused base of iteration {iteration}",
        "",
        f"A shared encoder made by CoLD Fusion (collaborative descent) over a peer-to-peer swarm with "
        f"p2pcold: each iteration every contributor finetuned the base on its own "
        f"dataset and the swarm averaged the encoders. Starting model: `{config.model}`"
        + (f" (first {config.num_hidden_layers} layers)" if config.num_hidden_layers else "") + ".",
        "",
        f"- iterations: {iteration} of {config.iterations} (evaluated: {', '.join(map(str, fused)) or 'none'})",
        f"- contributors ({len(names)}): {', '.join(names)}",
        f"- fusion weighting: {config.fusion_weighting}; seed {config.seed}",
        "",
        "## Results",
        "Mean test accuracy on the evaluation targets: CoLD finetunes the whole model from the base, "
        "Frozen trains only a new head on it (the paper's §3.4); iteration 0 is the pretrained model.",
        "",
        "```",
        summary_table(rows),
        "```",
        "",
        "## Citation",
        "```bibtex",
        CITATION,
        "```",
        "",
    ])  # fmt: skip


def why_no_upload() -> str | None:
    """Why an upload cannot even be tried (offline mode, no token), or None."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return "offline (HF_HUB_OFFLINE is set)"
    if get_token() is None:
        return "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
    return None


def push_to_hub(folder: Path, repo_id: str, card: str, iteration: int) -> bool:
    """Upload `folder` (a Hugging Face model folder) and its card to `repo_id`; False (one warning line)
    when the upload cannot happen."""
    reason = why_no_upload()
    if reason is None:
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"p2pcold: fused base of iteration {iteration}")
            api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, commit_message="p2pcold: model card")
        except Exception as e:  # no network, no access, a hub outage: the run goes on
            reason = (" ".join(str(e).split()) or type(e).__name__)[:300]
    if reason is not None:
        log.warning("push to hub %s skipped: %s", repo_id, reason)
        return False
    log.info("pushed the fused base of iteration %d to https://huggingface.co/%s", iteration, repo_id)
    return True
