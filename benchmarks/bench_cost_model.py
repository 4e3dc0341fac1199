"""Cost-model accuracy: predicted vs measured peak memory (and step time) of one training step.

    python benchmarks/bench_cost_model.py             # H200: Llama-3-8B (32 layers), LoRA and QLoRA, seq 2048/8192,
                                                      # plans none/mincut, in priority order within --time-budget
    python benchmarks/bench_cost_model.py --quick     # 4 layers, seq 1024/2048: checks the setup in ~1-2 minutes
    python benchmarks/bench_cost_model.py --device cpu  # smoke run of the script on a tiny model (no GPU)

Each case: random-init Llama-3-8B architecture in bf16 (nothing is downloaded), LoRA r=16 alpha=16 on
q,k,v,o,gate,up,down (peft); "qlora" first replaces the frozen decoder linears by bitsandbytes ``Linear4bit``
(nf4, double quant). ``torch.compile(model, backend="memgraph", options={"solver": ...})``; the prediction is
the compiled graphs' ``plan.peak_bytes`` (``memgraph.pipeline.compiled_graphs()``; max over graphs if
Dynamo split the step), predicted for the codegen that runs them (``--codegen inductor``: the buffers
Inductor's generated code allocates, ``cost_model/inductor.py``). Measured: ``max_memory_allocated`` over one forward + backward (``out =
model(...)``; ``out.loss.backward()``), after a warm-up step, ``zero_grad(set_to_none=True)`` and
``reset_peak_memory_stats``; time: median of 3 synchronized steps vs the plan's roofline ``step_seconds``.
Rows: ``case``, ``predicted_peak_bytes``, ``measured_peak_bytes``, ``error_pct``, ``predicted_step_s``,
``measured_step_s``, ``time_ratio`` (predicted / measured), ``graphs``, ``compile_s``; a failed case is a row
with ``error``. One case is also run node by node (memgraph's capture path, eager FX, ``--overlay-layers``
layers) sampling ``torch.cuda.memory_allocated`` after every node: ``cost_model_timeline.png`` in $OUT.
Results: ``cost_model_accuracy.json`` ($OUT or benchmarks/results).
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
from _common import print_table, results_dir, write_results  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def llama_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5, max_position_embeddings=8192,
                       use_cache=False, attn_implementation="sdpa")


def build_model(variant: str, layers: int, device: str, tiny: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model in fp32 would not fit twice
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(layers, tiny))
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    if variant == "qlora":
        quantize_decoder_linears(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    return model.train()


def quantize_decoder_linears(model: torch.nn.Module) -> None:
    """Replace every decoder ``nn.Linear`` by a bitsandbytes ``Linear4bit`` (nf4, double quant), in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4").to(
                    child.weight.device)
                setattr(parent, name, quantized)
                del child
        torch.cuda.empty_cache()


def step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # ``out`` (the logits) is held through backward, as the prediction assumes
    return out


def new_records(before: int) -> list:
    from memgraph.pipeline import compiled_graphs

    return [r for r in compiled_graphs() if r.graph_id >= before and r.plan is not None]


def next_graph_id() -> int:
    from memgraph.pipeline import compiled_graphs

    records = compiled_graphs()
    return records[-1].graph_id + 1 if records else 0


def predicted_at(records: list, traced_seq: int, seq: int) -> tuple[int, float | None]:
    """Predicted peak (max over the graphs) and step seconds at ``seq``; with a dynamic sequence length the
    symbolic estimate is re-evaluated (``peak_at``) with every symbol traced at ``traced_seq`` set to ``seq``."""
    if seq == traced_seq:
        return (max(int(r.plan.peak_bytes) for r in records),
                sum(r.estimate.step_seconds or 0.0 for r in records))
    peaks = []
    for record in records:
        estimate = record.estimate
        sizes = {str(symbol): seq for symbol, hint in estimate.hints.items() if hint == traced_seq}
        if not sizes:
            raise RuntimeError(f"graph {record.graph_id} has no symbol for the sequence length (static shapes?)")
        peaks.append(estimate.peak_at(**sizes))
    return max(peaks), None


