"""What every recompute solver shares: the graph seen as a save-or-recompute problem, validity of saved sets,
policies (which ops may never be recomputed), repeated-block detection, and turning a saved set into a Plan.

Vocabulary (the same as JAX's remat policies, over the AOTAutograd joint graph):

* a *saved set* is the set of forward values (and primals) the forward hands to backward;
* backward *recomputes* every forward value it needs that is not saved, from saved values only;
* a saved set is *valid* when that recomputation never has to run a primal (inputs cannot be recomputed), a
  random op (dropout would draw a fresh mask), an impure, mutating or collective op, or an op that is not
  bitwise deterministic — those are *pinned*: if backward needs them, they are saved.

A solver is a composition of small functions from this module::

    problem = Problem.of(graph, estimate)
    saved = problem.make_valid(problem.frontier - set(evicted))
    return problem.plan("mine", saved, budget)
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx

from memgraph.errors import InfeasibleBudgetError
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan

__all__ = ["Problem", "pin_reason", "Blocks", "find_blocks", "gib", "EPS_SECONDS"]

EPS_SECONDS = 1e-12  # recompute time below which an op counts as free (views, getitem)


def gib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.3f} GiB"


# --- policies: ops that backward must never run again ---------------------------------------------------------
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_dtensor", "c10d")


def pin_reason(node: fx.Node) -> str | None:
    """Why ``node`` must not be recomputed (so it is saved if backward needs it), or None if it may be."""
    if node.op == "placeholder":
        return "input"
    if node.op != "call_function":
        return f"{node.op} node"
    target = node.target
    if target is operator.getitem:
        parent = node.args[0]
        return pin_reason(parent) if isinstance(parent, fx.Node) else None
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "higher-order op"
    if _is_impure(node):
        return "impure (side effects)"
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace in _COLLECTIVE_NAMESPACES:
            return "collective"
        tags = target.tags
        if torch.Tag.nondeterministic_seeded in tags and not _draws_nothing(node):
            return "random (recomputing would draw a fresh mask)"
        if torch.Tag.nondeterministic_bitwise in tags:
            return "not bitwise deterministic"
        if target._schema.is_mutable:
            return "mutates an input"
    return None


def _is_impure(node: fx.Node) -> bool:
    """Side effects other than drawing random numbers (random ops are judged by ``_draws_nothing``)."""
    try:
        return node.is_impure(impure_random=False)
    except TypeError:  # torch without the keyword does not count random ops as impure
        return node.is_impure()


def _draws_nothing(node: fx.Node) -> bool:
    """A seeded op called with dropout probability 0 (or train=False) is deterministic (SDPA, dropout)."""
    schema = node.target._schema
    values = dict(zip((a.name for a in schema.arguments), node.args))
    values.update(node.kwargs)
    for name in ("dropout_p", "p"):
        if name in values and isinstance(values[name], (int, float)) and values[name] == 0:
            return True
    return values.get("train", None) is False


def _is_multi_output(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, (tuple, list))


# --- the problem ---------------------------------------------------------------------------------------------
# The last few problems, so that solvers called in turn on one graph (compare, ILP incumbents) share the
# analysis and the memoized simulations; bounded so long sessions do not keep old graphs alive.
_PROBLEMS: dict[tuple[int, int], tuple[Any, Any, "Problem"]] = {}
_MAX_PROBLEMS = 4


@dataclasses.dataclass
class Problem:
    """A training graph as a save-or-recompute problem, in the index space of the cost model's ``names``.

    costs: the cost model's ``GraphCosts`` (``simulate``, ``seconds_array``, ``output_bytes`` ...).
    forward: indices of forward nodes and primals, graph order. backward: indices of backward nodes, in order.
    inputs[i]: indices of node i's inputs. frontier: forward values and primals backward nodes use directly.
    pinned: forward nodes and primals that may not be recomputed (reason per index).
    unsaveable: forward nodes whose value cannot be handed over (tuples of a multi-output op).
    """

    graph: TrainingGraph
    costs: Any
    forward: list[int]
    backward: list[int]
    inputs: list[tuple[int, ...]]
    users: list[tuple[int, ...]]
    frontier: frozenset[int]
    pinned: dict[int, str]
    unsaveable: frozenset[int]
    views: frozenset[int]
    weight: np.ndarray  # bytes that saving or recomputing a node adds (0 for views and inputs)
    seconds: np.ndarray

    @classmethod
    def of(cls, graph: TrainingGraph, estimate: Any = None) -> "Problem":
        """The problem of ``graph`` (cached per joint graph and cost model)."""
        if estimate is None:
            from memgraph.cost_model import estimate_training_graph

            estimate = estimate_training_graph(graph)
        key = (id(graph), id(estimate))
        cached = _PROBLEMS.get(key)
        if cached is not None and cached[0] is graph and cached[1] is estimate:
            return cached[2]
        problem = cls._build(graph, estimate)
        _PROBLEMS[key] = (graph, estimate, problem)  # holding both keeps their ids from being reused
        while len(_PROBLEMS) > _MAX_PROBLEMS:
            _PROBLEMS.pop(next(iter(_PROBLEMS)))
        return problem

    @classmethod
    def _build(cls, graph: TrainingGraph, costs: Any) -> "Problem":
        index = costs.index
        nodes = costs.nodes
        inputs = [tuple(dict.fromkeys(index[a.name] for a in n.all_input_nodes if a.name in index)) for n in nodes]
        users: list[list[int]] = [[] for _ in nodes]
        for i, ins in enumerate(inputs):
            for j in ins:
                users[j].append(i)
        phase = [costs.phase(n.name) for n in nodes]
        primals = {index[p.name] for p in graph.primals}
        forward = [i for i, p in enumerate(phase) if p == "forward" or i in primals]
        # getitem of a forward multi-output op that only backward reads (SDPA's logsumexp) is a forward value:
        # the tuple cannot be handed over, the item can.
        tuples = {i for i in forward if i not in primals and _is_multi_output(nodes[i])}
        promoted = {i for i, p in enumerate(phase) if p == "backward" and nodes[i].target is operator.getitem
                    and inputs[i] and inputs[i][0] in tuples}
        forward = sorted(set(forward) | promoted)
        forward_set = set(forward)
        backward = [i for i, p in enumerate(phase) if p == "backward" and i not in promoted]
        frontier = frozenset(j for i in backward for j in inputs[i] if j in forward_set)
        pinned = {i: reason for i in forward if (reason := pin_reason(nodes[i])) is not None}
        unsaveable = frozenset(tuples)
        views = frozenset(i for i in forward if i not in primals and i not in unsaveable
                          and costs.allocated_bytes(costs.names[i]) == 0 and nodes[i].target is not operator.getitem)
        weight = np.zeros(len(nodes), dtype=np.int64)
        for i in forward:
            if i in primals or i in unsaveable or i in views:
                continue
            weight[i] = costs.output_bytes(costs.names[i])
        seconds = np.asarray(costs.seconds_array, dtype=float).copy()
        for i in views:
            seconds[i] = 0.0
        return cls(graph, costs, forward, backward, inputs, [tuple(u) for u in users], frontier, pinned,
                   unsaveable, views, weight, seconds)

    # --- names ----------------------------------------------------------------------------------------
    def name(self, i: int) -> str:
        return self.costs.names[i]

    def names(self, indices: Iterable[int]) -> list[str]:
        return [self.costs.names[i] for i in sorted(indices)]

    def indices(self, names: Iterable[str]) -> set[int]:
        return {self.costs.index[n] for n in names}

    @functools.cached_property
    def forward_set(self) -> frozenset[int]:
        return frozenset(self.forward)

    @functools.cached_property
    def primals(self) -> frozenset[int]:
        return frozenset(self.costs.index[p.name] for p in self.graph.primals)

    def recomputable(self, i: int) -> bool:
        return i not in self.pinned

    # --- saved sets -----------------------------------------------------------------------------------
    def recomputed(self, saved: Iterable[int]) -> set[int]:
        """Forward nodes backward computes again when ``saved`` is kept: the ancestors of the frontier,
        stopping at saved values."""
        saved = set(saved)
        seen: set[int] = set()
        stack = [i for i in self.frontier if i not in saved]
        while stack:
            i = stack.pop()
            if i in seen or i in saved:
                continue
            seen.add(i)
            stack.extend(j for j in self.inputs[i] if j in self.forward_set)
        return seen

    def make_valid(self, saved: Iterable[int]) -> set[int]:
        """The smallest superset of ``saved`` whose recomputation runs no pinned node: every pinned node the
        recomputation would reach is saved instead; unsaveable values (tuples) are never saved."""
        saved = {i for i in saved if i not in self.unsaveable}
        while True:
            recomputed = self.recomputed(saved)
            blocked = {i for i in recomputed if i in self.pinned}
            if not blocked:
                return self.needed_for(saved)
            for i in blocked:
                if i in self.unsaveable:  # a pinned multi-output op: keep the outputs recomputation reads
                    saved.update(u for u in self.users[i] if u in recomputed and u not in self.unsaveable)
                else:
                    saved.add(i)

    def needed_for(self, saved: set[int]) -> set[int]:
        """The saved values backward actually reads (directly or to recompute): the rest is dead weight."""
        reached: set[int] = set()
        stack = list(self.frontier)
        while stack:
            i = stack.pop()
            if i in reached:
                continue
            reached.add(i)
            if i not in saved:
                stack.extend(j for j in self.inputs[i] if j in self.forward_set)
        return {i for i in reached if i in saved}

    def is_valid(self, saved: Iterable[int]) -> bool:
        saved = set(saved)
        return not any(i in self.pinned for i in self.recomputed(saved)) and not (saved & self.unsaveable)

    @functools.cached_property
    def save_all(self) -> frozenset[int]:
        """Save every forward value backward uses: no recomputation (the fastest plan)."""
        return frozenset(self.make_valid(self.frontier))

    @functools.cached_property
    def save_least(self) -> frozenset[int]:
        """Save only what may not be recomputed (pinned nodes backward reaches): the most recomputation."""
        return frozenset(self.make_valid(set()))

    def recompute_seconds(self, saved: Iterable[int]) -> float:
        return float(sum(self.seconds[i] for i in self.recomputed(saved)))

    # --- cost model -----------------------------------------------------------------------------------
    def simulate(self, saved: Iterable[int]):
        """The cost model's memory estimate of the step when exactly ``saved`` is kept (memoized: solvers
        revisit the same sets, and one simulation of an 8B graph takes about half a second)."""
        key = frozenset(saved)
        cache = self.__dict__.setdefault("_simulations", {})
        if key not in cache:
            if len(cache) >= 256:
                cache.pop(next(iter(cache)))
            cache[key] = self.costs.simulate(self.names(key))
        return cache[key]

    def peak(self, saved: Iterable[int]) -> int:
        return int(self.simulate(saved).peak_bytes_hint)

    # --- plans ----------------------------------------------------------------------------------------
    def plan(self, solver: str, saved: Iterable[int], budget: int | None, *, estimate=None, **details: Any) -> Plan:
        """A Plan for ``saved`` with the cost model's predicted peak and recompute time.

        Raises InfeasibleBudgetError when the predicted peak exceeds ``budget``."""
        saved = set(saved)
        if not self.is_valid(saved):
            raise RuntimeError(f"solver {solver!r} produced a saved set from which backward would rerun a "
                               "pinned (random, impure, mutating or input) node; pass it through make_valid")
        estimate = estimate or self.simulate(saved)
        peak = int(estimate.peak_bytes_hint)
        recomputed = self.recomputed(saved)
        plan = Plan(solver=solver, saved=self.names(saved), recomputed=self.names(recomputed), peak_bytes=peak,
                    recompute_seconds=float(sum(self.seconds[i] for i in recomputed)), budget_bytes=budget,
                    details={k: v for k, v in details.items() if k != "gap"})
        if "gap" in details:
            plan.optimality_gap = details["gap"]
        if budget is not None and peak > budget:
            raise self.infeasible(solver, budget, best=(peak, estimate))
        return plan

    @functools.cached_property
    def least_peak(self) -> tuple[int, Any]:
        """(peak, estimate) of the lowest-memory plan the built-in heuristics find: the bound behind
        InfeasibleBudgetError's "smallest predicted-feasible peak"."""
        candidates = [self.save_least]
        blocks = find_blocks(self)
        if blocks is not None:
            candidates.append(frozenset(blocks.checkpoint_saved(self)))
        best = None
        for saved in candidates:
            estimate = self.simulate(saved)
            if best is None or estimate.peak_bytes_hint < best[1].peak_bytes_hint:
                best = (int(estimate.peak_bytes_hint), estimate)
        return best

    def infeasible(self, solver: str, budget: int, best: tuple[int, Any] | None = None) -> InfeasibleBudgetError:
        """The error for a budget no plan meets: the smallest predicted peak found and what dominates it.
        ``best``: (peak, estimate) of the solver's own lowest plan, if it has one."""
        least = self.least_peak
        own = ""
        if best is not None:
            own = f" (its lowest predicted peak is {gib(best[0])})"
            if best[0] < least[0]:
                least = best
        peak, estimate = least
        breakdown = {k: v for k, v in sorted(estimate.breakdown.items(), key=lambda kv: -kv[1]) if v > 0}
        parts = ", ".join(f"{k} {gib(v)}" for k, v in breakdown.items())
        largest = estimate.live_at_peak(3)
        biggest = "; largest live tensors: " + ", ".join(
            f"{r['node']} ({r['category']}, {gib(r['bytes'])})" for r in largest) if largest else ""
        return InfeasibleBudgetError(
            f"memory_budget {gib(budget)} ({budget} bytes) cannot be met by solver {solver!r}{own}: the smallest "
            f"predicted-feasible peak is {gib(peak)} ({peak} bytes), at {estimate.peak_node} in "
            f"{estimate.peak_phase}, made of {parts}{biggest}. Raise the budget to at least {peak} bytes, or "
            f"shrink what dominates (weights: quantize_ to nf4; logits: a chunked cross-entropy; shorter "
            f"sequences or smaller batches).")

    def fastest_plan(self, solver: str) -> Plan:
        return self.plan(solver, self.save_all, None, reason="no memory_budget: fastest plan (recompute nothing)")


