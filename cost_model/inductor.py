"""Which values Inductor materializes, and when it writes a kernel's output into a dying input.

The eager model allocates every node's output. Inductor (``codegen="inductor"``) instead lowers each graph to
kernels: a pointwise value is computed inside its consumers' kernels unless something forces it into a
buffer. ``inductor_kernels`` rewrites one graph's node values into the buffers Inductor allocates, so the
same liveness sweep (``memory.run_phase``) predicts Inductor's memory. The rules follow torch/_inductor
(``graph.py: GraphLowering.run_node``, ``ir.py: StorageBox.realize_hint/should_realize_on_reuse``,
``lowering.py: make_reduction``, ``scheduler.py: decide_inplace_update``):

* Materialized (a "buffer"): outputs of extern kernels (mm/addmm/bmm/convolution, SDPA and other
  fallbacks, random ops with ``fallback_random``, custom ops such as ``memgraph::*`` and ``bitsandbytes::*``)
  and the inputs they read (``ExternKernel.realize_input``); reductions, concatenations and scans (their
  pointwise inputs are inlined); graph outputs (user outputs, saved activations, gradients).
* A pointwise value with several users is materialized when one user is an op in Inductor's
  ``needs_realized_inputs`` and it reads more than one buffer, when it reads more than
  ``realize_reads_threshold`` buffers, when its inlined expression exceeds ``realize_opcount_threshold``,
  or, on the CPU, when it computes exp/log/sigmoid/tanh. Any pointwise value reading more than
  ``realize_acc_reads_threshold`` buffers is materialized. Everything else lives only inside kernels.
* A view of a buffer is that buffer; a view of an inlined value is inlined (materializing it materializes
  its base).
* A materialized value's kernel reads the buffers its inlined inputs read, so those stay alive until it
  runs and are freed after it.
* In-place reuse: a pointwise kernel whose input buffer dies at that kernel, read elementwise (same
  number of elements, no permuting view in between) with the output's dtype and size, writes its output
  into that buffer instead of allocating (``inplace_buffers``). Backward's saved activations are donated
  buffers and qualify; forward inputs and buffers still needed later do not.

* Fusion (``fuse_kernels``): buffer kernels over the same elements that share a read fuse into one
  multi-output kernel, placed as the scheduler places it; its outputs are allocated together and its inputs
  freed after it.

Buffer reuse between dead and new buffers of equal size (``allow_buffer_reuse``) does not change the bytes
allocated, and the scheduler's later reordering for peak memory (``reorder_for_peak_memory``) is not modelled.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from typing import Sequence

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model.symbolic import Size, as_size
from memgraph.cost_model.values import NodeValue, Output

log = logging.getLogger("memgraph.cost_model")

aten = torch.ops.aten

EXTERN, BUFFER, POINTWISE, VIEW, INPUT = "extern", "buffer", "pointwise", "view", "input"

# Ops Inductor lowers to a reduction, scan or concatenation: their output is a buffer, their inputs inline.
_BUFFER_OPS = {"sum", "mean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "var", "var_mean", "std",
               "std_mean", "any", "all", "logsumexp", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin",
               "cat", "nansum", "_log_softmax", "_softmax", "native_layer_norm", "native_group_norm",
               "native_batch_norm", "_native_batch_norm_legit_functional", "nll_loss_forward"}
# Matmul-like ops Inductor hands to extern kernels (its lowerings realize their inputs).
_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "_int_mm", "_scaled_mm", "convolution", "convolution_backward",
               "_convolution"}
# Ops whose inlined use of exp/log/sigmoid/tanh makes the CPU backend materialize a reused value.
_HEAVY_OPS = {"exp", "exp2", "log", "log10", "log1p", "log2", "sigmoid", "tanh", "_log_softmax", "_softmax",
              "silu", "logsumexp"}
# Views after which a buffer is no longer read at the output's own index (no in-place reuse through them).
_REINDEXING_VIEWS = {"permute", "transpose", "t", "expand", "slice", "select", "as_strided", "diagonal",
                     "unfold", "narrow", "split", "split_with_sizes", "chunk", "unbind", "movedim"}

# Inductor's thresholds (torch/_inductor/config.py), GPU / CPU.
REALIZE_READS_THRESHOLD = 4
OPCOUNT_THRESHOLD = {False: 30, True: 50}
ACC_READS_THRESHOLD = {False: 8, True: 12}
LARGE_INNER_FN_OPS = 100


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """What Inductor's lowering of one FX node decides with: how it lowers, and the output's layout."""

    kind: str  # extern / buffer / pointwise / view / input
    realizes_reused_inputs: bool  # in ``needs_realized_inputs``: a reused input with >1 reads is realized
    heavy: bool  # computes exp/log/sigmoid/tanh (the CPU backend materializes such values when reused)
    reindexes: bool  # a view that permutes, broadcasts or slices its input
    concat: bool  # a concatenation: Inductor writes its inputs into it and never reuses it in place
    cpu: bool
    dtype: torch.dtype | None
    numel: Size | None


def kernel_info(node: fx.Node) -> KernelInfo:
    value = node.meta.get("val")
    tensor = value if isinstance(value, torch.Tensor) else None
    numel = None
    if tensor is not None:
        numel = 1
        for dim in tensor.shape:
            numel = numel * as_size(dim)
    name = _op_name(node.target) if node.op == "call_function" else ""
    return KernelInfo(
        kind=INPUT if node.op == "placeholder" else _kind(node),
        realizes_reused_inputs=node.op == "call_function" and _needs_realized_inputs(node.target),
        heavy=name in _HEAVY_OPS,
        reindexes=name in _REINDEXING_VIEWS,
        concat=name == "cat",
        cpu=tensor is not None and tensor.device.type == "cpu",
        dtype=tensor.dtype if tensor is not None else None,
        numel=numel,
    )


def with_kernel(value: NodeValue, node: fx.Node) -> NodeValue:
    """``value`` carrying its node's ``KernelInfo`` (what ``inductor_kernels`` reads)."""
    return dataclasses.replace(value, kernel=kernel_info(node))


