"""NF4 weights as values of the joint graph (``nf4.expose_dequantized_weights``) and, after the plan, a recomputed
forward matmul's weight reused for dx (``shared_dequantize``): eager's gradients, the cost model's prediction of
the partitioned graphs, never a saved dequantized weight, and the peak within the limit it was given."""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("peft")

import memgraph  # noqa: E402
from memgraph.options import resolve_options  # noqa: E402
from memgraph.passes.shared_dequantize import sharable_dequantizes, shared_dequantize_where_recomputed  # noqa: E402
from memgraph.pipeline import costs_under  # noqa: E402
from tests.passes.test_lora_pass import LAYERS, PROJECTIONS, ids_for, peft_model  # noqa: E402

DEQUANTIZE = torch.ops.memgraph.nf4_dequantize.default
FUSED_OPS = (torch.ops.memgraph.nf4_linear.default, torch.ops.memgraph.nf4_linear_grad_input.default)
WITHOUT_INPUT_GRAD = 3  # layer 0's q, k and v read the frozen embedding's output: no dx


def qlora_model():
    model = peft_model(torch.float32)
    memgraph.quantize_(model, "nf4")
    return model


def captured(model, solvers, **options):
    from memgraph.capture import capture

    ids = ids_for(model)
    (graph,) = capture(model, options={"codegen": "eager", "rewrites": ["lora", "nf4"], **options}, solvers=solvers,
                       input_ids=ids, labels=ids)
    model.zero_grad(set_to_none=True)  # capture ran a backward
    return graph


