"""Predicted peaks with offload on saved training graphs (no GPU needed): what offload buys before it is measured.

For each saved graph (``tests/data/*.json.gz``: Llama-3-8B steps captured on a GPU, or on the meta device):
layer checkpointing, ``offload-layers`` (Unsloth's recipe on our graph), and ``greedy`` / ``ilp`` with offload as
a third choice at budgets from the offload-layers peak down. Memory is modelled for Inductor's generated code;
transfer time from ``DeviceSpec.host_link_bytes_per_s`` (``--host-link``, bytes/s). The figures are the cost
model's predictions, not measurements: the GPU run is ``bench_e2e.py`` with ``solver=offload-layers`` / ``ilp``.

    python benchmarks/plan_offload.py --graphs llama3_8b_qlora_all_seq2048 llama3_8b_qlora_ce_drop_meta_seq2048 \
        --out benchmarks/results --png benchmarks/results/offload_layers_8b_predicted.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def plan_row(graph, costs, solver: str, budget: int | None) -> dict:
    from memgraph.cost_model.solvers import get
    from memgraph.errors import InfeasibleBudgetError

    started = time.perf_counter()
    try:
        plan = get(solver).function(graph, costs, budget)
    except InfeasibleBudgetError as error:
        return {"solver": solver, "budget_gib": budget / 2**30, "error": str(error).split(": the smallest")[0],
                "solve_s": time.perf_counter() - started}
    return {"solver": solver, "budget_gib": None if budget is None else budget / 2**30,
            "peak_gib": plan.peak_bytes / 2**30, "offloaded": len(plan.offloaded),
            "host_gib": (plan.host_bytes or 0) / 2**30, "recompute_ms": (plan.recompute_seconds or 0) * 1e3,
            "transfer_ms": (plan.transfer_seconds or 0) * 1e3, "solve_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", nargs="+", default=["llama3_8b_qlora_all_seq2048"],
                        help="names of tests/data/*.json.gz or paths")
    parser.add_argument("--fractions", default="1.0,0.97", help="budgets as fractions of offload-layers' peak")
    parser.add_argument("--host-link", type=float, default=None, help="host<->device bytes/s (default: DeviceSpec)")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/_common.results_dir())")
    parser.add_argument("--png", default=None, help="timeline of the first graph's offload-layers plan")
    args = parser.parse_args()

    from memgraph import cost_model
    from memgraph.cost_model.runtime import DeviceSpec
    from memgraph.graph_io import load_graph

    device = DeviceSpec(host_link_bytes_per_s=args.host_link) if args.host_link else DeviceSpec()
    rows = []
    for index, name in enumerate(args.graphs):
        path = Path(name) if Path(name).exists() else DATA / f"{name}.json.gz"
        graph = load_graph(path)
        costs = cost_model.graph_costs(graph, codegen="inductor", device=device, offload_budget=64 * 2**30)
        plain = cost_model.graph_costs(graph, codegen="inductor", device=device)
        found = [plan_row(graph, plain, "checkpoint", None), plan_row(graph, costs, "offload-layers", None)]
        reference = int(found[1]["peak_gib"] * 2**30)
        for fraction in map(float, args.fractions.split(",")):
            for solver in ("greedy", "ilp"):
                found.append(plan_row(graph, costs, solver, int(reference * fraction)))
        rows += [{"graph": path.name, **row} for row in found]
        if index == 0 and args.png:
            from memgraph.cost_model.solvers import get

            plan = get("offload-layers").function(graph, costs, None)
            costs.estimate(plan).plot(args.png, title=f"{path.name}: offload-layers (predicted)")
    print_table(rows)
    write_results("offload_predicted", rows, args.out, host_link_bytes_per_s=device.host_link_bytes_per_s,
                  note="cost-model predictions on saved graphs (memory for Inductor's code), not GPU measurements")


if __name__ == "__main__":
    main()
