"""A LoRA adapter added to its frozen base layer's output without any full-size float32 tensor: Triton kernels,
launcher, custom ops (fake impls, autograd, FLOP formulas) and a plain-torch reference.

What PEFT computes for a LoRA linear on a 16-bit model (adapters in float32, PEFT's default
``autocast_adapter_dtype``), dropout 0, for ``x [M, K]``, ``A [R, K]``, ``B [N, R]`` and the base output
``base [M, N]`` (of ``nn.Linear``, bitsandbytes or ``memgraph.nf4_linear``):

    xa    = x.float() @ A.T                        # [M, R]
    delta = (xa @ B.T) * scale                     # [M, N] float32: 2x the base output's bytes, and again in backward
    out   = (base + delta).to(base.dtype)          # PEFT's LoraLayer (the sum promotes to float32)
       or   base + delta.to(base.dtype)            # PEFT's bitsandbytes layers ("round_delta")

At 8192 tokens and N = 14336 (Llama-3-8B's MLP) each float32 [M, N] tensor is 448 MiB, and the MLP's backward
holds several at once: the largest temporaries of a QLoRA step. Here:

* forward: ``_rows_times_small_kernel`` makes ``xa`` (float32 products of x's 16-bit values, cast in registers),
  ``_small_times_cols_kernel`` makes each ``[BLOCK_M, BLOCK_N]`` tile of ``xa @ B.T`` in registers, scales it and
  adds the base tile, rounding as the matched PEFT code rounds; only ``out`` (base's dtype) and ``xa`` are written.
* backward, with ``g = dL/dout``: ``gxa = (scale * g) @ B`` (``_rows_times_small_kernel``), ``dB = (scale * g).T @
  xa`` and ``dA = gxa.T @ x`` (``_cols_reduced_kernel``: reductions over the rows), ``dx = gxa @ A`` rounded to
  x's dtype (``_small_times_cols_kernel``); ``dL/dbase = g`` (exact: the float32 round trip of a 16-bit value).
  Saved for backward: x (its 16-bit self, not PEFT's float32 copy) and ``xa``.

The reductions' products are exact in float32, as in cuBLAS's float32 matmul (no TF32); only the summation order
differs from eager. The two long reductions read a bfloat16 operand (x, or the gradient g) against a float32 one
(A, B, xa, gxa): they split the float32 operand into three bfloat16 parts whose sum is exactly it (8 + 8 + 8 significant
bits; bfloat16 has float32's exponent range) and run three bfloat16 tensor-core dots accumulating in float32:
each bfloat16 x bfloat16 product is exact in float32, so the result is a float32 dot's at tensor-core speed (an
``ieee`` float32 dot runs on the CUDA cores: 7 TFLOP/s measured on an H100). float16 and float32 operands keep
the ``ieee`` dot. The [M, N] output kernel multiplies two float32 operands (xa by B, gxa by A) over the rank
only: both split into bfloat16 parts, and the six pairs of parts down to 2^-16 of the leading one run on the tensor
cores (``PRODUCT_DOTS``); the three pairs left out are below float32's own rounding, so the product is a float32
one to its last bit or two. Without Triton (a CPU without ``TRITON_INTERPRET=1``) the same math runs in plain torch
over chunks of ``TORCH_CHUNK_ROWS`` rows, so its float32 temporaries stay bounded too.

Compiled graphs hold the forward as two ops, ``lora_project`` (xa) and ``lora_apply`` (out): a backward that needs
xa alone then recomputes it from x, without the base layer under ``out`` (``passes.lora.split_forward``).
"""
from __future__ import annotations

import functools
import logging
import math
import types
from typing import Optional

import torch
from torch import Tensor

from memgraph import _compat
from memgraph.kernels._dispatch import (HAS_TRITON, INTERPRET, builds_graph, device_guard, direct_eager,
                                        persistent_tensor, use_triton, without_derivative)
from memgraph.kernels._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the kernels below are still defined (as plain functions) but never launched
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["lora_linear", "reference_lora_linear", "ADAPTER_DTYPES", "MAX_RANK"]

log = logging.getLogger("memgraph.kernels.lora")

ADAPTER_DTYPES = (torch.float32,)  # PEFT's default for 16-bit models; 16-bit adapters round differently: unfused
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_RANK = 256  # the rank lives in registers, padded to a power of two (tl.dot needs >= 16)
MIN_DOT = 16  # tl.dot's smallest dimension
# Tiles and launch options per kernel; the interpreter runs the same kernels on small tiles. GPU tiles of the two
# reductions: the best of benchmarks/bench_lora_kernels.py --sweep on an H100 (benchmarks/results/
# lora_kernels.json); the output kernel's tiles and PRODUCT_DOTS are not searched yet.
# xa = x @ A.T and gxa = g @ B: BLOCK_M rows of X per program, reduced over K in BLOCK_K steps.
ROWS_TIMES_SMALL = (dict(BLOCK_M=16, BLOCK_K=32) if INTERPRET else
                    dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3))
# dB and dA: BLOCK_N columns of X per program, reduced over the rows in BLOCK_M steps.
COLS_REDUCED = (dict(BLOCK_M=16, BLOCK_N=32) if INTERPRET else
                dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4))
# out = base + xa @ B.T and dx = gxa @ A: [BLOCK_M, BLOCK_N] tiles of the output, one pass over memory; the
# rank-deep product runs on bfloat16 parts (PRODUCT_DOTS: see _split_product), RANK_SLICE ranks at a time (a
# power of two, at least MIN_DOT), so a large rank never holds all its parts at once.
SMALL_TIMES_COLS = (dict(BLOCK_M=16, BLOCK_N=32, PRODUCT_DOTS=6) if INTERPRET else
                    dict(BLOCK_M=64, BLOCK_N=128, PRODUCT_DOTS=6, num_warps=4))
