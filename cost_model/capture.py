"""Capture the training graphs of a step, for tests, benchmarks and solver research.

``capture_step(model, solvers=("none", "mincut"), input_ids=..., labels=...)`` compiles the model with a
minimal backend (Dynamo → AOTAutograd → each solver's plan → the partition pass; graphs run by
``tracker.GraphRunner``, which frees values as FX's generated code and Inductor do), runs one forward + backward and returns,
per compiled graph, the joint ``TrainingGraph``, the ``GraphCosts`` built before any solver ran, each
solver's ``Plan`` with its partitioned forward/backward graphs, and the real forward inputs of the step —
ready for ``tracker.run_step`` and ``cost_model.estimate_partitioned``. ``capture_function`` does the same
for a plain function of tensors through ``aot_function`` (no Dynamo).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model.tracker import GraphRunner
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan


@dataclasses.dataclass
class Partitioned:
    """A solver's plan and graphs. ``graph`` is the joint graph they refer to: the solver's own copy, since
    torch's min-cut rewrites (CSEs) the joint graph it is given and its saved names only fit that rewrite."""

    plan: Plan
    fw: fx.GraphModule
    bw: fx.GraphModule
    graph: TrainingGraph


@dataclasses.dataclass
class CapturedGraph:
    """One compiled graph. ``partitions`` maps solver name → its plan and graphs; the first one ran."""

    graph: TrainingGraph
    costs: Any  # GraphCosts made before any solver touched the joint graph
    partitions: dict[str, Partitioned]
    primals: list[Any] = dataclasses.field(default_factory=list)  # real forward inputs of the captured step

    @property
    def _first(self) -> Partitioned:
        return next(iter(self.partitions.values()))

    @property
    def plan(self) -> Plan:
        return self._first.plan

    @property
    def fw(self) -> fx.GraphModule:
        return self._first.fw

    @property
    def bw(self) -> fx.GraphModule:
        return self._first.bw


def _flat_inputs(joint_inputs) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(list(joint_inputs))


def solver_plan(name: str) -> Callable[[TrainingGraph, Any], Plan]:
    """Plan with a registered solver, no budget."""
    from memgraph.cost_model import solvers

    def plan(graph: TrainingGraph, costs: Any) -> Plan:
        return solvers.get(name).function(graph, costs, None)

    return plan


def _compilers(captured: list[CapturedGraph], run_under, observe_backward_inputs):
    def forward_compiler(gm, example_inputs):
        record = captured[-1]

        def run(args):
            record.primals = list(args)  # the step's real inputs, as AOTAutograd hands them to the forward
            with run_under() if run_under else contextlib.nullcontext():
                return GraphRunner(gm).boxed_run(args)

        run._boxed_call = True
        return run

    def backward_compiler(gm, example_inputs):
        def run(args):
            if observe_backward_inputs is not None:
                observe_backward_inputs(args)
            with run_under() if run_under else contextlib.nullcontext():
                return GraphRunner(gm).boxed_run(args)

        run._boxed_call = True
        return run

    return forward_compiler, backward_compiler


def _partition_fn(captured: list[CapturedGraph], plans: dict[str, Callable]):
    from memgraph import cost_model
    from memgraph.passes.partition import partition, recomputed_nodes

    def partition_fn(joint, joint_inputs, *, num_fwd_outputs, static_lifetime_input_indices=None, **_):
        graph = TrainingGraph(joint, _flat_inputs(joint_inputs), num_fwd_outputs,
                              tuple(static_lifetime_input_indices or ()))
        costs = cost_model.estimate_training_graph(graph)
        record = CapturedGraph(graph, costs, {})
        captured.append(record)
        for name, plan_fn in plans.items():
            own = _private_copy(graph)
            plan = plan_fn(own, costs)
            own = _private_copy(own)  # fresh cached node lists, on the graph as the solver left it
            fw, bw = partition(own, plan)
            plan.recomputed = recomputed_nodes(own, bw)  # what these graphs recompute, as the pipeline records
            record.partitions[name] = Partitioned(plan, fw, bw, own)
        first = record._first
        return first.fw, first.bw

    return partition_fn


