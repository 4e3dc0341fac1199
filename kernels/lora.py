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

Every product is a float32 ``ieee`` dot (no TF32), as cuBLAS's float32 matmul is by default; only the summation
order differs from eager. Without Triton (a CPU without ``TRITON_INTERPRET=1``) the same math runs in plain torch
over chunks of ``TORCH_CHUNK_ROWS`` rows, so its float32 temporaries stay bounded too.
"""
from __future__ import annotations

import logging
import math
import types
from typing import Optional

import torch
from torch import Tensor

from memgraph.kernels._dispatch import HAS_TRITON, INTERPRET, device_guard, use_triton

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
# Tiles: rows x columns of the [M, N] output (each reads BLOCK_M x R of xa and R x BLOCK_N of B), and the
# reduction's step over the long dimension. The interpreter runs the same kernels on small tiles.
BLOCK_M = 16 if INTERPRET else 64
BLOCK_N = 32 if INTERPRET else 128
BLOCK_K = 32 if INTERPRET else 64
NUM_WARPS = 4
# Rows per chunk of the plain-torch path: its float32 temporaries are TORCH_CHUNK_ROWS x max(N, K).
TORCH_CHUNK_ROWS = 1024
# The triton 3.9 interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: round by hand.
ROUND_BY_HAND = tl.constexpr(INTERPRET)


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
def _rows_times_small_kernel(X, stride_xm, stride_xk, W, stride_wk, stride_wr, OUT, stride_om, stride_or,
                             M, K, R, alpha,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """OUT[M, R] = (alpha * float32(X[M, K])) @ W[K, R]: a long reduction into a few columns (xa, gxa)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32) * alpha
        w = tl.load(W + cols[:, None] * stride_wk + ranks[None, :] * stride_wr,
                    mask=(cols[:, None] < K) & (ranks[None, :] < R), other=0.0).to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
    tl.store(OUT + rows[:, None] * stride_om + ranks[None, :] * stride_or, acc.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def _small_times_cols_kernel(P, stride_pm, stride_pr, W, stride_wr, stride_wn, BASE, stride_bm, stride_bn,
                             OUT, stride_om, stride_on, M, N, R, alpha,
                             HAS_BASE: tl.constexpr, ROUND_DELTA: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """OUT[M, N] = base + alpha * (P[M, R] @ W[R, N]), summed in float32 (or with the product first rounded to
    OUT's dtype: ROUND_DELTA), then rounded to OUT's dtype; without a base just the rounded product (dx)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    p = tl.load(P + rows[:, None] * stride_pm + ranks[None, :] * stride_pr,
                mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0).to(tl.float32)
    w = tl.load(W + ranks[:, None] * stride_wr + cols[None, :] * stride_wn,
                mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0).to(tl.float32)
    product = tl.dot(p, w, input_precision="ieee") * alpha
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
                         M, N, R, alpha,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """OUT[N, R] = (alpha * float32(X[M, N])).T @ P[M, R]: a reduction over the rows (dB, and dA transposed)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                    mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0).to(tl.float32) * alpha
        p = tl.load(P + rows[:, None] * stride_pm + ranks[None, :] * stride_pr,
                    mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(x), p, acc, input_precision="ieee")
    tl.store(OUT + cols[:, None] * stride_on + ranks[None, :] * stride_or, acc.to(OUT.dtype.element_ty),
             mask=(cols[:, None] < N) & (ranks[None, :] < R))


# ------------------------------------------------------------------------------------------------------------
# Launchers (2-D views; W and OUT may be transposed views: the kernels take strides)
# ------------------------------------------------------------------------------------------------------------
def _rank_pad(rank: int) -> int:
    return max(MIN_DOT, 1 << (rank - 1).bit_length())


def _rows_times_small(x: Tensor, w: Tensor, out: Tensor, alpha: float) -> None:
    (m, k), r = x.shape, w.shape[1]
    with device_guard(x):
        _rows_times_small_kernel[(triton.cdiv(m, BLOCK_M),)](
            x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1), out, out.stride(0), out.stride(1),
            m, k, r, alpha, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, R_PAD=_rank_pad(r), num_warps=NUM_WARPS)


