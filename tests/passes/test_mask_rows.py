"""memgraph.passes._mask_rows: a mask's subgraph evaluated block by block of query rows equals the whole mask's
rows (hypothesis over lengths, block sizes and mask constructions), refuses what it cannot slice exactly, and lets
the attention rewrite prove long masks without the whole mask in memory."""
import copy
import logging

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings, strategies as st

from memgraph import models
from memgraph.passes import attention as attention_pass
from memgraph.passes._mask_rows import RowBlocks
from memgraph.passes._matching import Unsupported


# --- mask constructions, traced from the length as HF traces them ----------------------------------------------
def causal(length):
    positions = torch.arange(length)
    return (positions[None, :] <= positions[:, None])[None, None].expand(2, 1, length, length)


WINDOW, DIAGONAL = 5, -1


def sliding_window(length):
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    return ((kv <= q) & (kv > q - WINDOW))[None, None]


def additive_float(length):
    q = torch.arange(length).unsqueeze(-1)
    kv = torch.arange(length).unsqueeze(0)
    return torch.where(kv <= q, 0.0, torch.finfo(torch.float32).min)[None, None]


def packed_by_gather(length):
    """HF's packed-sequence mask: segment ids (from position ids) gathered at query and key indices."""
    segments = torch.arange(length) // 3
    q_index = torch.arange(length)[None, None, :, None]
    kv_index = torch.arange(length)[None, None, None, :]
    batch = torch.arange(length)[:1, None, None, None]
    ids = segments.unsqueeze(0)
    return (kv_index <= q_index) & (ids[batch, q_index] == ids[batch, kv_index])


def tril_of_ones(length):
    return torch.ones((length, length), dtype=torch.bool).tril(DIAGONAL)[None, None]


def keys_only(length):
    """A mask the same for every query row: [1, 1, 1, S]."""
    return (torch.arange(length) % 2 == 0)[None, None, None, :]


def transposed(length):  # moves the query dim: not row-local
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    return (kv >= q).transpose(-1, -2)[None, None]


def cumulative(length):  # a scan along the query dim: not row-local
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    return ((kv <= q).int().cumsum(-2) > 0)[None, None]


SLICEABLE = [causal, sliding_window, additive_float, packed_by_gather, tril_of_ones, keys_only]
NOT_SLICEABLE = [transposed, cumulative]


def traced(construction) -> fx.GraphModule:
    return fx.symbolic_trace(construction)


@settings(max_examples=60, deadline=None)
@given(construction=st.sampled_from(SLICEABLE), length=st.integers(3, 40), block=st.integers(2, 39))
def test_blocks_equal_the_whole_masks_rows(construction, length, block):
    build = traced(construction)
    whole = construction(length)
    blocks = RowBlocks(build, [length], length, max_full_elements=length * length)
    rows = min(block, length - 1)
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        part = blocks.rows(start, stop)
        expected = whole[..., start:stop, :] if whole.shape[-2] != 1 else whole
        assert part.shape[-2] in (1, stop - start)
        assert torch.equal(part.expand_as(expected), expected), (construction.__name__, start, stop)


@pytest.mark.parametrize("construction", NOT_SLICEABLE)
def test_ops_that_move_or_scan_the_query_rows_are_refused(construction):
    blocks = RowBlocks(traced(construction), [12], 12, max_full_elements=144)
    with pytest.raises(Unsupported):
        blocks.rows(0, 5)


def test_a_large_value_not_built_from_rows_is_refused():
    """tril_of_ones builds an S x S value from the length alone: whole only while it is small enough."""
    with pytest.raises(Unsupported, match="too large"):
        RowBlocks(traced(tril_of_ones), [12], 12, max_full_elements=100).rows(0, 5)


def test_block_rows_avoid_every_size_the_mask_has():
    blocks = RowBlocks(traced(causal), [12], 12, max_full_elements=144)  # sizes 1, 2 and 12 appear
    assert blocks.block_rows(4 * 12) == 4
    assert blocks.block_rows(2 * 12) == 3  # 2 is the batch size here: the shape check could not tell it apart


@pytest.mark.parametrize("construction, pattern", [(causal, (True, None)), (sliding_window, (True, 5)),
                                                   (additive_float, (True, None)), (keys_only, None),
                                                   (tril_of_ones, None)])
def test_pattern_by_rows_equals_the_pattern_of_the_whole(monkeypatch, construction, pattern):
    monkeypatch.setattr(attention_pass, "MASK_BLOCK_ELEMENTS", 7 * 24)
    build = traced(construction)
    if pattern is None:  # not a causal / window / full pattern: refused both ways
        with pytest.raises(Unsupported):
            attention_pass._mask_pattern(construction(24), 24)
        with pytest.raises(Unsupported):
            attention_pass._mask_pattern_by_rows(build, [24], 24)
        return
    assert attention_pass._mask_pattern(construction(24), 24) == pattern
    assert attention_pass._mask_pattern_by_rows(build, [24], 24) == pattern


