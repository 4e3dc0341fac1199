"""Fused attention (memgraph, kv_bits 16 and 4) vs PyTorch SDPA (flash backend) on one GPU.

    python benchmarks/bench_attention.py            # S in {2048, 8192, 32768} at D=128, and D=256
    python benchmarks/bench_attention.py --quick    # S=2048 and 8192 at D=128, S=2048 at D=256
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke   # CPU dry run of the script, tiny shapes

Shape: B=1, Hq=32, Hkv=8 (Llama-3-8B; Gemma-7B style D=256 uses the same heads), causal, bf16. First a
correctness check on a small shape against a float32 reference (the run stops if it fails), then timings with
triton.testing.do_bench (median), both implementations in the same process on the same inputs.

TFLOP/s use the usual convention for both implementations, so their ratio is the speed ratio: forward =
4 * B * Hq * D * (visible query/key pairs), backward = 2.5x forward. ``saved_bytes`` = bytes of the tensors
autograd keeps for backward of one attention call (one layer), counted with saved_tensors_hooks.
Rows: impl, kv_bits, seq, head_dim, fwd_ms, fwd_bwd_ms, fwd_tflops, fwd_bwd_tflops, saved_bytes, and
speedup_vs_sdpa (fwd+bwd) for memgraph rows. Results: benchmarks/results/attention.json (or $OUT).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402

BATCH, HEADS, KV_HEADS = 1, 32, 8
CHECK_SEQ = 300  # not a multiple of any block: exercises the masked tails
CHECK_HEAD_DIMS = (128, 256)
DEVICE = "cuda"
BF16_ATOL = 2e-3  # relative-error slack, as in tests/kernels/test_attention.py
KV4_GATES = (0.20, 0.98)  # max relative error, min cosine of dQ/dK/dV (DESIGN.md, Gaussian inputs)


def _inputs(seq, head_dim, seed=0, dtype=torch.bfloat16):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    draw = lambda heads: torch.randn(BATCH, heads, seq, head_dim, device=DEVICE, dtype=dtype,  # noqa: E731
                                     generator=generator)
    return draw(HEADS), draw(KV_HEADS), draw(KV_HEADS), draw(HEADS)


def _ours(kv_bits, **kwargs):
    from memgraph.kernels.attention import attention

    return lambda q, k, v: attention(q, k, v, kv_bits=kv_bits, **kwargs)


def _sdpa(causal=True, window=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        if window is None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        positions = torch.arange(q.shape[2], device=q.device)
        mask = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


def _grads(fn, q, k, v, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach(), *(x.grad for x in leaves)]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _cos(a, b):
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def check_correctness() -> list[str]:
    """Small-shape checks against a float32 reference; returns the failures (empty = all good). Runs with
    autotuning off (each kernel's first config) so that it compiles one config per kernel variant."""
    from memgraph.kernels import attention as module

    module.AUTOTUNE = False
    try:
        return _check_correctness()
    finally:
        module.AUTOTUNE = True


def _check_correctness() -> list[str]:
    from memgraph.kernels.attention import reference_attention

    failures = []
    cases = [(head_dim, {}) for head_dim in CHECK_HEAD_DIMS] + [(CHECK_HEAD_DIMS[0], {"window": 100})]
    for head_dim, kwargs in cases:
        q, k, v, grad_out = _inputs(CHECK_SEQ, head_dim, seed=head_dim)
        reference = _grads(lambda *x: reference_attention(*x, dtype=torch.float32, **kwargs), q.float(), k.float(),
                           v.float(), grad_out.float())
        ours = _grads(_ours(16, **kwargs), q, k, v, grad_out)
        sdpa = _grads(_sdpa(**kwargs), q, k, v, grad_out)
        for name, a, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, reference):
            line = f"kv16 D={head_dim} {kwargs} {name}: ours {_rel(a, r):.2e}, sdpa bf16 {_rel(s, r):.2e}"
            print(line)
            if not _rel(a, r) <= 2 * _rel(s, r) + BF16_ATOL:
                failures.append(line)
        ours4 = _grads(_ours(4, **kwargs), q, k, v, grad_out)
        for name, a, r in zip(("dq", "dk", "dv"), ours4[1:], reference[1:]):
            line = f"kv4 D={head_dim} {kwargs} {name}: rel {_rel(a, r):.3f}, cos {_cos(a, r):.4f}"
            print(line)
            if not (_rel(a, r) <= KV4_GATES[0] and _cos(a, r) >= KV4_GATES[1]):
                failures.append(line)
    q, k, v, grad_out = _inputs(CHECK_SEQ, CHECK_HEAD_DIMS[0], seed=1)
    capped = _grads(_ours(16, softcap=30.0), q * 4, k, v, grad_out)
    reference = _grads(lambda *x: reference_attention(*x, dtype=torch.float32, softcap=30.0), (q * 4).float(),
                       k.float(), v.float(), grad_out.float())
    for name, a, r in zip(("out", "dq", "dk", "dv"), capped, reference):
        line = f"kv16 softcap=30 {name}: rel {_rel(a, r):.2e}"
        print(line)
        if not _rel(a, r) < 0.02:
            failures.append(line)
    return failures


