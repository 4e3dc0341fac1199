"""Chunked lm_head + cross-entropy: the training step with the rewrite off, on and on with ``drop_logits`` (same
solver, same options otherwise), against HF + gradient checkpointing + Liger's fused linear cross-entropy; and the
op alone against Liger's and against plain torch at the same shapes.

    python benchmarks/bench_cross_entropy.py --model llama3-8b --seqs 2048,8192 --parallel 4

Rows of the step: ``recipe``, ``seq``, ``cross_entropy`` ("off", "on", "drop_logits", "liger"), ``peak_gib``,
``tok_s``. Rows of the op: ``impl`` (memgraph, liger, torch), ``seq``, ``fwd_bwd_ms``, ``peak_gib`` (above the
inputs), ``loss_rel_err`` and ``grad_rel_err`` against a float32 reference.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402
from bench_e2e import run_in_process  # noqa: E402

GIB = 2**30


def step_recipes(solver: str, kv_bits: int, codegen: str) -> dict[str, str]:
    memgraph = f"bnb/memgraph?solver={solver}&kv_bits={kv_bits}&codegen={codegen}"
    return {
        "off": memgraph + "&rewrites=attention+nf4",
        "on": memgraph,
        "drop_logits": memgraph + "&drop_logits=true",
        "liger": "bnb/liger-gc",
    }


def op_case(impl: str, seq: int, features: int, vocab: int, repeats: int) -> dict:
    """fwd+bwd of one lm_head + loss (frozen bf16 weight, as in QLoRA): median time and the memory above inputs."""
    generator = torch.Generator("cuda").manual_seed(seq)
    hidden = torch.randn(seq, features, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, features, device="cuda", dtype=torch.bfloat16, generator=generator)
              / features ** 0.5)
    labels = torch.randint(0, vocab, (seq,), device="cuda", generator=generator)
    labels[: seq // 10] = -100

    def run():
        if impl == "memgraph":
            from memgraph.kernels.cross_entropy import linear_cross_entropy

            loss, _ = linear_cross_entropy(hidden, weight, labels)
        elif impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            loss = liger_fused_linear_cross_entropy(hidden, weight, labels)
        else:
            loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), labels)
        loss.backward()
        return loss

    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden.float(), weight.float()), labels)
    reference_grad = torch.autograd.grad(reference, hidden)[0]
    hidden.grad = None
    loss = run()  # warm-up (compiles the kernels)
    loss_err = abs(float(loss) - float(reference)) / abs(float(reference))
    grad_err = float((hidden.grad.float() - reference_grad).norm() / reference_grad.norm())
    torch.cuda.synchronize()
    times = []
    with exclusive_gpu_timing():
        hidden.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            hidden.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - base
    return {"impl": impl, "seq": seq, "features": features, "vocab": vocab, "fwd_bwd_ms": statistics.median(times),
            "peak_gib": peak / GIB, "loss_rel_err": loss_err, "grad_rel_err": grad_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seqs", default="2048,8192")
    parser.add_argument("--solver", default="checkpoint")
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--codegen", default="inductor", choices=["inductor", "eager"],
                        help="codegen of the memgraph recipes (eager: no Inductor compile, fewer device minutes)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--recipe-timeout", type=float, default=900)
    parser.add_argument("--only", default="steps,op", help="steps, op, or both")
    parser.add_argument("--name", default="cross_entropy")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cross_entropy needs a CUDA GPU")
    from memgraph import models

    config = models.config(args.model)
    rows: list[dict] = []
    seqs = [int(s) for s in args.seqs.split(",")]
    if "op" in args.only:
        for seq in seqs:
            for impl in ("memgraph", "liger", "torch"):
                try:
                    row = op_case(impl, seq, config.hidden_size, config.vocab_size, repeats=10)
                except Exception as error:  # noqa: BLE001 - a failing rival is a row, not the end of the run
                    row = {"impl": impl, "seq": seq, "error": f"{type(error).__name__}: {error}"[:300]}
                torch.cuda.empty_cache()
                rows.append({"case": "op", **row})
                print_table(rows[-1:])
    if "steps" in args.only:
        jobs = [(seq, kind, recipe) for seq in seqs for kind, recipe in step_recipes(args.solver, args.kv_bits, args.codegen).items()]
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
            def job(seq, kind, recipe):
                run = argparse.Namespace(model=args.model, seq=seq, steps=args.steps, layers=None, cache_dir=None,
                                         recipe_timeout=args.recipe_timeout)
                return {"case": "step", "cross_entropy": kind, **run_in_process(run, recipe)}

            for future in concurrent.futures.as_completed([pool.submit(job, *j) for j in jobs]):
                rows.append(future.result())
                print_table(rows[-1:])
                write_results(args.name, rows, model=args.model, solver=args.solver, kv_bits=args.kv_bits,
                              codegen=args.codegen)
        for seq in seqs:
            off = next((r for r in rows if r.get("cross_entropy") == "off" and r["seq"] == seq and "tok_s" in r), None)
            for row in rows:
                if off and row.get("case") == "step" and row["seq"] == seq and "tok_s" in row:
                    row["peak_saved_gib"] = off["peak_gib"] - row["peak_gib"]
                    row["tok_s_vs_off"] = row["tok_s"] / off["tok_s"]
    write_results(args.name, rows, model=args.model, solver=args.solver, kv_bits=args.kv_bits, codegen=args.codegen,
                  lora="r16 alpha16 dropout0 on every projection", batch=1)
    print_table(rows)


if __name__ == "__main__":
    main()
