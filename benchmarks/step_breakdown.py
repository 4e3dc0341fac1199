"""Where a planned training step's time goes, by the cost model, against the tokens/s targets (no GPU needed).

The end-to-end targets of DESIGN.md (Llama-3-8B QLoRA: 10,000 tokens/s at seq 2048, 12,000 at 8192) fix a
step time. This script captures the model's step on the meta device with the end-to-end benchmark's options
(NF4, 4-bit K/V, chunked cross-entropy), plans it with the given solvers and splits the cost model's roofline
time of the step into phases (forward, backward, recompute) and kinds of work (the frozen NF4 matmuls, LoRA,
attention, the chunked lm_head + cross-entropy, everything else). Where a measured row of
``e2e_MODEL.json`` and a GPU profile of the same recipe (``profiles/prof_*.json``, ``bench_e2e --profile``) exist,
they are set beside the prediction: measured step time, the GPU's busy time, and what is left (host time the
GPU waited for).

    python benchmarks/step_breakdown.py --model llama3-8b --seqs 2048,8192 \\
        --plans offload-layers,ilp@6.75GiB --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, write_results  # noqa: E402

TARGET_TOK_S = {2048: 10_000, 8192: 12_000}  # DESIGN.md / issue targets for Llama-3-8B
OPTIONS = {"kv_bits": 4, "drop_logits": True}  # the end-to-end benchmark's memgraph options (besides the solver)
E2E_OPTIONS = "kv_bits=4&drop_logits=true"  # + "&host_embedding=true" with --host-embedding

# A node's kind of work, by its op (first match on the op's qualified name wins).
WORK_KINDS = (
    ("nf4 (fused matmul, or dequantize)", ("memgraph.nf4_",)),  # exposed NF4 weights: dequantize + aten.mm
    ("lora", ("memgraph.lora_",)),
    ("attention", ("memgraph.attention", "memgraph.quantize_kv")),
    ("lm_head + cross-entropy", ("memgraph.linear_cross_entropy",)),
    ("transfers", ("memgraph.offload", "memgraph.reload", "memgraph.wait_transfer", "memgraph.host_embedding")),
    ("matmul", ("aten.mm", "aten.bmm", "aten.addmm", "aten.matmul", "aten.linear")),
)


def work_kind(node) -> str:
    name = str(getattr(node.target, "name", lambda: node.target)()) if node.op == "call_function" else ""
    name = name.replace("::", ".")
    return next((kind for kind, marks in WORK_KINDS if any(name.startswith(m) for m in marks)), "elementwise/norm/other")


def breakdown(costs, plan) -> dict[str, dict[str, float]]:
    """{phase: {kind: ms}}: every forward and backward node once, plus the plan's recomputed nodes again."""
    recomputed = costs.indices(plan.recomputed)
    table: dict[str, dict[str, float]] = {"forward": {}, "backward": {}, "recompute": {}}
    for i, node in enumerate(costs.nodes):
        phase = costs.phase[i]
        if phase == "input":
            continue
        kind = work_kind(node)
        ms = float(costs.seconds[i]) * 1e3
        table[phase][kind] = table[phase].get(kind, 0.0) + ms
        if i in recomputed:
            table["recompute"][kind] = table["recompute"].get(kind, 0.0) + ms
    return table


def parse_plan(text: str) -> tuple[str, str | None, str]:
    """``solver[@budget][&option=value...]`` (the e2e recipe's own spelling of the options after the budget,
    e.g. ``ilp@6.5GiB&optimizer=adamw&cudagraphs=true``) -> (solver, budget or None, the options' text)."""
    head, _, extra = text.partition("&")
    solver, _, budget = head.partition("@")
    return solver, budget or None, extra


def extra_options(extra: str) -> dict:
    """The options' text as bench_e2e reads a recipe's (numbers, true/false, lists joined by '+')."""
    from bench_e2e import _option_value

    pairs = (pair.partition("=") for pair in filter(None, extra.split("&")))
    return {key: _option_value(value) for key, _, value in pairs}


def measured(model: str, seq: int, solver: str, budget: str | None, host_embedding: bool, results: Path,
             extra: str = "", host_link: float | None = None) -> dict:
    """The e2e row of the same recipe (the latest, if several) and its profile, where they exist. A row whose
    plan saw a host link other than ``host_link`` (bytes/s; off by more than 1.5x either way, or not recorded)
    measured another plan wherever the solver weighs offload, and is left out (``offload-layers`` does not)."""
    recipe = (f"bnb/memgraph?{E2E_OPTIONS}" + ("&host_embedding=true" if host_embedding else "")
              + f"&solver={solver}" + (f"&memory_budget={budget}" if budget else "") + (f"&{extra}" if extra else ""))
    path = results / f"e2e_{model}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    mine = [r for r in rows if r.get("recipe") == recipe and r.get("seq") == seq and r.get("tok_s")
            and (solver == "offload-layers" or _same_link(r.get("host_link_gb_s"), host_link))]
    found: dict = {}
    if mine:
        latest = max(mine, key=lambda r: str(r.get("measured", "")))
        found.update(measured_step_ms=latest["step_ms"], measured_tok_s=latest["tok_s"],
                     measured_peak_gib=latest["peak_gib"], measured_at=latest.get("measured"))
    folder = results / "profiles"
    profiles = [(path, json.loads(path.read_text())) for path in sorted(folder.glob("prof_*.json"))] \
        if folder.exists() else []
    profiles = [(path, data) for path, data in profiles if data.get("recipe") == recipe and data.get("seq") == seq]
    if profiles:  # the plain profile, not a variant kept for comparison (``..._before_split``): the shortest name
        path, data = min(profiles, key=lambda item: len(item[0].name))
        found.update(profiled_gpu_busy_ms=data["gpu_busy_s"] * 1e3, profile=path.name,
                     profiled_gpu_ms_by_kind={k: v * 1e3 for k, v in data["kernel_s_by_kind"].items()})
    return found


