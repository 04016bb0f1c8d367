"""Checkpoint folders: sharded save/load, atomic writes, clear errors naming the file."""
import json

import pytest
import torch

import dare
from dare.checkpoint import CheckpointError, read_state_dict
from dare_plugins.llada.modeling import build, tiny_config


def tiny_llada():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=64, embedding_size=64, mask_token_id=63, eos_token_id=62, pad_token_id=62)
    model = build(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.hf_config, model.family = cfg, "llada"
    return model


def test_sharded_round_trip_keeps_names_and_logits(tmp_path):
    model = tiny_llada().eval()
    dare.save_model(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(model.state_dict())
    again = dare.load_model(tmp_path / "ckpt")
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    assert set(read_state_dict(tmp_path / "ckpt")) == set(model.state_dict())


def test_missing_shard_names_the_index_and_shard(tmp_path):
    dare.save_model(tiny_llada(), tmp_path / "ckpt", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: names shard\(s\) that are missing: {shard.name}"):
        dare.load_model(tmp_path / "ckpt")


def test_unknown_model_type_names_config_and_known_types(tmp_path):
    dare.save_model(tiny_llada(), tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: no installed model family loads model_type 'mamba'; "
                                              r"known model types: Dream, llada, sdar"):
        dare.load_model(tmp_path / "ckpt")


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        dare.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        dare.load_model(tmp_path / "empty")


def test_save_over_existing_folder_is_atomic(tmp_path):
    model = tiny_llada()
    dare.save_model(model, tmp_path / "ckpt")
    dare.save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left behind
