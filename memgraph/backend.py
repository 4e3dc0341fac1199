"""The ``"memgraph"`` torch.compile backend (entry point ``torch_dynamo_backends``)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch.fx as fx

from memgraph.errors import MemgraphError
from memgraph.options import Options, resolve_options

log = logging.getLogger("memgraph")


def memgraph_backend(gm: fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | Options | None = None,
                     **unexpected: Any) -> Callable:
    """``torch.compile(model, backend="memgraph", options={...})``.

    Options are resolved on every call (options > memgraph.config > MEMGRAPH_* environment > defaults), so
    each compiled graph sees the settings in force when it was compiled. Bad options raise ValueError; a
    failure inside the pipeline is logged and the graph runs eagerly (correct gradients, no savings).
    """
    if unexpected:
        raise ValueError(f"unexpected backend argument(s) {sorted(unexpected)}; pass settings as options={{...}} "
                         f"with keys {list(Options.field_names())}")
    resolved = resolve_options(options)
    from memgraph.pipeline import compile_graph

    from memgraph import _compat

    try:
        return compile_graph(gm, example_inputs, resolved)
    except (MemgraphError, *_compat.dynamo_control_exceptions()):
        raise
    except Exception as error:  # noqa: BLE001 - never lose a training step to a compiler bug
        log.warning("memgraph: compiling a graph failed (%s: %s); running it eagerly", type(error).__name__, error)
        return gm.forward
