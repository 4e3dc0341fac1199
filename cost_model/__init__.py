"""Cost model: predicted peak memory of a training step (exact, or symbolic in dynamic sizes) and the runtime of
every node (roofline), for the solvers, the pipeline's plan annotations and the report.

Public API::

    estimate(gm_or_graph, example_inputs=None, *, plan=None)   -> MemoryEstimate
    estimate_training_graph(graph, codegen=None)                -> GraphCosts   (what solvers receive)
    estimate_partitioned(graph, fw_gm, bw_gm, codegen=None)     -> MemoryEstimate
    recompute_seconds(graph, plan)                              -> float
    MemoryEstimate: peak_bytes (int | sympy), peak_bytes_hint, peak_node, peak_phase, timeline, breakdown,
                    unknown_ops, max_size(symbol, budget_bytes), peak_at(s0=...), plot(path, measured=None)
    GraphCosts: output_bytes / allocated_bytes / seconds / flops / kind / phase per node,
                simulate(saved) -> MemoryEstimate, recompute_seconds(saved), recomputed(saved)
    DeviceSpec (roofline ceilings; DeviceSpec.measure() on a GPU), StepSemantics (what a step keeps alive,
    and ``codegen``: "eager" = one allocation per node, "inductor" = the buffers Inductor's code allocates)
    tracker.MemoryTracker, tracker.run_step: measure the same quantities on real tensors.

See ``memory.py`` for the precise definition of the step peak.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.fx as fx

from memgraph.cost_model.costs import GraphCosts, InvalidSavedSet
from memgraph.cost_model.memory import CATEGORIES, MemoryEstimate, StepSemantics, TimelinePoint
from memgraph.cost_model.runtime import DeviceSpec, node_flops, node_kind, node_seconds

__all__ = [
    "estimate", "estimate_training_graph", "estimate_partitioned", "recompute_seconds", "MemoryEstimate",
    "GraphCosts", "InvalidSavedSet", "DeviceSpec", "StepSemantics", "TimelinePoint", "CATEGORIES",
    "node_seconds", "node_flops", "node_kind",
]


def _semantics(semantics: StepSemantics | None, codegen: str | None) -> StepSemantics:
    semantics = semantics or StepSemantics()
    return semantics if codegen is None else dataclasses.replace(semantics, codegen=codegen)


def estimate_training_graph(graph, *, device: DeviceSpec | None = None, semantics: StepSemantics | None = None,
                            codegen: str | None = None) -> GraphCosts:
    """The cost model's view of a joint graph, handed to every solver as ``estimate`` (see ``GraphCosts``).
    ``codegen`` ("eager" or "inductor") overrides ``semantics.codegen``: what will run the graphs."""
    return GraphCosts(graph, device=device, semantics=_semantics(semantics, codegen))


def estimate_partitioned(graph, fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, *,
                         semantics: StepSemantics | None = None, device: DeviceSpec | None = None,
                         codegen: str | None = None) -> MemoryEstimate:
    """Predicted memory of one step run as the partitioned graphs: forward, then backward, then grads into
    ``.grad``. ``peak_bytes`` is symbolic when sizes are; ``peak_bytes_hint`` is always an int;
    ``step_seconds`` is the roofline time of all the step's nodes on ``device``. ``codegen`` ("eager" or
    "inductor") overrides ``semantics.codegen``: with "inductor" only the buffers Inductor allocates count."""
    from memgraph.cost_model.costs import hints_of_values
    from memgraph.cost_model.step import graph_step, simulate_step

    semantics = _semantics(semantics, codegen)
    values = [n.meta.get("val") for gm in (fw_gm, bw_gm) for n in gm.graph.nodes]
    hints = hints_of_values(values)
    predicted = simulate_step(graph_step(graph, fw_gm, bw_gm, kernels=semantics.fuses), hints, semantics)
    # Roofline time of everything the step runs (unfused), read now: a compiler may rewrite the graphs later.
    predicted.step_seconds = float(sum(node_seconds(n, device or DeviceSpec(), hints)
                                       for gm in (fw_gm, bw_gm) for n in gm.graph.nodes))
    return predicted


def recompute_seconds(graph, plan, *, device: DeviceSpec | None = None) -> float:
    """Predicted time of the nodes the plan recomputes (``plan.recomputed``, joint-graph names)."""
    from memgraph.cost_model.costs import hints_of_values

    nodes = [graph.node(name) for name in plan.recomputed]
    hints = hints_of_values([n.meta.get("val") for n in nodes])
    return float(sum(node_seconds(n, device or DeviceSpec(), hints) for n in nodes))


def estimate(gm_or_graph: Any, example_inputs: Sequence[Any] | None = None, *, plan=None,
             semantics: StepSemantics | None = None, static_input_indices: Sequence[int] = ()) -> MemoryEstimate:
    """Predicted memory of running a graph.

    * a ``TrainingGraph``: the whole step under ``plan`` (default: torch's save-everything partition);
    * a plain ``fx.GraphModule`` (+ example inputs, real or fake, used only if nodes lack fake values): one
      run of it, inputs resident (``static_input_indices`` are counted as weights), outputs alive at the end.
    """
    from memgraph.graph import TrainingGraph

    semantics = semantics or StepSemantics()
    if isinstance(gm_or_graph, TrainingGraph):
        if plan is None:
            from memgraph.cost_model import solvers

            plan = solvers.get("none").function(gm_or_graph, None, None)
        return GraphCosts(gm_or_graph, semantics=semantics).simulate(plan.saved, symbolic=True)
    if not isinstance(gm_or_graph, fx.GraphModule):
        raise TypeError(f"estimate() takes a TrainingGraph or an fx.GraphModule; got {type(gm_or_graph).__name__}")
    from memgraph.cost_model.costs import hints_of_values
    from memgraph.cost_model.step import estimate_single_graph
    from memgraph.cost_model.values import ensure_fake_values

    ensure_fake_values(gm_or_graph, example_inputs or [])
    hints = hints_of_values([n.meta.get("val") for n in gm_or_graph.graph.nodes])
    return estimate_single_graph(gm_or_graph, hints, semantics, static_input_indices)