def targets(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def model():
    return qlora_model()


@pytest.fixture(scope="module")
def checkpointed(model):
    return captured(model, ("checkpoint", "none", "mincut"))


def test_joint_graph_holds_one_forward_dequantize_per_weight_and_one_per_dx(checkpointed):
    joint = targets(checkpointed.graph.joint)
    weights = LAYERS * len(PROJECTIONS)
    assert not any(joint[op] for op in FUSED_OPS)
    assert joint[DEQUANTIZE] == weights + weights - WITHOUT_INPUT_GRAD
    assert len(checkpointed.costs.never_saved) == weights  # the forward's (backward's are backward's own)


@pytest.mark.parametrize("solver", ["none", "mincut", "checkpoint"])
def test_no_plan_saves_a_dequantized_weight(checkpointed, solver):
    """torch's partitioners would save a weight that backward reads; every plan recomputes it from its storage."""
    part = checkpointed.partitions[solver]
    saved = {part.graph.node(name).target for name in part.plan.saved}
    assert DEQUANTIZE not in saved
    assert targets(part.fw)[DEQUANTIZE] == LAYERS * len(PROJECTIONS)


def test_a_recomputed_weight_serves_dx_where_the_budget_allows(model):
    """With room to spare every weight whose forward matmul backward recomputes dequantizes once in backward; the
    cost model's simulation equals its estimate of the partitioned graphs; training matches eager."""
    from memgraph import cost_model

    from memgraph.passes.partition import partition

    graph = captured(model, ("checkpoint",), solver="checkpoint", memory_budget=2**30)
    part = graph.partitions["checkpoint"]
    assert any(note.startswith("shared dequantized weights") for note in part.plan.notes)
    plain = costs_under(graph.graph, resolve_options({"solver": "checkpoint"}))
    plan = memgraph.cost_model.solvers.get("checkpoint").function(graph.graph, plain, None)
    pairs = sharable_dequantizes(graph.graph, plain, plan)
    assert len(pairs) >= LAYERS * 4  # q, k, v and gate or up at least in every recomputed layer
    _, unshared = partition(graph.graph.private_copy(), plan)
    assert targets(part.bw)[DEQUANTIZE] == targets(unshared)[DEQUANTIZE] - sum(len(t) for t in pairs.values())
    simulated = cost_model.graph_costs(part.graph, codegen="eager").estimate(part.plan)
    partitioned = cost_model.estimate_partitioned(part.graph, part.fw, part.bw, codegen="eager")
    assert simulated.peak_bytes_hint == partitioned.peak_bytes_hint


@pytest.mark.parametrize("options", [{"solver": "checkpoint"}, {"solver": "offload-layers", "offload": "on"},
                                     {"solver": "checkpoint", "memory_budget": 2**30}])
@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_training_matches_eager(model, options, codegen):
    from tests.helpers import compare_to_eager

    before = len(memgraph.compiled_graphs())
    compare_to_eager(model, ids_for(model), {"codegen": codegen, "rewrites": ["lora", "nf4"], **options},
                     loss_rtol=1e-5, grad_rtol=1e-4)
    model.zero_grad(set_to_none=True)
    notes = [note for record in memgraph.compiled_graphs()[before:] for note in record.plan.notes]
    if "memory_budget" in options:  # room for every weight: the step ran with weights shared
        assert any(note.startswith("shared dequantized weights") for note in notes)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(share=st.floats(0.0, 1.0))
@example(share=1.0)
@example(share=0.0)
def test_the_shared_plan_peaks_within_its_limit(checkpointed, share):
    """Limits between the plan's own peak and the peak of sharing every weight: the plan keeps the limit by the
    partitioned graphs' own estimate, and the whole room shares every weight."""
    from memgraph import cost_model
    from memgraph.passes.partition import partition

    graph = checkpointed.graph
    make_costs = lambda g: costs_under(g, resolve_options({"solver": "checkpoint"}))  # noqa: E731
    costs = make_costs(graph)
    plan = memgraph.cost_model.solvers.get("checkpoint").function(graph, costs, None)
    pairs = sharable_dequantizes(graph, costs, plan)
    every = shared_dequantize_where_recomputed(graph, plan, costs, make_costs, None)
    assert every is not None and every[1].peak_bytes > plan.peak_bytes  # a weight outlives its matmul
    limit = int(plan.peak_bytes + share * (every[1].peak_bytes - plan.peak_bytes))
    result = shared_dequantize_where_recomputed(graph, plan, costs, make_costs, limit)
    if result is None:
        assert share < 1.0
        return
    shared_graph, shared_plan, _ = result
    fw, bw = partition(shared_graph, shared_plan)
    assert cost_model.estimate_partitioned(shared_graph, fw, bw, codegen="inductor").peak_bytes_hint <= limit
    removed = targets(graph.joint)[DEQUANTIZE] - targets(shared_graph.joint)[DEQUANTIZE]
    assert 0 < removed <= sum(len(twins) for twins in pairs.values())
    if share == 1.0:
        assert removed == sum(len(twins) for twins in pairs.values())


def test_a_saved_graph_loads_with_its_backward_dequantizes(tmp_path):
    """The joint is saved as planned: loading it does not merge a weight's backward dequantize into its forward
    one (a second common-subexpression pass would), which only a plan may do. A file saved before the rewrite
    (Llama-3-8B QLoRA, meta capture) gets it on loading."""
    from pathlib import Path

    old = memgraph.load_graph(Path(__file__).parents[1] / "data" / "llama3_8b_qlora_ce_drop_meta_seq2048.json.gz")
    exposed = targets(old.joint)[DEQUANTIZE]
    assert exposed == 224 + 224 - WITHOUT_INPUT_GRAD and not any(targets(old.joint)[op] for op in FUSED_OPS)
    loaded = memgraph.load_graph(memgraph.save_graph(old, tmp_path / "graph.json.gz"))
    assert targets(loaded.joint)[DEQUANTIZE] == exposed


def test_symbolic_leading_dimensions_give_the_fused_ops_bits():
    """Batch and length both symbolic: the matmuls' views read them from the activation; at other sizes than
    traced, the exposed graph gives the fused ops' bits."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memgraph.kernels.nf4 import NF4Weight
    from memgraph.passes.nf4 import expose_dequantized_weights

    weight = NF4Weight.quantize(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)), double_quant=True)
    tensors, sizes = weight.storage()[:5], weight.storage()[5:]

    def step(x, g, *storage):
        return (torch.ops.memgraph.nf4_linear(x, *storage, *sizes),
                torch.ops.memgraph.nf4_linear_grad_input(g, *storage, *sizes))

    gm = make_fx(step, tracing_mode="symbolic")(torch.randn(2, 3, 16), torch.randn(2, 3, 24), *tensors)
    generator = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, 5, 16, generator=generator), torch.randn(4, 5, 24, generator=generator)
    expected = gm(x, g, *tensors)
    assert expose_dequantized_weights(gm) == 1
    assert targets(gm)[DEQUANTIZE] == 2 and not any(targets(gm)[op] for op in FUSED_OPS)
    for got, want in zip(gm(x, g, *tensors), expected):
        assert got.shape == want.shape and torch.equal(got, want)


def test_an_activation_that_is_not_rows_keeps_the_fused_ops(caplog):
    """A weight whose matmul reads a strided view (not foldable into rows) keeps nf4_linear, logged."""
    import logging

    import torch.fx as fx

    from memgraph.kernels.nf4 import NF4Weight
    from memgraph.passes.nf4 import expose_dequantized_weights

    weight = NF4Weight.quantize(torch.randn(8, 16), double_quant=True)
    tensors, sizes = weight.storage()[:5], weight.storage()[5:]

    def step(x, *storage):
        return torch.ops.memgraph.nf4_linear(x.transpose(0, 1), *storage, *sizes)  # [16, 4, K]: no rows view

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(step, tracing_mode="fake")(torch.randn(4, 16, 16), *tensors)
    assert isinstance(gm, fx.GraphModule)
    with caplog.at_level(logging.INFO, logger="memgraph.passes.nf4"):
        assert expose_dequantized_weights(gm) == 0
    assert "cannot be read as rows" in caplog.text
    assert targets(gm)[torch.ops.memgraph.nf4_linear.default] == 1