def _same_link(measured_gb_s: float | None, planned_bytes_per_s: float | None) -> bool:
    if not planned_bytes_per_s:
        return True
    if not measured_gb_s:  # a row from before bench_e2e recorded the link (whose GPU plans timed it on fake tensors)
        return False
    return 1 / 1.5 < measured_gb_s * 1e9 / planned_bytes_per_s < 1.5


def run(args) -> list[dict]:
    import torch

    from memgraph.capture import capture
    from memgraph.options import resolve_options
    from memgraph.pipeline import costs_under, plan_training_graph
    from memgraph.sources import example_batch, training_model

    if args.host_link:
        plan_with_host_link(args.host_link)
    rows = []
    for seq in args.seqs:
        model = training_model(args.model, weights="bnb", lora=16)
        if args.host_embedding:  # the e2e recipe's model transform: the frozen embedding table in host memory
            import memgraph

            memgraph.offload_embeddings_(model)
        batch = example_batch(model, 1, seq)
        graphs = [r.graph for r in capture(model, example_kwargs=batch, options=OPTIONS, solvers=("none",),
                                           backward=False)]
        for text in args.plans:
            solver, budget, extra = parse_plan(text)
            options = resolve_options({**OPTIONS, "offload": "on", "solver": solver, "memory_budget": budget,
                                       **extra_options(extra)})
            for captured_graph in graphs:
                # as the backend plans (a recomputed attention at 16 bits where it fits)
                graph, plan, _ = plan_training_graph(captured_graph, options)
                graph_costs = costs_under(graph, options)
                table = breakdown(graph_costs, plan)
                total = sum(sum(kinds.values()) for kinds in table.values())
                forward_ms = sum(table["forward"].values())
                host = plan.host_bytes or 0
                row = {"model": args.model, "seq": seq, "solver": solver, "memory_budget": budget,
                       "plan_options": extra,
                       "exact_recomputed_attention": any("at 16 bits" in note for note in plan.notes),
                       "predicted_peak_gib": plan.peak_bytes / 2**30 if plan.peak_bytes else None,
                       "predicted_step_ms": total, "predicted_exposed_transfer_ms": (plan.transfer_seconds or 0) * 1e3,
                       # what the plan's offloads put on the host link, against the forward they hide behind: a
                       # plan whose copies fill forward's time cannot hide them
                       "predicted_host_gib": host / 2**30,
                       "offload_link_share_of_forward": host / graph_costs.device.host_link_bytes_per_s
                       / (forward_ms / 1e3) if forward_ms else None,
                       "predicted_ms": {phase: dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
                                        for phase, kinds in table.items()}}
                target = TARGET_TOK_S.get(seq) if args.model == "llama3-8b" else None
                if target:
                    row.update(target_tok_s=target, target_step_ms=seq / target * 1e3)
                row.update(measured(args.model, seq, solver, budget, args.host_embedding, Path(args.results), extra,
                                    args.host_link))
                rows.append(row)
        del model
        torch._dynamo.reset()
    return rows


def plan_with_host_link(bytes_per_s: float) -> None:
    """Plan as the GPU would: on a CUDA machine the backend plans with the host link it measured (55 GB/s on the
    H100 of the e2e rows); on the meta device it would take ``DeviceSpec``'s default."""
    import memgraph.pipeline as pipeline
    from memgraph.cost_model.runtime import DeviceSpec

    setting = pipeline.offload_setting
    pipeline.offload_setting = lambda graph, options: (setting(graph, options)[0],
                                                       DeviceSpec(host_link_bytes_per_s=bytes_per_s))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seqs", default="2048,8192", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--plans", default="offload-layers", type=lambda s: s.split(","),
                        help="solver[@budget][&option=value...], comma-separated (e.g. "
                             "ilp@6.5GiB&optimizer=adamw&cudagraphs=true)")
    parser.add_argument("--host-embedding", action=argparse.BooleanOptionalAction, default=True,
                        help="the frozen input embedding in host memory, as the e2e recipe has it")
    parser.add_argument("--host-link", type=float, default=None,
                        help="host<->device bytes/s to plan with, e.g. 55e9 (default: DeviceSpec's)")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="where e2e_MODEL.json and profiles/ are read")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    args = parser.parse_args(argv)
    if args.out:
        import os

        os.environ["OUT"] = args.out
    rows = run(args)
    print_table([{"seq": r["seq"], "plan": r["solver"] + (f"@{r['memory_budget']}" if r["memory_budget"] else "")
                  + (f"&{r['plan_options']}" if r["plan_options"] else ""),
                  "predicted ms": round(r["predicted_step_ms"], 1),
                  "recompute ms": round(sum(r["predicted_ms"]["recompute"].values()), 1),
                  "host GiB": round(r["predicted_host_gib"], 2),
                  "link share": round(r["offload_link_share_of_forward"] or 0, 2),
                  "target ms": round(r.get("target_step_ms", 0), 1),
                  "measured ms": round(r.get("measured_step_ms", 0), 1),
                  "GPU busy ms": round(r.get("profiled_gpu_busy_ms", 0), 1)} for r in rows])
    write_results(f"step_breakdown_{args.model}", rows, model=args.model, options=OPTIONS,
                  host_embedding=args.host_embedding, host_link_bytes_per_s=args.host_link,
                  note="predicted: the cost model's roofline time per node (DeviceSpec defaults), planned on the "
                       "meta device; measured: e2e rows and profiles of the same recipe where they exist")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
