"""A recomputed attention keeps its K/V at 16 bits.

``kv_bits=4`` shrinks the K/V an attention keeps between forward and backward. When the plan recomputes the
attention instead (offload-layers and layer checkpointing recompute every layer; ``ilp`` often does), nothing of
it waits between forward and backward: the 4-bit K/V would live only from the layer's recompute to its
attention backward, while costing time twice over (quantizing in the forward and again in the recompute; a
backward that dequantizes K/V and recomputes the softmax statistics: 6.14 against 4.89 ms per Llama-3-8B layer
at 8192 tokens on an H100). So such an attention runs at 16 bits: its backward reads K, V, O and the LSE of
the recomputed forward, and is exact.

The price is memory inside one layer's backward (O and 16-bit K/V instead of the packed codes, from the
recompute to the attention backward). The plan is re-simulated on the changed graph with the same saved set;
under a memory budget the change is kept only if the plan still fits.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from memgraph.errors import InfeasibleBudgetError
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan

log = logging.getLogger("memgraph.passes.recomputed_attention")

EXACT_BITS = 16
_FORWARD_OUTPUTS = ("out", "lse", "k_codes", "k_meta", "v_codes", "v_meta")  # the forward op's tuple, in order
_PACKED = ("k_codes", "k_meta", "v_codes", "v_meta")


def _ops():
    return torch.ops.memgraph.attention.default, torch.ops.memgraph.attention_backward.default


def _argument(node: fx.Node, name: str) -> Any:
    schema = node.target._schema
    index = next(i for i, a in enumerate(schema.arguments) if a.name == name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, schema.arguments[index].default_value)


def _set_argument(node: fx.Node, name: str, value: Any) -> None:
    index = next(i for i, a in enumerate(node.target._schema.arguments) if a.name == name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _items(node: fx.Node) -> dict[int, fx.Node]:
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


def _kept_between(node: fx.Node, saved: set[str]) -> bool:
    """Does any output of the forward op (or the op itself) wait between forward and backward?"""
    return node.name in saved or any(item.name in saved for item in _items(node).values())


def quantized_recomputed_attentions(graph: TrainingGraph, plan: Plan) -> list[str]:
    """Names of the forward attention ops with ``kv_bits < 16`` of which the plan keeps nothing for backward."""
    forward_op, backward_op = _ops()
    saved = set(plan.saved)
    found = []
    for node in graph.joint.graph.find_nodes(op="call_function", target=forward_op):
        if _argument(node, "kv_bits") >= EXACT_BITS or _kept_between(node, saved):
            continue
        if any(user.target is backward_op for item in _items(node).values() for user in item.users):
            found.append(node.name)
    return found


def _output_item(node: fx.Node, index: int) -> fx.Node:
    """The forward op's ``getitem(node, index)``, made right after the op when the graph has none (the
    partition moves every getitem next to its op anyway)."""
    items = _items(node)
    if index in items:
        return items[index]
    with node.graph.inserting_after(node):
        item = node.graph.call_function(operator.getitem, (node, index))
    value = node.meta.get("val")
    if value is not None:
        item.meta["val"] = value[index]
    return item


def _to_exact(node: fx.Node) -> None:
    """Run one forward attention op (and the backward ops reading its packed K/V) at 16 bits."""
    from memgraph.kernels.attention import op as attention_op

    forward_op, backward_op = _ops()
    items = _items(node)
    backwards = {user for index in range(2, 6) if index in items for user in items[index].users
                 if user.target is backward_op}
    _set_argument(node, "kv_bits", EXACT_BITS)
    value = node.meta.get("val")
    if value is not None:  # the packed outputs are empty at 16 bits (the op's fake impl says so)
        q, k, v = (_argument(node, name).meta["val"] for name in ("q", "k", "v"))
        node.meta["val"] = attention_op._attention_fake(q, k, v, kv_bits=EXACT_BITS)
    out, lse = _output_item(node, 0), _output_item(node, 1)
    for backward in backwards:
        _set_argument(backward, "k", _argument(node, "k"))
        _set_argument(backward, "v", _argument(node, "v"))
        _set_argument(backward, "out", out)
        _set_argument(backward, "lse", lse)
        for name in _PACKED:
            _set_argument(backward, name, None)
        _set_argument(backward, "kv_bits", EXACT_BITS)
    for index in range(2, 6):
        item = _items(node).get(index)
        if item is not None and not item.users:
            node.graph.erase_node(item)
        elif item is not None and value is not None:
            item.meta["val"] = node.meta["val"][index]


def exact_kv_where_recomputed(graph: TrainingGraph, plan: Plan, costs, make_costs,
                              budget: Optional[int]) -> Optional[tuple[TrainingGraph, Plan, Any]]:
    """(graph, plan, costs) with every recomputed quantized attention at 16 bits, the plan re-simulated on the
    changed graph; None when there is none or the re-simulated plan exceeds ``budget``.

    ``make_costs(graph)`` builds the cost model of a graph as the caller built ``costs``."""
    names = quantized_recomputed_attentions(graph, plan)
    if not names:
        return None
    own = graph.private_copy()
    for name in names:
        _to_exact(own.node(name))
    own.joint.graph.lint()
    own.joint.recompile()
    own = TrainingGraph(own.joint, own.example_inputs, own.num_fwd_outputs, own.static_input_indices,
                        canonical=True)
    own_costs = make_costs(own)
    present = set(own_costs.names)
    try:
        exact = own_costs.plan(plan.solver, own_costs.indices(n for n in plan.saved if n in present), budget,
                               offloaded=own_costs.indices(n for n in plan.offloaded if n in present))
    except InfeasibleBudgetError as error:
        log.info("memgraph: %d recomputed attentions keep 4-bit K/V: at 16 bits the plan would not fit (%s)",
                 len(names), error)
        return None
    exact.solve_seconds, exact.budget_bytes, exact.optimality_gap = (plan.solve_seconds, plan.budget_bytes,
                                                                     plan.optimality_gap)
    exact.details = {**plan.details, **exact.details}
    exact.notes = [*plan.notes, f"recomputed attention at 16 bits: {len(names)} attention ops are recomputed, so "
                                "none keeps K/V between forward and backward; exact K/V, faster backward "
                                f"(predicted peak {_gib(plan.peak_bytes)} -> {_gib(exact.peak_bytes)} GiB)"]
    return own, exact, own_costs


def _gib(value: Optional[int]) -> str:
    return "?" if value is None else f"{value / 2**30:.3f}"
