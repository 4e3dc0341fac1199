"""Chunked lm_head + cross-entropy whose full logits never exist: Triton row kernel, launcher, custom op
(fake impl, autograd, FLOP and scratch formulas) and plain-torch references.

    loss, logits = linear_cross_entropy(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None,
                                        ignore_index=-100, reduction="mean", return_logits=False)

hidden ``[..., H]``, weight ``[V, H]`` (the lm_head), labels ``[N]`` with N the number of hidden rows (already
shifted, as HF's causal-LM loss shifts them). Per row the logits are ``y = softcap * tanh(s * z / softcap)``
(or ``y = s * z`` without a softcap) with ``z = hidden @ weight.T + bias``; the loss is the cross-entropy of
``y`` in float32 with ``ignore_index`` rows left out, summed or averaged over the rows kept (HF's
``ForCausalLMLoss`` after ``logits.float()``).

How it runs, per chunk of ``chunk_tokens`` rows (one buffer of chunk x V in the hidden dtype, reused in place):

1. ``z = hidden_chunk @ weight.T (+ bias)``: cuBLAS, rounded to the hidden dtype as HF's ``nn.Linear`` is.
2. ``_cross_entropy_rows_kernel``, one program per row: pass 1 reads the row once for the log-sum-exp (online
   max), the target logit and, when asked, writes the (scaled, capped) logits output; pass 2 writes
   ``dz = dL/dz`` over the same buffer (float32 math, stored in the hidden dtype, as eager's gradient reaches
   the lm_head's matmul in that dtype).
3. ``grad_hidden_chunk = dz @ weight``; ``grad_weight += dz.T @ hidden_chunk`` and ``grad_bias += dz.sum(0)``
   accumulated in float32 (only when the lm_head trains: accumulating in bf16 diverged for Liger users).

All gradients are made in the forward; the backward only scales them by the incoming gradient. Nothing of
vocabulary size stays alive between chunks, no float32 copy of the logits and no softmax ever exist, and the
mean's divisor (the count of rows kept) stays on the device: no host synchronization. A label outside
``[0, V)`` that is not ``ignore_index`` makes the loss NaN (eager would raise; raising here would need a sync).
"""
from __future__ import annotations

import logging
import math
import types
from typing import Optional

import torch
from torch import Tensor

from memgraph.kernels._dispatch import HAS_TRITON, INTERPRET, device_guard, use_triton
from memgraph.kernels._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the kernel below is still defined (as a plain function) but never launched
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy", "chunk_tokens_for", "scratch_bytes",
           "REDUCTIONS"]

log = logging.getLogger("memgraph.kernels.cross_entropy")

REDUCTIONS = ("mean", "sum")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Columns a row program reads per step: large enough to stream a 128k vocabulary in few steps, small enough for
# registers (8 warps x 32 threads x 16 float32 each); the interpreter runs small blocks.
BLOCK_V = 64 if INTERPRET else 4096
NUM_WARPS = 8
# The chunk: W is re-read once per chunk by each of its matmuls, so a chunk of fewer rows than the GPU's
# FLOP-per-byte ridge (~200-300 on H100/H200) is bound by reading W; 512 rows keep the matmuls compute-bound.
MATMUL_EFFICIENT_TOKENS = 512
CHUNK_BUDGET_SHARE = 1 / 64  # of the memory budget one chunk's logits buffer may take
DEFAULT_CHUNK_BYTES = 256 * 2**20  # without a budget
CHUNK_ALIGN = 64  # rows: chunks in whole tiles of the matmuls

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernel works in base 2
NEG_INF = tl.constexpr(float("-inf"))
# Initial running max: finite, so that a lane that never sees a column (vocab < BLOCK) rescales by
# exp2(NEG_LARGE - NEG_LARGE) = 1 instead of exp2(-inf + inf) = NaN.
NEG_LARGE = tl.constexpr(-1.0e30)


