"""Which bases a run evaluates: one predicate for `p2pcold local` and the simulator's evaluator."""

import pytest

from p2pcold.evaluate import evaluation_due


@pytest.mark.parametrize(
    "every, iterations, due",
    [
        (1, 3, [0, 1, 2, 3]),
        (4, 8, [0, 4, 8]),
        (3, 8, [0, 3, 6, 8]),  # the last one although 8 is not a multiple of 3
        (0, 8, [0, 8]),  # θ0 and the last only
        (10, 8, [0, 8]),
    ],
)
def test_theta0_every_nth_and_the_last_are_due(every, iterations, due):
    assert [i for i in range(iterations + 1) if evaluation_due(i, every, iterations)] == due
