"""memgraph.lora_linear vs PEFT's own adapter arithmetic on Llama-3-8B's projection shapes, forward + backward.

    python benchmarks/bench_lora.py               # GPU: 4 shapes x tokens in (2048, 8192), well under a minute
    python benchmarks/bench_lora.py --device cpu  # smoke run of the script on tiny shapes

Per (shape, tokens), three implementations of ``out = base + scale * (x.float() @ A.T @ B.T)`` in bf16 with
float32 adapters of rank 16 (PEFT's default dtypes for a bf16 model), x, base, A, B all requiring grad:
``peft_eager`` (PEFT's code: the float32 delta, the sum, the cast), ``peft_inductor`` (the same under
``torch.compile``: Inductor fuses the pointwise ops, not the matmuls), ``memgraph`` (the op). Each row: median
fwd+bwd milliseconds (``triton.testing.do_bench``), peak memory above the inputs (MiB, after a warm-up), and the
largest relative error of out and of each gradient against a float64 reference. Results: ``lora.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402

from memgraph.kernels.lora import lora_linear, reference_lora_linear  # noqa: E402

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (4096, 1024), "gate/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}
RANK, SCALE = 16, 2.0


def _inputs(tokens: int, features: int, outputs: int, device: str):
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, tokens, features, device=device, generator=generator).bfloat16().requires_grad_()
    base = torch.randn(1, tokens, outputs, device=device, generator=generator).bfloat16().requires_grad_()
    a = (torch.randn(RANK, features, device=device, generator=generator) / features ** 0.5).requires_grad_()
    b = (torch.randn(outputs, RANK, device=device, generator=generator) / RANK ** 0.5).requires_grad_()
    return base, x, a, b


def _step(function, inputs, grad):
    out = function(*inputs, SCALE)
    return (out, *torch.autograd.grad(out, inputs, grad))


def _errors(results, inputs, grad) -> float:
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    exact = _step(reference_lora_linear, leaves, grad.double())
    return max(float((r.double() - e).norm() / e.norm()) for r, e in zip(results, exact))


def _measure(name, function, inputs, grad, device) -> dict:
    results = _step(function, inputs, grad)  # warm-up (compiles)
    row = {"impl": name, "max_rel_err": _errors(results, inputs, grad)}
    del results
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(function, inputs, grad)
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        with exclusive_gpu_timing():  # other benchmarks sharing the GPU do not time at the same moment
            row["fwd_bwd_ms"] = triton.testing.do_bench(lambda: _step(function, inputs, grad), warmup=25, rep=100)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tiny = args.device == "cpu"
    implementations = {"peft_eager": reference_lora_linear,
                       "peft_inductor": torch.compile(reference_lora_linear, dynamic=False),
                       "memgraph": lora_linear}
    rows = []
    for shape, (features, outputs) in SHAPES.items():
        for tokens in ((64,) if tiny else (2048, 8192)):
            sizes = (features // 64, outputs // 64) if tiny else (features, outputs)
            inputs = _inputs(tokens, *sizes, args.device)
            grad = torch.randn_like(inputs[0])
            for name, function in implementations.items():
                row = {"shape": shape, "tokens": tokens, "in": sizes[0], "out": sizes[1], "rank": RANK}
                row.update(_measure(name, function, inputs, grad, args.device))
                rows.append(row)
            del inputs, grad
            if args.device == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        peft = next(r for r in rows if r["shape"] == row["shape"] and r["tokens"] == row["tokens"]
                    and r["impl"] == "peft_eager")
        if "fwd_bwd_ms" in row:
            row["speedup_vs_peft_eager"] = peft["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    print_table(rows)
    write_results("lora", rows)


if __name__ == "__main__":
    main()
