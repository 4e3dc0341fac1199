"""``GraphCosts``: everything the cost model knows about one joint graph, built once, for solvers.

A solver decides which forward values backward keeps (the *saved set*); everything else backward needs is
recomputed in backward from the saved values. ``GraphCosts`` answers, per joint-graph node:

* ``output_bytes(name)``: bytes of the storages its output lives on (what saving it keeps alive; a view
  costs its base's storage, so saving a view and its base costs one storage), ``allocated_bytes(name)``:
  bytes it allocates when it runs (0 for views);
* ``seconds(name)``: roofline runtime (the cost of recomputing it), ``flops(name)``;
* ``kind(name)``: input / view / matmul / pointwise / reduction / random / custom / collective / other;
* ``phase(name)``: "input", "forward" or "backward" (where it runs when nothing is recomputed);

and, for a whole candidate saved set, ``simulate(saved)``: the predicted peak of forward + backward when
exactly ``saved`` is kept (same model as ``estimate_partitioned`` on the graphs the partition pass would
build; ~10 ms for a tiny model, well under a second for a 10k-node graph), and ``recompute_seconds(saved)``.

Arrays in joint-graph order (``names``, ``bytes_array``, ``seconds_array``, ``kinds``) serve vectorized
solvers (ILP). A solver typically does::

    def my_solver(graph, estimate, budget, **_):
        saved = set(estimate.default_saved())        # everything backward reads: recompute nothing
        peak = estimate.simulate(saved)              # .peak_bytes_hint, .peak_node, .live_at_peak(), .breakdown
        while budget and peak.peak_bytes_hint > budget:
            alive = {row["node"] for row in peak.live_at_peak()} & saved
            victim = max(alive, key=lambda n: estimate.output_bytes(n) / (estimate.seconds(n) + 1e-9))
            saved = (saved - {victim}) | {i.name for i in graph.node(victim).all_input_nodes}
            peak = estimate.simulate(saved)
        return Plan("mine", saved=sorted(saved), recomputed=estimate.recomputed(saved))

``simulate`` raises ``InvalidSavedSet`` when backward cannot be computed from the saved set (a needed
primal not saved). ``schedule(saved)`` mirrors ``passes/partition.py`` (torch's ``_extract_fwd_bwd_modules``:
joint-graph order, impure nodes kept): if the partition pass starts reordering backward, so must it.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model import runtime
from memgraph.cost_model.inductor import with_kernel
from memgraph.cost_model.memory import MemoryEstimate, StepSemantics
from memgraph.cost_model.runtime import DeviceSpec
from memgraph.cost_model.step import StepGraphs, grad_clone_bytes, simulate_step
from memgraph.cost_model.symbolic import Size, evaluate, rounded_allocation
from memgraph.cost_model.values import node_value


class InvalidSavedSet(ValueError):
    """The saved set does not let backward compute its outputs (a needed input is neither saved nor computable)."""


class GraphCosts:
    """The cost model's estimate of a ``TrainingGraph``; passed to every solver as ``estimate``."""

    def __init__(self, graph, *, device: DeviceSpec | None = None, semantics: StepSemantics | None = None):
        self.graph = graph
        self.device = device or DeviceSpec()
        self.semantics = semantics or StepSemantics()
        nodes = [n for n in graph.joint.graph.nodes if n.op != "output"]
        self.nodes: list[fx.Node] = nodes
        self.names: list[str] = [n.name for n in nodes]
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.values = [node_value(n) for n in nodes]
        if self.semantics.fuses:
            self.values = [with_kernel(v, n) for v, n in zip(self.values, nodes)]
        self.hints = _hints_of(graph)
        self._inputs = [[self.index[name] for name in v.inputs if name in self.index] for v in self.values]
        placeholders = graph.placeholders
        self._primal_index = [self.index[n.name] for n in graph.primals]
        self._tangent_index = [self.index[n.name] for n in graph.tangents]
        self._tangent_set = set(self._tangent_index)
        primal_set = set(self._primal_index)
        self._placeholder_set = {self.index[n.name] for n in placeholders}
        self._other_placeholders = self._placeholder_set - primal_set - set(self._tangent_index)
        self._backward_seeds = {i for i in self._other_placeholders if _compat.is_backward_seed(nodes[i])}
        forward_set = {self.index[n.name] for n in graph.forward_nodes if n.name in self.index}
        self._phase = ["input" if i in self._placeholder_set else "forward" if i in forward_set else "backward"
                       for i in range(len(nodes))]
        fw_outputs, bw_outputs = _compat.fwd_bwd_outputs(graph.joint, graph.num_fwd_outputs)
        self._fw_outputs = [self.index[n.name] for n in fw_outputs if isinstance(n, fx.Node)]
        self._bw_outputs: list[int | None] = [self.index[n.name] if isinstance(n, fx.Node) else None
                                              for n in bw_outputs]
        self._owner = self._storage_owners()
        self._impure = [n.op == "call_function" and _compat.survives_dead_code_elimination(n) for n in nodes]
        self._pinned = [_compat.must_be_in(n) if n.op == "call_function" else None for n in nodes]
        primal_vals = [n.meta.get("val") for n in graph.primals]
        grad_names = [self.names[i] if i is not None else None for i in self._bw_outputs]
        self._grad_clones = grad_clone_bytes(grad_names, primal_vals,
                                             {self.names[i]: nodes[i].meta.get("val") for i in self._bw_outputs
                                              if i is not None})

    # --- per node -----------------------------------------------------------------------------------
    def _storage_owners(self) -> list[list[tuple[int, Size] | None]]:
        """Per node and output: (index of the node that allocated its storage, the storage's rounded size)."""
        roots: list[list[tuple[int, Size] | None]] = []
        for i, value in enumerate(self.values):
            resolved: list[tuple[int, Size] | None] = []
            for output in value.outputs:
                if output is None:
                    resolved.append(None)
                elif output.alias is None:
                    resolved.append((i, rounded_allocation(output.nbytes, self.semantics.granularity)))
                else:
                    j = self.index.get(output.alias[0])
                    source = roots[j] if j is not None else []
                    resolved.append(source[output.alias[1]] if output.alias[1] < len(source) else None)
            roots.append(resolved)
        return roots

    def _storages(self, i: int) -> list[tuple[int, Size]]:
        return list({root for root in self._owner[i] if root is not None})

    def output_bytes(self, name: str) -> int:
        """Bytes kept alive by keeping ``name``'s output: the storages it lives on (a view: its base's)."""
        return sum(evaluate(size, self.hints) for _, size in self._storages(self.index[name]))

    def output_bytes_expr(self, name: str) -> Size:
        """``output_bytes`` as an int or a sympy expression in the size symbols."""
        return sum((size for _, size in self._storages(self.index[name])), 0)

    def allocated_bytes(self, name: str) -> int:
        """Bytes ``name`` allocates when it runs (0 for views, aliases and inputs)."""
        i = self.index[name]
        if self._phase[i] == "input":
            return 0
        return sum(evaluate(size, self.hints) for owner, size in self._storages(i) if owner == i)

    def storage_base(self, name: str) -> str:
        """The node whose allocation ``name``'s (first) output lives on: itself unless it is a view."""
        storages = self._storages(self.index[name])
        return self.names[storages[0][0]] if storages else name

    def seconds(self, name: str) -> float:
        return float(self.seconds_array[self.index[name]])

    def flops(self, name: str) -> int:
        return runtime.node_flops(self.nodes[self.index[name]], self.hints)

    def kind(self, name: str) -> str:
        return self.kinds[self.index[name]]

    def phase(self, name: str) -> str:
        return self._phase[self.index[name]]

    @functools.cached_property
    def kinds(self) -> list[str]:
        return [runtime.node_kind(n) for n in self.nodes]

    @functools.cached_property
    def seconds_array(self) -> np.ndarray:
        return np.array([runtime.node_seconds(n, self.device, self.hints) for n in self.nodes])

    @functools.cached_property
    def bytes_array(self) -> np.ndarray:
        """``output_bytes`` of every node, in ``names`` order."""
        return np.array([self.output_bytes(name) for name in self.names], dtype=np.int64)

    @functools.cached_property
    def backward_users(self) -> dict[str, list[str]]:
        """Forward nodes (and inputs) used directly by backward nodes: the candidates for saving."""
        users: dict[str, list[str]] = {}
        for i, inputs in enumerate(self._inputs):
            if self._phase[i] != "backward":
                continue
            for j in inputs:
                if self._phase[j] != "backward" and j not in self._tangent_set:
                    users.setdefault(self.names[j], []).append(self.names[i])
        return users

    @property
    def forward_names(self) -> list[str]:
        return [n for n, p in zip(self.names, self._phase) if p == "forward"]

    @property
    def backward_names(self) -> list[str]:
        return [n for n, p in zip(self.names, self._phase) if p == "backward"]

    # --- a candidate saved set --------------------------------------------------------------------------
    def schedule(self, saved: Iterable[str]) -> tuple[list[int], list[int], list[int]]:
        """(forward nodes, backward nodes, saved nodes backward uses) as joint indices in execution order,
        exactly as the partition pass (torch's ``_extract_fwd_bwd_modules``) builds the graphs: a graph
        holds every node computable from its inputs that an output needs or that is impure (random ops
        survive dead-code elimination), in joint order."""
        saved_set = {self.index[name] for name in saved}
        sources = saved_set | set(self._tangent_index) | self._backward_seeds
        bw_targets = [i for i in self._bw_outputs if i is not None]
        backward = self._extract(sources, bw_targets, "backward")
        used = {j for i in backward for j in self._inputs[i]} | set(bw_targets)
        saved_used = sorted(i for i in saved_set if i in used)
        forward = self._extract(set(self._primal_index) | (self._other_placeholders - self._backward_seeds),
                                self._fw_outputs + saved_used, "forward")
        return forward, self._autograd_order(backward), saved_used

    def _autograd_order(self, backward: list[int]) -> list[int]:
        """Backward in the order the partition pass gives it (torch's ``reordering_to_mimic_autograd_engine``):
        from the first user of a tangent on, each node runs right after the not-yet-run nodes it needs, so a
        recomputed value is made just before its first use instead of all at the start of backward."""
        members, tangents = set(backward), set(self._tangent_index)
        first = next((i for i in backward if any(j in tangents for j in self._inputs[i])), None)
        if first is None:
            return backward
        done: set[int] = set()
        order: list[int] = []

        def insert(i: int) -> None:
            pending, stack = set(), [i]
            while stack:
                k = stack.pop()
                if k in pending or k in done:
                    continue
                pending.add(k)
                stack.extend(j for j in self._inputs[k] if j in members)
            for k in sorted(pending):
                done.add(k)
                order.append(k)

        for i in backward:  # torch keeps in-place copies before the first tangent user where they were
            if i < first and self.nodes[i].target is torch.ops.aten.copy_.default:
                insert(i)
        for i in backward:
            if i >= first:
                insert(i)
        return order

    def _extract(self, sources: set[int], targets: Sequence[int], subgraph: str) -> list[int]:
        computable: set[int] = set()
        order: list[int] = []
        for i in range(len(self.nodes)):
            if i in sources or i in self._placeholder_set:
                continue
            if self._pinned[i] not in (None, subgraph):
                continue
            if all(j in sources or j in computable for j in self._inputs[i]):
                computable.add(i)
                order.append(i)
        missing = [self.names[i] for i in targets if i not in sources and i not in computable]
        if missing:
            raise InvalidSavedSet(f"the {subgraph} graph cannot compute {missing[:5]} from its inputs "
                                  f"(a value it needs is neither saved nor computable)")
        keep = self._ancestors([i for i in targets if i not in sources] +
                               [i for i in order if self._impure[i]], sources)
        return [i for i in order if i in keep]

    def _ancestors(self, targets: Sequence[int], stop: set[int]) -> set[int]:
        """``targets`` and everything they need, not looking past ``stop`` nodes (excluded unless targets)."""
        seen: set[int] = set()
        stack = [i for i in targets]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(j for j in self._inputs[i] if j not in stop)
        return seen

    def recomputed(self, saved: Iterable[str]) -> list[str]:
        """Forward nodes backward would compute again under this saved set."""
        _, backward, _ = self.schedule(saved)
        return [self.names[i] for i in backward if self._phase[i] == "forward"]

    def recompute_seconds(self, saved: Iterable[str]) -> float:
        _, backward, _ = self.schedule(saved)
        seconds = self.seconds_array
        return float(sum(seconds[i] for i in backward if self._phase[i] == "forward"))

    def simulate(self, saved: Iterable[str], *, symbolic: bool = False) -> MemoryEstimate:
        """Predicted memory of the step when backward keeps exactly ``saved`` (joint-graph node names) and
        recomputes the rest. ``symbolic=True`` also builds the sympy peak (slower); ``peak_bytes_hint`` is
        always there. Raises InvalidSavedSet if backward cannot be computed from ``saved``."""
        forward, backward, saved_used = self.schedule(saved)
        values = self.values
        step = StepGraphs(
            primals=[values[i] for i in self._primal_index],
            forward=[values[i] for i in forward],
            user_outputs=[self.names[i] for i in self._fw_outputs],
            saved=[values[i] for i in saved_used],
            tangents=[values[i] for i in self._tangent_index],
            backward=[values[i] for i in backward],
            grads=[self.names[i] if i is not None else None for i in self._bw_outputs],
            static_indices=frozenset(self.graph.static_input_indices),
            grad_clones=self._grad_clones,
        )
        return simulate_step(step, self.hints, self.semantics, symbolic_peak=symbolic)

    def default_saved(self) -> list[str]:
        """The save-everything frontier: forward values and inputs that backward nodes use directly."""
        return list(self.backward_users)

    def __repr__(self) -> str:
        return (f"GraphCosts({len(self.names)} nodes, {len(self.forward_names)} forward, "
                f"{len(self.backward_names)} backward, symbols={sorted(map(str, self.hints))})")


