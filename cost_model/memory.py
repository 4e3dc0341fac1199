"""Liveness simulation: bytes live after every node of a training step, by category, and the step's peak.

What "step peak" means (the tracker in ``tracker.py`` measures the same thing):

* One training step = the forward graph, then the backward graph, then gradient accumulation into ``.grad``.
* Primals (parameters, buffers, ``input_ids``/``labels``, activations from an earlier graph) are resident for
  the whole step: the caller holds them.
* Every node's fresh output storages are allocated when it runs, while its inputs are still alive; a node's
  peak is the bytes live just before it plus what it allocates. Internal scratch of a kernel is not counted.
* A storage is freed after the last node that uses any tensor on it (views keep their base alive), unless it
  is kept: a primal, a forward output the user holds (``outputs_alive``), a saved activation (until its last
  use in backward), or a gradient.
* Backward starts by allocating its tangents: the ones of ``loss.backward()`` and zeros that autograd
  materializes for outputs nobody differentiates (HF's logits: a full logits-sized buffer).
* Saved activations are freed at their last use in backward (torch's runtime wrapper clears ``ctx`` and hands
  the backward a boxed list that Inductor, and ``fx.Interpreter.boxed_run``, clear as they go). A backward
  that does not free its boxed inputs (``make_boxed_func(gm.forward)``) keeps them to its end:
  ``backward_frees_inputs=False``.
* Gradients are alive at the end. AccumulateGrad steals a gradient whose strides match its parameter and
  clones one that does not (e.g. ``t(mm)``): that clone is one extra gradient's bytes, briefly.
* Every allocation is rounded up to ``granularity`` bytes (CUDA's caching allocator: 512).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import sympy
import torch

from memgraph.cost_model import symbolic
from memgraph.options import CODEGENS
from memgraph.cost_model.symbolic import Size, Terms, as_size
from memgraph.cost_model.values import NodeValue

WEIGHTS, INPUTS, SAVED, OUTPUTS, GRADS, TEMPORARIES = "weights", "inputs", "saved", "outputs", "grads", "temporaries"
CATEGORIES = (WEIGHTS, INPUTS, SAVED, OUTPUTS, GRADS, TEMPORARIES)
_CATEGORY_INDEX = {c: i for i, c in enumerate(CATEGORIES)}
FORWARD, BACKWARD = "forward", "backward"


@dataclasses.dataclass(frozen=True)
class StepSemantics:
    """How the step runs; the defaults are torch.compile + AOTAutograd + Inductor on CUDA.

    outputs_alive: the user holds the forward outputs (``out = model(...)``) until backward ends.
    backward_frees_inputs: backward frees saved activations at their last use (Inductor; boxed interpreter).
    accumulate_grads: model AccumulateGrad's clone of gradients whose layout differs from their parameter's.
    granularity: allocation rounding in bytes (CUDA caching allocator: 512; 1 = exact storage bytes).
    codegen: what runs the graphs. "eager": every node allocates its outputs (an FX interpreter, eager
      kernels). "inductor": only the buffers Inductor's generated code allocates (fused values live inside
      kernels; pointwise kernels may write into a dying input), see ``inductor.py``.
    """

    outputs_alive: bool = True
    backward_frees_inputs: bool = True
    accumulate_grads: bool = True
    granularity: int = 512
    codegen: str = "eager"

    def __post_init__(self) -> None:
        if self.codegen not in CODEGENS:
            raise ValueError(f"codegen={self.codegen!r} is not supported; choose one of {list(CODEGENS)}")

    @property
    def fuses(self) -> bool:
        """Whether memory follows Inductor's generated code rather than one allocation per node."""
        return self.codegen == "inductor"


@dataclasses.dataclass(frozen=True)
class TimelinePoint:
    """Memory at one step of the simulation: ``live`` after it ran, ``during`` while it ran (inputs + outputs)."""

    index: int
    node: str
    phase: str
    during_bytes: int
    live_bytes: int
    by_category: dict[str, int]


