"""Offload as a solver's third choice: keep a value, recompute it, or let it wait in host memory.

* ``offload_until_fits``: given a keep/recompute saved set, move saved values alive at the predicted peak to
  the host (largest first, each kept only if the simulated peak falls) until the budget holds or the host
  budget is spent;
* ``with_offload(solver)``: a keep/recompute solver made to weigh offload against recompute. It solves at the
  budget, and at relaxed budgets whose extra bytes offload then takes back (each offload plan then keeps what
  still fits), then keeps-and-offloads recomputed values whose copies cost less time than their recompute
  (``offload_what_spares_recompute``); the plan with the least predicted added time (recompute seconds +
  transfer seconds not hidden behind compute) wins;
* ``"offload-layers"``: Unsloth's fixed recipe on our graph: layer checkpointing with every layer's input
  hidden state offloaded, the rival our plans must beat.

Offload is considered only where ``costs.offload_budget`` is set (the pipeline sets it on CUDA, or on any
device with ``offload="on"``).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable

from memgraph.cost_model.graph_costs import GraphCosts, InvalidSavedSet
from memgraph.cost_model.memory import MemoryEstimate
from memgraph.cost_model.solvers import register
from memgraph.cost_model.solvers.checkpoint import checkpoint_saved
from memgraph.errors import InfeasibleBudgetError
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan
from memgraph.units import gib

log = logging.getLogger("memgraph.offload")

RELAXATIONS = (0.25, 0.5, 1.0)  # shares of (fastest plan's peak - budget) the keep/recompute budget is raised by
# Host time to issue one offloaded value's four ops (offload, wait, reload, wait), each a custom-op call like
# nf4_dequantize's (19.9 µs on an H100 host, benchmarks/results/launch.json). A short step is host-bound: moving a
# value must spare more GPU time than this, or it only lengthens the step. A step replayed from CUDA graphs
# issues its captured copies at no host cost.
HOST_SECONDS_PER_OFFLOADED_VALUE = 4 * 20e-6


def host_seconds_per_offloaded_value(costs: GraphCosts) -> float:
    return 0.0 if costs.cudagraphs else HOST_SECONDS_PER_OFFLOADED_VALUE


def offload_until_fits(costs: GraphCosts, saved: set[int], budget: int, *, seed: Iterable[int] = (),
                       max_simulations: int = 48) -> tuple[set[int], MemoryEstimate]:
    """Offloaded values (a subset of ``saved``) that bring the predicted peak under ``budget`` where possible,
    and the estimate of the result.

    Starts from ``seed`` (e.g. the layer inputs) when that lowers the peak, then offloads values alive at the
    peak, those made earliest in forward first (backward needs them last, so their reload comes after the peak),
    in chunks that halve when one does not lower the peak."""
    offloaded: set[int] = set()
    estimate = costs.simulate(saved)
    host_left = costs.offload_budget or 0
    simulations = 0

    def attempt(values: set[int]) -> bool:
        nonlocal estimate, host_left, simulations
        simulations += 1
        trial = costs.simulate(saved, offloaded=offloaded | values)
        if trial.peak_bytes_hint >= estimate.peak_bytes_hint:
            return False
        offloaded.update(values)
        host_left -= sum(int(costs.weight[i]) for i in values)
        estimate = trial
        return True

    seeded = _within(costs, sorted(set(seed) & set(saved) & costs.offloadable), host_left)
    if seeded:
        attempt(set(seeded))
    tried: set[int] = set()
    chunk = None
    while estimate.peak_bytes_hint > budget and simulations < max_simulations:
        open_ = (costs.alive_at_peak(saved, estimate) & costs.offloadable) - offloaded - tried
        candidates = _within(costs, sorted(open_, key=lambda i: (i, -int(costs.weight[i]))), host_left)
        if not candidates:
            if open_:
                log.warning("memgraph: offload_budget (%s) is spent: %d more value(s) alive at the peak stay on "
                            "the device", gib(costs.offload_budget), len(open_))
            break
        chunk = min(chunk or len(candidates), len(candidates))
        if not attempt(set(candidates[:chunk])):
            if chunk == 1:
                tried.add(candidates[0])
            chunk = max(1, chunk // 2)
    return offloaded, estimate


def _within(costs: GraphCosts, ordered: list[int], host_bytes: int) -> list[int]:
    """The prefix of ``ordered`` whose bytes fit in ``host_bytes``."""
    kept, total = [], 0
    for i in ordered:
        total += int(costs.weight[i])
        if total > host_bytes:
            break
        kept.append(i)
    return kept


def layer_inputs(costs: GraphCosts) -> set[int]:
    blocks = costs.blocks()
    return blocks.layer_inputs(costs) if blocks is not None else set()


def leanest_saved(costs: GraphCosts) -> set[int]:
    """The keep/recompute saved set of least predicted peak among the structural ones (``least_peak``'s)."""
    return set(min(costs.structural_saved_sets(), key=costs.peak))


def added_seconds(plan: Plan) -> float:
    return (plan.recompute_seconds or 0.0) + (plan.transfer_seconds or 0.0)


def with_offload(solve: Callable[..., Plan]) -> Callable[..., Plan]:
    """``solve`` (a keep/recompute solver) with offload as a third choice, when the cost model allows it."""

    @functools.wraps(solve)
    def solver(graph: TrainingGraph, costs: GraphCosts | None = None, budget: int | None = None, **kw: Any) -> Plan:
        if costs is None or budget is None or costs.offload_budget is None or not costs.offloadable:
            return solve(graph, costs, budget, **kw)
        plans: list[Plan] = []
        try:
            plans.append(solve(graph, costs, budget, **kw))
        except InfeasibleBudgetError:
            pass  # offload may still reach it
        fastest = costs.peak(costs.save_all)
        bases = []
        for share in RELAXATIONS:  # less recompute than the budget needs, offload takes the extra bytes back
            relaxed = budget + int(share * max(fastest - budget, 0))
            try:
                bases.append(solve(graph, costs, relaxed, **kw))
            except InfeasibleBudgetError:
                continue
        seed = layer_inputs(costs)  # what Unsloth's recipe offloads: a good start wherever those are saved
        lean = leanest_saved(costs)  # the lowest peak offload can start from
        bases.append(costs.plan(getattr(solve, "__name__", "solver"), lean, None, structural="leanest"))
        lowest: tuple[int, MemoryEstimate] | None = None
        seen: set[tuple[frozenset[int], frozenset[int]]] = set()  # (saved, offloaded) already made candidates
        for base in bases:
            saved = costs.indices(base.saved)
            offloaded, estimate = offload_until_fits(costs, saved, budget, seed=seed)
            if lowest is None or estimate.peak_bytes_hint < lowest[0]:
                lowest = (int(estimate.peak_bytes_hint), estimate)
            if not offloaded or estimate.peak_bytes_hint > budget:
                continue
            key = (frozenset(saved), frozenset(offloaded))
            if key in seen:
                continue
            seen.add(key)
            details = {k: v for k, v in base.details.items() if k != "transfers"}
            plans.append(costs.plan(base.solver, saved, budget, estimate=estimate, offloaded=offloaded, **details))
            # ... and completed, before the plans are compared: an offload plan from the leanest set leaves room
            # that keeping recomputed values fills. Compared uncompleted only, a keep/recompute plan a transfer's
            # fraction of a millisecond faster won at a larger budget and recomputed 30% more than the offload
            # plan the same solver chose at a smaller one. (Both stay candidates: less recompute can leave less
            # backward compute to hide a reload behind.)
            kept, kept_estimate = keep_what_fits(costs, saved, offloaded, budget)
            if len(kept) > len(saved):
                plans.append(costs.plan(base.solver, kept, budget, estimate=kept_estimate, offloaded=offloaded,
                                        **details))
            # ... and where what is still recomputed costs more time than copying it out and back, offloaded too
            spared, moved, spared_estimate = offload_what_spares_recompute(costs, kept, offloaded, budget)
            if len(moved) > len(offloaded):
                plans.append(costs.plan(base.solver, spared, budget, estimate=spared_estimate, offloaded=moved,
                                        **details))
        if not plans:  # name the lowest peak offload reached
            raise costs.infeasible(getattr(solve, "__name__", "solver"), budget, best=lowest)
        return min(plans, key=added_seconds)

    return solver


def keep_what_fits(costs: GraphCosts, saved: set[int], offloaded: set[int], budget: int, *,
                   max_simulations: int = 16) -> tuple[set[int], MemoryEstimate]:
    """``saved`` plus values backward would recompute that are worth keeping, while the predicted peak stays
    within ``budget``; and the estimate of the result.

    An offload plan starts from the leanest keep/recompute set and may leave memory unused. Recomputed values
    are weighed by recompute time saved per byte kept (a LoRA adapter's [tokens, rank] product spares backward
    the whole base matmul that made it), one decision per place in the repeated block (every layer alike), the
    best first; each is kept only if the simulated peak still fits."""
    estimate = costs.simulate(saved, offloaded=offloaded)
    recomputed = costs.recomputed(saved)
    candidates = [i for i in recomputed if i not in costs.unsaveable and i not in costs.views
                  and i in costs.forward_set and costs.recomputable(i) and costs.weight[i] > 0]
    simulations = 0
    for group in _most_time_spared_per_byte(costs, saved, candidates):
        if simulations >= max_simulations:
            break
        if not recomputed.intersection(group):
            continue  # an earlier keep already spared these
        simulations += 1
        trial = saved | set(group)
        trial_estimate = costs.simulate(trial, offloaded=offloaded)
        if trial_estimate.peak_bytes_hint <= budget:
            saved, estimate = trial, trial_estimate
            recomputed = costs.recomputed(saved)
    return saved, estimate


def offload_what_spares_recompute(costs: GraphCosts, saved: set[int], offloaded: set[int], budget: int, *,
                                  max_simulations: int = 12) -> tuple[set[int], set[int], MemoryEstimate]:
    """``saved`` and ``offloaded`` plus recomputed values that backward reloads from the host instead: (saved,
    offloaded, estimate).

    Keeping a value on the device costs memory all the way to backward; offloading it costs only a copy each way,
    hidden behind compute while the host link keeps up. Recomputed values are weighed by recompute time spared
    per byte moved (a base projection's output spares backward its NF4 matmul), one decision per place in the
    repeated block, the best first; each is taken only if the predicted peak stays within ``budget`` and the
    time the step adds (recompute, and copies compute cannot hide) falls by more than the host time the new
    transfer ops take to issue (``HOST_SECONDS_PER_OFFLOADED_VALUE`` each, none under CUDA graphs)."""
    def added(saved_: set[int], estimate_: MemoryEstimate) -> float:
        placed = getattr(estimate_, "transfers", None)
        return costs.recompute_seconds(saved_) + (placed.stall_seconds if placed is not None else 0.0)

    estimate = costs.simulate(saved, offloaded=offloaded)
    best = added(saved, estimate)
    recomputed = costs.recomputed(saved)
    host_left = (costs.offload_budget or 0) - sum(int(costs.weight[i]) for i in offloaded)
    candidates = [i for i in recomputed if i in costs.offloadable and i not in costs.unsaveable
                  and costs.recomputable(i) and costs.weight[i] > 0]
    simulations = 0
    for group in _most_time_spared_per_byte(costs, saved, candidates):
        if simulations >= max_simulations:
            break
        group = [i for i in group if i in recomputed]  # an earlier choice may have spared some
        moved = sum(int(costs.weight[i]) for i in group)
        if not group or moved > host_left:
            continue
        trial_saved, trial_offloaded = saved | set(group), offloaded | set(group)
        if not costs.is_valid(trial_saved):
            continue
        simulations += 1
        try:
            trial = costs.simulate(trial_saved, offloaded=trial_offloaded)
        except InvalidSavedSet:  # backward could not be scheduled from it: not a choice
            continue
        if trial.peak_bytes_hint > budget:
            continue
        trial_added = added(trial_saved, trial)
        if trial_added + len(group) * host_seconds_per_offloaded_value(costs) < best:
            saved, offloaded, estimate, best = trial_saved, trial_offloaded, trial, trial_added
            recomputed = costs.recomputed(saved)
            host_left -= moved
    return saved, offloaded, estimate


def _most_time_spared_per_byte(costs: GraphCosts, saved: set[int], candidates: list[int]) -> list[list[int]]:
    """``candidates`` grouped by their place in the repeated block, the groups that spare backward the most
    recompute time per byte of their first value first (groups sparing nothing left out)."""
    now = costs.recompute_seconds(saved)
    scored = []
    for group in _by_block_position(costs, candidates):
        spared = now - costs.recompute_seconds(saved | {group[0]})
        if spared > 0:
            scored.append((spared / int(costs.weight[group[0]]), group))
    scored.sort(key=lambda item: -item[0])
    return [group for _, group in scored]


def _by_block_position(costs: GraphCosts, values: list[int]) -> list[list[int]]:
    """``values`` grouped by their place in the repeated block (the same op of every layer together); values
    outside the repeated run each on their own."""
    blocks = costs.blocks()
    place: dict[int, int] = {}
    if blocks is not None:
        for lo, hi in zip(blocks.bounds, blocks.bounds[1:]):
            for position in range(lo, hi):
                place[blocks.ops[position]] = position - lo
    groups: dict[Any, list[int]] = {}
    for i in sorted(values):
        groups.setdefault(("block", place[i]) if i in place else ("alone", i), []).append(i)
    return list(groups.values())


@register("offload-layers", uses_budget=True)
def offload_layers(graph: TrainingGraph, costs: GraphCosts | None = None, budget: int | None = None,
                   **_: Any) -> Plan:
    """Unsloth's recipe: recompute each repeated block, its input hidden state offloaded to host memory."""
    from memgraph.cost_model import graph_costs

    costs = costs or graph_costs(graph)
    saved, found = checkpoint_saved(costs)
    inputs = layer_inputs(costs)
    candidates = sorted(i for i in inputs if i in saved and i in costs.offloadable)
    host = costs.offload_budget if costs.offload_budget is not None else sum(int(costs.weight[i]) for i in candidates)
    offloaded = set(_within(costs, candidates, host))
    left_out = len(candidates) - len(offloaded)
    if left_out:
        log.warning("memgraph: offload_budget (%s) holds %d of the %d layer inputs; the rest stay on the device",
                    gib(costs.offload_budget), len(offloaded), len(offloaded) + left_out)
    found["layer_inputs"] = len(inputs)
    return costs.plan("offload-layers", saved, budget, offloaded=offloaded, **found)