def _op_name(target) -> str:
    if _compat.is_op_overload(target):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def _kind(node: fx.Node) -> str:
    if node.op != "call_function":
        return EXTERN
    if _is_view(node):
        return VIEW
    return _target_kind(node.target)


def _is_view(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    return _compat.is_op_overload(target) and (target.is_view or target in (
        aten._unsafe_view.default, aten.alias.default, aten.detach.default, aten.lift_fresh.default))


@functools.lru_cache(maxsize=None)
def _target_kind(target) -> str:
    if not _compat.is_op_overload(target) or target.namespace not in ("aten", "prims"):
        return EXTERN  # custom ops, higher-order ops, Python callables: extern or fallback kernels
    name = _op_name(target)
    if torch.Tag.nondeterministic_seeded in target.tags:
        return EXTERN  # random ops (memgraph compiles with fallback_random)
    if name in _MATMUL_OPS or _needs_realized_inputs(target) or not _has_lowering(target):
        return EXTERN
    if torch.Tag.pointwise in target.tags:
        return POINTWISE
    if name in _BUFFER_OPS or target._schema.is_mutable:
        return BUFFER
    return POINTWISE  # indexing, fills, pads, scatters into fresh tensors: lowered as inlinable loops


@functools.lru_cache(maxsize=None)
def _needs_realized_inputs(target) -> bool:
    return _compat.inductor_needs_realized_inputs(target)


@functools.lru_cache(maxsize=None)
def _has_lowering(target) -> bool:
    return _compat.inductor_has_lowering(target)


@dataclasses.dataclass
class _Inlined:
    """A value living only inside kernels: the buffers its expression reads and how big the expression is."""

    reads: frozenset[str]  # buffers that must stay alive until the kernel computing it runs
    aligned: frozenset[str]  # reads at the value's own index (in-place candidates)
    ops: int
    heavy: bool
    base: str | None  # for an inlined view: the value it views
    counted: frozenset[str] | None = None  # the reads Inductor's heuristics count, if not ``reads``

    @property
    def counted_reads(self) -> frozenset[str]:
        return self.reads if self.counted is None else self.counted


class _Lowering:
    """Walks one graph in order, deciding per value buffer-or-inlined, and emits the buffers' steps."""

    def __init__(self, nodes: Sequence[NodeValue], outputs: Sequence[str], given: set[str]):
        self.values = {v.name: v for v in nodes}
        self.outputs = set(outputs)
        self.given = given
        self.users: dict[str, set[str]] = {}
        for value in nodes:
            for name in value.inputs:
                self.users.setdefault(name, set()).add(value.name)
        for name in outputs:
            self.users.setdefault(name, set()).add("output")
        self.inlined: dict[str, _Inlined] = {}
        self.aligned: dict[str, frozenset[str]] = {}  # emitted pointwise buffer -> its in-place candidates
        self.emitted: list[NodeValue] = []

    # --- reading values -------------------------------------------------------------------------------
    def reads(self, names: Sequence[str]) -> tuple[str, ...]:
        """The buffers a kernel reading ``names`` reads: inlined values are replaced by their reads."""
        result: dict[str, None] = {}
        for name in names:
            if name in self.inlined:
                result.update(dict.fromkeys(sorted(self.inlined[name].reads)))
            else:
                result[name] = None
        return tuple(result)

    def info(self, name: str) -> KernelInfo | None:
        value = self.values.get(name)
        return value.kernel if value is not None else None

    # --- decisions ------------------------------------------------------------------------------------
    def lower(self, value: NodeValue) -> None:
        info = value.kernel
        if value.name in self.given or info is None or info.kind == INPUT:
            self.emitted.append(value)
            return
        if info.kind == VIEW:
            self.lower_view(value)
        elif info.kind == POINTWISE and _single_fresh_output(value):
            self.inline_pointwise(value)
        else:
            if info.kind != BUFFER:  # extern kernels read materialized inputs
                for name in value.inputs:
                    self.realize(name)
            self.emit(value)
            return
        if value.name in self.inlined:
            self.realize_if_reused(value)

    def lower_view(self, value: NodeValue) -> None:
        source = _alias_source(value)
        if source is None or source not in self.inlined:
            self.emit(value)
            return
        inner = self.inlined[source]
        aligned = frozenset() if value.kernel.reindexes else inner.aligned
        self.inlined[value.name] = _Inlined(inner.reads, aligned, inner.ops, inner.heavy, source)

    def inline_pointwise(self, value: NodeValue) -> None:
        reads: set[str] = set()
        counted: set[str] = set()
        aligned: set[str] = set()
        ops, heavy = 1, value.kernel.heavy
        for name in value.inputs:
            inner = self.inlined.get(name)
            same_extent = _same_numel(self.info(name), value.kernel)
            if inner is None:
                reads.add(name)
                counted.add(name)
                ops += 1
                if same_extent and _dtype_of(self.info(name)) is not None:
                    aligned.add(name)
            else:
                reads |= inner.reads
                counted |= inner.counted_reads
                ops += inner.ops
                heavy = heavy or inner.heavy
                if same_extent:
                    aligned |= inner.aligned
        self.inlined[value.name] = _Inlined(frozenset(reads), frozenset(aligned), ops, heavy, None,
                                            frozenset(counted))

    def realize_if_reused(self, value: NodeValue) -> None:
        """GraphLowering.run_node's realization rules, applied as the node is lowered."""
        inner = self.inlined[value.name]
        cpu = value.kernel.cpu
        num_reads = len(inner.counted_reads)
        users = self.users.get(value.name, set())
        if len(users) > 1:
            hinted = any((self.info(u) is not None and self.info(u).realizes_reused_inputs) for u in users)
            if "output" in users or (hinted and num_reads > 1):
                self.realize(value.name)
                return
            if (cpu and inner.heavy) or inner.ops > OPCOUNT_THRESHOLD[cpu] or num_reads > REALIZE_READS_THRESHOLD:
                self.realize_unless_kernel_local(value)
                return
        too_many_reads = num_reads > ACC_READS_THRESHOLD[cpu] or inner.ops > OPCOUNT_THRESHOLD[cpu]
        if (too_many_reads and num_reads > 1) or inner.ops > LARGE_INNER_FN_OPS:
            self.realize_unless_kernel_local(value)

    def realize_unless_kernel_local(self, value: NodeValue) -> None:
        """A buffer whose users all fuse into its own kernel is never allocated (the scheduler drops
        kernel-local buffers); Inductor's heuristics then count it as one read."""
        if self.fuses_into_users(value.name, value.kernel.numel):
            inner = self.inlined[value.name]
            self.inlined[value.name] = dataclasses.replace(inner, ops=1, heavy=False, counted=frozenset({value.name}))
        else:
            self.realize(value.name)

    def fuses_into_users(self, name: str, numel: Size | None) -> bool:
        """Whether every kernel reading ``name`` loops over the same elements (a reduction of them, or
        pointwise work on them), following views and pointwise users, which inline into their own users."""
        for user in self.users.get(name, ()):
            info = self.info(user)
            if info is None or info.kind in (EXTERN, INPUT) or info.concat:
                return False
            if info.kind in (VIEW, POINTWISE) and (info.numel != numel or not self.fuses_into_users(user, numel)):
                return False
        return True

    def realize(self, name: str) -> None:
        """Materialize an inlined value now (its base first, for a view)."""
        inner = self.inlined.get(name)
        if inner is None:
            return
        if inner.base is not None:
            self.realize(inner.base)
            del self.inlined[name]
            self.emit(self.values[name])
            return
        del self.inlined[name]
        self.emitted.append(dataclasses.replace(self.values[name], inputs=tuple(sorted(inner.reads))))
        if _dtype_of(self.values[name].kernel) is not None:
            self.aligned[name] = inner.aligned

    def emit(self, value: NodeValue) -> None:
        self.emitted.append(dataclasses.replace(value, inputs=self.reads(value.inputs)))

    def finish(self) -> list[NodeValue]:
        for name in self.outputs:  # graph outputs are realized at the end (GraphLowering.output)
            self.realize(name)
        return self.emitted


def _single_fresh_output(value: NodeValue) -> bool:
    return len(value.outputs) == 1 and value.outputs[0] is not None and value.outputs[0].alias is None


def _alias_source(value: NodeValue) -> str | None:
    for output in value.outputs:
        if output is not None and output.alias is not None:
            return output.alias[0]
    return value.inputs[0] if value.inputs else None


def _dtype_of(info: KernelInfo | None):
    return info.dtype if info is not None else None


def _same_numel(a: KernelInfo | None, b: KernelInfo | None) -> bool:
    return a is not None and b is not None and a.numel is not None and a.numel == b.numel


def _reuse_in_place(emitted: list[NodeValue], aligned: dict[str, frozenset[str]], outputs: Sequence[str],
                    given: set[str], donated: set[str]) -> list[NodeValue]:
    """Let a pointwise kernel write into an input buffer that dies at it (same dtype and size)."""
    root: dict[tuple[str, int], tuple[str, int]] = {}
    by_name = {v.name: v for v in emitted}

    def root_of(name: str, index: int = 0) -> tuple[str, int]:
        return root.get((name, index), (name, index))

    def resolve(value: NodeValue) -> None:
        for index, output in enumerate(value.outputs):
            if output is not None and output.alias is not None:
                root[(value.name, index)] = root_of(*output.alias)

    last_use: dict[tuple[str, int], int] = {}
    for position, value in enumerate(emitted):
        resolve(value)
        for name in value.inputs:
            for index in range(max(1, len(by_name[name].outputs) if name in by_name else 1)):
                last_use[root_of(name, index)] = position
    kept = {root_of(name, i) for name in outputs
            for i in range(max(1, len(by_name[name].outputs) if name in by_name else 1))}
    root.clear()

    result: list[NodeValue] = []
    for position, value in enumerate(emitted):
        resolve(value)
        candidates = aligned.get(value.name)
        if candidates and _single_fresh_output(value):
            target = _in_place_target(value, candidates, position, last_use, kept, given, donated, by_name, root_of)
            if target is not None:
                value = dataclasses.replace(value, outputs=(Output(alias=target),))
                root[(value.name, 0)] = root_of(*target)
                here = last_use.get((value.name, 0), position)
                last_use[root_of(*target)] = max(position, here)
                if (value.name, 0) in kept:
                    kept.add(root_of(*target))
        result.append(value)
    return result


def _in_place_target(value: NodeValue, candidates, position, last_use, kept, given, donated, by_name, root_of):
    for name in sorted(candidates):
        producer = by_name.get(name)
        if producer is None or len(producer.outputs) != 1:
            continue
        target = root_of(name, 0)
        owner = by_name.get(target[0])
        if owner is None or (target[0] in given and target[0] not in donated) or target in kept:
            continue
        if last_use.get(target) != position or owner.kernel is None or owner.kernel.dtype != value.kernel.dtype:
            continue
        if owner.kernel.concat:
            continue
        fresh = owner.outputs[target[1]] if target[1] < len(owner.outputs) else None
        if fresh is not None and fresh.alias is None and fresh.nbytes == value.outputs[0].nbytes:
            return target
    return None


def inductor_kernels(nodes: Sequence[NodeValue], outputs: Sequence[str], *, given: Sequence[str] = (),
                     donated: Sequence[str] = ()) -> list[NodeValue]:
    """The buffers Inductor allocates for one graph, as node values for ``memory.run_phase``.

    nodes: the graph's values in order, each with its ``kernel`` (``KernelInfo``); outputs: the names it
    returns; given: values that exist before it runs (its placeholders); donated: given values it may
    overwrite once dead (backward's saved activations). Inlined values disappear; a materialized value's
    inputs become the buffers its kernel reads; an in-place kernel's output becomes an alias of its input.
    """
    given_set = set(given)
    lowering, emitted = _lowered(nodes, outputs, given_set)
    return _reuse_in_place(fuse_kernels(emitted, given_set), lowering.aligned, outputs, given_set, set(donated))


def kernel_reads(nodes: Sequence[NodeValue], outputs: Sequence[str], *, given: Sequence[str] = ()
                 ) -> dict[str, tuple[str, ...] | None]:
    """Per value of one graph: the buffers the kernel that writes it reads (its inlined inputs replaced by what
    they read), or None where Inductor computes it inside its users' kernels and never writes it."""
    lowering, emitted = _lowered(nodes, outputs, set(given))
    reads = {value.name: value.inputs for value in emitted}
    return {value.name: None if value.name in lowering.inlined else reads.get(value.name, value.inputs)
            for value in nodes}


def _lowered(nodes: Sequence[NodeValue], outputs: Sequence[str], given: set[str]) -> tuple[_Lowering, list[NodeValue]]:
    """One graph lowered value by value: the lowering (what it inlined) and the buffers it emitted."""
    lowering = _Lowering(nodes, outputs, given)
    for value in nodes:
        lowering.lower(value)
    return lowering, lowering.finish()


# --- the scheduler's fusion ---------------------------------------------------------------------------
# Inductor's scheduler (scheduler.py: fuse_nodes / can_fuse / topological_sort_schedule) fuses buffer
# kernels that loop over the same elements and share a read (or where one reads the other) into one
# multi-output kernel, unless that would put a node outside the kernel both after and before it (a cycle).
# The fused kernel takes its earliest member's place, with what its later members read scheduled first;
# all its outputs are allocated before it runs and its inputs freed after it. In a recomputed SwiGLU MLP's
# backward that is one kernel holding the recomputed activations, their float32 LoRA copies and the
# gradients at once, which a sweep in graph order does not see.
FUSION_WINDOW = 64  # config.max_fusion_buffer_group_pairwise_attempts: candidates within this many nodes
MAX_FUSION_SIZE = 64  # config.max_fusion_size


def fuse_kernels(emitted: list[NodeValue], given: set[str]) -> list[NodeValue]:
    """``emitted`` reordered so that each fused kernel's members are adjacent, marked with ``fused``."""
    position = {v.name: i for i, v in enumerate(emitted)}
    producers = [tuple(position[n] for n in v.inputs if n in position) for v in emitted]
    extents = [_loop_extent(v, emitted, position) for v in emitted]
    fusible = [_fusible(v, given) and extents[i] is not None for i, v in enumerate(emitted)]
    reads = [set(v.inputs) for v in emitted]
    group = list(range(len(emitted)))  # each node's group: the index of its earliest member
    members: dict[int, list[int]] = {i: [i] for i in range(len(emitted))}
    latest = list(range(len(emitted)))  # each group's last member (valid at the group's index)
    for b in range(len(emitted)):
        if not fusible[b]:
            continue
        for a in range(b - 1, max(-1, b - FUSION_WINDOW - 1), -1):
            target = group[a]
            if (not fusible[a] or target == group[b] or extents[a] != extents[b]
                    or not (reads[b] & reads[a] or emitted[a].name in reads[b])
                    or len(members[target]) >= MAX_FUSION_SIZE
                    or _reaches_outside(b, target, members, group, latest, producers)):
                continue
            members[target].append(b)
            del members[group[b]]
            group[b] = target
            latest[target] = b
            break  # one fused kernel per node (Inductor may merge more; this keeps the check pairwise)
    fused_id = {g: g for g, m in members.items() if len(m) > 1}
    try:
        order = _schedule(members, group, producers)
    except _KernelCycle as cycle:  # a fusion the check above missed: the graph's own order, unfused
        log.warning("memgraph cost model: %s; predicting this graph's kernels unfused", cycle)
        return emitted
    return [dataclasses.replace(emitted[i], fused=fused_id.get(group[i])) if group[i] in fused_id else emitted[i]
            for i in order]


def _fusible(value: NodeValue, given: set[str]) -> bool:
    info = value.kernel
    return (info is not None and info.kind in (POINTWISE, BUFFER) and not info.concat and value.name not in given
            and bool(value.outputs) and all(o is not None and o.alias is None for o in value.outputs))


def _loop_extent(value: NodeValue, emitted: list[NodeValue], position: dict[str, int]) -> Size | None:
    """The elements a kernel loops over: its output's, or a reduction's input's (the larger)."""
    extents = [value.kernel.numel] if value.kernel is not None and value.kernel.numel is not None else []
    for name in value.inputs:
        info = emitted[position[name]].kernel if name in position else None
        if info is not None and info.numel is not None:
            extents.append(info.numel)
    if not extents:
        return None
    best = extents[0]
    for extent in extents[1:]:
        try:
            if bool(extent > best):
                best = extent
        except TypeError:  # symbolic sizes that do not compare: not a fusion candidate
            return None
    return best


def _reaches_outside(b: int, target: int, members: dict[int, list[int]], group: list[int], latest: list[int],
                     producers: list[tuple[int, ...]]) -> bool:
    """Whether ``b`` depends on a member of group ``target`` through a kernel outside it (fusing would be a
    cycle). A node already fused elsewhere runs with its whole kernel, so what any member of that kernel reads
    counts too: two kernels must never need each other."""
    inside = set(members[target])
    earliest = min(inside)
    stack = [p for p in producers[b] if p not in inside]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        kernel = group[node]
        if kernel in seen or (node not in inside and latest[kernel] < earliest):  # wholly before: cannot need it
            continue
        if node in inside:
            return True
        seen.add(kernel)
        stack.extend(p for m in members[kernel] for p in producers[m])
    return False


class _KernelCycle(Exception):
    """Two fused kernels each read what the other writes."""


def _schedule(members: dict[int, list[int]], group: list[int], producers: list[tuple[int, ...]]) -> list[int]:
    """Kernels in their earliest member's order, each after everything its members read (depth first)."""
    done: set[int] = set()
    open_units: set[int] = set()  # expanded, waiting for what they read: meeting one again is a cycle
    order: list[int] = []
    for root in sorted(members):
        stack = [(root, False)]
        while stack:
            unit, expanded = stack.pop()
            if unit in done:
                continue
            if expanded:
                open_units.discard(unit)
                done.add(unit)
                order.extend(sorted(members[unit]))
                continue
            if unit in open_units:
                raise _KernelCycle(f"the kernels at nodes {min(members[unit])} and after need each other")
            open_units.add(unit)
            stack.append((unit, True))
            needed = sorted({group[p] for m in members[unit] for p in producers[m]} - {unit} - done, reverse=True)
            stack.extend((dep, False) for dep in needed)
    return order
