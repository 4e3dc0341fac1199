"""memgraph.passes.recomputed_attention: an attention the plan recomputes runs with 16-bit K/V.

With kv_bits=4, a plan that recomputes every layer (checkpoint, offload-layers) keeps no K/V between forward
and backward, so its attention runs at 16 bits: the backward reads the recomputed K, V, O and LSE and the
gradients equal eager's exactly. A plan that keeps the attention's values (solver "none") keeps the 4-bit K/V.
Under a memory budget the switch is kept only where the re-simulated plan fits.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import memgraph
from memgraph import models
from memgraph.capture import capture
from memgraph.cost_model import graph_costs
from memgraph.options import resolve_options
from memgraph.cost_model.solvers import get
from memgraph.pipeline import costs_under, plan_training_graph, with_exact_recomputed_attention
from memgraph.passes.recomputed_attention import exact_kv_where_recomputed, quantized_recomputed_attentions

from tests.passes.test_attention_pass import _assert_grads_equal, _ids, _masked_batch, _step

ATTENTION = torch.ops.memgraph.attention.default
ATTENTION_BACKWARD = torch.ops.memgraph.attention_backward.default


def _kv_bits(gm, target):
    index = 12 if target is ATTENTION_BACKWARD else 5
    return [n.args[index] if len(n.args) > index else n.kwargs["kv_bits"]
            for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _captured(model, ids, solvers, **options):
    options = {"kv_bits": 4, **options}
    return capture(model, example_kwargs=dict(input_ids=ids, labels=ids), options=options, solvers=solvers,
                   backward=False)[0]


def _same_costs(record):
    """A graph's cost model built as the record's was (capture plans for Inductor's codegen by default)."""
    return lambda graph: graph_costs(graph, semantics=record.costs.semantics, device=record.costs.device)


@pytest.mark.parametrize("solver, kv_bits", [("checkpoint", 4), ("offload-layers", 4), ("checkpoint", 8)])
def test_recomputing_plans_run_attention_at_16_bits(solver, kv_bits):
    model = models.build("llama", lora=True)
    record = _captured(model, _ids(model), (solver,), offload="on", kv_bits=kv_bits)
    part = record.partitions[solver]
    assert _kv_bits(part.bw, ATTENTION_BACKWARD) == [16] * model.config.num_hidden_layers
    assert set(_kv_bits(part.bw, ATTENTION)) == {16}  # the recompute quantizes nothing
    assert set(_kv_bits(part.fw, ATTENTION)) == {16}
    assert any("recomputed attention at 16 bits" in note for note in part.plan.notes)
    assert part.plan.peak_bytes is not None


def test_a_plan_that_keeps_attention_keeps_4_bit_kv():
    model = models.build("llama", lora=True)
    record = _captured(model, _ids(model), ("none",))
    part = record.partitions["none"]
    assert _kv_bits(part.bw, ATTENTION_BACKWARD) == [4] * model.config.num_hidden_layers
    assert quantized_recomputed_attentions(record.graph, part.plan) == []
    assert not any("16 bits" in note for note in part.plan.notes)


@pytest.mark.parametrize("family, layout, lora", [("llama", None, True), ("mistral", "left", False),
                                                  ("qwen2", "packed", True), ("gemma2", "right", True)])
def test_gradients_equal_eager_exactly(family, layout, lora):
    """Through backend="memgraph" with layer checkpointing: the kv_bits=4 step's gradients are those of 16-bit
    K/V (exact), for plain, padded and packed batches, windows and soft-capped scores."""
    overrides = {"sliding_window": 5} if family == "mistral" else {}
    model = models.build(family, lora=lora, **overrides)
    ids = _ids(model)
    kwargs, labels = _masked_batch(ids, layout) if layout else ({}, ids)
    eager_loss, eager_grads = _step(copy.deepcopy(model), ids, labels, **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph",
                             options=dict(kv_bits=4, solver="checkpoint", codegen="eager"))
    loss, grads = _step(compiled, ids, labels, **kwargs)
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    _assert_grads_equal(grads, eager_grads, kv_bits=16)
    plans = [r.plan for r in memgraph.compiled_graphs()[-1:]]
    assert any("recomputed attention at 16 bits" in note for note in plans[0].notes)


@pytest.fixture(scope="module")
def checkpointed():
    model = models.build("llama", lora=True)
    record = _captured(model, _ids(model, seq=16), ("checkpoint",))
    plan = get("checkpoint").function(record.graph, record.costs, None)
    exact = exact_kv_where_recomputed(record.graph, plan, _same_costs(record), None)
    assert exact is not None
    return record, plan, exact[1].peak_bytes


@settings(max_examples=12, deadline=None)
@given(slack=st.integers(min_value=-4096, max_value=4096))
def test_the_switch_is_kept_only_within_the_budget(checkpointed, slack):
    """Re-simulated on the changed graph, the plan's peak decides: within the budget the switch is kept, above
    it the plan keeps its 4-bit K/V (None)."""
    record, plan, exact_peak = checkpointed
    budget = exact_peak + slack
    exact = exact_kv_where_recomputed(record.graph, plan, _same_costs(record), budget)
    assert (exact is not None) == (budget >= exact_peak)
    if exact is not None:
        assert exact[1].peak_bytes == exact_peak <= budget
        assert set(exact[1].saved) == set(plan.saved)


def test_the_backend_switches_only_plans_that_recompute_and_fit_their_budget(checkpointed):
    """Through the backend's planning: the fastest plan keeps the attention's values (unchanged graph), layer
    checkpointing recomputes it (a changed copy, noted); the same plan made for a budget just under the 16-bit
    plan's peak keeps its 4-bit K/V, one at that peak switches."""
    record, _, _ = checkpointed
    fastest = resolve_options({"kv_bits": 4, "solver": "ilp"})
    planned, plan, _ = plan_training_graph(record.graph, fastest)
    assert planned is record.graph and not any("16 bits" in note for note in plan.notes)
    options = resolve_options({"kv_bits": 4, "solver": "checkpoint"})
    planned, exact, _ = plan_training_graph(record.graph, options)
    assert planned is not record.graph and any("16 bits" in note for note in exact.notes)
    costs = costs_under(record.graph, options)
    for budget, switched in ((exact.peak_bytes - 1, False), (exact.peak_bytes, True)):
        plan = get("checkpoint").function(record.graph, costs, None)
        plan.budget_bytes = budget
        graph, plan, _ = with_exact_recomputed_attention(record.graph, plan, costs, options,
                                                         lambda g: costs_under(g, options))
        assert (graph is not record.graph) == switched
        assert any("16 bits" in note for note in plan.notes) == switched


def test_compare_predicts_the_plan_the_backend_runs(checkpointed):
    """``memgraph.compare`` plans as the backend does: with kv_bits=4, its checkpoint row is the 16-bit plan."""
    from memgraph.compare import _costs, plan_row

    record, _, _ = checkpointed
    options = {"kv_bits": 4}
    costs = _costs([record.graph], options)
    row, plan = plan_row([record.graph], costs, "checkpoint", None, options)
    _, backend_plan, _ = plan_training_graph(record.graph, resolve_options({**options, "solver": "checkpoint"}))
    assert row["predicted_peak_bytes"] == backend_plan.peak_bytes
    assert any("16 bits" in note for note in plan.notes)
    unswitched, _ = plan_row([record.graph], costs, "checkpoint", None)
    assert unswitched["predicted_peak_bytes"] != row["predicted_peak_bytes"]


@pytest.mark.parametrize("growth, switched", [(0.0, False), (1.0, True)])
def test_without_a_budget_the_peak_may_grow_only_so_much(checkpointed, monkeypatch, growth, switched):
    """A plan made without a budget keeps 4-bit K/V where 16 bits would raise its peak by more than the allowed
    growth (long sequences, where O and 16-bit K/V of a layer are large)."""
    from memgraph.passes import recomputed_attention

    record, plan, exact_peak = checkpointed
    assert exact_peak > plan.peak_bytes  # this graph's switch costs memory, so a zero growth refuses it
    monkeypatch.setattr(recomputed_attention, "MAX_PEAK_GROWTH_WITHOUT_BUDGET", growth)
    exact = exact_kv_where_recomputed(record.graph, plan, _same_costs(record), None)
    assert (exact is not None) == switched
