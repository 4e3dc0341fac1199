"""memgraph.passes.attention: SDPA in Dynamo graphs of tiny HF models becomes memgraph.attention.

The pass is tested on its own (Dynamo graph -> rewrite -> AOTAutograd with eager compilers, so the forward and
backward graphs can be inspected) and end to end through backend="memgraph".
"""
import copy
import logging
import types

import pytest
import torch
import torch.nn.functional as F

import memgraph
from memgraph import models
from memgraph.kernels._dispatch import use_triton
from memgraph.kernels.attention import op as OP
from memgraph.passes import RUNTIME_CHECKS
from memgraph.passes.attention import rewrite_attention

ATTENTION = torch.ops.memgraph.attention.default
ATTENTION_BACKWARD = torch.ops.memgraph.attention_backward.default
SDPA_ATEN = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten.scaled_dot_product_attention.default}


def _rel(actual, expected):
    actual, expected = actual.detach(), expected.detach().double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def _cos(actual, expected):
    actual, expected = actual.detach(), expected.detach()
    return float(F.cosine_similarity(actual.double().flatten(), expected.double().flatten(), dim=0))


def _assert_grads_equal(grads, reference_grads, kv_bits):
    """Every non-zero reference gradient matched: exactly (float32 rounding) with kv_bits=16, within DESIGN.md's
    4-bit K/V gates otherwise."""
    for name, g in reference_grads.items():
        if g.norm() == 0:
            continue
        if kv_bits == 16:
            assert _rel(grads[name], g) < 1e-4, name
        else:
            assert _rel(grads[name], g) <= 0.20 and _cos(grads[name], g) >= 0.98, name


class Capture:
    """A backend: rewrite the Dynamo graph, then AOTAutograd with eager compilers that keep the graphs."""

    def __init__(self, kv_bits=16):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.options = types.SimpleNamespace(kv_bits=kv_bits)
        self.dynamo, self.fw, self.bw = [], [], []

        def keep(graphs):
            def compile_graph(gm, example_inputs):
                graphs.append(gm)
                return make_boxed_func(gm.forward)

            return compile_graph

        self.aot = aot_autograd(fw_compiler=keep(self.fw), bw_compiler=keep(self.bw))

    def __call__(self, gm, example_inputs):
        gm = rewrite_attention(gm, example_inputs, self.options)
        self.dynamo.append(gm)
        return self.aot(gm, example_inputs)

    def targets(self, graphs):
        return [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]

    def attention_nodes(self):
        return [n for gm in self.dynamo for n in gm.graph.nodes if n.op == "call_function" and n.target == ATTENTION]


def _ids(model, batch=2, seq=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)


def _step(model, ids, labels=None, **kwargs):
    loss = model(input_ids=ids, labels=ids if labels is None else labels, use_cache=False, **kwargs).loss
    loss.backward()
    module = getattr(model, "_orig_mod", model)
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


