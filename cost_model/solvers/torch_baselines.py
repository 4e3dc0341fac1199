"""PyTorch's own partitioners as solvers: the baselines every memgraph solver is compared against.

Each runs the torch partitioner on a copy of the joint graph (they rewrite their input in place) and reads its
decision back: the forward graph's extra outputs are the saved values. The Plan's figures are the cost model's,
as for every solver.
"""
from __future__ import annotations

from memgraph import _compat
from memgraph.cost_model.graph_costs import GraphCosts
from memgraph.cost_model.solvers import register
from memgraph.graph import TrainingGraph
from memgraph.passes.partition import saved_nodes
from memgraph.plan import Plan


def torch_partition_saved(costs: GraphCosts, partitioner) -> set[int]:
    """The saved set a torch partitioner chooses for ``costs.graph``, as it chose it."""
    graph = costs.graph
    fw, _ = partitioner(_compat.copy_graph_module(graph.joint), list(graph.example_inputs),
                        num_fwd_outputs=graph.num_fwd_outputs,
                        static_lifetime_input_indices=list(graph.static_input_indices))
    saved = costs.indices(n for n in saved_nodes(graph, fw) if n in costs.index)
    return without_never_saved(costs, saved)


def without_never_saved(costs: GraphCosts, saved: set[int]) -> set[int]:
    """``saved`` with each value the policies never save (``policies.never_save``) replaced by the graph inputs it is
    computed from: torch's partitioners save a dequantized weight that backward reads (four times its 4-bit
    storage, every layer), where memgraph recomputes it."""
    dropped = saved & costs.never_saved
    return (saved - dropped) | {j for i in dropped for j in costs.inputs[i]}


@register("none")
def save_everything(graph: TrainingGraph, costs: GraphCosts | None = None, budget=None, **_) -> Plan:
    """Keep every forward value backward uses; recompute nothing (torch's default_partition)."""
    costs = costs or GraphCosts(graph)
    return costs.plan("none", torch_partition_saved(costs, _compat.default_partition), None, validate=False)


@register("mincut")
def torch_min_cut(graph: TrainingGraph, costs: GraphCosts | None = None, budget=None, **_) -> Plan:
    """torch's min-cut rematerialization: recompute cheap pointwise ops fused into backward (Inductor's default)."""
    costs = costs or GraphCosts(graph)
    return costs.plan("mincut", torch_partition_saved(costs, _compat.min_cut_partition), None, validate=False)
