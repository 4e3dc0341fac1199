"""The pipeline of one compiled graph: rewrite → joint graph → costs → plan → partition → codegen.

``rewrite`` and ``plan_training_graph`` are the two halves every caller shares (the backend, ``capture`` behind
``memgraph.plan`` and ``compare``); ``MemgraphPartitioner`` is the planning half as an AOTAutograd
``partition_fn`` and an Inductor ``CustomPartitionerFn``; ``compile_graph`` is the whole pipeline behind the
``"memgraph"`` backend, with the compile cache (``compile_cache.py``).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Sequence

import torch.fx as fx

from memgraph import _compat, compile_cache
from memgraph.errors import MemgraphError
from memgraph.graph import TrainingGraph
from memgraph.options import OPTIMIZER_STATES, Options
from memgraph.passes import REWRITE_NOTES, RUNTIME_CHECKS, apply_rewrites
from memgraph.passes.partition import partition
from memgraph.plan import Plan
from memgraph.units import gib

log = logging.getLogger("memgraph")

_graph_ids = itertools.count()


@dataclasses.dataclass
class GraphRecord:
    """What memgraph did to one graph Dynamo handed it. ``estimate`` is the plan's predicted memory (the
    MemoryEstimate ``plan.peak_bytes`` was read from; None when the plan came from the compile cache).
    ``cache``: "hit" (compiled code and plan from the cache), "miss" (planned and stored) or None (no cache).
    ``notes``: what the rewrites decided (e.g. whether the logits are kept), also added to the plan's notes."""

    graph_id: int
    options: Options
    rewrites: list[str] = dataclasses.field(default_factory=list)
    plan: Plan | None = None
    estimate: Any = None
    fallback: str | None = None
    cache: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


# Records of the graphs compiled in this process, oldest first (bounded so long sessions do not grow).
_RECORDS: list[GraphRecord] = []
_MAX_RECORDS = 256


def compiled_graphs() -> list[GraphRecord]:
    """Records of the graphs memgraph compiled in this process, most recent last."""
    return list(_RECORDS)


def _remember(record: GraphRecord) -> None:
    _RECORDS.append(record)
    del _RECORDS[:-_MAX_RECORDS]


def rewrite(gm: fx.GraphModule, example_inputs: list, options: Options) -> tuple[fx.GraphModule, list[str]]:
    """The graph rewrites ``options.rewrites`` selects (attention, NF4, ...), and the names of those that
    changed the graph."""
    if not options.rewrites:
        return gm, []
    return apply_rewrites(gm, example_inputs, options)


def plan_training_graph(graph: TrainingGraph, options: Options) -> tuple[TrainingGraph, Plan, Any]:
    """The plan of ``options.solver`` under ``options.memory_budget``, the graph it is for and its predicted
    memory (the one estimate behind ``plan.peak_bytes``). The graph returned may be a changed copy: see
    ``after_plan``."""
    from memgraph.cost_model import solvers

    costs = costs_under(graph, options)
    budget, budget_note = graph_budget(graph, options)
    started = time.perf_counter()
    plan = solvers.get(options.solver).function(graph, costs, budget)
    plan.solve_seconds = time.perf_counter() - started
    plan.budget_bytes = budget
    if budget_note:
        plan.notes.append(budget_note)
    graph, plan, costs = after_plan(graph, plan, costs, options, lambda g: costs_under(g, options))
    return graph, plan, costs.estimate(plan)


def after_plan(graph: TrainingGraph, plan: Plan, costs, options: Options | None, make_costs):
    """(graph, plan, costs) with the changes a solved plan allows, each kept only where the plan still fits:
    recomputed attention at 16 bits (``with_exact_recomputed_attention``), then recomputed NF4 weights serving dx
    (``with_shared_dequantize``). A plan without a budget may grow its peak by ``MAX_PEAK_GROWTH_WITHOUT_BUDGET``
    over both."""
    from memgraph.passes.recomputed_attention import MAX_PEAK_GROWTH_WITHOUT_BUDGET

    solved_peak = plan.peak_bytes
    graph, plan, costs = with_exact_recomputed_attention(graph, plan, costs, options, make_costs)
    limit = plan.budget_bytes
    if limit is None and solved_peak is not None:
        limit = int(solved_peak * (1 + MAX_PEAK_GROWTH_WITHOUT_BUDGET))
    return with_shared_dequantize(graph, plan, costs, options, make_costs, limit)


