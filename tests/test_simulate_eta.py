"""The simulator's ETA: the peers' iterations at their rate, and evaluations counted in seconds."""

import pytest

from p2pcold.simulate import eta_seconds


@pytest.mark.parametrize(
    "elapsed, trained, evaluations_left, seconds_per_evaluation, expected",
    [
        (100.0, 0, 3, None, None),  # nothing to extrapolate from yet
        (100.0, 2, 0, None, 300.0),  # no evaluation: 6 iterations at 50 s
        (100.0, 2, 2, None, None),  # evaluations to come, none timed yet
        (100.0, 2, 2, 60.0, 360.0),  # 300 s of training, then the last evaluation
        (100.0, 2, 7, 60.0, 420.0),  # the evaluator's backlog outlasts the peers
        (400.0, 8, 1, 420.0, 420.0),  # peers done: the last evaluation (the transfer preset's 10 minutes left)
        (400.0, 8, 0, 420.0, 0.0),
    ],
)
def test_eta(elapsed, trained, evaluations_left, seconds_per_evaluation, expected):
    assert eta_seconds(elapsed, trained, 8, evaluations_left, seconds_per_evaluation) == expected