# ------------------------------------------------------------------------------------------------------------
# Tiny HF models, pass + AOTAutograd
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, kv_bits, overrides",
    [
        ("llama", 16, {}),
        ("llama", 4, {}),
        ("mistral", 16, {"sliding_window": 5}),  # an in-graph sliding-window mask, proven and fused
        ("qwen2", 4, {}),
        ("gemma", 16, {}),  # MQA (one KV head)
    ],
)
def test_tiny_models_run_fused_attention(family, kv_bits, overrides):
    model = models.build(family, **overrides)
    ids = _ids(model)
    eager_loss, eager_grads = _step(copy.deepcopy(model), ids)
    capture = Capture(kv_bits)
    loss, grads = _step(torch.compile(model, backend=capture), ids)

    layers = model.config.num_hidden_layers
    nodes = capture.attention_nodes()
    assert len(nodes) == layers
    assert all(n.kwargs["kv_bits"] == kv_bits for n in nodes)
    expected_window = overrides.get("sliding_window")
    assert all(n.kwargs["causal"] and n.kwargs["window"] == expected_window for n in nodes)
    # GQA is native: the op reads the un-expanded K/V.
    kv_heads = model.config.num_key_value_heads
    assert all(n.args[1].meta["example_value"].shape[1] == kv_heads for n in nodes)
    assert capture.targets(capture.fw).count(ATTENTION) == layers
    assert capture.targets(capture.bw).count(ATTENTION_BACKWARD) == layers
    assert not SDPA_ATEN & set(capture.targets(capture.fw))

    if kv_bits == 16:
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
        worst = max(_rel(grads[n], g) for n, g in eager_grads.items())
        assert worst < 1e-4, worst
    else:
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)  # the forward is exact
        for name, g in eager_grads.items():
            if g.norm() > 0:
                assert _rel(grads[name], g) <= 0.20 and _cos(grads[name], g) >= 0.98, name


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_kv4_backward_keeps_no_full_precision_kv(kv_bits):
    model = models.build("llama")
    ids = _ids(model, batch=1, seq=32)
    capture = Capture(kv_bits)
    _step(torch.compile(model, backend=capture), ids)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_shape = (1, config.num_key_value_heads, 32, head_dim)
    saved = [n.meta["val"] for gm in capture.bw for n in gm.graph.nodes if n.op == "placeholder" and "val" in n.meta]
    kv_like = [t for t in saved if tuple(t.shape) == kv_shape and t.is_floating_point()]
    if kv_bits == 16:
        assert len(kv_like) == 2 * config.num_hidden_layers  # K and V of every layer
    else:
        assert not kv_like
        assert sum(t.dtype == torch.uint8 for t in saved) == 2 * config.num_hidden_layers


@pytest.mark.parametrize("dynamic", [None, False], ids=["automatic-dynamic", "static"])
def test_second_sequence_length(dynamic):
    """A second length recompiles. Automatic dynamic shapes make HF build its causal mask from the symbolic
    length: it is still fused (its pattern is read at a probe length and re-checked per length at run time)."""
    model = models.build("llama")
    reference = copy.deepcopy(model)
    capture = Capture(4)
    compiled = torch.compile(model, backend=capture, dynamic=dynamic)
    for seq in (16, 24):
        ids = _ids(model, seq=seq, seed=seq)
        loss, grads = _step(compiled, ids)
        eager_loss, eager_grads = _step(reference, ids)
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
        assert all(_cos(grads[n], g) >= 0.98 for n, g in eager_grads.items() if g.norm() > 0)
    layers = model.config.num_hidden_layers
    fused = [sum(n.op == "call_function" and n.target == ATTENTION for n in gm.graph.nodes) for gm in capture.dynamo]
    assert fused == [layers, layers]
    guards = [check for gm in capture.dynamo for check in getattr(gm, RUNTIME_CHECKS, [])]
    assert bool(guards) == (dynamic is None)  # only the symbolic-length mask needs a run-time check


def _memgraph_dynamic(model, dynamic=True):
    return torch.compile(model, backend="memgraph", dynamic=dynamic,
                         options={"codegen": "eager", "solver": "none", "rewrites": "attention"})


def test_dynamic_sliding_window_is_fused_at_every_length(monkeypatch):
    """Mistral's sliding-window mask under dynamic=True: the window (8) is found even from a traced length below
    it (the probe length is twice the mask's largest constant), every length runs the fused op with eager's
    gradients, and the mask is re-checked once per new length."""
    model = models.build("mistral", sliding_window=8)
    reference = copy.deepcopy(model)
    from memgraph.passes import attention as attention_pass

    checked = []
    holds = attention_pass.MaskGuard.holds

    def spy(self, sizes):
        checked.append((tuple(int(s) for s in sizes), self.causal, self.window))
        return holds(self, sizes)

    monkeypatch.setattr(attention_pass.MaskGuard, "holds", spy)
    compiled = _memgraph_dynamic(model)
    for seq in (6, 24, 40, 24):
        ids = _ids(model, batch=1, seq=seq, seed=seq)
        loss, grads = _step(compiled, ids)
        eager_loss, eager_grads = _step(reference, ids)
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
        assert max(_rel(grads[n], g) for n, g in eager_grads.items() if g.norm() > 0) < 1e-4
    assert {(causal, window) for _, causal, window in checked} == {(True, 8)}
    lengths = [max(sizes) for sizes, _, _ in checked]
    assert {6, 24, 40} <= set(lengths)


