"""NF4 linear: memgraph (Triton dequantize -> bf16 workspace -> cuBLAS) vs bitsandbytes vs bf16, on Llama-3-8B shapes.

    python benchmarks/bench_nf4.py            # H200: 4 shapes x M in (2048, 8192), well under 3 minutes
    python benchmarks/bench_nf4.py --quick    # 2 shapes, M=2048, shorter timing windows
    python benchmarks/bench_nf4.py --device cpu   # smoke run of the script itself on tiny shapes (no GPU)

What it does, in order:
1. Correctness on the device (exits 1 at the end if any check failed): our dequantization is bit-identical
   to ``bitsandbytes.functional.dequantize_4bit`` (double-quantized and plain), ``NF4Weight.quantize`` gives
   bitsandbytes' packed bytes, and nf4_linear forward / grad-input match a float64 reference.
2. ``nf4_linear`` rows: forward + backward (grad of x only; x requires grad, the weight is frozen) of
   ``torch.ops.memgraph.nf4_linear`` vs ``bitsandbytes.matmul_4bit`` (what ``Linear4bit`` calls) vs bf16
   ``F.linear``; fresh random inputs per (shape, M); peak extra memory. Three clocks per row:
   ``fwd_bwd_ms`` - eager, median of ``triton.testing.do_bench`` (what a training loop without CUDA graphs
   sees: the larger of GPU time and host time); ``fwd_bwd_ms_cudagraph`` - the same calls replayed from a CUDA
   graph (``do_bench_cudagraph``: GPU time alone, warm L2; null with ``cudagraph_error`` when an
   implementation cannot be captured); ``fwd_bwd_host_ms`` - wall time until the call returns, starting from
   an idle GPU (the host's share: Python, dispatcher, autograd, launches). Eager is host-bound where
   ``fwd_bwd_host_ms`` approaches ``fwd_bwd_ms``.
3. ``nf4_dequantize`` rows: achieved bandwidth of our dequantize kernel and of bitsandbytes', against a
   measured device-to-device copy.
4. ``nf4_strategies`` rows: forward only, Triton dequant + cuBLAS vs torch dequant + cuBLAS vs bitsandbytes
   dequant + cuBLAS vs bf16, and the op itself (``launcher_pick`` names the path it takes on the device).
Results: benchmarks/results/{nf4_linear,nf4_dequantize,nf4_strategies}.json (or $OUT), tables on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402

from memgraph.kernels import nf4  # noqa: E402
from memgraph.kernels._dispatch import use_triton  # noqa: E402
from memgraph.kernels.nf4 import NF4Weight, nf4_dequantize_reference, nf4_linear_workspace_bytes  # noqa: E402

# Llama-3-8B projections as (in_features K, out_features N): q/o, k/v, gate/up, down.
LLAMA3_8B_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
TOKENS = (2048, 8192)
QUICK_SHAPES = [(4096, 4096), (4096, 1024)]  # the launch-bound small shapes (M=2048)
QUICK_TOKENS = (2048,)
CPU_SHAPES = [(256, 128), (128, 384)]  # --device cpu: checks the script, numbers mean nothing
CPU_TOKENS = (64,)
CORRECTNESS_TOKENS = 512
WEIGHT_STD = 0.02  # typical init scale of LLM projections
LINEAR_TOLERANCE = 1e-2  # relative Frobenius error of a bf16 linear vs float64
COPY_BYTES = 1 << 28  # 256 MiB device-to-device copy for the bandwidth ceiling
WARMUP_MS, REP_MS = 25, 100
QUICK_REP_MS = 40
CPU_REPEATS = 5
HOST_SAMPLES = 30
MIB = 1 << 20


def bench_ms(fn: Callable[[], object], device: str, rep_ms: int) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench on CUDA; a wall-clock median on CPU)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(CPU_REPEATS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def cudagraph_ms(fn: Callable[[], object], device: str, rep_ms: int) -> tuple[float | None, str | None]:
    """``(median ms, None)`` of ``fn`` replayed from a CUDA graph, or ``(None, why)`` when it cannot be captured."""
    if device != "cuda":
        return None, "CUDA graphs need a CUDA device"
    from triton.testing import do_bench_cudagraph

    # A garbage collection during capture can finalise a Triton CompiledKernel, whose module unload is illegal
    # while a stream captures (it invalidates the graph); older triton versions do not guard against it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")), None
    except Exception as error:  # noqa: BLE001 - e.g. a library that syncs or allocates outside torch in capture
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:300]
    finally:
        if gc_was_enabled:
            gc.enable()
        with contextlib.suppress(Exception):  # surface (and clear) a pending error of a failed capture here
            torch.cuda.synchronize()


def cudagraph_times(impls: dict[str, Callable[[], object]], device: str, rep_ms: int,
                    not_capturable: dict[str, str]) -> dict[str, tuple[float | None, str | None]]:
    """``cudagraph_ms`` of each implementation, bitsandbytes last (the one that may not capture).

    An implementation that failed to capture once is not captured again (recorded in ``not_capturable``): a failed
    capture can leave the device unusable for the remaining measurements, and the reason is the same every time.
    """
    graphed = {}
    for name in sorted(impls, key=lambda impl: impl == "bitsandbytes"):
        if name in not_capturable:
            graphed[name] = (None, not_capturable[name])
            continue
        graphed[name] = cudagraph_ms(impls[name], device, rep_ms)
        if graphed[name][0] is None and device == "cuda":
            not_capturable[name] = graphed[name][1]
    return graphed


def host_ms(fn: Callable[[], object], device: str) -> float:
    """Median wall-clock ms until ``fn`` returns, each call starting from an idle device.

    On CUDA that is the host's share of a call (queueing the work; the GPU runs behind it), on CPU the whole call.
    """
    times = []
    for _ in range(HOST_SAMPLES):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def peak_extra_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / MIB


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bnb_weight(w: torch.Tensor, double_quant: bool = True):
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                              blocksize=nf4.NF4_BLOCKSIZE)
    return param.to(w.device)


def check_correctness(shapes, device: str, failures: list[str]) -> list[dict]:
    import bitsandbytes.functional as BF

    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for k, n in shapes:
        w = (torch.randn(n, k, device=device, generator=generator) * WEIGHT_STD).to(torch.bfloat16)
        row = {"shape": f"{k}->{n}"}
        for double_quant in (True, False):
            param = bnb_weight(w, double_quant)
            ours = NF4Weight.from_bnb(param)
            expected = BF.dequantize_4bit(param.data, param.quant_state)
            row[f"dequant_bit_identical_dq{int(double_quant)}"] = same_bits(ours.dequantize(), expected)
            # Reported, not asserted: bitsandbytes' CUDA quantizer may be built with fast-math reciprocals.
            requantized = NF4Weight.quantize(w, double_quant=double_quant)
            row[f"quantize_bytes_equal_fraction_dq{int(double_quant)}"] = \
                (requantized.packed == param.data).float().mean().item()
            row[f"absmax_equal_fraction_dq{int(double_quant)}"] = \
                (requantized.absmax == param.quant_state.absmax).float().mean().item()
        param = bnb_weight(w, True)
        ours = NF4Weight.from_bnb(param)
        w64 = ours.dequantize(torch.float32).double()
        x = torch.randn(CORRECTNESS_TOKENS, k, device=device, generator=generator).to(torch.bfloat16)
        x.requires_grad_()
        dy = torch.randn(CORRECTNESS_TOKENS, n, device=device, generator=generator).to(torch.bfloat16)
        y = ours.linear(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        row["fwd_rel_err"] = rel_err(y, x.detach().double() @ w64.T)
        row["bwd_rel_err"] = rel_err(dx, dy.double() @ w64)
        for key, value in row.items():
            if (key.startswith("dequant_bit") and value is not True) or \
                    (key.endswith("rel_err") and not value < LINEAR_TOLERANCE):
                failures.append(f"{row['shape']}: {key}={value}")
        rows.append(row)
    return rows


def bench_fwd_bwd(shapes, tokens, device: str, rep_ms: int) -> list[dict]:
    import bitsandbytes as bnb

    rows = []
    not_capturable: dict[str, str] = {}
    for k, n in shapes:
        generator = torch.Generator(device=device).manual_seed(k * 31 + n)
        w = (torch.randn(n, k, device=device, generator=generator) * WEIGHT_STD).to(torch.bfloat16)
        param = bnb_weight(w)
        ours = NF4Weight.from_bnb(param)
        storage = ours.storage()
        w_bf16 = ours.dequantize(torch.bfloat16)  # frozen: no weight gradient anywhere
        for m in tokens:
            x = torch.randn(m, k, device=device, generator=generator, dtype=torch.bfloat16).requires_grad_()
            dy = torch.randn(m, n, device=device, generator=generator, dtype=torch.bfloat16)
            impls = {
                "memgraph": lambda: torch.autograd.grad(torch.ops.memgraph.nf4_linear(x, *storage), x, dy),
                "bitsandbytes": lambda: torch.autograd.grad(
                    bnb.matmul_4bit(x, param, quant_state=param.quant_state), x, dy),
                "bf16": lambda: torch.autograd.grad(F.linear(x, w_bf16), x, dy),
            }
            times = {name: bench_ms(fn, device, rep_ms) for name, fn in impls.items()}
            graphed = cudagraph_times(impls, device, rep_ms, not_capturable)
            for name, fn in impls.items():
                ms = times[name]
                ms_graphed, graph_error = graphed[name]
                rows.append({
                    "shape": f"{k}->{n}", "m": m, "impl": name, "fwd_bwd_ms": ms,
                    "fwd_bwd_ms_cudagraph": ms_graphed, "fwd_bwd_host_ms": host_ms(fn, device),
                    "tflops": 4 * m * n * k / (ms * 1e-3) / 1e12,
                    "vs_bf16": ms / times["bf16"], "vs_bitsandbytes": ms / times["bitsandbytes"],
                    "vs_bf16_cudagraph": ratio(ms_graphed, graphed["bf16"][0]),
                    "vs_bitsandbytes_cudagraph": ratio(ms_graphed, graphed["bitsandbytes"][0]),
                    "cudagraph_error": graph_error,
                    "peak_extra_mib": peak_extra_mib(fn, device),
                    "workspace_predicted_mib": nf4_linear_workspace_bytes(n, k, torch.bfloat16) / MIB
                    if name == "memgraph" else None,
                })
            del x, dy
        del w, param, ours, storage, w_bf16
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def copy_bandwidth(nbytes: int, device: str, rep_ms: int) -> float:
    """GB/s of a device copy of ``nbytes`` (bytes read + written over time)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), device, rep_ms)
    return 2 * nbytes / (copy_ms * 1e-3) / 1e9


