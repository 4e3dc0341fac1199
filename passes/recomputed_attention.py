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
under a memory budget the change is kept only if the plan still fits. A plan made without a budget (the
solver's own memory choice, e.g. offload-layers) keeps it only if its peak grows by at most
``MAX_PEAK_GROWTH_WITHOUT_BUDGET``: Llama-3-8B's +1.2% at 8192 tokens buys a 5-9% faster step, while at 100k
tokens the same switch would add 1.1 GiB (5%) and cost the longest sequence a 24 GiB card trains.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from memgraph.graph import TrainingGraph
from memgraph.passes._replan import carried_over, refreshed, resimulated
from memgraph.plan import Plan
from memgraph.units import gib

log = logging.getLogger("memgraph.passes.recomputed_attention")

EXACT_BITS = 16
MAX_PEAK_GROWTH_WITHOUT_BUDGET = 0.02  # a plan without a budget keeps its peak within 2% (see the docstring)
_FORWARD_OUTPUTS = ("out", "lse", "k_codes", "k_meta", "v_codes", "v_meta")  # the forward op's tuple, in order
_PACKED = ("k_codes", "k_meta", "v_codes", "v_meta")
_PACKED_ITEMS = tuple(_FORWARD_OUTPUTS.index(name) for name in _PACKED)


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


def _packed_readers(node: fx.Node) -> list[fx.Node]:
    items = _items(node)
    return [user for index in _PACKED_ITEMS if index in items for user in items[index].users]


def quantized_recomputed_attentions(graph: TrainingGraph, plan: Plan) -> list[str]:
    """Names of the forward attention ops with ``kv_bits < 16`` of which the plan keeps nothing for backward and
    whose packed K/V only attention backward ops read (anything else would read the 16-bit op's empty codes)."""
    forward_op, backward_op = _ops()
    saved = set(plan.saved)
    found = []
    for node in graph.joint.graph.find_nodes(op="call_function", target=forward_op):
        if _argument(node, "kv_bits") >= EXACT_BITS or _kept_between(node, saved):
            continue
        readers = _packed_readers(node)
        if readers and all(reader.target is backward_op for reader in readers):
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
    """Run one forward attention op, and the backward ops reading its packed K/V, at 16 bits."""
    backwards = set(_packed_readers(node))
    _set_argument(node, "kv_bits", EXACT_BITS)
    _refresh_fake_values(node)
    out, lse = _output_item(node, _FORWARD_OUTPUTS.index("out")), _output_item(node, _FORWARD_OUTPUTS.index("lse"))
    for backward in backwards:
        for name, value in (("k", _argument(node, "k")), ("v", _argument(node, "v")), ("out", out), ("lse", lse),
                            *((packed, None) for packed in _PACKED), ("kv_bits", EXACT_BITS)):
            _set_argument(backward, name, value)
    for index in _PACKED_ITEMS:  # read by nothing now
        item = _items(node).get(index)
        if item is not None:
            node.graph.erase_node(item)


def _refresh_fake_values(node: fx.Node) -> None:
    """The cost model reads sizes from fake values: at 16 bits the packed outputs are empty (the fake impl's)."""
    from memgraph.kernels.attention import op as attention_op

    if node.meta.get("val") is None:
        return
    q, k, v = (_argument(node, name).meta["val"] for name in ("q", "k", "v"))
    node.meta["val"] = attention_op._attention_fake(q, k, v, kv_bits=EXACT_BITS)
    for index, item in _items(node).items():
        item.meta["val"] = node.meta["val"][index]


def exact_kv_where_recomputed(graph: TrainingGraph, plan: Plan, make_costs,
                              budget: Optional[int]) -> Optional[tuple[TrainingGraph, Plan, Any]]:
    """(graph, plan, costs) with every recomputed quantized attention at 16 bits, the plan re-simulated on the
    changed copy of the graph; None when there is none or the re-simulated peak exceeds ``budget`` (None: the
    plan's own peak plus ``MAX_PEAK_GROWTH_WITHOUT_BUDGET``).

    ``make_costs(graph)`` builds a graph's cost model as the plan's was built."""
    names = quantized_recomputed_attentions(graph, plan)
    if not names:
        return None
    bits = _argument(graph.node(names[0]), "kv_bits")
    own = graph.private_copy()
    for name in names:
        _to_exact(own.node(name))
    own = refreshed(own)
    # only getitems of the packed codes left the graph, and a plan that keeps nothing of these ops names none
    exact, own_costs = resimulated(own, plan, make_costs)
    limit, what = budget, "budget"
    if limit is None and plan.peak_bytes is not None:
        limit, what = int(plan.peak_bytes * (1 + MAX_PEAK_GROWTH_WITHOUT_BUDGET)), f"plan's peak + {MAX_PEAK_GROWTH_WITHOUT_BUDGET:.0%}"
    if limit is not None and exact.peak_bytes > limit:
        log.info("memgraph: %d recomputed attentions keep %d-bit K/V: at 16 bits the plan would peak at %s, above "
                 "the %s %s", len(names), bits, gib(exact.peak_bytes), gib(limit), what)
        return None
    return own, carried_over(plan, exact, f"recomputed attention at 16 bits: {len(names)} attention ops are "
                                          f"recomputed, so none keeps its {bits}-bit K/V between forward and "
                                          f"backward; exact K/V, faster backward (predicted peak "
                                          f"{gib(plan.peak_bytes)} -> {gib(exact.peak_bytes)})"), own_costs
