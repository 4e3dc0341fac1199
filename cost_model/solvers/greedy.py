""""greedy": evict what is alive at the predicted peak, by bytes freed per recompute-second, and re-simulate.

Two greedy passes over whole plans, the cheaper feasible result wins:

* top-down (DTR-style): start from the fastest plan (save everything backward uses), ask the cost model where
  the peak is and which saved values are alive there, evict those that free the most bytes per second of
  recomputation they add, re-simulate, repeat until the predicted peak fits; then re-save evicted values
  (most expensive first) while the budget still holds;
* bottom-up: start from the leanest structural plan (layer checkpointing, or recompute all that may be) and
  save recomputed values by recompute-seconds per byte, in chunks that halve when one overshoots.

Single-value evictions get stuck in local minima (a layer's memory only goes once all of it is recomputed);
the bottom-up pass covers those budgets. Fast (tens of simulations on an 8B graph) and the fallback when the
ILP runs out of time.
"""
from __future__ import annotations

import math
import time
from typing import Any

from memgraph.cost_model.graph_costs import GraphCosts
from memgraph.cost_model.solvers import register
from memgraph.cost_model.solvers.offload import with_offload
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan

EPS_SECONDS = 1e-12  # recompute time below which an op counts as free (views, getitem)


def eviction_cost(costs: GraphCosts, saved: set[int], recomputed: set[int], value: int) -> tuple[float, set[int]]:
    """Recompute seconds that evicting ``value`` adds, and the pinned values it forces to be saved."""
    seconds, forced, seen, stack = 0.0, set(), set(), [value]
    while stack:
        i = stack.pop()
        if i in seen or i in recomputed or (i in saved and i != value):
            continue
        seen.add(i)
        if not costs.recomputable(i):
            forced.add(i)
            continue
        seconds += costs.seconds[i]
        stack.extend(j for j in costs.inputs[i] if j in costs.forward_set)
    return seconds, forced


def ranked_evictions(costs: GraphCosts, saved: set[int], candidates: set[int]) -> list[tuple[float, int, int]]:
    """(score, bytes freed, value), best first: bytes freed per recompute-second."""
    recomputed = costs.recomputed(saved)
    ranked = []
    for i in candidates:
        seconds, forced = eviction_cost(costs, saved, recomputed, i)
        freed = int(costs.weight[i]) - sum(int(costs.weight[j]) for j in forced if j not in saved)
        if freed > 0:
            ranked.append((freed / max(seconds, EPS_SECONDS), freed, i))
    ranked.sort(key=lambda r: (-r[0], r[2]))
    return ranked


def evict_until_fits(costs: GraphCosts, budget: int, saved: set[int] | None = None,
                     *, max_rounds: int = 48, deadline: float = math.inf) -> tuple[set[int], Any, list[int]]:
    """Evict by score until the predicted peak fits; returns (saved, estimate, evicted in order).
    If nothing alive at the peak can be evicted any more, returns the lowest-peak state reached."""
    saved = set(costs.save_all if saved is None else saved)
    estimate = costs.simulate(saved)
    evicted: list[int] = []
    best = (int(estimate.peak_bytes_hint), set(saved), estimate, list(evicted))
    for _ in range(max_rounds):
        if time.perf_counter() > deadline:
            break
        peak = int(estimate.peak_bytes_hint)
        if peak <= budget:
            return saved, estimate, evicted
        candidates = costs.evictable(saved)
        at_peak = costs.alive_at_peak(saved, estimate) & candidates
        ranked = ranked_evictions(costs, saved, at_peak or candidates)
        if not ranked:
            break
        excess, batch = peak - budget, []
        for _, freed, i in ranked:
            batch.append(i)
            excess -= freed
            if excess <= 0:
                break
        saved = costs.make_valid(saved - set(batch))
        evicted += batch
        estimate = costs.simulate(saved)
        if estimate.peak_bytes_hint < best[0]:
            best = (int(estimate.peak_bytes_hint), set(saved), estimate, list(evicted))
    return best[1], best[2], best[3]


