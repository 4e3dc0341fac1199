"""Recompute solvers, registered by name.

A solver is a function ``(graph: TrainingGraph, costs: GraphCosts | None, budget: int | None, **kw) -> Plan``:
given the joint graph, the cost model's view of it (``memgraph.cost_model.GraphCosts``; None: build it with
``graph_costs(graph)``) and a peak-memory budget in bytes (None = the fastest plan), it chooses which forward
values backward keeps; everything else backward needs is recomputed from those. ``costs.plan(name, saved,
budget)`` turns the chosen saved set into the ``Plan``, with the one predicted peak and recompute time of the
cost model, and raises ``memgraph.errors.InfeasibleBudgetError`` (naming the smallest predicted-feasible peak
and what dominates it) when the plan does not fit. ``graph_costs.py``'s docstring shows a whole solver.

Add one: a file in this folder with the function, and one line in ``BUILTIN`` below (or, outside memgraph,
the ``register`` decorator)::

    @solvers.register("mine", uses_budget=True)
    def mine(graph, costs, budget, **kw): ...

and select it with ``options={"solver": "mine"}``. Built-in solvers:

* ``none``, ``mincut`` (``torch_baselines``): torch's default and min-cut partitions;
* ``checkpoint``: layer-boundary checkpointing, the repeated blocks found from graph structure;
* ``greedy``: evict what is alive at the predicted peak by bytes per recompute-second (+ a bottom-up pass);
* ``ilp``: the cheapest recomputation under the predicted-peak budget, a MILP solved by scipy/HiGHS;
* ``torch-budget``: torch's ``activation_memory_budget`` knapsack, its fraction bisected to the byte budget;
* ``offload-layers`` (``offload``): Unsloth's recipe, layer checkpointing with each layer's input offloaded.

``greedy`` and ``ilp`` also weigh offloading a saved value to host memory against recomputing it
(``offload.with_offload``) where the cost model allows offload (``GraphCosts.offload_budget``).

A solver must never recompute random, impure, mutating or collective ops: ``costs.make_valid`` turns any
saved set into one that keeps them. Names are known without importing the solvers (``Options`` validates a
name without loading scipy); a solver's module is imported the first time it is asked for.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

__all__ = ["register", "get", "available", "uses_budget", "SolverEntry", "BUILTIN"]


@dataclasses.dataclass(frozen=True)
class SolverEntry:
    name: str
    function: Callable
    uses_budget: bool
    description: str


# name -> (module that registers it on import, whether it plans under memory_budget)
BUILTIN: dict[str, tuple[str, bool]] = {
    "none": ("memgraph.cost_model.solvers.torch_baselines", False),
    "mincut": ("memgraph.cost_model.solvers.torch_baselines", False),
    "checkpoint": ("memgraph.cost_model.solvers.checkpoint", True),
    "greedy": ("memgraph.cost_model.solvers.greedy", True),
    "ilp": ("memgraph.cost_model.solvers.ilp", True),
    "torch-budget": ("memgraph.cost_model.solvers.torch_budget", True),
    "offload-layers": ("memgraph.cost_model.solvers.offload", True),
}
_REGISTRY: dict[str, SolverEntry] = {}


def register(name: str, *, uses_budget: bool = False, replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering a solver under ``name``; ``uses_budget`` says whether it honours memory_budget."""

    def decorate(function: Callable) -> Callable:
        if name in _REGISTRY and not replace and _REGISTRY[name].function is not function:
            raise ValueError(f"a solver named {name!r} is already registered; pass replace=True to override it")
        if name in BUILTIN and BUILTIN[name][1] != uses_budget:
            raise ValueError(f"solver {name!r}: uses_budget={uses_budget} contradicts its BUILTIN entry")
        doc = (function.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = SolverEntry(name, function, uses_budget, doc[0] if doc else "")
        return function

    return decorate


def available() -> list[str]:
    """Every solver name, built-in (not imported) and registered."""
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def uses_budget(name: str) -> bool:
    """Whether the named solver plans under memory_budget (without importing a built-in one)."""
    if name in _REGISTRY:
        return _REGISTRY[name].uses_budget
    if name in BUILTIN:
        return BUILTIN[name][1]
    raise ValueError(f"no solver named {name!r}; registered solvers are {available()}")


def get(name: str) -> SolverEntry:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name][0])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no solver named {name!r}; registered solvers are {available()}") from None