@pytest.mark.parametrize("family, layout", [("llama", "right"), ("mistral", "left"), ("qwen2", "packed")])
def test_dynamic_padded_and_packed_batches_are_fused_at_every_length(family, layout, monkeypatch):
    """Batches whose length changes every step (dynamic=True, one compile): the padding/packed mask is read from
    the input at every length, its form re-checked once per new size, and gradients equal eager's."""
    from memgraph.passes import attention as attention_pass

    checked = []
    holds = attention_pass.InputMaskGuard.holds

    def spy(self, sizes):
        checked.append(tuple(int(s) for s in sizes))
        return holds(self, sizes)

    monkeypatch.setattr(attention_pass.InputMaskGuard, "holds", spy)
    overrides = {"sliding_window": 5} if family == "mistral" else {}
    model = models.build(family, **overrides)
    reference = copy.deepcopy(model)
    compiled = _memgraph_dynamic(model)
    for seq in (12, 20, 12):
        ids = _ids(model, batch=2, seq=seq, seed=seq)
        kwargs, labels = _masked_batch(ids[:, :12], layout)
        if layout == "packed":  # the last sequence of each row grows with the length
            extra = torch.arange(seq - 12) + kwargs["position_ids"][:, -1:] + 1
            kwargs["position_ids"] = torch.cat([kwargs["position_ids"], extra], dim=1)
        else:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask, mask[:, -1:].expand(2, seq - 12)], dim=1) if layout == \
                "right" else torch.cat([mask, torch.ones(2, seq - 12, dtype=mask.dtype)], dim=1)
        labels = ids.masked_fill(kwargs["attention_mask"] == 0, -100) if layout != "packed" else ids
        loss, grads = _step(compiled, ids, labels, **kwargs)
        eager_loss, eager_grads = _step(reference, ids, labels, **kwargs)
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss), seq
        assert max(_rel(grads[n], g) for n, g in eager_grads.items() if g.norm() > 0) < 1e-4, seq
    records = [r for r in memgraph.compiled_graphs() if "attention" in r.rewrites]
    assert records and any(size == 20 for sizes in checked for size in sizes), checked


class _LengthDependentMask(torch.nn.Module):
    """Causal, plus key j visible from query i when (j - i)^2 == 7 * S: no such pair at S = 20 or 24 (the
    compiled length), but (i, i + 14) at S = 28. No constant in it reveals the 28."""

    def forward(self, qkv):
        q, k, v = qkv.unbind(0)  # one input: one symbolic length for all three
        length = q.shape[2]
        i = torch.arange(length)
        gap = i[None, :] - i[:, None]
        mask = (gap <= 0) | (gap * gap == 7 * length)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_dynamic_mask_that_changes_pattern_raises_at_run_time():
    """The second length recompiles with a symbolic length (automatic dynamic shapes; dynamic=True would make
    the head dim symbolic too, which the kernels cannot take): fused, checked per length, and a length whose
    mask is not causal raises instead of computing a different attention."""
    from memgraph.errors import MemgraphError

    module = _LengthDependentMask()
    compiled = _memgraph_dynamic(module, dynamic=None)
    for seq in (24, 20):
        qkv = torch.stack(_qkv(kv_heads=4, seq_len=seq, seed=seq))
        assert _rel(compiled(qkv), module(qkv)) < 1e-5
    assert [r.rewrites for r in memgraph.compiled_graphs()[-2:]] == [["attention"], ["attention"]]
    with pytest.raises(MemgraphError, match="not the causal pattern"):
        compiled(torch.stack(_qkv(kv_heads=4, seq_len=28)))


