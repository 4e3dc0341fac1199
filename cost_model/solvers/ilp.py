""""ilp": the cheapest recomputation whose predicted peak fits the budget, as a MILP solved by HiGHS.

The formulation (Checkmate/Moccasin-style, with the schedule fixed to the one the partition pass builds), in
the variables' own names. For every decision v (a forward value, or one layer position when repeated blocks
are tied) with recompute time t_v and bytes w_v:

    s_v, r_v in {0, 1}                  saved for backward / recomputed in backward
    s_v + r_v <= 1
    s_v + r_v >= 1                      if backward reads v directly
    r_v <= s_u + r_u                    for every input u of v (a recomputed value's inputs are available)
    r_v = 0 if v is pinned;  s_v = 0 if v is a view or a tuple (their storage is another value's)

Time is the step sequence k of the cost model's simulation of the save-everything plan. A saved value holds its
storage from its last forward use to its last backward use (direct, through a view, or as the input of a
recomputed value); a recomputed value from the first backward step that needs it (recomputation is just in
time) to that same end. Everything no decision changes (weights, tangents, backward temporaries, gradients,
user outputs) is the simulated baseline base_k. Memory is cumulative over segments g (the steps between
interval ends), one continuous variable M_g each, O(n) nonzeros:

    M_g = M_{g-1} + sum of w_v s_v or w_v r_v over the intervals that start (+) or end (-) in g
    M_g <= B - max_{k in g} base_k
    T_b >= 2 w_v r_v                    a value recomputed and consumed within one step b (a recompute burst)
    M_{g(b)} + T_b <= B - base_{g(b)}   lives only while its consumer runs: the burst's transient T_b

    minimise  sum_v t_v r_v + eps sum_v w_v s_v       (eps: 1e-9 s per GiB saved, preferring less memory)

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

The solver, top to bottom: ``intervals`` (the model's time axis for one reference plan), ``formulate`` (the
MILP above), ``RoundSearch`` (rounds of formulate -> solve -> simulate -> repair, re-linearized around the best
``Candidate``), then a polish (re-save what still fits) and heuristic incumbents (never worse than layer
checkpointing, greedy or torch's knapsack).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from memgraph.cost_model.graph_costs import GraphCosts
from memgraph.cost_model.memory import MemoryEstimate
from memgraph.cost_model.solvers import register
from memgraph.cost_model.solvers.offload import with_offload
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan

TIE_BLOCKS_ABOVE = 2500  # forward nodes; above this, corresponding ops of repeated blocks share a policy
TORCH_INCUMBENTS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)  # activation_memory_budget fractions tried as incumbents
POLISH_SHARE = 0.2  # of time_limit kept for polishing the best plan
ROUND_SECONDS = 1.5  # most a round's MILP may take: HiGHS finds these plans fast or not at all
MIN_ROUND_SECONDS = 0.3  # least a round's MILP is given
ROUND_TIME_SHARE = 0.8  # of the rounds' time left that one MILP may use
MEMORY_UNIT = 2**20  # bytes per MILP memory unit (MiB)
TIME_UNIT = 1e-3  # seconds per MILP time unit (ms)
SAVED_BYTES_TIE_BREAK = 1e-9  # objective weight of bytes saved, relative to the largest recompute time
MIP_REL_GAP = 1e-4
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


def intervals(costs: GraphCosts, reference: set[int] | frozenset[int], *, fill: str | None = "needed-users"
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
    estimate = costs.simulate(costs.save_all)
    step_of = {name: k for k, name in enumerate(estimate.names)}
    steps = len(estimate.names)
    backward_start = estimate.backward_start if estimate.backward_start is not None else steps
    position = {}
    for i in costs.backward:
        k = step_of.get(costs.names[i])
        if k is not None and k >= backward_start:
            position[i] = k
    owner = _storage_owners(costs)
    user_outputs = {owner.get(i) for i in costs.forward_outputs} if costs.semantics.outputs_alive else set()

    # first / end / direct end, users before inputs (reverse graph order); needs propagate only through users
    # that ``reference`` recomputes.
    everywhere = _needs(costs, position, owner, frozenset())
    first, end, _ = _needs(costs, position, owner, frozenset(reference))
    # Values the reference never recomputes are filled: every value stays a decision, so one solve can
    # recompute a chain of any depth (with the reference's intervals alone, each round could only reach one
    # value deeper than the last plan).
    needed = _needs_of_users(costs, position, owner, first, end) if fill == "needed-users" else {}
    for i, f in everywhere[0].items() if fill else ():
        if i in first:
            continue
        if i in needed:  # where its users' recomputation needs it, no shorter than with all users recomputed
            first[i], end[i] = needed[i][0], max(needed[i][1], everywhere[1][i])
        else:
            first[i], end[i] = f, everywhere[1][i]

    # last forward use of each storage (any alias), from the save-everything forward
    last_forward: dict[int, int] = {}
    for i in costs.forward:
        k = step_of.get(costs.names[i])
        if k is None or k >= backward_start:
            continue
        o = owner.get(i)
        if o is not None:
            last_forward[o] = max(last_forward.get(o, k), k)
        for j in costs.inputs[i]:
            oj = owner.get(j)
            if oj is not None:
                last_forward[oj] = max(last_forward.get(oj, k), k)

    weight = {}
    for i in costs.forward:
        if owner.get(i) == i and costs.weight[i] > 0 and i not in user_outputs and i in end:
            weight[i] = int(costs.weight[i])
    saved_from = {i: last_forward.get(i, backward_start - 1) + 1 for i in weight}

    # baseline: the save-everything peak minus what its saved storages add
    base = np.asarray(estimate.during, dtype=np.float64).copy()
    diff = np.zeros(steps + 1)
    saved_owners = {owner.get(i) for i in costs.save_all} & set(weight)
    for o in saved_owners:
        stop = max(everywhere[2].get(o, end[o]), backward_start)
        diff[saved_from[o]] -= weight[o]
        diff[stop + 1] += weight[o]
    base += np.cumsum(diff)[:steps]
    return Intervals(steps, backward_start, base, saved_from, first, end, weight)


def _needs(costs: GraphCosts, position: dict[int, int], owner: dict[int, int],
           reference: frozenset[int]) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Per forward value: the first and last backward step that needs it, and the last that reads it
    directly (or through a view). Users in ``reference`` (saved) need nothing in backward."""
    first: dict[int, int] = {}
    end: dict[int, int] = {}
    direct_end: dict[int, int] = {}
    forward_set = costs.forward_set
    for i in sorted(costs.forward, reverse=True):
        starts, stops, direct = [], [], []
        for u in costs.users[i]:
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


