"""`eval.seeds`: the evaluation repeated over seeds, with the mean and the spread in every output."""

import csv
import json
from statistics import mean, stdev

import pytest
import torch

from p2pcold.config import EvalConfig, from_dict
from p2pcold.evaluate import Evaluator
from p2pcold.model import body_state, load_body, load_tokenizer
from p2pcold.results import EvalResult, read_results, seed_spread, summary_table, write_results_and_plots
from p2pcold.utils import P2PColdError
from toy_data import write_toy_datasets


def make_evaluator(tmp_path, tiny_model_dir, seeds: int) -> Evaluator:
    recipes = write_toy_datasets(tmp_path / "data", 2)
    config = from_dict(EvalConfig, {
        "datasets": recipes, "modes": ["cold", "frozen"], "few_shot": 12, "seeds": seeds, "frozen_epochs": 2,
        "finetune": {"batch_size": 4, "max_length": 16, "budget": {"steps": 2}},
    })
    body = load_body(str(tiny_model_dir))
    return Evaluator(config, load_tokenizer(str(tiny_model_dir)), body, seed=3, device=torch.device("cpu"), seen={recipes[0]})


def test_one_seed_is_the_first_of_several_and_seeds_differ(tmp_path, tiny_model_dir):
    single = make_evaluator(tmp_path, tiny_model_dir, seeds=1)
    several = make_evaluator(tmp_path, tiny_model_dir, seeds=3)
    base = body_state(single.body)
    one = single.evaluate(base, "pretrained", 0)
    three = several.evaluate(base, "pretrained", 0)
    assert [(r.dataset, r.mode) for r in one] == [(r.dataset, r.mode) for r in three]
    for a, b in zip(one, three):
        # seeds: 1 draws exactly what a single evaluation always drew: seed 0 of several
        assert a.seed_accuracies == [a.accuracy] and a.accuracy_std is None
        assert b.seed_accuracies[0] == a.accuracy and len(b.seed_accuracies) == 3
        assert b.accuracy == pytest.approx(mean(b.seed_accuracies))
        assert b.accuracy_std == pytest.approx(stdev(b.seed_accuracies))
        assert b.few_shot == 12 and b.train_examples == 12
    target = several.targets[0]
    def sample(evaluator, seed_index):
        return tuple(map(tuple, evaluator._train_split(target, seed_index)["input_ids"]))

    samples = [sample(several, k) for k in range(3)]
    assert len(set(samples)) == 3  # each seed its own few-shot sample
    assert samples[0] == sample(single, 0)


def row(dataset: str, iteration: int, accuracies: list[float], seen: bool = False, mode: str = "cold") -> EvalResult:
    return EvalResult.over_seeds("fused" if iteration else "pretrained", iteration, dataset, mode, accuracies, seen, 100, 100)


def test_spread_is_over_seeds_of_the_mean_and_reaches_every_output(tmp_path):
    results = [
        row("a", 0, [0.5, 0.6, 0.7]), row("b", 0, [0.7, 0.6, 0.5]),  # the mean over targets is 0.6 for every seed
        row("a", 2, [0.6, 0.7, 0.8]), row("b", 2, [0.6, 0.8, 0.7]),
        row("a", 2, [0.9, 0.9, 0.9], mode="frozen"), row("a", 0, [0.8, 0.8, 0.8], mode="frozen"),
    ]
    assert seed_spread(results[:2]) == 0.0
    assert seed_spread(results[2:4]) == pytest.approx(stdev([0.6, 0.75, 0.75]))
    assert seed_spread([row("a", 0, [0.5])]) is None
    table = summary_table(results)
    assert "0.6000 ± 0.0000" in table and f"0.7000 ± {stdev([0.6, 0.75, 0.75]):.4f}" in table

    write_results_and_plots(results, tmp_path)
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "gain_per_dataset.png").stat().st_size > 0
    assert read_results(tmp_path / "results.json") == results
    with open(tmp_path / "results.csv") as f:
        first = next(csv.DictReader(f))
    assert json.loads(first["seed_accuracies"]) == [0.5, 0.6, 0.7]
    assert float(first["accuracy_std"]) == pytest.approx(0.1)


def test_one_seed_rows_and_old_files_print_as_before(tmp_path):
    rows = [row("a", 0, [0.5]), row("a", 1, [0.75])]
    assert "±" not in summary_table(rows) and "0.7500" in summary_table(rows)
    old = [{k: v for k, v in r.__dict__.items() if k not in ("seed_accuracies", "accuracy_std")} for r in rows]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = read_results(tmp_path / "old.json")
    assert [r.per_seed() for r in loaded] == [[0.5], [0.75]] and summary_table(loaded) == summary_table(rows)


@pytest.mark.parametrize("seeds", [0, -1, "three"])
def test_seeds_must_be_a_positive_count(seeds):
    with pytest.raises(P2PColdError, match="seeds"):
        from_dict(EvalConfig, {"seeds": seeds})
