import os
import signal
import time

import pytest

from p2pcold.config import RunConfig
from p2pcold.simulate import _stop_signals_deferred, _stop_signals_handled_by, cpu_threads, place_peers, plan_peers
from p2pcold.utils import P2PColdError, Terminated, raise_on_sigterm
from toy_data import write_toy_datasets


def test_peers_go_round_robin_over_the_gpus_asked_for():
    assert place_peers(5, [0, 1]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert place_peers(2, [3]) == ["cuda:3", "cuda:3"]  # several peers may share one GPU
    assert place_peers(3, None) == ["cpu", "cpu", "cpu"]


def test_cpu_threads_split_the_cores():
    assert cpu_threads(4, cores=16) == 4
    assert cpu_threads(3, cores=2) == 1  # never zero
    assert cpu_threads(1, cores=8) == 8


def test_plan_gives_each_peer_one_dataset_a_device_and_threads(tmp_path):
    recipes = write_toy_datasets(tmp_path, 3)
    config = RunConfig(datasets=recipes)
    plans = plan_peers(config, None, [0, 1])
    assert [p.dataset for p in plans] == recipes
    assert [p.device for p in plans] == ["cuda:0", "cuda:1", "cuda:0"]
    assert plans[0].name == "peer00-toy_movies"
    assert len(plan_peers(config, 2, None)) == 2
    with pytest.raises(P2PColdError, match="4 peers but 3 datasets"):
        plan_peers(config, 4, None)


def test_a_stop_signal_while_a_process_starts_takes_effect_once_it_is_recorded():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        recorded = []
        with pytest.raises(Terminated):
            with _stop_signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # a raising handler would interrupt this
                recorded.append("process")
        assert recorded == ["process"]
        with _stop_signals_handled_by(signal.SIG_IGN):  # while stopping: ignored
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