def _masked_batch(ids, layout):
    """(model keyword arguments, labels) of a padded ("left"/"right") or packed batch of two rows."""
    labels = ids.clone()
    if layout == "packed":  # sequences of 5+4+3 and 7+5 tokens, each starting at position 0
        positions = torch.tensor([[*range(5), *range(4), *range(3)], [*range(7), *range(5)]])
        return {"position_ids": positions}, labels
    mask = torch.ones_like(ids)
    if layout == "left":
        mask[0, :4], mask[1, :1] = 0, 0
    else:
        mask[0, -5:], mask[1, -2:] = 0, 0
    labels[mask == 0] = -100
    return {"attention_mask": mask}, labels


@pytest.mark.parametrize(
    "family, layout, kv_bits, lora",
    [
        ("llama", "left", 16, False),
        ("llama", "right", 4, True),
        ("llama", "packed", 16, True),
        ("mistral", "left", 4, False),  # the sliding window restricted by padding
        ("mistral", "packed", 16, False),
        ("qwen2", "right", 16, True),
        ("qwen2", "packed", 4, False),
    ],
)
def test_padded_and_packed_batches_run_fused_attention(family, layout, kv_bits, lora):
    """HF's causal-and-padding mask (from attention_mask) and packed-sequence mask (from position_ids) become the
    kernel's segments: every layer runs memgraph.attention, no SDPA is left, losses and gradients equal eager's."""
    overrides = {"sliding_window": 5} if family == "mistral" else {}
    model = models.build(family, lora=lora, **overrides)
    ids = _ids(model)
    kwargs, labels = _masked_batch(ids, layout)
    eager_loss, eager_grads = _step(copy.deepcopy(model), ids, labels, **kwargs)
    capture = Capture(kv_bits)
    loss, grads = _step(torch.compile(model, backend=capture), ids, labels, **kwargs)

    nodes = capture.attention_nodes()
    assert len(nodes) == model.config.num_hidden_layers
    assert all(n.kwargs["q_segments"] is not None for n in nodes)
    assert all(n.kwargs["window"] == overrides.get("sliding_window") for n in nodes)
    assert not SDPA_ATEN & set(capture.targets(capture.fw))
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)  # the forward is exact for every kv_bits
    _assert_grads_equal(grads, eager_grads, kv_bits)


def _padding_fn(build_mask):
    def attend(q, k, v, attention_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build_mask(q.shape[2], attention_mask)[:, None],
                                              enable_gqa=True)

    return attend


def _causal_and(seq_len, keys):
    positions = torch.arange(seq_len)
    return (positions[None, :, None] >= positions[None, None, :]) & keys