# ------------------------------------------------------------------------------------------------------------
# Triton: one program per row of the chunk
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_of(z, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(y, dy/dz) of the raw logits z: y = s z, or softcap * tanh(s z / softcap)."""
    y = z * scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * (y / softcap)) - 1.0  # tanh (tl.sigmoid exists in every triton >= 3.0)
        return softcap * t, scale * (1.0 - t * t)
    return y, scale + 0.0 * y


@triton.jit
def _cross_entropy_rows_kernel(Z, stride_z, LABELS, LOSS, LOGITS, stride_logits, GRAD_SCALE, vocab, ignore_index,
                               scale, softcap, HAS_SOFTCAP: tl.constexpr, WRITE_LOGITS: tl.constexpr,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    label = tl.load(LABELS + row).to(tl.int64)
    kept = label != ignore_index
    offsets = tl.arange(0, BLOCK)
    # pass 1: log-sum-exp in base 2 with a running max, the target's logit, the logits output
    m = tl.full([BLOCK], NEG_LARGE, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    target = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        inside = cols < vocab
        z = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32)
        y, _ = _logits_of(z, scale, softcap, HAS_SOFTCAP)
        if WRITE_LOGITS:
            tl.store(LOGITS + row * stride_logits + cols, y.to(LOGITS.dtype.element_ty), mask=inside)
        y = tl.where(inside, y * LOG2E, NEG_INF)
        m_new = tl.maximum(m, y)
        s = s * tl.exp2(m - m_new) + tl.where(inside, tl.exp2(y - m_new), 0.0)
        m = m_new
        target += tl.where(cols == label, y, 0.0)
    m_row = tl.max(m, 0)
    lse2 = m_row + tl.log2(tl.sum(s * tl.exp2(m - m_row), 0))  # log2-sum-exp2 of y * log2(e)
    in_range = (label >= 0) & (label < vocab)
    loss = (lse2 - tl.sum(target, 0)) / LOG2E
    loss = tl.where(kept, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(LOSS + row, loss)
    # pass 2: dL/dz = (softmax(y) - onehot) * dy/dz * grad_scale, written over z (ignored rows: 0)
    coefficient = tl.where(kept, tl.load(GRAD_SCALE), 0.0)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        inside = cols < vocab
        z = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32)
        y, dy = _logits_of(z, scale, softcap, HAS_SOFTCAP)
        p = tl.exp2(y * LOG2E - lse2)
        dz = (p - tl.where(cols == label, 1.0, 0.0)) * dy * coefficient
        tl.store(z_row + cols, dz.to(Z.dtype.element_ty), mask=inside)


def _rows_triton(z: Tensor, labels: Tensor, loss_rows: Tensor, logits: Optional[Tensor], grad_scale: Tensor,
                 scale: float, softcap: Optional[float], ignore_index: int) -> None:
    rows, vocab = z.shape
    if rows == 0:
        return
    with device_guard(z):
        launch(
            _cross_entropy_rows_kernel, (rows,),
            z, z.stride(0), labels, loss_rows, logits if logits is not None else z,
            logits.stride(0) if logits is not None else 0, grad_scale, vocab, ignore_index, scale,
            softcap or 1.0, HAS_SOFTCAP=softcap is not None, WRITE_LOGITS=logits is not None, BLOCK=BLOCK_V,
            num_warps=NUM_WARPS)


def _rows_torch(z: Tensor, labels: Tensor, loss_rows: Tensor, logits: Optional[Tensor], grad_scale: Tensor,
                scale: float, softcap: Optional[float], ignore_index: int) -> None:
    """The row kernel's work in plain torch (float32), in place over ``z`` as the kernel does."""
    y = z.float() * scale
    dy = torch.full_like(y, scale)
    if softcap is not None:
        t = torch.tanh(y / softcap)
        y, dy = softcap * t, scale * (1 - t * t)
    if logits is not None:
        logits.copy_(y)
    kept = labels != ignore_index
    in_range = (labels >= 0) & (labels < z.shape[1])
    safe = torch.where(kept & in_range, labels, 0)
    lse = torch.logsumexp(y, dim=1)
    loss = lse - y.gather(1, safe[:, None]).squeeze(1)
    loss_rows.copy_(torch.where(kept, torch.where(in_range, loss, float("nan")), 0.0))
    p = torch.exp(y - lse[:, None])
    p[torch.arange(len(labels), device=z.device), safe] -= kept.to(p.dtype)
    coefficient = torch.where(kept, grad_scale, torch.zeros((), device=z.device))
    z.copy_(p * dy * coefficient[:, None])


# ------------------------------------------------------------------------------------------------------------
# The chunked computation
# ------------------------------------------------------------------------------------------------------------
def _accumulate_weight_grad(grad_weight: Tensor, dz: Tensor, hidden: Tensor) -> None:
    """grad_weight (float32) += dz.T @ hidden, the product accumulated in float32 from 16-bit operands."""
    if dz.dtype == torch.float32:
        grad_weight.addmm_(dz.t(), hidden)
    elif dz.is_cuda:
        grad_weight.add_(torch.mm(dz.t(), hidden, out_dtype=torch.float32))
    else:
        grad_weight.addmm_(dz.t().float(), hidden.float())


def _forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, logit_scale: float,
             softcap: Optional[float], ignore_index: int, reduction: str, return_logits: bool, chunk_tokens: int,
             hidden_grad: bool, weight_grad: bool, bias_grad: bool):
    vocab, features = weight.shape
    flat = hidden.reshape(-1, features)
    rows = flat.shape[0]
    labels = labels.reshape(-1)
    device = hidden.device
    kept = (labels != ignore_index).sum()
    grad_scale = (1.0 / kept.float()) if reduction == "mean" else torch.ones((), device=device)
    loss_rows = torch.empty(rows, dtype=torch.float32, device=device)
    logits = torch.empty((*hidden.shape[:-1], vocab) if return_logits else (0,), dtype=hidden.dtype, device=device)
    flat_logits = logits.view(rows, vocab) if return_logits else None
    grad_hidden = torch.empty_like(flat) if hidden_grad else flat.new_empty((0,))
    grad_weight = torch.zeros((vocab, features) if weight_grad else (0,), dtype=torch.float32, device=device)
    grad_bias = torch.zeros((vocab,) if bias_grad else (0,), dtype=torch.float32, device=device)
    run_rows = _rows_triton if use_triton(flat, log) else _rows_torch
    for start in range(0, rows, chunk_tokens):
        stop = min(start + chunk_tokens, rows)
        chunk = flat[start:stop]
        z = torch.nn.functional.linear(chunk, weight, bias)  # the chunk's logits buffer, overwritten by dz
        run_rows(z, labels[start:stop], loss_rows[start:stop],
                 flat_logits[start:stop] if flat_logits is not None else None, grad_scale, logit_scale, softcap,
                 ignore_index)
        if hidden_grad:
            torch.mm(z, weight, out=grad_hidden[start:stop])
        if weight_grad:
            _accumulate_weight_grad(grad_weight, z, chunk)
        if bias_grad:
            grad_bias.add_(z.sum(0, dtype=torch.float32))
        del z
    loss = loss_rows.sum() * grad_scale
    return loss, logits, grad_hidden.view(hidden.shape) if hidden_grad else grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------------------------
