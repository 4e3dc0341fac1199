"""Tiny Hugging Face models (random weights, nothing downloaded) and helpers shared by the cost-model tests."""
from __future__ import annotations

import pytest
import torch

VOCAB = 96


def tiny_model(arch: str, lora: bool = False) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             use_cache=False))
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             use_cache=False))
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    elif arch == "gpt2":
        # Dropout stays on (0.1): random ops and their masks are part of what must be predicted.
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           use_cache=False, bos_token_id=0, eos_token_id=0))
        targets = ["c_attn", "c_proj"]
    else:
        raise ValueError(arch)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                 fan_in_fan_out=arch == "gpt2"))
    return model.train()


def token_ids(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, length), generator=generator)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def make_model():
    """``make_model(arch, lora=False)``: a tiny llama / gpt2 / qwen2 (optionally with LoRA adapters)."""
    return tiny_model


@pytest.fixture
def make_ids():
    """``make_ids(length, seed=0)``: random token ids of shape (1, length)."""
    return token_ids
