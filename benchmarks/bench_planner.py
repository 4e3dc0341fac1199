"""Planner sweep: predicted and measured peak and tokens/s of each recompute solver across memory budgets.

    python benchmarks/bench_planner.py                  # H200: Llama-3-8B, bf16 LoRA + QLoRA, seq 2048, 5 budgets
    python benchmarks/bench_planner.py --quick          # bf16 LoRA only, 3 budgets (fits the ~8 minute slot)
    python benchmarks/bench_planner.py --device cpu     # smoke run on a tiny model (no GPU)

The step's joint graph is captured once per recipe (Dynamo + AOTAutograd, one real forward + backward);
budgets are spread from the layer-checkpointing peak to the no-recompute peak (predicted); each solver plans
under each budget (``solve_s``) and its partitioned graphs run as AOTAutograd's runtime runs them (backward
frees saved values as it consumes them): measured ``max_memory_allocated`` after a warm-up step, running the graphs' generated Python (boxed: every value, saved inputs included, freed after its last
use, as in the eager codegen) — every solver under the same code generator, so the differences are the plans',
without an Inductor recompile per point. ``tok_s`` is timed on the same step captured as one CUDA graph (GPU
time: the eager codegen's ~20k Python-issued launches per 8B step make its wall time mostly host time, which
varies with the machine's load by more than the plans differ); the eager step's time is kept as ``tok_s_eager``.
"qlora" is the standard QLoRA recipe: frozen linears replaced by bitsandbytes NF4 ``Linear4bit``, captured
with memgraph's ``nf4`` rewrite (bitsandbytes' matmuls become ``memgraph.nf4_linear``); attention stays SDPA.
Compile time of a whole ``torch.compile(backend="memgraph")`` vs Inductor: ``bench_e2e.py`` (recipes
``bf16/inductor`` and ``bf16/memgraph?solver=ilp&memory_budget=...``).
Rows (``planner_sweep.json``, or ``--name``): ``recipe``, ``solver``, ``budget_bytes``,
``predicted_peak_bytes``, ``measured_peak_bytes``, ``tok_s``, ``solve_s`` (+ ``predicted_recompute_s``,
``error``). Pareto plot per recipe: ``<name>_<recipe>.png`` (measured peak vs step time) in $OUT or
benchmarks/results.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, results_dir, untimed_gpu_work, write_results  # noqa: E402

SOLVERS = ("ilp", "greedy", "torch-budget", "checkpoint")
# torch's knapsack re-partitions the 8B graph per bisection step (~4 s each): bound it to fit the GPU slot
SOLVER_LIMITS = {"torch-budget": {"grid": (0.8, 0.5, 0.2, 0.0), "steps": 2, "time_limit": 20.0},
                 "greedy": {"time_limit": 8.0}}
QUICK_LIMITS = {"torch-budget": {"grid": (0.6, 0.2), "steps": 1, "time_limit": 10.0},
                "greedy": {"time_limit": 6.0}}
GIB = 2**30


def build(recipe: str, model_name: str, device: str):
    from memgraph import models

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = models.build(model_name, dtype=dtype, device=device, lora=False, use_cache=False)
    model.requires_grad_(False)
    if recipe == "qlora":
        models.to_bnb_4bit(model)
        if device == "cuda":
            torch.cuda.empty_cache()
    return models.add_lora(model, rank=16).train()


def capture_recipe(recipe: str, model_name: str, device: str, batch: int, seq: int):
    """The recipe's model, its input ids and its captured step (Dynamo + AOTAutograd, one forward + backward);
    the same graph, node names included, as ``tests/data``'s saved 8B graphs."""
    from memgraph.capture import capture

    model = build(recipe, model_name, device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    rewrites = ("nf4",) if recipe == "qlora" else False
    (captured,) = capture(model, options={"rewrites": rewrites}, solvers=("none",), input_ids=ids, labels=ids)
    model.zero_grad(set_to_none=True)
    return model, ids, captured


def step_function(captured, graphs, device: str):
    """One step of the plan's partitioned graphs, returning its peak (sampled on CUDA, tracked on the CPU)."""
    from memgraph.cost_model.tracker import MemoryTracker, run_step

    fw, bw = graphs
    graph = captured.graph

    def one_step() -> int:
        if device == "cuda":
            result = run_step(fw, bw, captured.primals, graph.num_fwd_outputs,
                              sample=lambda _: torch.cuda.memory_allocated(), node_by_node=False)
        else:
            result = run_step(fw, bw, captured.primals, graph.num_fwd_outputs, tracker=MemoryTracker(),
                              node_by_node=False)
        peak = result.peak_bytes
        del result
        return peak

    return one_step


def prepare_plan(captured, plan):
    """The plan's partitioned forward and backward graphs (kept for every measurement pass)."""
    from memgraph.passes.partition import partition

    return partition(captured.graph, plan)


def measure_plan(captured, graphs, tokens: int, device: str, steps: int, cuda_graph: bool) -> dict[str, Any]:
    """Run the plan's partitioned graphs (the caller holds the GPU timing lock): the peak of eager steps after a
    warm-up step and their times; with ``cuda_graph``, also the GPU time of the step captured as one CUDA graph
    (``gpu_times``): the eager codegen's Python issues ~20k kernel launches per 8B step, so its wall time is
    mostly host time, which varies with the machine's load and hides the plans' differences."""
    one_step = step_function(captured, graphs, device)
    one_step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, peak = [], 0
    for _ in range(steps):
        started = time.perf_counter()
        peak = max(peak, one_step())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    measured = int(torch.cuda.max_memory_allocated()) if device == "cuda" else int(peak)
    result: dict[str, Any] = {"measured_peak_bytes": measured, "times": times}
    if cuda_graph and device == "cuda":
        result["gpu_times"] = cuda_graph_step_times(one_step, steps)
    return result


def cuda_graph_step_times(one_step, steps: int) -> list[float]:
    """Seconds per replay of the step captured as one CUDA graph (its memory in a private pool, freed after)."""
    torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph's pool needs the room
    step_graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(step_graph):
            one_step()
        step_graph.replay()  # warm
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(steps):
            start.record()
            step_graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    finally:
        del step_graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def record_timing(row: dict[str, Any], times: list[float], gpu_times: list[float], tokens: int) -> None:
    """``step_s``/``tok_s``: the CUDA-graph step (GPU time, median) where measured, else the fastest eager step
    (host jitter only ever adds time); the eager figures are kept beside it (``*_eager``)."""
    row.update(step_s_eager=min(times), step_s_eager_median=statistics.median(times),
               tok_s_eager=tokens / min(times), timed_steps=len(times))
    if gpu_times:
        row.update(step_s=statistics.median(gpu_times), step_s_cuda_graph_min=min(gpu_times),
                   step_s_cuda_graph_max=max(gpu_times), timing="cuda_graph")
    else:
        row.update(step_s=min(times), timing="eager_min")
    row["tok_s"] = tokens / row["step_s"]


def solve(captured, solver: str, budget: int, limits: dict, row: dict[str, Any]):
    """Plan under the budget, recording solve time and prediction in ``row``; the plan, or None (error)."""
    from memgraph.cost_model import solvers

    started = time.perf_counter()
    try:
        plan = solvers.get(solver).function(captured.graph, captured.costs, budget, **limits)
    except Exception as error:  # noqa: BLE001 - an infeasible or failing point is a row, not a crash
        row.update(solve_s=time.perf_counter() - started, error=_error_text(error))
        return None
    row.update(solve_s=time.perf_counter() - started, predicted_peak_bytes=plan.peak_bytes,
               predicted_recompute_s=plan.recompute_seconds, optimality_gap=plan.optimality_gap)
    return plan


def show(row: dict[str, Any]) -> None:
    print({(k[:-len("_bytes")] + "_gib" if k.endswith("_bytes") else k):
           (round(v / GIB, 3) if k.endswith("_bytes") and v else v) for k, v in row.items()
           if k != "error"} | ({"error": row["error"][:120]} if "error" in row else {}), flush=True)


def sweep(recipe: str, args, rows: list[dict[str, Any]], on_row=None) -> None:
    """Capture (GPU, under the timing lock), plan every (budget, solver) point (CPU), then measure every plan
    (GPU, under the lock): two recipes can run in parallel on one GPU without their GPU phases overlapping."""
    from memgraph.compare import auto_budgets

    device = args.device
    started = time.perf_counter()
    with untimed_gpu_work():
        model, ids, captured = capture_recipe(recipe, args.model, device, args.batch, args.seq)
    print(f"[{recipe}] built the model and captured the step in {time.perf_counter() - started:.1f} s "
          f"({len(captured.graph.joint.graph.nodes)} joint nodes)", flush=True)
    budgets = auto_budgets([captured.graph], args.budgets, [captured.costs])
    print(f"[{recipe}] budgets (GiB): {[round(b / GIB, 2) for b in budgets]}", flush=True)
    planned: list[tuple[dict[str, Any], Any]] = []
    for position, budget in enumerate(budgets):
        for solver in args.solvers:
            # Cold solves (as in a compile) at the first budget; later budgets share the problem's memo (e.g.
            # torch's partition at a fraction already tried), so their solve_s is marked warm.
            if position == 0:
                captured.costs.simulations.clear()
                captured.costs.memo.clear()
            limits = (QUICK_LIMITS if args.quick else SOLVER_LIMITS).get(solver, {})
            row: dict[str, Any] = {"recipe": recipe, "solver": solver, "budget_bytes": budget, "seq": args.seq,
                                   "warm_solve": position > 0}
            plan = solve(captured, solver, budget, limits, row)
            planned.append((row, plan))
            rows.append(row)
            show(row)
            if solver == "torch-budget" and plan is not None and plan.peak_bytes is not None and "ilp" in args.solvers:
                # ILP at exactly the peak torch's knapsack reached: the like-for-like comparison at equal memory.
                matched = {"recipe": recipe, "solver": "ilp@torch-budget-peak", "budget_bytes": int(plan.peak_bytes),
                           "seq": args.seq, "warm_solve": True}
                earlier = next((p for r, p in planned if r["solver"] == matched["solver"]
                                and r["budget_bytes"] == matched["budget_bytes"]), None)
                if earlier is not None:  # torch reached the same peak at an earlier budget: same problem, same plan
                    matched.update(solve_s=0.0, predicted_peak_bytes=earlier.peak_bytes,
                                   predicted_recompute_s=earlier.recompute_seconds,
                                   optimality_gap=earlier.optimality_gap)
                    planned.append((matched, earlier))
                else:
                    planned.append((matched, solve(captured, "ilp", int(plan.peak_bytes),
                                                   (QUICK_LIMITS if args.quick else SOLVER_LIMITS).get("ilp", {}),
                                                   matched)))
                rows.append(matched)
                show(matched)
            if on_row is not None:
                on_row()  # results on disk after every point: a run stopped by a time limit keeps them
    measure_distinct_plans(recipe, captured, planned, ids.numel(), args, on_row)
    del captured, model, planned
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:300]}"


