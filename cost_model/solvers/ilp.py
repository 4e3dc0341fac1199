""""ilp": the cheapest recomputation whose predicted peak fits the budget, as a MILP solved by HiGHS.

Formulation (Checkmate/Moccasin-style, with the schedule fixed to the one the partition pass builds):

* per forward value v two binaries: ``s_v`` (saved for backward) and ``r_v`` (recomputed in backward);
  ``s_v + r_v <= 1``; a value backward reads is available: ``s_v + r_v >= 1``; a recomputed value's inputs are
  available: ``r_v <= s_u + r_u``; pinned values (inputs, random/impure/mutating ops) have ``r_v = 0``;
  views and tuples are never saved (their storage is their base's);
* time is the step sequence of the cost model's simulation of the save-everything plan; a saved value holds its
  storage from its last forward use to its last backward use (direct, through a view, or as input of a
  recomputed value); a recomputed value holds it from the first backward op that needs it (recomputation is
  scheduled just in time) to that same end. Everything else (weights, tangents, backward temporaries,
  gradients, user outputs) is the simulated baseline ``base_k``;
* memory at step k: ``base_k + sum_v bytes_v * (s_v [k in saved interval] + r_v [k in recompute interval])
  <= budget``, written with one cumulative variable per segment between interval ends (O(n) nonzeros);
* minimise ``sum_v seconds_v r_v`` (+ a tie-break of 1e-9 s per GiB saved, preferring less memory).

The intervals depend on which users of a value are recomputed: they are taken from a reference plan (first
layer checkpointing and the fastest plan, then the best plan found so far). A value that plan never
recomputes is "filled", so that every value is a decision (a chain of recomputation of any depth is reachable
in one solve): it gets the intervals of recomputing its users where this model needs them
(``"needed-users"``, the closer model) or of recomputing all its users (``"all-users"``, earlier starts).
Unfilled rounds, where only values one step deeper than the reference's recomputation are decisions, are
tried too: a tighter model near it. The chosen set is then simulated by the cost model; if the simulated
peak overshoots (the model above is an interval approximation of the cost model's sweep),
the next round uses that plan's own intervals (or, once plans repeat, the internal budget is lowered by the
overshoot) and the MILP is solved again. The MILP counts memory in MiB and time in milliseconds: HiGHS'
tolerances are absolute, and in bytes and seconds its "optimal" answers missed better plans on an 8B graph.
Large graphs (many repeated decoder layers) tie the variables of corresponding ops in each repeated block
(``tie_blocks``): one policy per layer position, which keeps an 8B graph to about two thousand binaries.
``plan.optimality_gap`` is HiGHS' relative MIP gap of the last solve.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from memgraph.cost_model.solvers import register
from memgraph.cost_model.solvers.common import Problem, find_blocks
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan

TIE_BLOCKS_ABOVE = 2500  # forward nodes; above this, corresponding ops of repeated blocks share a policy
TORCH_INCUMBENTS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)  # activation_memory_budget fractions tried as incumbents
POLISH_SHARE = 0.2  # of time_limit kept for polishing the best plan
ROUND_SECONDS = 1.5  # most a round's MILP may take: HiGHS finds these plans fast or not at all
MEMORY_UNIT = 2**20  # bytes per MILP memory unit (MiB)
TIME_UNIT = 1e-3  # seconds per MILP time unit (ms)
FILLS = (None, "needed-users", "all-users")
_INF = np.inf


@dataclasses.dataclass
class Intervals:
    """Where each forward value would hold memory, in steps of the save-everything simulation."""

    steps: int
    backward_start: int
    base: np.ndarray  # bytes live at each step that no decision changes
    saved_from: dict[int, int]  # first step a saved value costs extra (after its last forward use)
    first: dict[int, int]  # first backward step that needs the value (recomputation happens there)
    end: dict[int, int]  # last step that needs it
    weight: dict[int, int]


def intervals(problem: Problem, reference: set[int] | frozenset[int], *, fill: str | None = "needed-users"
              ) -> Intervals:
    """The step intervals of every forward value, and the plan-independent baseline.

    When a value is recomputed depends on which of its users are recomputed too; the intervals assume the
    users in ``reference`` (a saved set) are saved, so needs propagate only through the others. A value no
    recomputed user of the reference reads gets (``fill``) the intervals of recomputing its users where they
    are needed ("needed-users": from their own intervals, users before inputs; it lives at least as long as
    with "all-users"), or of recomputing all its users ("all-users"), or none (None: it stays saved or
    unneeded this round; recomputation reaches one value deeper than the reference's, which is accurate near
    the no-recompute end)."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, not {fill!r}")
    costs = problem.costs
    estimate = problem.simulate(problem.save_all)
    step_of = {name: k for k, name in enumerate(estimate.names)}
    steps = len(estimate.names)
    backward_start = estimate.backward_start if estimate.backward_start is not None else steps
    position = {}
    for i in problem.backward:
        k = step_of.get(problem.name(i))
        if k is not None and k >= backward_start:
            position[i] = k
    owner = _storage_owners(problem)
    outputs_alive = getattr(getattr(costs, "semantics", None), "outputs_alive", True)
    user_outputs = {owner.get(costs.index[n.name]) for n in _user_outputs(problem)} if outputs_alive else set()

    # first / end / direct end, users before inputs (reverse graph order); needs propagate only through users
    # that ``reference`` recomputes.
    everywhere = _needs(problem, position, owner, frozenset())
    first, end, _ = _needs(problem, position, owner, frozenset(reference))
    # Values the reference never recomputes are filled: every value stays a decision, so one solve can
    # recompute a chain of any depth (with the reference's intervals alone, each round could only reach one
    # value deeper than the last plan).
    needed = _needs_of_users(problem, position, owner, first, end) if fill == "needed-users" else {}
    for i, f in everywhere[0].items() if fill else ():
        if i in first:
            continue
        if i in needed:  # where its users' recomputation needs it, no shorter than with all users recomputed
            first[i], end[i] = needed[i][0], max(needed[i][1], everywhere[1][i])
        else:
            first[i], end[i] = f, everywhere[1][i]

    # last forward use of each storage (any alias), from the save-everything forward
    last_forward: dict[int, int] = {}
    for i in problem.forward:
        k = step_of.get(problem.name(i))
        if k is None or k >= backward_start:
            continue
        o = owner.get(i)
        if o is not None:
            last_forward[o] = max(last_forward.get(o, k), k)
        for j in problem.inputs[i]:
            oj = owner.get(j)
            if oj is not None:
                last_forward[oj] = max(last_forward.get(oj, k), k)

    weight = {}
    for i in problem.forward:
        if owner.get(i) == i and problem.weight[i] > 0 and i not in user_outputs and i in end:
            weight[i] = int(problem.weight[i])
    saved_from = {i: last_forward.get(i, backward_start - 1) + 1 for i in weight}

    # baseline: the save-everything peak minus what its saved storages add
    base = np.asarray(estimate.during, dtype=np.float64).copy()
    diff = np.zeros(steps + 1)
    saved_owners = {owner.get(i) for i in problem.save_all} & set(weight)
    for o in saved_owners:
        stop = max(everywhere[2].get(o, end[o]), backward_start)
        diff[saved_from[o]] -= weight[o]
        diff[stop + 1] += weight[o]
    base += np.cumsum(diff)[:steps]
    return Intervals(steps, backward_start, base, saved_from, first, end, weight)


