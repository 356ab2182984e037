"""A volunteer's own data file, `p2pcold peer --dataset FILE --text-column T --label-column L`, trains and
fuses in a swarm, and ends with the body of the reference run that lists the same file in `datasets`."""

import csv
import re

import pytest

from bodies import final_body, max_diff, reference_body
from swarm_cli import toy_recipes, write_run_config

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


def test_a_peer_on_its_own_csv_file_fuses_and_matches_the_reference_run(swarm, tmp_path, tiny_model_dir):
    recipe = toy_recipes(tmp_path, 1)[0]  # a recipe YAML for the other peer
    own = tmp_path / "mine" / "my_reviews.csv"  # columns `text` and `label`: a run config can name it as it is
    own.parent.mkdir()
    with open(own, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"movie {i} was {['awful', 'great'][i % 2]} fun", ["bad", "good"][i % 2]] for i in range(120))
    config = write_run_config(tmp_path, str(tiny_model_dir), [str(own), recipe], iterations=2)
    maddr = swarm.bootstrap(config)
    columns = ("--text-column", "text", "--label-column", "label")
    procs = {"mine": swarm.peer("mine", config, str(own), maddr, *columns), "other": swarm.peer("other", config, recipe, maddr)}
    for name, proc in procs.items():
        assert swarm.wait(proc, name, timeout=240) == 0, swarm.log(name)[-3000:]
        assert re.findall(r"iteration (\d): fused with a group of 2", swarm.log(name)) == ["0", "1"], swarm.log(name)[-3000:]
    assert "(my_reviews) starts at iteration 0" in swarm.log("mine")

    mine, other = final_body(tmp_path / "mine"), final_body(tmp_path / "other")
    assert max_diff(mine, other) <= 1e-6
    assert max_diff(mine, reference_body(config)) <= 1e-5