RANK_SLICE = 64
# The two reductions (over K for xa and gxa, over the rows for dA and dB) split their long dimension so that a
# short other dimension still fills the GPU: 2048 rows are 32 row blocks, a quarter of an H100's 132
# multiprocessors. The last program of each kept block adds up the splits' float32 partials in a fixed order.
PROGRAMS_PER_MULTIPROCESSOR = 2
# Block steps per split at least: fewer, and summing the partials outweighs the work (1 in the interpreter, and
# 2 multiprocessors: its small test shapes split too).
MIN_STEPS_PER_SPLIT = 1 if INTERPRET else 4
INTERPRETER_MULTIPROCESSORS = 2
PLANNED_MULTIPROCESSORS = 148  # planning on meta: the most of current data-center GPUs (H100: 132, B200: 148)
# Rows per chunk of the plain-torch path: its float32 temporaries are TORCH_CHUNK_ROWS x max(N, K).
TORCH_CHUNK_ROWS = 1024
# The triton 3.9 interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: round by hand.
ROUND_BY_HAND = tl.constexpr(INTERPRET)
# ... and its tl.dot of bfloat16 operands returns garbage (triton 3.9): there the parts meet in float32 dots.
BF16_DOT_BY_HAND = tl.constexpr(INTERPRET)


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) cast to dtype, rounding to nearest even also under the interpreter."""
    if ROUND_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _bf16_parts(w):
    """float32 w as three bfloat16 parts whose sum is exactly w (8 + 8 + 8 significant bits), rounded to nearest
    as on the GPU also under the interpreter. An infinite w (or one above bfloat16's largest) gives NaN parts: a
    product with it is NaN, not inf (a step that overflowed either way)."""
    high = _rounded(w, tl.bfloat16)
    rest = w - high.to(tl.float32)  # exact: the bits below high's last one
    middle = _rounded(rest, tl.bfloat16)
    low = (rest - middle.to(tl.float32)).to(tl.bfloat16)  # the last 8 bits: exact in bfloat16
    return high, middle, low


@triton.jit
def _bf16_dot(x, w, acc):
    """acc + x @ w for bfloat16 x and w, products exact and summed in float32 (tensor cores; under the
    interpreter the same products in float32 dots)."""
    if BF16_DOT_BY_HAND:
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, w, acc)


@triton.jit
def _exact_dot(x, w, acc, BF16_PARTS: tl.constexpr):
    """acc + x @ w with float32 products: x bfloat16 against w float32 split into three exact bfloat16 parts
    (BF16_PARTS, tensor cores), else float32 ``ieee`` dots of x cast to float32."""
    if BF16_PARTS:
        high, middle, low = _bf16_parts(w)
        acc = _bf16_dot(x, low, acc)  # smallest first
        acc = _bf16_dot(x, middle, acc)
        return _bf16_dot(x, high, acc)
    return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")


@triton.jit
def _split_product(p, w, acc, PRODUCT_DOTS: tl.constexpr):
    """acc + p @ w for float32 p and w (a rank-sized inner dimension). PRODUCT_DOTS = 6: both split into bfloat16
    parts, and every pair of parts down to 2^-16 of the leading one multiplied on the tensor cores (the three
    pairs left out are below float32's own rounding: float32 accuracy); 3: the pairs down to 2^-8 (relative error
    about 2^-16, far below a 16-bit output's rounding); 0: one float32 ``ieee`` dot (CUDA cores: exact products,
    but at rank 16 it bounds the kernel, not memory)."""
    tl.static_assert(PRODUCT_DOTS == 0 or PRODUCT_DOTS == 3 or PRODUCT_DOTS == 6, "PRODUCT_DOTS: 0, 3 or 6")
    if PRODUCT_DOTS == 0:
        return tl.dot(p, w, acc, input_precision="ieee")
    p_high, p_middle, p_low = _bf16_parts(p)
    w_high, w_middle, w_low = _bf16_parts(w)
    if PRODUCT_DOTS == 6:  # smallest first
        acc = _bf16_dot(p_low, w_high, acc)
        acc = _bf16_dot(p_middle, w_middle, acc)
        acc = _bf16_dot(p_high, w_low, acc)
    acc = _bf16_dot(p_middle, w_high, acc)
    acc = _bf16_dot(p_high, w_middle, acc)
    return _bf16_dot(p_high, w_high, acc)


@triton.jit
def _write_reduced(acc, kept, ranks, KEPT, R, OUT, stride_ok, stride_or, PARTS, COUNTERS,
                   SUM_SPLITS: tl.constexpr):
    """Write this program's ``acc`` [kept, ranks] of a reduction: into OUT itself (one split), or as split s's
    float32 partial, after which the last program of the kept block to arrive sums every split's partial in split
    order (the same result whichever arrives last) into OUT and re-arms the block's counter: one launch, no
    separate sum."""
    inside = (kept[:, None] < KEPT) & (ranks[None, :] < R)
    out = OUT + kept[:, None] * stride_ok + ranks[None, :] * stride_or
    if SUM_SPLITS:
        part = KEPT * R  # PARTS is [splits, KEPT, R], contiguous
        offsets = kept[:, None] * R + ranks[None, :]
        tl.store(PARTS + tl.program_id(1).to(tl.int64) * part + offsets, acc, mask=inside)
        tl.debug_barrier()  # every thread's partial is written before the block announces its arrival
        arrived = tl.atomic_add(COUNTERS + tl.program_id(0), 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            total = tl.zeros_like(acc)
            for split in range(0, tl.num_programs(1)):  # fixed order: deterministic
                total += tl.load(PARTS + split * part + offsets, mask=inside, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(OUT.dtype.element_ty), mask=inside)
            tl.atomic_xchg(COUNTERS + tl.program_id(0), 0)  # zero again for the next launch on this stream
    else:
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _rows_times_small_kernel(X, stride_xm, stride_xk, W, stride_wk, stride_wr, OUT, stride_om, stride_or,
                             PARTS, COUNTERS, M, K, R, alpha, k_per_split,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                             BF16_PARTS: tl.constexpr, SUM_SPLITS: tl.constexpr):
    """OUT[M, R] = alpha * (float32(X[M, K]) @ W[K, R]) (xa, gxa): a long reduction into a few columns, its K
    split across ``program_id(1)`` so that short M still fills the GPU (``_write_reduced`` sums the splits)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for step in range(0, k_per_split, BLOCK_K):  # k_per_split is a multiple of BLOCK_K: splits never overlap
        cols = split * k_per_split + step + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = tl.load(W + cols[:, None] * stride_wk + ranks[None, :] * stride_wr,
                    mask=(cols[:, None] < K) & (ranks[None, :] < R), other=0.0).to(tl.float32)
        acc = _exact_dot(x, w, acc, BF16_PARTS)
    acc = acc * alpha  # after the sum: x stays exactly bfloat16 for the tensor cores
    _write_reduced(acc, rows, ranks, M, R, OUT, stride_om, stride_or, PARTS, COUNTERS, SUM_SPLITS)


@triton.jit
def _small_times_cols_kernel(P, stride_pm, stride_pr, W, stride_wr, stride_wn, BASE, stride_bm, stride_bn,
                             OUT, stride_om, stride_on, M, N, R, alpha,
                             HAS_BASE: tl.constexpr, ROUND_DELTA: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                             BLOCK_R: tl.constexpr, PRODUCT_DOTS: tl.constexpr):
    """OUT[M, N] = base + alpha * (P[M, R] @ W[R, N]), summed in float32 (or with the product first rounded to
    OUT's dtype: ROUND_DELTA), then rounded to OUT's dtype; without a base just the rounded product (dx)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, R_PAD, BLOCK_R):  # the rank in slices: a large rank never holds all its parts at once
        ranks = start + tl.arange(0, BLOCK_R)
        p = tl.load(P + rows[:, None] * stride_pm + ranks[None, :] * stride_pr,
                    mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0).to(tl.float32)
        w = tl.load(W + ranks[:, None] * stride_wr + cols[None, :] * stride_wn,
                    mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0).to(tl.float32)
        # Each slice from a zero accumulator, then one float32 add: the tensor cores' float32 accumulation
        # truncates an addend against a large running sum, so the small parts' dots must not meet the slices
        # before (measured on an H100 at rank 256: 24 against 1.3 x 2^-24 relative error).
        acc += _split_product(p, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRODUCT_DOTS)
    product = acc * alpha
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    if HAS_BASE:
        base = tl.load(BASE + rows[:, None] * stride_bm + cols[None, :] * stride_bn, mask=inside,
                       other=0.0).to(tl.float32)
        if ROUND_DELTA:
            product = _rounded(product, OUT.dtype.element_ty).to(tl.float32)
        product = base + product
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, _rounded(product, OUT.dtype.element_ty),
             mask=inside)


@triton.jit
def _cols_reduced_kernel(X, stride_xm, stride_xn, P, stride_pm, stride_pr, OUT, stride_on, stride_or,
                         PARTS, COUNTERS, M, N, R, alpha, m_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                         BF16_PARTS: tl.constexpr, SUM_SPLITS: tl.constexpr):
    """OUT[N, R] = alpha * (float32(X[M, N]).T @ P[M, R]) (dB, and dA transposed): a reduction over the rows,
    split across ``program_id(1)`` so that narrow N still fills the GPU (``_write_reduced`` sums the splits)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for step in range(0, m_per_split, BLOCK_M):  # m_per_split is a multiple of BLOCK_M
        rows = split * m_per_split + step + tl.arange(0, BLOCK_M)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                    mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0)
        p = tl.load(P + rows[:, None] * stride_pm + ranks[None, :] * stride_pr,
                    mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0).to(tl.float32)
        acc = _exact_dot(tl.trans(x), p, acc, BF16_PARTS)
    acc = acc * alpha
    _write_reduced(acc, cols, ranks, N, R, OUT, stride_on, stride_or, PARTS, COUNTERS, SUM_SPLITS)


