"""Model sources (a memgraph.models name, a directory with config.json, a cached Hub id) and the training setups
built from them on the meta device."""
from __future__ import annotations

import json

import pytest
import torch

from memgraph.errors import MemgraphError
from memgraph.sources import model_config, training_model


def test_a_reference_name_a_directory_and_the_hub_cache(tmp_path, monkeypatch):
    assert model_config("llama3-8b").vocab_size == 128256
    config = model_config("llama")
    directory = tmp_path / "my-model"
    config.save_pretrained(directory)
    assert model_config(str(directory)).hidden_size == config.hidden_size
    # A Hub id resolves from the local cache only (offline): put a config where huggingface_hub looks.
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config.to_dict()))
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert model_config("someone/tiny").num_hidden_layers == config.num_hidden_layers


@pytest.mark.parametrize("source, message", [
    ("no-such-model", "a memgraph.models name"),
    ("someone/not-cached", "a local directory holding config.json"),
])
def test_unknown_sources_name_the_three_forms(source, message):
    with pytest.raises(MemgraphError, match=message):
        model_config(source)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(MemgraphError, match="without a config.json"):
        model_config(str(tmp_path))


def test_training_setups_on_the_meta_device():
    nf4 = training_model("llama3-8b", weights="nf4", lora=16)
    assert all(p.device.type == "meta" for p in nf4.parameters())
    trainable = sum(p.numel() for p in nf4.parameters() if p.requires_grad)
    assert 40e6 < trainable < 45e6  # LoRA r=16 on every projection of Llama-3-8B: 41.9M
    packed = sum(b.numel() for n, b in nf4.named_buffers() if n.endswith("nf4_packed"))
    h, kv, inner, layers = 4096, 1024, 14336, 32
    assert packed == layers * (2 * h * h + 2 * h * kv + 3 * h * inner) // 2  # 4 bits per frozen projection weight
    full = training_model("llama", weights="bf16", lora=None)
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(MemgraphError, match="weights"):
        training_model("llama", weights="int3")
    with pytest.raises(MemgraphError, match="full fine-tuning"):
        training_model("llama", weights="nf4", lora=None)
    with pytest.raises(MemgraphError, match="rank"):
        training_model("llama", lora=0)
    assert training_model("llama", weights="bnb").config.use_cache is False  # bnb plans as nf4 on meta
    assert next(training_model("llama").parameters()).dtype == torch.bfloat16
