"""A backward that recomputes an NF4 weight's forward matmul reuses that dequantized weight for dx.

``nf4.expose_dequantized_weights`` gives each NF4 weight one ``nf4_dequantize`` for its forward matmuls and one of
its own before each backward matmul (dx): the memory of the fused ops it replaced, where the bf16 weight lives only
for its matmul. A plan that recomputes a layer (offload-layers, layer checkpointing, often ``ilp``) then runs two
dequantizes of each weight whose forward matmul is recomputed: for the recomputed matmul, then for dx. Reading
the first for both saves one (Llama-3-8B under layer recompute: q, k, v, o, gate and up in each of 32 layers, 189
dequantizes a step; down is not recomputed, as only the next layer reads its output), at the price of memory inside
one layer's backward: the weight stays alive from the recompute to dx (gate and up: 224 MiB across the MLP's
backward; all six: +0.3 GiB on the predicted peak at 2048 tokens).

As for recomputed attention, the change is kept where it fits a limit (the budget; without one, the plan's peak
plus a small growth the caller allows). Weights are shared in groups of one shape and dtype (the same projection in
every layer: they live alike): all at once if that fits, else group by group, smallest weights first, each kept
if the peak stays within the limit. Which groups fit is read from the plan's own timeline (each shared weight adds
its bytes between its recomputed matmul and dx), since a simulation of a changed 8B graph takes seconds; the
choice is then simulated once on the changed graph, and a group dropped (largest first) while that exceeds the
limit.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from memgraph.graph import TrainingGraph
from memgraph.passes._replan import carried_over, refreshed, resimulated
from memgraph.plan import Plan
from memgraph.units import gib

log = logging.getLogger("memgraph.passes.shared_dequantize")

__all__ = ["shared_dequantize_where_recomputed", "sharable_dequantizes"]


def _dequantize_op():
    return torch.ops.memgraph.nf4_dequantize.default


def sharable_dequantizes(graph: TrainingGraph, costs: Any, plan: Plan) -> dict[str, list[str]]:
    """{forward dequantize the plan recomputes: the backward dequantizes of the same weight and dtype}."""
    op = _dequantize_op()
    recomputed = set(plan.recomputed)
    forward: dict[tuple, str] = {}
    backward: dict[tuple, list[str]] = {}
    for node in graph.joint.graph.find_nodes(op="call_function", target=op):
        key = _weight_key(node)
        if node.name in recomputed:
            forward[key] = node.name
        elif costs.phase[costs.index[node.name]] == "backward":
            backward.setdefault(key, []).append(node.name)
    return {name: backward[key] for key, name in forward.items() if key in backward}


def _weight_key(node: fx.Node) -> tuple:
    """What makes two dequantizes equal: the storage nodes, shape, block sizes and dtype."""
    return tuple(tuple(a) if isinstance(a, list) else a for a in node.args) + tuple(sorted(node.kwargs.items()))


def _groups(graph: TrainingGraph, pairs: dict[str, list[str]]) -> list[list[str]]:
    """The forward dequantizes by weight shape and dtype, groups of the smallest weights first."""
    groups: dict[tuple, list[str]] = {}
    for name in pairs:
        value = graph.node(name).meta["val"]
        groups.setdefault((tuple(value.shape), value.dtype), []).append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (torch.Size(k[0]).numel() * k[1].itemsize, str(k)))]


def _shared_copy(graph: TrainingGraph, pairs: dict[str, list[str]], chosen: list[str]) -> TrainingGraph:
    """A copy of the graph where each chosen forward dequantize replaces its backward twins."""
    own = graph.private_copy()
    for name in chosen:
        weight = own.node(name)
        for twin_name in pairs[name]:
            twin = own.node(twin_name)
            twin.replace_all_uses_with(weight)
            own.joint.graph.erase_node(twin)
    return refreshed(own)


def _extra_bytes(graph: TrainingGraph, costs: Any, pairs: dict[str, list[str]], estimate: Any) -> dict[str, Any]:
    """{forward dequantize: bytes it adds at each step of ``estimate``'s timeline if shared}: its weight, from
    after the last recomputed matmul reading it until its last backward twin is made."""
    import numpy as np

    position: dict[str, int] = {}
    for step, (name, phase) in enumerate(zip(estimate.names, estimate.phases)):
        if phase == "backward":
            position[name] = step
    extra = {}
    for name, twins in pairs.items():
        readers = [matmul.name for view in graph.node(name).users for matmul in view.users] + \
            [user.name for user in graph.node(name).users]
        start = max((position[r] for r in readers if r in position), default=None)
        stop = max((position[t] for t in twins if t in position), default=None)
        added = np.zeros(len(estimate.names), dtype=np.int64)
        if start is not None and stop is not None and stop > start + 1:
            added[start + 1:stop] = costs.output_bytes(costs.index[name])
        extra[name] = added
    return extra


def _choice(groups: list[list[str]], extra: dict[str, Any], during: Any, limit: Optional[int]) -> list[list[str]]:
    """The groups whose sharing the timeline predicts within ``limit``: all if they fit, else smallest first."""
    def peak(chosen: list[list[str]]) -> int:
        return int((during + sum((extra[name] for group in chosen for name in group), 0)).max())

    if limit is None or peak(groups) <= limit:
        return list(groups)
    chosen: list[list[str]] = []
    for group in groups:
        if peak(chosen + [group]) <= limit:
            chosen.append(group)
    return chosen


def shared_dequantize_where_recomputed(graph: TrainingGraph, plan: Plan, costs: Any,
                                       make_costs: Callable[[TrainingGraph], Any],
                                       limit: Optional[int]) -> Optional[tuple[TrainingGraph, Plan, Any]]:
    """(graph, plan, costs) where the plan's recomputed NF4 weights serve dx too, re-simulated on a changed copy of
    the graph, for as many weights as keep the peak within ``limit`` (None: all); None when none can."""
    pairs = sharable_dequantizes(graph, costs, plan)
    if not pairs:
        return None
    estimate = costs.estimate(plan)
    chosen = _choice(_groups(graph, pairs), _extra_bytes(graph, costs, pairs, estimate), estimate.during, limit)
    simulations = 0
    while chosen:
        names = [name for group in chosen for name in group]
        own = _shared_copy(graph, pairs, names)
        changed, own_costs = resimulated(own, plan, make_costs)
        simulations += 1
        if limit is None or changed.peak_bytes <= limit:
            break
        chosen.remove(max(chosen, key=lambda group: costs.output_bytes(costs.index[group[0]])))
    if not chosen:
        log.info("memgraph: recomputed NF4 weights dequantize again for dx: reusing the recomputed ones would peak "
                 "above %s", gib(limit))
        return None
    twins = sum(len(pairs[name]) for name in names)
    note = (f"shared dequantized weights: {len(names)} of {len(pairs)} NF4 weights the plan recomputes serve dx "
            f"too ({twins} dequantizes fewer in backward; predicted peak {gib(plan.peak_bytes)} -> "
            f"{gib(changed.peak_bytes)}, {simulations} simulation(s))")
    log.info("memgraph: %s", note)
    return own, carried_over(plan, changed, note), own_costs
