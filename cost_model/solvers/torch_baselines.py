"""PyTorch's own partitioners as solvers: the baselines every memgraph solver is compared against.

Each runs the torch partitioner on a copy of the joint graph (they rewrite their input in place) and reads its decision back as a ``Plan``: the forward
graph's extra outputs are the saved values; forward ops that reappear in the backward graph are recomputed.
"""
from __future__ import annotations

import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model.solvers import register
from memgraph.graph import TrainingGraph
from memgraph.passes.partition import recomputed_nodes, saved_nodes
from memgraph.plan import Plan


def plan_from_partition(graph: TrainingGraph, fw: fx.GraphModule, bw: fx.GraphModule, solver: str) -> Plan:
    """Read a (forward, backward) pair produced from ``graph.joint`` back as a Plan."""
    return Plan(solver=solver, saved=saved_nodes(graph, fw), recomputed=recomputed_nodes(graph, bw))


@register("none")
def save_everything(graph: TrainingGraph, estimate=None, budget=None, **_) -> Plan:
    """Keep every forward value backward uses; recompute nothing (torch's default_partition)."""
    fw, bw = _compat.default_partition(_compat.copy_graph_module(graph.joint), list(graph.example_inputs),
                                       num_fwd_outputs=graph.num_fwd_outputs,
                                       static_lifetime_input_indices=list(graph.static_input_indices))
    return plan_from_partition(graph, fw, bw, "none")


@register("mincut")
def torch_min_cut(graph: TrainingGraph, estimate=None, budget=None, **_) -> Plan:
    """torch's min-cut rematerialization: recompute cheap pointwise ops fused into backward (Inductor's default)."""
    fw, bw = _compat.min_cut_partition(_compat.copy_graph_module(graph.joint), list(graph.example_inputs),
                                       num_fwd_outputs=graph.num_fwd_outputs,
                                       static_lifetime_input_indices=list(graph.static_input_indices))
    return plan_from_partition(graph, fw, bw, "mincut")
