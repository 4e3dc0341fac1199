"""Fused attention (memgraph, kv_bits 16 and 4; its 16-bit kernels on cuDNN and on Triton) vs PyTorch SDPA (flash
backend) on one GPU.

    python benchmarks/bench_attention.py            # S in {2048, 8192, 32768} at D=128, and D=256
    python benchmarks/bench_attention.py --quick    # S=2048 and 8192 at D=128, S=2048 at D=256
    python benchmarks/bench_attention.py --tune     # every CONFIGS entry of every kernel, timed alone (~4 min)
    python benchmarks/bench_attention.py --smoke [--tune]  # CPU dry run on tiny shapes (Triton's interpreter)

Shape: B=1, Hq=32, Hkv=8 (Llama-3-8B; Gemma-7B style D=256 uses the same heads), causal, bf16. First a
correctness check on a small shape against a float32 reference (the run stops if it fails), then timings with
triton.testing.do_bench (median), both implementations in the same process on the same inputs.

TFLOP/s use the usual convention for both implementations, so their ratio is the speed ratio: forward =
4 * B * Hq * D * (visible query/key pairs), backward = 2.5x forward. ``saved_bytes`` = bytes of the tensors
autograd keeps for backward of one attention call (one layer), counted with saved_tensors_hooks.
Rows: impl, kv_bits, seq, head_dim, fwd_ms, fwd_bwd_ms, fwd_tflops, fwd_bwd_tflops, fwd_bwd_ms_cudagraph (the
same fwd+bwd replayed from a CUDA graph: GPU time alone), host_us_per_fwd_bwd (host CPU time to issue one), saved_bytes,
and speedup_vs_sdpa (fwd+bwd; speedup_vs_sdpa_cudagraph likewise) for memgraph rows; kv_bits=4 is timed with both KV_DEQUANT modes (kv_dequant).
Results: benchmarks/results/attention.json (or $OUT).

``--tune`` times each kernel kind (fwd, stats, dq, dkdv, and the dequantization pre-pass) alone, for every entry
of its CONFIGS list, at S in {2048, 8192} x D in {128, 256}, for the kernels kv_bits=16 runs and those kv_bits=4
runs in each KV_DEQUANT mode (kv_bits=4 "prepass" runs the 16-bit dK/dV kernel on K'/V': the kv16 rows), dK/dV
also per GQA split. Compiles happen first, in parallel worker processes that fill Triton's on-disk cache; the run
stops starting new work at --tune-budget seconds. Rows: kernel, case, kv_bits, kv_dequant, split, config, ms,
tflops (matmul FLOPs actually executed), best, error (a config that failed to compile or launch). Results:
attention_tuning.json; its meta holds the best config per kernel and case, and per-case sums of the best kernel
times (bwd_estimates) next to SDPA's time, to choose KV_DEQUANT and the dK/dV split.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exclusive_gpu_timing, print_table, write_results  # noqa: E402

BATCH, HEADS, KV_HEADS = 1, 32, 8
CHECK_SEQ = 300  # not a multiple of any block: exercises the masked tails
CHECK_HEAD_DIMS = (128, 256)
DEVICE = "cuda"
BF16_ATOL = 2e-3  # relative-error slack, as in tests/kernels/test_attention.py
KV4_GATES = (0.20, 0.98)  # max relative error, min cosine of dQ/dK/dV (DESIGN.md, Gaussian inputs)
ATTENTION_BACKENDS = ("cudnn", "triton")  # memgraph.attention's 16-bit kernels: cuDNN's where they apply, or ours
KV_DEQUANT_MODES = ("prepass", "in_kernel")  # memgraph.kernels.attention.launch.KV_DEQUANT_MODES, timed side by side


def _inputs(seq, head_dim, seed=0, dtype=torch.bfloat16, batch=None):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    draw = lambda heads: torch.randn(batch or BATCH, heads, seq, head_dim, device=DEVICE, dtype=dtype,  # noqa: E731
                                     generator=generator)
    return draw(HEADS), draw(KV_HEADS), draw(KV_HEADS), draw(HEADS)


def _ours(kv_bits, **kwargs):
    from memgraph.kernels.attention import attention

    return lambda q, k, v: attention(q, k, v, kv_bits=kv_bits, **kwargs)


@contextlib.contextmanager
def _kv_dequant(mode):
    """Run the kv_bits < 16 backward with KV_DEQUANT=mode (None: the module default)."""
    from memgraph.kernels.attention import launch as module

    saved = module.KV_DEQUANT
    module.KV_DEQUANT = mode or saved
    try:
        yield
    finally:
        module.KV_DEQUANT = saved


@contextlib.contextmanager
def _attention_backend(backend):
    """Run memgraph.attention's 16-bit kernels on ``backend``: "cudnn" (where it applies) or "triton"."""
    from memgraph.kernels.attention import cudnn

    saved = cudnn.ENABLED
    cudnn.ENABLED = backend == "cudnn"
    try:
        yield
    finally:
        cudnn.ENABLED = saved