def _needs_of_users(costs: GraphCosts, position: dict[int, int], owner: dict[int, int], first: dict[int, int],
                    end: dict[int, int]) -> dict[int, tuple[int, int]]:
    """For each value outside ``first`` (the reference does not need it): the first and last step at which
    recomputing its users, each where its own interval says it is needed, needs it (users before inputs)."""
    needed: dict[int, tuple[int, int]] = {}
    forward_set = costs.forward_set
    for i in sorted(costs.forward, reverse=True):
        if i in first:
            continue
        starts, stops = [], []
        for u in costs.users[i]:
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


def _storage_owners(costs: GraphCosts) -> dict[int, int]:
    """Forward node -> the node whose decision decides its storage (itself, or the base of a view)."""
    owner: dict[int, int] = {}
    for i in costs.forward:
        if i in costs.primals or (i in costs.unsaveable and i not in costs.never_saved):
            continue  # a tuple owns no storage (its items do); a never-saved value is recomputed into its own
        if i in costs.views:
            base = next((j for j in costs.inputs[i] if j in owner or j in costs.primals), None)
            if base is not None and base in owner:
                owner[i] = owner[base]
            continue
        owner[i] = i
    return owner



# --- the MILP ------------------------------------------------------------------------------------------------
class _Rows:
    """The constraint matrix, row by row (identical rows are added once unless ``unique=False``)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self._seen: set = set()

    def add(self, entries: list[tuple[int, float]], lo: float, hi: float, *, unique: bool = True) -> int:
        if unique:
            key = (tuple(sorted(entries)), lo, hi)
            if key in self._seen:
                return -1
            self._seen.add(key)
        row = len(self.lower)
        merged: dict[int, float] = {}
        for col, val in entries:
            merged[col] = merged.get(col, 0.0) + val
        for col, val in (merged.items() if unique else entries):
            if val:
                self.rows.append(row)
                self.cols.append(col)
                self.vals.append(val)
        self.lower.append(lo)
        self.upper.append(hi)
        return row


@dataclasses.dataclass
class Formulation:
    """The MILP over columns [s_0..s_{n-1}, r_0..r_{n-1}, M_0..M_{G-1}, T_0..T_{b-1}] (see the module docstring).
    The budget B enters only at ``solve``: as the bounds of M_g and the right-hand sides of the burst rows."""

    variable_of: dict[int, int]  # forward node -> decision v (shared across tied blocks)
    count: int  # n, the number of decisions
    c: np.ndarray
    integrality: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    rows: _Rows
    segment_base: np.ndarray  # max_{k in g} base_k, in MiB
    segment_column: int  # column of M_0
    burst_rows: list[tuple[int, int]]  # (row of M_{g(b)} + T_b, g(b))

    def solve(self, budget: float, time_limit: float):
        budget = budget / MEMORY_UNIT
        segments = len(self.segment_base)
        upper = self.upper.copy()
        columns = slice(self.segment_column, self.segment_column + segments)
        upper[columns] = budget - self.segment_base
        if np.any(upper[columns] < self.lower[columns]):
            return None
        row_upper = np.array(self.rows.upper, dtype=float)
        for row, segment in self.burst_rows:
            row_upper[row] = budget - self.segment_base[segment]
        matrix = sparse.csr_array((self.rows.vals, (self.rows.rows, self.rows.cols)),
                                  shape=(len(self.rows.lower), len(self.c)))
        return milp(self.c, integrality=self.integrality, bounds=Bounds(self.lower, upper),
                    constraints=LinearConstraint(matrix, self.rows.lower, row_upper),
                    options={"time_limit": max(time_limit, 0.1), "disp": False, "mip_rel_gap": MIP_REL_GAP})


def _decisions(costs: GraphCosts, relevant: list[int], tie_blocks: bool) -> dict[int, int]:
    """Forward node -> decision index: one per node, or one per block position when tying repeated blocks."""
    variable_of: dict[int, int] = {}
    keys: dict[Any, int] = {}
    blocks = costs.blocks() if tie_blocks else None
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
    return variable_of


def formulate(costs: GraphCosts, spans: Intervals, *, tie_blocks: bool) -> Formulation:
    relevant = [i for i in costs.forward if i in spans.end]
    variable_of = _decisions(costs, relevant, tie_blocks)
    n = len(set(variable_of.values()))
    s = lambda v: v  # noqa: E731 - column of s_v
    r = lambda v: n + v  # noqa: E731 - column of r_v

    t = np.zeros(n)  # recompute seconds of each decision
    lower, upper = np.zeros(2 * n), np.ones(2 * n)
    for i in relevant:
        v = variable_of[i]
        t[v] += costs.seconds[i]
        if i in costs.unsaveable or i in costs.views:
            upper[s(v)] = 0
        if not costs.recomputable(i):
            upper[r(v)] = 0
    rows = _Rows()
    for v in range(n):  # s_v + r_v <= 1
        rows.add([(s(v), 1), (r(v), 1)], -_INF, 1)
    for i in costs.frontier:  # s_v + r_v >= 1: backward reads v
        if i in variable_of:
            v = variable_of[i]
            rows.add([(s(v), 1), (r(v), 1)], 1, _INF)
    for i in relevant:  # r_v <= s_u + r_u
        v = variable_of[i]
        for j in costs.inputs[i]:
            if j in variable_of:
                u = variable_of[j]
                if u != v:
                    rows.add([(s(u), 1), (r(u), 1), (r(v), -1)], 0, _INF)
            elif j in costs.forward_set and j not in costs.primals:
                upper[r(v)] = 0  # an input outside the problem cannot be recomputed from saved values

    events, bursts = _memory_events(spans, variable_of, s, r)
    burst_steps = [k for k in bursts if k < spans.steps]
    cuts = sorted({0, spans.steps, *(min(e[0], spans.steps) for e in events), *burst_steps,
                   *(k + 1 for k in burst_steps)})
    segment_of_step = np.searchsorted(np.array(cuts), np.arange(spans.steps), side="right") - 1
    segments = len(cuts) - 1
    segment_base = np.full(segments, -_INF)
    np.maximum.at(segment_base, segment_of_step, spans.base / MEMORY_UNIT)
    by_segment: dict[int, list[tuple[int, float]]] = {}
    for step, col, w in events:
        if step < spans.steps:
            by_segment.setdefault(int(segment_of_step[step]), []).append((col, w))
    M = lambda g: 2 * n + g  # noqa: E731 - column of M_g
    for g in range(segments):  # M_g - M_{g-1} - (interval starts and ends in g) = 0
        entries = [(M(g), 1.0)] + [(col, -w) for col, w in by_segment.get(g, [])]
        if g:
            entries.append((M(g - 1), -1.0))
        rows.add(entries, 0.0, 0.0, unique=False)
    T = lambda b: 2 * n + segments + b  # noqa: E731 - column of T_b
    burst_rows: list[tuple[int, int]] = []
    for b, k in enumerate(burst_steps):
        for col, w in bursts[k]:  # T_b >= 2 w_v r_v (input and output of the burst's largest step)
            rows.add([(T(b), 1.0), (col, -2.0 * w)], 0.0, _INF)
        g = int(segment_of_step[k])
        burst_rows.append((len(rows.lower), g))
        rows.add([(M(g), 1.0), (T(b), 1.0)], -_INF, _INF)  # <= B - base_g, set at solve time

    total_bytes = max(sum(spans.weight.values()), 1)
    eps = SAVED_BYTES_TIE_BREAK * max(t.max(initial=0.0), 1e-12) / total_bytes
    w_saved = np.zeros(n)
    for i, w in spans.weight.items():
        if i in variable_of:
            w_saved[variable_of[i]] += w
    extra = segments + len(burst_steps)
    c = np.concatenate([eps * w_saved, t, np.zeros(extra)]) / TIME_UNIT
    integrality = np.concatenate([np.ones(2 * n), np.zeros(extra)])
    lower = np.concatenate([lower, np.full(segments, -_INF), np.zeros(len(burst_steps))])
    upper = np.concatenate([upper, np.full(extra, _INF)])
    return Formulation(variable_of, n, c, integrality, lower, upper, rows, segment_base, M(0), burst_rows)


def _memory_events(spans: Intervals, variable_of: dict[int, int], s, r
                   ) -> tuple[list[tuple[int, int, float]], dict[int, list[tuple[int, float]]]]:
    """Interval starts (+MiB at a step) and ends (-MiB after it) per column, and the recompute bursts: values
    recomputed and consumed within one step, by step."""
    events: list[tuple[int, int, float]] = []
    bursts: dict[int, list[tuple[int, float]]] = {}
    for i, nbytes in spans.weight.items():
        if i not in variable_of:
            continue
        w = nbytes / MEMORY_UNIT
        v = variable_of[i]
        stop = spans.end[i] + 1
        if spans.saved_from[i] < stop:
            events.append((spans.saved_from[i], s(v), w))
            events.append((stop, s(v), -w))
        recompute_start = max(spans.first[i], spans.backward_start)
        if recompute_start == stop - 1:
            bursts.setdefault(recompute_start, []).append((r(v), w))
        elif recompute_start < stop:
            events.append((recompute_start, r(v), w))
            events.append((stop, r(v), -w))
    return events, bursts


def decode(costs: GraphCosts, formulation: Formulation, x: np.ndarray) -> set[int]:
    """The saved set of a MILP solution (made valid: pinned values reached by recomputation are saved)."""
    saved = {i for i, v in formulation.variable_of.items() if x[v] > 0.5}
    saved |= {i for i in costs.frontier if i in costs.primals}
    return costs.make_valid(saved)


# --- the search ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Candidate:
    """A plan the search found (or an incumbent it was compared with)."""

    saved: set[int]
    estimate: MemoryEstimate
    seconds: float  # predicted recompute time
    gap: float | None  # HiGHS' relative MIP gap of the solve that found it
    status: str
    source: str  # "milp", "milp+repair", "+polish", or the incumbent's name
    fill: str | None = None  # the interval fill of the round that found it

    def beats(self, other: "Candidate | None") -> bool:
        return other is None or self.seconds < other.seconds


class RoundSearch:
    """Rounds of intervals -> formulate -> solve -> simulate (-> repair), each re-linearized around the best
    candidate so far (or the last plan), until the references are exhausted, a plan repeats while fitting, or
    the rounds' time is up."""

    def __init__(self, costs: GraphCosts, budget: int, *, tie_blocks: bool, lean: set[int], rounds_deadline: float,
                 repair: int, relax: float):
        self.costs, self.budget, self.tie_blocks = costs, budget, tie_blocks
        self.rounds_deadline, self.repair, self.relax = rounds_deadline, repair, relax
        # First intervals, while time allows: those of layer checkpointing, unfilled (only what checkpointing
        # recomputes is a decision: a small MILP) and filled (every value a decision: deeper recomputation),
        # then those of the fastest plan, filled and not. Which admits the cheapest plan depends on the budget.
        fastest = set(costs.save_all)
        self.pending: list[tuple[set[int], str | None]] = [
            (lean, None), (lean, "needed-users"), (lean, "all-users"),
            (fastest, "needed-users"), (fastest, "all-users"), (fastest, None)]
        self.used: set[tuple[frozenset[int], str | None]] = set()  # (reference, fill) of the rounds so far
        self.target = float(budget)  # the MILP's budget (loosened or tightened around the true one)
        self.best: Candidate | None = None
        self.rounds = 0
        self.status, self.gap = "not solved", None
        self.formulation: Formulation | None = None
        self.milp_seconds = 0.0
        self.trace: list[tuple] = []  # (round, target, simulated peak, recompute seconds, round seconds)
        self.current: tuple[set[int], str | None] | None = None  # the round's (reference, fill)

    def run(self, max_rounds: int) -> Candidate | None:
        reference, fill = self.pending.pop(0)
        round_seconds = 0.0
        for self.rounds in range(1, max_rounds + 1):
            round_started = time.perf_counter()
            if self.rounds_deadline - round_started <= (min(round_seconds, 1.0) if self.best is not None else 0.0):
                break  # too little time for another round (its MILP gets most of what is left)
            result = self._solve(reference, fill)
            if result is None or result.x is None:
                self.status = "infeasible" if result is None or result.status == 2 else str(result.message)
                self.trace.append((self.rounds, int(self.target), None, None,
                                   round(time.perf_counter() - round_started, 2)))
                following = self._after_no_solution()
            else:
                saved, peak = self._consider(result, fill, round_started)
                round_seconds = time.perf_counter() - round_started
                following = self._after_solution(saved, peak, fill)
            if following is None:
                break
            reference, fill = following
        return self.best

    def _solve(self, reference: set[int], fill: str | None):
        self.current = (reference, fill)
        self.used.add((frozenset(reference), fill))
        self.formulation = formulate(self.costs, intervals(self.costs, reference, fill=fill),
                                     tie_blocks=self.tie_blocks)
        # a round may use most of the time left, up to ROUND_SECONDS (HiGHS stops early once optimal)
        started = time.perf_counter()
        limit = min(max((self.rounds_deadline - started) * ROUND_TIME_SHARE, MIN_ROUND_SECONDS), ROUND_SECONDS)
        result = self.formulation.solve(self.target, limit)
        self.milp_seconds += time.perf_counter() - started
        return result

    def _consider(self, result, fill: str | None, round_started: float) -> tuple[set[int], int]:
        """Simulate the round's plan; keep it (or its repair) if it fits and beats the best."""
        costs, budget = self.costs, self.budget
        saved = decode(costs, self.formulation, result.x)
        simulated = costs.simulate(saved)
        peak = int(simulated.peak_bytes_hint)
        self.status = "optimal" if result.status == 0 else "time limit"
        self.gap = getattr(result, "mip_gap", None)
        plan = Candidate(saved, simulated, costs.recompute_seconds(saved), self.gap, self.status, "milp", fill)
        self.trace.append((self.rounds, int(self.target), peak, plan.seconds,
                           round(time.perf_counter() - round_started, 2)))
        if peak <= budget and plan.beats(self.best):
            self.best = plan
        elif peak > budget and plan.beats(self.best):
            self._repair(plan)
        return saved, peak

    def _repair(self, plan: Candidate) -> None:
        """Evict what is alive at the simulated peak, cheapest per byte first, until the plan fits."""
        from memgraph.cost_model.solvers.greedy import evict_until_fits

        saved, estimate, _ = evict_until_fits(self.costs, self.budget, plan.saved, max_rounds=self.repair,
                                              deadline=self.rounds_deadline)
        repaired = Candidate(saved, estimate, self.costs.recompute_seconds(saved), plan.gap, plan.status,
                             "milp+repair", plan.fill)
        if estimate.peak_bytes_hint <= self.budget and repaired.beats(self.best):
            self.best = repaired

    def _after_no_solution(self) -> tuple[set[int], str | None] | None:
        if self.pending:
            return self.pending.pop(0)  # the intervals of another plan may admit this budget
        best = self.best
        if best is not None and (frozenset(best.saved), best.fill) not in self.used:
            return best.saved, best.fill  # re-linearize around the best plan
        if best is None and self.target <= self.budget:
            self.target = self.budget * (1 + self.relax)  # the interval model overcounts: solve looser, repair
            return self.current  # the same intervals again, at the looser target
        return None

    def _after_solution(self, saved: set[int], peak: int, fill: str | None) -> tuple[set[int], str | None] | None:
        if self.pending:
            return self.pending.pop(0)
        # next intervals: those of the best plan, else of this one (a plan's own users saved)
        options = ([self.best.saved] if self.best is not None else []) + [saved]
        next_fill = self.best.fill if self.best is not None else fill
        following = next((o for o in options if (frozenset(o), next_fill) not in self.used), None)
        if following is None:
            if peak <= self.budget:
                return None
            self.target -= peak - self.budget  # the interval model undercounts this plan: tighten, solve again
            following = saved
        return following, next_fill


