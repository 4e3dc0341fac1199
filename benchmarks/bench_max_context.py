"""The longest sequence that trains one step under a GPU memory cap, measured, next to ``memgraph fit``'s answer.

Each probe is one training step of the recipe at one length, in its own process, under
``torch.cuda.set_per_process_memory_fraction`` (bench_e2e ``--cap-gib``). An 8B compile costs minutes, so the
probes are a list you choose around the prediction (``--seqs``), run side by side, rather than a bisection of
one compile after another; the row says which probed length fit (``max_seq``) and which next one did not
(``min_failed_seq``): the measured maximum lies between. ``memgraph fit`` runs at the same time on the CPU.

    python benchmarks/bench_max_context.py --cap-gib 24 --seqs 49152,57344,65536 \\
        --recipe 'bnb/memgraph?kv_bits=4&drop_logits=true&solver=offload-layers'
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402
from bench_e2e import parse_recipe, run_in_process  # noqa: E402


def predicted_max_seq(args, weights: str, options: dict) -> dict:
    """``memgraph fit`` (symbolic cost model, meta device) for the recipe's options at batch 1."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = ["memgraph", "fit", "--model", args.model, "--memory", f"{args.cap_gib}GiB", "--batches", "1",
                   "--device", "meta", "--weights", weights,
                   "--kv-bits", str(options.get("kv_bits", 16)), "--offload-budget", args.offload_budget,
                   "--json", out.name]
        if options.get("drop_logits"):
            command.append("--drop-logits")
        command += ["--host-embedding", "on" if options.get("host_embedding") else "off"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return {"fit_error": done.stderr.strip().splitlines()[-1][-300:]}
        row = json.loads(Path(out.name).read_text())["rows"][0]
    return {"predicted_max_seq": row["max_seq"], "predicted_plan": row.get("plan"),
            "predicted_peak_gib": row["peak_bytes"] / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--recipe", default="bnb/memgraph?kv_bits=4&drop_logits=true&solver=offload-layers"
                                            "&host_embedding=true")
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--seqs", required=True, help="probed lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--recipe-timeout", type=float, default=None)
    parser.add_argument("--offload-budget", default="64GiB", help="host memory fit may plan to offload into")
    parser.add_argument("--no-predict", action="store_true", help="skip memgraph fit")
    parser.add_argument("--name", default="max_context")
    args = parser.parse_args()
    weights, compiler, options = parse_recipe(args.recipe)
    seqs = sorted(int(s) for s in args.seqs.split(","))
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel + 1) as pool:
        prediction = None
        if compiler == "memgraph" and not args.no_predict:
            prediction = pool.submit(predicted_max_seq, args, weights, options)
        probes = {}
        for seq in seqs:
            run = argparse.Namespace(model=args.model, seq=seq, steps=args.steps, layers=None, cache_dir=None,
                                     recipe_timeout=args.recipe_timeout, cap_gib=args.cap_gib, peak_report=None)
            probes[seq] = pool.submit(run_in_process, run, args.recipe)
        rows = [probes[seq].result() for seq in seqs]
    print_table(rows)
    fitting = [r["seq"] for r in rows if r.get("fits")]
    # Only an out-of-memory under the cap is "does not fit"; a probe that timed out or crashed says nothing.
    failing = [r["seq"] for r in rows if r.get("fits") is False and r["seq"] > max(fitting, default=0)]
    summary = {"recipe": args.recipe, "cap_gib": args.cap_gib, "max_seq": max(fitting, default=None),
               "min_failed_seq": min(failing, default=None), "probes": rows}
    if prediction is not None:
        summary.update(prediction.result())
    print(json.dumps({k: v for k, v in summary.items() if k != "probes"}))
    write_results(args.name, [summary], model=args.model, batch=1,
                  note="max_seq: the longest probed length that trained a step under the cap; the true maximum "
                       "lies between it and min_failed_seq")


if __name__ == "__main__":
    main()
