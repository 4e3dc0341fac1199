"""Shared test helpers: reference comparisons against eager PyTorch."""
from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The cost model is checked on the graphs as the model traces them, run eagerly (one allocation per node):
# planned for eager codegen.
NO_REWRITES = {"rewrites": False, "codegen": "eager"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "_orig_mod", model)
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


def lm_step(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward+backward of a causal LM; returns the loss and the trainable gradients."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def compare_to_eager(model, ids, options, *, seed: int | None = None, loss_rtol=1e-4, grad_rtol=1e-3,
                     expect_fallback: bool = False):
    """Train one step eagerly and compiled (on a deep copy); assert equal loss and gradients."""
    compiled_model = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    eager_loss, eager_grads = lm_step(model, ids)
    import memgraph

    before = len(memgraph.compiled_graphs())
    compiled = torch.compile(compiled_model, backend="memgraph", options=options)
    if seed is not None:
        torch.manual_seed(seed)
    loss, grads = lm_step(compiled, ids)
    assert abs(float(loss) - float(eager_loss)) <= loss_rtol * abs(float(eager_loss)), (float(loss), float(eager_loss))
    assert grads.keys() == eager_grads.keys()
    worst = max((relative_error(grads[n], g), n) for n, g in eager_grads.items())
    assert worst[0] < grad_rtol, worst
    if not expect_fallback:
        fallbacks = [r.fallback for r in memgraph.compiled_graphs()[before:] if r.fallback]
        assert not fallbacks, fallbacks  # the pipeline ran for real, not a silent eager fallback
    return compiled


def tiny_llama_with_biases(layers: int = 2, **overrides):
    """A float32 tiny Llama whose linear biases (when enabled) are random: HF initializes them to zero,
    which would hide a transform that drops a bias."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.1)
    return model


class RecordOps(TorchDispatchMode):
    """Records every op that reaches the dispatcher while it is active (what a tracer or FlopCounterMode sees)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))