def test_dynamic_mask_guard_checks_long_lengths_by_rows(monkeypatch):
    """Past what can be evaluated whole, a length-built mask is still checked (by rows); one that cannot be
    sliced is an error naming the length, not a wrong pattern."""
    from memgraph.errors import MemgraphError

    monkeypatch.setattr(attention_pass, "mask_elements_limit", lambda: 100)
    monkeypatch.setattr(attention_pass, "MASK_BLOCK_ELEMENTS", 64)
    guard = attention_pass.MaskGuard(traced(sliding_window), (0,), 0, causal=True, window=5)
    assert guard.holds([16]) and guard.holds([40])
    assert not attention_pass.MaskGuard(traced(causal), (0,), 0, causal=True, window=5).holds([40])
    unsliceable = attention_pass.MaskGuard(traced(cumulative), (0,), 0, causal=True, window=None)
    with pytest.raises(MemgraphError, match="length 16 has 256 elements.*block by block"):
        unsliceable.holds([16])


def _loss_and_grads(model, ids, run=None):
    loss = (model if run is None else run)(input_ids=ids, labels=ids).loss
    loss.backward()
    loss = loss.detach()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_backend_fuses_a_mask_too_large_to_evaluate_whole(monkeypatch, caplog, family):
    """With the whole-mask limit below the step's S x S, the model's in-graph mask is proven block by block: the
    graph runs memgraph.attention (not SDPA with the mask) and gives eager's loss and gradients."""
    pytest.importorskip("memgraph.backend")
    from memgraph.kernels._dispatch import use_triton
    from memgraph.kernels.attention import op as attention_op

    model = models.build(family, use_cache=False)  # as training builds it: HF then puts the mask in the graph
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    eager_loss, eager_grads = _loss_and_grads(copy.deepcopy(model), ids)
    monkeypatch.setattr(attention_pass, "mask_elements_limit", lambda: 48 * 48 - 1)
    monkeypatch.setattr(attention_pass, "MASK_BLOCK_ELEMENTS", 10 * 48)
    calls = []
    forward = attention_op.fwd_triton if use_triton(torch.empty(0), attention_op.log) else attention_op.torch_forward
    monkeypatch.setattr(attention_op, forward.__name__, lambda *a, **k: calls.append(1) or forward(*a, **k))
    proofs = []
    prove_once = attention_pass._prove_mask_once
    monkeypatch.setattr(attention_pass, "_prove_mask_once", lambda *a: proofs.append(1) or prove_once(*a))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph", options={"codegen": "eager", "solver": "none"})
    with caplog.at_level(logging.INFO, logger="memgraph.passes.attention"):
        loss, grads = _loss_and_grads(model, ids, run=compiled)
    assert "checking the attention mask at length 48 in 5 blocks of 10 query rows" in caplog.text
    assert len(calls) == model.config.num_hidden_layers
    assert len(proofs) == 1  # every layer passes the same mask: proven once
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for name, expected in eager_grads.items():
        assert float((grads[name] - expected).norm() / expected.norm().clamp_min(1e-30)) < 1e-4, name


def _padded_or_packed(model, layout, batch=2, seq=24):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    if layout == "packed":  # two sequences per row, positions restarting: HF reads the packing from position_ids
        positions = torch.cat([torch.arange(10), torch.arange(seq - 10)]).expand(batch, seq)
        return {"input_ids": ids, "position_ids": positions.clone()}, ids
    mask = torch.ones(batch, seq, dtype=torch.long)
    if layout == "right":
        mask[1, -6:] = 0
    else:
        mask[1, :6] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("family, layout", [("llama", "right"), ("mistral", "left"), ("qwen2", "packed")])
def test_backend_fuses_padded_and_packed_masks_too_large_to_evaluate_whole(monkeypatch, caplog, family, layout):
    """A mask read from attention_mask / position_ids, past what can be evaluated whole: its probes are checked
    block by block of query rows, every layer runs memgraph.attention, and loss and gradients equal eager's."""
    pytest.importorskip("memgraph.backend")
    from memgraph.kernels._dispatch import use_triton
    from memgraph.kernels.attention import op as attention_op

    overrides = {"sliding_window": 5} if family == "mistral" else {}
    model = models.build(family, use_cache=False, **overrides)
    inputs, labels = _padded_or_packed(model, layout)

    def step(run):
        loss = run(**inputs, labels=labels).loss
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    eager_loss, eager_grads = step(model)
    monkeypatch.setattr(attention_pass, "mask_elements_limit", lambda: 24 * 24 - 1)
    monkeypatch.setattr(attention_pass, "MASK_BLOCK_ELEMENTS", 2 * 5 * 24)
    calls = []
    forward = attention_op.fwd_triton if use_triton(torch.empty(0), attention_op.log) else attention_op.torch_forward
    monkeypatch.setattr(attention_op, forward.__name__, lambda *a, **k: calls.append(1) or forward(*a, **k))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph", options={"codegen": "eager", "solver": "none"})
    with caplog.at_level(logging.INFO, logger="memgraph.passes.attention"):
        loss, grads = step(compiled)
    assert "checking the attention mask at length 24 in" in caplog.text
    assert len(calls) == model.config.num_hidden_layers
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for name, expected in eager_grads.items():
        assert float((grads[name] - expected).norm() / expected.norm().clamp_min(1e-30)) < 1e-4, name