def _small_times_cols(p: Tensor, w: Tensor, base: Optional[Tensor], out: Tensor, alpha: float,
                      round_delta: bool) -> None:
    (m, r), n = p.shape, w.shape[1]
    b = base if base is not None else out  # unread without HAS_BASE
    with device_guard(p):
        _small_times_cols_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))](
            p, p.stride(0), p.stride(1), w, w.stride(0), w.stride(1), b, b.stride(0), b.stride(1),
            out, out.stride(0), out.stride(1), m, n, r, alpha, HAS_BASE=base is not None,
            ROUND_DELTA=round_delta, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, R_PAD=_rank_pad(r), num_warps=NUM_WARPS)


def _cols_reduced(x: Tensor, p: Tensor, out: Tensor, alpha: float) -> None:
    (m, n), r = x.shape, p.shape[1]
    with device_guard(x):
        _cols_reduced_kernel[(triton.cdiv(n, BLOCK_N),)](
            x, x.stride(0), x.stride(1), p, p.stride(0), p.stride(1), out, out.stride(0), out.stride(1),
            m, n, r, alpha, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, R_PAD=_rank_pad(r), num_warps=NUM_WARPS)


def _forward_triton(base: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float, round_delta: bool,
                    out: Tensor, xa: Tensor) -> None:
    _rows_times_small(x, a.t(), xa, 1.0)
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
def _forward_torch(base: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float, round_delta: bool,
                   out: Tensor, xa: Tensor) -> None:
    for start in range(0, x.shape[0], TORCH_CHUNK_ROWS):
        rows = slice(start, start + TORCH_CHUNK_ROWS)
        torch.mm(x[rows].to(a.dtype), a.t(), out=xa[rows])
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
@torch.library.custom_op("memgraph::lora_linear", mutates_args=())
def _lora_linear_op(base: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                    round_delta: bool) -> tuple[Tensor, Tensor]:
    """(out, xa): ``out = base + scale * (x @ A.T @ B.T)`` rounded as the module docstring says; ``xa = x @ A.T``
    (float32, saved for the backward)."""
    _check(base, x, lora_a, lora_b)
    flat_x, flat_base = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
    out = torch.empty_like(flat_base)
    xa = flat_x.new_empty((flat_x.shape[0], lora_a.shape[0]), dtype=lora_a.dtype)
    run = _forward_triton if use_triton(x, log) else _forward_torch
    run(flat_base, flat_x, lora_a, lora_b, float(scale), bool(round_delta), out, xa)
    return out.view(base.shape), xa.view(*x.shape[:-1], lora_a.shape[0])


@_lora_linear_op.register_fake
def _(base, x, lora_a, lora_b, scale, round_delta):
    _check(base, x, lora_a, lora_b)
    return torch.empty_like(base), x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=lora_a.dtype)