# ------------------------------------------------------------------------------------------------------------
# Launchers (2-D views; W and OUT may be transposed views: the kernels take strides)
# ------------------------------------------------------------------------------------------------------------
def _rank_pad(rank: int) -> int:
    return max(MIN_DOT, 1 << (rank - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    return _cuda_multiprocessors(device) if device.type == "cuda" else INTERPRETER_MULTIPROCESSORS


# Host work per launch (a step makes ~2,000 of them in an 8B model): ceil-divisions are plain integer arithmetic
# (triton.cdiv is a ConstexprFunction wrapper costing ~2-3 µs per call from Python) and the split counts are
# cached per shape.
def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _splits(blocks: int, length: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, length per split) for a reduction over ``length`` whose other dimension gives ``blocks``
    programs: enough splits for PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor, each split a whole
    number of ``block`` steps and at least MIN_STEPS_PER_SPLIT of them."""
    return _split_shape(blocks, length, block, PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(device),
                        MIN_STEPS_PER_SPLIT)


@functools.lru_cache(maxsize=4096)
def _split_shape(blocks: int, length: int, block: int, programs: int, min_steps: int) -> tuple[int, int]:
    wanted = programs // blocks
    splits = max(1, min(wanted, _cdiv(length, block * min_steps)))
    per_split = _cdiv(_cdiv(length, splits), block) * block
    return _cdiv(length, per_split), per_split


# Arrival counters of the split reductions, one int32 per kept block, per device and stream: zero between
# launches (the last program of each block re-arms its own), so a launch needs no memset. Launches on one stream
# run one after another; another stream gets its own counters. (Captured in CUDA graphs, the capture stream's
# counters are shared by every graph captured on it: replay those graphs one at a time, as one training loop does.)
_COUNTERS: dict = {}
_RETIRED_COUNTERS: list = []
MIN_COUNTERS = 4096


def _arrival_counters(device: torch.device, blocks: int) -> Tensor:
    stream = _compat.current_raw_stream(device.index) if device.type == "cuda" else 0
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < blocks:
        size = max(blocks, MIN_COUNTERS)
        if counters is not None:  # launches already queued may still use the smaller one: never freed
            _RETIRED_COUNTERS.append(counters)
        counters = persistent_tensor(lambda: torch.zeros(size, dtype=torch.int32, device=device), device)
        _COUNTERS[(device, stream)] = counters
    return counters


def _split_reduction(kernel, x: Tensor, w: Tensor, out: Tensor, alpha: float, blocks: int, length: int, step: int,
                     tiles: dict) -> None:
    """Launch one of the two reductions of ``x`` [rows, columns] against a small float32 ``w`` into ``out``
    [kept, rank] (also a transposed view): ``blocks`` programs along the kept dimension, ``length`` reduced in
    ``step``-sized steps, split when that fills the GPU better; the splits' float32 partials are summed in a fixed
    order by the kernel itself (the same result on every run)."""
    kept, rank = out.shape
    device = x.device
    splits, per_split = _splits(blocks, length, step, device)
    summed = splits > 1
    parts = x.new_empty((splits, kept, rank), dtype=torch.float32) if summed else out  # unread with one split
    counters = _arrival_counters(device, blocks) if summed else out
    with device_guard(x):
        launch(kernel, (blocks, splits), x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1), out,
               out.stride(0), out.stride(1), parts, counters, x.shape[0], x.shape[1], rank, alpha, per_split,
               R_PAD=_rank_pad(rank), BF16_PARTS=x.dtype == torch.bfloat16, SUM_SPLITS=summed, **tiles)


def _rows_times_small(x: Tensor, w: Tensor, out: Tensor, alpha: float) -> None:
    tiles = ROWS_TIMES_SMALL
    _split_reduction(_rows_times_small_kernel, x, w, out, alpha, _cdiv(x.shape[0], tiles["BLOCK_M"]), x.shape[1],
                     tiles["BLOCK_K"], tiles)


def _small_times_cols(p: Tensor, w: Tensor, base: Optional[Tensor], out: Tensor, alpha: float,
                      round_delta: bool) -> None:
    (m, r), n = p.shape, w.shape[1]
    b = base if base is not None else out  # unread without HAS_BASE
    with device_guard(p):
        tiles = SMALL_TIMES_COLS
        launch(_small_times_cols_kernel, (_cdiv(m, tiles["BLOCK_M"]), _cdiv(n, tiles["BLOCK_N"])),
               p, p.stride(0), p.stride(1), w, w.stride(0), w.stride(1), b, b.stride(0), b.stride(1),
               out, out.stride(0), out.stride(1), m, n, r, alpha, HAS_BASE=base is not None,
               ROUND_DELTA=round_delta, R_PAD=_rank_pad(r), BLOCK_R=min(_rank_pad(r), RANK_SLICE), **tiles)


def _cols_reduced(x: Tensor, p: Tensor, out: Tensor, alpha: float) -> None:
    tiles = COLS_REDUCED
    _split_reduction(_cols_reduced_kernel, x, p, out, alpha, _cdiv(x.shape[1], tiles["BLOCK_N"]), x.shape[0],
                     tiles["BLOCK_M"], tiles)


def _project_triton(x: Tensor, a: Tensor, xa: Tensor) -> None:
    _rows_times_small(x, a.t(), xa, 1.0)


def _apply_triton(base: Tensor, xa: Tensor, b: Tensor, scale: float, round_delta: bool, out: Tensor) -> None:
    _small_times_cols(xa, b.t(), base, out, scale, round_delta)


def _backward_triton(grad: Tensor, x: Tensor, xa: Tensor, a: Tensor, b: Tensor, scale: float,
                     grad_x: Optional[Tensor], grad_a: Optional[Tensor], grad_b: Optional[Tensor],
                     accumulate: Optional[Tensor] = None) -> None:
    if grad_b is not None:
        _cols_reduced(grad, xa, grad_b, scale)
    if grad_x is None and grad_a is None:
        return
    gxa = grad.new_empty((grad.shape[0], a.shape[0]), dtype=torch.float32)
    _rows_times_small(grad, b, gxa, scale)
    if grad_a is not None:
        _cols_reduced(x, gxa, grad_a.t(), 1.0)
    if grad_x is not None:  # autograd's sum of two gradients: the adapter's rounded to x's dtype, then added
        _small_times_cols(gxa, a, accumulate, grad_x, 1.0, True)


# ------------------------------------------------------------------------------------------------------------
# Plain torch, in chunks of rows (CPU without the interpreter)
# ------------------------------------------------------------------------------------------------------------
def _project_torch(x: Tensor, a: Tensor, xa: Tensor) -> None:
    for start in range(0, x.shape[0], TORCH_CHUNK_ROWS):
        rows = slice(start, start + TORCH_CHUNK_ROWS)
        torch.mm(x[rows].to(a.dtype), a.t(), out=xa[rows])


def _apply_torch(base: Tensor, xa: Tensor, b: Tensor, scale: float, round_delta: bool, out: Tensor) -> None:
    for start in range(0, xa.shape[0], TORCH_CHUNK_ROWS):
        rows = slice(start, start + TORCH_CHUNK_ROWS)
        delta = torch.mm(xa[rows], b.t()).mul_(scale)
        if round_delta:
            torch.add(base[rows], delta.to(out.dtype), out=out[rows])
        else:
            out[rows].copy_(delta.add_(base[rows]))


def _backward_torch(grad: Tensor, x: Tensor, xa: Tensor, a: Tensor, b: Tensor, scale: float,
                    grad_x: Optional[Tensor], grad_a: Optional[Tensor], grad_b: Optional[Tensor],
                    accumulate: Optional[Tensor] = None) -> None:
    for start in range(0, x.shape[0], TORCH_CHUNK_ROWS):
        rows = slice(start, start + TORCH_CHUNK_ROWS)
        scaled = grad[rows].to(b.dtype) * scale  # a new tensor: grad may already be float32
        if grad_b is not None:
            grad_b.addmm_(scaled.t(), xa[rows])
        if grad_x is None and grad_a is None:
            continue
        gxa = scaled @ b
        if grad_a is not None:
            grad_a.addmm_(gxa.t(), x[rows].to(a.dtype))
        if grad_x is not None:
            if accumulate is None:
                grad_x[rows].copy_(gxa @ a)
            else:
                torch.add(accumulate[rows], (gxa @ a).to(grad_x.dtype), out=grad_x[rows])


# ------------------------------------------------------------------------------------------------------------
# Custom ops: forward (out, xa) and backward (dx, dA, dB); autograd; FLOP formulas
# ------------------------------------------------------------------------------------------------------------
# Registered with torch.library's low-level API (define / impl per dispatch key / register_fake), as kernels/nf4.py
# and the attention op are: a step calls these three ops three times per adapted linear (224 linears in an 8B
# model), and torch.library.custom_op's generic per-call Python (default filling, an aliasing check, a
# dynamo-disable wrapper, a second C++ -> Python round trip) cost ~49 of the ~76 µs of a tiny forward call on a
# CPU host. Schemas (up to the mutated argument's alias name) and tags are the ones custom_op produced, so
# graphs, passes and the cost model see the same ops.
_LIB = torch.library.Library("memgraph", "FRAGMENT")  # module-level: the registrations live as long as it does
_LIB.define("lora_linear(Tensor base, Tensor x, Tensor lora_a, Tensor lora_b, float scale, bool round_delta) -> "
            "(Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("lora_linear_backward(Tensor grad, Tensor x, Tensor xa, Tensor lora_a, Tensor lora_b, float scale, "
            "bool x_grad, bool a_grad, bool b_grad, Tensor? accumulate=None) -> (Tensor, Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("lora_linear_backward_into(Tensor grad, Tensor x, Tensor xa, Tensor lora_a, Tensor lora_b, float scale, "
            "bool a_grad, bool b_grad, Tensor(a!) accumulate) -> (Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
# The forward's two halves as ops of their own, for compiled joint graphs (``passes.lora.split_forward``): xa then
# reads x alone, so a backward that needs only xa recomputes x @ A.T, not the base layer's matmul. No autograd:
# they appear only after differentiation.
_LIB.define("lora_project(Tensor x, Tensor lora_a) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("lora_apply(Tensor base, Tensor xa, Tensor lora_b, float scale, bool round_delta) -> Tensor",
            tags=(torch.Tag.pt2_compliant_tag,))
_LORA_LINEAR = torch.ops.memgraph.lora_linear.default
_LORA_LINEAR_BACKWARD = torch.ops.memgraph.lora_linear_backward.default
_LORA_LINEAR_BACKWARD_INTO = torch.ops.memgraph.lora_linear_backward_into.default


def _lora_linear_impl(base: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                      round_delta: bool) -> tuple[Tensor, Tensor]:
    """(out, xa): ``out = base + scale * (x @ A.T @ B.T)`` rounded as the module docstring says; ``xa = x @ A.T``
    (float32, saved for the backward)."""
    _check(base, x, lora_a, lora_b)
    xa = _lora_project_impl(x, lora_a)
    return _lora_apply_impl(base, xa, lora_b, scale, round_delta), xa


def _lora_project_impl(x: Tensor, lora_a: Tensor) -> Tensor:
    """``xa = x.float() @ A.T`` (A's dtype, [..., R])."""
    flat_x = x.reshape(-1, x.shape[-1])
    xa = flat_x.new_empty((flat_x.shape[0], lora_a.shape[0]), dtype=lora_a.dtype)
    (_project_triton if use_triton(x, log) else _project_torch)(flat_x, lora_a, xa)
    return xa.view(*x.shape[:-1], lora_a.shape[0])


def _lora_apply_impl(base: Tensor, xa: Tensor, lora_b: Tensor, scale: float, round_delta: bool) -> Tensor:
    """``out = base + scale * (xa @ B.T)``, summed and rounded as the module docstring says."""
    flat_base, flat_xa = base.reshape(-1, base.shape[-1]), xa.reshape(-1, xa.shape[-1])
    out = torch.empty_like(flat_base)
    (_apply_triton if use_triton(base, log) else _apply_torch)(flat_base, flat_xa, lora_b, float(scale),
                                                               bool(round_delta), out)
    return out.view(base.shape)


def _lora_project_checked(x: Tensor, lora_a: Tensor) -> Tensor:
    _check_project(x, lora_a)
    return _lora_project_impl(x, lora_a)


def _lora_apply_checked(base: Tensor, xa: Tensor, lora_b: Tensor, scale: float, round_delta: bool) -> Tensor:
    _check_apply(base, xa, lora_b)
    return _lora_apply_impl(base, xa, lora_b, scale, round_delta)


@torch.library.register_fake("memgraph::lora_project")
def _(x, lora_a):
    _check_project(x, lora_a)
    return x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=lora_a.dtype)


@torch.library.register_fake("memgraph::lora_apply")
def _(base, xa, lora_b, scale, round_delta):
    _check_apply(base, xa, lora_b)
    return base.new_empty(base.shape)  # contiguous, as the implementation's


@torch.library.register_fake("memgraph::lora_linear")
def _(base, x, lora_a, lora_b, scale, round_delta):
    _check(base, x, lora_a, lora_b)
    return base.new_empty(base.shape), x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=lora_a.dtype)


def _weight_grads(lora_a: Tensor, lora_b: Tensor, a_grad: bool, b_grad: bool, triton_path: bool):
    """(dA, dB) buffers, None where not asked for. The kernels overwrite every element (no fill launch, which
    a step would pay twice per adapted linear); the torch path accumulates chunk by chunk into zeros."""
    new = torch.empty_like if triton_path else torch.zeros_like
    return new(lora_a) if a_grad else None, new(lora_b) if b_grad else None


def _lora_linear_backward_impl(grad: Tensor, x: Tensor, xa: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                               x_grad: bool, a_grad: bool, b_grad: bool,
                               accumulate: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) given dL/dout; each is empty where not asked for. With ``accumulate`` (x's gradient from
    elsewhere, e.g. the base layer's), dx is ``accumulate + dx`` summed as autograd sums them (the adapter's part
    rounded to x's dtype first), and the adapter's part never exists on its own."""
    flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    flat_xa = xa.reshape(-1, xa.shape[-1])
    triton_path = use_triton(x, log)
    grad_x = torch.empty_like(flat_x) if x_grad else None
    grad_a, grad_b = _weight_grads(lora_a, lora_b, a_grad, b_grad, triton_path)
    if accumulate is not None and (not x_grad or accumulate.shape != x.shape or accumulate.dtype != x.dtype):
        raise ValueError(f"lora_linear_backward: accumulate must be x's gradient ({tuple(x.shape)} {x.dtype}); got "
                         f"{tuple(accumulate.shape)} {accumulate.dtype} with x_grad={x_grad}")
    flat_accumulate = accumulate.reshape(-1, x.shape[-1]) if accumulate is not None else None
    run = _backward_triton if triton_path else _backward_torch
    run(flat_grad, flat_x, flat_xa, lora_a, lora_b, float(scale), grad_x, grad_a, grad_b, flat_accumulate)
    empty = x.new_empty((0,))
    return (grad_x.view(x.shape) if grad_x is not None else empty, grad_a if grad_a is not None else empty,
            grad_b if grad_b is not None else empty)


@torch.library.register_fake("memgraph::lora_linear_backward")
def _(grad, x, xa, lora_a, lora_b, scale, x_grad, a_grad, b_grad, accumulate=None):
    empty = x.new_empty((0,))
    return (torch.empty_like(x) if x_grad else empty, torch.empty_like(lora_a) if a_grad else empty,
            torch.empty_like(lora_b) if b_grad else empty)


def _lora_linear_backward_into_impl(grad: Tensor, x: Tensor, xa: Tensor, lora_a: Tensor, lora_b: Tensor,
                                    scale: float, a_grad: bool, b_grad: bool,
                                    accumulate: Tensor) -> tuple[Tensor, Tensor]:
    """``lora_linear_backward(..., x_grad=True, accumulate=accumulate)`` whose dx is written into ``accumulate``
    (x's gradient from elsewhere, read by nothing else): (dA, dB). The same sum, rounded the same way, without a
    second tensor of x's size. Only compiled backward graphs call it (``passes.lora.sum_input_grads_in_place``)."""
    if accumulate.shape != x.shape or accumulate.dtype != x.dtype:
        raise ValueError(f"lora_linear_backward_into: accumulate must be x's gradient ({tuple(x.shape)} {x.dtype}); "
                         f"got {tuple(accumulate.shape)} {accumulate.dtype}")
    flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    flat_xa = xa.reshape(-1, xa.shape[-1])
    # a strided gradient is summed in a contiguous copy, then copied back: correct, just not in place
    target = (accumulate if accumulate.is_contiguous() else accumulate.contiguous()).view(-1, x.shape[-1])
    triton_path = use_triton(x, log)
    grad_a, grad_b = _weight_grads(lora_a, lora_b, a_grad, b_grad, triton_path)
    run = _backward_triton if triton_path else _backward_torch
    # dx's rows are read from and written to the same place, one tile (or chunk of rows) at a time
    run(flat_grad, flat_x, flat_xa, lora_a, lora_b, float(scale), target, grad_a, grad_b, target)
    if target.data_ptr() != accumulate.data_ptr():
        accumulate.copy_(target.view(accumulate.shape))
    empty = x.new_empty((0,))
    return grad_a if grad_a is not None else empty, grad_b if grad_b is not None else empty


@torch.library.register_fake("memgraph::lora_linear_backward_into")
def _(grad, x, xa, lora_a, lora_b, scale, a_grad, b_grad, accumulate):
    empty = x.new_empty((0,))
    return torch.empty_like(lora_a) if a_grad else empty, torch.empty_like(lora_b) if b_grad else empty


_LIB.impl("lora_linear", _lora_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_project", _lora_project_checked, "CompositeExplicitAutograd")
_LIB.impl("lora_apply", _lora_apply_checked, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_backward", _lora_linear_backward_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_backward_into", _lora_linear_backward_into_impl, "CompositeExplicitAutograd")


# --- autograd ---
# As for memgraph.attention: with ordinary dense tensors and no dispatch mode, transform, tracer or profiler
# active (direct_eager), the autograd kernels call the implementations themselves; anything else (FakeTensor,
# FunctionalTensor, torch.compile, FlopCounterMode...) redispatches below autograd, where it sees the ops.
def _below_autograd(impl, op, direct: bool, *args):
    if direct:
        return impl(*args)
    with _compat.below_autograd():
        return op(*args)


class _LoRALinearFunction(torch.autograd.Function):
    """memgraph.lora_linear's autograd: saves x, xa (float32, [.., R]), A and B; its backward is
    memgraph.lora_linear_backward. dL/dbase is dL/dout itself (the float32 round trip of a 16-bit gradient, sum
    then cast back, is exact)."""

    @staticmethod
    def forward(ctx, base, x, lora_a, lora_b, scale, round_delta):
        direct = direct_eager(base, x, lora_a, lora_b)
        out, xa = _below_autograd(_lora_linear_impl, _LORA_LINEAR, direct, base, x, lora_a, lora_b, scale,
                                  round_delta)
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        ctx.scale = scale
        ctx.mark_non_differentiable(xa)
        ctx.set_materialize_grads(False)
        return out, xa

    @staticmethod
    def backward(ctx, grad, _grad_xa):
        if grad is None:
            return (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True: the gradients would silently lack their own derivative
            raise NotImplementedError("memgraph.lora_linear: double backward is not supported (its backward op "
                                      "has no derivative)")
        x, xa, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # backward has its own context (a mode may be entered between forward and backward)
        direct = direct_eager(grad, x, xa, lora_a, lora_b)
        grad_x, grad_a, grad_b = _below_autograd(_lora_linear_backward_impl, _LORA_LINEAR_BACKWARD, direct, grad, x,
                                                 xa, lora_a, lora_b, ctx.scale, needs[1], needs[2], needs[3], None)
        return (grad if needs[0] else None, grad_x if needs[1] else None, grad_a if needs[2] else None,
                grad_b if needs[3] else None, None, None)


_BackwardWithoutDerivative = without_derivative(_LORA_LINEAR_BACKWARD, "memgraph.lora_linear")


def _lora_linear_autograd(base, x, lora_a, lora_b, scale, round_delta):
    """memgraph.lora_linear's Autograd-key kernel (the op called through the dispatcher)."""
    if builds_graph(base, x, lora_a, lora_b):
        return _LoRALinearFunction.apply(base, x, lora_a, lora_b, scale, round_delta)
    return _below_autograd(_lora_linear_impl, _LORA_LINEAR, direct_eager(base, x, lora_a, lora_b), base, x, lora_a,
                           lora_b, scale, round_delta)


def _lora_linear_backward_autograd(grad, x, xa, lora_a, lora_b, scale, x_grad, a_grad, b_grad, accumulate=None):
    """memgraph.lora_linear_backward's Autograd-key kernel. Compiled backward graphs call it with grad mode off."""
    if builds_graph(grad, x, xa, lora_a, lora_b, accumulate):
        return _BackwardWithoutDerivative.apply(grad, x, xa, lora_a, lora_b, scale, x_grad, a_grad, b_grad,
                                                accumulate)
    return _below_autograd(_lora_linear_backward_impl, _LORA_LINEAR_BACKWARD,
                           direct_eager(grad, x, xa, lora_a, lora_b, accumulate), grad, x, xa, lora_a, lora_b, scale,
                           x_grad, a_grad, b_grad, accumulate)


def _lora_linear_backward_into_autograd(grad, x, xa, lora_a, lora_b, scale, a_grad, b_grad, accumulate):
    """memgraph.lora_linear_backward_into's Autograd-key kernel; ``accumulate`` is written, so its version counter
    moves (as for any in-place op: a tensor saved for a backward elsewhere is then caught as modified)."""
    if builds_graph(grad, x, xa, lora_a, lora_b, accumulate):  # in place into a tensor autograd tracks
        raise RuntimeError("memgraph.lora_linear_backward_into writes into accumulate and has no derivative: call it "
                           "with grad mode off or on tensors that do not require grad")
    args = (grad, x, xa, lora_a, lora_b, scale, a_grad, b_grad, accumulate)
    if direct_eager(grad, x, xa, lora_a, lora_b, accumulate):
        outputs = _lora_linear_backward_into_impl(*args)
        torch.autograd.graph.increment_version(accumulate)  # what the skipped ADInplaceOrView kernel does
        return outputs
    with _compat.below_autograd():
        return _LORA_LINEAR_BACKWARD_INTO(*args)


def _lora_linear_backward_into_inplace_or_view(keyset, *args):
    """The ADInplaceOrView kernel of the mutating op: ``accumulate``'s version counter moves."""
    torch.autograd.graph.increment_version(args[-1])
    return _compat.redispatch_after_inplace_or_view(_LORA_LINEAR_BACKWARD_INTO, keyset, *args)


def _forward_half_autograd(impl, op, name: str):
    """The Autograd-key kernel of lora_project / lora_apply: they appear only in graphs already differentiated
    (run with grad mode off), so a call that would need their derivative raises instead of autograd's fallback
    warning and missing gradients."""
    def kernel(*args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if builds_graph(*tensors):
            raise RuntimeError(f"memgraph.{name} has no derivative (compiled graphs run it after differentiation): "
                               "differentiate memgraph.lora_linear instead")
        return _below_autograd(impl, op, direct_eager(*tensors), *args)
    return kernel


_LIB.impl("lora_linear", _lora_linear_autograd, "Autograd")
_LIB.impl("lora_project", _forward_half_autograd(_lora_project_checked, torch.ops.memgraph.lora_project.default,
                                                 "lora_project"), "Autograd")
_LIB.impl("lora_apply", _forward_half_autograd(_lora_apply_checked, torch.ops.memgraph.lora_apply.default,
                                               "lora_apply"), "Autograd")
_LIB.impl("lora_linear_backward", _lora_linear_backward_autograd, "Autograd")
_LIB.impl("lora_linear_backward_into", _lora_linear_backward_into_autograd, "Autograd")
_LIB.impl("lora_linear_backward_into", _lora_linear_backward_into_inplace_or_view, "ADInplaceOrView",
          with_keyset=True)


def lora_linear(base: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0, *,
                round_delta: bool = False) -> Tensor:
    """``(base + scale * (x.float() @ A.T @ B.T)).to(base.dtype)`` (or, with ``round_delta``, ``base + (scale *
    ...).to(base.dtype)``) without float32 temporaries of the output's size; differentiable in base, x, A, B."""
    return torch.ops.memgraph.lora_linear(base, x, lora_a, lora_b, float(scale), bool(round_delta))[0]


def _check(base: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor) -> None:
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_linear: need A [R, K] and B [N, R]; got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    if x.shape[-1] != lora_a.shape[1] or base.shape[-1] != lora_b.shape[0] or base.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"lora_linear: need x [..., K] and base [..., N] for A [R, K], B [N, R]; got x "
                         f"{tuple(x.shape)}, base {tuple(base.shape)}, A {tuple(lora_a.shape)}, B "
                         f"{tuple(lora_b.shape)}")
    _check_dtypes("lora_linear", {"A": lora_a, "B": lora_b}, {"x": x, "base": base}, lora_a.shape[0])


def _check_project(x: Tensor, lora_a: Tensor) -> None:
    if lora_a.dim() != 2 or x.shape[-1] != lora_a.shape[1]:
        raise ValueError(f"lora_project: need x [..., K] and A [R, K]; got x {tuple(x.shape)}, A "
                         f"{tuple(lora_a.shape)}")
    _check_dtypes("lora_project", {"A": lora_a}, {"x": x}, lora_a.shape[0])


def _check_apply(base: Tensor, xa: Tensor, lora_b: Tensor) -> None:
    if lora_b.dim() != 2 or xa.shape[-1] != lora_b.shape[1] or base.shape[-1] != lora_b.shape[0] or \
            base.shape[:-1] != xa.shape[:-1]:
        raise ValueError(f"lora_apply: need base [..., N] and xa [..., R] for B [N, R]; got base "
                         f"{tuple(base.shape)}, xa {tuple(xa.shape)}, B {tuple(lora_b.shape)}")
    _check_dtypes("lora_apply", {"B": lora_b}, {"base": base}, lora_b.shape[1])
    if xa.dtype != lora_b.dtype:
        raise ValueError(f"lora_apply: xa must have B's dtype {lora_b.dtype}; got {xa.dtype}")


def _check_dtypes(op: str, adapters: dict, activations: dict, rank: int) -> None:
    """Adapter weights (by name) of one dtype of ADAPTER_DTYPES, activations of ACTIVATION_DTYPES, the rank at
    most MAX_RANK."""
    dtypes = {t.dtype for t in adapters.values()}
    if len(dtypes) != 1 or not dtypes <= set(ADAPTER_DTYPES):
        must = "must share one dtype of" if len(adapters) > 1 else "must be one of"
        raise ValueError(f"{op}: {' and '.join(adapters)} {must} {ADAPTER_DTYPES}; got "
                         f"{' and '.join(str(t.dtype) for t in adapters.values())}")
    if any(t.dtype not in ACTIVATION_DTYPES for t in activations.values()):
        raise ValueError(f"{op}: {' and '.join(activations)} must be one of {ACTIVATION_DTYPES}; got "
                         f"{' and '.join(str(t.dtype) for t in activations.values())}")
    if rank > MAX_RANK:
        raise ValueError(f"{op}: rank {rank} > MAX_RANK={MAX_RANK}")


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def backward_flops(grad, x, xa, lora_a, lora_b, scale, x_grad, a_grad, b_grad, accumulate=None, *,
                       out_shape=None, **kwargs) -> int:
        rows, (rank, features), outputs = math.prod(x[:-1]), lora_a, lora_b[0]
        through = x_grad or a_grad  # gxa = g @ B is needed for either
        return 2 * rows * rank * (outputs * (int(b_grad) + int(through)) + features * (int(a_grad) + int(x_grad)))

    def backward_into_flops(grad, x, xa, lora_a, lora_b, scale, a_grad, b_grad, accumulate, **kwargs) -> int:
        return backward_flops(grad, x, xa, lora_a, lora_b, scale, True, a_grad, b_grad, accumulate, **kwargs)

    def project_flops(x, lora_a, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x[:-1]) * lora_a[0] * lora_a[1]

    def apply_flops(base, xa, lora_b, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(base[:-1]) * lora_b[1] * lora_b[0]

    def forward_flops(base, x, lora_a, lora_b, *args, out_shape=None, **kwargs) -> int:  # the two halves
        return project_flops(x, lora_a) + apply_flops(base, None, lora_b)

    for packet, formula in ((torch.ops.memgraph.lora_linear, forward_flops),
                            (torch.ops.memgraph.lora_project, project_flops),
                            (torch.ops.memgraph.lora_apply, apply_flops),
                            (torch.ops.memgraph.lora_linear_backward, backward_flops),
                            (torch.ops.memgraph.lora_linear_backward_into, backward_into_flops)):
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


def _runs_triton(tensor: Tensor) -> bool:
    """Which path a call on ``tensor`` takes (meta: planning for the GPU)."""
    return HAS_TRITON and (tensor.device.type in ("cuda", "meta") or INTERPRET)


def _register_scratch_formulas() -> None:
    """Bytes each op allocates and frees inside its call: under Triton the backward's gxa [M, R] in float32 and
    the split reductions' partials (a bound: under 5 MiB at rank 16); the plain-torch path's float32 chunks
    (rows x N and rows x K, each live at most twice)."""
    from memgraph.cost_model.values import register_scratch

    def chunk_bytes(x, outputs: int):
        rows = torch.sym_min(math.prod(x.shape[:-1]), TORCH_CHUNK_ROWS)
        return 2 * rows * (outputs + x.shape[-1]) * 4

    def partials_bytes(x, rank: int) -> int:  # a split reduction's float32 partials, at most
        processors = _multiprocessors(x.device) if x.is_cuda else PLANNED_MULTIPROCESSORS
        kept = max(ROWS_TIMES_SMALL["BLOCK_M"], COLS_REDUCED["BLOCK_N"])  # rows or columns per program
        return PROGRAMS_PER_MULTIPROCESSOR * processors * kept * rank * 4

    def forward(base, x, lora_a, lora_b, **_):
        return partials_bytes(x, lora_a.shape[0]) if _runs_triton(x) else chunk_bytes(x, lora_b.shape[0])

    def backward(grad, x, lora_a, lora_b, **_):
        if _runs_triton(x):
            return math.prod(x.shape[:-1]) * lora_a.shape[0] * 4 + partials_bytes(x, lora_a.shape[0])
        return chunk_bytes(x, lora_b.shape[0])

    def project(x, lora_a, **_):
        if _runs_triton(x):
            return partials_bytes(x, lora_a.shape[0])
        return torch.sym_min(math.prod(x.shape[:-1]), TORCH_CHUNK_ROWS) * x.shape[-1] * 4  # a float32 chunk of x

    def apply(base, xa, lora_b, **_):  # Triton: no temporary; torch: a float32 chunk of rows x N, and its sum
        return 0 if _runs_triton(base) else 2 * torch.sym_min(math.prod(base.shape[:-1]), TORCH_CHUNK_ROWS) * \
            base.shape[-1] * 4

    register_scratch(torch.ops.memgraph.lora_linear.default, forward)
    register_scratch(torch.ops.memgraph.lora_project.default, project)
    register_scratch(torch.ops.memgraph.lora_apply.default, apply)
    register_scratch(torch.ops.memgraph.lora_linear_backward.default, backward)
    register_scratch(torch.ops.memgraph.lora_linear_backward_into.default, backward)


_register_flop_formulas()
_register_scratch_formulas()


# ------------------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------------------
def reference_lora_linear(base: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0, *,
                          round_delta: bool = False) -> Tensor:
    """PEFT's computation itself (differentiable): the float32 delta, then the sum and cast it matched."""
    delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(lora_a.dtype), lora_a), lora_b) * scale
    if round_delta:
        return base + delta.to(base.dtype)
    return (base + delta).to(base.dtype)
