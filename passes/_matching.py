"""What the rewrites share to read Dynamo's graph: a node's example value, a call's arguments by name, the
exception that says why a pattern is left alone, the example value of an op a rewrite inserts, and the scalar
chains models put on scores (a constant scale, Gemma 2's soft-cap) walked back to what they transform."""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from memgraph import _compat

log = logging.getLogger("memgraph.passes")


class Unsupported(Exception):
    """Why a call is left as it is (logged by the rewrite, never raised to the user)."""


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (None for constants and nodes without one)."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def call_arguments(node: fx.Node, parameters: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name, defaults filled in; Unsupported for anything unexpected."""
    if len(node.args) > len(parameters):
        raise Unsupported(f"unexpected positional arguments {node.args}")
    arguments = dict(defaults)
    arguments.update(zip(parameters, node.args))
    unknown = set(node.kwargs) - set(parameters)
    if unknown:
        raise Unsupported(f"unknown keyword argument(s) {sorted(unknown)}")
    arguments.update(node.kwargs)
    return arguments


# What describes a node's own value, never copied to a node a rewrite installs beside or in place of it.
VALUE_META = ("val", "tensor_meta", "example_value", "eager_input_vals")

# What a node installed in place of another inherits from it: where it came from, for errors, profiles and AOT.
TRACE_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr")


def copy_trace_meta(source: fx.Node, *targets: fx.Node) -> None:
    """Give the nodes a rewrite installs the provenance metadata of the node they replace."""
    for key in TRACE_KEYS:
        if key in source.meta:
            for target in targets:
                target.meta[key] = source.meta[key]


def fake_run(op, arguments: tuple) -> Any:
    """``op``'s outputs on the example (fake) values of ``arguments``, for later passes that read
    ``node.meta["example_value"]``; None when there are none to run on (metadata only: never raises)."""
    values = [example_value(a) if isinstance(a, fx.Node) else a for a in arguments]
    fake_mode = _compat.fake_mode_of([v for v in values if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        return None
    try:
        with fake_mode:
            return op(*values)
    except Exception as error:  # noqa: BLE001 - metadata only
        log.debug("memgraph: no example value for %s (%s)", op, error)
        return None


def record_example_values(nodes: Sequence[fx.Node]) -> None:
    """Give nodes a rewrite inserted (in order; each reads example values or earlier ones) their example values,
    run on the graph's fake tensors (metadata only: never raises)."""
    inputs = [example_value(a) for n in nodes for a in n.all_input_nodes]
    fake_mode = _compat.fake_mode_of([v for v in inputs if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        return
    try:
        with fake_mode:
            for node in nodes:
                function = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
                args, kwargs = fx.map_arg((node.args, node.kwargs), example_value)
                node.meta["example_value"] = function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - metadata only
        log.debug("memgraph: no example values for %s (%s)", [n.name for n in nodes], error)


def each_match(gm: fx.GraphModule, is_candidate: Callable[[fx.Node], bool], match: Callable[[fx.Node], Any],
               what: str, logger: logging.Logger) -> Iterator[Any]:
    """``match(node)`` for every candidate node of the graph (a snapshot: a rewrite may edit as it goes); a
    pattern that cannot be proven, or a graph the matcher does not understand, is logged and skipped; None
    results (not the pattern at all) are skipped silently."""
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or not is_candidate(node):
            continue
        try:
            found = match(node)
        except Unsupported as reason:
            logger.info("memgraph: %s %s left unchanged: %s", what, node.name, reason)
            continue
        except Exception as error:  # noqa: BLE001 - an unexpected graph must never break compilation
            logger.info("memgraph: %s %s left unchanged: could not analyse it (%s: %s)", what, node.name,
                        type(error).__name__, error)
            continue
        if found is not None:
            yield found


# --- scalar chains on scores: ``z * s`` / ``z / s`` and ``tanh(z / c) * c`` ---
MUL_TARGETS = (operator.mul, torch.mul)
DIV_TARGETS = (operator.truediv, torch.div)
ADD_TARGETS = (operator.add, torch.add)


def only_user(node: fx.Node, user: fx.Node) -> None:
    """Unsupported unless ``user`` is ``node``'s only user (a rewrite that drops the chain would lose the rest)."""
    if set(node.users) != {user}:
        raise Unsupported(f"{node.name} is used by {sorted(u.name for u in node.users)}, not only by {user.name}")


def constant_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unsupported(f"{what} {value!r} is not a constant number")
    return float(value)


def _other_operand(node: fx.Node, source: fx.Node) -> Any:
    """The other operand of a binary op one of whose operands is ``source``."""
    if len(node.args) != 2 or node.kwargs:
        raise Unsupported(f"{node.name}: unexpected arguments")
    a, b = node.args
    return b if a is source else a


def _is_tanh(node: Any) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_function" and node.target is torch.tanh
                                          or node.op == "call_method" and node.target == "tanh")


def through_softcap(node: fx.Node, chain: list[fx.Node]) -> tuple[fx.Node, Optional[float]]:
    """Gemma 2's soft-cap ``tanh(z / c) * c``: (z, c), the three nodes appended to ``chain``; or (node, None)."""
    if not (node.op == "call_function" and node.target in MUL_TARGETS):
        return node, None
    tanh = next((a for a in node.args if _is_tanh(a)), None)
    if tanh is None:
        return node, None
    cap = constant_number(_other_operand(node, tanh), "the soft-cap")
    divided = tanh.args[0]
    if not (isinstance(divided, fx.Node) and divided.op == "call_function" and divided.target in DIV_TARGETS
            and len(divided.args) == 2 and not divided.kwargs and isinstance(divided.args[0], fx.Node)):
        raise Unsupported("tanh of something other than z / cap")
    if constant_number(divided.args[1], "the soft-cap divisor") != cap or cap <= 0:
        raise Unsupported("tanh(z / c) * d with c != d or c <= 0")
    chain.append(node)
    only_user(tanh, node)
    chain.append(tanh)
    only_user(divided, tanh)
    chain.append(divided)
    z = divided.args[0]
    only_user(z, divided)
    return z, cap


def through_scale(node: fx.Node, chain: list[fx.Node]) -> tuple[fx.Node, float]:
    """A constant scale ``z * s`` or ``z / s``: (z, s), the node appended to ``chain``; or (node, 1.0)."""
    if node.op != "call_function" or node.target not in MUL_TARGETS + DIV_TARGETS:
        return node, 1.0
    if len(node.args) != 2 or node.kwargs:
        raise Unsupported(f"{node.name}: unexpected arguments")
    a, b = node.args
    if node.target in DIV_TARGETS:
        if not isinstance(a, fx.Node):
            raise Unsupported("a constant divided by the scores")
        source, scale = a, 1.0 / constant_number(b, "the divisor")
    else:
        source = a if isinstance(a, fx.Node) else b
        scale = constant_number(b if source is a else a, "the scale")
    if not isinstance(source, fx.Node):
        raise Unsupported("the scale has no tensor operand")
    chain.append(node)
    only_user(source, node)
    return source, scale
