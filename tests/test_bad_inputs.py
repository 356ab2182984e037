"""Every bad input and fault through the real CLI (a subprocess each, run concurrently).

Each case must end with the expected exit code, exactly one `p2pcold: error:` line that names the
thing, no traceback, no process left in its session, and no file changed in its folder except
those that were the tool's to change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from p2pcold.testing import build_tiny_encoder
from toy_data import write_toy_dataset

EXIT_BAD_INPUT, EXIT_TERMINATED = 2, 143


@dataclass
class Case:
    args: list[str]
    expected: str  # text the error line must contain
    code: int = EXIT_BAD_INPUT
    mutable: tuple[str, ...] = ()  # paths (relative to the case folder) the tool may change
    sigterm_after: str | None = None  # send SIGTERM once stderr shows this text
    forbidden: str | None = None  # text the error line must not contain


# --------------------------------------------------------------------------- the table

FIELD_CASES = {  # --set KEY=VALUE on a valid config -> text of the error
    "finetune.learning_rate=-1": "finetune.learning_rate=-1: must be greater than 0",
    "finetune.learning_rate=0": "finetune.learning_rate=0",
    "finetune.learning_rate=abc": "finetune.learning_rate='abc': must be a valid number",
    "finetune.learning_rate=.nan": "finetune.learning_rate",
    "finetune.weight_decay=-0.1": "finetune.weight_decay=-0.1",
    "finetune.warmup_ratio=1.5": "finetune.warmup_ratio=1.5: must be less than 1",
    "finetune.batch_size=0": "finetune.batch_size=0: must be at least 1",
    "finetune.batch_size=2.5": "finetune.batch_size=2.5",
    "finetune.gradient_accumulation=0": "finetune.gradient_accumulation=0",
    "finetune.max_length=0": "finetune.max_length=0: must be at least 2",
    "finetune.budget.steps=-5": "finetune.budget.steps=-5",
    "finetune.budget.steps=0": "finetune.budget.steps=0",
    "finetune.budget.examples=0": "finetune.budget.examples=0",
    "finetune.budget.epochs=-1": "finetune.budget.epochs=-1",
    "finetune.budget.seconds=0": "finetune.budget.seconds=0",
    "finetune.budget={}": "finetune.budget sets no limit",
    "finetune.eval_every_examples=0": "finetune.eval_every_examples=0",
    "finetune.early_stopping_min_delta=-1": "finetune.early_stopping_min_delta=-1",
    "finetune.optimizer=sgd": "finetune.optimizer='sgd': must be 'adamw' or 'adamw8bit'",
    "finetune.precision=fp8": "finetune.precision='fp8'",
    "finetune.head=drop": "finetune.head='drop'",
    "finetune.dropout=1": "finetune.dropout=1",
    "finetune.num_threads=0": "finetune.num_threads=0",
    "finetune.lr=1e-4": "unknown field(s) lr in finetune",
    "finetune=3": "finetune=3",
    "iterations=0": "iterations=0: must be at least 1",
    "iterations=true": "iterations=True: must be a number",
    "iteration=3": "unknown field(s) iteration",
    "seed=-1": "seed=-1",
    "num_hidden_layers=-1": "num_hidden_layers=-1",
    "contributors_per_iteration=0": "contributors_per_iteration=0",
    "contributors_per_iteration=5": "contributors_per_iteration=5 must be between 1 and 1",
    "fusion_weighting=median": "fusion_weighting='median'",
    "aggregation.rule=median": "aggregation.rule='median'",
    "aggregation.trim_fraction=0.5": "aggregation.trim_fraction=0.5: must be less than 0.5",
    "aggregation.weight_cap=0.5": "aggregation.weight_cap=0.5: must be at least 1",
    "aggregation.robust_min_contributors=2": "aggregation.robust_min_contributors=2: must be at least 3",
    "keep_checkpoints=0": "keep_checkpoints=0",
    "model=": "model=None",
    "datasets=[]": "`datasets` lists no contributor recipe",
    "run_id=''": "run_id=''",
    "eval.modes=[]": "eval.modes=[]: must list at least one value",
    "eval.modes=[fast]": "eval.modes[0]='fast'",
    "eval.few_shot=0": "eval.few_shot=0",
    "eval.frozen_epochs=0": "eval.frozen_epochs=0",
    "eval.frozen_learning_rate=-1": "eval.frozen_learning_rate=-1",
    "eval.every=-1": "eval.every=-1",
    "eval.unseen=[nowhere]": "eval.unseen names nowhere",
    "eval.finetune.budget.steps=0": "eval.finetune.budget.steps=0",
    "swarm.port=70000": "swarm.port=70000: must be at most 65535",
    "swarm.boundary_deadline=abc": "swarm.boundary_deadline='abc'",
    "swarm.min_group_size=1": "swarm.min_group_size=1",
    "swarm.request_timeout=10": "request_timeout=10.0 must be below matchmaking_time",
    "swarm.compression=4bit": "swarm.compression='4bit'",
    "swarm.join_timeout=0": "swarm.join_timeout=0",
    "simulate.peers=0": "simulate.peers=0",
    "simulate.refresh_seconds=0": "simulate.refresh_seconds=0",
    "finetune.budget.steps.x=1": "finetune.budget.steps",
}

RECIPE_CASES = {  # recipe fields -> text of the error
    "split_fractions: [0.1]": "split_fractions=[0.1]: must be two fractions",
    "split_fractions: [0.5, 0.6]": "dev + test must leave some data for train",
    "encoding: klingon": "encoding='klingon'",
    "max_examples: 0": "max_examples=0",
    "text_column: ''": "text_column=''",
    "colour: blue": "unknown field(s) colour",
}


def build_cases(root: Path, model: Path, recipe: Path) -> dict[str, Case]:
    """The cases, each with its own folder `root/NAME` prepared here."""
    cases: dict[str, Case] = {}

    def folder(name: str) -> Path:
        path = root / name.replace("/", "_").replace(" ", "_")
        path.mkdir(parents=True)
        return path

    def run_config(path: Path, **fields) -> Path:
        data = {"model": str(model), "datasets": [str(recipe)], "iterations": 1, "output_dir": str(path / "run")}
        data.update(fields)
        (path / "run.yaml").write_text(yaml.safe_dump(data))
        return path / "run.yaml"

    for setting, expected in FIELD_CASES.items():
        name = f"set {setting}"
        cases[name] = Case(["local", str(run_config(folder(name))), "--set", setting], expected)

    for line, expected in RECIPE_CASES.items():
        name = f"recipe {line}"
        path = folder(name)
        bad = path / "bad_recipe.yaml"
        bad.write_text(recipe.read_text() + line + "\n")
        cases[name] = Case(["local", str(run_config(path, datasets=[str(bad)]))], expected)

    path = folder("yaml line number")
    (path / "run.yaml").write_text(f"model: {model}\ndatasets: [{recipe}]\nfinetune:\n  batch_size: 8\n  learning_rate: -3\n")
    cases["yaml line number"] = Case(["local", str(path / "run.yaml")], "run.yaml line 5: finetune.learning_rate=-3")
    path = folder("yaml syntax")
    (path / "run.yaml").write_text("datasets: [a\nfinetune: {\n")
    cases["yaml syntax"] = Case(["local", str(path / "run.yaml")], "run.yaml: not valid YAML")
    path = folder("yaml list")
    (path / "run.yaml").write_text("- a\n- b\n")
    cases["yaml list"] = Case(["local", str(path / "run.yaml")], "expected a YAML mapping")
    path = folder("yaml binary")
    (path / "run.yaml").write_bytes(os.urandom(512))
    cases["yaml binary"] = Case(["local", str(path / "run.yaml")], "run.yaml")
    path = folder("config missing")
    cases["config missing"] = Case(["local", str(path / "nope.yaml")], "nope.yaml: file not found")
    path = folder("set syntax")
    cases["set syntax"] = Case(["local", str(run_config(path)), "--set", "iterations"], "--set expects KEY=VALUE")
    path = folder("duplicate dataset")
    cases["duplicate dataset"] = Case(["local", str(run_config(path, datasets=[str(recipe), str(recipe)]))], "lists a recipe twice")
    path = folder("unknown recipe")
    cases["unknown recipe"] = Case(["local", str(run_config(path, datasets=["no_such_recipe"]))], "unknown dataset recipe 'no_such_recipe'")
    path = folder("bad shard")
    cases["bad shard"] = Case(["local", str(run_config(path, datasets=[f"{recipe}@5/4"]))], "NAME@INDEX/COUNT")
    path = folder("recipe binary")
    (path / "binary.yaml").write_bytes(b"\x00\xff" * 300)
    cases["recipe binary"] = Case(["local", str(run_config(path, datasets=[str(path / "binary.yaml")]))], "binary.yaml")
    path = folder("evaluate set")
    cases["evaluate set"] = Case(
        ["evaluate", "--base", str(model), "--datasets", str(recipe), "--output", str(path / "out"), "--set", "eval.frozen_epochs=0"],
        "eval.frozen_epochs=0",
    )
    path = folder("config show")
    cases["config show"] = Case(["config", "show", "--set", "swarm.port=-1"], "swarm.port=-1")

    # ---- corrupt files
    def broken_model(path: Path, damage: str) -> Path:
        copy = path / "model"
        copy.mkdir()
        for item in model.iterdir():
            (copy / item.name).write_bytes(item.read_bytes())
        weights = copy / "model.safetensors"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "random":
            weights.write_bytes(os.urandom(4096))
        elif damage == "config":
            (copy / "config.json").write_text('{"model_type": "bert", "hidden')
        return copy

    for damage in ("truncated", "random", "config"):
        path = folder(f"model {damage}")
        cases[f"model {damage}"] = Case(["local", str(run_config(path, model=str(broken_model(path, damage))))], str(path / "model"))
        path = folder(f"evaluate base {damage}")
        cases[f"evaluate base {damage}"] = Case(
            ["evaluate", "--base", str(broken_model(path, damage)), "--datasets", str(recipe), "--output", str(path / "out")], str(path / "model")
        )

    for damage in ("truncated weights", "truncated latest.json", "damaged metadata"):
        path = folder(f"resume {damage}")
        run = path / "run"
        checkpoint = run / "checkpoints" / "iter-0001"
        checkpoint.mkdir(parents=True)
        for item in model.iterdir():
            (checkpoint / item.name).write_bytes(item.read_bytes())
        (checkpoint / "p2pcold.json").write_text(json.dumps({"iteration": 1, "run_id": "p2pcold", "base_model": str(model), "base_hash": "x"}))
        (run / "latest.json").write_text(json.dumps({"iteration": 1, "checkpoint": "checkpoints/iter-0001"}))
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # the only checkpoint is damaged in every case
        if damage == "truncated latest.json":
            (run / "latest.json").write_text('{"iteration": 1, "chec')
        if damage == "damaged metadata":
            (checkpoint / "p2pcold.json").write_text("{not json")
        config = run_config(path, iterations=2)
        subprocess.run([sys.executable, "-m", "p2pcold.cli", "config", "show", str(config)], stdout=open(run / "config.yaml", "w"), check=True)
        cases[f"resume {damage}"] = Case(["local", str(config)], "holds no intact checkpoint")

    path = folder("evaluate checkpoint metadata")
    (broken_model(path, "none") / "p2pcold.json").write_text("[1, 2")
    cases["evaluate checkpoint metadata"] = Case(["evaluate", "--base", str(path / "model"), "--datasets", str(recipe), "--output", str(path / "out")], "p2pcold.json")

    path = folder("data binary csv")
    (path / "data.csv").write_bytes(b"PK\x03\x04\x00\x00" + os.urandom(2000))
    data_recipe = path / "binary_data.yaml"
    data_recipe.write_text(yaml.safe_dump({"source": str(path / "data.csv"), "label_names": ["neg", "pos"]}))
    cases["data binary csv"] = Case(
        ["evaluate", "--base", str(model), "--datasets", str(data_recipe), "--output", str(path / "out")], "a binary file, not csv text", forbidden="latin-1"
    )

    # ---- a volunteer's own data file, `peer --dataset FILE`: checked before the peer joins the swarm (with a
    # --config: without one, the peer first reads the run's config from the swarm, which is nowhere here)
    nowhere = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMgK13rEBAV5rgffdWDfpHmp4zTkYQgW5uXZ1gkc9Svm5"
    rows = "".join(f"a fine film {i},pos\n" for i in range(30))
    own_data = {  # case -> (file name, content, column options, text of the error)
        "own data missing": ("my.csv", None, [], "my.csv: data file not found"),
        "own data missing column": ("my.csv", b"review,stars\ngreat,5\n", ["--text-column", "body"], "no column 'body' (available: review, stars)"),
        "own data one label": ("my.csv", f"text,label\n{rows}".encode(), [], "column 'label' holds one label only (pos)"),
        "own data empty": ("my.jsonl", b"", [], "my.jsonl: the file is empty"),
        "own data binary": ("my.jsonl", b"\x00\x01\x02" * 400, [], "my.jsonl: a binary file, not jsonl text"),
        "own data not utf-8": ("my.tsv", "text\tlabel\ncaf\xe9\tpos\n".encode("latin-1"), [], "my.tsv: not valid utf-8 text"),
        "own data columns of a recipe": (None, None, ["--label-column", "stars"], "a recipe names its own columns"),
    }
    for name, (file, content, columns, expected) in own_data.items():
        path = folder(name)
        if content is not None:
            (path / file).write_bytes(content)
        dataset = str(path / file) if file else str(recipe)
        args = ["peer", "--config", str(run_config(path)), "--dataset", dataset, *columns, "--initial-peers", nowhere]
        cases[name] = Case(args, expected, mutable=("run",))

    path = folder("identity key damaged")
    (path / "node.key").write_bytes(b"\x08\x01garbage")
    cases["identity key damaged"] = Case(["bootstrap", "--identity", str(path / "node.key")], "node.key: damaged identity key")
    path = folder("too many layers")
    cases["too many layers"] = Case(["local", str(run_config(path, num_hidden_layers=50))], "num_hidden_layers=50")
    path = folder("max_length above positions")
    cases["max_length above positions"] = Case(["local", str(run_config(path)), "--set", "finetune.max_length=4096"], "finetune.max_length")

    # ---- run folders
    path = folder("output under a file")
    (path / "file").write_text("x")
    cases["output under a file"] = Case(["local", str(run_config(path)), "--output-dir", str(path / "file" / "run")], "which is a file")
    path = folder("output in proc")
    cases["output in proc"] = Case(["local", str(run_config(path)), "--output-dir", "/proc/p2pcold-run"], "/proc/p2pcold-run")
    path = folder("evaluate output under a file")
    (path / "file").write_text("x")
    cases["evaluate output under a file"] = Case(
        ["evaluate", "--base", str(model), "--datasets", str(recipe), "--output", str(path / "file" / "out")], "which is a file"
    )
    path = folder("config mismatch")
    config = run_config(path)
    (path / "run").mkdir()
    saved = yaml.safe_load(subprocess.run([sys.executable, "-m", "p2pcold.cli", "config", "show", str(config)], capture_output=True, check=True).stdout)
    saved["seed"], saved["finetune"]["batch_size"] = 7, 3
    (path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    cases["config mismatch"] = Case(["local", str(config)], "different config: finetune.batch_size (3 there, 16 now), seed (7 there, 0 now)")
    path = folder("config.yaml damaged")
    config = run_config(path)
    (path / "run").mkdir()
    (path / "run" / "config.yaml").write_text("[unclosed")
    cases["config.yaml damaged"] = Case(["local", str(config)], "config.yaml: damaged")
    path = folder("simulate resume without run")
    cases["simulate resume without run"] = Case(["simulate", "--resume", str(path)], "not a simulation run folder")

    # ---- swarm address
    cases["status without address"] = Case(["status"], "status: --initial-peers is required")
    cases["peer without address"] = Case(["peer", "--dataset", str(recipe)], "peer: --initial-peers is required")
    cases["monitor without address"] = Case(["monitor"], "monitor: --initial-peers is required")
    cases["monitor evaluate without targets"] = Case(["monitor", "--initial-peers", "not-an-address", "--evaluate"], "monitor: --evaluate needs eval.datasets")
    cases["monitor port out of range"] = Case(["monitor", "--initial-peers", "not-an-address", "--port", "70000"], "monitor: --port 70000: must be between 0 and 65535")
    cases["status watch as json"] = Case(["status", "--initial-peers", "not-an-address", "--watch", "--json"], "it does not combine with --json")
    cases["status watch interval"] = Case(["status", "--initial-peers", "not-an-address", "--watch", "--interval", "0"], "--interval 0.0: must be greater than 0")
    path = folder("peer bad address")
    cases["peer bad address"] = Case(["peer", "--dataset", str(recipe), "--initial-peers", "not-an-address", "--run-dir", str(path / "run")], "not-an-address")
    path = folder("peer host not an IP")
    maddr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDGvnkXwo7pBLZMwJY5biGVyeZMfQJnjrLWT4wWws1VmW"
    cases["peer host not an IP"] = Case(
        ["peer", "--dataset", str(recipe), "--initial-peers", maddr, "--host", "localhost", "--run-dir", str(path / "run")], "host 'localhost' is not an IP address"
    )

    # ---- the run secret (a private swarm)
    somewhere = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMgK13rEBAV5rgffdWDfpHmp4zTkYQgW5uXZ1gkc9Svm5"
    path = folder("secret file missing")
    cases["secret file missing"] = Case(["status", "--initial-peers", somewhere, "--secret-file", str(path / "run.secret")], "run.secret: no such secret file")
    path = folder("secret file readable by others")
    (path / "run.secret").write_text("0123456789abcdef0123456789abcdef\n")
    (path / "run.secret").chmod(0o644)
    cases["secret file readable by others"] = Case(
        ["peer", "--dataset", str(recipe), "--initial-peers", somewhere, "--run-dir", str(path / "run"), "--secret-file", str(path / "run.secret")], "chmod 600 "
    )
    path = folder("secret file empty")
    (path / "run.secret").write_text("\n")
    (path / "run.secret").chmod(0o600)
    cases["secret file empty"] = Case(["bootstrap", "--secret-file", str(path / "run.secret")], "run.secret: the secret file is empty")
    path = folder("secret file too short")
    (path / "run.secret").write_text("hunter2")
    (path / "run.secret").chmod(0o600)
    config = run_config(path)
    cases["secret file too short"] = Case(["simulate", str(config), "--secret-file", str(path / "run.secret")], "at least 16")

    # ---- invites (issue 23)
    path = folder("invite readable by others")
    (path / "invite.txt").write_text("p2pcold-invite-1:e30=\n")
    (path / "invite.txt").chmod(0o644)
    cases["invite readable by others"] = Case(["peer", "--dataset", str(recipe), "--invite-file", str(path / "invite.txt")], "chmod 600 ")
    path = folder("invite damaged")
    (path / "invite.txt").write_text("p2pcold-invite-1:not base64 at all\n")
    (path / "invite.txt").chmod(0o600)
    cases["invite damaged"] = Case(["status", "--invite-file", str(path / "invite.txt")], "the invite is damaged")
    path = folder("invite and secret file")
    (path / "invite.txt").write_text("whatever\n")
    (path / "invite.txt").chmod(0o600)
    cases["invite and secret file"] = Case(
        ["peer", "--dataset", str(recipe), "--invite-file", str(path / "invite.txt"), "--secret-file", str(path / "run.secret")],
        "give --invite-file or --secret-file, not both",
    )
    path = folder("invite of an open swarm")
    cases["invite of an open swarm"] = Case(
        ["invite", "--initial-peers", somewhere, "--output", str(path / "invite.txt")], "an invite carries the run secret"
    )

    # ---- signals
    path = folder("sigterm local")
    config = run_config(path, iterations=50, finetune={"batch_size": 8, "max_length": 16, "budget": {"steps": 50}})
    cases["sigterm local"] = Case(["local", str(config)], "local stopped by SIGTERM", EXIT_TERMINATED, ("run",), sigterm_after="iteration 0: contributors")
    path = folder("sigterm evaluate")
    cases["sigterm evaluate"] = Case(
        ["evaluate", "--base", str(model), "--datasets", str(recipe), "--output", str(path / "out")],
        "evaluate stopped by SIGTERM", EXIT_TERMINATED, ("out",), sigterm_after="evaluating 1 base(s)",
    )
    return cases


# --------------------------------------------------------------------------- running a case


@dataclass
class Outcome:
    code: int
    stderr: str
    leftover: bool
    changed: list[str] = field(default_factory=list)


def snapshot(folder: Path, mutable: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {  # a folder's own mtime may change (an entry probed and removed); its entries may not
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
        if not any(p.relative_to(folder).parts[:1] == (m,) for m in mutable)
    }


def run_case(case: Case, folder: Path, env: dict) -> Outcome:
    before = snapshot(folder, case.mutable)
    stderr_file = folder.parent / f"{folder.name}.stderr"
    with open(stderr_file, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pcold.cli", *case.args],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=folder if folder.is_dir() else None, start_new_session=True,
        )  # fmt: skip
        try:
            if case.sigterm_after:
                deadline = time.monotonic() + 120
                while case.sigterm_after not in stderr_file.read_text() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    try:
        os.killpg(proc.pid, 0)
        leftover = True
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        leftover = False
    after = snapshot(folder, case.mutable)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(code, stderr_file.read_text(), leftover, changed)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Case, Outcome]]:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = build_tiny_encoder(root / "tiny-model")
    recipe = write_toy_dataset(root / "data", "toy_movies", "movies")
    cases = build_cases(root / "cases", model, recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    folders = {name: root / "cases" / name.replace("/", "_").replace(" ", "_") for name in cases}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_case, case, folders[name], env) for name, case in cases.items()}
        return {name: (cases[name], future.result()) for name, future in futures.items()}


def test_the_table_has_at_least_60_distinct_cases(outcomes):
    assert len(outcomes) >= 60


def test_each_bad_input_gets_one_clear_line(outcomes):
    failures = []
    for name, (case, outcome) in outcomes.items():
        errors = [line for line in outcome.stderr.splitlines() if line.startswith("p2pcold: error:")]
        problems = []
        if outcome.code != case.code:
            problems.append(f"exit {outcome.code}, expected {case.code}")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif case.expected not in errors[0] or (case.forbidden and case.forbidden in errors[0]):
            problems.append(f"message {errors[0]!r} lacks {case.expected!r}")
        if "Traceback" in outcome.stderr:
            problems.append("a traceback")
        if outcome.leftover:
            problems.append("a process left behind")
        if outcome.changed:
            problems.append(f"changed {outcome.changed[:3]}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    {outcome.stderr.strip().splitlines()[-1:] if outcome.stderr.strip() else ''}")
    assert not failures, "\n".join(failures)
