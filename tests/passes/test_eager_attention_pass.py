"""memgraph.passes.attention on the eager form HF writes where SDPA cannot serve: Gemma 2's soft-capped scores
(``matmul(q, k^T) * s``, ``tanh(x / c) * c``, ``+ mask``, ``softmax``, ``matmul(P, v)``) and any model run with
``attn_implementation="eager"``. Each case is compared with the eager model; a pattern that is not exactly the
attention (a returned weight matrix, real dropout, another softmax dim, a cap that is not undone) stays eager.
"""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from memgraph import models
from tests.passes.test_attention_pass import (SDPA_ATEN, Capture, _assert_grads_equal, _compile_and_compare,
                                              _count_kernel_calls, _ids, _masked_batch, _qkv, _repeat_kv, _step)

SOFTMAX_ATEN = {torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default}
TRUE_DERIVATIVE = "eager_true_derivative"


def _eager_true_derivative(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                           **kwargs):
    """HF's eager attention, except that a row whose every key is masked (a left-padded row before its first
    token) passes no gradient to its scores. Eager's own softmax there is uniform (every score rounds to the
    mask's large negative), so its output does not depend on q or k, yet autograd differentiates the softmax at
    that point and sends dQ/dK anyway; this reference is the exact derivative of the forward eager computes."""
    from transformers.models.llama.modeling_llama import repeat_kv

    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    x = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    x = x + attention_mask
    p = torch.softmax(x, dim=-1, dtype=torch.float32)
    empty = (attention_mask <= torch.finfo(attention_mask.dtype).min / 2).all(-1, keepdim=True)
    p = torch.where(empty, p.detach(), p)
    return torch.matmul(p.to(query.dtype), v).transpose(1, 2).contiguous(), p


def _reference(model):
    """A copy of the model whose attention is ``_eager_true_derivative`` (with HF's eager masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(TRUE_DERIVATIVE, _eager_true_derivative)
    AttentionMaskInterface.register(TRUE_DERIVATIVE, eager_mask)
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = TRUE_DERIVATIVE
    return reference


@pytest.mark.parametrize(
    "family, layout, kv_bits, lora",
    [
        ("gemma2", None, 16, False),
        ("gemma2", None, 4, True),
        ("gemma2", "right", 16, True),
        ("gemma2", "left", 4, False),
        ("gemma2", "packed", 16, False),
        ("gemma2", "packed", 4, True),
        ("llama", "left", 16, True),  # any model with attn_implementation="eager"
        ("mistral", "right", 4, False),
    ],
)
def test_eager_attention_runs_fused(family, layout, kv_bits, lora):
    """Every layer runs memgraph.attention with the model's scale, soft-cap and window (Gemma 2 alternates
    sliding and global layers); no softmax is left in the forward graph; losses and gradients equal eager's
    (for left padding, the exact derivative of eager's forward: see ``_eager_true_derivative``)."""
    overrides = {"sliding_window": 5} if family == "mistral" else {}
    if family != "gemma2":
        overrides["attn_implementation"] = "eager"
    model = models.build(family, lora=lora, **overrides)
    ids = _ids(model)
    kwargs, labels = _masked_batch(ids, layout) if layout else ({}, ids)
    reference = _reference(model) if layout == "left" else copy.deepcopy(model)
    eager_loss, eager_grads = _step(reference, ids, labels, **kwargs)
    capture = Capture(kv_bits)
    loss, grads = _step(torch.compile(model, backend=capture), ids, labels, **kwargs)

    config = model.config if not lora else model.base_model.model.config
    nodes = capture.attention_nodes()
    assert len(nodes) == config.num_hidden_layers
    if family == "gemma2":
        assert [n.kwargs["softcap"] for n in nodes] == [config.attn_logit_softcapping] * len(nodes)
        assert [n.kwargs["window"] for n in nodes] == [config.sliding_window if kind == "sliding_attention" else None
                                                       for kind in config.layer_types]
        assert all(n.kwargs["scale"] == config.query_pre_attn_scalar ** -0.5 for n in nodes)
    else:
        assert all(n.kwargs["softcap"] is None and n.kwargs["window"] == overrides.get("sliding_window")
                   for n in nodes)
    assert all((n.kwargs["q_segments"] is not None) == (layout is not None) for n in nodes)
    assert all(n.args[1].meta["example_value"].shape[1] == config.num_key_value_heads for n in nodes)
    assert not (SOFTMAX_ATEN | SDPA_ATEN) & set(capture.targets(capture.fw))
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)  # the forward is exact for every kv_bits
    _assert_grads_equal(grads, eager_grads, kv_bits)


def test_left_padding_differs_from_eager_only_in_its_fully_masked_rows():
    """What the reference above leaves out is eager's gradient through rows that see no key, nothing else: with
    the labels of the first real token ignored too (the only loss term a left-padded row's output reaches),
    plain eager and the rewrite agree exactly."""
    model = models.build("gemma2")
    ids = _ids(model)
    kwargs, labels = _masked_batch(ids, "left")
    first_real = kwargs["attention_mask"].argmax(-1)
    labels[torch.arange(ids.shape[0]), first_real] = -100
    eager_loss, eager_grads = _step(copy.deepcopy(model), ids, labels, **kwargs)
    loss, grads = _step(torch.compile(model, backend=Capture(16)), ids, labels, **kwargs)
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    _assert_grads_equal(grads, eager_grads, 16)