def _cudnn_disabled():
    from memgraph.kernels.attention import cudnn

    return cudnn.disabled_reason()


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
    from memgraph.kernels.attention import launch as module

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
        sdpa = _grads(_sdpa(**kwargs), q, k, v, grad_out)
        for backend in ATTENTION_BACKENDS:
            with _attention_backend(backend):
                ours = _grads(_ours(16, **kwargs), q, k, v, grad_out)
            for name, a, s, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, reference):
                line = (f"kv16 ({backend}) D={head_dim} {kwargs} {name}: ours {_rel(a, r):.2e}, "
                        f"sdpa bf16 {_rel(s, r):.2e}")
                print(line)
                if not _rel(a, r) <= 2 * _rel(s, r) + BF16_ATOL:
                    failures.append(line)
            if backend == "cudnn" and _cudnn_disabled():
                failures.append(f"cuDNN attention switched itself off: {_cudnn_disabled()}")
        for mode in KV_DEQUANT_MODES:
            with _kv_dequant(mode):
                ours4 = _grads(_ours(4, **kwargs), q, k, v, grad_out)
            for name, a, r in zip(("dq", "dk", "dv"), ours4[1:], reference[1:]):
                line = f"kv4 ({mode}) D={head_dim} {kwargs} {name}: rel {_rel(a, r):.3f}, cos {_cos(a, r):.4f}"
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

    with exclusive_gpu_timing():  # other benchmark processes sharing the GPU never time at the same moment
        fwd_ms = _median_ms(forward)
        fwd_bwd_ms = _median_ms(forward_backward, grad_to_none=leaves)
        graphed_ms = _cudagraph_ms(forward_backward, leaves)
    flops = forward_flops(seq, head_dim)
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9,
        # The same fwd+bwd replayed from a CUDA graph: GPU time without the host's launch and dispatch cost
        # (which bounds eager timings of short calls; inside a training step it overlaps other layers' work).
        "fwd_bwd_ms_cudagraph": graphed_ms,
        "host_us_per_fwd_bwd": _host_us(forward_backward, leaves),
        "saved_bytes": saved_bytes(fn, q, k, v),
    }


# --- masked batches: packed sequences and right padding (issue: real training batches) ---
MASKED_CASES = {  # name: (batch, seq); packed: 8 sequences of random lengths; padded: 30% of tokens are padding
    "packed": (1, 8192),
    "padded": (4, 2048),
}
PACKED_SEQUENCES = 8
PADDING_FRACTION = 0.3


def masked_layout(name: str, batch: int, seq: int, seed: int = 0):
    """(q_segments, k_segments, boolean SDPA mask [B, 1, S, S], cumulative sequence starts or None)."""
    from memgraph.kernels.attention import packed_segments, padding_segments

    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq)
    causal = positions[None, :] <= positions[:, None]
    if name == "packed":
        cuts = torch.sort(torch.randperm(seq - 1, generator=generator)[:PACKED_SEQUENCES - 1] + 1).values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])]))
        position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).expand(batch, seq).to(DEVICE)
        q_segments, k_segments = packed_segments(position_ids)
        starts = torch.cat([torch.tensor([0]), torch.cumsum(lengths, 0)]).to(DEVICE, torch.int32)
    else:
        # Right padding, each row's length drawn around 1 - PADDING_FRACTION of the sequence.
        spread = int(seq * PADDING_FRACTION / 2)
        kept = seq - int(seq * PADDING_FRACTION) + torch.randint(-spread, spread + 1, (batch,), generator=generator)
        attention_mask = (positions[None, :] < kept[:, None]).long().to(DEVICE)
        q_segments, k_segments = padding_segments(attention_mask)
        starts = None
    mask = (causal.to(DEVICE) & (q_segments[:, :, None] == k_segments[:, None, :]))[:, None]
    return q_segments, k_segments, mask, starts


