"""The monitor's parts without a swarm: its history of the swarm, its web server and JSON API, the
model card and the offline upload (from a real run folder), and TensorBoard's reader on ScalarLog."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import pytest

from p2pcold.monitor.history import SwarmHistory, accuracy_curves
from p2pcold.monitor.server import MonitorServer
from p2pcold.publish import CITATION, model_card, push_to_hub
from p2pcold.results import read_results, summary_table
from p2pcold.scalars import ScalarLog
from p2pcold.swarm import PeerProgress
from test_local_run import make_config, run_to_end


def record(dataset: str, iteration: int, phase: str, seen: float, **fields) -> PeerProgress:
    return PeerProgress(f"peer-{dataset}", dataset, iteration, phase, last_seen=seen, **fields)


def test_history_keeps_peers_after_their_records_expire_and_logs_each_boundary_once():
    history = SwarmHistory("run")
    history.observe([record("a", 0, "finetuning", 1.0), record("b", 0, "finetuning", 1.0)], observed_at=1.5)
    assert history.observe([record("a", 0, "finetuning", 1.0)], observed_at=2.0) == []  # the same publication
    fused = dict(last_fusion="ok", last_group=["a", "b"], last_group_size=2, fusion_attempts=1, fusion_seconds=3.5, train_loss=0.7)
    changed = history.observe([record("a", 1, "finetuning", 5.0, **fused)], observed_at=5.5)
    assert [(r["dataset"], entry["status"], entry["group_size"], entry["seconds"]) for r, entry in changed] == [("a", "ok", 2, 3.5)]
    changed = history.observe([record("a", 1, "averaging", 9.0, **fused)], observed_at=9.5)
    assert [entry for _, entry in changed] == [None]  # the boundary of iteration 1 was logged already

    view = history.view(now=10.0, live_ids={"peer-a"})  # b's record expired: still listed, not live
    assert [(p["dataset"], p["iteration"], p["live"], p["first_seen"]) for p in view["peers"]] == [("a", 1, True, 1.5), ("b", 0, False, 1.5)]
    assert [(p["iteration"], p["phase"]) for p in view["series"]["a"]] == [(0, "finetuning"), (1, "finetuning"), (1, "averaging")]
    assert view["boundaries"] == [{"iteration": 1, "peers": {"a": {**view["boundaries"][0]["peers"]["a"], "status": "ok", "members": ["a", "b"]}}}]
    assert history.fusion_of(1) == {"status": "ok", "members": ["a", "b"], "attempts": 1, "failure": None}
    assert history.fusion_of(2) is None and history.contributors() == ["a", "b"]
    json.dumps(view)  # the API serves it as is


def test_accuracy_curves_average_the_targets_per_iteration_against_the_pretrained_model():
    rows = [
        {"iteration": 0, "mode": "cold", "accuracy": 0.5}, {"iteration": 0, "mode": "cold", "accuracy": 0.7},
        {"iteration": 1, "mode": "cold", "accuracy": 0.8}, {"iteration": 1, "mode": "cold", "accuracy": 0.6},
        {"iteration": 1, "mode": "frozen", "accuracy": 0.4},
    ]  # fmt: skip
    assert accuracy_curves(rows) == {
        "cold": {"points": [[0, 0.6], [1, 0.7]], "pretrained": 0.6},
        "frozen": {"points": [[1, 0.4]], "pretrained": None},
    }


def test_server_serves_the_page_its_assets_and_the_api_on_loopback_only():
    server = MonitorServer("127.0.0.1", 0, lambda: {"run_id": "r", "peers": []})
    try:
        assert server.url.startswith("http://127.0.0.1:")

        def get(path: str) -> tuple[str, bytes]:
            with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as response:
                return response.headers["Content-Type"], response.read()

        kind, page = get("/")
        assert kind.startswith("text/html") and b"/static/monitor.js" in page and b"http" not in page.replace(b"http://www.w3.org", b"")
        kind, script = get("/static/monitor.js")
        assert kind.startswith("text/javascript") and b"/api/state" in script
        assert get("/static/monitor.css")[0].startswith("text/css")
        assert json.loads(get("/api/state")[1]) == {"run_id": "r", "peers": []}
        for path in ("/static/../server.py", "/static/nothing.js", "/api/other"):
            with pytest.raises(urllib.error.HTTPError) as error:
                get(path)
            assert error.value.code == 404
    finally:
        server.close()


def test_scalar_log_writes_what_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = ScalarLog(tmp_path / "tb")
    for step, value in enumerate([0.9, 0.5]):
        log.add("peer/loss", value, step)
    log.add("peer/dev_accuracy", None, 0)  # unknown values are skipped, not written as 0
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["peer/loss"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("peer/loss")] == [(0, 0.9), (1, 0.5)]
    ScalarLog(None).add("anything", 1.0, 0)  # no --log-dir: nothing written


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("card")
    config = make_config(tmp_path, tiny_model_dir, iterations=2)
    run_to_end(config)
    return config


def test_model_card_from_a_real_run_folder(finished_run):
    config = finished_run
    results = read_results(f"{config.output_dir}/results.json")
    card = model_card(config, results, 2, ["toy_movies", "toy_flights"])
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"# p2pcold run `{config.run_id}`: fused base of iteration 2" in card
    assert "- iterations: 2 of 2 (evaluated: 1, 2)" in card
    assert "- contributors (2): toy_flights, toy_movies" in card
    assert summary_table([r for r in results if r.iteration in (0, 2)]) in card  # θ0 against the published base
    assert "pretrained  0" in card and "fused       2" in card
    assert CITATION in card and "Collaborative Descent for Distributed Multitask Finetuning" in card and "Choshen, Leshem" in card


@pytest.mark.parametrize("offline", [True, False])
def test_upload_offline_or_without_a_token_is_one_warning_line(finished_run, monkeypatch, caplog, offline):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    checkpoint = f"{finished_run.output_dir}/checkpoints/iter-0002"
    with caplog.at_level(logging.WARNING, logger="p2pcold"):
        assert push_to_hub(checkpoint, "someone/p2pcold-test", "card", 2) is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("push to hub someone/p2pcold-test skipped: ")
    assert ("offline" if offline else "no Hugging Face token") in lines[0]
