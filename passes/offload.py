"""Put a plan's offload decisions into the partitioned graphs as ops (``kernels/offload.py``).

For each transfer of ``plan.details["transfers"]`` (placed by ``cost_model.transfers.place_transfers``):
forward gets ``offload_v`` after the value's last use and ``wait_offload_v`` where the plan put it, and hands
``wait_offload_v`` (the host copy) to backward instead of ``v``; backward's placeholder becomes that host copy,
``reload_v`` goes where the plan prefetches it and ``wait_reload_v`` right before the first use, which then
reads it. The decisions stay visible in the graphs, and the node names are the ones the cost model simulated.

With ``captured=True`` (the step replays from CUDA graphs) the same places get the slot ops instead: forward
hands backward a device token, not the host copy (``kernels/offload.py``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from memgraph.cost_model.transfers import (Transfer, Transfers, anchor_bytes, interleave, offload_name, reload_name,
                                           tie_points, wait_offload_name, wait_reload_name)
from memgraph.kernels import offload as _ops  # noqa: F401 - registers memgraph::offload/reload/wait_transfer
from memgraph.plan import Plan

OFFLOAD = torch.ops.memgraph.offload.default
RELOAD = torch.ops.memgraph.reload.default
OFFLOAD_TO_SLOT = torch.ops.memgraph.offload_to_slot.default
RELOAD_FROM_SLOT = torch.ops.memgraph.reload_from_slot.default
WAIT = torch.ops.memgraph.wait_transfer.default
WAIT_CAPTURED = torch.ops.memgraph.wait_captured_transfer.default


def _call(graph: fx.Graph, target, args: tuple, name: str, value) -> fx.Node:
    node = graph.create_node("call_function", target, args, name=name)
    node.meta["val"] = value
    return node


def forward_transfer_nodes(graph: fx.Graph, value: fx.Node, captured: bool = False) -> tuple[fx.Node, fx.Node]:
    """``offload_v`` and ``wait_offload_v`` for ``value`` (created at the graph's insertion point): into a pooled
    host buffer, or with ``captured`` into a slot, handing backward its token."""
    offload_op, wait_op = (OFFLOAD_TO_SLOT, WAIT_CAPTURED) if captured else (OFFLOAD, WAIT)
    handed = offload_op(value.meta["val"])  # what backward gets: the host copy, or the slot's token
    offload = _call(graph, offload_op, (value,), offload_name(value.name), handed)
    wait = _call(graph, wait_op, (offload, value), wait_offload_name(value.name), handed)
    return offload, wait


def backward_transfer_nodes(graph: fx.Graph, handed: fx.Node, value_name: str, device: torch.device,
                            captured: bool = False) -> tuple[fx.Node, fx.Node]:
    """``reload_v`` and ``wait_reload_v`` bringing the value back to ``device`` from what forward handed over
    (the host copy, or with ``captured`` a slot's token)."""
    if captured:
        reload_op, args, wait_op = RELOAD_FROM_SLOT, (handed,), WAIT_CAPTURED
    else:
        reload_op, args, wait_op = RELOAD, (handed, device), WAIT
    fake = reload_op(handed.meta["val"], *args[1:])
    reload = _call(graph, reload_op, args, reload_name(value_name), fake)
    wait = _call(graph, wait_op, (reload, handed), wait_reload_name(value_name), fake)
    return reload, wait


def transfer_nodes(graph: fx.Graph, value: fx.Node, captured: bool = False) -> dict[str, fx.Node]:
    """All four ops of one value in one scratch graph (what the cost model reads their memory from); the
    captured form with ``captured``."""
    offload, wait_offload = forward_transfer_nodes(graph, value, captured)
    reload, wait_reload = backward_transfer_nodes(graph, wait_offload, value.name, value.meta["val"].device,
                                                  captured)
    return {"offload": offload, "wait_offload": wait_offload, "reload": reload, "wait_reload": wait_reload}


def plan_transfers(plan: Plan) -> Transfers:
    return Transfers(tuple(Transfer(**t) for t in plan.details.get("transfers", ())))


def apply_transfers(fw: fx.GraphModule, bw: fx.GraphModule, plan: Plan, num_fwd_outputs: int, *,
                    captured: bool = False) -> None:
    """Insert the plan's transfer ops into the partitioned graphs (in place); with ``captured``, the slot ops
    that CUDA graphs can capture."""
    placed = plan_transfers(plan)
    if not placed.items:
        return
    made = _forward(fw.graph, placed, num_fwd_outputs, captured)
    _backward(bw.graph, placed, made, captured)
    fw.graph.lint()
    bw.graph.lint()
    fw.recompile()
    bw.recompile()


def _forward(graph: fx.Graph, placed: Transfers, num_fwd_outputs: int, captured: bool) -> dict[str, torch.device]:
    nodes = {n.name: n for n in graph.nodes}
    output = graph.find_nodes(op="output")[0]
    order = [n.name for n in graph.nodes if n.op not in ("placeholder", "output")]
    returns = list(output.args[0])
    made: dict[tuple[str, str], fx.Node] = {}
    devices = {}
    for t in placed.items:
        value = nodes[t.value]
        with graph.inserting_before(output):
            made["offload", t.value], made["wait_offload", t.value] = forward_transfer_nodes(graph, value,
                                                                                              captured)
        returns[num_fwd_outputs:] = [made["wait_offload", t.value] if r is value else r
                                     for r in returns[num_fwd_outputs:]]
        devices[t.value] = value.meta["val"].device
    output.args = (type(output.args[0])(returns),)
    _reorder(graph, order, placed, "forward", nodes, made)
    return devices


def _backward(graph: fx.Graph, placed: Transfers, devices: dict[str, torch.device], captured: bool) -> None:
    nodes = {n.name: n for n in graph.nodes}
    order = [n.name for n in graph.nodes if n.op not in ("placeholder", "output")]
    output = graph.find_nodes(op="output")[0]
    made: dict[tuple[str, str], fx.Node] = {}
    for t in placed.items:
        saved = nodes[t.value]
        with graph.inserting_after(saved):
            host = graph.placeholder(wait_offload_name(t.value))
        host.meta.update(saved.meta)
        host.meta["val"] = (OFFLOAD_TO_SLOT if captured else OFFLOAD)(saved.meta["val"])
        with graph.inserting_before(output):
            reload, wait = backward_transfer_nodes(graph, host, t.value, devices[t.value], captured)
        saved.replace_all_uses_with(wait)
        graph.erase_node(saved)
        made["reload", t.value], made["wait_reload", t.value] = reload, wait
    _reorder(graph, order, placed, "backward", nodes, made)


def _reorder(graph: fx.Graph, order: list[str], placed: Transfers, phase: str, nodes: dict[str, fx.Node],
             made: dict[tuple[str, str], fx.Node]) -> None:
    """Move every node before the output in the sequence ``interleave`` gives, and tie each reload and wait to a
    matmul or custom op before it (``after=``; which one: ``transfers.tie_points``)."""
    output = graph.find_nodes(op="output")[0]
    sequence = interleave(order, placed, phase)
    missing = sorted(set(made) - {(kind, name) for kind, name in sequence if kind != "node"})
    if missing:
        raise RuntimeError(f"the {phase} graph lacks the nodes the plan placed transfer ops at: {missing[:4]}")
    elements = [nodes[name] if kind == "node" else made[kind, name] for kind, name in sequence]
    tied = tie_points(sequence, placed, lambda name: anchor_bytes(nodes[name]),
                      lambda position: (n.name for n in elements[position].all_input_nodes),
                      (n.name for n in output.all_input_nodes))
    for (kind, name), element in zip(sequence, elements):
        if (kind, name) in tied:
            element.update_kwarg("after", nodes[tied[kind, name]])
        output.prepend(element)