class Program:
    """Storages and the steps that allocate and free them: what the sweep turns into a MemoryEstimate."""

    def __init__(self, granularity: int, hints: Mapping[sympy.Symbol, int]):
        self.granularity = granularity
        self.hints = dict(hints)
        self.sizes: list[Size] = []
        self.size_hints: list[int] = []
        self.categories: list[int] = []
        self.producers: list[str] = []
        self.steps: list[tuple[str, str, list[int], list[int]]] = []  # (name, phase, allocs, frees after)
        self.unknown_ops: dict[str, str] = {}

    def new_storage(self, nbytes: Size, category: str, producer: str) -> int:
        size = symbolic.rounded_allocation(nbytes, self.granularity)
        self.sizes.append(size)
        self.size_hints.append(symbolic.evaluate(size, self.hints))
        self.categories.append(_CATEGORY_INDEX[category])
        self.producers.append(producer)
        return len(self.sizes) - 1

    def set_category(self, storage: int, category: str) -> None:
        self.categories[storage] = _CATEGORY_INDEX[category]

    def step(self, name: str, phase: str, allocs: list[int], frees: list[int]) -> None:
        self.steps.append((name, phase, allocs, frees))

    def free_after_last_step(self, storages: list[int]) -> None:
        name, phase, allocs, frees = self.steps[-1]
        self.steps[-1] = (name, phase, allocs, frees + storages)


@dataclasses.dataclass
class PhaseResult:
    storages_of: dict[str, list[int | None]]  # node name -> storage of each of its outputs (None: no tensor)


def run_phase(program: Program, phase: str, nodes: Sequence[NodeValue], outputs: Sequence[str], *,
              given: Mapping[str, list[int | None]], resident: set[int], new_category: str = TEMPORARIES,
              output_categories: Mapping[str, str] | None = None, placeholders: Sequence[str] = (),
              frees_inputs: bool = True, held: Sequence[str] = ()) -> PhaseResult:
    """Simulate one graph: ``nodes`` in execution order (its placeholders first, no output node).

    given: storages of inputs that already exist (primals, saved values), by node name; other placeholders
    (tangents) are allocated before the first node. A node's fresh outputs are new storages; an alias
    output is the storage of the input it aliases. resident: storages this phase never frees. outputs:
    names the graph returns (kept alive after it); their fresh storages get ``output_categories[name]``
    (first listed wins), all others ``new_category``. With ``frees_inputs=False`` placeholders stay alive
    to the phase's end, as do the inputs named in ``held`` in any case.
    """
    storages_of: dict[str, list[int | None]] = {name: list(s) for name, s in given.items()}
    allocations: list[list[int]] = []
    new_storages: set[int] = set()
    for value in nodes:
        fresh: list[int] = []
        if value.name in given:
            storages_of[value.name] = list(given[value.name])
        else:
            resolved: list[int | None] = []
            for output in value.outputs:
                if output is None:
                    resolved.append(None)
                elif output.alias is not None:
                    source = storages_of.get(output.alias[0])
                    index = output.alias[1]
                    resolved.append(source[index] if source is not None and index < len(source) else None)
                else:
                    storage = program.new_storage(output.nbytes, new_category, value.name)
                    fresh.append(storage)
                    new_storages.add(storage)
                    resolved.append(storage)
            storages_of[value.name] = resolved
        allocations.append(fresh)
        if value.unknown:
            program.unknown_ops.setdefault(value.name, value.unknown)

    for name, category in (output_categories or {}).items():
        for storage in storages_of.get(name, ()):
            if storage is not None and storage in new_storages:
                program.set_category(storage, category)
                new_storages.discard(storage)

    def live(name: str) -> list[int]:
        return [s for s in storages_of.get(name, ()) if s is not None]

    keep = set(resident)
    for name in outputs:
        keep.update(live(name))
    held_inputs = {s for name in (placeholders if not frees_inputs else held) for s in live(name)}
    keep |= held_inputs
    last_use: dict[int, int] = {}
    for index, value in enumerate(nodes):
        for storage in live(value.name):
            last_use[storage] = index
        for name in value.inputs:
            for storage in live(name):
                last_use[storage] = index
    frees: list[list[int]] = [[] for _ in nodes]
    for storage, index in last_use.items():
        if storage not in keep:
            frees[index].append(storage)
    placeholder_set = set(placeholders)
    pending_allocs: list[int] = []
    pending_frees: list[int] = []
    for index, value in enumerate(nodes):
        if value.name in placeholder_set:
            # Inputs are no step of their own: fresh ones (tangents) are allocated before the first node runs.
            pending_allocs += allocations[index]
            pending_frees += frees[index]
            continue
        # An op's workspace lives while it runs: allocated with its outputs, freed when it returns.
        scratch = [program.new_storage(value.scratch, TEMPORARIES, value.name)] if value.scratch != 0 else []
        pending_allocs += allocations[index] + scratch
        pending_frees += frees[index] + scratch
        following = nodes[index + 1] if index + 1 < len(nodes) else None
        if value.fused is not None and following is not None and following.fused == value.fused:
            continue  # one fused kernel: every output is allocated before it runs, inputs freed after it
        program.step(value.name, phase, pending_allocs, pending_frees)
        pending_allocs, pending_frees = [], []
    if pending_allocs or pending_frees:
        program.step(f"{phase}_inputs", phase, pending_allocs, pending_frees)
    returned = {s for name in outputs for s in live(name)}
    program.free_after_last_step(sorted(held_inputs - set(resident) - returned))
    return PhaseResult(storages_of)


