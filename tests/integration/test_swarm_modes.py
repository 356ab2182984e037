"""The swarm reproduces the reference run: decentralized (issue a), with peers that join by invite
(issue 23), and with a Repository (issue b)."""

import csv
import subprocess
import sys
import uuid

import pytest

from bodies import final_body, max_diff, reference_body
from swarm_cli import toy_recipes, write_run_config

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


def assert_close(a, b, atol=1e-5):
    worst = max_diff(a, b)
    assert worst <= atol, f"bodies differ by up to {worst}"


def run_with_repository(swarm, tmp_path, config, recipes) -> list[str]:
    """A Repository (run folder `repository`) and one centralized peer per recipe, run to the end; the peers' names."""
    maddr = swarm.bootstrap(config, "--repository", "--run-dir", str(tmp_path / "repository"))
    peers = {f"peer{i}": swarm.peer(f"peer{i}", config, recipe, maddr, "--centralized") for i, recipe in enumerate(recipes)}
    for name, proc in peers.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:] + "\n--- the Repository:\n" + swarm.log("bootstrap")[-3000:]
    assert swarm.wait(swarm.procs[0], "bootstrap", timeout=60) == 0, swarm.log("bootstrap")[-3000:]
    return list(peers)


def assert_decentralized_equal_the_reference_run(processes, tmp_path, tiny_model_dir, peers: int, fused_line: str, **fields) -> None:
    """`peers` decentralized peers (one recipe each) run to the end; each logs `fused_line`, and all end
    with the reference run's body."""
    recipes = toy_recipes(tmp_path, peers)
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, **fields)
    maddr = processes.bootstrap(config)
    procs = {f"peer{i}": processes.peer(f"peer{i}", config, recipe, maddr) for i, recipe in enumerate(recipes)}
    for name, proc in procs.items():
        assert processes.wait(proc, name, timeout=240) == 0, processes.log(name)[-3000:]
        assert fused_line in processes.log(name)

    bodies = [final_body(tmp_path / name) for name in procs]
    for body in bodies[1:]:
        # hivemind returns each peer the average as a delta to add to its own part: equal up to rounding
        assert_close(bodies[0], body, atol=1e-6)
    assert_close(bodies[0], reference_body(config))


def test_three_peers_joined_by_invite_equal_the_reference_run(swarm, tmp_path, tiny_model_dir):
    """A private run started by `bootstrap --config`; `p2pcold invite` writes one line that only its owner
    can read; each peer joins with --dataset and --invite-file alone (the run config comes from the swarm),
    one of them on a volunteer's own CSV file (`--text-column`, `--label-column`), fuses, and ends with the
    reference run's body (whose `datasets` lists the same file). Then a peer whose invite holds another
    secret is refused with one line. The secret is in no log and no checkpoint."""
    secret = f"invite-secret-{uuid.uuid4().hex}"
    (tmp_path / "run.secret").write_text(secret + "\n")
    (tmp_path / "run.secret").chmod(0o600)
    recipes = [own_csv_file(tmp_path / "mine" / "my_reviews.csv"), *toy_recipes(tmp_path, 2)]
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, swarm={"min_group_size": 3})
    maddr = swarm.bootstrap(config, "--secret-file", str(tmp_path / "run.secret"))

    invite = tmp_path / "invite.txt"
    made = invite_command(tmp_path, "--initial-peers", maddr, "--secret-file", str(tmp_path / "run.secret"))
    assert made.returncode == 0 and secret not in made.stdout + made.stderr, made.stderr
    assert invite.stat().st_mode & 0o777 == 0o600 and len(invite.read_text().splitlines()) == 1

    def join(name: str, recipe: str, invite_file):
        args = ("peer", "--dataset", recipe, "--invite-file", str(invite_file), "--host", "127.0.0.1")
        columns = ("--text-column", "text", "--label-column", "label") if recipe.endswith(".csv") else ()
        return swarm.start(name, *args, *columns, "--run-dir", str(tmp_path / name))

    procs = {f"peer{i}": join(f"peer{i}", recipe, invite) for i, recipe in enumerate(recipes)}
    for name, proc in procs.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:]
        assert "run config from the swarm: run itest: model" in swarm.log(name)
        assert "fused with a group of 3" in swarm.log(name)
    assert "(my_reviews) starts at iteration 0" in swarm.log("peer0")
    bodies = [final_body(tmp_path / name) for name in procs]
    for body in bodies[1:]:
        assert_close(bodies[0], body, atol=1e-6)
    assert_close(bodies[0], reference_body(config))

    (tmp_path / "other.secret").write_text(uuid.uuid4().hex + "\n")
    (tmp_path / "other.secret").chmod(0o600)
    wrong = tmp_path / "wrong-invite.txt"
    assert invite_command(tmp_path, "--initial-peers", maddr, "--secret-file", str(tmp_path / "other.secret"), output=wrong).returncode == 0
    refused = join("outsider", recipes[0], wrong)
    assert swarm.wait(refused, "outsider", timeout=120) == 2
    assert swarm.log("outsider").count("p2pcold: error:") == 1 and "Traceback" not in swarm.log("outsider")
    for path in [*tmp_path.glob("*.log"), *tmp_path.rglob("*.safetensors"), *tmp_path.rglob("*.json")]:
        assert secret.encode() not in path.read_bytes(), path


def own_csv_file(path) -> str:
    """A volunteer's own labelled CSV file (columns `text` and `label`), no recipe beside it."""
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"movie {i} was {['awful', 'great'][i % 2]} fun", ["bad", "good"][i % 2]] for i in range(120))
    return str(path)


def invite_command(folder, *args: str, output=None) -> subprocess.CompletedProcess:
    output = output or folder / "invite.txt"
    command = [sys.executable, "-m", "p2pcold.cli", "invite", "--run-id", "itest", *args, "--output", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_four_peers_in_moshpit_rounds_of_two_equal_the_reference_run(swarm, tmp_path, tiny_model_dir):
    """target_group_size 2 < 4 peers: each boundary is 2 rounds of pairs (a full 2 x 2 grid), which hold
    the exact mean of all four (the rule is `mean`: the reference would trim a group of 4)."""
    swarm_fields = {"target_group_size": 2, "min_group_size": 2}
    assert_decentralized_equal_the_reference_run(
        swarm, tmp_path, tiny_model_dir, 4, "fused with a group of 4 in rounds ok/ok", iterations=2, aggregation={"rule": "mean"}, swarm=swarm_fields
    )


def test_repository_with_four_peers_and_k2_equals_the_reference_run(swarm, tmp_path, tiny_model_dir):
    recipes = toy_recipes(tmp_path, 4)
    config = write_run_config(tmp_path, str(tiny_model_dir), recipes, contributors_per_iteration=2)
    peers = run_with_repository(swarm, tmp_path, config, recipes)
    reference = reference_body(config)
    history = [line for line in swarm.log("bootstrap").splitlines() if "contributors" in line]
    assert len(history) == 3 and all(line.count("toy_") == 2 for line in history)  # k=2 each iteration
    assert_close(final_body(tmp_path / "repository"), reference)
    for name in peers:
        assert_close(final_body(tmp_path / name), reference)
