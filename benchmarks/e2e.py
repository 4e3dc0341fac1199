"""The headline benchmark: a QLoRA training step of each reference model of DESIGN.md, memgraph against every
rival recipe, side by side in one run (also ``memgraph bench``).

For each model (Llama-3-8B, Mistral-7B, Qwen2.5-7B, Gemma-7B: random weights, LoRA r=16 on every projection,
batch 1) and sequence length (2048, 8192), every recipe runs in its own process (``bench_e2e.run_in_process``:
a fresh compile cache, its own allocator), N at a time with their timed steps taking turns on the GPU:

  rivals    HF eager QLoRA + gradient checkpointing, the same + Liger-Kernel, Unsloth, Inductor default and with
            activation_memory_budget 0.3
  memgraph  every feature on (NF4 matmuls, 4-bit K/V attention, fused LoRA sums, chunked cross-entropy with
            dropped logits, the frozen input embedding in host memory where it is not tied) with
            the Unsloth-like ``offload-layers`` plan and the ``ilp`` planner at each ``--budgets`` size (offload on;
            the budget holds AdamW's state too), each alone and replayed from CUDA graphs

A recipe that fails (out of memory, an import error, a time-out) gives a row with its ``error``; the run goes on.
Writes ``e2e_MODEL.json`` (rows: recipe, seq, peak_gib, tok_s, compile_s, first_loss), ``e2e_MODEL.md`` (a table)
and ``e2e_MODEL.png`` (peak memory against tokens/s per length, the Pareto front drawn) per model.

    python benchmarks/e2e.py --models llama3-8b --seqs 2048,8192 --budgets 6.5,8
    python benchmarks/e2e.py --report benchmarks/results     # tables and plots again from the JSON files
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import results_dir, write_results  # noqa: E402

MODELS = ("llama3-8b", "mistral-7b", "qwen2.5-7b", "gemma-7b")
SEQS = (2048, 8192)
RIVALS = ("bnb/eager-gc", "bnb/liger-gc", "bnb/unsloth", "bnb/inductor", "bnb/inductor?activation_memory_budget=0.3")
MEMGRAPH = "bnb/memgraph?kv_bits=4&drop_logits=true&host_embedding=true"
RECIPE_NAMES = {  # how the table and the plot name a recipe
    "bnb/eager-gc": "HF + gradient checkpointing",
    "bnb/liger-gc": "HF + GC + Liger",
    "bnb/unsloth": "Unsloth",
    "bnb/inductor": "Inductor",
    "bnb/inductor?activation_memory_budget=0.3": "Inductor, budget 0.3",
}


def memgraph_recipes(budgets_gib: list[float]) -> list[str]:
    """offload-layers and the ilp planner at each budget (which then holds the AdamW state the benchmark's step
    keeps too, so a budget is the measured peak it aims at), each alone and replayed from CUDA graphs."""
    plans = [f"{MEMGRAPH}&solver=offload-layers"] + [
        f"{MEMGRAPH}&solver=ilp&memory_budget={budget:g}GiB&optimizer=adamw" for budget in budgets_gib]
    return [recipe for plan in plans for recipe in (plan, f"{plan}&cudagraphs=true")]


def label(recipe: str) -> str:
    if recipe in RECIPE_NAMES:
        return RECIPE_NAMES[recipe]
    if recipe.startswith("bnb/memgraph"):
        options = dict(pair.partition("=")[::2] for pair in recipe.partition("?")[2].split("&"))
        budget = options.get("memory_budget")
        return (f"memgraph {options.get('solver', '')}" + (f" @ {budget}" if budget else "")
                + (" (with AdamW state)" if budget and options.get("optimizer") == "adamw" else "")
                + (" + CUDA graphs" if options.get("cudagraphs") == "true" else "")
                + ("" if options.get("host_embedding") == "true" else ", embedding on the GPU"))
    return recipe


def run(args) -> dict[str, list[dict]]:
    from bench_e2e import run_in_process
    from tqdm import tqdm

    recipes = list(RIVALS) + memgraph_recipes(args.budgets)
    if args.recipes:
        recipes = args.recipes.split(",")
    jobs = [(model, seq, recipe) for model in args.models for seq in args.seqs for recipe in recipes]
    rows: dict[str, list[dict]] = {model: [] for model in args.models}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool, \
            tqdm(total=len(jobs), unit="recipe", desc="e2e") as bar:
        futures = {pool.submit(run_in_process, _recipe_options(args, model, seq), recipe): model
                   for model, seq, recipe in jobs}
        for future in concurrent.futures.as_completed(futures):
            model = futures[future]
            row = future.result()
            rows[model].append({"model": model, **row})
            bar.set_postfix_str(f"{model} {row['seq']} {label(row['recipe'])}: "
                                + (f"{row['peak_gib']:.2f} GiB" if "peak_gib" in row else "failed"))
            bar.update()
            _write(args, model, rows[model])
    if args.parallel > 1:  # a recipe that ran out of memory beside others gets the card to itself
        again = [(model, index) for model in rows for index, row in enumerate(rows[model])
                 if out_of_memory(row)]
        for model, index in tqdm(again, unit="recipe", desc="e2e: out of memory beside other recipes, alone now"):
            first = rows[model][index]
            row = run_in_process(_recipe_options(args, model, first["seq"]), first["recipe"])
            rows[model][index] = {"model": model, **row, "shared_gpu_error": first["error"]}
            _write(args, model, rows[model])
    return rows


def out_of_memory(row: dict) -> bool:
    error = row.get("error") or ""
    return "OutOfMemoryError" in error or "out of memory" in error


def _recipe_options(args, model: str, seq: int) -> argparse.Namespace:
    return argparse.Namespace(model=model, seq=seq, steps=args.steps, layers=args.layers, cache_dir=None,
                              recipe_timeout=args.recipe_timeout, cap_gib=None, peak_report=None,
                              profile=args.profile, sync_report=args.sync_report)


def _write(args, model: str, rows: list[dict]) -> None:
    write_results(f"e2e_{model}", sorted(rows, key=_order), model=model, batch=1, layers=args.layers or "all",
                  lora="r16 alpha16 dropout0 on every projection")


def _order(row: dict) -> tuple:
    return row["seq"], row["recipe"]


# --- report: table and plot from the results ---
def markdown_table(rows: list[dict]) -> str:
    """One line per row; a 'measured' column where the rows come from more than one run (merged files). A row
    whose ``peak_gib`` is None ran but its peak was not measured (its note says why)."""
    runs = len({row.get("measured") for row in rows}) > 1
    lines = ["| seq | recipe | peak GiB | tokens/s | compile s | first loss |" + (" measured (UTC) |" if runs else ""),
             "|---|---|---|---|---|---|" + ("---|" if runs else "")]
    for row in sorted(rows, key=_order):
        when = f" {str(row.get('measured', ''))[:16].replace('T', ' ')} |" if runs else ""
        if "peak_gib" in row:
            peak = "not measured" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            lines.append(f"| {row['seq']} | {label(row['recipe'])} | {peak} | {row['tok_s']:,.0f} | "
                         f"{row['compile_s']:.0f} | {row['first_loss']:.4f} |{when}")
        else:
            lines.append(f"| {row['seq']} | {label(row['recipe'])} | failed: {row.get('error', '?')[:80]} | | | |{when}")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (less memory and more tokens/s), by memory."""
    front, best_speed = [], float("-inf")
    for memory, speed in sorted(points, key=lambda p: (p[0], -p[1])):
        if speed > best_speed:
            front.append((memory, speed))
            best_speed = speed
    return front