def with_shared_dequantize(graph: TrainingGraph, plan: Plan, costs, options: Options | None, make_costs,
                           limit: int | None):
    """(graph, plan, costs) where the NF4 weights the plan recomputes also serve dx, as many as keep the peak within
    ``limit`` (``passes.shared_dequantize``). Unchanged without ``options`` and when the change fails (logged: the
    plan as solved trains correctly)."""
    from memgraph.passes.shared_dequantize import shared_dequantize_where_recomputed

    if options is None:
        return graph, plan, costs
    try:
        shared = shared_dequantize_where_recomputed(graph, plan, costs, make_costs, limit)
    except Exception as error:  # noqa: BLE001 - an optimisation must not cost the step
        log.warning("memgraph: recomputed NF4 weights dequantize again for dx (%s: %s)", type(error).__name__, error)
        return graph, plan, costs
    return shared if shared is not None else (graph, plan, costs)


def with_exact_recomputed_attention(graph: TrainingGraph, plan: Plan, costs, options: Options | None, make_costs):
    """(graph, plan, costs), where ``kv_bits < 16`` and the plan recomputes attention: that attention at 16 bits on
    a copy of the graph, if the plan still fits the budget it was made for (``plan.budget_bytes``;
    ``passes.recomputed_attention``).
    Unchanged otherwise, and when the change fails (logged: the plan as solved trains correctly)."""
    from memgraph.passes.recomputed_attention import exact_kv_where_recomputed

    if options is None or options.kv_bits >= 16:
        return graph, plan, costs
    try:
        exact = exact_kv_where_recomputed(graph, plan, make_costs, plan.budget_bytes)
    except Exception as error:  # noqa: BLE001 - an optimisation must not cost the step
        log.warning("memgraph: recomputed attention keeps %d-bit K/V (%s: %s)", options.kv_bits,
                    type(error).__name__, error)
        return graph, plan, costs
    return exact if exact is not None else (graph, plan, costs)


def graph_budget(graph: TrainingGraph, options: Options) -> tuple[int | None, str | None]:
    """(the bytes the graph's plan may use, a note saying how they were found): ``options.memory_budget`` less
    the state ``options.optimizer`` keeps for the parameters this graph trains (resident beside every step)."""
    per_parameter = OPTIMIZER_STATES[options.optimizer]
    if options.memory_budget is None or per_parameter == 0:
        return options.memory_budget, None
    state = per_parameter * graph.trainable_bytes
    if state >= options.memory_budget:
        raise MemgraphError(f"memory_budget={gib(options.memory_budget)} does not hold the {options.optimizer} "
                            f"state of this graph's trainable parameters ({gib(state)}); raise it or set "
                            f"optimizer='none'")
    return options.memory_budget - state, (f"memory_budget {gib(options.memory_budget)} less {gib(state)} of "
                                           f"{options.optimizer} state: the graph plans within "
                                           f"{gib(options.memory_budget - state)}")


def costs_under(graph: TrainingGraph, options: Options):
    """The graph's cost model as ``options`` set it up: their codegen, and offload where they allow it."""
    from memgraph.cost_model import graph_costs

    offload_budget, device = offload_setting(graph, options)
    return graph_costs(graph, codegen=options.codegen, offload_budget=offload_budget, device=device,
                       cudagraphs=replayed_from_cuda_graphs(graph, options))


def on_cuda(graph: TrainingGraph) -> bool:
    return any(getattr(n.meta.get("val"), "is_cuda", False) for n in graph.primals)


def replayed_from_cuda_graphs(graph: TrainingGraph, options: Options) -> bool:
    """Whether the compiled step replays from CUDA graphs: ``options.cudagraphs`` on a graph on a CUDA device
    (elsewhere Inductor captures nothing, and the offload ops stay plain calls)."""
    return options.cudagraphs and on_cuda(graph)


def offload_setting(graph: TrainingGraph, options: Options):
    """(host bytes offload may use or None, the DeviceSpec with this machine's host link) for ``options``."""
    from memgraph.cost_model.runtime import DeviceSpec, measured_host_link
    from memgraph.cost_model.transfers import default_offload_budget

    if options.offload == "off":
        return None, None
    cuda = on_cuda(graph)
    if not cuda and options.offload == "auto":
        _log_once("memgraph: offload is not considered: the graph is not on a CUDA device "
                  "(offload='on' plans it anyway, as plain host copies)")
        return None, None
    budget = options.offload_budget if options.offload_budget is not None else default_offload_budget()
    link = measured_host_link() if cuda else None
    return budget, DeviceSpec(host_link_bytes_per_s=link) if link else None


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


