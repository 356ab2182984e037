"""The real CLI: bad input gives one line on stderr and exit code 2; the main commands run end to end."""

import csv
import json
import subprocess
import sys

import pytest
import yaml

from p2pcold.cli import EXIT_BAD_INPUT, main
from toy_data import write_toy_dataset


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def recipe(tmp_path, name, **fields):
    data = {"name": name, "text_column": "text", "label_column": "label", "label_names": ["neg", "pos"], **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def balanced_rows(n=40):
    return [(f"movie {'good' if i % 2 else 'bad'} {i}", "pos" if i % 2 else "neg") for i in range(n)]


def bad_inputs(tmp_path):
    """(recipe path, text the one-line error must contain) for each bad input of a dataset."""
    good = write_csv(tmp_path / "good.csv", balanced_rows())
    (tmp_path / "table.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 garbage")
    one_label = write_csv(tmp_path / "one_label.csv", [(f"good movie {i}", "pos") for i in range(40)])
    # One `neu` row among many: with these split fractions and seed it lands in test only.
    rare = write_csv(tmp_path / "rare.csv", balanced_rows() + [("a neutral movie", "neu")])
    return {
        "missing file": (recipe(tmp_path, "missing", source=str(tmp_path / "nope.csv")), "nope.csv"),
        "unsupported format": (recipe(tmp_path, "xlsx", source=str(tmp_path / "table.xlsx")), "table.xlsx"),
        "unreadable file": (recipe(tmp_path, "parquet", source=str(tmp_path / "broken.parquet")), "broken.parquet"),
        "missing column": (recipe(tmp_path, "column", source=str(good), text_column="review"), "review"),
        "empty after filter": (recipe(tmp_path, "filter", source=str(good), filter={"column": "text", "keywords": ["zebra"]}), "good.csv"),
        "one label": (recipe(tmp_path, "onelabel", source=str(one_label)), "one_label.csv"),
        "label unseen in train": (
            recipe(tmp_path, "rare", source=str(rare), label_names=["neg", "pos", "neu"], split_fractions=[0.4, 0.4], split_seed=RARE_SEED),
            "neu",
        ),
        "hub id offline": (recipe(tmp_path, "hub", source="nyu-mll/glue", hub_config="sst2"), "nyu-mll/glue"),
    }


RARE_SEED = 1


@pytest.mark.parametrize(
    "case",
    ["missing file", "unsupported format", "unreadable file", "missing column", "empty after filter", "one label", "label unseen in train", "hub id offline"],
)
def test_bad_dataset_gives_one_line_and_exit_2(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path, expected = bad_inputs(tmp_path)[case]
    code = main(["evaluate", "--base", str(tiny_model_dir), "--datasets", path, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT
    assert err[-1].startswith("p2pcold: error: ") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_bad_config_field_and_unknown_recipe(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("datasets: [rotten_tomatoes]\niteration: 3\n")
    assert main(["local", str(config)]) == EXIT_BAD_INPUT
    assert "unknown field(s) iteration" in capsys.readouterr().err
    config.write_text("datasets: [no_such_recipe]\n")
    assert main(["local", str(config), "--output-dir", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "unknown dataset recipe 'no_such_recipe'" in capsys.readouterr().err


def test_local_then_evaluate_through_the_installed_command(tmp_path, tiny_model_dir):
    """`p2pcold local` then `p2pcold evaluate` on the fused checkpoint and the pretrained model."""
    recipes = [str(write_toy_dataset(tmp_path, f"toy_{t}", t)) for t in ("movies", "flights")]
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "datasets": recipes,
                "iterations": 2,
                "finetune": {"batch_size": 8, "max_length": 16, "budget": {"steps": 2}},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    command = [sys.executable, "-m", "p2pcold.cli"]
    done = subprocess.run([*command, "local", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["iteration"] == 2

    fused = str(tmp_path / "run" / "checkpoints" / "iter-0002")
    done = subprocess.run(
        [*command, "evaluate", "--base", str(tiny_model_dir), fused, "--datasets", recipes[0], "--modes", "frozen", "--output", str(tmp_path / "eval")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0].split()[:3] == ["model", "iteration", "Frozen"]
    assert any(line.startswith(str(tiny_model_dir)) for line in table) and any(line.startswith(fused) for line in table)
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert sorted(r["iteration"] for r in rows) == [0, 2]
    assert (tmp_path / "eval" / "accuracy.png").is_file() and (tmp_path / "eval" / "results.csv").is_file()


def test_peer_flags_and_a_home_volunteers_defaults(tmp_path):
    """`p2pcold peer` listens on every interface with auto reachability unless a flag or the config says
    otherwise; bootstrap and status keep 127.0.0.1; `--relay off` turns a bootstrap's relay off."""
    from p2pcold.cli import _swarm_run_config, build_parser

    maddr = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWDGvnkXwo7pBLZMwJY5biGVyeZMfQJnjrLWT4wWws1VmW"

    def swarm_config(*argv: str):
        return _swarm_run_config(build_parser().parse_args(list(argv))).swarm

    peer = ("peer", "--dataset", "toy", "--initial-peers", maddr)
    home = swarm_config(*peer)
    assert (home.host, home.port, home.reachability, home.relay, home.announce_maddrs) == ("0.0.0.0", 0, "auto", True, [])
    key = str(tmp_path / "peer.key")
    chosen = swarm_config(*peer, "--host", "10.0.0.5", "--port", "31337", "--announce", "/ip4/203.0.113.8/tcp/31337", "--identity", key, "--reachability", "client")
    assert (chosen.host, chosen.port, chosen.announce_maddrs, chosen.identity_path, chosen.reachability) == (
        "10.0.0.5", 31337, ["/ip4/203.0.113.8/tcp/31337"], key, "client",
    )  # fmt: skip
    assert swarm_config(*peer, "--set", "swarm.host=127.0.0.1").host == "127.0.0.1"
    config = tmp_path / "run.yaml"
    config.write_text("swarm:\n  host: 127.0.0.1\n")
    assert swarm_config(*peer, "--config", str(config)).host == "127.0.0.1"
    assert swarm_config("bootstrap").host == "127.0.0.1" and swarm_config("bootstrap").relay is True
    assert swarm_config("bootstrap", "--relay", "off").relay is False
    assert swarm_config("status", "--initial-peers", maddr).host == "127.0.0.1"