def bench_dequantize(shapes, device: str, rep_ms: int) -> list[dict]:
    import bitsandbytes.functional as BF

    copy_gbps = copy_bandwidth(COPY_BYTES, device, rep_ms)
    rows = []
    for k, n in shapes:
        generator = torch.Generator(device=device).manual_seed(k + n)
        w = (torch.randn(n, k, device=device, generator=generator) * WEIGHT_STD).to(torch.bfloat16)
        param = bnb_weight(w)
        ours = NF4Weight.from_bnb(param)
        moved = ours.nbytes() + n * k * 2  # storage read + bf16 written
        tensors = (ours.packed, ours.absmax, ours.nested_absmax, ours.nested_code, ours.nested_offset)
        candidates = {
            "memgraph": lambda: nf4._dequantize(*tensors, (n, k), ours.blocksize, ours.nested_blocksize,
                                                torch.bfloat16),
            "bitsandbytes": lambda: BF.dequantize_4bit(param.data, param.quant_state),
        }
        # A copy moving the same bytes (half read, half written): at small sizes a copy too is far from the
        # large-buffer bandwidth (launch and tail effects), so both references are reported.
        same_size_gbps = copy_bandwidth(moved // 2, device, rep_ms)
        for name, fn in candidates.items():
            ms = bench_ms(fn, device, rep_ms)
            gbps = moved / (ms * 1e-3) / 1e9
            rows.append({"shape": f"{k}->{n}", "impl": name, "dequant_ms": ms, "bytes_moved": moved,
                         "dequant_gbps": gbps, "copy_gbps": copy_gbps, "fraction_of_copy": gbps / copy_gbps,
                         "same_size_copy_gbps": same_size_gbps,
                         "fraction_of_same_size_copy": gbps / same_size_gbps})
        del w, param, ours
    return rows


def bench_strategies(shapes, tokens, device: str, rep_ms: int) -> list[dict]:
    import bitsandbytes.functional as BF

    picked = "triton_dequant+cublas" if use_triton(torch.empty(0, device=device), nf4.log) else "torch_dequant+cublas"
    rows = []
    for k, n in shapes:
        generator = torch.Generator(device=device).manual_seed(k * 7 + n)
        w = (torch.randn(n, k, device=device, generator=generator) * WEIGHT_STD).to(torch.bfloat16)
        param = bnb_weight(w)
        ours = NF4Weight.from_bnb(param)
        storage = ours.storage()
        w_bf16 = ours.dequantize(torch.bfloat16)
        for m in tokens:
            x = torch.randn(m, k, device=device, generator=generator, dtype=torch.bfloat16)
            strategies = {
                "torch_dequant+cublas": lambda: F.linear(x, nf4_dequantize_reference(
                    *storage[:5], (n, k), ours.blocksize, ours.nested_blocksize, torch.bfloat16)),
                "bnb_dequant+cublas": lambda: F.linear(x, BF.dequantize_4bit(param.data, param.quant_state)),
                "bf16_weight": lambda: F.linear(x, w_bf16),
                "nf4_linear_op": lambda: torch.ops.memgraph.nf4_linear(x, *storage),  # = the launcher's pick
            }
            if use_triton(torch.empty(0, device=device), nf4.log):
                strategies["triton_dequant+cublas"] = lambda: F.linear(x, nf4._dequantize_triton(
                    *storage[:5], (n, k), ours.blocksize, ours.nested_blocksize, torch.bfloat16))
            times = {name: bench_ms(fn, device, rep_ms) for name, fn in strategies.items()}
            for name, ms in times.items():
                rows.append({"shape": f"{k}->{n}", "m": m, "strategy": name, "fwd_ms": ms,
                             "vs_bf16": ms / times["bf16_weight"],
                             "launcher_pick": picked if name == "nf4_linear_op" else None})
            del x
        del w, param, ours, storage, w_bf16
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 shapes, M=2048, shorter timing windows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cuda", "cpu"], help="cpu only checks that the script runs (tiny shapes)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu for a smoke run")
    if device == "cpu":
        shapes, tokens, rep_ms = CPU_SHAPES, CPU_TOKENS, QUICK_REP_MS
    elif args.quick:
        shapes, tokens, rep_ms = QUICK_SHAPES, QUICK_TOKENS, QUICK_REP_MS
    else:
        shapes, tokens, rep_ms = LLAMA3_8B_SHAPES, TOKENS, REP_MS
    started = time.perf_counter()
    failures: list[str] = []
    correctness = check_correctness(shapes, device, failures)
    print_table(correctness)
    strategy = "triton_dequant+cublas" if use_triton(torch.empty(0, device=device), nf4.log) else "torch_dequant+cublas"
    extra = {"launcher_strategy": strategy, "correctness": correctness, "correctness_failures": failures,
             "quick": args.quick}

    # One lock per table: other benchmark processes sharing the GPU never time at the same moment.
    with exclusive_gpu_timing():
        linear_rows = bench_fwd_bwd(shapes, tokens, device, rep_ms)
    with exclusive_gpu_timing():
        dequant_rows = bench_dequantize(shapes, device, rep_ms)
    with exclusive_gpu_timing():
        strategy_rows = bench_strategies(shapes, tokens, device, rep_ms)
    for name, rows in (("nf4_dequantize", dequant_rows), ("nf4_strategies", strategy_rows),
                       ("nf4_linear", linear_rows)):
        write_results(name, rows, **extra)
    print(f"\nlauncher strategy on {device}: {strategy}; total {time.perf_counter() - started:.1f} s")
    for title, rows in (("dequantize bandwidth", dequant_rows), ("forward strategies", strategy_rows),
                        ("nf4_linear fwd+bwd", linear_rows)):
        print(f"\n## {title}")
        print_table(rows)
    if failures:
        print("\nCORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
