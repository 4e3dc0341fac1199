"""``memgraph.compare``: every solver at every budget on one model — a table, a JSON file and a Pareto plot.

    rows = memgraph.compare(model, input_ids=ids, labels=ids) ...  # see ``compare`` below
    memgraph compare --model llama3-8b --seq 2048 --budgets 16GiB,20GiB --solvers ilp,greedy,checkpoint

The training graph is captured once (Dynamo + AOTAutograd, with memgraph's rewrites) and every solver plans
the same joint graph with the same cost model. A graph saved with ``memgraph.save_graph`` (or
``--save-graph``, e.g. on the GPU that ran the model) is compared without the model: ``--graph FILE``.
Planning needs no real weights: the reference models are built on the ``meta`` device (shapes and dtypes
only), so an 8B model plans on a laptop. On a GPU with a real model,
each feasible plan is also compiled and run: measured peak (``torch.cuda.max_memory_allocated`` after a
warm-up step) and step time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from memgraph import _compat
from memgraph.errors import InfeasibleBudgetError, MemgraphError
from memgraph.graph import TrainingGraph
from memgraph.progress import progress_bar
from memgraph.units import gib, parse_bytes

__all__ = ["compare", "auto_budgets", "add_compare_parser", "DEFAULT_SOLVERS"]

DEFAULT_SOLVERS = ("none", "checkpoint", "greedy", "ilp", "torch-budget")


# --- planning -----------------------------------------------------------------------------------------------------
def _costs(graphs: Sequence[TrainingGraph], options: Mapping[str, Any] | None = None) -> list[Any]:
    """Each graph's cost model as the backend builds it under ``options`` (``pipeline.costs_under``), so
    budget-aware solvers weigh offload here too."""
    from memgraph.options import resolve_options
    from memgraph.pipeline import costs_under

    resolved = resolve_options(options)
    return [costs_under(graph, resolved) for graph in graphs]


def auto_budgets(graphs: Sequence[TrainingGraph], count: int = 5, costs: Sequence[Any] | None = None) -> list[int]:
    """``count`` budgets evenly spaced from the layer-checkpointing peak to the no-recompute peak."""
    from memgraph.cost_model import solvers

    costs = costs or _costs(graphs)
    low = max(solvers.get("checkpoint").function(g, c, None).peak_bytes for g, c in zip(graphs, costs))
    high = max(solvers.get("none").function(g, c, None).peak_bytes for g, c in zip(graphs, costs))
    if count <= 1 or high <= low:
        return [int(high)]
    return [int(round(low + (high - low) * k / (count - 1))) for k in range(count)]


def _step_seconds(costs) -> float:
    """Predicted time of one step with no recomputation: every node of the joint graph once."""
    return float(sum(costs.seconds))


def _as_the_backend_runs(graph: TrainingGraph, plan, costs, options: Mapping[str, Any]):
    from memgraph.options import resolve_options
    from memgraph.pipeline import after_plan, costs_under

    resolved = resolve_options({**options, "solver": plan.solver, "memory_budget": plan.budget_bytes})
    return after_plan(graph, plan, costs, resolved, lambda g: costs_under(g, resolved))[1]


def _graph_budget(graph: TrainingGraph, solver: str, budget: int | None, options: Mapping[str, Any] | None):
    """The budget the backend plans ``graph`` within: with an ``optimizer`` option, ``budget`` less its state
    (``pipeline.graph_budget``), so a row's prediction and its measured step are of one plan."""
    if budget is None or not options or options.get("optimizer", "none") == "none":
        return budget
    from memgraph.options import resolve_options
    from memgraph.pipeline import graph_budget

    resolved = resolve_options({**options, "solver": solver, "memory_budget": budget})  # bad options raise as such
    try:
        return graph_budget(graph, resolved)[0]
    except MemgraphError as error:  # the optimizer's state alone fills the budget: this cell is infeasible
        raise InfeasibleBudgetError(str(error)) from None


