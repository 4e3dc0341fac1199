""""torch-budget": PyTorch's own ``activation_memory_budget`` knapsack, with the budget mapped from bytes.

torch's budget is a fraction in [0, 1] of the activation bytes the default cut saves (0 = recompute all it
may, 1 = the min-cut plan); its "memory" is the sum of saved bytes, not the peak. We map a byte budget onto it
by search: the fraction whose plan the cost model predicts to peak within the budget with the least
recompute time. The predicted peak is not monotone in the fraction (pytorch issue 197838; at 0 torch
recomputes the residual stream too, so backward rebuilds the whole forward at once), so a grid of fractions
is scanned first, then the largest fitting one is refined by bisection. Random ops that torch's knapsack would
recompute (pytorch issue 190758) are pinned back to saved before the plan is scored.
"""
from __future__ import annotations

import time
from typing import Any

from memgraph import _compat
from memgraph.cost_model.graph_costs import GraphCosts
from memgraph.cost_model.solvers import register
from memgraph.cost_model.solvers.torch_baselines import torch_partition_saved
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan


def torch_saved(costs: GraphCosts, fraction: float) -> set[int]:
    """The saved set of torch's min-cut partitioner under ``activation_memory_budget=fraction``, made valid
    (kept in ``costs.memo``: the ILP tries some of these as incumbents)."""
    key = ("torch-budget", fraction)
    if key not in costs.memo:
        with _compat.activation_memory_budget(fraction):
            costs.memo[key] = frozenset(costs.make_valid(torch_partition_saved(costs, _compat.min_cut_partition)))
    return set(costs.memo[key])


@register("torch-budget", uses_budget=True)
def torch_budget(graph: TrainingGraph, costs: GraphCosts | None = None, budget: int | None = None, *,
                 grid: tuple[float, ...] = (0.8, 0.6, 0.4, 0.2, 0.0), steps: int = 3,
                 time_limit: float = 30.0, **_: Any) -> Plan:
    """torch's activation_memory_budget knapsack, its fraction searched so the predicted peak fits."""
    started = time.perf_counter()
    costs = costs or GraphCosts(graph)
    evaluated: dict[float, tuple[set[int], Any]] = {}

    def evaluate(fraction: float) -> tuple[set[int], Any]:
        if fraction not in evaluated:
            saved = torch_saved(costs, fraction)
            evaluated[fraction] = (saved, costs.simulate(saved))
        return evaluated[fraction]

    top, top_estimate = evaluate(1.0)
    if budget is None or top_estimate.peak_bytes_hint <= budget:
        return costs.plan("torch-budget", top, budget, estimate=top_estimate, fraction=1.0)

    def fits(fraction: float) -> bool:
        return evaluate(fraction)[1].peak_bytes_hint <= budget

    # The peak is not monotone in the fraction (pytorch issue 197838): scan a grid from fast to lean, then
    # bisect between the largest fraction that fits and the next larger one tried.
    for fraction in grid:
        if time.perf_counter() - started > time_limit and any(fits(f) for f in evaluated):
            break
        evaluate(fraction)
    feasible = sorted(f for f in evaluated if fits(f))
    if feasible:
        low = feasible[-1]
        high = min((f for f in evaluated if f > low), default=1.0)
        for _ in range(steps):
            if time.perf_counter() - started > time_limit:
                break
            middle = (low + high) / 2
            if fits(middle):
                low = middle
            else:
                high = middle
    candidates = [(costs.recompute_seconds(s), f) for f, (s, e) in evaluated.items() if e.peak_bytes_hint <= budget]
    tried = {f"{f:.4f}": int(e.peak_bytes_hint) for f, (_, e) in sorted(evaluated.items())}
    if not candidates:
        lowest = min(evaluated.values(), key=lambda pair: pair[1].peak_bytes_hint)[1]
        raise costs.infeasible("torch-budget", budget, best=(int(lowest.peak_bytes_hint), lowest))
    _, fraction = min(candidates)
    saved, simulated = evaluated[fraction]
    return costs.plan("torch-budget", saved, budget, estimate=simulated, fraction=fraction,
                        fractions_tried=tried)