@pytest.mark.parametrize(
    "name, build_mask, fused",
    [
        ("keys where mask != 0", lambda n, m: _causal_and(n, m.bool()[:, None, :]), True),
        ("keys where mask == 1 (2 is padding here)", lambda n, m: _causal_and(n, (m == 1)[:, None, :]), False),
        ("query rows masked too", lambda n, m: _causal_and(n, m.bool()[:, None, :] & m.bool()[:, :, None]), False),
        ("a key masked by position", lambda n, m: _causal_and(n, m.bool()[:, None, :] & (torch.arange(n) != 3)),
         False),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_masks_from_an_input_are_fused_only_when_they_are_the_padding_form(name, build_mask, fused, caplog):
    q, k, v = _qkv(seq_len=12)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :3] = 0
    capture = Capture(16)
    compiled = torch.compile(_padding_fn(build_mask), backend=capture, fullgraph=True)
    with caplog.at_level(logging.INFO, logger="memgraph.passes.attention"):
        out = compiled(q, k, v, attention_mask)
    expected = _padding_fn(build_mask)(q, k, v, attention_mask)
    assert _rel(out, expected) < 1e-5
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        assert _rel(got, want) < 1e-4
    assert len(capture.attention_nodes()) == (1 if fused else 0), name
    if not fused:
        assert "neither a padding nor a packed-sequence mask" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# Hand-written SDPA patterns
# ------------------------------------------------------------------------------------------------------------
def _repeat_kv(x, n_rep):
    batch, kv_heads, seq_len, head_dim = x.shape
    x = x[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return x.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def _qkv(batch=2, heads=4, kv_heads=2, seq_len=20, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim), (batch, kv_heads, seq_len,
                                                                                      head_dim)]
    return [torch.randn(*s, generator=generator, requires_grad=True) for s in shapes]


def _compile_and_compare(fn, inputs, kv_bits=16):
    capture = Capture(kv_bits)
    compiled = torch.compile(fn, backend=capture, fullgraph=True)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref = fn(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    assert _rel(out, ref) < 1e-5
    assert max(_rel(a, b) for a, b in zip(grads, ref_grads)) < 1e-4
    return capture


def _causal_bool(seq_len):
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


@pytest.mark.parametrize(
    "name, fn, fused, causal, window",
    [
        ("repeat_kv + is_causal", lambda q, k, v: F.scaled_dot_product_attention(
            q, _repeat_kv(k, 2), _repeat_kv(v, 2), is_causal=True), True, True, None),
        ("enable_gqa, non-causal", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, scale=0.3), True, False, None),
        ("in-graph bool causal mask", lambda q, k, v: F.scaled_dot_product_attention(
            q, _repeat_kv(k, 2), _repeat_kv(v, 2), attn_mask=_causal_bool(q.shape[2])), True, True, None),
        ("in-graph float causal mask", lambda q, k, v: F.scaled_dot_product_attention(
            q, _repeat_kv(k, 2), _repeat_kv(v, 2),
            attn_mask=torch.full((q.shape[2], q.shape[2]), torch.finfo(q.dtype).min).triu(1)), True, True, None),
        ("in-graph two-sided window", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, attn_mask=(torch.arange(20)[:, None] - torch.arange(20)[None, :]).abs() < 3),
         True, False, 3),
        ("causal mask with a hole", lambda q, k, v: F.scaled_dot_product_attention(
            q, _repeat_kv(k, 2), _repeat_kv(v, 2),
            attn_mask=_causal_bool(q.shape[2]) & (torch.arange(q.shape[2]) != 2)[None, :]), False, None, None),
        ("additive bias", lambda q, k, v: F.scaled_dot_product_attention(
            q, _repeat_kv(k, 2), _repeat_kv(v, 2), attn_mask=torch.ones(q.shape[2], q.shape[2]).tril() - 1.0),
         False, None, None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_patterns(name, fn, fused, causal, window):
    inputs = _qkv()
    capture = _compile_and_compare(fn, inputs)
    nodes = capture.attention_nodes()
    assert len(nodes) == (1 if fused else 0), name
    if fused:
        assert nodes[0].kwargs["causal"] == causal and nodes[0].kwargs["window"] == window
        assert nodes[0].args[1].meta["example_value"].shape[1] == 2  # un-expanded K
        # the repeat_kv copies are gone from the graph
        assert not [n for gm in capture.dynamo for n in gm.graph.nodes if n.op == "call_method" and n.target ==
                    "expand"]


def test_in_place_mutations_are_respected():
    """Dynamo graphs are not functional: a mask edited in place is not the mask its builders compute, and a
    repeat_kv copy edited in place is not the un-expanded K."""

    def edited_mask(q, k, v):
        mask = _causal_bool(q.shape[2])
        mask[:, 2] = False  # still no empty row; evaluating only mask's builders would wrongly say "causal"
        return F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2), attn_mask=mask)

    def edited_key(q, k, v):
        key = _repeat_kv(k, 2)
        key.mul_(2.0)
        return F.scaled_dot_product_attention(q, key, _repeat_kv(v, 2), is_causal=True)

    assert not _compile_and_compare(edited_mask, _qkv()).attention_nodes()
    nodes = _compile_and_compare(edited_key, _qkv()).attention_nodes()
    assert len(nodes) == 1 and nodes[0].args[1].meta["example_value"].shape[1] == 4  # fused, not bypassed


def test_dropout_and_unsupported_head_dim_are_left_alone(caplog):
    q, k, v = _qkv(head_dim=24)
    with caplog.at_level(logging.INFO, logger="memgraph.passes.attention"):
        capture = Capture(4)
        torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True),
                      backend=capture)(q, k, v)
        assert not capture.attention_nodes() and "head_dim=24" in caplog.text
        q, k, v = _qkv()
        capture = Capture(4)
        torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, dropout_p=0.1),
                      backend=capture)(q, k, v)
        assert not capture.attention_nodes() and "dropout_p=0.1" in caplog.text