def measure_distinct_plans(recipe: str, captured, planned: list, tokens: int, args, on_row) -> None:
    """Measure every plan in ``planned`` ((row, plan) pairs) into its row, in ``args.passes`` passes under the
    GPU timing lock (each pass: warm-up + steps per plan, so slow drift or another process's host work hits every
    plan alike). Identical plans (checkpoint at every budget, torch's knapsack at budgets above its reach, ...)
    are partitioned and timed once; their rows share the measurement."""
    device = args.device
    distinct: dict[tuple, tuple[list[dict[str, Any]], Any, tuple[list[float], list[float]]]] = {}
    for row, plan in planned:
        if plan is None:
            continue
        key = (frozenset(plan.saved), frozenset(plan.recomputed))
        if key in distinct:
            distinct[key][0].append(row)
            continue
        try:
            distinct[key] = ([row], prepare_plan(captured, plan), ([], []))
        except Exception as error:  # noqa: BLE001
            row["error"] = _error_text(error)
    print(f"[{recipe}] {len(distinct)} distinct plans among {len(planned)} points", flush=True)
    cuda_graph = device == "cuda" and not args.no_cuda_graph
    for number in range(args.passes):
        with exclusive_gpu_timing():
            for same_rows, graphs, (times, gpu_times) in distinct.values():
                if any("error" in row for row in same_rows):
                    continue
                try:
                    result = measure_plan(captured, graphs, tokens, device, args.steps, cuda_graph)
                except Exception as error:  # noqa: BLE001
                    if not cuda_graph:
                        for row in same_rows:
                            row["error"] = _error_text(error)
                        continue
                    # A step that cannot be captured (a host sync, ...): time every later plan eagerly only.
                    print(f"[{recipe}] CUDA graph capture failed, timing eagerly from here on: {_error_text(error)}",
                          flush=True)
                    cuda_graph = False
                    for row in same_rows:
                        row["cuda_graph_error"] = _error_text(error)
                    try:
                        result = measure_plan(captured, graphs, tokens, device, args.steps, False)
                    except Exception as error2:  # noqa: BLE001
                        for row in same_rows:
                            row["error"] = _error_text(error2)
                        continue
                times.extend(result["times"])
                gpu_times.extend(result.get("gpu_times", []))
                first = same_rows[0]
                for row in same_rows:
                    row["measured_peak_bytes"] = max(row.get("measured_peak_bytes", 0),
                                                     result["measured_peak_bytes"])
                    record_timing(row, times, gpu_times, tokens)
                    row["passes"] = number + 1
                    if row is not first:
                        row["same_plan_as"] = f"{first['solver']} @ {first['budget_bytes'] / GIB:.2f} GiB"
                show(first)
                if on_row is not None:
                    on_row()
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from memgraph.compare import pareto_plot

    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        points = [dict(r, feasible="error" not in r and "step_s" in r) for r in rows
                  if r.get("recipe") == recipe and r.get("solver") in SOLVERS + ("ilp@torch-budget-peak",)]
        pareto_plot(points, str(path.with_name(f"{path.stem}_{recipe}.png")), title=f"planner sweep: {recipe}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="memgraph.models name (default llama3-8b; cpu: llama)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budgets", type=int, default=None, help="number of budgets (default 5; --quick 3)")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--recipes", default=None, help="lora,qlora (default; --quick: lora)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per plan per pass")
    parser.add_argument("--passes", type=int, default=1, help="measurement passes over every plan")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="time eager steps only (default on CUDA: also the step captured as one CUDA graph)")
    parser.add_argument("--name", default="planner_sweep", help="results file name (and plot stem)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.model = args.model or ("llama" if cpu else "llama3-8b")
    args.seq = args.seq or (128 if cpu else 2048)
    args.budgets = args.budgets or (3 if args.quick else 5)
    args.solvers = [s.strip() for s in args.solvers.split(",")]
    recipes = (args.recipes or ("lora" if args.quick or cpu else "lora,qlora")).split(",")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def save() -> None:
        write_results(args.name, rows, model=args.model, seq=args.seq, total_s=time.perf_counter() - started)

    for recipe in recipes:
        try:
            sweep(recipe, args, rows, save)
        except Exception as error:  # noqa: BLE001 - keep the other recipe's rows
            traceback.print_exc()
            rows.append({"recipe": recipe, "error": f"{type(error).__name__}: {error}"[:300]})
    out = results_dir()
    save()
    plot(rows, out / f"{args.name}.png")
    print_table([{k: v for k, v in r.items() if k != "error"} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