def _hints_of(graph) -> dict:
    symbols = set()
    values = []
    for node in graph.joint.graph.nodes:
        value = node.meta.get("val")
        values.append(value)
        for leaf in _leaves(value):
            symbols |= _free_symbols(leaf)
    if not symbols:
        return {}
    shape_env = _compat.shape_env_of([v for v in values if v is not None])
    return _compat.size_hints(shape_env, symbols)


def hints_of_values(values) -> dict:
    symbols = set()
    for value in values:
        for leaf in _leaves(value):
            symbols |= _free_symbols(leaf)
    if not symbols:
        return {}
    return _compat.size_hints(_compat.shape_env_of([v for v in values if v is not None]), symbols)


def _leaves(value):
    from torch.utils._pytree import tree_leaves

    return tree_leaves(value)


def _free_symbols(leaf) -> set:
    import torch

    if isinstance(leaf, torch.Tensor):
        found = set()
        for size in (*leaf.shape, *leaf.stride(), leaf.storage_offset()):
            expr = _compat.symint_expr(size)
            if expr is not None:
                found |= expr.free_symbols
        try:
            expr = _compat.symint_expr(leaf.untyped_storage().nbytes())
            if expr is not None:
                found |= expr.free_symbols
        except (NotImplementedError, RuntimeError):
            pass
        return found
    expr = _compat.symint_expr(leaf)
    return set(expr.free_symbols) if expr is not None else set()