def _needs(problem: Problem, position: dict[int, int], owner: dict[int, int],
           reference: frozenset[int]) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Per forward value: the first and last backward step that needs it, and the last that reads it
    directly (or through a view). Users in ``reference`` (saved) need nothing in backward."""
    first: dict[int, int] = {}
    end: dict[int, int] = {}
    direct_end: dict[int, int] = {}
    forward_set = problem.forward_set
    for i in sorted(problem.forward, reverse=True):
        starts, stops, direct = [], [], []
        for u in problem.users[i]:
            if u in position:
                starts.append(position[u])
                stops.append(position[u])
                direct.append(position[u])
            elif u in forward_set and u in first and (u not in reference or owner.get(u) == owner.get(i)):
                starts.append(first[u])
                if owner.get(u) == owner.get(i) and u != i:  # a view keeps its base alive
                    stops.append(end[u])
                    direct.append(direct_end.get(u, first[u]))
                else:
                    stops.append(first[u])
        if starts:
            first[i], end[i] = min(starts), max(stops)
            if direct:
                direct_end[i] = max(direct)
    return first, end, direct_end


def _needs_of_users(problem: Problem, position: dict[int, int], owner: dict[int, int], first: dict[int, int],
                    end: dict[int, int]) -> dict[int, tuple[int, int]]:
    """For each value outside ``first`` (the reference does not need it): the first and last step at which
    recomputing its users, each where its own interval says it is needed, needs it (users before inputs)."""
    needed: dict[int, tuple[int, int]] = {}
    forward_set = problem.forward_set
    for i in sorted(problem.forward, reverse=True):
        if i in first:
            continue
        starts, stops = [], []
        for u in problem.users[i]:
            if u in position:
                span = (position[u], position[u])
            elif u in forward_set and (u in first or u in needed):
                span = (first[u], end[u]) if u in first else needed[u]
            else:
                continue
            starts.append(span[0])
            stops.append(span[1] if owner.get(u) == owner.get(i) and u != i else span[0])  # a view keeps its base
        if starts:
            needed[i] = (min(starts), max(stops))
    return needed


def _storage_owners(problem: Problem) -> dict[int, int]:
    """Forward node -> the node whose decision decides its storage (itself, or the base of a view)."""
    owner: dict[int, int] = {}
    for i in problem.forward:
        if i in problem.primals or i in problem.unsaveable:
            continue
        if i in problem.views:
            base = next((j for j in problem.inputs[i] if j in owner or j in problem.primals), None)
            if base is not None and base in owner:
                owner[i] = owner[base]
            continue
        owner[i] = i
    return owner


def _user_outputs(problem: Problem):
    from memgraph import _compat

    outputs, _ = _compat.fwd_bwd_outputs(problem.graph.joint, problem.graph.num_fwd_outputs)
    return [n for n in outputs if hasattr(n, "name") and n.name in problem.costs.index]


@dataclasses.dataclass
class Formulation:
    """The MILP over (s, r) per decision variable and one cumulative-memory variable per segment."""

    variable_of: dict[int, int]  # forward node -> decision index (shared across tied blocks)
    count: int
    c: np.ndarray
    integrality: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    rows: list
    cols: list
    vals: list
    row_lower: list
    row_upper: list
    segment_base: np.ndarray
    segment_column: int  # index of the first segment variable
    burst_rows: list[tuple[int, int]]  # (row, segment): segment total + burst transient <= budget - base

    def solve(self, budget: float, time_limit: float):
        budget = budget / MEMORY_UNIT
        segments = len(self.segment_base)
        upper = self.upper.copy()
        columns = slice(self.segment_column, self.segment_column + segments)
        upper[columns] = budget - self.segment_base
        if np.any(upper[columns] < self.lower[columns]):
            return None
        row_upper = np.array(self.row_upper, dtype=float)
        for row, segment in self.burst_rows:
            row_upper[row] = budget - self.segment_base[segment]
        matrix = sparse.csr_array((self.vals, (self.rows, self.cols)), shape=(len(self.row_lower), len(self.c)))
        return milp(self.c, integrality=self.integrality, bounds=Bounds(self.lower, upper),
                    constraints=LinearConstraint(matrix, self.row_lower, row_upper),
                    options={"time_limit": max(time_limit, 0.1), "disp": False, "mip_rel_gap": 1e-4})


def formulate(problem: Problem, spans: Intervals, *, tie_blocks: bool) -> Formulation:
    relevant = [i for i in problem.forward if i in spans.end]
    # decision variables: one per node, or one per block position when tying repeated blocks
    variable_of: dict[int, int] = {}
    keys: dict[Any, int] = {}
    blocks = find_blocks(problem) if tie_blocks else None
    if blocks is not None:
        position = {i: p for p, i in enumerate(blocks.ops)}
        block_of = blocks.block_of()
        starts = {b: lo for b, lo in enumerate(blocks.bounds[:-1])}
        sizes = {b: hi - lo for b, (lo, hi) in enumerate(zip(blocks.bounds, blocks.bounds[1:]))}
    for i in relevant:
        key: Any = i
        if blocks is not None and i in block_of and sizes[block_of[i]] == blocks.period:
            key = ("block", position[i] - starts[block_of[i]])
        variable_of[i] = keys.setdefault(key, len(keys))
    n = len(keys)
    s_col = lambda v: v  # noqa: E731
    r_col = lambda v: n + v  # noqa: E731

    seconds = np.zeros(n)
    lower, upper = np.zeros(2 * n), np.ones(2 * n)
    for i in relevant:
        v = variable_of[i]
        seconds[v] += problem.seconds[i]
        if i in problem.unsaveable or i in problem.views:
            upper[s_col(v)] = 0
        if not problem.recomputable(i):
            upper[r_col(v)] = 0
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    row_lower: list[float] = []
    row_upper: list[float] = []
    seen_rows: set = set()

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        key = (tuple(sorted(entries)), lo, hi)
        if key in seen_rows:
            return
        seen_rows.add(key)
        row = len(row_lower)
        merged: dict[int, float] = {}
        for col, val in entries:
            merged[col] = merged.get(col, 0.0) + val
        for col, val in merged.items():
            if val:
                rows.append(row)
                cols.append(col)
                vals.append(val)
        row_lower.append(lo)
        row_upper.append(hi)

    for v in range(n):
        add_row([(s_col(v), 1), (r_col(v), 1)], -_INF, 1)
    for i in problem.frontier:
        if i in variable_of:
            v = variable_of[i]
            add_row([(s_col(v), 1), (r_col(v), 1)], 1, _INF)
    for i in relevant:
        v = variable_of[i]
        for j in problem.inputs[i]:
            if j in variable_of:
                u = variable_of[j]
                if u != v:
                    add_row([(s_col(u), 1), (r_col(u), 1), (r_col(v), -1)], 0, _INF)
            elif j in problem.forward_set and j not in problem.primals:
                upper[r_col(v)] = 0  # an input outside the problem cannot be recomputed from saved values

    # memory: segments between interval ends, one cumulative variable each. A value recomputed and consumed
    # within one step (an intermediate of a recompute burst) lives only while its consumer runs: it counts as
    # the burst's transient (the largest such value, input + output) instead of for the whole step.
    events: list[tuple[int, int, float]] = []  # (step, column, +MiB at that step / -MiB after)
    bursts: dict[int, list[tuple[int, float]]] = {}
    for i, nbytes in spans.weight.items():
        if i not in variable_of:
            continue
        w = nbytes / MEMORY_UNIT
        v = variable_of[i]
        stop = spans.end[i] + 1
        if spans.saved_from[i] < stop:
            events.append((spans.saved_from[i], s_col(v), w))
            events.append((stop, s_col(v), -w))
        recompute_start = max(spans.first[i], spans.backward_start)
        if recompute_start == stop - 1:
            bursts.setdefault(recompute_start, []).append((r_col(v), w))
        elif recompute_start < stop:
            events.append((recompute_start, r_col(v), w))
            events.append((stop, r_col(v), -w))
    burst_steps = [k for k in bursts if k < spans.steps]
    cuts = sorted({0, spans.steps, *(min(e[0], spans.steps) for e in events), *burst_steps,
                   *(k + 1 for k in burst_steps)})
    segment_of_step = np.searchsorted(np.array(cuts), np.arange(spans.steps), side="right") - 1
    segments = len(cuts) - 1
    segment_base = np.full(segments, -_INF)
    np.maximum.at(segment_base, segment_of_step, spans.base / MEMORY_UNIT)
    by_segment: dict[int, list[tuple[int, float]]] = {}
    for step, col, w in events:
        if step >= spans.steps:
            continue
        by_segment.setdefault(int(segment_of_step[step]), []).append((col, w))
    first_segment = 2 * n
    for g in range(segments):
        entries = [(first_segment + g, 1.0)] + [(col, -w) for col, w in by_segment.get(g, [])]
        if g:
            entries.append((first_segment + g - 1, -1.0))
        row = len(row_lower)
        for col, val in entries:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        row_lower.append(0.0)
        row_upper.append(0.0)

    burst_column = first_segment + segments
    burst_rows: list[tuple[int, int]] = []
    for b, k in enumerate(burst_steps):
        column = burst_column + b
        for col, w in bursts[k]:
            add_row([(column, 1.0), (col, -2.0 * w)], 0.0, _INF)
        segment = int(segment_of_step[k])
        burst_rows.append((len(row_lower), segment))
        add_row([(first_segment + segment, 1.0), (column, 1.0)], -_INF, _INF)

    total_bytes = max(sum(spans.weight.values()), 1)
    tie_break = 1e-9 * max(seconds.max(initial=0.0), 1e-12) / total_bytes
    saved_bytes = np.zeros(n)
    for i, w in spans.weight.items():
        if i in variable_of:
            saved_bytes[variable_of[i]] += w
    extra = segments + len(burst_steps)
    c = np.concatenate([tie_break * saved_bytes, seconds, np.zeros(extra)]) / TIME_UNIT
    integrality = np.concatenate([np.ones(2 * n), np.zeros(extra)])
    lower = np.concatenate([lower, np.full(segments, -_INF), np.zeros(len(burst_steps))])
    upper = np.concatenate([upper, np.full(extra, _INF)])
    return Formulation(variable_of, n, c, integrality, lower, upper, rows, cols, vals, row_lower, row_upper,
                       segment_base, first_segment, burst_rows)


def decode(problem: Problem, formulation: Formulation, x: np.ndarray) -> set[int]:
    """The saved set of a MILP solution (made valid: pinned values reached by recomputation are saved)."""
    saved = {i for i, v in formulation.variable_of.items() if x[v] > 0.5}
    saved |= {i for i in problem.frontier if i in problem.primals}
    return problem.make_valid(saved)


@register("ilp", uses_budget=True)
def ilp(graph: TrainingGraph, estimate=None, budget: int | None = None, *, time_limit: float = 6.0,
        tie_blocks: bool | None = None, max_rounds: int = 10, polish: int = 16, repair: int = 4,
        relax: float = 0.03, **_: Any) -> Plan:
    """Minimum predicted recompute time under the predicted-peak budget (MILP, scipy/HiGHS)."""
    started = time.perf_counter()
    problem = Problem.of(graph, estimate)
    if budget is None:
        return problem.fastest_plan("ilp")
    fastest = problem.simulate(problem.save_all)
    if fastest.peak_bytes_hint <= budget:
        return problem.plan("ilp", problem.save_all, budget, estimate=fastest, gap=0.0, status="optimal",
                            reason="the fastest plan fits")
    if tie_blocks is None:
        tie_blocks = len(problem.forward) > TIE_BLOCKS_ABOVE
    from memgraph.cost_model.solvers.checkpoint import checkpoint_saved

    lean = checkpoint_saved(problem)[0]
    # First intervals, while time allows: those of layer checkpointing, unfilled (only what checkpointing
    # recomputes is a decision: a small MILP) and filled (every value a decision: deeper recomputation), then
    # those of the fastest plan, filled and not. Which admits the cheapest plan depends on the budget. Later
    # rounds recompute the intervals from the best plan found so far (else from the last one), filled as in
    # the round that found it.
    pending: list[tuple[set[int], str | None]] = [
        (lean, None), (lean, "needed-users"), (lean, "all-users"),
        (set(problem.save_all), "needed-users"), (set(problem.save_all), "all-users"), (set(problem.save_all), None)]
    best_fill: str | None = "needed-users"
    target, best, rounds, gap, status, formulation = float(budget), None, 0, None, "not solved", None
    milp_seconds = 0.0
    used: set[tuple[frozenset[int], str | None]] = set()  # (reference, fill) of the rounds so far
    reference, fill = pending.pop(0)
    deadline = started + time_limit
    # the last POLISH_SHARE of the time is the polish's: the rounds' best plan is often a little under the
    # budget (the interval model overcounts), and re-saving what still fits is cheap recompute time won
    rounds_deadline = started + time_limit * (1 - POLISH_SHARE)
    round_seconds = 0.0
    trace: list[tuple] = []
    for rounds in range(1, max_rounds + 1):
        round_started = time.perf_counter()
        if rounds_deadline - round_started <= (min(round_seconds, 1.0) if best is not None else 0.0):
            break  # too little time for another round (its MILP gets most of what is left)
        used.add((frozenset(reference), fill))
        formulation = formulate(problem, intervals(problem, reference, fill=fill), tie_blocks=tie_blocks)
        # a round may use most of the time left, up to ROUND_SECONDS (HiGHS stops early once optimal)
        solve_started = time.perf_counter()
        result = formulation.solve(target, min(max((rounds_deadline - solve_started) * 0.8, 0.3), ROUND_SECONDS))
        milp_seconds += time.perf_counter() - solve_started
        if result is None or result.x is None:
            status = "infeasible" if result is None or result.status == 2 else str(result.message)
            trace.append((rounds, int(target), None, None, round(time.perf_counter() - round_started, 2)))
            if pending:
                reference, fill = pending.pop(0)  # the intervals of another plan may admit this budget
                continue
            if best is not None and (frozenset(best[0]), best_fill) not in used:
                reference, fill = best[0], best_fill  # re-linearize around the best plan
                continue
            if best is None and target <= budget:
                target = budget * (1 + relax)  # the interval model overcounts: solve looser, then repair
                continue
            break
        saved = decode(problem, formulation, result.x)
        simulated = problem.simulate(saved)
        peak = int(simulated.peak_bytes_hint)
        status = "optimal" if result.status == 0 else "time limit"
        gap = getattr(result, "mip_gap", None)
        seconds = problem.recompute_seconds(saved)
        trace.append((rounds, int(target), peak, seconds, round(time.perf_counter() - round_started, 2)))
        if peak <= budget and (best is None or seconds < best[2]):
            best, best_fill = (saved, simulated, seconds, gap, status, "milp"), fill
        elif peak > budget and (best is None or seconds < best[2]):
            # repair: evict what is alive at the simulated peak, cheapest per byte first
            from memgraph.cost_model.solvers.greedy import evict_until_fits

            repaired, repaired_estimate, _ = evict_until_fits(problem, budget, saved, max_rounds=repair,
                                                              deadline=rounds_deadline)
            repaired_seconds = problem.recompute_seconds(repaired)
            if repaired_estimate.peak_bytes_hint <= budget and (best is None or repaired_seconds < best[2]):
                best, best_fill = (repaired, repaired_estimate, repaired_seconds, gap, status, "milp+repair"), fill
        round_seconds = time.perf_counter() - round_started
        if pending:
            reference, fill = pending.pop(0)
            continue
        # next intervals: those of the best plan, else of this one (a plan's own users saved)
        options = ([best[0]] if best is not None else []) + [saved]
        next_fill = best_fill if best is not None else fill
        following = next((o for o in options if (frozenset(o), next_fill) not in used), None)
        if following is None:
            if peak <= budget:
                break
            target -= peak - budget  # the interval model undercounts this plan: tighten and solve again
            following = saved
        reference, fill = following, next_fill
    if best is not None:  # polish: the interval model is conservative; re-save what still fits
        from memgraph.cost_model.solvers.greedy import fill_up

        polished, polished_estimate = fill_up(problem, budget, set(best[0]), best[1], max_simulations=polish,
                                              deadline=deadline)
        seconds = problem.recompute_seconds(polished)
        if seconds < best[2]:
            best = (polished, polished_estimate, seconds, best[3], best[4], best[5] + "+polish")
    # Heuristic incumbents, as MILP solvers keep them: never answer worse than layer checkpointing or greedy.
    incumbents = [("checkpoint", lean)]
    small = len(problem.forward) <= TIE_BLOCKS_ABOVE
    if best is None or small:
        from memgraph.cost_model.solvers.greedy import greedy_saved

        incumbents.append(("greedy", greedy_saved(problem, budget,
                                                  time_limit=max(deadline - time.perf_counter(), 1.0))[0]))
    if small:  # torch's knapsack plans (cheap to make on a small graph)
        from memgraph.cost_model.solvers.torch_budget import torch_saved

        incumbents += [(f"torch-budget@{f}", torch_saved(problem, f)) for f in TORCH_INCUMBENTS]
    for name, saved in incumbents:
        seconds = problem.recompute_seconds(saved)
        if best is not None and seconds >= best[2]:
            continue
        simulated = problem.simulate(saved)
        if simulated.peak_bytes_hint <= budget:
            best = (saved, simulated, seconds, None, status, name)
    if best is None:
        raise problem.infeasible("ilp", budget)
    saved, simulated, _, gap, status, source = best
    details = {"status": status, "source": source, "rounds": rounds, "milp_s": round(milp_seconds, 3),
               "tied_blocks": bool(tie_blocks),
               "binaries": 2 * formulation.count, "segments": len(formulation.segment_base), "trace": trace}
    return problem.plan("ilp", saved, budget, estimate=simulated,
                        gap=None if gap is None or np.isnan(gap) else max(float(gap), 0.0), **details)
