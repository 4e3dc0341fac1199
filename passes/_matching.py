"""What the rewrites share to read Dynamo's graph: a node's example value, a call's arguments by name, the
exception that says why a pattern is left alone, and the example value of an op a rewrite inserts."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

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
