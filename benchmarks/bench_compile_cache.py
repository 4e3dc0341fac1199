"""Cold vs warm compile of one training step through ``torch.compile(backend="memgraph")``, each in a fresh process
over one shared compile cache: the second process reuses the compiled forward/backward and the stored plan.

    python benchmarks/bench_compile_cache.py --recipe bnb/memgraph --model llama3-8b --seq 2048

Rows: ``case`` ("cold", "warm"), ``compile_s`` (first step minus a steady step), ``peak_gib``, ``tok_s``,
``first_loss``, and the per-graph cache outcome memgraph recorded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402
from bench_e2e import parse_recipe, run_in_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="bnb/memgraph")
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--recipe-timeout", type=float, default=None)
    parser.add_argument("--name", default="compile_cache")
    parser.add_argument("--after-cold", default=None, help="a file created once the cold case is done (lets other "
                                                           "GPU work start only after the cold compile)")
    args = parser.parse_args()
    parse_recipe(args.recipe)
    args.cache_dir = tempfile.mkdtemp(prefix="memgraph-compile-cache-")
    rows = []
    for case in ("cold", "warm"):
        row = {"case": case, **run_in_process(args, args.recipe)}
        rows.append(row)
        print_table([row])
        if case == "cold" and args.after_cold:
            Path(args.after_cold).touch()
    cold, warm = rows
    if "compile_s" in cold and "compile_s" in warm:
        warm["compile_vs_cold"] = warm["compile_s"] / cold["compile_s"]
        warm["same_first_loss"] = warm["first_loss"] == cold["first_loss"]
        warm["peak_vs_cold"] = warm["peak_gib"] / cold["peak_gib"]
    write_results(args.name, rows, model=args.model, seq=args.seq, recipe=args.recipe,
                  note="each case a fresh process; one TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR shared by both")
    print_table(rows)


if __name__ == "__main__":
    main()