class MemoryEstimate:
    """Predicted memory of a step (or of any graph): peak, where it occurs, and the timeline by category.

    peak_bytes: int, or a sympy expression in the size symbols when shapes are dynamic.
    peak_bytes_hint: int always (the peak at the sizes the graph was traced with).
    peak_node / peak_phase / peak_index: where the (hinted) peak occurs.
    timeline: ``TimelinePoint`` per step (live bytes after the node, by category, and bytes during it).
    unknown_ops: {node name: why its memory is a guess}.
    step_seconds: roofline time of the step's nodes (``estimate_partitioned`` only; else None).
    """

    def __init__(self, program: Program, *, symbolic_peak: bool = True):
        self.program = program
        self.hints = dict(program.hints)
        self.unknown_ops = dict(program.unknown_ops)
        count = len(program.steps)
        self.names = [s[0] for s in program.steps]
        self.phases = [s[1] for s in program.steps]
        self.live = np.zeros((count, len(CATEGORIES)), dtype=np.int64)
        self.during = np.zeros(count, dtype=np.int64)
        self.during_by_category = np.zeros((count, len(CATEGORIES)), dtype=np.int64)
        self._symbolic = symbolic_peak and any(not isinstance(s, int) for s in program.sizes)
        self._candidates: list[Terms] = []
        self._sweep()
        steps = program.steps
        self._alloc_steps = np.array([k for k, st in enumerate(steps) for _ in st[2]], dtype=np.int64)
        self._alloc_storages = np.array([s for st in steps for s in st[2]], dtype=np.int64)
        self._free_steps = np.array([k for k, st in enumerate(steps) for _ in st[3]], dtype=np.int64)
        self._free_storages = np.array([s for st in steps for s in st[3]], dtype=np.int64)
        self.peak_index = int(np.argmax(self.during)) if count else 0
        self._peak_expr: Size | None = None
        self.step_seconds: float | None = None  # roofline time of the step, when the graphs were at hand

    def _sweep(self) -> None:
        program = self.program
        hints, categories = program.size_hints, program.categories
        live = np.zeros(len(CATEGORIES), dtype=np.int64)
        live_terms: Terms = {}
        terms_of = [symbolic.to_terms(s) for s in program.sizes] if self._symbolic else None
        for index, (_, _, allocs, frees) in enumerate(program.steps):
            for storage in allocs:
                live[categories[storage]] += hints[storage]
                if terms_of is not None:
                    symbolic.add_terms(live_terms, terms_of[storage])
            self.during_by_category[index] = live
            self.during[index] = live.sum()
            if terms_of is not None and allocs:
                self._candidates.append(dict(live_terms))
            for storage in frees:
                live[categories[storage]] -= hints[storage]
                if terms_of is not None:
                    symbolic.add_terms(live_terms, terms_of[storage], -1)
            self.live[index] = live

    # --- the peak -------------------------------------------------------------------------------------
    @property
    def peak_bytes_hint(self) -> int:
        return int(self.during[self.peak_index]) if len(self.during) else 0

    @property
    def peak_bytes(self) -> Size:
        if not self._symbolic:
            return self.peak_bytes_hint
        if self._peak_expr is None:
            self._peak_expr = symbolic.max_of(symbolic.upper_envelope(self._candidates, self.hints))
        return self._peak_expr

    @property
    def symbols(self) -> list[sympy.Symbol]:
        return sorted(self.hints, key=str)

    @property
    def peak_node(self) -> str | None:
        return self.names[self.peak_index] if self.names else None

    @property
    def peak_phase(self) -> str | None:
        return self.phases[self.peak_index] if self.phases else None

    @property
    def breakdown(self) -> dict[str, int]:
        """Bytes by category while the peak node runs."""
        if not self.names:
            return {c: 0 for c in CATEGORIES}
        return {c: int(v) for c, v in zip(CATEGORIES, self.during_by_category[self.peak_index])}

    def peak_at(self, **sizes: int) -> int:
        """The predicted peak with size symbols set by name (``peak_at(s0=4096)``; others at their hints).
        Exact: the whole timeline is re-evaluated at these sizes, allocator rounding included."""
        return int(self.during_at(self._resolve(sizes)).max(initial=0))

    def during_at(self, values: Mapping[sympy.Symbol, int]) -> np.ndarray:
        """Bytes live during every step at the given sizes (vectorized re-evaluation of the sweep)."""
        program = self.program
        if not self._symbolic:
            return self.during
        sizes = np.array([symbolic.evaluate(s, values) for s in program.sizes], dtype=np.int64) \
            if len(program.sizes) < 64 else self._sizes_at(values)
        count = len(program.steps)
        allocated = np.zeros(count, dtype=np.int64)
        freed = np.zeros(count, dtype=np.int64)
        np.add.at(allocated, self._alloc_steps, sizes[self._alloc_storages])
        np.add.at(freed, self._free_steps, sizes[self._free_storages])
        live_after = np.cumsum(allocated - freed)
        return live_after - (allocated - freed) + allocated

    def _sizes_at(self, values: Mapping[sympy.Symbol, int]) -> np.ndarray:
        cache = {}
        result = np.empty(len(self.program.sizes), dtype=np.int64)
        for i, size in enumerate(self.program.sizes):
            if isinstance(size, int):
                result[i] = size
            else:
                if size not in cache:
                    cache[size] = symbolic.evaluate(size, values)
                result[i] = cache[size]
        return result

    def _resolve(self, sizes: Mapping[Any, int]) -> dict[sympy.Symbol, int]:
        by_name = {str(s): s for s in self.hints}
        values = dict(self.hints)
        for name, value in sizes.items():
            symbol = by_name.get(str(name))
            if symbol is None:
                raise ValueError(f"no size symbol {name!r}; this estimate's symbols are {sorted(by_name)}")
            values[symbol] = int(value)
        return values

    def max_size(self, symbol: Any, budget_bytes: int, *, lower: int = 1, at: Mapping[Any, int] | None = None):
        """The largest value n of ``symbol`` (e.g. the sequence length) such that the predicted peak fits
        ``budget_bytes`` at every size in ``[lower, n]``; other symbols stay at their hints (or ``at``).
        Returns 0 when ``lower`` does not fit and ``math.inf`` when the peak never reaches the budget.
        Each probe re-evaluates the whole timeline exactly (``peak_at``); the search brackets the answer
        with the roots of the symbolic peak's pieces and verifies it around every crossing."""
        from memgraph.cost_model.sizing import largest_fitting

        target = self._symbol(symbol)
        values = self._resolve(at or {})

        def peak(n: int) -> int:
            return int(self.during_at({**values, target: n}).max(initial=0))

        return largest_fitting(self.peak_bytes, target, budget_bytes, values, lower, peak_at=peak)

    def _symbol(self, symbol: Any) -> sympy.Symbol:
        for candidate in self.hints:
            if str(candidate) == str(symbol):
                return candidate
        raise ValueError(f"no size symbol {symbol!r}; this estimate's symbols are {[str(s) for s in self.hints]}"
                         " (static shapes have none: mark a dimension dynamic with torch._dynamo.mark_dynamic)")

    # --- the timeline ---------------------------------------------------------------------------------
    @property
    def timeline(self) -> list[TimelinePoint]:
        return [TimelinePoint(i, self.names[i], self.phases[i], int(self.during[i]), int(self.live[i].sum()),
                              {c: int(v) for c, v in zip(CATEGORIES, self.live[i])}) for i in range(len(self.names))]

    @property
    def backward_start(self) -> int | None:
        """Index of the first backward step (the forward/backward boundary), or None for a forward-only graph."""
        return next((i for i, p in enumerate(self.phases) if p == BACKWARD), None)

    def live_at_peak(self, top: int | None = None) -> list[dict[str, Any]]:
        """The storages alive while the peak node runs, largest first: producer node, category, bytes."""
        alive: set[int] = set()
        for index, (_, _, allocs, frees) in enumerate(self.program.steps):
            alive.update(allocs)
            if index == self.peak_index:
                break
            alive.difference_update(frees)
        rows = [{"node": self.program.producers[s], "category": CATEGORIES[self.program.categories[s]],
                 "bytes": self.program.size_hints[s]} for s in alive]
        rows.sort(key=lambda r: -r["bytes"])
        return rows[:top] if top else rows

    def summary(self, top: int = 10) -> dict[str, Any]:
        """A JSON-ready summary: peak (and its expression), where it occurs, breakdown, unknown ops."""
        peak = self.peak_bytes
        return {
            "peak_bytes": self.peak_bytes_hint,
            "peak_expr": None if isinstance(peak, int) else str(peak),
            "peak_gib": self.peak_bytes_hint / 2**30,
            "peak_node": self.peak_node,
            "peak_phase": self.peak_phase,
            "peak_index": self.peak_index,
            "steps": len(self.names),
            "breakdown_bytes": self.breakdown,
            "largest_live_at_peak": self.live_at_peak(top),
            "size_hints": {str(k): v for k, v in self.hints.items()},
            "step_seconds": self.step_seconds,
            "unknown_ops": self.unknown_ops,
        }

    def plot(self, path: str, measured: Sequence[int] | None = None, *, title: str | None = None) -> str:
        """Draw the timeline (stacked by category, forward/backward boundary marked) to ``path`` (PNG).
        ``measured``: bytes live per step from a real run (e.g. ``torch.cuda.memory_allocated`` per node)."""
        from memgraph.cost_model.plot import plot_estimate

        return plot_estimate(self, path, measured=measured, title=title)

    def __repr__(self) -> str:
        peak = self.peak_bytes
        text = str(peak)
        expr = "" if isinstance(peak, int) else f", expr={text if len(text) < 120 else text[:117] + '...'}"
        return (f"MemoryEstimate(peak={self.peak_bytes_hint / 2**20:.2f} MiB at {self.peak_node} "
                f"({self.peak_phase}){expr}, steps={len(self.names)}, unknown_ops={len(self.unknown_ops)})")


def is_static_primal(index: int, static_indices: Sequence[int]) -> bool:
    return index in set(static_indices)


def grad_needs_clone(grad: Any, param: Any) -> bool:
    """AccumulateGrad steals a new gradient only if its strides match the parameter's (layout contract)."""
    if not isinstance(grad, torch.Tensor) or not isinstance(param, torch.Tensor):
        return False
    if [as_size(n) for n in grad.shape] != [as_size(n) for n in param.shape]:
        return True
    # Compare sizes structurally (as ints or sympy expressions): a SymInt comparison would add a guard.
    return any(as_size(g) != as_size(p) for g, p, n in zip(grad.stride(), param.stride(), grad.shape)
               if as_size(n) != 1)
