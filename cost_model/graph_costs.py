"""``GraphCosts``: one joint training graph as the cost model and every solver see it, built once.

A solver decides which forward values backward keeps: the *saved set*. Backward recomputes every other forward
value it needs, from saved values only. A saved set is *valid* when that recomputation never runs a pinned node
(an input, a random, impure, mutating or collective op: ``policies.never_recompute``).

Everything is indexed by a node's position ``i`` in the joint graph (output node excluded); ``names[i]`` and
``index[name]`` convert. The fields, read-only once built:

* per node: ``nodes``, ``names``, ``values`` (what it allocates and aliases), ``phase`` ("input", "forward",
  "backward": where it runs when nothing is recomputed), ``inputs`` / ``users`` (indices), ``kinds``
  (``runtime.node_kind``), ``seconds`` (roofline time: the cost of recomputing it; 0 for views; under Inductor
  the time of the kernel it is written by, 0 where it is computed inside its users' kernels),
  ``weight`` (bytes that saving or recomputing it keeps alive; 0 for views, tuples and inputs);
* the decision space: ``forward`` (forward values and primals, graph order), ``backward``, ``frontier``
  (forward values backward reads directly), ``pinned`` (index -> why it may not be recomputed),
  ``unsaveable`` (tuples of multi-output ops, and ``never_saved``: values recomputed wherever backward needs them,
  ``policies.never_save``), ``views``, ``primals``, ``tangents``;
* caches, explicit: ``simulations`` (saved set -> MemoryEstimate, least recently used dropped) and ``memo``
  (solver-owned results keyed by ``(solver name, ...)``, so solvers called in turn on one graph share work).

And per saved set: ``recomputed(saved)``, ``recompute_seconds(saved)``, ``make_valid(saved)``,
``simulate(saved)`` (the predicted step: the same model as ``estimate_partitioned`` of the graphs the partition
pass builds; ~0.3 s for an 8B graph, memoized) and ``plan(solver, saved, budget)``: the ``Plan`` with its
predicted peak and recompute time from that one simulation.

Writing a solver (register it in ``memgraph.cost_model.solvers``)::

    def mine(graph, costs, budget, **_):
        saved = set(costs.save_all)                        # the fastest plan: recompute nothing
        while budget is not None and costs.simulate(saved).peak_bytes_hint > budget:
            estimate = costs.simulate(saved)               # .peak_node, .live_at_peak(), .breakdown
            victims = costs.alive_at_peak(saved, estimate) & costs.evictable(saved)
            if not victims:
                raise costs.infeasible("mine", budget)
            victim = max(victims, key=lambda i: costs.weight[i] / (costs.seconds[i] + 1e-12))
            saved = costs.make_valid(saved - {victim})     # its inputs are saved instead, pinned ops kept
        return costs.plan("mine", saved, budget)
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model import runtime, transfers
from memgraph.cost_model.blocks import Blocks, find_blocks
from memgraph.cost_model.inductor import with_kernel
from memgraph.cost_model.memory import MemoryEstimate, StepSemantics
from memgraph.cost_model.policies import is_multi_output, never_recompute, never_save
from memgraph.cost_model.runtime import DeviceSpec
from memgraph.cost_model.step import StepGraphs, grad_clone_bytes, simulate_step
from memgraph.cost_model.symbolic import Size, as_size, evaluate, rounded_allocation
from memgraph.cost_model.values import NodeValue, Output, node_value
from memgraph.errors import InfeasibleBudgetError
from memgraph.plan import Plan
from memgraph.units import gib

__all__ = ["GraphCosts", "InvalidSavedSet", "hints_of_values"]

MAX_SIMULATIONS = 256  # memoized simulations per graph (an 8B graph's estimate holds a few MB)


class InvalidSavedSet(ValueError):
    """The saved set does not let backward compute its outputs (a needed input is neither saved nor computable)."""


class GraphCosts:
    """The cost model's view of one ``TrainingGraph``; every solver reads it (see the module docstring)."""

    def __init__(self, graph, *, device: DeviceSpec | None = None, semantics: StepSemantics | None = None,
                 sizes: Mapping[str, int] | None = None, offload_budget: int | None = None,
                 cudagraphs: bool = False):
        """``sizes``: values for the size symbols of a dynamic-shape graph (by name, e.g. ``{"s27": 8192}``);
        every figure is then for those sizes instead of the ones the graph was traced with.
        ``offload_budget``: host bytes offloaded values may occupy; None: offload is not a choice.
        ``cudagraphs``: the step replays from CUDA graphs, whose captured copies (the slot transfer ops) take
        no host time to issue."""
        self.graph = graph
        self.offload_budget = offload_budget
        self.cudagraphs = cudagraphs
        self.device = device or DeviceSpec()
        self.semantics = semantics or StepSemantics()
        self.nodes: list[fx.Node] = [n for n in graph.joint.graph.nodes if n.op != "output"]
        self.names: list[str] = [n.name for n in self.nodes]
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.values = [node_value(n) for n in self.nodes]
        if self.semantics.fuses:
            self.values = [with_kernel(v, n) for v, n in zip(self.values, self.nodes)]
        self.hints = hints_of_values([n.meta.get("val") for n in graph.joint.graph.nodes])
        if sizes:
            by_name = {str(symbol): symbol for symbol in self.hints}
            unknown = sorted(set(map(str, sizes)) - set(by_name))
            if unknown:
                raise ValueError(f"no size symbols {unknown} in this graph; its symbols are {sorted(by_name)}")
            self.hints = {**self.hints, **{by_name[str(name)]: int(value) for name, value in sizes.items()}}
        self.inputs: list[tuple[int, ...]] = [tuple(self.index[name] for name in v.inputs if name in self.index)
                                              for v in self.values]
        users: list[list[int]] = [[] for _ in self.nodes]
        for i, ins in enumerate(self.inputs):
            for j in ins:
                users[j].append(i)
        self.users: list[tuple[int, ...]] = [tuple(u) for u in users]
        self.kinds: list[str] = [runtime.node_kind(n) for n in self.nodes]

        placeholders = {self.index[n.name] for n in graph.placeholders}
        self.primals = frozenset(self.index[n.name] for n in graph.primals)
        self.tangents: list[int] = [self.index[n.name] for n in graph.tangents]
        forward_nodes = {self.index[n.name] for n in graph.forward_nodes if n.name in self.index}
        self.phase: list[str] = ["input" if i in placeholders else "forward" if i in forward_nodes else "backward"
                                 for i in range(len(self.nodes))]
        self._primal_order = [self.index[n.name] for n in graph.primals]
        self._placeholders = placeholders
        self._other_placeholders = placeholders - self.primals - set(self.tangents)
        self._backward_seeds = {i for i in self._other_placeholders if _compat.is_backward_seed(self.nodes[i])}
        fw_outputs, bw_outputs = _compat.fwd_bwd_outputs(graph.joint, graph.num_fwd_outputs)
        self.forward_outputs: list[int] = [self.index[n.name] for n in fw_outputs if isinstance(n, fx.Node)]
        self.gradients: list[int | None] = [self.index[n.name] if isinstance(n, fx.Node) else None
                                            for n in bw_outputs]
        self._owner = self._storage_owners()
        self._impure = [n.op == "call_function" and _compat.survives_dead_code_elimination(n) for n in self.nodes]
        # torch's partition puts some nodes in one graph whatever the plan (mutations, tags): "forward"/"backward"
        self._graph_pin = [_compat.must_be_in(n) if n.op == "call_function" else None for n in self.nodes]
        self._grad_clones = grad_clone_bytes(
            [self.names[i] if i is not None else None for i in self.gradients],
            [n.meta.get("val") for n in graph.primals],
            {self.names[i]: self.nodes[i].meta.get("val") for i in self.gradients if i is not None})
        self._decision_space()
        self.simulations: dict[tuple[frozenset[int], frozenset[int]], MemoryEstimate] = {}
        self.memo: dict[Any, Any] = {}
        self._blocks: dict[int, Blocks | None] = {}

    def _decision_space(self) -> None:
        """forward / backward / frontier / pinned / unsaveable / views / weight / seconds."""
        phase, primals = self.phase, self.primals
        forward = [i for i, p in enumerate(phase) if p == "forward" or i in primals]
        # getitem of a forward multi-output op that only backward reads (SDPA's logsumexp) is a forward value:
        # the tuple cannot be handed over, the item can.
        tuples = {i for i in forward if i not in primals and is_multi_output(self.nodes[i])}
        promoted = {i for i, p in enumerate(phase) if p == "backward" and self.nodes[i].target is operator.getitem
                    and self.inputs[i] and self.inputs[i][0] in tuples}
        self.forward: list[int] = sorted(set(forward) | promoted)
        self.forward_set = frozenset(self.forward)
        self.backward: list[int] = [i for i, p in enumerate(phase) if p == "backward" and i not in promoted]
        self.frontier = frozenset(j for i in self.backward for j in self.inputs[i] if j in self.forward_set)
        self.pinned: dict[int, str] = {i: reason for i in self.forward
                                       if (reason := never_recompute(self.nodes[i])) is not None}
        self.never_saved = frozenset(i for i in forward if i not in primals and never_save(self.nodes[i]))
        self.unsaveable = frozenset(tuples) | self.never_saved
        self.views = frozenset(i for i in self.forward if i not in primals and i not in self.unsaveable
                               and self.allocated_bytes(i) == 0 and self.nodes[i].target is not operator.getitem)
        self.weight = np.zeros(len(self.nodes), dtype=np.int64)
        for i in self.forward:
            if i not in primals and i not in self.unsaveable and i not in self.views:
                self.weight[i] = self.output_bytes(i)
        self.seconds = np.array([runtime.node_seconds(n, self.device, self.hints) for n in self.nodes])
        if self.semantics.fuses:
            self._fused_seconds()
        self.seconds[list(self.views)] = 0.0

    def _fused_seconds(self) -> None:
        """Node times for Inductor's code: a pointwise value computed inside its users' kernels takes no time of
        its own, and a kernel Inductor writes out (pointwise or reduction) moves the bytes of the buffers it
        reads and of its output, not those of each unfused op. Matmuls and custom ops keep their roofline.
        Summing unfused ops counted Llama-3-8B's elementwise work (norms, rotary, SwiGLU) about 5x what its
        fused kernels measure on an H100, so forward looked longer than it runs and planned copies meant to hide
        behind it did not."""
        from memgraph.cost_model.inductor import BUFFER, POINTWISE, kernel_reads

        output = next(n for n in reversed(self.graph.joint.graph.nodes) if n.op == "output")
        graph_outputs = {n.name for n in output.all_input_nodes}
        placeholders = [self.names[i] for i, node in enumerate(self.nodes) if node.op == "placeholder"]
        forward = [i for i in self.forward if i not in self.primals]
        handed = {self.names[i] for i in self.frontier} | {self.names[i] for i in self.forward_outputs}
        phases = ((forward, handed | graph_outputs, placeholders),
                  (self.backward, graph_outputs, placeholders + [self.names[i] for i in forward]))
        for order, outputs, given in phases:
            reads = kernel_reads([self.values[i] for i in order], sorted(outputs & {self.names[i] for i in order}),
                                 given=given)
            for i in order:
                info = self.values[i].kernel
                if info is None or info.kind not in (POINTWISE, BUFFER) or runtime.is_view_like(self.nodes[i]):
                    continue
                buffers = reads.get(self.names[i])
                if buffers is None:
                    self.seconds[i] = 0.0
                    continue
                moved = self._kernel_bytes(i, [self.index[b] for b in buffers if b in self.index])
                self.seconds[i] = runtime.roofline_seconds(self.nodes[i], moved, self.device, self.hints)

    def _kernel_bytes(self, i: int, buffers: list[int]) -> int:
        """Bytes a written kernel for node i moves: its output, and of each buffer it reads at most one element per
        element of its loop (a gathered embedding row, not the whole table)."""
        def tensors(j: int) -> list[torch.Tensor]:
            return list(runtime.tensors_in(self.nodes[j].meta.get("val")))

        def numel(tensor: torch.Tensor) -> int:
            return evaluate(as_size(tensor.numel()), self.hints)

        loop = max([numel(t) for j in [i, *self.inputs[i]] for t in tensors(j)], default=0)
        read = sum(min(numel(t), loop) * t.element_size() for j in buffers for t in tensors(j))
        return read + sum(numel(t) * t.element_size() for t in tensors(i))

    # --- storage ------------------------------------------------------------------------------------------
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

    def output_bytes(self, i: int) -> int:
        """Bytes kept alive by keeping node i's output: the storages it lives on (a view: its base's)."""
        return sum(evaluate(size, self.hints) for _, size in self._storages(i))

    def output_bytes_expr(self, i: int) -> Size:
        """``output_bytes`` as an int or a sympy expression in the size symbols."""
        return sum((size for _, size in self._storages(i)), 0)

    def allocated_bytes(self, i: int) -> int:
        """Bytes node i allocates when it runs (0 for views, aliases and inputs)."""
        if self.phase[i] == "input":
            return 0
        return sum(evaluate(size, self.hints) for owner, size in self._storages(i) if owner == i)

    def storage_base(self, i: int) -> int:
        """The node whose allocation node i's (first) output lives on: itself unless it is a view."""
        storages = self._storages(i)
        return storages[0][0] if storages else i

    def flops(self, i: int) -> int:
        return runtime.node_flops(self.nodes[i], self.hints)

    # --- names ----------------------------------------------------------------------------------------
    def names_of(self, indices: Iterable[int]) -> list[str]:
        return [self.names[i] for i in sorted(indices)]

    def indices(self, names: Iterable[str]) -> set[int]:
        return {self.index[n] for n in names}

    # --- saved sets -----------------------------------------------------------------------------------
    def recomputable(self, i: int) -> bool:
        return i not in self.pinned

    def recomputed(self, saved: Iterable[int]) -> set[int]:
        """Forward nodes backward computes again when ``saved`` is kept: the ancestors of the frontier,
        stopping at saved values. Solvers' fast view: for a valid saved set it is exactly the forward nodes of
        ``schedule``'s backward (what the partition pass recomputes), which ``plan`` reports."""
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

    def scheduled_recomputation(self, saved: Iterable[int]) -> set[int]:
        """The forward nodes the partitioned backward runs again (also for torch's own saved sets, which may
        save backward nodes such as a ``detach`` of a forward value)."""
        _, backward, _ = self.schedule(saved)
        return {i for i in backward if i in self.forward_set}

    def recompute_seconds(self, saved: Iterable[int]) -> float:
        return float(sum(self.seconds[i] for i in self.recomputed(saved)))

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

    def evictable(self, saved: Iterable[int]) -> set[int]:
        """Saved values that may be dropped and recomputed, and free memory when they are."""
        return {i for i in saved if self.recomputable(i) and self.weight[i] > 0}

    def alive_at_peak(self, saved: Iterable[int], estimate: MemoryEstimate) -> set[int]:
        """Saved values whose storage is alive when ``estimate``'s predicted peak occurs."""
        producers = {row["node"] for row in estimate.live_at_peak()}
        return {i for i in saved if self.names[self.storage_base(i)] in producers}

    def blocks(self, *, min_period: int = 2) -> Blocks | None:
        """The graph's repeated blocks (decoder layers), found once (``blocks.find_blocks``)."""
        if min_period not in self._blocks:
            self._blocks[min_period] = find_blocks(self, min_period=min_period)
        return self._blocks[min_period]

    # --- the schedule and the simulation ------------------------------------------------------------
    def schedule(self, saved: Iterable[int]) -> tuple[list[int], list[int], list[int]]:
        """(forward nodes, backward nodes, saved nodes backward uses) in execution order, exactly as the
        partition pass (torch's ``_extract_fwd_bwd_modules``) builds the graphs: a graph holds every node
        computable from its inputs that an output needs or that is impure (random ops survive dead-code
        elimination), in joint order; backward is then reordered as autograd would run it."""
        saved_set = set(saved)
        sources = saved_set | set(self.tangents) | self._backward_seeds
        bw_targets = [i for i in self.gradients if i is not None]
        backward = self._extract(sources, bw_targets, "backward")
        used = {j for i in backward for j in self.inputs[i]} | set(bw_targets)
        saved_used = sorted(i for i in saved_set if i in used)
        forward = self._extract(set(self._primal_order) | (self._other_placeholders - self._backward_seeds),
                                self.forward_outputs + saved_used, "forward")
        return forward, self._autograd_order(backward), saved_used

    def _autograd_order(self, backward: list[int]) -> list[int]:
        """Backward in the order the partition pass gives it (torch's ``reordering_to_mimic_autograd_engine``):
        from the first user of a tangent on, each node runs right after the not-yet-run nodes it needs, so a
        recomputed value is made just before its first use instead of all at the start of backward."""
        members, tangents = set(backward), set(self.tangents)
        first = next((i for i in backward if any(j in tangents for j in self.inputs[i])), None)
        if first is None:
            return self._items_after_tuples(backward)
        done: set[int] = set()
        order: list[int] = []

        def insert(i: int) -> None:
            pending, stack = set(), [i]
            while stack:
                k = stack.pop()
                if k in pending or k in done:
                    continue
                pending.add(k)
                stack.extend(j for j in self.inputs[k] if j in members)
            for k in sorted(pending):
                done.add(k)
                order.append(k)

        for i in backward:  # torch keeps in-place copies before the first tangent user where they were
            if i < first and self.nodes[i].target is torch.ops.aten.copy_.default:
                insert(i)
        for i in backward:
            if i >= first:
                insert(i)
        return self._items_after_tuples(order)

    def _items_after_tuples(self, order: list[int]) -> list[int]:
        """``order`` with each multi-output op's getitems right after it (the partition pass does the same): a
        late getitem would otherwise hold every output of its tuple alive until then."""
        tuples = {i for i in order if is_multi_output(self.nodes[i])}
        items: dict[int, list[int]] = {}
        for i in order:
            if self.nodes[i].target is operator.getitem and self.inputs[i] and self.inputs[i][0] in tuples:
                items.setdefault(self.inputs[i][0], []).append(i)
        if not items:
            return order
        moved = {i for group in items.values() for i in group}
        result: list[int] = []
        for i in order:
            if i not in moved:
                result.append(i)
                result.extend(items.get(i, ()))
        return result

    def _extract(self, sources: set[int], targets: Sequence[int], subgraph: str) -> list[int]:
        computable: set[int] = set()
        order: list[int] = []
        for i in range(len(self.nodes)):
            if i in sources or i in self._placeholders:
                continue
            if self._graph_pin[i] not in (None, subgraph):
                continue
            if all(j in sources or j in computable for j in self.inputs[i]):
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
        stack = list(targets)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(j for j in self.inputs[i] if j not in stop)
        return seen

    def simulate(self, saved: Iterable[int], *, offloaded: Iterable[int] = (), symbolic: bool = False
                 ) -> MemoryEstimate:
        """Predicted memory of the step when backward keeps exactly ``saved`` (of which ``offloaded`` wait on
        the host) and recomputes the rest (memoized: solvers revisit the same sets). ``symbolic=True`` also
        builds the sympy peak (not memoized); ``peak_bytes_hint`` is always there; ``.transfers`` holds where
        the offload ops go. Raises InvalidSavedSet if backward cannot be computed."""
        key = (frozenset(saved), frozenset(offloaded))
        if symbolic:
            return self._simulate(*key, symbolic=True)
        estimate = self.simulations.pop(key, None) or self._simulate(*key, symbolic=False)
        self.simulations[key] = estimate  # most recently used last
        while len(self.simulations) > MAX_SIMULATIONS:
            self.simulations.pop(next(iter(self.simulations)))
        return estimate

    def _simulate(self, saved: frozenset[int], offloaded: frozenset[int], *, symbolic: bool) -> MemoryEstimate:
        forward, backward, saved_used = self.schedule(saved)
        not_allowed = offloaded - self.offloadable
        if not_allowed:
            raise InvalidSavedSet(f"{self.names_of(not_allowed)[:5]} may not be offloaded (not a single fresh "
                                  "contiguous tensor owning its storage, or a user output)")
        placed = transfers.place_transfers(self, forward, backward, [i for i in saved_used if i in offloaded])
        values = self.values
        ops = {t.value: self._transfer_values(self.index[t.value]) for t in placed.items}
        step = StepGraphs(
            primals=[values[i] for i in self._primal_order],
            forward=self._sequence(forward, placed, "forward", ops,
                                   outputs=[transfers.wait_offload_name(self.names[i]) if self.names[i] in ops
                                            else self.names[i] for i in (*saved_used, *self.forward_outputs)]),
            user_outputs=[self.names[i] for i in self.forward_outputs],
            saved=[ops[self.names[i]]["wait_offload"] if self.names[i] in ops else values[i] for i in saved_used],
            tangents=[values[i] for i in self.tangents],
            backward=self._sequence(backward, placed, "backward", ops,
                                    outputs=[self.names[i] for i in self.gradients if i is not None]),
            grads=[self.names[i] if i is not None else None for i in self.gradients],
            static_indices=frozenset(self.graph.static_input_indices),
            grad_clones=self._grad_clones,
        )
        estimate = simulate_step(step, self.hints, self.semantics, symbolic_peak=symbolic)
        estimate.transfers = placed
        return estimate

    def _sequence(self, order: list[int], placed: transfers.Transfers, phase: str,
                  ops: dict[str, dict[str, NodeValue]], outputs: Sequence[str]) -> list[NodeValue]:
        """One graph's node values in order with the transfer ops placed; in backward, readers of an offloaded
        value read its reload; each tied op also reads its tie (``transfers.tie_points``), as the pass builds it."""
        if not placed.items:
            return [self.values[i] for i in order]
        sequence = transfers.interleave([self.names[i] for i in order], placed, phase)
        renamed = {t.value: transfers.wait_reload_name(t.value) for t in placed.items} if phase == "backward" else {}
        result = []
        for kind, name in sequence:
            if kind != "node":
                result.append(ops[name][kind])
            elif renamed:
                result.append(_reading(self.values[self.index[name]], renamed))
            else:
                result.append(self.values[self.index[name]])
        tied = transfers.tie_points(sequence, placed, lambda name: self._anchor_bytes[self.index[name]],
                                    lambda position: result[position].inputs, outputs)
        for position, key in enumerate(sequence):
            op = result[position]
            if key in tied and tied[key] not in op.inputs:
                result[position] = dataclasses.replace(op, inputs=op.inputs + (tied[key],))
        return result

    @functools.cached_property
    def _anchor_bytes(self) -> list[int | None]:
        return [transfers.anchor_bytes(node) for node in self.nodes]

    def _transfer_values(self, i: int) -> dict[str, NodeValue]:
        """The node values of value i's four transfer ops, as the offload pass builds them (the captured ones
        under CUDA graphs: a token of device storage instead of the host copy)."""
        key = ("transfer values", i)
        if key not in self.memo:
            from memgraph.passes.offload import transfer_nodes

            graph = fx.Graph()
            source = graph.placeholder(self.names[i])
            source.meta["val"] = self.nodes[i].meta.get("val")
            nodes = transfer_nodes(graph, source, captured=self.cudagraphs)
            read = (lambda n: with_kernel(node_value(n), n)) if self.semantics.fuses else node_value
            self.memo[key] = {kind: read(node) for kind, node in nodes.items()}
        return self.memo[key]

    def peak(self, saved: Iterable[int]) -> int:
        return int(self.simulate(saved).peak_bytes_hint)

    def estimate(self, plan: Plan, *, symbolic: bool = False) -> MemoryEstimate:
        """The predicted memory of a plan (its ``saved`` and ``offloaded`` names)."""
        return self.simulate(self.indices(plan.saved), offloaded=self.indices(plan.offloaded), symbolic=symbolic)

    @functools.cached_property
    def offloadable(self) -> frozenset[int]:
        """Forward values that may wait on the host between forward and backward (``transfers.offloadable``)."""
        return transfers.offloadable(self)

    # --- plans ----------------------------------------------------------------------------------------
    def plan(self, solver: str, saved: Iterable[int], budget: int | None, *, estimate: MemoryEstimate | None = None,
             validate: bool = True, offloaded: Iterable[int] = (), **details: Any) -> Plan:
        """A Plan for ``saved`` with the one predicted peak and recompute time of this cost model.

        Raises InfeasibleBudgetError when the predicted peak exceeds ``budget``. ``validate=False`` takes a
        saved set as it is, for torch's own partitions (baselines judged by torch's policies, not ours)."""
        saved = set(saved)
        if validate and not self.is_valid(saved):
            raise RuntimeError(f"solver {solver!r} produced a saved set from which backward would rerun a "
                               "pinned (random, impure, mutating or input) node; pass it through make_valid")
        offloaded = set(offloaded)
        estimate = estimate or self.simulate(saved, offloaded=offloaded)
        peak = int(estimate.peak_bytes_hint)
        recomputed = self.scheduled_recomputation(saved)
        placed = getattr(estimate, "transfers", None) or transfers.Transfers()
        if placed.items:
            details["transfers"] = [t.to_dict() for t in placed.items]
        plan = Plan(solver=solver, saved=self.names_of(saved), recomputed=self.names_of(recomputed), peak_bytes=peak,
                    recompute_seconds=float(sum(self.seconds[i] for i in recomputed)), budget_bytes=budget,
                    offloaded=[t.value for t in placed.items], host_bytes=placed.host_bytes,
                    transfer_seconds=placed.stall_seconds,
                    details={k: v for k, v in details.items() if k != "gap"})
        if "gap" in details:
            plan.optimality_gap = details["gap"]
        if budget is not None and peak > budget:
            raise self.infeasible(solver, budget, best=(peak, estimate))
        return plan

    def fastest_plan(self, solver: str) -> Plan:
        return self.plan(solver, self.save_all, None, reason="no memory_budget: fastest plan (recompute nothing)")

    def structural_saved_sets(self) -> list[frozenset[int]]:
        """The leanest saved sets found from structure alone: recompute all that may be, and layer
        checkpointing where the graph has repeated blocks."""
        candidates = [self.save_least]
        blocks = self.blocks()
        if blocks is not None:
            candidates.append(frozenset(blocks.checkpoint_saved(self)))
        return candidates

    @functools.cached_property
    def least_peak(self) -> tuple[int, MemoryEstimate]:
        """(peak, estimate) of the lowest-memory plan the built-in heuristics find: the bound behind
        InfeasibleBudgetError's "smallest predicted-feasible peak"."""
        best = None
        for saved in self.structural_saved_sets():
            estimate = self.simulate(saved)
            if best is None or estimate.peak_bytes_hint < best[1].peak_bytes_hint:
                best = (int(estimate.peak_bytes_hint), estimate)
        return best

    def infeasible(self, solver: str, budget: int, best: tuple[int, MemoryEstimate] | None = None
                   ) -> InfeasibleBudgetError:
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

    def __repr__(self) -> str:
        return (f"GraphCosts({len(self.names)} nodes, {len(self.forward)} forward, {len(self.backward)} backward, "
                f"symbols={sorted(map(str, self.hints))})")


def _reading(value: NodeValue, renamed: Mapping[str, str]) -> NodeValue:
    """``value`` reading (and aliasing) ``renamed[name]`` wherever it read ``name``."""
    if not any(name in renamed for name in value.inputs):
        return value
    outputs = tuple(Output(alias=(renamed.get(o.alias[0], o.alias[0]), o.alias[1]))
                    if o is not None and o.alias is not None else o for o in value.outputs)
    return NodeValue(value.name, outputs, tuple(renamed.get(n, n) for n in value.inputs), value.unknown,
                     value.kernel, value.scratch)


def hints_of_values(values) -> dict:
    """The traced value of every size symbol the (fake) values use; {} when all sizes are static."""
    symbols = set()
    for value in values:
        for leaf in _compat.tree_leaves(value):
            symbols |= _free_symbols(leaf)
    if not symbols:
        return {}
    return _compat.size_hints(_compat.shape_env_of([v for v in values if v is not None]), symbols)


def _free_symbols(leaf) -> set:
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
