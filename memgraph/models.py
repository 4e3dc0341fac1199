"""Model configurations built from config alone (nothing is downloaded): tiny ones for the demo and tests,
and the reference architectures of DESIGN.md (random weights) for benchmarks."""
from __future__ import annotations

import contextlib
from typing import Any

# Tiny configs exercise each family's real code path (GQA, tied embeddings, gelu, fused qkv, ...).
TINY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=128,
                  max_position_embeddings=128),
    # Eager attention with soft-capped scores (SDPA has no cap), alternating sliding-window layers, capped logits.
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                   max_position_embeddings=128, sliding_window=8, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, attn_implementation="eager"),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 bos_token_id=0, eos_token_id=0),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}

# Reference workloads of DESIGN.md: real architectures, random weights.
REFERENCE: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                      max_position_embeddings=131072),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=131072),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072),
    "gemma-7b": dict(model_type="gemma", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000,
                     max_position_embeddings=131072),
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "c_attn", "c_proj", "c_fc", "qkv_proj", "gate_up_proj")


def available() -> list[str]:
    return [*TINY, *REFERENCE]


def config(name: str, **overrides: Any):
    """A transformers config for a tiny or reference model, by name."""
    from transformers import AutoConfig

    table = {**TINY, **REFERENCE}
    if name not in table:
        raise ValueError(f"unknown model {name!r}; choose one of {available()}")
    settings = {**table[name], **overrides}
    model_type = settings.pop("model_type")
    settings.setdefault("attn_implementation", "sdpa")
    return AutoConfig.for_model(model_type, **settings)


def build(name: str, *, dtype=None, device=None, lora: bool = False, lora_rank: int = 16, seed: int = 0,
          **overrides: Any):
    """A randomly initialised causal LM (optionally with PEFT LoRA on every projection)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Built directly on the target device: random init of an 8B model on the CPU takes minutes.
    # (No device given: the caller's default device, e.g. an enclosing ``with torch.device("meta")``.)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config(name, **overrides), dtype=dtype or torch.float32)
    if lora:
        model = add_lora(model, rank=lora_rank)
    return model


def add_lora(model, *, rank: int = 16, alpha: int = 16):
    """PEFT LoRA (dropout 0) on every linear projection the model has, as in DESIGN.md's workloads."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_projection(m, nn)}
    targets = sorted(names & set(LORA_TARGETS))
    if not targets:
        raise ValueError(f"no LoRA target found among {sorted(names)}")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))


def _is_projection(module, nn) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def to_bnb_4bit(model, *, compute_dtype=None, double_quant: bool = True, skip=("lm_head",)):
    """Replace frozen ``nn.Linear`` layers by bitsandbytes NF4 ``Linear4bit`` in place: what
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``
    builds, without a download. Quantization happens on the layer's device (CUDA for speed)."""
    import bitsandbytes as bnb
    import torch.nn as nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            device, dtype = child.weight.device, child.weight.dtype
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype or dtype, compress_statistics=double_quant,
                                      quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=double_quant, module=layer)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))
            del child
    return model