def _sdpa_masked(mask):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _varlen(starts, seq):
    """torch's varlen flash attention over the packed sequences (q/k/v [1, H, S, D] -> [S, H, D] and back), if this
    torch has it."""
    from torch.nn.attention.varlen import varlen_attn

    import inspect

    longest = int(torch.diff(starts).max())
    # torch 2.11 takes is_causal; later versions a (left, right) window, (-1, 0) being causal.
    causal = {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {
        "window_size": (-1, 0)}

    def run(q, k, v):
        group = q.shape[1] // k.shape[1]
        flat = lambda x: x[0].transpose(0, 1)  # noqa: E731  [S, H, D]
        k_rep, v_rep = (x.repeat_interleave(group, 1) for x in (k, v))
        out = varlen_attn(flat(q), flat(k_rep), flat(v_rep), starts, starts, longest, longest, **causal)
        return out.transpose(0, 1)[None]

    return run


def time_masked(name: str, head_dim: int = 128) -> list[dict]:
    """fwd+bwd of memgraph (kv 16 and 4) against SDPA with the same boolean mask (and varlen flash attention for
    the packed batch, where torch has it) on one masked batch."""
    batch, seq = MASKED_CASES[name]
    q_segments, k_segments, mask, starts = masked_layout(name, batch, seq)
    pairs = int(mask.sum())
    q, k, v, grad_out = _inputs(seq, head_dim, seed=seq, batch=batch)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    flops = 4.0 * HEADS * head_dim * pairs
    impls = [("sdpa", 16, _sdpa_masked(mask))]
    if starts is not None:
        try:
            impls.append(("varlen_attn", 16, _varlen(starts, seq)))
        except ImportError as error:
            print(f"no varlen attention in this torch: {error}")
    impls += [("memgraph", bits, _ours(bits, q_segments=q_segments, k_segments=k_segments)) for bits in (16, 4)]
    rows = []
    for impl, kv_bits, fn in impls:
        try:
            with exclusive_gpu_timing():
                ms = _median_ms(lambda: fn(*leaves).backward(grad_out), grad_to_none=leaves)
            rows.append({"impl": impl, "kv_bits": kv_bits, "layout": name, "batch": batch, "seq": seq,
                         "head_dim": head_dim, "visible_pairs_per_head": pairs, "fwd_bwd_ms": ms,
                         "fwd_bwd_tflops": 3.5 * flops / ms / 1e9})
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
            rows.append({"impl": impl, "kv_bits": kv_bits, "layout": name, "error": f"{type(error).__name__}: "
                         f"{str(error)[:200]}"})
    sdpa = rows[0].get("fwd_bwd_ms")
    for row in rows:
        if sdpa and "fwd_bwd_ms" in row:
            row["speedup_vs_sdpa"] = sdpa / row["fwd_bwd_ms"]
    reference = _grads(_sdpa_masked(mask), q, k, v, grad_out)
    ours = _grads(_ours(16, q_segments=q_segments, k_segments=k_segments), q, k, v, grad_out)
    rows[0]["check_max_rel_error_kv16"] = max(_rel(a, b) for a, b in zip(ours, reference))
    return rows


# --- soft-capped scores (Gemma 2): HF runs its eager attention for them; FlexAttention is the compiled rival ---
SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping
SOFTCAP_CASES = ((2048, 256), (8192, 256))  # (seq, head_dim): Gemma 2's head dim


def _eager_softcap(q, k, v):
    """HF's eager_attention_forward for Gemma 2 (repeat_kv, bf16 scores, float32 softmax, causal float mask)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    x = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    x = torch.tanh(x / SOFTCAP) * SOFTCAP
    positions = torch.arange(q.shape[2], device=q.device)
    x = x + torch.where(positions[None, :] <= positions[:, None], 0.0, torch.finfo(torch.float32).min)
    p = F.softmax(x, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def _flex_softcap(seq):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def softcap(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    block_mask = create_block_mask(causal, None, None, seq, seq, device=DEVICE)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, score_mod=softcap, block_mask=block_mask, enable_gqa=True)


def time_softcap(seq: int, head_dim: int) -> list[dict]:
    """fwd+bwd of memgraph's soft-capped attention (kv 16 and 4) against HF's eager path and FlexAttention."""
    q, k, v, grad_out = _inputs(seq, head_dim, seed=seq + head_dim)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    impls = [("hf_eager", 16, lambda: _eager_softcap)]
    if DEVICE == "cuda":
        impls.append(("flex_attention", 16, lambda: _flex_softcap(seq)))
    impls += [("memgraph", bits, lambda bits=bits: _ours(bits, softcap=SOFTCAP)) for bits in (16, 4)]
    rows, flops = [], forward_flops(seq, head_dim)
    for impl, kv_bits, build in impls:
        row = {"impl": impl, "kv_bits": kv_bits, "softcap": SOFTCAP, "seq": seq, "head_dim": head_dim}
        try:
            fn = build()
            fn(*leaves).backward(grad_out)  # compile / autotune outside the timing
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with exclusive_gpu_timing():
                ms = _median_ms(lambda: fn(*leaves).backward(grad_out), grad_to_none=leaves)
            row.update(fwd_bwd_ms=ms, fwd_bwd_tflops=3.5 * flops / ms / 1e9)
            if DEVICE == "cuda":
                row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
    eager = rows[0].get("fwd_bwd_ms")
    for row in rows:
        if eager and "fwd_bwd_ms" in row:
            row["speedup_vs_hf_eager"] = eager / row["fwd_bwd_ms"]
    reference = _grads(lambda *x: _eager_softcap(*(t.float() for t in x)), q, k, v, grad_out)
    ours = _grads(_ours(16, softcap=SOFTCAP), q, k, v, grad_out)
    rows[-2]["check_max_rel_error_vs_float32"] = max(_rel(a, b) for a, b in zip(ours, reference))
    bf16 = _grads(_eager_softcap, q, k, v, grad_out)
    rows[0]["check_max_rel_error_vs_float32"] = max(_rel(a, b) for a, b in zip(bf16, reference))
    return rows


def profile_host(seq, head_dim, calls: int = 50) -> None:
    """cProfile of memgraph's kv_bits=16 fwd+bwd (after a warm-up that autotunes): the host-side cost per call."""
    import cProfile
    import pstats

    q, k, v, grad_out = _inputs(seq, head_dim)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    fn = _ours(16)

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(grad_out)

    for _ in range(3):
        step()
    torch.cuda.synchronize() if DEVICE == "cuda" else None
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    print(f"host profile of {calls} fwd+bwd calls (S={seq}, D={head_dim}, kv_bits=16):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def _cudagraph_ms(fn, leaves) -> Optional[float]:
    if DEVICE != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, grad_to_none=leaves, return_mode="median"))
    except Exception as error:  # noqa: BLE001 - a capture failure must not lose the eager timings
        print(f"CUDA-graph timing failed: {type(error).__name__}: {error}")
        return None


