"""The GPU benchmark's CPU-side parts: its FLOP count, its reading of peer logs, and where the
suite finds the last card's results when this machine has no GPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from benchmarks import gpu
from p2pcold.model import Classifier, new_head


def test_flop_count_of_a_training_forward():
    config = RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    model = Classifier(RobertaModel(config), new_head(64, 3, seed=0)).train()
    counter = gpu.FlopCounter(model)
    per_layer = 4 * 64 * 64 + 2 * 64 * 128  # q, k, v, output; the two feed-forward matrices
    assert counter.per_token == 2 * per_layer
    assert counter.per_row == 64 * 64 + 64 * 3  # pooler, head
    batch = {"input_ids": torch.randint(2, 100, (5, 12)), "attention_mask": torch.ones(5, 12, dtype=torch.long)}
    model(batch)
    forward = 2 * 5 * (12 * counter.per_token + counter.per_row) + 4 * 5 * 2 * 12**2 * 64
    assert (counter.rows, counter.tokens, counter.flops) == (5, 60, 3 * forward)
    model.eval()
    model(batch)  # evaluation passes are not training work
    assert counter.rows == 5
    counter.handle.remove()


def test_peer_log_events(tmp_path):
    log = tmp_path / "peer.log"
    log.write_text(
        "03:23:52 INFO p2pcold.peer: iteration 0: fused with a group of 4 (a, b, c, d)\n"
        "03:23:55 INFO p2pcold.peer: iteration 1: finetuned a, loss 0.9, dev acc -, 960 examples at 600.5 ex/s\n"
        "Nov 26 03:23:58.221 [INFO] a hivemind line\n"
        "03:24:00 INFO p2pcold.peer: iteration 1: fused with a group of 4 (a, b, c, d)\n"
    )
    fused = gpu._log_events(log, r"iteration \d+: fused with a group of")
    assert [t for t, _ in fused] == [3600 * 3 + 60 * 23 + 52, 3600 * 3 + 60 * 24]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the section measures")
def test_without_cuda_the_suite_reads_the_last_cards_files(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "RAW_DIR", tmp_path)
    monkeypatch.setattr(gpu, "ROOT", tmp_path)
    assert gpu.run() == {"skipped": gpu.NO_GPU}
    older = {"device": "Card A", "started": "2026-01-01 00:00:00", "simulate": {"wall_s": 1, "logs_tail": {"x": "..."}}}
    newer = {"device": "Card B", "started": "2026-02-01 00:00:00"}
    (tmp_path / "card-a.json").write_text(json.dumps(older))
    (tmp_path / "card-b.json").write_text(json.dumps(newer))
    (tmp_path / "card-b.before-change.json").write_text(json.dumps({"device": "Card B", "started": "2026-03-01 00:00:00"}))
    raw = gpu.run()
    assert raw["device"] == "Card B" and raw["source"] == "card-b.json"
    assert list(raw["companions"]) == ["before-change"]
    (tmp_path / "card-b.json").unlink()
    (tmp_path / "card-b.before-change.json").unlink()
    assert gpu.run()["simulate"] == {"wall_s": 1}  # the processes' logs stay in the raw file