class MemgraphPartitioner(_compat.CustomPartitionerFn):
    """Partition a joint graph by a memgraph Plan. Usable as AOTAutograd's ``partition_fn``."""

    def __init__(self, options: Options, record: GraphRecord | None = None) -> None:
        self.options = options
        self.record = record
        self.called = False
        self._key = compile_cache.options_key(options)

    def __call__(self, joint: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        self.called = True
        graph = TrainingGraph.from_partition_args(joint, joint_inputs, **kwargs)
        try:
            planned, plan, estimate = plan_training_graph(graph, self.options)
            fw, bw = partition(planned, plan, captured=replayed_from_cuda_graphs(graph, self.options))
        except MemgraphError:
            raise  # an infeasible budget is the user's to fix: say so
        except Exception as error:  # noqa: BLE001 - a planner bug must not stop training
            log.warning("memgraph: solver %r failed (%s: %s); falling back to torch's default partition",
                        self.options.solver, type(error).__name__, error)
            planned, plan, estimate = plan_training_graph(graph, dataclasses.replace(self.options, solver="none",
                                                                                     memory_budget=None))
            plan.notes.append(f"fallback: solver {self.options.solver!r} failed: {error}")
            fw, bw = partition(planned, plan, captured=replayed_from_cuda_graphs(graph, self.options))
            if self.record is not None:
                self.record.fallback = str(error)
        log.info("memgraph: %s", plan.summary())
        if self.record is not None:
            plan.notes.extend(self.record.notes)
            self.record.plan, self.record.estimate = plan, estimate
            _report(self.record)
        return fw, bw

    def uuid(self) -> str:
        """memgraph's part of torch's cache keys: options, memgraph's code, the cost model's device."""
        return self._key

    def __reduce__(self):
        # torch pickles the compiler config into its cache keys: only what decides the plan may enter them
        # (not the record of this compile, whose id differs every time)
        return MemgraphPartitioner, (self.options,)


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
        compiled = _compile(gm, example_inputs, options, record)
    except _compat.dynamo_control_exceptions():
        _RECORDS.remove(record)  # Dynamo re-traces and compiles again: this attempt is no graph of its own
        raise
    except Exception as error:
        record.fallback = f"{type(error).__name__}: {error}"
        raise
    return compiled


def _report(record: GraphRecord) -> None:
    if record.options.report and record.plan is not None:
        from memgraph.report import write_report

        write_report(record, record.options.report)


def _compile(gm: fx.GraphModule, example_inputs: list, options: Options, record: GraphRecord) -> Callable:
    gm, record.rewrites = rewrite(gm, example_inputs, options)
    record.notes = list(getattr(gm, REWRITE_NOTES, ()))
    if record.rewrites:
        log.info("memgraph: graph %d rewritten by %s", record.graph_id, record.rewrites)
    partitioner = MemgraphPartitioner(options, record)
    if options.codegen == "inductor":
        compiled = _inductor(gm, example_inputs, options, record, partitioner)
    else:
        compiled = _compat.aot_module(gm, example_inputs, fw_compiler=_eager_compiler, bw_compiler=_eager_compiler,
                                      partition_fn=partitioner)
    checks = getattr(gm, RUNTIME_CHECKS, None)
    return _with_runtime_checks(compiled, checks) if checks else compiled


def _inductor(gm: fx.GraphModule, example_inputs: list, options: Options, record: GraphRecord,
              partitioner: MemgraphPartitioner) -> Callable:
    """Inductor with memgraph's partitioner; with ``options.cache``, torch's caches keyed by memgraph's key and
    the plan stored beside the compiled code (a hit loads both)."""
    key = compile_cache.graph_key(partitioner.uuid(), gm, example_inputs) if options.cache else None
    # fallback_random: random ops use eager's generator, so dropout masks equal eager's under one seed.
    patches = {"fallback_random": True, **(_compat.cudagraph_config_patches() if options.cudagraphs else {})}
    if options.cudagraphs and not any(getattr(v, "is_cuda", False) for v in example_inputs):
        _log_once("memgraph: cudagraphs=True has nothing to capture: the graph is not on a CUDA device "
                  "(it runs as compiled, without CUDA graphs)")
    compiled = _compat.inductor_compile(gm, example_inputs, partitioner=partitioner,
                                        cache_key=partitioner.uuid() if options.cache else None,
                                        config_patches=patches)
    if key is None:
        return compiled
    if partitioner.called:
        record.cache = "miss"
        if record.plan is not None and record.fallback is None:
            compile_cache.store_plan(key, record.plan)
    elif record.plan is None:
        record.cache = "hit"
        record.plan = compile_cache.load_plan(key)
        if record.plan is None:
            log.info("memgraph: graph %d was loaded from torch's compile cache without its stored plan",
                     record.graph_id)
        _report(record)
    return compiled


def _with_runtime_checks(compiled: Callable, checks: list) -> Callable:
    """``compiled`` preceded by the rewrites' run-time checks (e.g. a dynamic-shape attention mask's pattern at
    the sizes of this call); Dynamo calls a backend's result with the graph's inputs as positional arguments."""

    def run(*args: Any) -> Any:
        for check in checks:
            check.check(args)
        return compiled(*args)

    return run