def polish(costs: GraphCosts, budget: int, best: Candidate, *, max_simulations: int, deadline: float) -> Candidate:
    """The interval model is conservative: re-save recomputed values while the simulated peak still fits."""
    from memgraph.cost_model.solvers.greedy import fill_up

    saved, estimate = fill_up(costs, budget, set(best.saved), best.estimate, max_simulations=max_simulations,
                              deadline=deadline)
    polished = dataclasses.replace(best, saved=saved, estimate=estimate, seconds=costs.recompute_seconds(saved),
                                   source=best.source + "+polish")
    return polished if polished.beats(best) else best


def with_incumbents(costs: GraphCosts, budget: int, best: Candidate | None, lean: set[int], *, status: str,
                    deadline: float) -> Candidate | None:
    """Heuristic incumbents, as MILP solvers keep them: never answer worse than layer checkpointing, greedy
    or (on graphs small enough to partition quickly) torch's knapsack."""
    incumbents = [("checkpoint", lean)]
    small = len(costs.forward) <= TIE_BLOCKS_ABOVE
    if best is None or small:
        from memgraph.cost_model.solvers.greedy import greedy_saved

        incumbents.append(("greedy", greedy_saved(costs, budget,
                                                  time_limit=max(deadline - time.perf_counter(), 1.0))[0]))
    if small:
        from memgraph.cost_model.solvers.torch_budget import torch_saved

        incumbents += [(f"torch-budget@{f}", torch_saved(costs, f)) for f in TORCH_INCUMBENTS]
    for name, saved in incumbents:
        seconds = costs.recompute_seconds(saved)
        if best is not None and seconds >= best.seconds:
            continue
        simulated = costs.simulate(saved)
        if simulated.peak_bytes_hint <= budget:
            best = Candidate(saved, simulated, seconds, None, status, name)
    return best


