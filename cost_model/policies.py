"""Which forward values backward may compute again: the policies every solver obeys.

In the words of JAX's remat policies, over the AOTAutograd joint graph: a value may be *recomputed* in
backward unless recomputing it would change the result or repeat an effect. Such a value is *pinned*: if
backward needs it, it is saved. ``never_recompute(node)`` says why a node is pinned (or None).

The dual: a value that saving never pays for is recomputed wherever backward needs it. ``never_save(node)`` says
why (or None): an op registered with ``register_never_saved`` (a frozen weight's dequantized copy: four times the
bytes it is read from, at one read of them) whose inputs are all graph inputs (or views of them).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from memgraph import _compat

__all__ = ["never_recompute", "never_save", "register_never_saved", "is_graph_input_or_view_of_one",
           "is_multi_output"]

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_dtensor", "c10d")


def never_recompute(node: fx.Node) -> str | None:
    """Why ``node`` must not be recomputed (so it is saved if backward needs it), or None if it may be."""
    if node.op == "placeholder":
        return "input"
    if node.op != "call_function":
        return f"{node.op} node"
    target = node.target
    if target is operator.getitem:
        parent = node.args[0]
        return never_recompute(parent) if isinstance(parent, fx.Node) else None
    if _compat.is_higher_order_op(target):
        return "higher-order op"
    if _is_impure(node):
        return "impure (side effects)"
    if _compat.is_op_overload(target):
        if target.namespace in _COLLECTIVE_NAMESPACES:
            return "collective"
        tags = target.tags
        if torch.Tag.nondeterministic_seeded in tags and not _draws_nothing(node):
            return "random (recomputing would draw a fresh mask)"
        if torch.Tag.nondeterministic_bitwise in tags:
            return "not bitwise deterministic"
        if target._schema.is_mutable:
            return "mutates an input"
    return None


# op -> why its output is never saved (when computed from graph inputs alone)
_NEVER_SAVED: dict[object, str] = {}


def register_never_saved(op, reason: str) -> None:
    """Declare an op whose output, computed from graph inputs (parameters) alone, is never worth saving for
    backward: recomputing it reads less than keeping it holds (e.g. dequantizing a 4-bit weight)."""
    _NEVER_SAVED[op] = reason


def never_save(node: fx.Node) -> str | None:
    """Why ``node`` is never saved (so backward recomputes it where it needs it), or None if it may be."""
    reason = _NEVER_SAVED.get(node.target) if node.op == "call_function" else None
    if reason is None or not all(is_graph_input_or_view_of_one(i) for i in node.all_input_nodes):
        return None
    return reason


def is_graph_input_or_view_of_one(node: fx.Node) -> bool:
    """A placeholder, or a view of one through ops whose schema says they alias their input without writing it
    (e.g. bitsandbytes' packed weight viewed as uint8)."""
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        returns = schema.returns if schema is not None else ()
        alias = returns[0].alias_info if len(returns) == 1 else None
        source = node.args[0] if node.args else None
        if alias is None or alias.is_write or not isinstance(source, fx.Node):
            return False
        node = source
    return node.op == "placeholder"


def _is_impure(node: fx.Node) -> bool:
    """Side effects other than drawing random numbers (random ops are judged by ``_draws_nothing``)."""
    try:
        return node.is_impure(impure_random=False)
    except TypeError:  # torch without the keyword does not count random ops as impure
        return node.is_impure()


def _draws_nothing(node: fx.Node) -> bool:
    """A seeded op called with dropout probability 0 (or train=False), given or by default, is deterministic
    (SDPA: HF leaves dropout_p at its default 0 in training)."""
    schema = node.target._schema
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update(zip((a.name for a in schema.arguments), node.args))
    values.update(node.kwargs)
    for name in ("dropout_p", "p"):
        if name in values and isinstance(values[name], (int, float)) and values[name] == 0:
            return True
    return values.get("train", None) is False


def is_multi_output(node: fx.Node) -> bool:
    """An op returning a tuple: the tuple cannot be handed to backward, only its items can."""
    return isinstance(node.meta.get("val"), (tuple, list))
