"""Cost model: predicted peak memory of a training step (exact, or symbolic in dynamic sizes) and the runtime of
every node (roofline), for the solvers, the pipeline's plan and the report.

Public API::

    estimate(gm_or_graph, example_inputs=None, *, plan=None)   -> MemoryEstimate
    graph_costs(graph, codegen=None)                            -> GraphCosts   (what every solver reads)
    estimate_partitioned(graph, fw_gm, bw_gm, codegen=None)     -> MemoryEstimate (checks GraphCosts.simulate)
    MemoryEstimate: peak_bytes (int | sympy), peak_bytes_hint, peak_node, peak_phase, timeline, breakdown,
                    unknown_ops, max_size(symbol, budget), peak_at(s0=...), plot(path, measured=None)
    GraphCosts: per node (inputs, users, seconds, weight, kinds, phase), the decision space (forward, frontier,
                pinned, ...), recomputed / make_valid / simulate / plan per saved set (see graph_costs.py)
    DeviceSpec (roofline ceilings; DeviceSpec.measure() on a GPU), StepSemantics (what a step keeps alive,
    and ``codegen``: "eager" = one allocation per node, "inductor" = the buffers Inductor's code allocates)
    tracker.MemoryTracker, tracker.run_step: measure the same quantities on real tensors.

"estimate" always means a ``MemoryEstimate``; "costs" the ``GraphCosts`` of one graph. See ``memory.py`` for the
precise definition of the step peak.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.fx as fx

from memgraph.cost_model.graph_costs import GraphCosts, InvalidSavedSet
from memgraph.cost_model.memory import CATEGORIES, MemoryEstimate, StepSemantics, TimelinePoint
from memgraph.cost_model.runtime import DeviceSpec, node_flops, node_kind, node_seconds

__all__ = [
    "estimate", "graph_costs", "estimate_partitioned", "MemoryEstimate", "GraphCosts", "InvalidSavedSet",
    "DeviceSpec", "StepSemantics", "TimelinePoint", "CATEGORIES", "node_seconds", "node_flops", "node_kind",
]


def _semantics(semantics: StepSemantics | None, codegen: str | None) -> StepSemantics:
    semantics = semantics or StepSemantics()
    return semantics if codegen is None else dataclasses.replace(semantics, codegen=codegen)


def graph_costs(graph, *, device: DeviceSpec | None = None, semantics: StepSemantics | None = None,
                codegen: str | None = None, sizes=None, offload_budget: int | None = None,
                cudagraphs: bool = False) -> GraphCosts:
    """The cost model's view of a joint graph, handed to every solver (see ``GraphCosts``). ``codegen``
    ("eager" or "inductor") overrides ``semantics.codegen``: what will run the graphs. ``sizes``: values of a
    dynamic-shape graph's size symbols, by name (default: those it was traced with). ``offload_budget``: host
    bytes solvers may offload saved values into (None: offload is not a choice). ``cudagraphs``: the step
    replays from CUDA graphs (``Options.cudagraphs``)."""
    return GraphCosts(graph, device=device, semantics=_semantics(semantics, codegen), sizes=sizes,
                      offload_budget=offload_budget, cudagraphs=cudagraphs)


def estimate_partitioned(graph, fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, *,
                         semantics: StepSemantics | None = None, device: DeviceSpec | None = None,
                         codegen: str | None = None) -> MemoryEstimate:
    """Predicted memory of one step run as the partitioned graphs: forward, then backward, then grads into
    ``.grad``. It must equal ``GraphCosts.simulate`` of the plan the graphs were partitioned by (the tests hold
    the two to each other); ``step_seconds`` is the roofline time of all the step's nodes on ``device``."""
    from memgraph.cost_model.graph_costs import hints_of_values
    from memgraph.cost_model.step import graph_step, simulate_step

    semantics = _semantics(semantics, codegen)
    values = [n.meta.get("val") for gm in (fw_gm, bw_gm) for n in gm.graph.nodes]
    hints = hints_of_values(values)
    predicted = simulate_step(graph_step(graph, fw_gm, bw_gm, kernels=semantics.fuses), hints, semantics)
    # Roofline time of everything the step runs (unfused), read now: a compiler may rewrite the graphs later.
    predicted.step_seconds = float(sum(node_seconds(n, device or DeviceSpec(), hints)
                                       for gm in (fw_gm, bw_gm) for n in gm.graph.nodes))
    return predicted


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
        costs = GraphCosts(gm_or_graph, semantics=semantics)
        saved = costs.save_all if plan is None else costs.indices(plan.saved)
        return costs.simulate(saved, symbolic=True)
    if not isinstance(gm_or_graph, fx.GraphModule):
        raise TypeError(f"estimate() takes a TrainingGraph or an fx.GraphModule; got {type(gm_or_graph).__name__}")
    from memgraph.cost_model.graph_costs import hints_of_values
    from memgraph.cost_model.step import estimate_single_graph
    from memgraph.cost_model.values import ensure_fake_values

    ensure_fake_values(gm_or_graph, example_inputs or [])
    hints = hints_of_values([n.meta.get("val") for n in gm_or_graph.graph.nodes])
    return estimate_single_graph(gm_or_graph, hints, semantics, static_input_indices)
