"""Apply a ``Plan`` to a joint graph: the forward graph returns the saved values, the backward graph
recomputes everything else it needs from them; offloaded values go to host memory and back (``offload.py``)."""
from __future__ import annotations

import operator

import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model.policies import is_multi_output
from memgraph.graph import TrainingGraph
from memgraph.passes.lora import sum_input_grads_in_place
from memgraph.plan import Plan


class InvalidPlanError(RuntimeError):
    """The plan's saved set does not let backward compute its outputs."""


def partition(graph: TrainingGraph, plan: Plan, *, captured: bool = False) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The forward and backward graphs of ``plan``; ``captured``: the step replays from CUDA graphs, so offloads
    use the transfer ops those capture."""
    saved_nodes = [graph.node(name) for name in plan.saved]
    saved_values = [n for n in saved_nodes if not _compat.is_sym_node(n)]
    saved_sym_nodes = [n for n in saved_nodes if _compat.is_sym_node(n)]
    try:
        fw, bw = _compat.extract_fwd_bwd_modules(
            graph.joint, saved_values, saved_sym_nodes, num_fwd_outputs=graph.num_fwd_outputs,
            static_lifetime_input_nodes=set(graph.static_inputs))
    except Exception as error:  # torch reports an unreachable value as an AssertionError/RuntimeError
        raise InvalidPlanError(
            f"plan of solver {plan.solver!r} cannot be applied: {type(error).__name__}: {error}") from error
    bw = _compat.reorder_backward_like_autograd(bw)
    _items_after_tuples(bw)
    sum_input_grads_in_place(bw)  # as the cost model counts it (``passes.lora.written_into``)
    if plan.offloaded:
        from memgraph.passes.offload import apply_transfers

        apply_transfers(fw, bw, plan, graph.num_fwd_outputs, captured=captured)
    return fw, bw


def _items_after_tuples(gm: fx.GraphModule) -> None:
    """Move each multi-output op's getitems right after it. The autograd-like order puts a recomputed getitem
    just before its first use, and until then the tuple, so every output of the op, stays referenced (eager
    codegen holds them all; Inductor unpacks a tuple at once). The cost model orders backward the same way."""
    moved = False
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_multi_output(node):
            continue
        anchor = node
        for item in sorted((u for u in node.users if u.target is operator.getitem), key=position.__getitem__):
            if item.prev is not anchor:
                anchor.append(item)
                moved = True
            anchor = item
    if moved:
        gm.recompile()


def recomputed_nodes(graph: TrainingGraph, bw: fx.GraphModule) -> list[str]:
    """Names of forward ops that the backward graph computes again."""
    forward = {n.name for n in graph.forward_nodes}
    return [n.name for n in bw.graph.nodes if n.op == "call_function" and n.name in forward]


def saved_nodes(graph: TrainingGraph, fw: fx.GraphModule) -> list[str]:
    """Names of the values a forward graph hands to backward (its outputs after the forward's own)."""
    outputs = fw.graph.find_nodes(op="output")[0].args[0]
    return [n.name for n in list(outputs)[graph.num_fwd_outputs:] if isinstance(n, fx.Node)]
