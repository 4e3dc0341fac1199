"""Library entry points for framework authors and researchers: the planner without training."""
from __future__ import annotations

from typing import Any, Mapping

from memgraph.options import resolve_options
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
         seq: int | None = None, batch: int = 1, weights: str = "bf16", lora: int | None = 16,
         **options: Any) -> Plan:
    """Capture ``model_or_fn(*example_args, **example_kwargs)`` and plan its training step, without training.

    The model runs one forward on the example inputs (with grad enabled, so the backward is traced); no
    backward runs and no parameter changes. Several graphs (graph breaks) give one merged Plan.
    ``model_or_fn`` may also be a model source (a ``memgraph.models`` name, a directory with config.json, a
    cached Hub id): it is then built on the meta device as ``weights``/``lora`` say and planned at ``batch`` x
    ``seq`` tokens (``memgraph.sources``).
    """
    from memgraph.capture import capture

    if isinstance(model_or_fn, str):
        from memgraph.sources import example_batch, training_model

        if seq is None:
            raise ValueError("planning a model source needs seq= (and batch=, default 1)")
        model_or_fn = training_model(model_or_fn, weights=weights, lora=lora)
        example_kwargs = {**example_batch(model_or_fn, batch, seq), **dict(example_kwargs or {})}
    if not callable(model_or_fn):
        raise TypeError(f"memgraph.plan needs an nn.Module or a callable; got {type(model_or_fn).__name__}")
    captured = capture(model_or_fn, *example_args, example_kwargs=example_kwargs, options=resolve_options(options),
                       backward=False)
    return Plan.merge([record.plan for record in captured])