# Custom op: fake, autograd (the backward scales the forward's gradients), FLOP and scratch formulas
# ------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("memgraph::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             logit_scale: float, softcap: Optional[float], ignore_index: int, reduction: str,
                             return_logits: bool, chunk_tokens: int, hidden_grad: bool, weight_grad: bool,
                             bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, logits, grad_hidden, grad_weight, grad_bias); the last three are dL/d(input) made in the forward
    (empty where not asked for), logits is empty unless ``return_logits``."""
    _check(hidden, weight, bias, labels, reduction, chunk_tokens, softcap)
    return _forward(hidden, weight, bias, labels, logit_scale, softcap, ignore_index, reduction, return_logits,
                    chunk_tokens, hidden_grad, weight_grad, bias_grad)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, logit_scale, softcap, ignore_index, reduction, return_logits, chunk_tokens,
      hidden_grad, weight_grad, bias_grad):
    vocab, features = weight.shape
    loss = hidden.new_empty((), dtype=torch.float32)
    logits = hidden.new_empty((*hidden.shape[:-1], vocab) if return_logits else (0,))
    grad_hidden = hidden.new_empty(hidden.shape if hidden_grad else (0,))
    grad_weight = hidden.new_empty((vocab, features) if weight_grad else (0,), dtype=torch.float32)
    grad_bias = hidden.new_empty((vocab,) if bias_grad else (0,), dtype=torch.float32)
    return loss, logits, grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, logits, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.mark_non_differentiable(logits, grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    needs = ctx.needs_input_grad
    if grad_loss is None:
        return (None,) * 13

    def scaled(gradient: Tensor, dtype, needed: bool) -> Optional[Tensor]:
        if not needed or gradient.numel() == 0:
            return None
        return (gradient * grad_loss).to(dtype)

    return (scaled(grad_hidden, hidden_dtype, needs[0]), scaled(grad_weight, weight_dtype, needs[1]),
            scaled(grad_bias, bias_dtype, needs[2]), *(None,) * 10)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                         logit_scale: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                         reduction: str = "mean", return_logits: bool = False,
                         chunk_tokens: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(loss, logits) of ``cross_entropy(logits(hidden), labels)`` without the full logits (see the module
    docstring). Gradients flow to hidden, weight and bias when they require grad; ``logits`` (empty unless
    ``return_logits``) carries none. ``chunk_tokens`` defaults to ``chunk_tokens_for(...)`` without a budget."""
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(weight.shape[0], hidden.dtype, None)
    grads = torch.is_grad_enabled()
    loss, logits, *_ = torch.ops.memgraph.linear_cross_entropy(
        hidden, weight, bias, labels, float(logit_scale), None if softcap is None else float(softcap),
        int(ignore_index), reduction, bool(return_logits), int(chunk_tokens), grads and hidden.requires_grad,
        grads and weight.requires_grad, grads and bias is not None and bias.requires_grad)
    return loss, logits