@register("ilp", uses_budget=True)
@with_offload
def ilp(graph: TrainingGraph, costs: GraphCosts | None = None, budget: int | None = None, *,
        time_limit: float = 6.0, tie_blocks: bool | None = None, max_rounds: int = 10, polish_simulations: int = 16,
        repair: int = 4, relax: float = 0.03, **_: Any) -> Plan:
    """Minimum predicted recompute time under the predicted-peak budget (MILP, scipy/HiGHS)."""
    started = time.perf_counter()
    costs = costs or GraphCosts(graph)
    if budget is None:
        return costs.fastest_plan("ilp")
    fastest = costs.simulate(costs.save_all)
    if fastest.peak_bytes_hint <= budget:
        return costs.plan("ilp", costs.save_all, budget, estimate=fastest, gap=0.0, status="optimal",
                          reason="the fastest plan fits")
    if tie_blocks is None:
        tie_blocks = len(costs.forward) > TIE_BLOCKS_ABOVE
    from memgraph.cost_model.solvers.checkpoint import checkpoint_saved

    lean = checkpoint_saved(costs)[0]
    deadline = started + time_limit
    # the last POLISH_SHARE of the time is the polish's: the rounds' best plan is often a little under the
    # budget (the interval model overcounts), and re-saving what still fits is cheap recompute time won
    search = RoundSearch(costs, budget, tie_blocks=tie_blocks, lean=lean,
                         rounds_deadline=started + time_limit * (1 - POLISH_SHARE), repair=repair, relax=relax)
    best = search.run(max_rounds)
    if best is not None:
        best = polish(costs, budget, best, max_simulations=polish_simulations, deadline=deadline)
    best = with_incumbents(costs, budget, best, lean, status=search.status, deadline=deadline)
    if best is None:
        raise costs.infeasible("ilp", budget)
    formulation = search.formulation
    details = {"status": best.status, "source": best.source, "rounds": search.rounds,
               "milp_s": round(search.milp_seconds, 3), "tied_blocks": bool(tie_blocks),
               "binaries": 2 * formulation.count, "segments": len(formulation.segment_base), "trace": search.trace}
    gap = best.gap
    return costs.plan("ilp", best.saved, budget, estimate=best.estimate,
                      gap=None if gap is None or np.isnan(gap) else max(float(gap), 0.0), **details)
