"""Recompute solvers, registered by name.

A solver is a function ``(graph: TrainingGraph, estimate: MemoryEstimate | None, budget: int | None, **kw) ->
Plan``: given the joint graph, the cost model's estimate of it (None where the cost model is unavailable) and
a peak-memory budget in bytes (None = the fastest plan), it chooses which forward values backward keeps
(``Plan.saved``); everything else backward needs is recomputed from those.

Register your own::

    from memgraph.cost_model import solvers

    @solvers.register("mine", uses_budget=True)
    def mine(graph, estimate, budget, **kw):
        ...
        return Plan(solver="mine", saved=[...], recomputed=[...])

and select it with ``options={"solver": "mine"}``.

Built-in solvers (one module each; shared helpers in ``common``: the graph as a save-or-recompute
``Problem``, valid saved sets, pinned ops, repeated-block detection, plans and infeasibility errors):

* ``none``, ``mincut`` (``torch_baselines``): torch's default and min-cut partitions;
* ``checkpoint``: layer-boundary checkpointing, the repeated blocks found from graph structure;
* ``greedy``: evict what is alive at the predicted peak by bytes per recompute-second (+ a bottom-up pass);
* ``ilp``: the cheapest recomputation under the predicted-peak budget, a MILP solved by scipy/HiGHS;
* ``torch-budget``: torch's ``activation_memory_budget`` knapsack, its fraction bisected to the byte budget.

A budgeted solver returns a Plan whose predicted peak (``plan.peak_bytes``, the cost model's simulation of
the partitioned step) is within the budget, or raises ``memgraph.errors.InfeasibleBudgetError`` naming the
smallest predicted-feasible peak and what dominates it. With ``budget=None`` it returns its fastest plan.
A solver must never recompute random, impure, mutating or collective ops: ``common.Problem.make_valid``
turns any saved set into one that keeps them.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

__all__ = ["register", "get", "available", "SolverEntry"]


@dataclasses.dataclass(frozen=True)
class SolverEntry:
    name: str
    function: Callable
    uses_budget: bool
    description: str


_REGISTRY: dict[str, SolverEntry] = {}
# Built-in solvers live in these modules; they register themselves on import.
_BUILTIN_MODULES = (
    "memgraph.cost_model.solvers.torch_baselines",
    "memgraph.cost_model.solvers.checkpoint",
    "memgraph.cost_model.solvers.greedy",
    "memgraph.cost_model.solvers.ilp",
    "memgraph.cost_model.solvers.torch_budget",
)


def register(name: str, *, uses_budget: bool = False, replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering a solver under ``name``; ``uses_budget`` says whether it honours memory_budget."""

    def decorate(function: Callable) -> Callable:
        if name in _REGISTRY and not replace and _REGISTRY[name].function is not function:
            raise ValueError(f"a solver named {name!r} is already registered; pass replace=True to override it")
        doc = (function.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = SolverEntry(name, function, uses_budget, doc[0] if doc else "")
        return function

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)


def get(name: str) -> SolverEntry:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no solver named {name!r}; registered solvers are {list(_REGISTRY)}") from None