def plan_row(graphs: Sequence[TrainingGraph], costs: Sequence[Any], solver: str,
             budget: int | None, options: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """One (solver, budget) cell: predicted peak and times, or why the solver gives up. With ``options``, each
    plan is what the backend would run (``pipeline.after_plan``)."""
    from memgraph.cost_model import solvers
    from memgraph.plan import Plan

    entry = solvers.get(solver)
    row: dict[str, Any] = {"solver": solver, "budget_bytes": budget}
    plans, started = [], time.perf_counter()
    try:
        for graph, graph_costs in zip(graphs, costs):
            plan = entry.function(graph, graph_costs, _graph_budget(graph, solver, budget, options)
                                  if entry.uses_budget else None)
            if options is not None:
                plan = _as_the_backend_runs(graph, plan, graph_costs, options)
            if plan.peak_bytes is None or plan.recompute_seconds is None:  # a solver that left them out
                plan.peak_bytes = int(graph_costs.estimate(plan).peak_bytes_hint)
                plan.recompute_seconds = graph_costs.recompute_seconds(graph_costs.indices(plan.saved))
            plans.append(plan)
    except InfeasibleBudgetError as error:
        row.update(feasible=False, solve_s=time.perf_counter() - started, error=str(error))
        return row, None
    solve_s = time.perf_counter() - started
    merged = Plan.merge(plans)
    fits = budget is None or merged.peak_bytes <= budget
    base = sum(_step_seconds(c) for c in costs)
    row.update(feasible=fits, predicted_peak_bytes=int(merged.peak_bytes),
               predicted_recompute_s=float(merged.recompute_seconds),
               predicted_step_s=base + float(merged.recompute_seconds), solve_s=solve_s,
               saved=len(merged.saved), recomputed=len(merged.recomputed),
               optimality_gap=plans[0].optimality_gap if len(plans) == 1 else None)
    if not fits:
        row["error"] = f"{solver} ignores memory_budget; its plan peaks above it"
    return row, merged


# --- measuring (GPU) ------------------------------------------------------------------------------------------------
def _on_cuda(model_or_fn: Any) -> bool:
    if not torch.cuda.is_available() or not isinstance(model_or_fn, torch.nn.Module):
        return False
    first = next(iter(model_or_fn.parameters()), None)
    return first is not None and first.device.type == "cuda"


def measure_step(model: torch.nn.Module, example_args: tuple, example_kwargs: Mapping[str, Any],
                 options: Mapping[str, Any], *, steps: int = 3) -> dict[str, Any]:
    """Compile with memgraph under ``options``, run a warm-up step, then ``steps`` timed steps: measured peak
    (max_memory_allocated after the warm-up) and median step time. Gradients are dropped after each step."""
    import statistics

    _compat.reset_dynamo()
    compiled = torch.compile(model, backend="memgraph", options=dict(options))

    def step():
        out = compiled(*example_args, **example_kwargs)
        loss = out.loss if hasattr(out, "loss") else out
        loss = loss if loss.dim() == 0 else loss.sum()
        loss.backward()
        del out, loss
        for p in model.parameters():
            p.grad = None

    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"measured_peak_bytes": int(torch.cuda.max_memory_allocated()), "step_s": statistics.median(times),
            "compile_s": compile_s}


def _tokens(example_args: tuple, example_kwargs: Mapping[str, Any]) -> int | None:
    ids = example_kwargs.get("input_ids", example_args[0] if example_args else None)
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else None


