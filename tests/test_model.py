import json

import pytest
import torch
from transformers import AutoModel

from p2pcold.model import (
    CheckpointMeta,
    Classifier,
    body_state,
    load_body,
    load_body_state,
    load_heads,
    load_tokenizer,
    new_head,
    read_metadata,
    resolve_model_source,
    save_checkpoint,
)
from p2pcold.utils import P2PColdError, state_dict_hash


def meta(iteration=1):
    return CheckpointMeta(iteration=iteration, run_id="r", base_model="tiny", base_hash="abc")


def test_checkpoint_is_a_hugging_face_folder_with_metadata_and_heads(tiny_model_dir, tmp_path):
    body, tokenizer = load_body(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    heads = {"rt": new_head(32, 2, seed=1).state_dict()}
    path = save_checkpoint(tmp_path / "iter-0001", body, tokenizer, meta(), heads)
    reopened = AutoModel.from_pretrained(path)
    assert state_dict_hash(body_state(reopened)) == state_dict_hash(body_state(body))
    saved = read_metadata(path)
    assert saved.iteration == 1 and saved.base_hash == "abc"
    assert saved.body_hash == state_dict_hash(body_state(body))
    assert torch.equal(load_heads(path)["rt"]["out_proj.weight"], heads["rt"]["out_proj.weight"])
    assert load_tokenizer(str(path))("good movie")["input_ids"] == tokenizer("good movie")["input_ids"]


def test_crash_while_writing_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    body, tokenizer = load_body(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    path = save_checkpoint(tmp_path / "ckpt", body, tokenizer, meta(1))
    before = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with torch.no_grad():
        next(body.parameters()).add_(1.0)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", body, tokenizer, meta(2))
    assert read_metadata(path).iteration == 1
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folder left


def test_head_is_separate_from_the_body(tiny_model_dir):
    body = load_body(str(tiny_model_dir))
    model = Classifier(body, new_head(32, 3, seed=0))
    assert not any(name.startswith("head") for name in body_state(body))
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    assert model(batch).shape == (1, 3)


def test_pooling_mean_or_cls(tiny_model_dir):
    body = load_body(str(tiny_model_dir)).eval()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    hidden = body(**batch).last_hidden_state[0]
    mean = Classifier(body, new_head(32, 3, seed=0)).pooled(batch)[0]
    cls = Classifier(body, new_head(32, 3, seed=0), pooling="cls").pooled(batch)[0]
    assert torch.allclose(mean, hidden[:4].mean(0), atol=1e-6)  # the padding token is left out
    assert torch.equal(cls, hidden[0])
    with pytest.raises(P2PColdError, match="pooling='max'"):
        Classifier(body, new_head(32, 3, seed=0), pooling="max")


def test_new_head_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = new_head(8, 2, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a.out_proj.weight, new_head(8, 2, seed=5).out_proj.weight)


def test_load_body_state_rejects_a_foreign_body(tiny_model_dir):
    body = load_body(str(tiny_model_dir))
    with pytest.raises(P2PColdError, match="does not fit"):
        load_body_state(body, {"nonsense.weight": torch.zeros(1)})


def test_model_source_errors(tmp_path, monkeypatch):
    with pytest.raises(P2PColdError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(P2PColdError, match="hub is offline"):
        resolve_model_source("roberta-base")


def test_read_metadata_of_a_plain_folder_is_a_clear_error(tmp_path):
    with pytest.raises(P2PColdError, match="not a p2pcold checkpoint"):
        read_metadata(tmp_path)
    (tmp_path / "p2pcold.json").write_text(json.dumps({"iteration": 1}))
    with pytest.raises(P2PColdError, match="damaged checkpoint metadata"):
        read_metadata(tmp_path)


def test_minilm_alias_loads_the_real_encoder():
    body = load_body("minilm", num_hidden_layers=1)
    assert body.config.hidden_size == 384 and body.config.num_hidden_layers == 1