# --- repeated blocks (transformer layers) from graph structure ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Blocks:
    """``count`` consecutive repeats of one block of ``period`` forward ops; ``bounds`` are positions in the
    forward op sequence ``ops`` (joint indices) where blocks start (last bound = end of the repeated run)."""

    ops: tuple[int, ...]
    period: int
    count: int
    bounds: tuple[int, ...]

    def block_of(self) -> dict[int, int]:
        """Joint index -> block number, for the ops inside the repeated run."""
        owner = {}
        for b, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            for position in range(lo, hi):
                owner[self.ops[position]] = b
        return owner

    def checkpoint_saved(self, problem: Problem) -> set[int]:
        """Layer-boundary checkpointing: recompute everything inside a block from the values that enter it
        (its input hidden state, shared inputs such as rotary tables, weights); save everything else."""
        block = self.block_of()
        saved: set[int] = set()
        seen: set[int] = set()
        stack = []
        for i in problem.frontier:
            inside = i in block and (i in problem.views or (problem.recomputable(i) and i not in problem.unsaveable))
            if inside:
                stack.append(i)
            else:
                saved.add(i)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            for j in problem.inputs[i]:
                if j not in problem.forward_set:
                    continue
                if block.get(j) == block[i] and (problem.recomputable(j) or j in problem.unsaveable):
                    stack.append(j)
                else:
                    saved.add(j)
        return problem.make_valid(saved)


