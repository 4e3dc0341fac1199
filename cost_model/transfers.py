"""Offload's place in the step: when each offloaded value's copies run, what they cost, and the ops they become.

A saved value backward reads may live in host memory between forward and backward instead of on the device:

    forward:  ... last use of v, offload_v ........ wait_offload_v ...       (v's device memory freed at the wait)
    backward: ... reload_v ........ wait_reload_v, first use of v ...        (device memory again from reload_v)

One transfer stream runs every copy in order, at ``DeviceSpec.host_link_bytes_per_s`` (placed with
``TRANSFER_HEADROOM``: as if each copy took a quarter longer). ``place_transfers`` puts
each wait as early as the copy is predicted done (the compute between a value's last forward use and its wait
hides the copy; a copy not done by the end of forward stalls it) and each reload as late as still hides the
copy before the value's first backward use (earlier costs device memory, later stalls backward), but with at
most one reload ahead of the compute that needs it: the plan chooses how far to prefetch. ``Transfers.stall_seconds`` is the compute time transfers are predicted to add.

The same names and positions are used by the cost model's simulation (``GraphCosts.simulate``) and by the pass
that inserts the ops (``passes/offload.py``), so both describe one timeline.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import torch.fx as fx

    from memgraph.cost_model.graph_costs import GraphCosts

HOST_MEMORY_FRACTION = 0.5  # default offload_budget: this share of the host memory available when planning
# Copies are placed as if they took this much longer than the measured link says. A plan that only just hides its
# copies stalls on the GPU, where the compute between a copy and its wait is a prediction (it may run faster) and
# the link carries the other direction's copies and the embedding rows too: an ilp plan at seq 2048 that filled
# 91% of forward's predicted link time measured 27 ms of its 222 ms step in exposed copies (H100, 2026-12-07).
TRANSFER_HEADROOM = 1.25


def offload_name(value: str) -> str:
    return f"offload_{value}"


def wait_offload_name(value: str) -> str:
    return f"wait_offload_{value}"


def reload_name(value: str) -> str:
    return f"reload_{value}"


def wait_reload_name(value: str) -> str:
    return f"wait_reload_{value}"


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One offloaded value and where its four ops go (node names of the joint graph; None = at the end)."""

    value: str
    nbytes: int
    seconds: float  # one copy, either direction
    offload_after: str  # the value's last forward use (or the value itself)
    wait_before: str | None  # forward node the offload's wait precedes; None: the end of forward
    reload_before: str  # backward node the reload precedes
    needed_by: str  # the value's first backward use (the reload's wait precedes it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Transfers:
    items: tuple[Transfer, ...] = ()
    stall_seconds: float = 0.0  # compute time the copies are predicted to add (not hidden)

    @property
    def host_bytes(self) -> int:
        """Host memory the offloaded values occupy together (all are on the host between forward and backward;
        the pinned pool reuses the buffers from step to step)."""
        return sum(t.nbytes for t in self.items)


