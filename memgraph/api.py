"""Library entry points for framework authors and researchers: the planner without training."""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from memgraph.options import Options, resolve_options
from memgraph.plan import Plan


def partitioner(**options: Any):
    """An AOTAutograd ``partition_fn`` (also an Inductor ``CustomPartitionerFn``) that plans with memgraph.

    ``aot_function(f, fw_compiler=..., partition_fn=memgraph.partitioner(solver="mincut"))``; the plan of the
    last graph it partitioned is ``.record.plan``.
    """
    from memgraph.pipeline import GraphRecord, MemgraphPartitioner, _graph_ids

    resolved = resolve_options(options)
    return MemgraphPartitioner(resolved, GraphRecord(next(_graph_ids), resolved))


def plan(model_or_fn: Any, *example_args: Any, example_kwargs: Mapping[str, Any] | None = None,
         **options: Any) -> Plan:
    """Capture ``model_or_fn(*example_args, **example_kwargs)`` and plan its training step, without training.

    The model runs one forward on the example inputs (with grad enabled, so the backward is traced); no
    backward runs and no parameter changes. Several graphs (graph breaks) give one merged Plan.
    """
    if not callable(model_or_fn):
        raise TypeError(f"memgraph.plan needs an nn.Module or a callable; got {type(model_or_fn).__name__}")
    resolved = resolve_options({**options, "codegen": "eager"})
    records = _compile_and_run(model_or_fn, example_args, dict(example_kwargs or {}), resolved)
    plans = [r.plan for r in records if r.plan is not None]
    if not plans:
        raise ValueError("nothing to plan: no compiled graph needed a backward pass; give the model trainable "
                         "parameters or inputs that require grad")
    return Plan.merge(plans)


def _compile_and_run(fn: Any, args: tuple, kwargs: dict, options: Options) -> list:
    from memgraph import pipeline
    from memgraph.backend import memgraph_backend

    before = len(pipeline.compiled_graphs())
    backend = functools.partial(memgraph_backend, options=options)
    compiled = torch.compile(fn, backend=backend, fullgraph=False, dynamic=False)
    with torch.enable_grad():
        compiled(*args, **kwargs)
    records = pipeline.compiled_graphs()
    return records[before:] if len(records) > before else []