def plot(rows: list[dict], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({row["seq"] for row in rows})
    figure, axes = plt.subplots(1, len(seqs), figsize=(6 * len(seqs), 4.5), squeeze=False)
    for axis, seq in zip(axes[0], seqs):
        measured = [row for row in rows if row["seq"] == seq and row.get("peak_gib") is not None]
        for row in measured:
            ours = row["recipe"].startswith(MEMGRAPH)
            axis.scatter(row["peak_gib"], row["tok_s"], marker="o" if ours else "s", color="C0" if ours else "C1")
            axis.annotate(label(row["recipe"]), (row["peak_gib"], row["tok_s"]), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")
        front = pareto_front([(row["peak_gib"], row["tok_s"]) for row in measured])
        if front:
            axis.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=0.8, label="Pareto front")
            axis.legend(loc="lower right", fontsize=8)
        axis.set(title=f"{model}, seq {seq} (memgraph: circles)", xlabel="peak GiB (max_memory_allocated)",
                 ylabel="tokens / s")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(folder: Path, models: list[str]) -> None:
    for model in models:
        path = folder / f"e2e_{model}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())["rows"]
        (folder / f"e2e_{model}.md").write_text(f"# {model}\n\n{markdown_table(rows)}\n")
        plot(rows, model, folder / f"e2e_{model}.png")
        print(f"# {model}\n{markdown_table(rows)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    parser.add_argument("--seqs", default=",".join(map(str, SEQS)))
    parser.add_argument("--budgets", default="6.5,8", help="memory budgets (GiB) for memgraph's ilp planner")
    parser.add_argument("--recipes", default=None, help="run only these recipes (bench_e2e syntax, comma-separated)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per recipe (after a warm-up step)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (smoke tests)")
    parser.add_argument("--parallel", type=int, default=3, help="recipes at once (timed steps take turns)")
    parser.add_argument("--recipe-timeout", type=float, default=900.0, help="seconds per recipe")
    parser.add_argument("--sync-report", default=None, help="JSON path with RECIPE in it: the calls that make the "
                        "host wait for the GPU during one step (bench_e2e --sync-report)")
    parser.add_argument("--profile", default=None, help="JSON path with RECIPE in it: each recipe's GPU time by "
                        "kernel kind over one profiled step (bench_e2e --profile)")
    parser.add_argument("--report", metavar="FOLDER", default=None,
                        help="no GPU work: write the tables and plots again from FOLDER's e2e_*.json")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.report:
        report(Path(args.report), args.models)
        return 0
    import torch

    if not torch.cuda.is_available():
        parser.error("e2e needs a CUDA GPU (--report FOLDER rebuilds the tables and plots without one)")
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    run(args)
    report(results_dir(), args.models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