@torch.library.custom_op("memgraph::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad: Tensor, x: Tensor, xa: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                             x_grad: bool, a_grad: bool, b_grad: bool,
                             accumulate: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) given dL/dout; each is empty where not asked for. With ``accumulate`` (x's gradient from
    elsewhere, e.g. the base layer's), dx is ``accumulate + dx`` summed as autograd sums them (the adapter's part
    rounded to x's dtype first), and the adapter's part never exists on its own."""
    flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    flat_xa = xa.reshape(-1, xa.shape[-1])
    grad_x = torch.empty_like(flat_x) if x_grad else None
    grad_a = torch.zeros_like(lora_a) if a_grad else None
    grad_b = torch.zeros_like(lora_b) if b_grad else None
    if accumulate is not None and (not x_grad or accumulate.shape != x.shape or accumulate.dtype != x.dtype):
        raise ValueError(f"lora_linear_backward: accumulate must be x's gradient ({tuple(x.shape)} {x.dtype}); got "
                         f"{tuple(accumulate.shape)} {accumulate.dtype} with x_grad={x_grad}")
    flat_accumulate = accumulate.reshape(-1, x.shape[-1]) if accumulate is not None else None
    run = _backward_triton if use_triton(x, log) else _backward_torch
    run(flat_grad, flat_x, flat_xa, lora_a, lora_b, float(scale), grad_x, grad_a, grad_b, flat_accumulate)
    empty = x.new_empty((0,))
    return (grad_x.view(x.shape) if grad_x is not None else empty, grad_a if grad_a is not None else empty,
            grad_b if grad_b is not None else empty)


@_lora_linear_backward_op.register_fake
def _(grad, x, xa, lora_a, lora_b, scale, x_grad, a_grad, b_grad, accumulate=None):
    empty = x.new_empty((0,))
    return (torch.empty_like(x) if x_grad else empty, torch.empty_like(lora_a) if a_grad else empty,
            torch.empty_like(lora_b) if b_grad else empty)


def _setup_context(ctx, inputs, output):
    _, x, lora_a, lora_b, scale, _ = inputs
    ctx.save_for_backward(x, output[1], lora_a, lora_b)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_xa):
    if grad is None:
        return (None,) * 6
    x, xa, lora_a, lora_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b = torch.ops.memgraph.lora_linear_backward(grad, x, xa, lora_a, lora_b, ctx.scale,
                                                                     needs[1], needs[2], needs[3])
    # dL/dbase: the float32 round trip of a 16-bit gradient (sum, then cast back) is exact
    return (grad if needs[0] else None, grad_x if needs[1] else None, grad_a if needs[2] else None,
            grad_b if needs[3] else None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


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
    if lora_a.dtype not in ADAPTER_DTYPES or lora_b.dtype != lora_a.dtype:
        raise ValueError(f"lora_linear: A and B must share one dtype of {ADAPTER_DTYPES}; got {lora_a.dtype} and "
                         f"{lora_b.dtype}")
    if x.dtype not in ACTIVATION_DTYPES or base.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"lora_linear: x and base must be one of {ACTIVATION_DTYPES}; got {x.dtype} and "
                         f"{base.dtype}")
    if lora_a.shape[0] > MAX_RANK:
        raise ValueError(f"lora_linear: rank {lora_a.shape[0]} > MAX_RANK={MAX_RANK}")


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def forward_flops(base, x, lora_a, lora_b, *args, out_shape=None, **kwargs) -> int:
        rows, (rank, features), outputs = math.prod(x[:-1]), lora_a, lora_b[0]
        return 2 * rows * rank * (features + outputs)

    def backward_flops(grad, x, xa, lora_a, lora_b, scale, x_grad, a_grad, b_grad, accumulate=None, *,
                       out_shape=None, **kwargs) -> int:
        rows, (rank, features), outputs = math.prod(x[:-1]), lora_a, lora_b[0]
        through = x_grad or a_grad  # gxa = g @ B is needed for either
        return 2 * rows * rank * (outputs * (int(b_grad) + int(through)) + features * (int(a_grad) + int(x_grad)))

    for packet, formula in ((torch.ops.memgraph.lora_linear, forward_flops),
                            (torch.ops.memgraph.lora_linear_backward, backward_flops)):
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


def _runs_triton(tensor: Tensor) -> bool:
    """Which path a call on ``tensor`` takes (meta: planning for the GPU)."""
    return HAS_TRITON and (tensor.device.type in ("cuda", "meta") or INTERPRET)


def _register_scratch_formulas() -> None:
    """Bytes each op allocates and frees inside its call: the backward's gxa [M, R] in float32 under Triton;
    the plain-torch path's float32 chunks (rows x N and rows x K, each live at most twice)."""
    from memgraph.cost_model.values import register_scratch

    def chunk_bytes(x, outputs: int):
        rows = torch.sym_min(math.prod(x.shape[:-1]), TORCH_CHUNK_ROWS)
        return 2 * rows * (outputs + x.shape[-1]) * 4

    def forward(base, x, lora_a, lora_b, **_):
        return 0 if _runs_triton(x) else chunk_bytes(x, lora_b.shape[0])

    def backward(grad, x, lora_a, lora_b, **_):
        if _runs_triton(x):
            return math.prod(x.shape[:-1]) * lora_a.shape[0] * 4
        return chunk_bytes(x, lora_b.shape[0])

    register_scratch(torch.ops.memgraph.lora_linear.default, forward)
    register_scratch(torch.ops.memgraph.lora_linear_backward.default, backward)


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
