"""What the rewrites share to read Dynamo's graph: a node's example value, a call's arguments by name, and the
exception that says why a pattern is left alone."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch.fx as fx


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
