"""memgraph.quantize_(model, "nf4"): frozen linears -> NF4 in place, with plain HF models and PEFT (both orders)."""
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch._dynamo.backends.debugging import aot_eager  # noqa: E402

from memgraph.kernels.nf4 import NF4Weight  # noqa: E402
from memgraph.quantize import NF4Linear, quantize_  # noqa: E402
from tests.helpers import tiny_llama_with_biases  # noqa: E402

LAYERS, LINEARS_PER_LAYER = 2, 7
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRAD_TOLERANCE = 1e-3  # relative error of compiled vs eager LoRA gradients


def tiny_llama(layers=LAYERS, **overrides):
    return tiny_llama_with_biases(layers, **overrides)


def lora_config():
    # init_lora_weights=False: B != 0, so gradients reach A through the NF4 layers' grad-input too.
    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                           init_lora_weights=False)


def frozen(model):
    return model.requires_grad_(False)


def nf4_modules(model):
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def token_ids(seed=0):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------- plain models
def test_frozen_linears_become_nf4_and_float_weights_are_freed():
    model = frozen(tiny_llama())
    old_weight = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    embedding, lm_head = model.model.embed_tokens, model.lm_head
    assert quantize_(model, "nf4") is model
    assert len(nf4_modules(model)) == LAYERS * LINEARS_PER_LAYER
    assert type(model.lm_head) is nn.Linear and model.lm_head is lm_head  # kept by default
    assert model.model.embed_tokens is embedding
    gc.collect()
    assert old_weight() is None
    up = model.model.layers[0].mlp.up_proj
    assert up.weight.dtype == torch.uint8 and up.in_features == 64 and up.out_features == 128
    assert up.nf4_nested_absmax is not None  # double quantization by default, as QLoRA


def test_quantized_model_equals_dequantized_weights():
    reference = frozen(tiny_llama(attention_bias=True))
    model = quantize_(frozen(tiny_llama(attention_bias=True)), "nf4")
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            target = reference.get_submodule(name)
            target.weight.data = module.nf4_weight().dequantize(torch.float32)
            assert module.bias is not None or target.bias is None
    ids = token_ids()
    assert rel_err(model(input_ids=ids).logits, reference(input_ids=ids).logits) < 1e-5


def test_nf4_linear_module_matches_nf4weight():
    linear = nn.Linear(37, 5).requires_grad_(False)  # in_features not a multiple of the block size
    module = NF4Linear.from_linear(linear, double_quant=False)
    expected = NF4Weight.quantize(linear.weight.detach())
    assert torch.equal(module.nf4_packed, expected.packed) and torch.equal(module.nf4_absmax, expected.absmax)
    x = torch.randn(4, 37)
    assert rel_err(module(x), x @ expected.dequantize().T + linear.bias) < 1e-6


def test_autocast_runs_the_linear_in_the_autocast_dtype():
    module = NF4Linear.from_linear(nn.Linear(64, 16).requires_grad_(False))
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, module(x.bfloat16())) == 0


def test_bad_arguments_raise():
    model = frozen(tiny_llama())
    with pytest.raises(ValueError, match=r"valid formats are \['nf4'\]"):
        quantize_(model, "int3")
    with pytest.raises(ValueError, match="blocksize"):
        quantize_(model, "nf4", blocksize=48)
    assert not nf4_modules(model)
    with pytest.raises(RuntimeError, match="cannot be re-initialized"):
        quantize_(model, "nf4").model.layers[0].mlp.up_proj.reset_parameters()


def test_selection_options():
    model = tiny_llama()
    model.requires_grad_(False)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)  # trainable: kept
    quantize_(model, "nf4", include_lm_head=True, skip=["*.self_attn.o_proj"],
              filter_fn=lambda module, name: not name.endswith("layers.0.mlp.gate_proj"))
    names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert "lm_head" in names
    assert "model.layers.1.mlp.down_proj" not in names
    assert not any(n.endswith("o_proj") for n in names)
    assert "model.layers.0.mlp.gate_proj" not in names
    assert len(names) == LAYERS * LINEARS_PER_LAYER + 1 - 1 - LAYERS - 1


def test_tied_lm_head_is_kept():
    model = frozen(tiny_llama(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_(model, "nf4", include_lm_head=True)
    assert type(model.lm_head) is nn.Linear


def test_dtype_casts_keep_the_nf4_format():
    model = quantize_(frozen(tiny_llama()), "nf4").to(torch.bfloat16)
    module = model.model.layers[0].self_attn.q_proj
    assert module.nf4_packed.dtype == torch.uint8 and module.nf4_absmax.dtype == torch.uint8
    assert module.nf4_nested_absmax.dtype == torch.float32 and module.nf4_nested_offset.dtype == torch.float32
    logits = model(input_ids=token_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# -------------------------------------------------------------------------------------------------- PEFT
def quantize_then_peft():
    return peft.get_peft_model(quantize_(frozen(tiny_llama()), "nf4"), lora_config())


def peft_then_quantize():
    model = peft.get_peft_model(tiny_llama(), lora_config())
    return quantize_(model, "nf4")


@pytest.mark.parametrize("build", [quantize_then_peft, peft_then_quantize])
def test_peft_wraps_nf4_layers(build):
    model = build()
    assert len(nf4_modules(model)) == LAYERS * LINEARS_PER_LAYER
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == LAYERS * LINEARS_PER_LAYER
    assert all(isinstance(layer.get_base_layer(), NF4Linear) for layer in lora_layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapters = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert len(adapters) == 2 * len(lora_layers) and all(type(m) is nn.Linear for m in adapters)


def test_frozen_adapters_are_not_quantized():
    model = peft.get_peft_model(tiny_llama(), lora_config()).requires_grad_(False)  # e.g. an inference adapter
    quantize_(model, "nf4")
    assert len(nf4_modules(model)) == LAYERS * LINEARS_PER_LAYER
    adapters = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert adapters and all(type(m) is nn.Linear for m in adapters)


def train_step_matches_eager(model, backend):
    ids = token_ids(1)
    loss_eager = model(input_ids=ids, labels=ids).loss
    loss_eager.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend=backend)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - loss_eager.item()) <= 1e-5 * abs(loss_eager.item())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert eager[name].abs().sum() > 0, name
            assert rel_err(param.grad, eager[name]) < GRAD_TOLERANCE, name

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.isfinite(compiled(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("build", [quantize_then_peft, peft_then_quantize])
def test_lora_step_compiled_matches_eager(build):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    train_step_matches_eager(build(), backend)
    assert len(graphs) == 1  # no graph breaks
    ops = [n.target for n in graphs[0].graph.nodes]
    assert sum(t in (torch.ops.memgraph.nf4_linear, torch.ops.memgraph.nf4_linear.default) for t in ops) == \
        LAYERS * LINEARS_PER_LAYER


@pytest.mark.slow
def test_lora_step_memgraph_backend_matches_eager(caplog):
    # One layer: Inductor's CPU codegen dominates this test's time.
    model = peft.get_peft_model(quantize_(frozen(tiny_llama(layers=1)), "nf4"), lora_config())
    with caplog.at_level(logging.WARNING, logger="memgraph"):
        train_step_matches_eager(model, "memgraph")
    # The backend falls back to eager (same gradients) when its pipeline fails: that must not have happened.
    assert not [r for r in caplog.records if r.name.startswith("memgraph") and r.levelno >= logging.WARNING]
