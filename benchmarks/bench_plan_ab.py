"""A/B step time of two plans of one training graph, replays interleaved: for differences below the spread of
``bench_planner.py``'s separate measurements (a few tenths of a percent).

Plans come as saved-value name lists (``--plans plans.json``: ``{recipe: {label: [names...]}}``).
``--make-plans plans.json`` (CPU) writes torch's knapsack plan (``activation_memory_budget=0.6``) and the ILP's
plan at that plan's peak for the 8B graphs in ``tests/data``, which were captured the way this script and
``bench_planner.py`` capture them (same node names). Each plan's step (eager codegen) is captured as one
CUDA graph; then ``--rounds`` rounds replay every plan once, in alternating order. Reported per plan: median
and mean GPU step time; per pair: the mean of the per-round differences and its standard error.

    python3 benchmarks/bench_plan_ab.py --make-plans plans.json            # CPU
    python3 benchmarks/bench_plan_ab.py --plans plans.json --recipes lora,qlora --rounds 40
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402
from bench_planner import capture_recipe, prepare_plan, step_function  # noqa: E402


def step_graph(captured, graphs):
    """The plan's step captured as one CUDA graph (after a warm-up step)."""
    one_step = step_function(captured, graphs, "cuda")
    one_step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph's private pool needs the room
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    graph.replay()
    return graph


def interleaved_times(graphs: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Seconds per replay of each graph, ``rounds`` rounds, the order alternating between rounds."""
    labels = list(graphs)
    times: dict[str, list[float]] = {label: [] for label in labels}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(rounds):
        for label in labels if r % 2 == 0 else reversed(labels):
            start.record()
            graphs[label].replay()
            end.record()
            end.synchronize()
            times[label].append(start.elapsed_time(end) / 1e3)
    return times


def compare_recipe(recipe: str, plans: dict[str, list[str]], rounds: int, rows: list[dict[str, Any]]) -> None:
    from memgraph.plan import Plan

    model, ids, captured = capture_recipe(recipe, "llama3-8b", "cuda", 1, 2048)
    graphs = {}
    for label, saved in plans.items():
        plan = Plan(solver=label, saved=list(saved), recomputed=[])
        indices = captured.costs.indices(saved)
        predicted = captured.costs.simulate(indices)
        rows.append({"recipe": recipe, "plan": label, "predicted_peak_bytes": int(predicted.peak_bytes_hint),
                     "predicted_recompute_s": captured.costs.recompute_seconds(indices)})
        graphs[label] = step_graph(captured, prepare_plan(captured, plan))
    with exclusive_gpu_timing():
        times = interleaved_times(graphs, rounds)
    by_label = {row["plan"]: row for row in rows if row["recipe"] == recipe}
    labels = list(plans)
    for label in labels:
        t = times[label]
        by_label[label].update(rounds=rounds, step_s_median=statistics.median(t), step_s_mean=statistics.fmean(t),
                               step_s_min=min(t), step_s_max=max(t), tok_s=ids.numel() / statistics.median(t))
    reference = labels[0]
    for label in labels[1:]:
        differences = [a - b for a, b in zip(times[label], times[reference])]
        mean = statistics.fmean(differences)
        error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
        by_label[label].update(vs=reference, mean_difference_s=mean, difference_standard_error_s=error,
                               relative_difference=mean / statistics.fmean(times[reference]))
    del graphs, captured, model
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def make_plans(path: str, fraction: float = 0.6) -> None:
    """torch-budget's plan at ``fraction`` and the ILP's at its predicted peak, for the saved 8B graphs."""
    from memgraph.cost_model import graph_costs, solvers
    from memgraph.cost_model.solvers.torch_budget import torch_saved
    from memgraph.graph_io import load_graph

    data = Path(__file__).resolve().parents[1] / "tests" / "data"
    plans = {}
    for recipe in ("lora", "qlora"):
        graph = load_graph(data / f"llama3_8b_{recipe}_seq2048.json.gz")
        costs = graph_costs(graph)
        knapsack = torch_saved(costs, fraction)
        ilp = solvers.get("ilp").function(graph, costs, costs.peak(knapsack))
        plans[recipe] = {f"torch-budget@{fraction}": costs.names_of(knapsack),
                         "ilp@torch-budget-peak": list(ilp.saved)}
        print(f"{recipe}: budget {costs.peak(knapsack)} B; predicted recompute torch "
              f"{costs.recompute_seconds(knapsack) * 1e3:.3f} ms, ilp {ilp.recompute_seconds * 1e3:.3f} ms")
    Path(path).write_text(json.dumps(plans))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", help="JSON: {recipe: {label: [saved node names]}}")
    parser.add_argument("--make-plans", help="write the 8B equal-memory plans (torch-budget, ilp) here and exit")
    parser.add_argument("--recipes", default="lora,qlora")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--name", default="plan_ab")
    args = parser.parse_args()
    if args.make_plans:
        make_plans(args.make_plans)
        return 0
    if not args.plans:
        parser.error("--plans is required (or --make-plans)")
    if not torch.cuda.is_available():
        print("bench_plan_ab needs a CUDA GPU", file=sys.stderr)
        return 1
    plans = json.loads(Path(args.plans).read_text())
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for recipe in args.recipes.split(","):
        compare_recipe(recipe, plans[recipe], args.rounds, rows)
        write_results(args.name, rows, plans_file=args.plans, rounds=args.rounds,
                      total_s=time.perf_counter() - started)
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