def _eager(q, k, v, *, scale=0.25, softcap=None, mask=None, dropout=0.0, softmax_dim=-1, return_weights=False):
    """HF's eager_attention_forward on [B, H, S, D] inputs with GQA by repeat_kv."""
    k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    x = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        x = x / softcap
        x = torch.tanh(x)
        x = x * softcap
    if mask is not None:
        x = x + mask
    p = F.softmax(x, dim=softmax_dim, dtype=torch.float32).to(q.dtype)
    p = F.dropout(p, p=dropout, training=True)
    out = torch.matmul(p, v)
    return (out, p) if return_weights else out


def _float_causal(seq_len):
    return torch.full((seq_len, seq_len), torch.finfo(torch.float32).min).triu(1)


@pytest.mark.parametrize(
    "name, fn, fused, softcap, scale",
    [
        ("scale only, no mask", lambda q, k, v: _eager(q, k, v), True, None, 0.25),
        ("soft-cap + float causal mask", lambda q, k, v: _eager(q, k, v, softcap=1.5, mask=_float_causal(20)),
         True, 1.5, 0.25),
        ("divided by sqrt(d)", lambda q, k, v: torch.matmul(F.softmax(
            torch.matmul(q, _repeat_kv(k, 2).transpose(-1, -2)) / 4.0 + _float_causal(20), dim=-1),
            _repeat_kv(v, 2)), True, None, 0.25),
        ("no scale", lambda q, k, v: torch.matmul(torch.softmax(
            torch.matmul(q, _repeat_kv(k, 2).transpose(2, 3)), -1), _repeat_kv(v, 2)), True, None, 1.0),
        ("weights returned too", lambda q, k, v: sum(x.sum() for x in _eager(q, k, v, return_weights=True)),
         False, None, None),
        ("real dropout", lambda q, k, v: _eager(q, k, v, dropout=0.0) + 0 * _eager(q, k, v, dropout=0.5).detach(),
         True, None, 0.25),  # the first is fused, the second (p=0.5) is left alone
        ("softmax over queries", lambda q, k, v: _eager(q, k, v, softmax_dim=2), False, None, None),
        ("cap not undone", lambda q, k, v: torch.matmul(F.softmax(
            torch.tanh(torch.matmul(q, _repeat_kv(k, 2).transpose(2, 3)) / 2.0) * 3.0, dim=-1), _repeat_kv(v, 2)),
         False, None, None),
        ("additive bias", lambda q, k, v: _eager(q, k, v, mask=torch.ones(20, 20).tril() - 1.0), False, None, None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_eager_patterns(name, fn, fused, softcap, scale):
    inputs = _qkv()
    if name == "real dropout":  # random: compare only the fused half's structure
        capture = Capture()
        torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
        nodes = capture.attention_nodes()
        assert len(nodes) == 1
        return
    if name == "weights returned too":
        capture = Capture()
        out = torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
        assert torch.allclose(out, fn(*inputs)) and not capture.attention_nodes()
        return
    capture = _compile_and_compare(fn, inputs)
    nodes = capture.attention_nodes()
    assert len(nodes) == (1 if fused else 0), name
    if fused:
        assert nodes[0].kwargs["softcap"] == softcap and nodes[0].kwargs["scale"] == pytest.approx(scale)
        assert nodes[0].args[1].meta["example_value"].shape[1] == 2  # the repeat_kv copies are bypassed


def test_eager_patterns_left_alone_are_logged(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="memgraph.passes.attention"):
        capture = Capture()
        torch.compile(lambda q, k, v: _eager(q, k, v, softmax_dim=2), backend=capture)(q, k, v)
    assert not capture.attention_nodes() and "softmax over dim 2" in caplog.text


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_gemma2_through_the_memgraph_backend(monkeypatch, codegen):
    """Gemma 2 + LoRA, right-padded, kv_bits=4, every rewrite: each layer's attention runs the fused kernel (with
    its soft-cap), the capped logits go through the chunked cross-entropy, gradients follow eager's."""
    pytest.importorskip("memgraph.backend")
    model = models.build("gemma2", lora=True)
    ids = _ids(model)
    kwargs, labels = _masked_batch(ids, "right")
    eager_loss, eager_grads = _step(copy.deepcopy(model), ids, labels, **kwargs)
    calls = _count_kernel_calls(monkeypatch)
    compiled = torch.compile(model, backend="memgraph", options={"kv_bits": 4, "codegen": codegen})
    loss, grads = _step(compiled, ids, labels, **kwargs)
    layers = model.base_model.model.config.num_hidden_layers
    assert calls == {"forward": layers, "backward": layers}
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    _assert_grads_equal(grads, eager_grads, 4)
