"""The prediction equals what really happens: tiny HF models (± LoRA), plans "none" and "mincut", measured by
the dispatch-mode tracker running the partitioned graphs as AOTAutograd's runtime does."""
from __future__ import annotations

import pytest
import torch

from memgraph import cost_model
from memgraph.capture import capture, capture_backend
from memgraph.cost_model.tracker import MemoryTracker, run_step

from tests.helpers import NO_REWRITES

SOLVERS = ("none", "mincut")


def relative_error(predicted: int, measured: int) -> float:
    return abs(predicted - measured) / measured


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_predicted_peak_matches_tracker(arch, lora, make_model, make_ids):
    model = make_model(arch, lora)
    ids = make_ids(24)
    captured_graphs = capture(model, options=NO_REWRITES, solvers=SOLVERS, input_ids=ids, labels=ids)
    assert captured_graphs  # gpt2 has a graph break: each graph is checked on its own
    for captured in captured_graphs:
        for solver, part in captured.partitions.items():
            predicted = cost_model.estimate_partitioned(part.graph, part.fw, part.bw)
            tracker = MemoryTracker()
            measured = run_step(part.fw, part.bw, captured.primals, part.graph.num_fwd_outputs, tracker=tracker)
            assert relative_error(predicted.peak_bytes_hint, measured.peak_bytes) <= 0.02, (solver, predicted)
            # Node by node, not only the peak: bytes live while each node runs.
            during = {(n, p): int(d) for n, p, d in zip(predicted.names, predicted.phases, predicted.during)}
            off = [(n, p, m, during[(n, p)]) for n, p, m in measured.per_node
                   if (n, p) in during and relative_error(during[(n, p)], m) > 0.02]
            assert not off, off[:5]
            assert not predicted.unknown_ops
            if lora and predicted.breakdown["weights"]:  # frozen base weights get no gradients
                grads = predicted.live[-1][cost_model.CATEGORIES.index("grads")]
                assert grads < 0.25 * predicted.breakdown["weights"]


@pytest.mark.parametrize("solver", ["none", "mincut", "checkpoint"])
def test_one_model_of_the_plan(solver, llama, make_ids):
    """The plan's figures are the cost model's one simulation, and they describe the graphs the partition pass
    builds: the same timeline, the same recomputed nodes."""
    ids = make_ids(24)
    (captured,) = capture(llama, options=NO_REWRITES, solvers=(solver,), input_ids=ids, labels=ids)
    part = captured.partitions[solver]
    simulated = captured.costs.estimate(part.plan)
    partitioned = cost_model.estimate_partitioned(part.graph, part.fw, part.bw)
    assert part.plan.peak_bytes == simulated.peak_bytes_hint == partitioned.peak_bytes_hint
    assert list(simulated.during) == list(partitioned.during)
    # the cost model's forward: the traced forward plus items of forward tuples only backward reads
    # (SDPA's logsumexp), which backward makes again when it recomputes the tuple
    forward = set(captured.costs.names_of(captured.costs.forward))
    assert {n.name for n in part.graph.forward_nodes} <= forward
    in_backward = {n.name for n in part.bw.graph.nodes if n.op == "call_function" and n.name in forward}
    assert set(part.plan.recomputed) == in_backward
    if solver == "checkpoint":  # a valid plan: the solvers' fast recomputation set is the scheduled one
        saved = captured.costs.indices(part.plan.saved)
        assert captured.costs.recomputed(saved) == captured.costs.scheduled_recomputation(saved)


def test_real_autograd_runtime_matches(llama, make_ids):
    """Through torch.compile and loss.backward(): AOTAutograd's own wrapper decides when saved tensors die."""
    ids = make_ids(24)
    captured, holder = [], {"tracker": MemoryTracker()}
    compiled = torch.compile(llama, backend=capture_backend(
        captured, options=NO_REWRITES, solvers=("mincut",), run_under=lambda: holder["tracker"],
        observe_backward_inputs=lambda args: holder["tracker"].track(args)))
    compiled(input_ids=ids, labels=ids).loss.backward()  # compile + warm-up
    llama.zero_grad(set_to_none=True)
    tracker = holder["tracker"] = MemoryTracker()
    tracker.track(captured[-1].primals)
    output = compiled(input_ids=ids, labels=ids)
    output.loss.backward()
    part = captured[-1].partitions["mincut"]
    predicted = cost_model.estimate_partitioned(part.graph, part.fw, part.bw)
    assert len(captured) == 1
    assert relative_error(predicted.peak_bytes_hint, tracker.peak_bytes) <= 0.02
    # Gradients are in .grad at the end, as predicted.
    assert all(p.grad is not None for p in llama.parameters())


def test_eager_backward_that_keeps_its_inputs_is_modelled(llama, make_ids):
    """A backward called as ``f(*args)`` (``make_boxed_func``) keeps every saved tensor to its end."""
    ids = make_ids(24)
    (captured,) = capture(llama, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    keep = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw,
                                           semantics=cost_model.StepSemantics(backward_frees_inputs=False))
    free = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw)
    assert keep.peak_bytes_hint > free.peak_bytes_hint

    tracker = MemoryTracker()
    with tracker, torch.no_grad():
        tracker.track(captured.primals)
        outputs = captured.fw(*captured.primals)
        n = captured.graph.num_fwd_outputs
        saved = list(outputs[n:])
        tangent_nodes = [p for p in captured.bw.graph.find_nodes(op="placeholder")][len(saved):]
        tangents = [torch.ones(()) if i == 0 else torch.zeros(tuple(t.meta["val"].shape), dtype=t.meta["val"].dtype)
                    for i, t in enumerate(tangent_nodes)]
        grads = captured.bw(*saved, *tangents)  # GraphModule.forward: the caller's tuple holds the inputs
    del grads, outputs
    assert relative_error(keep.peak_bytes_hint, tracker.peak_bytes) <= 0.02


@pytest.mark.parametrize("solver", SOLVERS)
def test_generated_code_run_has_the_node_by_node_memory_and_results(solver, make_model, make_ids):
    """run_step(node_by_node=False) runs the graphs' generated (boxed) code, the eager codegen's path: the
    same peak and bit-identical gradients as the interpreter that frees each value after its last use."""
    model = make_model("llama", True)
    ids = make_ids(24)
    (captured,) = capture(model, options=NO_REWRITES, solvers=(solver,), input_ids=ids, labels=ids)
    part = captured.partitions[solver]
    args = (part.fw, part.bw, captured.primals, part.graph.num_fwd_outputs)
    slow = run_step(*args, tracker=MemoryTracker())
    fast = run_step(*args, tracker=MemoryTracker(), node_by_node=False)
    assert fast.peak_bytes == slow.peak_bytes
    pairs = [(a, b) for a, b in zip(slow.grads, fast.grads) if isinstance(a, torch.Tensor)]
    assert pairs and all(torch.equal(a, b) for a, b in pairs)


def test_boxed_graph_module_frees_its_inputs():
    from memgraph import _compat

    gm = torch.fx.symbolic_trace(lambda x, y: (x.sin() * 2, y + 1))
    boxed = _compat.boxed_graph_module(gm)
    args = [torch.ones(3), torch.zeros(2)]
    out = boxed(args)
    assert args == []  # the caller's list is cleared: each input dies after its last use
    assert torch.equal(out[0], torch.ones(3).sin() * 2) and torch.equal(out[1], torch.ones(2))