def test_unknown_inputs_never_raise():
    """A graph without example values (built by hand) is left unchanged, not an error."""
    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(name) for name in "qkv")
    graph.output(graph.call_function(F.scaled_dot_product_attention, (q, k, v), {"is_causal": True}))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    before = str(gm.graph)
    assert str(rewrite_attention(gm, [], types.SimpleNamespace(kv_bits=4)).graph) == before


# ------------------------------------------------------------------------------------------------------------
# End to end through backend="memgraph"
# ------------------------------------------------------------------------------------------------------------
def _count_kernel_calls(monkeypatch):
    calls = {"forward": 0, "backward": 0}
    triton = use_triton(torch.empty(0), OP.log)
    forward = OP.fwd_triton if triton else OP.torch_forward
    backward = OP.bwd_triton if triton else OP.torch_backward

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(OP, forward.__name__, counted("forward", forward))
    monkeypatch.setattr(OP, backward.__name__, counted("backward", backward))
    return calls


@pytest.mark.parametrize("family, kv_bits", [("llama", 16), ("mistral", 4)])
def test_memgraph_backend_end_to_end(monkeypatch, family, kv_bits):
    pytest.importorskip("memgraph.backend")
    model = models.build(family)
    ids = _ids(model)
    eager_loss, eager_grads = _step(copy.deepcopy(model), ids)
    calls = _count_kernel_calls(monkeypatch)
    compiled = torch.compile(model, backend="memgraph", options={"kv_bits": kv_bits, "codegen": "eager"})
    loss, grads = _step(compiled, ids)
    layers = model.config.num_hidden_layers
    assert calls == {"forward": layers, "backward": layers}
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for name, g in eager_grads.items():
        if kv_bits == 16:
            assert _rel(grads[name], g) < 1e-4, name
        elif g.norm() > 0:
            assert _rel(grads[name], g) <= 0.20 and _cos(grads[name], g) >= 0.98, name


def test_mask_guard_names_the_length_it_cannot_prove(monkeypatch):
    """A dynamic-shape mask too large to evaluate at run time, whole or by blocks of query rows (its S x S
    ones() is built from the length alone), is an error that says so, not a wrong pattern."""
    import torch.fx as fx

    from memgraph.errors import MemgraphError
    from memgraph.passes import attention as attention_pass

    graph = fx.Graph()  # the mask from the length alone, as HF builds it in a dynamic-shape graph
    length = graph.placeholder("length")
    ones = graph.call_function(torch.ones, ((length, length),), {"dtype": torch.bool})
    graph.output(graph.call_method("tril", (ones,)))
    guard = attention_pass.MaskGuard(fx.GraphModule(torch.nn.Module(), graph), (0,), 0, causal=True, window=None)
    assert guard.holds([8])
    assert attention_pass.mask_elements_limit() >= attention_pass.MAX_MASK_ELEMENTS
    monkeypatch.setattr(attention_pass, "mask_elements_limit", lambda: 100)
    monkeypatch.setattr(attention_pass, "MASK_BLOCK_ELEMENTS", 5 * 16)
    with pytest.raises(MemgraphError, match="length 16 has 256 elements.*cannot be checked block by block"):
        guard.holds([16])
    monkeypatch.setattr(attention_pass, "MASK_BLOCK_ELEMENTS", 16 * 16)  # ones() may be built whole: by rows
    assert attention_pass.MaskGuard(guard.build, (0,), 0, causal=True, window=None).holds([16])