def _private_copy(graph: TrainingGraph) -> TrainingGraph:
    """The graph on a copy of its joint module (nodes and their metadata copied, fake values shared)."""
    copied = fx.Graph()
    output = copied.graph_copy(graph.joint.graph, {})
    copied.output(output)
    return TrainingGraph(fx.GraphModule(graph.joint, copied), graph.example_inputs, graph.num_fwd_outputs,
                         graph.static_input_indices)


def _plan_functions(solvers: Sequence[str], plan_fn: Callable | None) -> dict[str, Callable]:
    if plan_fn is not None:
        return {"custom": plan_fn}
    return {name: solver_plan(name) for name in solvers}


def capture_backend(captured: list[CapturedGraph], solvers: Sequence[str] = ("none",), *,
                    plan_fn: Callable | None = None, run_under: Callable[[], Any] | None = None,
                    observe_backward_inputs: Callable[[list], None] | None = None,
                    rewrites: Sequence[str] = (), options: Any = None) -> Callable:
    """A torch.compile backend that plans with each solver (or ``plan_fn(graph, costs)``), partitions, runs
    the first solver's graphs and records everything in ``captured``.

    run_under: a context manager factory entered around every forward/backward graph run (e.g. a
    ``MemoryTracker``: Dynamo does not run compiled code under an active dispatch mode, so the tracker is
    entered inside the compiled graphs). observe_backward_inputs: called with backward's boxed inputs as it
    starts (e.g. ``tracker.track``: autograd makes the tangents outside the graphs). rewrites: names from
    ``memgraph.passes.REWRITES`` run on Dynamo's graph first (configured by ``options``, default Options()).
    """
    forward_compiler, backward_compiler = _compilers(captured, run_under, observe_backward_inputs)
    partition_fn = _partition_fn(captured, _plan_functions(solvers, plan_fn))

    def backend(gm, example_inputs):
        if rewrites:
            from memgraph.options import Options
            from memgraph.passes import apply_rewrites

            gm, _ = apply_rewrites(gm, example_inputs, options or Options(), only=rewrites)
        return _compat.aot_module(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                  partition_fn=partition_fn)

    return backend


def capture_step(model: Callable, *, solvers: Sequence[str] = ("none",), plan_fn: Callable | None = None,
                 dynamic_dims: dict[str, int] | None = None, rewrites: Sequence[str] = (),
                 **inputs: Any) -> list[CapturedGraph]:
    """Compile ``model``, run one forward + backward on ``inputs`` (keyword arguments) and return the
    captured graphs. ``dynamic_dims``: {input name: dim} marked dynamic (``{"input_ids": 1, "labels": 1}``).
    ``rewrites``: memgraph rewrites applied first (e.g. ``("nf4",)`` for a bitsandbytes 4-bit model).
    The output must be a scalar tensor or have a ``loss`` attribute."""
    import torch._dynamo

    captured: list[CapturedGraph] = []
    for name, dim in (dynamic_dims or {}).items():
        torch._dynamo.mark_dynamic(inputs[name], dim)
    compiled = torch.compile(model, backend=capture_backend(captured, solvers, plan_fn=plan_fn, rewrites=rewrites))
    output = compiled(**inputs)
    loss = output if isinstance(output, torch.Tensor) else output.loss
    loss.backward()
    return captured


def capture_function(fn: Callable, *args: Any, solvers: Sequence[str] = ("none",),
                     plan_fn: Callable | None = None) -> list[CapturedGraph]:
    """``capture_step`` for a plain function of tensors returning a scalar (traced by ``aot_function``)."""
    captured: list[CapturedGraph] = []
    forward_compiler, backward_compiler = _compilers(captured, None, None)
    compiled = _compat.aot_function(fn, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                    partition_fn=_partition_fn(captured, _plan_functions(solvers, plan_fn)))
    loss = compiled(*args)
    loss.backward()
    return captured