def _host_us(fn, leaves, calls: int = 50) -> Optional[float]:
    """Microseconds the host spends issuing one call (CPU time of a loop whose GPU work is not awaited)."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    started = time.process_time()
    for _ in range(calls):
        for leaf in leaves:
            leaf.grad = None
        fn()
    elapsed = time.process_time() - started
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


# ------------------------------------------------------------------------------------------------------------
# --tune: every CONFIGS entry of every kernel, timed alone
# ------------------------------------------------------------------------------------------------------------
TUNE_CASES = [(2048, 128), (8192, 128), (2048, 256), (8192, 256)]  # (seq, head_dim), most important first
# (kernel, kv_bits, kv_dequant): the kernels each setting runs, most important first. kv_bits=4 with "prepass"
# runs the kv16 dK/dV kernel on K'/V' (same kernel, same shapes: the kv16 dkdv rows stand for it).
TUNE_KERNELS = [
    ("dkdv", 16, None), ("dq", 16, None), ("fwd", 16, None),
    ("stats", 4, "prepass"), ("dq", 4, "prepass"), ("dequant", 4, "prepass"),
    ("dkdv", 4, "in_kernel"), ("dq", 4, "in_kernel"), ("stats", 4, "in_kernel"),
]
TUNE_SPLITS = (1, 2, 4)  # dK/dV GQA splits; 4 only at S <= 2048, where there are few key blocks
TUNE_BUDGET_S = 230.0  # no new compile or timing starts after this many seconds
TUNE_COMPILE_SHARE = 0.5  # the parallel compile phase gets at most this share of the budget
TUNE_COMPILE_SEQ = 256  # compile-only runs: a multiple of 16 like the timed lengths, hence the same binaries
TUNE_WARMUP_MS, TUNE_REP_MS = 10, 40  # do_bench per config (the kernels take 0.02-15 ms)
TUNE_SMOKE_CONFIGS = 2  # --smoke --tune: the first configs of each list only
MATMULS = {"fwd": 2, "stats": 2, "dq": 3, "dkdv": 4}  # matmuls per visible (query, key) pair, 2 * D FLOPs each


class TuneJob(NamedTuple):
    kind: str
    seq: int
    head_dim: int
    kv_bits: int
    kv_dequant: Optional[str]
    config: Optional[tuple]  # (BLOCK_M, BLOCK_N, num_warps, num_stages); None for "dequant"
    split: int


def _tune_jobs(cases, max_configs=None) -> list[TuneJob]:
    from memgraph.kernels.attention.launch import _config_list

    group = HEADS // KV_HEADS
    jobs = []
    for seq, head_dim in cases:
        for kind, kv_bits, mode in TUNE_KERNELS:
            configs = [None] if kind == "dequant" else [tuple(c) for c in _config_list(kind, head_dim)][:max_configs]
            splits = [1]
            if kind == "dkdv":
                splits = [s for s in TUNE_SPLITS if group % s == 0 and (s <= 2 or seq <= 2048)]
            for split in splits:  # outer, so that consecutive jobs share one prepared runner
                jobs += [TuneJob(kind, seq, head_dim, kv_bits, mode, config, split) for config in configs]
    return jobs


def _compile_key(job: TuneJob) -> tuple:
    """What selects the compiled binary: not the sequence length, and of the split only whether partials are
    float32 (heads_per_program is not specialized on)."""
    return job.kind, job.head_dim, job.kv_bits, job.kv_dequant, job.config, job.split > 1


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".replace("\n", " ")[:300]


def _runner(job: TuneJob, inputs, exact_inputs=True):
    from memgraph.kernels.attention.launch import kernel_runner

    return kernel_runner(job.kind, *inputs, kv_bits=job.kv_bits, kv_dequant=job.kv_dequant, dkdv_split=job.split,
                         exact_inputs=exact_inputs)


# Errors that belong to the config (it does not fit the SM, or does not compile); a worker's other errors are
# retried by the timing process.
TRUSTED_COMPILE_ERRORS = ("OutOfResources", "PTXASError", "CompilationError")


def _compile_job(job: TuneJob):
    """Worker process: compile the job's kernel (and launch it once on a short sequence) into Triton's on-disk
    cache, where the timing process finds it. Returns (compile key, error or None), the error only when it is
    one of TRUSTED_COMPILE_ERRORS."""
    try:
        run = _runner(job, _inputs(TUNE_COMPILE_SEQ, job.head_dim), exact_inputs=False)
        run(job.config)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - a config that does not compile is a result, not a crash
        if type(error).__name__ in TRUSTED_COMPILE_ERRORS:
            return _compile_key(job), _error_text(error)
        print(f"compile worker: {_error_text(error)} ({job}); retried when timed", flush=True)
    return _compile_key(job), None


def _init_worker(device, heads, kv_heads):
    global DEVICE, HEADS, KV_HEADS
    DEVICE, HEADS, KV_HEADS = device, heads, kv_heads


def _precompile(jobs: list[TuneJob], deadline: float, workers: int) -> dict:
    """Compile every distinct kernel of `jobs` in `workers` processes until `deadline`; {compile key: error}."""
    unique = list({_compile_key(job): job for job in jobs}.values())
    errors = {}
    if workers <= 0 or not unique:
        return errors
    started = time.perf_counter()
    workers = min(workers, len(unique))
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                     initargs=(DEVICE, HEADS, KV_HEADS))
    done = 0
    try:
        results = pool.imap_unordered(_compile_job, unique)
        for _ in unique:
            key, error = results.next(timeout=max(deadline - time.perf_counter(), 0.01))
            done += 1
            if error is not None:
                errors[key] = error
    except multiprocessing.TimeoutError:
        print("compile phase hit its budget; the rest compile when timed (if time is left)")
    finally:
        pool.terminate()
        pool.join()
    print(f"compiled {done}/{len(unique)} kernels in {time.perf_counter() - started:.0f}s with {workers} workers, "
          f"{len(errors)} failed", flush=True)
    return errors


def _bench_ms(fn) -> float:
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median")
    return _median_ms(fn)


def _case_name(job) -> str:
    variant = f"kv{job.kv_bits}" + (f"-{job.kv_dequant}" if job.kv_dequant else "")
    return f"S={job.seq} D={job.head_dim} {variant}"


def _time_jobs(jobs: list[TuneJob], compile_errors: dict, deadline: float, on_progress) -> list[dict]:
    rows = []
    inputs = runner = None
    inputs_key = runner_key = None
    for index, job in enumerate(jobs):
        row = {"kernel": job.kind, "case": _case_name(job), "seq": job.seq, "head_dim": job.head_dim,
               "kv_bits": job.kv_bits, "kv_dequant": job.kv_dequant or "", "split": job.split,
               "config": list(job.config) if job.config else None, "ms": None, "tflops": None, "best": False,
               "error": compile_errors.get(_compile_key(job))}
        rows.append(row)
        if row["error"] is None and time.perf_counter() > deadline:
            row["error"] = "skipped: time budget"
        if row["error"] is not None:
            continue
        try:
            if inputs_key != (job.seq, job.head_dim):  # one case's tensors alive at a time
                inputs = runner = None
                inputs_key = (job.seq, job.head_dim)
                inputs = _inputs(job.seq, job.head_dim, seed=job.seq + job.head_dim)
            if runner_key != job._replace(config=None):  # one runner per kernel variant and split
                runner = None
                runner_key = job._replace(config=None)
                runner = _runner(job, inputs)
            run = runner
            run(job.config)  # compiles (or loads from the cache) and launches once: errors surface here
            row["ms"] = _bench_ms(lambda: run(job.config))
            if job.kind in MATMULS:
                flops = MATMULS[job.kind] * forward_flops(job.seq, job.head_dim) / 2  # forward = 2 matmuls
                row["tflops"] = flops / row["ms"] / 1e9
        except Exception as error:  # noqa: BLE001
            row["error"] = _error_text(error)
        if index + 1 == len(jobs) or jobs[index + 1][1:3] != job[1:3]:  # a case done: save what we have
            on_progress(rows)
    return rows


def _mark_best(rows: list[dict]) -> dict:
    """Flag the fastest row of each (kernel, case); {"kernel case": best row's config, split, ms}."""
    best = {}
    for row in rows:
        row["best"] = False
        key = f"{row['kernel']} {row['case']}"
        if row["ms"] is not None and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    for row in best.values():
        row["best"] = True
    return {key: {"config": row["config"], "split": row["split"], "ms": row["ms"]} for key, row in best.items()}


def _estimates(best: dict, sdpa: dict) -> list[dict]:
    """Per case, fwd+bwd estimated from the best kernel times of each path (the quantize kernel of the kv_bits=4
    forward is not included), next to SDPA's measured fwd+bwd."""
    paths = {
        "kv16": ["fwd {c} kv16", "dq {c} kv16", "dkdv {c} kv16"],
        "kv4-prepass": ["fwd {c} kv16", "dequant {c} kv4-prepass", "stats {c} kv4-prepass", "dq {c} kv4-prepass",
                        "dkdv {c} kv16"],
        "kv4-in_kernel": ["fwd {c} kv16", "stats {c} kv4-in_kernel", "dq {c} kv4-in_kernel",
                          "dkdv {c} kv4-in_kernel"],
    }
    estimates = []
    for case, sdpa_ms in sdpa.items():
        for path, parts in paths.items():
            keys = [part.format(c=case) for part in parts]
            if all(key in best for key in keys):
                ms = sum(best[key]["ms"] for key in keys)
                estimates.append({"case": case, "path": path, "fwd_bwd_ms": ms, "sdpa_fwd_bwd_ms": sdpa_ms,
                                  "speedup_vs_sdpa": sdpa_ms / ms,
                                  "parts_ms": {key.split()[0]: round(best[key]["ms"], 4) for key in keys}})
    return estimates


def tune(budget_s: float, workers: int, smoke: bool) -> int:
    start = time.perf_counter()
    deadline = start + budget_s
    cases = [(64, 64)] if smoke else TUNE_CASES
    jobs = _tune_jobs(cases, TUNE_SMOKE_CONFIGS if smoke else None)
    print(f"--tune: {len(jobs)} timings over {len(cases)} cases, budget {budget_s:.0f}s", flush=True)
    # (--smoke: the interpreter compiles nothing, but the workers still run each job once: a test of the machinery)
    compile_errors = _precompile(jobs, start + TUNE_COMPILE_SHARE * budget_s, min(workers, 2) if smoke else workers)

    sdpa = {}
    for seq, head_dim in cases:  # the reference the estimates are compared with
        q, k, v, grad_out = _inputs(seq, head_dim, seed=seq + head_dim)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        sdpa[f"S={seq} D={head_dim}"] = _bench_ms(lambda: _sdpa()(*leaves).backward(grad_out))
        del q, k, v, grad_out, leaves

    def write(rows):
        if smoke:
            return
        best = _mark_best(rows)
        write_results("attention_tuning", rows, batch=BATCH, heads=HEADS, kv_heads=KV_HEADS, causal=True,
                      dtype="bfloat16", budget_s=budget_s, total_seconds=round(time.perf_counter() - start, 1),
                      best=best, bwd_estimates=_estimates(best, sdpa))

    rows = _time_jobs(jobs, compile_errors, deadline, write)
    best = _mark_best(rows)
    write(rows)
    print_table(rows)
    print("\nbest config per kernel and case (config = [BLOCK_M, BLOCK_N, num_warps, num_stages]):")
    failed = {}
    for row in rows:
        if row["error"] is not None:
            failed[f"{row['kernel']} {row['case']}"] = failed.get(f"{row['kernel']} {row['case']}", 0) + 1
    print_table([{"kernel_case": key, "config": value["config"], "split": value["split"], "ms": value["ms"],
                  "failed_or_skipped": failed.get(key, 0)} for key, value in best.items()])
    print("\nfwd+bwd estimated from the best kernels (the kv4 forward's quantize kernel not included):")
    print_table([{k: v for k, v in row.items() if k != "parts_ms"} for row in _estimates(best, sdpa)])
    print(f"--tune done in {time.perf_counter() - start:.0f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (S=2048, 8192 at D=128; 2048 at D=256)")
    parser.add_argument("--skip-check", action="store_true", help="skip the small-shape correctness check")
    parser.add_argument("--cases", default=None, help="SEQxHEAD_DIM list, e.g. 2048x128,8192x128")
    parser.add_argument("--no-autotune", action="store_true",
                        help="run each kernel's first CONFIGS entry (the measured best) instead of autotuning")
    parser.add_argument("--profile", action="store_true",
                        help="print where the host's time goes in memgraph's fwd+bwd at the first case (cProfile)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run of the whole script on tiny shapes (Triton's interpreter); writes no results")
    parser.add_argument("--masked", action="store_true",
                        help="packed and padded batches against SDPA with the same masks; writes attention_masked.json")
    parser.add_argument("--softcap", action="store_true",
                        help="soft-capped scores (Gemma 2) against HF's eager path and FlexAttention; writes "
                             "attention_softcap.json")
    parser.add_argument("--tune", action="store_true",
                        help="time every CONFIGS entry of every kernel alone; writes attention_tuning.json")
    parser.add_argument("--tune-budget", type=float, default=TUNE_BUDGET_S,
                        help=f"seconds after which --tune starts no new work (default {TUNE_BUDGET_S:.0f})")
    parser.add_argument("--tune-workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                        help="processes compiling kernels in parallel for --tune (0: compile while timing)")
    args = parser.parse_args(argv)
    global DEVICE, HEADS, KV_HEADS, CHECK_SEQ, CHECK_HEAD_DIMS
    if args.smoke:
        # Before the kernels module is imported: triton.jit reads it when the kernels are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DEVICE, HEADS, KV_HEADS, CHECK_SEQ, CHECK_HEAD_DIMS = "cpu", 4, 2, 70, (64,)
    elif not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU (or --smoke on CPU)")
        return 2
    if args.tune:
        return tune(args.tune_budget, args.tune_workers, args.smoke)
    if args.masked:
        if args.smoke:
            MASKED_CASES.update(packed=(1, 96), padded=(2, 64))
        rows = [row for name in MASKED_CASES for row in time_masked(name, 64 if args.smoke else 128)]
        print_table(rows)
        if not args.smoke:
            write_results("attention_masked", rows, heads=HEADS, kv_heads=KV_HEADS, dtype="bfloat16",
                          packed_sequences=PACKED_SEQUENCES, padding_fraction=PADDING_FRACTION)
        return 0
    if args.softcap:
        cases = [(96, 64)] if args.smoke else SOFTCAP_CASES
        rows = [row for seq, head_dim in cases for row in time_softcap(seq, head_dim)]
        print_table(rows)
        if not args.smoke:
            write_results("attention_softcap", rows, heads=HEADS, kv_heads=KV_HEADS, dtype="bfloat16", causal=True)
        return 0
    if args.no_autotune:
        from memgraph.kernels.attention import launch as module

        module.AUTOTUNE = False
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
    if args.cases:
        cases = [tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")]
    if args.smoke:
        cases = [(96, 64)]
    if args.profile:
        profile_host(*cases[0])
    rows = []
    for seq, head_dim in cases:
        sdpa = {"impl": "sdpa", "kv_bits": 16, "seq": seq, "head_dim": head_dim, **time_case(_sdpa(), seq, head_dim)}
        rows.append(sdpa)
        runs = [(16, None, backend) for backend in ATTENTION_BACKENDS]
        runs += [(4, mode, backend) for mode in KV_DEQUANT_MODES for backend in ATTENTION_BACKENDS]
        for kv_bits, mode, backend in runs:
            with _kv_dequant(mode), _attention_backend(backend):
                timings = time_case(_ours(kv_bits), seq, head_dim)
            row = {"impl": "memgraph", "kv_bits": kv_bits, "kv_dequant": mode or "", "backend": backend,
                   "seq": seq, "head_dim": head_dim, **timings}
            row["speedup_vs_sdpa"] = sdpa["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            if row["fwd_bwd_ms_cudagraph"] and sdpa["fwd_bwd_ms_cudagraph"]:
                row["speedup_vs_sdpa_cudagraph"] = sdpa["fwd_bwd_ms_cudagraph"] / row["fwd_bwd_ms_cudagraph"]
            rows.append(row)
        print(f"S={seq} D={head_dim} done ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.smoke:
        print_table(rows)
        return 0
    write_results("attention", rows, autotune=not args.no_autotune, batch=BATCH, heads=HEADS, kv_heads=KV_HEADS,
                  causal=True, dtype="bfloat16", cudnn_version=torch.backends.cudnn.version(),
                  cudnn_disabled=_cudnn_disabled(), total_seconds=round(time.perf_counter() - start, 1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