# --- the harness ----------------------------------------------------------------------------------------------------
def compare(model_or_fn: Any, *example_args: Any, budgets: Iterable[Any] | None = None,
            solvers: Sequence[str] = DEFAULT_SOLVERS, example_kwargs: Mapping[str, Any] | None = None,
            options: Mapping[str, Any] | None = None, measure: bool | None = None, json_path: str | None = None,
            png_path: str | None = None, progress: bool = True, print_table: bool = True,
            title: str | None = None, save_graph_path: str | None = None, seq: int | None = None, batch: int = 1,
            weights: str = "bf16", lora: int | None = 16) -> list[dict[str, Any]]:
    """Plan ``model_or_fn``'s training step with every solver at every budget; return one row per pair.

    model_or_fn: a model or function (with its example inputs), or already captured graphs: a
    ``TrainingGraph``, a list of them, or the path of a saved one (planned only; nothing to measure).
    save_graph_path: also save the captured graph(s) there (``memgraph.load_graph`` reads them back).
    A model source (a ``memgraph.models`` name, a directory with config.json, a cached Hub id) is built on the
    meta device as ``weights``/``lora`` say and compared at ``batch`` x ``seq`` tokens.

    budgets: bytes or strings ("8GiB"); None or "auto" = 5 budgets from the layer-checkpointing peak to the
    no-recompute peak; "auto:N" = N such budgets; a None entry = the fastest plan.
    Row keys: solver, budget_bytes, feasible, predicted_peak_bytes, predicted_recompute_s, predicted_step_s,
    solve_s, saved, recomputed, optimality_gap, error; measured (measure=True, or None and the model is on a
    GPU): measured_peak_bytes, step_s, tok_s, compile_s.
    Prints a markdown table (tqdm progress bar while it runs), writes ``json_path`` and a Pareto plot
    (peak memory vs predicted step time, one curve per solver) to ``png_path`` when given.
    """
    from memgraph.cost_model import solvers as registry

    example_kwargs = dict(example_kwargs or {})
    for name in solvers:
        registry.get(name)  # unknown names fail before the (slow) capture
    graphs = _given_graphs(model_or_fn)
    given = graphs is not None
    if given and measure:
        raise ValueError("measure=True needs the model: a saved or given graph can only be planned")
    if not given and isinstance(model_or_fn, str):  # a model source: built on the meta device
        from memgraph.sources import example_batch, training_model

        if seq is None:
            raise ValueError("comparing a model source needs seq= (and batch=, default 1)")
        model_or_fn = training_model(model_or_fn, weights=weights, lora=lora)
        example_kwargs = {**example_batch(model_or_fn, batch, seq), **example_kwargs}
    if not given:
        from memgraph.capture import capture

        captured = capture(model_or_fn, *example_args, example_kwargs=example_kwargs, options=options,
                           solvers=("none",), backward=False)
        graphs = [record.graph for record in captured]
    if save_graph_path:
        _save_graphs(graphs, save_graph_path)
    costs = _costs(graphs, options)
    budget_list = _resolve_budgets(budgets, graphs, costs)
    if measure is None:
        measure = not given and _on_cuda(model_or_fn)
    tokens = _tokens(example_args, example_kwargs)
    cells = [(s, b) for s in solvers for b in (budget_list if registry.get(s).uses_budget else [None])]
    rows: list[dict[str, Any]] = []
    bar = progress_bar(len(cells), progress, unit="plan")
    for solver, budget in cells:
        bar.set_description(f"{solver} @ {gib(budget, none='fastest')}")
        row, _ = plan_row(graphs, costs, solver, budget, options)
        if measure and row.get("feasible"):
            settings = {**(options or {}), "solver": solver, "memory_budget": budget}
            try:
                row.update(measure_step(model_or_fn, example_args, example_kwargs, settings))
                if tokens:
                    row["tok_s"] = tokens / row["step_s"]
            except Exception as error:  # noqa: BLE001 - one failing configuration must not lose the sweep
                row["measure_error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        bar.update(1)
    bar.close()
    if print_table:
        print(markdown_table(rows))
    if json_path:
        write_json(rows, json_path, graphs=graphs)
    if png_path:
        pareto_plot(rows, png_path, title=title)
    return rows


def _given_graphs(model_or_fn: Any) -> list[TrainingGraph] | None:
    """The graphs ``model_or_fn`` already is (a TrainingGraph, a list of them, a saved graph's path), or None."""
    from memgraph.graph_io import load_graph

    if isinstance(model_or_fn, TrainingGraph):
        return [model_or_fn]
    if isinstance(model_or_fn, (list, tuple)) and model_or_fn and all(
            isinstance(g, TrainingGraph) for g in model_or_fn):
        return list(model_or_fn)
    if isinstance(model_or_fn, (str, os.PathLike)) and str(model_or_fn).endswith(".json.gz"):
        if not os.path.exists(model_or_fn):
            raise FileNotFoundError(f"no saved graph at {model_or_fn}")
        return [load_graph(model_or_fn)]
    return None


def _save_graphs(graphs: Sequence[TrainingGraph], path: str) -> None:
    """One file per graph: ``path`` itself for one graph, ``NAME-i.json.gz`` beside it for several."""
    from memgraph.graph_io import save_graph

    path = Path(path)
    suffixes = "".join(path.suffixes)  # ".json.gz"
    stem = path.name[:len(path.name) - len(suffixes)]
    for i, graph in enumerate(graphs):
        target = path if len(graphs) == 1 else path.with_name(f"{stem}-{i}{suffixes or '.json.gz'}")
        print(f"saved the training graph to {save_graph(graph, target)}")


def _resolve_budgets(budgets: Any, graphs, costs) -> list[int | None]:
    if budgets is None or isinstance(budgets, str):
        budgets = [budgets or "auto"]
    resolved: list[int | None] = []
    for budget in budgets:
        if isinstance(budget, str) and budget.strip().lower().startswith("auto"):
            _, _, count = budget.partition(":")
            resolved += auto_budgets(graphs, int(count or 5), costs)
        elif budget is None:
            resolved.append(None)
        else:
            resolved.append(parse_bytes(budget))
    return list(dict.fromkeys(resolved))


_COLUMNS = [("solver", "solver"), ("budget_bytes", "budget"), ("predicted_peak_bytes", "predicted peak"),
            ("predicted_step_s", "predicted step"), ("predicted_recompute_s", "recompute"),
            ("measured_peak_bytes", "measured peak"), ("step_s", "step"), ("tok_s", "tok/s"),
            ("solve_s", "solve"), ("optimality_gap", "gap")]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table (GiB and milliseconds; infeasible cells say so)."""
    present = [(k, h) for k, h in _COLUMNS if any(k in r for r in rows) or k in ("solver", "budget_bytes")]
    lines = ["| " + " | ".join(h for _, h in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        cells = []
        for key, _ in present:
            value = row.get(key)
            if key == "predicted_peak_bytes" and not row.get("feasible", True):
                cells.append("infeasible" if value is None else f"{value / 2**30:.3f} GiB (over)")
            elif value is None:
                cells.append("fastest" if key == "budget_bytes" else "-")
            elif key.endswith("_bytes"):
                cells.append(f"{value / 2**30:.3f} GiB")
            elif key in ("predicted_step_s", "predicted_recompute_s", "step_s"):
                cells.append(f"{value * 1e3:.3f} ms")
            elif key == "solve_s":
                cells.append(f"{value:.2f} s")
            elif key == "tok_s":
                cells.append(f"{value:,.0f}")
            elif key == "optimality_gap":
                cells.append(f"{value:.2%}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(rows: Sequence[Mapping[str, Any]], path: str, *, graphs: Sequence[TrainingGraph] = ()) -> str:
    import datetime
    import platform
    import sys

    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "graphs": len(graphs),
            "joint_nodes": [len(g.joint.graph.nodes) for g in graphs]}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"meta": meta, "rows": list(rows)}, handle, indent=2, default=str)
    return path


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: str, *, title: str | None = None) -> str:
    """Peak memory vs step time, one curve per solver (measured where measured, else predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    measured = any("measured_peak_bytes" in r for r in rows)
    for solver in dict.fromkeys(r["solver"] for r in rows):
        points = []
        for r in rows:
            if r["solver"] != solver or not r.get("feasible"):
                continue
            peak = r.get("measured_peak_bytes", r.get("predicted_peak_bytes")) if measured else r.get(
                "predicted_peak_bytes")
            seconds = r.get("step_s", r.get("predicted_step_s")) if measured else r.get("predicted_step_s")
            if peak is not None and seconds is not None and math.isfinite(seconds):
                points.append((seconds * 1e3, peak / 2**30))
        if points:
            points.sort()
            axes.plot(*zip(*points), marker="o", label=solver)
    axes.set_xlabel(("measured" if measured else "predicted") + " step time (ms)")
    axes.set_ylabel(("measured" if measured else "predicted") + " peak memory (GiB)")
    axes.set_title(title or "memgraph solvers: memory vs time")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# --- CLI ------------------------------------------------------------------------------------------------------------
def compare_command(args: argparse.Namespace) -> int:
    from memgraph.sources import training_options, training_subject

    budgets = [b.strip() for b in args.budgets.split(",")] if args.budgets else None
    solvers = [s.strip() for s in args.solvers.split(",")]
    if args.graph:
        if args.measure == "yes":
            raise ValueError("--measure yes needs --model: a saved graph (--graph) can only be planned")
        subject, settings = args.graph, {"measure": False, "title": os.path.basename(args.graph)}
    else:
        subject, inputs, _ = training_subject(args)
        settings = {"example_kwargs": inputs, "options": training_options(args),
                    "measure": None if args.measure == "auto" else args.measure == "yes",
                    "title": f"{args.model}, seq {args.seq}, batch {args.batch}", "save_graph_path": args.save_graph}
    compare(subject, budgets=budgets, solvers=solvers, json_path=args.json, png_path=args.png, **settings)
    if args.json:
        print(f"wrote {args.json}")
    if args.png:
        print(f"wrote {args.png}")
    return 0


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``memgraph compare`` on an argparse subparsers object."""
    from memgraph.sources import add_training_arguments

    parser = subparsers.add_parser(
        "compare", help="every solver at every budget: predicted (and on a GPU measured) peak and step time",
        description="Plan one model's training step with each solver at each memory budget; print a table, "
                    "write JSON and a Pareto plot. Without a GPU the model is built on the meta device (no "
                    "weights): an 8B model plans on a laptop.")
    add_training_arguments(parser, seq=128, weights="bf16", lora=16)
    parser.add_argument("--budgets", default=None,
                        help="comma-separated: bytes or sizes like 16GiB, 'auto' or 'auto:N' (N budgets from the "
                             "checkpointing peak to the no-recompute peak; default auto:5)")
    parser.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS))
    parser.add_argument("--measure", default="auto", choices=["auto", "yes", "no"],
                        help="compile and run each feasible plan (needs the model on a GPU)")
    parser.add_argument("--json", default="compare.json", help="results path ('' to skip)")
    parser.add_argument("--png", default="compare.png", help="Pareto plot path ('' to skip)")
    parser.add_argument("--graph", default=None,
                        help="plan a graph saved with --save-graph or memgraph.save_graph instead of building "
                             "--model (planning only)")
    parser.add_argument("--save-graph", default=None, help="also save the captured graph here (.json.gz)")
    parser.set_defaults(run=compare_command)
    return parser
