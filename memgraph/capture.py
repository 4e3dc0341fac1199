"""Capture the training graphs of a step: the one capture path of ``memgraph.plan``, ``memgraph.compare``, the
benchmarks and the tests.

``capture(model, input_ids=..., labels=...)`` compiles the model with a minimal backend: Dynamo → memgraph's
rewrites (as the backend runs them, selected by ``options``) → AOTAutograd, whose ``partition_fn`` records each
joint graph (``TrainingGraph.from_partition_args``, as the backend's partitioner builds it), its ``GraphCosts``
and each requested solver's ``Plan`` with the partitioned forward/backward graphs. The first solver's graphs
then run (``tracker.GraphRunner``, which frees values as FX's generated code and Inductor do), so the real
forward inputs of the step are recorded too — ready for ``tracker.run_step`` and
``cost_model.estimate_partitioned``. With ``backward=False`` only the forward runs (planning on the meta
device). ``capture_function`` does the same for a plain function of tensors through ``aot_function``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model import GraphCosts, graph_costs
from memgraph.cost_model.tracker import GraphRunner
from memgraph.errors import MemgraphError
from memgraph.graph import TrainingGraph
from memgraph.options import Options, resolve_options
from memgraph.plan import Plan

__all__ = ["capture", "capture_backend", "capture_function", "CapturedGraph", "Partitioned"]

PlanFunction = Callable[[TrainingGraph, GraphCosts], Plan]


@dataclasses.dataclass
class Partitioned:
    """A solver's plan and graphs. ``graph`` is the joint graph they refer to: the solver's own copy, since a
    torch partitioner may rewrite the joint graph it is given."""

    plan: Plan
    fw: fx.GraphModule
    bw: fx.GraphModule
    graph: TrainingGraph


@dataclasses.dataclass
class CapturedGraph:
    """One compiled graph. ``partitions`` maps solver name → its plan and graphs; the first one ran."""

    graph: TrainingGraph
    costs: GraphCosts  # made before any solver touched the joint graph
    # A partition's graph may be a changed copy of ``graph`` (a recomputed attention at 16 bits, recomputed NF4
    # weights serving dx: ``pipeline.after_plan``): its plan's names are that graph's, not always ``costs``'.
    partitions: dict[str, Partitioned]
    rewrites: list[str] = dataclasses.field(default_factory=list)
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


def capture(model: Callable, *args: Any, example_kwargs: Mapping[str, Any] | None = None,
            options: Options | Mapping[str, Any] | None = None, solvers: Sequence[str] | None = None,
            plan_fn: PlanFunction | None = None, dynamic_dims: Mapping[str, int | Sequence[int]] | None = None,
            backward: bool = True, run_under: Callable[[], Any] | None = None,
            observe_backward_inputs: Callable[[list], None] | None = None, **kwargs: Any) -> list[CapturedGraph]:
    """Compile ``model``, run one forward (+ backward) on the inputs and return the captured graphs.

    options: memgraph's options (rewrites, kv_bits, memory_budget, solver...; default: those in force).
    solvers: names planned for each graph, at ``options.memory_budget`` (default: ``options.solver``);
    ``plan_fn(graph, costs)`` replaces them. dynamic_dims: {input name: dim or dims} marked dynamic.
    backward: run ``loss.backward()`` (the output must be a scalar tensor or have a ``loss``); False runs only
    the forward (no backward is needed to plan; the meta device cannot run one anyway).
    run_under: a context manager factory entered around every forward/backward graph run (e.g. a
    ``MemoryTracker``: Dynamo does not run compiled code under an active dispatch mode, so the tracker is
    entered inside the compiled graphs). observe_backward_inputs: called with backward's boxed inputs as it
    starts (e.g. ``tracker.track``: autograd makes the tangents outside the graphs).
    """
    inputs = {**dict(example_kwargs or {}), **kwargs}
    for name, dims in (dynamic_dims or {}).items():
        for dim in ([dims] if isinstance(dims, int) else dims):
            _compat.mark_dynamic(inputs[name], dim)
    captured: list[CapturedGraph] = []
    backend = capture_backend(captured, options=options, solvers=solvers, plan_fn=plan_fn, run_under=run_under,
                              observe_backward_inputs=observe_backward_inputs)
    compiled = torch.compile(model, backend=backend, dynamic=None if dynamic_dims else False)
    with torch.enable_grad():
        output = compiled(*args, **inputs)
        if backward:
            loss = output if isinstance(output, torch.Tensor) else output.loss
            loss.backward()
    if not captured:
        raise MemgraphError("nothing to capture: no compiled graph needed a backward pass; give the model "
                            "trainable parameters or inputs that require grad")
    return captured


def capture_backend(captured: list[CapturedGraph], *, options: Options | Mapping[str, Any] | None = None,
                    solvers: Sequence[str] | None = None, plan_fn: PlanFunction | None = None,
                    run_under: Callable[[], Any] | None = None,
                    observe_backward_inputs: Callable[[list], None] | None = None) -> Callable:
    """The torch.compile backend behind ``capture`` (arguments as there): it appends a ``CapturedGraph`` to
    ``captured`` per compiled graph. For callers that run the compiled model more than once."""
    given = options.to_dict() if isinstance(options, Options) else dict(options or {})
    # The captured graphs run eagerly, but are planned for the codegen the options name (Inductor by default),
    # as the backend plans them: a plan made here equals the compiled step's.
    planned = resolve_options(given)
    resolved = resolve_options({**given, "codegen": "eager", "cudagraphs": False})
    rewrites: list[str] = []  # of the Dynamo graph being compiled
    partition_fn = _partition_fn(captured, _plan_functions(solvers or (resolved.solver,), plan_fn, resolved),
                                 rewrites, resolved, planned.codegen, cudagraphs=planned.cudagraphs)
    forward_compiler, backward_compiler = _compilers(captured, run_under, observe_backward_inputs)

    def backend(gm, example_inputs):
        from memgraph.pipeline import rewrite

        gm, rewrites[:] = rewrite(gm, example_inputs, resolved)
        return _compat.aot_module(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                  partition_fn=partition_fn)

    return backend


def capture_function(fn: Callable, *args: Any, solvers: Sequence[str] = ("none",),
                     plan_fn: PlanFunction | None = None) -> list[CapturedGraph]:
    """``capture`` for a plain function of tensors returning a scalar (traced by ``aot_function``, no Dynamo
    and no rewrites)."""
    captured: list[CapturedGraph] = []
    forward_compiler, backward_compiler = _compilers(captured, None, None)
    compiled = _compat.aot_function(fn, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                    partition_fn=_partition_fn(captured, _plan_functions(solvers, plan_fn, None), []))
    loss = compiled(*args)
    loss.backward()
    return captured


def _plan_functions(solvers: Sequence[str], plan_fn: PlanFunction | None, options: Options | None
                    ) -> dict[str, PlanFunction]:
    if plan_fn is not None:
        return {"custom": plan_fn}
    from memgraph.cost_model import solvers as registry

    from memgraph.pipeline import graph_budget

    def solver_plan(name: str) -> PlanFunction:
        entry = registry.get(name)

        def plan(graph: TrainingGraph, costs: GraphCosts) -> Plan:
            # the backend's budget: memory_budget less the optimizer's state
            budget, note = graph_budget(graph, options) if options is not None and entry.uses_budget else (None, None)
            made = entry.function(graph, costs, budget)
            made.notes.extend([note] if note else [])
            return made

        return plan

    return {name: solver_plan(name) for name in solvers}


def _partition_fn(captured: list[CapturedGraph], plans: dict[str, PlanFunction], rewrites: list[str],
                  options: Options | None = None, codegen: str | None = None, *, cudagraphs: bool = False):
    from memgraph.passes.partition import partition
    from memgraph.pipeline import after_plan, offload_setting, on_cuda

    def partition_fn(joint, joint_inputs, **kwargs):
        graph = TrainingGraph.from_partition_args(joint, joint_inputs, **kwargs)
        offload_budget, device = offload_setting(graph, options) if options is not None else (None, None)
        graphed = cudagraphs and on_cuda(graph)  # as the backend's step would replay (its slot ops included)
        record = CapturedGraph(graph, graph_costs(graph, offload_budget=offload_budget, device=device,
                                                  codegen=codegen, cudagraphs=graphed), {}, list(rewrites))
        captured.append(record)
        for name, plan_fn in plans.items():
            plan = plan_fn(graph, record.costs)
            # as the backend plans; a custom plan function's plan is taken as it is
            own, plan, _ = (graph, plan, None) if name == "custom" else after_plan(
                graph, plan, record.costs, options,
                lambda g: graph_costs(g, offload_budget=offload_budget, device=device, codegen=codegen,
                                      cudagraphs=graphed))
            # each partition on its own copy of the joint graph (a changed graph is a copy already)
            own = graph.private_copy() if own is graph else own
            fw, bw = partition(own, plan, captured=graphed)
            record.partitions[name] = Partitioned(plan, fw, bw, own)
        return record.fw, record.bw

    return partition_fn


def _compilers(captured: list[CapturedGraph], run_under, observe_backward_inputs):
    def entered():
        return run_under() if run_under else contextlib.nullcontext()

    def forward_compiler(gm, example_inputs):
        record = captured[-1]

        def run(args):
            record.primals = list(args)  # the step's real inputs, as AOTAutograd hands them to the forward
            with entered():
                return GraphRunner(gm).boxed_run(args)

        run._boxed_call = True
        return run

    def backward_compiler(gm, example_inputs):
        def run(args):
            if observe_backward_inputs is not None:
                observe_backward_inputs(args)
            with entered():
                return GraphRunner(gm).boxed_run(args)

        run._boxed_call = True
        return run

    return forward_compiler, backward_compiler
