"""What the post-plan changes share (``recomputed_attention``, ``shared_dequantize``): a plan's saved and offloaded
values re-simulated on a changed copy of its graph, and the plan that carries over what the solver found."""
from __future__ import annotations

from typing import Any, Callable

from memgraph.graph import TrainingGraph
from memgraph.plan import Plan


def refreshed(graph: TrainingGraph) -> TrainingGraph:
    """A fresh TrainingGraph over ``graph``'s edited joint: the copy's cached node tables predate the edits."""
    graph.joint.graph.lint()
    graph.joint.recompile()
    return TrainingGraph(graph.joint, graph.example_inputs, graph.num_fwd_outputs, graph.static_input_indices,
                         canonical=True)


def resimulated(graph: TrainingGraph, plan: Plan, make_costs: Callable[[TrainingGraph], Any]) -> tuple[Plan, Any]:
    """(``plan``'s saved and offloaded values on ``graph``, re-simulated; ``graph``'s cost model). The changed
    graph must still hold every node the plan names."""
    costs = make_costs(graph)
    # as solved: torch's baselines' saved sets are theirs, judged by torch's policies (GraphCosts.plan)
    return costs.plan(plan.solver, costs.indices(plan.saved), None, offloaded=costs.indices(plan.offloaded),
                      validate=False), costs


def carried_over(plan: Plan, changed: Plan, note: str) -> Plan:
    """``changed`` with what the solver found for ``plan`` (solve time, budget, gap, details but where the copies
    go, notes) and ``note`` added."""
    changed.solve_seconds, changed.budget_bytes, changed.optimality_gap = (plan.solve_seconds, plan.budget_bytes,
                                                                           plan.optimality_gap)
    stale = {"transfers"}  # where the copies go: the re-simulated plan's own
    changed.details = {**{k: v for k, v in plan.details.items() if k not in stale}, **changed.details}
    changed.notes = [*plan.notes, note]
    return changed