def measure(model, compiled, ids, device: str) -> tuple[int, float, int]:
    """(peak bytes of one step after a warm-up, median seconds of 3 steps, bytes resident before the step)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    out = step(compiled, ids)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        fresh = torch.randint(0, model.config.vocab_size, ids.shape, device=device)
        torch.cuda.synchronize()
        begin = time.perf_counter()
        out = step(compiled, fresh)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        del out
    model.zero_grad(set_to_none=True)
    return peak, statistics.median(times), resident


def run_solver(model, variant: str, solver: str, seqs: list[int], args, deadline: float,
               rows: list[dict[str, Any]], save) -> None:
    """One compile (dynamic sequence length with --dynamic, else one per length); appends a row per length to
    ``rows`` and calls ``save()`` after each, so a run stopped by a time limit keeps what it measured."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memgraph", options={"solver": solver, "codegen": args.codegen})
    records, traced_seq = [], None
    for seq in seqs:
        row: dict[str, Any] = {"case": f"{variant}-seq{seq}-{solver}", "variant": variant, "seq": seq,
                               "solver": solver, "layers": args.layers, "codegen": args.codegen,
                               "dynamic": args.dynamic}
        if time.perf_counter() > deadline:
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            ids = torch.randint(0, model.config.vocab_size, (1, seq), device=args.device)
            if args.dynamic:
                torch._dynamo.mark_dynamic(ids, 1)
            first_id = next_graph_id()
            started = time.perf_counter()
            out = step(compiled, ids)  # compiles (first length, or every length when static) + warm-up
            del out
            sync(args.device)
            row["warmup_s"] = time.perf_counter() - started
            fresh = new_records(first_id)
            if fresh:
                records, traced_seq = fresh, seq
                row["compile_s"] = row.pop("warmup_s")
            if not records:
                raise RuntimeError("memgraph compiled no training graph (did the backend fall back?)")
            row["graphs"] = len(records)
            row["fallbacks"] = sum(1 for r in records if r.fallback)
            row["unknown_ops"] = sum(len(r.estimate.unknown_ops) for r in records)
            row["predicted_recompute_s"] = sum(r.plan.recompute_seconds or 0.0 for r in records)
            row["predicted_peak_bytes"], row["predicted_step_s"] = predicted_at(records, traced_seq, seq)
            # Bytes of the graphs' inputs (weights, ids): compare with resident_before_step_bytes to see memory
            # outside the graphs (cuBLAS workspace, buffers the step does not use).
            row["predicted_inputs_bytes"] = sum(int(r.estimate.live[0].sum()) for r in records)
            if args.device == "cuda":
                peak, seconds, resident = measure(model, compiled, ids, args.device)
                row.update(measured_peak_bytes=peak, measured_step_s=seconds, resident_before_step_bytes=resident)
                row["error_pct"] = 100.0 * (row["predicted_peak_bytes"] - peak) / peak
                if row["predicted_step_s"]:
                    row["time_ratio"] = row["predicted_step_s"] / seconds
                row["predicted_peak_gib"] = row["predicted_peak_bytes"] / GIB
                row["measured_peak_gib"] = peak / GIB
            else:
                model.zero_grad(set_to_none=True)
        except Exception as error:  # noqa: BLE001 - one failing case must not lose the others
            traceback.print_exc()
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            model.zero_grad(set_to_none=True)
            release(args.device)
        rows.append(row)
        print(row, flush=True)
        save()
    del compiled
    release(args.device)