def give_back(costs: GraphCosts, budget: int, saved: set[int], estimate: Any, evicted: list[int],
              *, tries: int = 24, deadline: float = math.inf) -> tuple[set[int], Any]:
    """Re-save evicted values, those whose recomputation costs most first, while the peak still fits."""
    order = sorted({i for i in evicted if i not in saved}, key=lambda i: -costs.seconds[i])[:tries]
    for i in order:
        if time.perf_counter() > deadline:
            break
        if i in saved:
            continue
        trial = costs.make_valid(saved | {i})
        if costs.recompute_seconds(trial) >= costs.recompute_seconds(saved):
            continue
        trial_estimate = costs.simulate(trial)
        if trial_estimate.peak_bytes_hint <= budget:
            saved, estimate = trial, trial_estimate
    return saved, estimate


def fill_up(costs: GraphCosts, budget: int, saved: set[int], estimate: Any,
            *, max_simulations: int = 32, deadline: float = math.inf) -> tuple[set[int], Any]:
    """Save recomputed values, most recompute-seconds per byte first, while the predicted peak fits."""
    recomputed = costs.recomputed(saved)
    candidates = [i for i in recomputed if i not in costs.unsaveable and i not in costs.views
                  and costs.weight[i] > 0 and costs.seconds[i] > EPS_SECONDS]
    candidates.sort(key=lambda i: (-costs.seconds[i] / costs.weight[i], i))
    chunk, position, simulations, last_seconds = max(1, len(candidates) // 4), 0, 0, 0.0
    # stop before a simulation that would end past the deadline (one takes ~0.3 s on an 8B graph)
    while (position < len(candidates) and simulations < max_simulations
           and time.perf_counter() + last_seconds < deadline):
        batch = candidates[position:position + chunk]
        trial = costs.make_valid(saved | set(batch))
        if trial == saved:
            position += len(batch)
            continue
        simulation_started = time.perf_counter()
        trial_estimate = costs.simulate(trial)
        last_seconds = time.perf_counter() - simulation_started
        simulations += 1
        if trial_estimate.peak_bytes_hint <= budget:
            saved, estimate = trial, trial_estimate
            position += len(batch)
        elif chunk > 1:
            chunk = max(1, chunk // 2)
        else:
            position += 1
    return saved, estimate


def lean_start(costs: GraphCosts) -> tuple[set[int], Any]:
    """The structural low-memory plan with the smaller predicted peak: layer checkpointing or save-least."""
    from memgraph.cost_model.solvers.checkpoint import checkpoint_saved

    options = [set(costs.save_least), checkpoint_saved(costs)[0]]
    simulated = [(costs.simulate(s), s) for s in options]
    estimate, saved = min(simulated, key=lambda pair: (pair[0].peak_bytes_hint, costs.recompute_seconds(pair[1])))
    return saved, estimate


def greedy_saved(costs: GraphCosts, budget: int, *, time_limit: float = 10.0) -> tuple[set[int], Any, dict[str, Any]]:
    """The cheaper feasible result of the top-down and bottom-up passes (or the lowest peak seen); each pass
    gets half of ``time_limit`` and returns the best it has when its time is up."""
    started = time.perf_counter()
    results = []
    half = started + time_limit / 2
    saved, estimate, evicted = evict_until_fits(costs, budget, deadline=half)
    if estimate.peak_bytes_hint <= budget:
        saved, estimate = give_back(costs, budget, saved, estimate, evicted, deadline=half)
    results.append((saved, estimate, "top-down"))
    lean, lean_estimate = lean_start(costs)
    if lean_estimate.peak_bytes_hint <= budget:
        lean, lean_estimate = fill_up(costs, budget, lean, lean_estimate, deadline=started + time_limit)
    results.append((lean, lean_estimate, "bottom-up"))
    feasible = [r for r in results if r[1].peak_bytes_hint <= budget]
    if feasible:
        saved, estimate, how = min(feasible, key=lambda r: (costs.recompute_seconds(r[0]), r[1].peak_bytes_hint))
    else:
        saved, estimate, how = min(results, key=lambda r: r[1].peak_bytes_hint)
    return saved, estimate, {"pass": how}


@register("greedy", uses_budget=True)
@with_offload
def greedy(graph: TrainingGraph, costs: GraphCosts | None = None, budget: int | None = None, *, time_limit: float = 10.0,
           **_: Any) -> Plan:
    """Evict saved values alive at the predicted peak by bytes per recompute-second until the peak fits."""
    costs = costs or GraphCosts(graph)
    if budget is None:
        return costs.fastest_plan("greedy")
    saved, simulated, found = greedy_saved(costs, budget, time_limit=time_limit)
    return costs.plan("greedy", saved, budget, estimate=simulated, **found)
