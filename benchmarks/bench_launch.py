"""Host time per call of memgraph's kernel launches, with the direct launch path (``kernels/_launch.py``) and
with Triton's ``JITFunction.run``, side by side in one run.

    python benchmarks/bench_launch.py                # GPU: about 20 seconds
    python benchmarks/bench_launch.py --device cpu   # smoke run of the script (plain-torch ops, no launches)

At 2048 tokens a Llama-3-8B QLoRA step is host-bound: the host needs longer to issue ~2,500 launches of our
kernels (and Inductor's, and cuBLAS's) than the GPU needs to run them. Here each op runs on tiny tensors, so the
GPU finishes every call long before the host issues the next, and the wall time per call is host time. Rows:
``op``, ``path`` (``direct`` or ``JITFunction.run``), ``host_us`` (median of ``--repeats`` runs of ``--calls``
calls), ``identical`` (the op's outputs under both paths are equal bit for bit), and on the direct rows
``speedup`` (host time of Triton's path / the direct path's); ``direct_path_on`` is False on a direct row if the
path fell back to Triton's during the run (then that row is Triton's path). Results: ``launch.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402

from memgraph.kernels import _launch, lora, nf4  # noqa: E402

PATHS = {"direct": True, "JITFunction.run": False}


def _ops(device: str) -> dict:
    """name -> a call returning its outputs (tiny shapes; the LoRA reduction splits 16 ways on a GPU)."""
    generator = torch.Generator(device).manual_seed(0)
    randn = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=device, generator=generator).to(dtype)  # noqa: E731
    x, base = randn(16, 64, dtype=torch.bfloat16), randn(16, 128, dtype=torch.bfloat16)
    a, b, grad = randn(16, 64), randn(128, 16), randn(16, 128, dtype=torch.bfloat16)
    long_x, long_a = randn(64, 4096, dtype=torch.bfloat16), randn(16, 4096)
    weight = nf4.NF4Weight.quantize(randn(128, 64, dtype=torch.bfloat16), double_quant=True)
    storage = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.nested_offset)

    xa = torch.ops.memgraph.lora_linear.default(base, x, a, b, 2.0, False)[1]

    def lora_reduction():
        out = torch.empty(64, 16, device=device)
        lora._rows_times_small(long_x, long_a.t(), out, 1.0)
        return (out,)

    ops = {
        "aten.add (reference)": lambda: (torch.add(x, x),),
        "memgraph.lora_linear (2 launches)": lambda: torch.ops.memgraph.lora_linear.default(base, x, a, b, 2.0,
                                                                                              False),
        "memgraph.lora_linear_backward (4 launches)": lambda: torch.ops.memgraph.lora_linear_backward.default(
            grad, x, xa, a, b, 2.0, True, True, True),
        "nf4 dequantize (1 launch)": lambda: (nf4._dequantize(*storage, (128, 64), weight.blocksize,
                                                              weight.nested_blocksize, torch.bfloat16),),
    }
    if device == "cuda":  # the launcher itself (on a CPU the ops above run their plain-torch paths)
        ops["lora reduction, 16 splits (1 launch)"] = lora_reduction
    return ops


def _host_us(call, calls: int, repeats: int, device: str) -> float:
    for _ in range(50):
        call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)  # issued: the GPU keeps up at these sizes
        if device == "cuda":
            torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cpu":
        args.calls, args.repeats = 20, 1
    ops = _ops(args.device)
    paths = PATHS if args.device == "cuda" else {"plain torch (CPU smoke run)": False}
    rows, outputs = [], {}
    with torch.no_grad(), exclusive_gpu_timing():
        for path, direct in paths.items():
            _launch._State.enabled = direct
            for name, call in ops.items():
                host_us = _host_us(call, args.calls, args.repeats, args.device)
                outputs[name, path] = [t.clone() for t in call()]  # after the warm-up: the cached binary's
                rows.append({"op": name, "path": path, "host_us": host_us,
                             "direct_path_on": _launch.fast_launch_enabled()})  # False: it fell back
    _launch._State.enabled = args.device == "cuda"
    if args.device == "cuda":
        by_key = {(row["op"], row["path"]): row for row in rows}
        for name in ops:
            direct, triton = by_key[name, "direct"], by_key[name, "JITFunction.run"]
            same = all(torch.equal(d, t) for d, t in zip(outputs[name, "direct"], outputs[name, "JITFunction.run"]))
            direct["identical"] = triton["identical"] = same
            direct["speedup"] = triton["host_us"] / direct["host_us"]
    print_table(rows)
    write_results("launch", rows, calls=args.calls, repeats=args.repeats)


if __name__ == "__main__":
    main()