def available_host_bytes() -> int:
    """Host memory free now (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        return 0


def default_offload_budget() -> int:
    """A safe share of the host memory available now (``HOST_MEMORY_FRACTION``)."""
    return int(available_host_bytes() * HOST_MEMORY_FRACTION)


def offloadable(costs: "GraphCosts") -> frozenset[int]:
    """Forward values that may live on the host between forward and backward: a single fresh contiguous
    tensor that owns its storage alone among what forward hands over (no saved view or user output shares it;
    those would keep the device copy alive or read a freed one), not a user output, not an input."""
    import torch

    handed_over = set(costs.frontier) | set(costs.forward_outputs)
    shared = {costs.storage_base(j) for j in handed_over if costs.storage_base(j) != j}
    outputs = set(costs.forward_outputs)
    found = set()
    for i in costs.forward:
        if i in costs.primals or i in costs.unsaveable or i in costs.views or i in outputs or i in shared:
            continue
        value = costs.values[i]
        if len(value.outputs) != 1 or value.outputs[0] is None or value.outputs[0].alias is not None:
            continue
        fake = costs.nodes[i].meta.get("val")
        if not isinstance(fake, torch.Tensor) or not fake.is_contiguous() or costs.weight[i] <= 0:
            continue
        found.add(i)
    return frozenset(found)


def place_transfers(costs: "GraphCosts", forward: Sequence[int], backward: Sequence[int],
                    offloaded: Iterable[int]) -> Transfers:
    """Where the ops of ``offloaded`` values go in this forward/backward order, and the stall they add."""
    offloaded = sorted(set(offloaded))
    if not offloaded:
        return Transfers()
    link = costs.device.host_link_bytes_per_s
    fw_position = {i: k for k, i in enumerate(forward)}
    bw_position = {i: k for k, i in enumerate(backward)}
    fw_start = _start_times(costs, forward)
    bw_start = _start_times(costs, backward)

    last_use = {v: max([fw_position[v]] + [fw_position[u] for u in _readers(costs, v) if u in fw_position])
                for v in offloaded}
    first_use = {v: min(bw_position[u] for u in costs.users[v] if u in bw_position) for v in offloaded}
    nbytes = {v: int(costs.weight[v]) for v in offloaded}
    seconds = {v: nbytes[v] / link for v in offloaded}
    planned = {v: seconds[v] * TRANSFER_HEADROOM for v in offloaded}  # what placement and stalls assume

    # forward: copies queue on the transfer stream in the order they are issued
    stall = 0.0
    stream_free = 0.0
    wait_at: dict[int, int | None] = {}
    for v in sorted(offloaded, key=lambda v: (last_use[v], v)):
        issued = fw_start[last_use[v] + 1]
        done = max(issued, stream_free) + planned[v]
        stream_free = done
        later = next((k for k in range(last_use[v] + 1, len(forward)) if fw_start[k] >= done), None)
        wait_at[v] = later
        if later is None:
            stall = max(stall, done - fw_start[len(forward)])

    # backward: each reload as late as still hides its copy, but not before the previous offloaded value's first
    # use (one reload in flight ahead of compute: prefetching further would hold several values at once)
    reload_at: dict[int, int] = {}
    floor = 0
    for v in sorted(offloaded, key=lambda v: (first_use[v], v)):
        target = bw_start[first_use[v]] - planned[v]
        hidden = max([k for k in range(first_use[v] + 1) if bw_start[k] <= target], default=0)
        reload_at[v] = max(hidden, min(floor, first_use[v]))
        floor = first_use[v]
    stream_free = 0.0
    backward_stall = 0.0
    for v in sorted(offloaded, key=lambda v: (reload_at[v], first_use[v], v)):
        done = max(bw_start[reload_at[v]], stream_free) + planned[v]
        stream_free = done
        backward_stall = max(backward_stall, done - bw_start[first_use[v]])

    items = tuple(Transfer(
        value=costs.names[v], nbytes=nbytes[v], seconds=seconds[v],
        offload_after=costs.names[forward[last_use[v]]],
        wait_before=None if wait_at[v] is None else costs.names[forward[wait_at[v]]],
        reload_before=costs.names[backward[reload_at[v]]],
        needed_by=costs.names[backward[first_use[v]]]) for v in offloaded)
    return Transfers(items, stall_seconds=float(max(stall, 0.0) + max(backward_stall, 0.0)))


def _start_times(costs: "GraphCosts", order: Sequence[int]) -> list[float]:
    """Predicted start time of each node (and the end, at index len(order)) when nothing stalls."""
    times = [0.0]
    for i in order:
        times.append(times[-1] + float(costs.seconds[i]))
    return times


def _readers(costs: "GraphCosts", value: int) -> list[int]:
    """Nodes that read ``value``'s storage: its users and the users of its views."""
    readers, stack, seen = [], [value], set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for u in costs.users[i]:
            readers.append(u)
            if u in costs.views and costs.storage_base(u) == value:
                stack.append(u)
    return readers


