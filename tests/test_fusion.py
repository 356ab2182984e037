import pytest
import torch

from p2pcold.fusion import FusionError, average, max_abs_difference, sample_contributors, schema


def bodies(k: int):
    torch.manual_seed(0)
    return [{"layer.weight": torch.randn(3, 4), "layer.bias": torch.randn(4), "ids": torch.arange(5)} for _ in range(k)]


def test_uniform_average_equals_hand_computed_mean():
    states = bodies(3)
    fused = average(states)
    for name in ("layer.weight", "layer.bias"):
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        assert torch.allclose(fused[name], expected, atol=1e-7)
    assert torch.equal(fused["ids"], states[0]["ids"])  # integer buffers are copied, not averaged


def test_weighted_average_by_examples():
    states = bodies(2)
    fused = average(states, weights=[100, 300])
    expected = 0.25 * states[0]["layer.weight"] + 0.75 * states[1]["layer.weight"]
    assert torch.allclose(fused["layer.weight"], expected, atol=1e-7)


def test_average_of_identical_bodies_is_exact():
    state = bodies(1)[0]
    fused = average([state, state, state])
    assert all(torch.equal(fused[n], state[n]) for n in state)


def test_average_keeps_dtype():
    states = [{"w": torch.ones(2, dtype=torch.bfloat16)}, {"w": torch.zeros(2, dtype=torch.bfloat16)}]
    assert average(states)["w"].dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_tensor(bad):
    states = bodies(2)
    states[1]["layer.bias"][2] = bad
    with pytest.raises(FusionError, match=r"'layer.bias' of peer-b.*NaN or Inf"):
        average(states, labels=["peer-a", "peer-b"])


def test_shape_mismatch_names_the_tensor():
    states = bodies(2)
    states[1]["layer.weight"] = torch.randn(4, 4)
    with pytest.raises(FusionError, match=r"'layer.weight': shape \(4, 4\)"):
        average(states)


def test_dtype_mismatch_names_the_tensor():
    states = bodies(2)
    states[1]["layer.bias"] = states[1]["layer.bias"].double()
    with pytest.raises(FusionError, match=r"'layer.bias': dtype torch.float64"):
        average(states)


def test_missing_tensor_is_named():
    states = bodies(2)
    del states[1]["layer.bias"]
    with pytest.raises(FusionError, match="lacks tensor 'layer.bias'"):
        average(states)


def test_differing_integer_buffers_are_refused():
    states = bodies(2)
    states[1]["ids"] = torch.arange(5) + 1
    with pytest.raises(FusionError, match="non-float tensor 'ids'"):
        average(states)


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(FusionError):
        average(bodies(2), weights=weights)


def test_schema_and_difference():
    a, b = bodies(2)
    assert schema(a) == schema(b)
    assert max_abs_difference(a, a) == 0.0
    assert max_abs_difference(a, b) > 0


def test_sampling_is_seeded_sorted_and_independent_of_input_order():
    names = ["d", "a", "c", "b", "e"]
    first = sample_contributors(names, 2, seed=7, iteration=3)
    assert first == sample_contributors(list(reversed(names)), 2, seed=7, iteration=3)
    assert first == sorted(first) and len(set(first)) == 2
    assert sample_contributors(names, None, 0, 0) == sorted(names)
    draws = {tuple(sample_contributors(names, 2, seed=7, iteration=i)) for i in range(10)}
    assert len(draws) > 1  # iterations sample different contributors