def _signature(problem: Problem, i: int) -> str:
    node = problem.costs.nodes[i]
    value = node.meta.get("val")
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    dtype = getattr(value, "dtype", None)
    return f"{node.target}|{shape}|{dtype}"


def _repeats(seq: np.ndarray, min_period: int) -> tuple[int, int, int] | None:
    """(period, start, count) of the longest run of ``count >= 2`` identical consecutive blocks, or None."""
    best = None  # (coverage, period, start, count)
    for period in range(min_period, len(seq) // 2 + 1):
        equal = seq[:-period] == seq[period:]
        if equal.sum() < period:
            continue
        # runs of matches of length >= period: a run of length L starting at a gives L // period + 1 blocks
        padded = np.concatenate(([False], equal, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        for start, stop in zip(edges[::2], edges[1::2]):
            count = (stop - start) // period + 1
            if count >= 2 and (best is None or count * period > best[0]):
                best = (count * period, period, int(start), int(count))
    return None if best is None else best[1:]


def find_blocks(problem: Problem, *, min_period: int = 2) -> Blocks | None:
    """The decoder layers of a transformer, found from structure alone: the longest run of identical
    consecutive blocks of compute-heavy ops (matmuls, attention, custom kernels: each layer has its own, so
    common-subexpression elimination cannot merge them across layers, unlike the rotary or mask ops the
    first layer then computes for all). Each boundary between blocks is placed, between the last heavy op of
    one block and the first of the next, where the fewest bytes cross it (the residual stream); the first
    block starts as far before its first heavy op as the others do. None if nothing repeats."""
    cache = problem.__dict__.setdefault("_blocks", {})
    if min_period in cache:
        return cache[min_period]
    costs = problem.costs
    ops = [i for i in problem.forward if i not in problem.primals and costs.nodes[i].op == "call_function"]
    heavy = [k for k, i in enumerate(ops) if costs.kinds[i] in ("matmul", "custom")]
    codes: dict[str, int] = {}
    seq = np.array([codes.setdefault(_signature(problem, ops[k]), len(codes)) for k in heavy], dtype=np.int64)
    found = _repeats(seq, min_period)
    if found is None:
        cache[min_period] = None
        return None
    period, start, count = found
    crossing = _crossing_bytes(problem, ops)

    def cut(h: int) -> tuple[int, int]:
        """(bytes, position): the cheapest cut before heavy op number ``h`` and after heavy op ``h - 1``."""
        lo = heavy[h - 1] + 1 if h > 0 else 0
        hi = heavy[h] if h < len(heavy) else len(ops)
        position = lo + int(np.argmin(crossing[lo:hi + 1]))
        return int(crossing[position]), position

    heads = [start + k * period for k in range(count + 1)]
    positions = [cut(h)[1] for h in heads]
    # The first block's gap runs back into the prologue (embedding, rotary tables, where nothing crosses):
    # cut it as far before its first heavy op as the other blocks are cut before theirs.
    interior = list(zip(heads[1:-1], positions[1:-1])) or list(zip(heads[1:], positions[1:]))
    offsets = [heavy[h] - p for h, p in interior if h < len(heavy)]
    if offsets:
        offset = max(set(offsets), key=offsets.count)
        lo = heavy[heads[0] - 1] + 1 if heads[0] > 0 else 0
        positions[0] = max(lo, heavy[heads[0]] - offset)
    bounds = sorted(set(positions))
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    common = max(set(sizes), key=sizes.count) if sizes else 0
    blocks = Blocks(tuple(ops), common, len(bounds) - 1, tuple(bounds)) if len(bounds) >= 3 else None
    cache[min_period] = blocks
    return blocks


def _crossing_bytes(problem: Problem, ops: list[int]) -> np.ndarray:
    """crossing[p]: bytes of values made before forward op position p and used at or after it."""
    position = {i: p for p, i in enumerate(ops)}
    crossing = np.zeros(len(ops) + 1, dtype=np.int64)
    for p, i in enumerate(ops):
        last = max((position[u] for u in problem.users[i] if u in position), default=p)
        if last > p:
            crossing[p + 1:last + 1] += max(int(problem.costs.output_bytes(problem.name(i))), 1)
    return crossing
