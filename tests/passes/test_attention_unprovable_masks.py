"""memgraph.passes.attention on the attention pattern of transformers' ``blt`` (tiny configs: sliding windows of
16 over 32 bytes, cross-attention between patch and byte streams), as a small synthetic model.

Byte self-attentions share one in-graph causal sliding-window mask: proven (evaluated) and fused. The
cross-attentions have query length != key length and a mask read from a graph input (the patch ids): unprovable,
left as SDPA, and logged. Gradients match eager float32.

Where every patch is one byte, each patch query of the encoder's cross-attention sees exactly one key: its
softmax is the constant 1, so the gradients of that cross-attention's query/key projections are exactly zero in
exact arithmetic (float64 gives ~1e-17) and what float32 computes is rounding noise (~1e-8). Any reordering of
float work, Inductor with no rewrite at all included, changes that noise by 100% of itself: a relative error
on such a gradient says nothing. Those gradients are compared against the scale of the step's gradients.
"""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from memgraph.passes.attention import rewrite_attention

ATTENTION = torch.ops.memgraph.attention.default
SEQ, WINDOW, HIDDEN, HEADS, HEAD_DIM, CROSS_K = 32, 16, 32, 2, 16, 2


class _Capture:
    """Rewrite the Dynamo graph, then AOTAutograd with eager compilers (no planner, no Inductor)."""

    def __init__(self):
        import types

        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.options = types.SimpleNamespace(kv_bits=16)
        self.dynamo = []
        self.aot = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward))

    def __call__(self, gm, example_inputs):
        gm = rewrite_attention(gm, example_inputs, self.options)
        self.dynamo.append(gm)
        return self.aot(gm, example_inputs)

    def attention_nodes(self):
        return [n for gm in self.dynamo for n in gm.graph.nodes if n.op == "call_function" and n.target == ATTENTION]


def _heads(x):
    return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def _merge(x):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], HIDDEN)


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x, mask):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        return x + self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HEAD_DIM ** -0.5)))


class _CrossAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.kv = torch.nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, queries, keys, mask):
        q = _heads(self.q(queries))
        k, v = (_heads(t) for t in self.kv(keys).chunk(2, dim=-1))
        return queries + self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                        scale=HEAD_DIM ** -0.5)))


class _BltShaped(torch.nn.Module):
    """bytes -> windowed self-attention -> patches (max over each patch's bytes, ``CROSS_K`` queries per patch)
    -> cross-attention patches->bytes -> cross-attention bytes->patches -> windowed self-attention (the same
    mask) -> per-byte loss."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = _SelfAttention(), _SelfAttention()
        self.to_patches = torch.nn.Linear(HIDDEN, CROSS_K * HIDDEN, bias=False)
        self.patch_cross, self.byte_cross = _CrossAttention(), _CrossAttention()

    def forward(self, x, patch_ids, num_patches: int):
        batch, seq, _ = x.shape
        # HF's causal sliding-window mask, built in the graph from constants: provable.
        rows, cols = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        window = ((cols <= rows) & (cols > rows - WINDOW))[None, None].expand(batch, 1, seq, seq)
        h = self.encoder(x, window)
        # patch_reduce: the max of each patch's bytes (patch ids are a graph input).
        index = patch_ids[..., None].expand(-1, -1, HIDDEN)
        patches = torch.zeros(batch, num_patches, HIDDEN).scatter_reduce(1, index, h, "amax", include_self=False)
        patches = self.to_patches(patches).reshape(batch, num_patches * CROSS_K, HIDDEN)
        # Cross-attention masks as BLT builds them: float, 0 / finfo.min, from the patch ids (a graph input).
        same = patch_ids[:, None, :] == torch.arange(num_patches)[None, :, None]  # [B, patches, bytes]
        minimum = torch.finfo(x.dtype).min
        to_bytes = (1.0 - same.repeat_interleave(CROSS_K, dim=1).to(x.dtype)) * minimum
        patches = self.patch_cross(patches, h, to_bytes[:, None])
        to_patches = (1.0 - same.transpose(1, 2).repeat_interleave(CROSS_K, dim=2).to(x.dtype)) * minimum
        h = self.byte_cross(h, patches, to_patches[:, None])
        return self.decoder(h, window)


def _patch_ids(lengths, batch):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert ids.numel() == SEQ
    return ids[None].expand(batch, SEQ).contiguous()


def _step(module, x, patch_ids, num_patches):
    x = x.clone().requires_grad_(True)
    out = module(x, patch_ids, num_patches)
    (out.square().mean() + out.sum(-1).sin().mean()).backward()
    parameters = getattr(module, "_orig_mod", module).named_parameters()
    grads = {name: p.grad.detach().clone() for name, p in parameters}
    grads["input"] = x.grad.detach().clone()
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def _rel(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("lengths", [[1] + [4] * 7 + [3], [1] * SEQ], ids=["multi-byte-patches", "one-byte-patches"])
def test_blt_shaped_attention_matches_eager(lengths, caplog):
    torch.manual_seed(0)
    module = _BltShaped()
    batch = 2
    x = torch.randn(batch, SEQ, HIDDEN)
    patch_ids, num_patches = _patch_ids(lengths, batch), len(lengths)
    eager_out, eager_grads = _step(copy.deepcopy(module), x, patch_ids, num_patches)

    capture = _Capture()
    with caplog.at_level(logging.INFO, logger="memgraph.passes.attention"):
        out, grads = _step(torch.compile(module, backend=capture, fullgraph=True), x, patch_ids, num_patches)

    # The two byte self-attentions are fused with the proven pattern; the cross-attentions are not, and say why.
    nodes = capture.attention_nodes()
    assert [(n.kwargs["causal"], n.kwargs["window"]) for n in nodes] == [(True, WINDOW)] * 2
    queries = num_patches * CROSS_K
    assert f"query length {queries} and key length {SEQ} are not provably equal" in caplog.text
    assert f"query length {SEQ} and key length {queries} are not provably equal" in caplog.text

    assert _rel(out, eager_out) < 1e-5
    single_key = lengths == [1] * SEQ
    scale = max(float(g.norm()) for g in eager_grads.values())
    for name, expected in eager_grads.items():
        if single_key and name.startswith("patch_cross.q."):
            # Exactly zero in exact arithmetic (each query's softmax is over one key): both sides are rounding
            # noise, compared at the scale of the step's gradients.
            assert float(expected.norm()) < 1e-6 * scale
            assert float((grads[name] - expected).norm()) < 1e-6 * scale, name
        else:
            assert _rel(grads[name], expected) < 1e-5, (name, _rel(grads[name], expected))
