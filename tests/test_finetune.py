import pytest
import torch

from p2pcold.config import Budget, FinetuneConfig, load_dataset_spec
from p2pcold.data import prepare_dataset
from p2pcold.finetune import Contributor, finetune, planned_steps
from p2pcold.model import Classifier, body_state, load_body, load_tokenizer, new_head
from p2pcold.utils import P2PColdError
from toy_data import write_toy_dataset

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    recipe = write_toy_dataset(tmp_path_factory.mktemp("data"), "toy_movies", "movies")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = prepare_dataset(load_dataset_spec(str(recipe)), tokenizer, max_length=16)
    return tiny_model_dir, tokenizer, data, str(recipe)


def run(setup, seed=0, device="cpu", **config):
    model_dir, tokenizer, data, _ = setup
    model = Classifier(load_body(str(model_dir)), new_head(32, data.num_labels, seed=1))
    cfg = FinetuneConfig(batch_size=8, max_length=16, learning_rate=1e-3, **config)
    result = finetune(model, data, tokenizer, cfg, seed=seed, device=torch.device(device))
    return model, result


def test_same_seed_same_weights_on_cpu(setup):
    a, ra = run(setup, budget=Budget(steps=4))
    b, rb = run(setup, budget=Budget(steps=4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.train_loss == rb.train_loss
    c, _ = run(setup, seed=1, budget=Budget(steps=4))
    assert not torch.equal(a.body.embeddings.word_embeddings.weight, c.body.embeddings.word_embeddings.weight)


@pytest.mark.parametrize(
    "budget, steps, stopped_by",
    [(Budget(steps=3), 3, "steps"), (Budget(examples=20), 3, "examples"), (Budget(epochs=1), None, "epochs")],
)
def test_budget_limits(setup, budget, steps, stopped_by):
    _, result = run(setup, budget=budget)
    assert result.stopped_by == stopped_by
    if steps is not None:
        assert result.steps == steps
    else:
        assert result.examples == len(setup[2].train)
    assert result.dev_accuracy is not None and result.examples_per_second > 0


def test_time_budget_stops_training(setup):
    _, result = run(setup, budget=Budget(seconds=0.2, epochs=1000))
    assert result.stopped_by == "seconds" and result.seconds >= 0.2


def test_gradient_accumulation_makes_the_effective_batch(setup):
    _, result = run(setup, budget=Budget(steps=2), gradient_accumulation=3)
    assert result.steps == 2 and result.examples == 2 * 3 * 8


def test_linear_decay_horizon():
    assert planned_steps(Budget(epochs=2), train_size=100, examples_per_step=10) == 20
    assert planned_steps(Budget(steps=5, examples=1000), 100, 10) == 5
    assert planned_steps(Budget(seconds=60), 100, 10) is None


def test_early_stopping_on_dev(setup):
    _, result = run(setup, budget=Budget(epochs=50), eval_every_examples=16, early_stopping_min_delta=1.0)
    assert result.stopped_by == "early_stopping" and result.examples == 32  # the 2nd evaluation cannot gain 1.0


def test_gpu_only_options_are_refused_on_cpu(setup):
    with pytest.raises(P2PColdError, match="bf16"):
        run(setup, budget=Budget(steps=1), precision="bf16")
    with pytest.raises(P2PColdError, match="adamw8bit"):
        run(setup, budget=Budget(steps=1), optimizer="adamw8bit")


def test_contributor_heads_keep_or_reinit(setup):
    model_dir, tokenizer, _, recipe = setup
    body = load_body(str(model_dir))
    base = body_state(body)
    spec = load_dataset_spec(recipe)
    for policy in ("keep", "reinit"):
        contributor = Contributor(spec, tokenizer, FinetuneConfig(batch_size=8, max_length=16, budget=Budget(steps=2), head=policy), run_seed=0)
        first = contributor.contribute(body, base, 0, torch.device("cpu"), show_progress=False)
        assert (contributor.head_state is not None) == (policy == "keep")
        assert set(first.body) == set(base)  # only the body leaves the contributor
        assert first.result.steps == 2


@CUDA
def test_bf16_autocast_on_cuda(setup):
    _, result = run(setup, device="cuda", budget=Budget(steps=2), precision="bf16")
    assert result.steps == 2


@CUDA
def test_bitsandbytes_adamw8bit_on_cuda(setup):
    pytest.importorskip("bitsandbytes")
    model, result = run(setup, device="cuda", budget=Budget(steps=2), optimizer="adamw8bit")
    assert result.steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())
