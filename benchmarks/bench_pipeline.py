"""Pipeline overhead: memgraph (solver "mincut") vs torch.compile's default Inductor, side by side.

Llama-3-8B architecture (random weights), bf16 LoRA (r=16 on every projection), batch 1. Measures compile time
(first step), median step time of timed steps after warm-up, and peak memory (max_memory_allocated after a
warm-up step). Writes benchmarks/results/pipeline_overhead.json (or $OUT/pipeline_overhead.json).

    python benchmarks/bench_pipeline.py [--model llama3-8b] [--seq 2048] [--steps 5] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402


def _compile(model, recipe: str):
    torch._dynamo.reset()
    if recipe == "eager":
        return model
    if recipe == "inductor":
        return torch.compile(model)
    if recipe.startswith("memgraph"):
        solver = recipe.split(":", 1)[1] if ":" in recipe else "mincut"
        return torch.compile(model, backend="memgraph", options={"solver": solver})
    raise ValueError(f"unknown recipe {recipe!r}")


def run_recipe(model, recipe: str, ids: torch.Tensor, steps: int) -> dict:
    step_model = _compile(model, recipe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.synchronize()
    started = time.perf_counter()
    first_loss = float(step())  # compiles
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    step()  # warm-up after compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    row = {
        "recipe": recipe,
        "seq": ids.shape[1],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tok_s": ids.numel() / step_s,
        "step_ms": step_s * 1e3,
        "compile_s": compile_s - step_s,
        "first_loss": first_loss,
    }
    if recipe.startswith("memgraph"):
        import memgraph

        plans = [r.plan for r in memgraph.compiled_graphs() if r.plan is not None]
        if plans:
            row.update(graphs=len(plans), solve_s=sum(p.solve_seconds or 0 for p in plans),
                       predicted_peak_gib=(max(p.peak_bytes or 0 for p in plans) / 2**30) or None)
    del step_model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recipes", default="eager,inductor,memgraph:mincut")
    parser.add_argument("--quick", action="store_true", help="2 layers: a smoke test of the script")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one recipe, write its row here
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_pipeline needs a CUDA GPU")
    if args.only:
        from memgraph import models

        overrides = {"num_hidden_layers": 2} if args.quick else {}
        model = models.build(args.model, dtype=torch.bfloat16, device="cuda", lora=True, **overrides)
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
        Path(args.row_out).write_text(json.dumps(run_recipe(model, args.only, ids, args.steps)))
        return
    # Each recipe runs in its own process with compile caches off, so no recipe inherits another's warm
    # caches (compile time) or allocator state (peak memory).
    rows = []
    environment = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    for recipe in args.recipes.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as row_file:
            command = [sys.executable, __file__, "--only", recipe, "--row-out", row_file.name, "--model",
                       args.model, "--seq", str(args.seq), "--steps", str(args.steps)] + (["--quick"] * args.quick)
            subprocess.run(command, check=True, env=environment)
            rows.append(json.loads(Path(row_file.name).read_text()))
        print_table(rows[-1:])
    base = next((r for r in rows if r["recipe"] == "inductor"), None)
    if base:
        for row in rows:
            row["step_time_vs_inductor"] = base["tok_s"] / row["tok_s"]
            row["peak_vs_inductor"] = row["peak_gib"] / base["peak_gib"]
    write_results("pipeline_overhead", rows, model=args.model, lora="r16 alpha16 q,k,v,o,gate,up,down",
                  quick=args.quick)
    print_table(rows)


if __name__ == "__main__":
    main()