def overlay(variant: str, seq: int, solver: str, args, out_dir: Path) -> dict[str, Any]:
    """Node-by-node measured memory of one case through the capture path, drawn over its prediction."""
    import torch._dynamo

    from memgraph import cost_model
    from memgraph.capture import capture
    from memgraph.cost_model.plot import align_measured
    from memgraph.cost_model.tracker import MemoryTracker, run_step

    torch._dynamo.reset()
    model = build_model(variant, args.overlay_layers, args.device, args.tiny)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device=args.device)
    captured = capture(model, options={"rewrites": False}, solvers=(solver,), input_ids=ids, labels=ids)
    part = captured[-1].partitions[solver]
    predicted = cost_model.estimate_partitioned(part.graph, part.fw, part.bw)
    model.zero_grad(set_to_none=True)
    release(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        measured = run_step(part.fw, part.bw, captured[-1].primals, part.graph.num_fwd_outputs,
                            sample=lambda _: torch.cuda.memory_allocated())
        peak = torch.cuda.max_memory_allocated()
    else:
        measured = run_step(part.fw, part.bw, captured[-1].primals, part.graph.num_fwd_outputs,
                            tracker=MemoryTracker())
        peak = measured.peak_bytes
    path = out_dir / "cost_model_timeline.png"
    predicted.plot(str(path), measured=align_measured(predicted, measured.per_node),
                   title=f"{variant} seq {seq} {solver}, {args.overlay_layers} layers: predicted vs measured")
    row = {"case": f"overlay-{variant}-seq{seq}-{solver}-{args.overlay_layers}layers",
           "predicted_peak_bytes": predicted.peak_bytes_hint, "measured_peak_bytes": peak,
           "error_pct": 100.0 * (predicted.peak_bytes_hint - peak) / peak, "graphs": len(captured),
           "codegen": "fx-interpreter", "plot": str(path)}
    del captured, part, model, ids, measured
    release(args.device)
    return row


def plan_every_compile() -> None:
    """Turn off Inductor's FX-graph and AOTAutograd caches: a hit skips memgraph's partitioner (its
    ``uuid()`` is None), so a later solver would reuse an earlier solver's graphs and make no plan."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, seq 1024/2048")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--variants", default="lora,qlora")
    parser.add_argument("--solvers", default="none,mincut")
    parser.add_argument("--codegen", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--overlay-layers", type=int, default=4, help="layers of the overlay case (0: skip it)")
    parser.add_argument("--name", default="cost_model_accuracy", help="results file name")
    parser.add_argument("--time-budget", type=float, default=330.0,
                        help="seconds; cases not started by then are reported as skipped")
    parser.add_argument("--dynamic", action="store_true",
                        help="mark the sequence length dynamic: one compile per (variant, solver) serves all lengths;"
                             " the other lengths' predictions come from the symbolic estimate")
    args = parser.parse_args()
    args.tiny = args.device != "cuda"
    if args.tiny:
        args.layers, seqs, args.codegen, args.overlay_layers = args.layers or 2, [64, 128], "eager", 2
        variants = [v for v in args.variants.split(",") if v != "qlora"]  # bitsandbytes 4-bit needs CUDA
    else:
        args.layers = args.layers or (4 if args.quick else 32)
        seqs = [1024, 2048] if args.quick else [2048, 8192]
        variants = args.variants.split(",")
    if args.seqs:
        seqs = [int(s) for s in args.seqs.split(",")]
    solvers = args.solvers.split(",")
    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    plan_every_compile()
    started = time.perf_counter()
    deadline = started + args.time_budget
    rows: list[dict[str, Any]] = []

    def save() -> None:
        write_results(args.name, rows, out_dir, layers=args.layers, codegen=args.codegen,
                      total_s=time.perf_counter() - started)

    try:
        if args.overlay_layers > 0:
            rows.append(overlay(variants[0], min(seqs), solvers[-1], args, out_dir))
    except Exception as error:  # noqa: BLE001 - the accuracy rows matter more than the picture
        traceback.print_exc()
        rows.append({"case": "overlay", "error": f"{type(error).__name__}: {error}"[:500]})
        release(args.device)
    for variant in variants:  # one model per variant (building an 8B model takes a while), every solver on it
        if time.perf_counter() > deadline:
            rows += [{"case": f"{variant}-seq{q}-{p}", "skipped": "time budget"} for p in solvers for q in seqs]
            continue
        try:
            model = build_model(variant, args.layers, args.device, args.tiny)
        except Exception as error:  # noqa: BLE001 - e.g. bitsandbytes missing: the other variant still runs
            traceback.print_exc()
            rows += [{"case": f"{variant}-seq{q}-{p}", "error": f"{type(error).__name__}: {error}"[:500]}
                     for p in solvers for q in seqs]
            continue
        for solver in solvers:
            run_solver(model, variant, solver, sorted(seqs), args, deadline, rows, save)
        del model
        release(args.device)
    save()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
