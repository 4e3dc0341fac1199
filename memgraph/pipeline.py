"""The pipeline of one compiled graph: rewrite → joint graph → estimate → plan → partition → codegen.

``MemgraphPartitioner`` is the planning half (an AOTAutograd ``partition_fn`` and an Inductor
``CustomPartitionerFn``); ``compile_graph`` is the whole pipeline behind the ``"memgraph"`` backend.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model import solvers
from memgraph.errors import MemgraphError
from memgraph.graph import TrainingGraph
from memgraph.options import Options
from memgraph.passes import RUNTIME_CHECKS, apply_rewrites
from memgraph.passes.partition import partition, recomputed_nodes
from memgraph.plan import Plan

log = logging.getLogger("memgraph")

_graph_ids = itertools.count()


@dataclasses.dataclass
class GraphRecord:
    """What memgraph did to one graph Dynamo handed it."""

    graph_id: int
    options: Options
    rewrites: list[str] = dataclasses.field(default_factory=list)
    plan: Plan | None = None
    estimate: Any = None
    fallback: str | None = None


# Records of the graphs compiled in this process, oldest first (bounded so long sessions do not grow).
_RECORDS: list[GraphRecord] = []
_MAX_RECORDS = 256


def compiled_graphs() -> list[GraphRecord]:
    """Records of the graphs memgraph compiled in this process, most recent last."""
    return list(_RECORDS)


def _remember(record: GraphRecord) -> None:
    _RECORDS.append(record)
    del _RECORDS[:-_MAX_RECORDS]


def plan_training_graph(graph: TrainingGraph, options: Options) -> tuple[Plan, Any]:
    """Estimate the graph, run the chosen solver and attach the cost model's predictions to the plan."""
    from memgraph import cost_model

    estimate = cost_model.estimate_training_graph(graph, codegen=options.codegen)
    entry = solvers.get(options.solver)
    started = time.perf_counter()
    plan = entry.function(graph, estimate, options.memory_budget)
    plan.solve_seconds = time.perf_counter() - started
    plan.budget_bytes = options.memory_budget
    return plan, estimate


def _annotate(graph: TrainingGraph, plan: Plan, fw: fx.GraphModule, bw: fx.GraphModule, codegen: str) -> Any:
    """Fill the plan's predicted figures from the partitioned graphs; return the plan's memory estimate."""
    from memgraph import cost_model

    plan.recomputed = recomputed_nodes(graph, bw)
    predicted = cost_model.estimate_partitioned(graph, fw, bw, codegen=codegen)
    plan.peak_bytes = int(predicted.peak_bytes_hint)
    plan.recompute_seconds = cost_model.recompute_seconds(graph, plan)
    return predicted


class MemgraphPartitioner(_compat.CustomPartitionerFn):
    """Partition a joint graph by a memgraph Plan. Usable as AOTAutograd's ``partition_fn``."""

    def __init__(self, options: Options, record: GraphRecord | None = None) -> None:
        self.options = options
        self.record = record

    def __call__(self, joint: fx.GraphModule, joint_inputs: Sequence[Any], *, num_fwd_outputs: int,
                 static_lifetime_input_indices: list[int] | None = None, **_: Any):
        graph = TrainingGraph(joint, list(joint_inputs), num_fwd_outputs, tuple(static_lifetime_input_indices or ()))
        try:
            plan, _ = plan_training_graph(graph, self.options)
            fw, bw = partition(graph, plan)
        except MemgraphError:
            raise  # an infeasible budget is the user's to fix: say so
        except Exception as error:  # noqa: BLE001 - a planner bug must not stop training
            log.warning("memgraph: solver %r failed (%s: %s); falling back to torch's default partition",
                        self.options.solver, type(error).__name__, error)
            fallback = solvers.get("none").function(graph, None, None)
            fw, bw = partition(graph, fallback)
            plan = fallback
            plan.notes.append(f"fallback: solver {self.options.solver!r} failed: {error}")
            if self.record is not None:
                self.record.fallback = str(error)
        predicted = _annotate(graph, plan, fw, bw, self.options.codegen)
        log.info("memgraph: %s", plan.summary())
        if self.record is not None:
            self.record.plan, self.record.estimate = plan, predicted
            if self.options.report:
                from memgraph.report import write_report

                write_report(self.record, self.options.report)
        return fw, bw

    def uuid(self) -> None:
        # No FX-graph caching: a cache hit would skip planning, and the plan (and report) must be made.
        return None


def _eager_compiler(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Eager codegen: the graph's generated Python with the boxed convention, freeing each value (inputs
    included) after its last use as Inductor's code does, so it has the memory the cost model predicts."""
    boxed = _compat.boxed_graph_module(gm)

    def run(args: list) -> Any:
        return boxed(args)

    run._boxed_call = True
    return run


def compile_graph(gm: fx.GraphModule, example_inputs: list, options: Options) -> Callable:
    """The memgraph pipeline for one Dynamo graph."""
    record = GraphRecord(next(_graph_ids), options)
    _remember(record)
    try:
        return _compile(gm, example_inputs, options, record)
    except _compat.dynamo_control_exceptions():
        _RECORDS.remove(record)  # Dynamo re-traces and compiles again: this attempt is no graph of its own
        raise
    except Exception as error:
        record.fallback = f"{type(error).__name__}: {error}"
        raise


def _compile(gm: fx.GraphModule, example_inputs: list, options: Options, record: GraphRecord) -> Callable:
    compiled = _compile_rewritten(gm, example_inputs, options, record)
    checks = getattr(gm, RUNTIME_CHECKS, None)
    return _with_runtime_checks(compiled, checks) if checks else compiled


def _with_runtime_checks(compiled: Callable, checks: list) -> Callable:
    """``compiled`` preceded by the rewrites' run-time checks (e.g. a dynamic-shape attention mask's pattern at
    the sizes of this call); Dynamo calls a backend's result with the graph's inputs as positional arguments."""

    def run(*args: Any) -> Any:
        for check in checks:
            check.check(args)
        return compiled(*args)

    return run


def _compile_rewritten(gm: fx.GraphModule, example_inputs: list, options: Options, record: GraphRecord) -> Callable:
    if options.rewrites:
        gm, record.rewrites = apply_rewrites(gm, example_inputs, options)
        if record.rewrites:
            log.info("memgraph: graph %d rewritten by %s", record.graph_id, record.rewrites)
    partitioner = MemgraphPartitioner(options, record)
    if options.codegen == "inductor":
        # fallback_random: random ops use eager's generator, so dropout masks equal eager's under one seed.
        return _compat.inductor_compile(gm, example_inputs, partitioner=partitioner,
                                        config_patches={"fallback_random": True})
    return _compat.aot_module(gm, example_inputs, fw_compiler=_eager_compiler, bw_compiler=_eager_compiler,
                              partition_fn=partitioner)