def saved_bytes(fn, q, k, v) -> int:
    """Bytes of the distinct tensors autograd saves for backward during one call."""
    seen = {}

    def pack(tensor):
        seen[(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*leaves)
    return sum(seen.values())


def forward_flops(seq, head_dim, causal=True) -> float:
    pairs = seq * (seq + 1) // 2 if causal else seq * seq
    return 4.0 * BATCH * HEADS * head_dim * pairs


def _median_ms(fn, grad_to_none=None) -> float:
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    times = []  # --smoke on CPU: wall-clock median of a few calls
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def time_case(fn, seq, head_dim):
    q, k, v, grad_out = _inputs(seq, head_dim, seed=seq + head_dim)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        fn(*leaves).backward(grad_out)

    fwd_ms = _median_ms(forward)
    fwd_bwd_ms = _median_ms(forward_backward, grad_to_none=leaves)
    flops = forward_flops(seq, head_dim)
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9,
        "saved_bytes": saved_bytes(fn, q, k, v),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (S=2048, 8192 at D=128; 2048 at D=256)")
    parser.add_argument("--skip-check", action="store_true", help="skip the small-shape correctness check")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run of the whole script on tiny shapes (TRITON_INTERPRET=1); writes no results")
    args = parser.parse_args(argv)
    global DEVICE, HEADS, KV_HEADS, CHECK_SEQ, CHECK_HEAD_DIMS
    if args.smoke:
        DEVICE, HEADS, KV_HEADS, CHECK_SEQ, CHECK_HEAD_DIMS = "cpu", 4, 2, 70, (64,)
    elif not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU (or --smoke on CPU)")
        return 2
    start = time.perf_counter()
    if not args.skip_check:
        failures = check_correctness()
        if failures:
            print("CORRECTNESS CHECK FAILED:\n  " + "\n  ".join(failures))
            return 1
        print(f"correctness check passed ({time.perf_counter() - start:.0f}s incl. compile and autotuning)")

    cases = [(2048, 128), (8192, 128), (32768, 128), (2048, 256), (8192, 256)]  # (seq, head_dim)
    if args.quick:
        cases = [(2048, 128), (8192, 128), (2048, 256)]
    if args.smoke:
        cases = [(96, 64)]
    rows = []
    for seq, head_dim in cases:
        sdpa = {"impl": "sdpa", "kv_bits": 16, "seq": seq, "head_dim": head_dim, **time_case(_sdpa(), seq, head_dim)}
        rows.append(sdpa)
        for kv_bits in (16, 4):
            row = {"impl": "memgraph", "kv_bits": kv_bits, "seq": seq, "head_dim": head_dim,
                   **time_case(_ours(kv_bits), seq, head_dim)}
            row["speedup_vs_sdpa"] = sdpa["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            rows.append(row)
        print(f"S={seq} D={head_dim} done ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.smoke:
        print_table(rows)
        return 0
    write_results("attention", rows, batch=BATCH, heads=HEADS, kv_heads=KV_HEADS, causal=True, dtype="bfloat16",
                  total_seconds=round(time.perf_counter() - start, 1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