def interleave(order: Sequence[str], transfers: Transfers, phase: str) -> list[tuple[str, str]]:
    """``order`` (node names of one graph) with the transfer ops of ``phase`` ("forward"/"backward") placed:
    a list of (kind, name), kind "node" or one of "offload", "wait_offload", "reload", "wait_reload" (name: the
    offloaded value's). Ops anchored at the same node keep the order of ``transfers.items``."""
    after: dict[str, list[tuple[str, str]]] = {}
    before: dict[str | None, list[tuple[str, str]]] = {}
    for t in transfers.items:
        if phase == "forward":
            after.setdefault(t.offload_after, []).append(("offload", t.value))
            before.setdefault(t.wait_before, []).append(("wait_offload", t.value))
        else:
            before.setdefault(t.reload_before, []).append(("reload", t.value))
    if phase == "backward":  # a wait right before the first use, after any reload anchored there
        for t in transfers.items:
            before.setdefault(t.needed_by, []).append(("wait_reload", t.value))
    sequence: list[tuple[str, str]] = []
    for name in order:
        sequence.extend(before.get(name, ()))
        sequence.append(("node", name))
        sequence.extend(after.get(name, ()))
    sequence.extend(before.get(None, ()))
    return sequence


TIED = ("reload", "wait_offload", "wait_reload")  # transfer ops Inductor's scheduler could run earlier than planned
# How much larger than the transferred value a tie may be kept a few ops longer: an MLP's up-projection output is
# 3.5x a Llama layer input (the usual nearest matmul); logits (30x and more) are not held for a tie.
TIE_BYTES_PER_BYTE = 4


def tie_points(sequence: Sequence[tuple[str, str]], transfers: Transfers, anchor_bytes: Callable[[str], int | None],
               reads: Callable[[int], Iterable[str]], outputs: Iterable[str]) -> dict[tuple[str, str], str]:
    """For each reload and wait of an ``interleave`` sequence, the node the op reads as ``after=`` (the data
    dependency keeps Inductor from running the op earlier than planned, ``kernels/offload.py``): the nearest node
    before it that Inductor writes to a buffer of its own (``anchor_bytes``: its bytes, None for other nodes), if
    it is at most ``TIE_BYTES_PER_BYTE`` times the transferred value (it lives a few ops longer, which the cost
    model counts); else the nearest one alive past the op anyway (a later element ``reads`` it, or it is one of
    the graph's ``outputs``), which costs nothing. Neither: the op is not tied."""
    last_read = {}
    for position in range(len(sequence)):
        for name in reads(position):
            last_read[name] = position
    last_read.update(dict.fromkeys(outputs, len(sequence)))
    nbytes = {t.value: t.nbytes for t in transfers.items}
    tied, candidates = {}, []
    for position, (kind, name) in enumerate(sequence):
        if kind == "node":
            if anchor_bytes(name) is not None:
                candidates.append(name)
        elif kind in TIED and candidates:
            nearest = candidates[-1]
            alive = [c for c in candidates[:-1] if last_read.get(c, -1) > position]  # the dead stay dead
            if anchor_bytes(nearest) <= TIE_BYTES_PER_BYTE * nbytes[name] or last_read.get(nearest, -1) > position:
                tied[kind, name] = nearest
            elif alive:
                tied[kind, name] = alive[-1]
            candidates = alive + [nearest]  # the nearest stays a candidate for the next ops by its size
    return tied


def anchor_bytes(node: fx.Node) -> int | None:
    """The bytes of ``node``'s tensor if Inductor's code writes it into a buffer of its own anyway (a matmul, a
    custom op), else None: a view orders nothing, and a transfer op reading a fused value would make Inductor
    store it."""
    import torch

    from memgraph import _compat
    from memgraph.cost_model.inductor import EXTERN, kernel_info

    value = node.meta.get("val")
    if node.op != "call_function" or not isinstance(value, torch.Tensor) or kernel_info(node).kind != EXTERN:
        return None
    numel = 1
    for size in value.shape:
        numel *= _compat.concrete_int(size)
    return numel * value.element_size()