def _check(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, reduction: str,
           chunk_tokens: int, softcap: Optional[float]) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: need hidden [..., H] and weight [V, H]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: hidden and weight must share one dtype of {SUPPORTED_DTYPES}; got "
                         f"{hidden.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"linear_cross_entropy: bias must be [V] in {hidden.dtype}; got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if labels.dtype not in (torch.int64, torch.int32) or labels.numel() != hidden.numel() // hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: labels must be integer with one per hidden row; got {labels.dtype} "
                         f"{tuple(labels.shape)} for hidden {tuple(hidden.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; choose one of {list(REDUCTIONS)}")
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be None or > 0, got {softcap}")


def chunk_tokens_for(vocab: int, dtype: torch.dtype, budget_bytes: Optional[int]) -> int:
    """Rows per chunk: the chunk's logits buffer (rows x V in the hidden dtype) takes ``CHUNK_BUDGET_SHARE`` of
    the memory budget (``DEFAULT_CHUNK_BYTES`` without one), but never fewer rows than keep the matmuls
    compute-bound (``MATMUL_EFFICIENT_TOKENS``)."""
    target = DEFAULT_CHUNK_BYTES if budget_bytes is None else int(budget_bytes * CHUNK_BUDGET_SHARE)
    element = torch.empty((), dtype=dtype).element_size()
    rows = max(MATMUL_EFFICIENT_TOKENS, target // max(vocab * element, 1))
    return max(CHUNK_ALIGN, rows // CHUNK_ALIGN * CHUNK_ALIGN)


def scratch_bytes(rows, vocab: int, dtype: torch.dtype, chunk_tokens: int):
    """Bytes the op allocates and frees inside one call: the chunk's logits buffer (SymInt-safe)."""
    element = torch.empty((), dtype=dtype).element_size()
    return torch.sym_min(rows, chunk_tokens) * vocab * element


def linear_cross_entropy_flops(rows, features: int, vocab: int, *, hidden_grad: bool, weight_grad: bool) -> int:
    """2 N H V per matmul: the logits, and dhidden and dweight when asked for (the row kernel's O(N V) work is
    not counted, as for any elementwise op)."""
    return (1 + int(hidden_grad) + int(weight_grad)) * 2 * rows * features * vocab


def _register_formulas() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    from memgraph.cost_model.values import register_scratch

    packet = torch.ops.memgraph.linear_cross_entropy

    def flops(hidden, weight, bias, labels, logit_scale, softcap, ignore_index, reduction, return_logits,
              chunk_tokens, hidden_grad, weight_grad, bias_grad, *, out_shape=None, **kwargs):
        vocab, features = weight
        return linear_cross_entropy_flops(math.prod(hidden[:-1]), features, vocab, hidden_grad=hidden_grad,
                                          weight_grad=weight_grad)

    if packet not in flop_registry:
        register_flop_formula(packet)(flops)

    def scratch(hidden, weight, chunk_tokens, **_):
        return scratch_bytes(math.prod(hidden.shape[:-1]), weight.shape[0], hidden.dtype, chunk_tokens)

    register_scratch(packet.default, scratch)


# ------------------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------------------
def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                                   logit_scale: float = 1.0, softcap: Optional[float] = None,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(loss, logits) computed the plain way in ``dtype`` (float64 for tests): full logits, differentiable."""
    z = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    y = z * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    loss = torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), labels.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)
    return loss, y


_register_formulas()
