"""memgraph.attention as custom ops: argument checks, the forward and backward ops (torch.library), their fake
implementations, autograd, FLOP formulas, and the public ``attention()``.

Registered with torch.library's low-level API; in plain eager (ordinary CPU/CUDA tensors, no dispatch mode,
transform or tracer) ``attention()`` and the ops' autograd kernels run the implementation without another trip
through the dispatcher: host time matters at short sequences.
"""
import logging
import math
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from memgraph import _compat
from memgraph.kernels._dispatch import builds_graph, direct_eager, use_triton, without_derivative
from memgraph.kernels.attention import cudnn
from memgraph.kernels.attention.launch import bwd_triton, fwd_triton, quantize_triton
from memgraph.kernels.attention.reference import torch_backward, torch_forward
from memgraph.kernels.kv_quant import KV_BITS, PACKED_DTYPES, dequantize_kv, packed_kv_shapes, quantize_kv_reference

log = logging.getLogger("memgraph.kernels.attention")

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: tl.arange needs them; 16 is tl.dot's minimum
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_kv(k: Tensor, v: Tensor, bits: int):
    """Pack K and V into (k_codes, k_meta, v_codes, v_meta) with the Triton kernel or its torch twin."""
    if bits not in (8, 4):
        raise ValueError(f"quantize_kv: bits must be 8 or 4, got {bits}")
    if use_triton(k, log):
        return quantize_triton(k, v, bits)
    return quantize_kv_reference(k, v, bits)


def _check(q: Tensor, k: Tensor, v: Tensor, kv_bits: int, window: Optional[int], softcap: Optional[float],
           q_segments: Optional[Tensor] = None, k_segments: Optional[Tensor] = None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: need q [B, Hq, S, D] and k, v [B, Hkv, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: Hkv={k.shape[1]} must divide Hq={q.shape[1]}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head_dim={q.shape[3]} not supported; choose one of {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if kv_bits not in KV_BITS:
        raise ValueError(f"attention: kv_bits={kv_bits} not supported; choose one of {list(KV_BITS)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be None or >= 1, got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"attention: softcap must be None or > 0, got {softcap}")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("attention: pass both q_segments and k_segments, or neither")
    for name, segments in (("q_segments", q_segments), ("k_segments", k_segments)):
        if segments is None:
            continue
        if segments.dim() != 2 or segments.shape[1] != q.shape[2] or segments.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"attention: {name} must be [B, S] (or [1, S]) for q {tuple(q.shape)}; got "
                             f"{tuple(segments.shape)}")
        if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.device != q.device:
            raise ValueError(f"attention: {name} must be an integer tensor on {q.device}; got {segments.dtype} on "
                             f"{segments.device}")


def _segments(q: Tensor, q_segments: Optional[Tensor], k_segments: Optional[Tensor]):
    """(q_segments, k_segments) as the kernels read them (int32, contiguous, [B, S]), or None."""
    if q_segments is None:
        return None
    batch, _, seq_len, _ = q.shape
    return tuple(s.to(torch.int32).expand(batch, seq_len).contiguous() for s in (q_segments, k_segments))


def _empty_packed(q: Tensor):
    return tuple(torch.empty(0, dtype=dtype, device=q.device) for dtype in PACKED_DTYPES)


# ------------------------------------------------------------------------------------------------------------
# Custom ops: forward, backward, fake impls, autograd, FLOP formulas
# ------------------------------------------------------------------------------------------------------------
# Registered with torch.library's low-level API (define / impl per dispatch key / register_fake) rather than
# torch.library.custom_op, as kernels/nf4.py does: custom_op wraps every call in generic Python (default filling
# for setup_context, an output-aliasing check, a dynamo-disable wrapper, a Python redispatch per op), which costs
# more host time than the kernels' GPU time at short sequences. Schemas, tags and fake impls are those custom_op
# produced, so graphs, passes and the cost model see the same ops.
_LIB = torch.library.Library("memgraph", "FRAGMENT")  # module-level: the registrations live as long as it does
_LIB.define("attention(Tensor q, Tensor k, Tensor v, bool causal=True, float? scale=None, SymInt kv_bits=16, "
            "SymInt? window=None, float? softcap=None, Tensor? q_segments=None, Tensor? k_segments=None) -> "
            "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("attention_backward(Tensor grad_out, Tensor q, Tensor? k, Tensor? v, Tensor? out, Tensor? lse, "
            "Tensor? k_codes, Tensor? k_meta, Tensor? v_codes, Tensor? v_meta, bool causal, float? scale, "
            "SymInt kv_bits, SymInt? window, float? softcap, Tensor? q_segments=None, Tensor? k_segments=None) -> "
            "(Tensor, Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_ATTENTION = torch.ops.memgraph.attention.default
_ATTENTION_BACKWARD = torch.ops.memgraph.attention_backward.default


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], kv_bits: int,
             window: Optional[int], softcap: Optional[float], q_segments: Optional[Tensor] = None,
             k_segments: Optional[Tensor] = None):
    """The forward op's work on checked arguments: (out, lse, k_codes, k_meta, v_codes, v_meta)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    segments = _segments(q, q_segments, k_segments)
    if use_triton(q, log):
        out, lse = _forward_kernels(q, k, v, causal, scale, window, softcap, segments)
    else:
        out, lse = torch_forward(q, k, v, causal, scale, window, softcap, segments)
    packed = _empty_packed(q) if kv_bits == 16 else quantize_kv(k, v, kv_bits)
    # Contiguous, as the fake impl promises: Inductor asserts the strides it was told (q may arrive transposed).
    return (out.contiguous(), lse.contiguous(), *packed)


def _forward_kernels(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window: Optional[int],
                     softcap: Optional[float], segments):
    """(out, lse) from cuDNN's kernels where they apply (any kv_bits: the forward reads 16-bit K/V), else ours."""
    if cudnn.applies(q, k, v, window, softcap, segments):
        try:
            return cudnn.forward(q, k, v, causal, scale)
        except RuntimeError as error:
            cudnn.failed(error)
    return fwd_triton(q, k, v, causal, scale, window, softcap, segments)


def _backward_kernels(grad_out: Tensor, q: Tensor, k: Optional[Tensor], v: Optional[Tensor], out: Optional[Tensor],
                      lse: Optional[Tensor], packed, causal: bool, scale: float, kv_bits: int, window: Optional[int],
                      softcap: Optional[float], kv_heads: int, segments):
    """(dq, dk, dv) from cuDNN's kernels where they apply (kv_bits=16 only), else ours."""
    if kv_bits == 16 and cudnn.applies(q, k, v, window, softcap, segments):
        try:
            return cudnn.backward(grad_out, q, k, v, out, lse, causal, scale)
        except RuntimeError as error:
            cudnn.failed(error)
    return bwd_triton(grad_out, q, k, v, out, lse, packed, causal, scale, kv_bits, window, softcap, kv_heads,
                      segments)


def _attention_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
                    kv_bits: int = 16, window: Optional[int] = None, softcap: Optional[float] = None,
                    q_segments: Optional[Tensor] = None, k_segments: Optional[Tensor] = None):
    """(out, lse, k_codes, k_meta, v_codes, v_meta); the packed four are empty when kv_bits=16."""
    _check(q, k, v, kv_bits, window, softcap, q_segments, k_segments)
    return _forward(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)


def _attention_backward_impl(grad_out: Tensor, q: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                             out: Optional[Tensor], lse: Optional[Tensor], k_codes: Optional[Tensor],
                             k_meta: Optional[Tensor], v_codes: Optional[Tensor], v_meta: Optional[Tensor],
                             causal: bool, scale: Optional[float], kv_bits: int, window: Optional[int],
                             softcap: Optional[float], q_segments: Optional[Tensor] = None,
                             k_segments: Optional[Tensor] = None):
    """(dq, dk, dv). kv_bits=16 reads k, v, out, lse; kv_bits<16 reads only q and the packed K/V."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = (k_codes, k_meta, v_codes, v_meta)
    kv_heads = k.shape[1] if kv_bits == 16 else k_codes.shape[1]
    segments = _segments(q, q_segments, k_segments)
    if use_triton(q, log):
        grads = _backward_kernels(grad_out, q, k, v, out, lse, packed, causal, scale, kv_bits, window, softcap,
                                  kv_heads, segments)
    elif kv_bits == 16:
        grads = torch_backward(grad_out, q, k, v, out, lse, causal, scale, window, softcap, segments)
    else:
        k_deq, v_deq = dequantize_kv(*packed, kv_bits, dtype=q.dtype)
        grads = torch_backward(grad_out, q, k_deq, v_deq, None, None, causal, scale, window, softcap, segments)
    dq, dk, dv = grads
    # The fake impl's strides (see _forward); the kernels' outputs are fresh contiguous tensors already.
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


_LIB.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_LIB.impl("attention_backward", _attention_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("memgraph::attention")
def _attention_fake(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None, q_segments=None,
                    k_segments=None):
    batch, heads, seq_len, head_dim = q.shape
    out = q.new_empty((batch, heads, seq_len, head_dim))
    lse = q.new_empty((batch, heads, seq_len), dtype=torch.float32)
    if kv_bits == 16:
        return (out, lse, *(q.new_empty((0,), dtype=dtype) for dtype in PACKED_DTYPES))
    shapes = packed_kv_shapes(batch, k.shape[1], seq_len, head_dim, kv_bits)
    return (out, lse, *(q.new_empty(shape, dtype=dtype) for shape, dtype in zip(shapes, PACKED_DTYPES)))


@torch.library.register_fake("memgraph::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, k_codes, k_meta, v_codes, v_meta, causal, scale, kv_bits,
                             window, softcap, q_segments=None, k_segments=None):
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1] if kv_bits == 16 else k_codes.shape[1]
    kv_shape = (batch, kv_heads, seq_len, head_dim)
    return q.new_empty(q.shape), q.new_empty(kv_shape), q.new_empty(kv_shape)


# --- autograd ---
# What the dispatcher does between the autograd kernel and ours for ordinary dense CPU/CUDA tensors with no
# Python dispatch mode, functorch transform or tracer active: nothing. Then the autograd.Function calls the
# implementation directly (no second dispatcher round trip), and the public ``attention()`` does not enter the
# dispatcher at all. Anything else - FakeTensor, FunctionalTensor, FlopCounterMode or any TorchDispatchMode, vmap,
# jit.trace, the profiler, inference tensors, torch.compile - goes through the dispatcher, which sees (records)
# both ops.
class _AttentionFunction(torch.autograd.Function):
    """memgraph.attention's autograd: saves q, k, v, O, LSE (kv_bits=16) or q and the packed K/V (kv_bits<16);
    its backward is memgraph.attention_backward."""

    @staticmethod
    def forward(ctx, q, k, v, options, direct, q_segments=None, k_segments=None):
        # options = (causal, scale, kv_bits, window, softcap): one argument, so apply() tracks fewer inputs.
        causal, scale, kv_bits, window, softcap = options
        if direct:  # arguments already checked by the caller
            outputs = _forward(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)
        else:
            with _compat.below_autograd():
                outputs = _ATTENTION(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)
        out, lse, k_codes, k_meta, v_codes, v_meta = outputs
        if kv_bits == 16:
            ctx.save_for_backward(q, k, v, out, lse, q_segments, k_segments)
        else:
            # Only q and the packed K/V: no bf16 K or V, no O, no LSE (the backward recomputes LSE' and delta').
            ctx.save_for_backward(q, k_codes, k_meta, v_codes, v_meta, q_segments, k_segments)
        ctx.mark_non_differentiable(lse, k_codes, k_meta, v_codes, v_meta)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the five non-differentiable outputs
        ctx.options = options
        ctx.direct = direct
        return outputs

    @staticmethod
    def backward(ctx, grad_out, *_unused_grads):
        causal, scale, kv_bits, window, softcap = ctx.options
        if kv_bits == 16:
            q, k, v, out, lse, q_segments, k_segments = ctx.saved_tensors
            packed = (None, None, None, None)
        else:
            q, *packed, q_segments, k_segments = ctx.saved_tensors
            k = v = out = lse = None
        if grad_out is None:  # the output was not used: every gradient is zero
            grad_out = torch.zeros_like(q)
        args = (grad_out, q, k, v, out, lse, *packed, causal, scale, kv_bits, window, softcap, q_segments, k_segments)
        if torch.is_grad_enabled():  # create_graph=True: the gradients get the op's autograd history
            dq, dk, dv = _ATTENTION_BACKWARD(*args)
        # Backward has its own context (a mode may be entered between forward and backward).
        elif ctx.direct and direct_eager(grad_out):
            dq, dk, dv = _attention_backward_impl(*args)
        else:
            with _compat.below_autograd():
                dq, dk, dv = _ATTENTION_BACKWARD(*args)
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None, None


def _attention_autograd(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None, q_segments=None,
                        k_segments=None):
    """memgraph.attention's Autograd-key kernel (the op called through the dispatcher)."""
    direct = direct_eager(q, k, v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if direct:
            _check(q, k, v, kv_bits, window, softcap, q_segments, k_segments)
        return _AttentionFunction.apply(q, k, v, (causal, scale, kv_bits, window, softcap), direct, q_segments,
                                        k_segments)
    if direct:
        return _attention_impl(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)
    with _compat.below_autograd():
        return _ATTENTION(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)


# memgraph.attention_backward under create_graph=True: its gradients have history, and backpropagating through
# them raises instead of autograd's fallback warning and returning wrong gradients.
_AttentionBackwardFunction = without_derivative(_ATTENTION_BACKWARD, "memgraph.attention")


def _attention_backward_autograd(*args):
    """memgraph.attention_backward's Autograd-key kernel. Compiled backward graphs call the op with grad mode
    off: in plain eager that runs the implementation directly, as the forward op's kernel does."""
    if builds_graph(*args[:10]):
        return _AttentionBackwardFunction.apply(*args)
    if direct_eager(*args[:10]):
        return _attention_backward_impl(*args)
    with _compat.below_autograd():
        return _ATTENTION_BACKWARD(*args)


_LIB.impl("attention", _attention_autograd, "Autograd")
_LIB.impl("attention_backward", _attention_backward_autograd, "Autograd")


def visible_pairs(seq_len, causal: bool, window: Optional[int]):
    """Number of attending (query, key) pairs per head; SymInt-safe (torch.sym_min, no branching on sizes)."""
    if window is None:
        return seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    m = torch.sym_min(seq_len, window)
    one_sided = m * (m + 1) // 2 + (seq_len - m) * window  # sum_i min(i + 1, window)
    return one_sided if causal else 2 * one_sided - seq_len


def attention_flops(batch, heads, seq_len, head_dim, *, causal=True, window=None, kv_bits=16, backward=False):
    """FLOPs the kernels execute: 2 * D per (query, key) pair per matmul. Forward: QK^T, PV. Backward: QK^T, dP,
    dV, dK in the dK/dV kernel, QK^T, dP, dQ in the dQ kernel (7), plus QK'^T and dP' in the stats pre-pass
    when kv_bits < 16 (9)."""
    matmuls = (7 if kv_bits == 16 else 9) if backward else 2
    return matmuls * 2 * head_dim * batch * heads * visible_pairs(seq_len, causal, window)


def _register_flop_formulas():
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    # Parameter names are the ops' schema names, so calls with positional or keyword arguments both bind.
    def forward_flops(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None, *, out_shape=None,
                      **kwargs):
        batch, heads, seq_len, head_dim = q
        return attention_flops(batch, heads, seq_len, head_dim, causal=causal, window=window, kv_bits=kv_bits)

    def backward_flops(grad_out, q, k, v, out, lse, k_codes, k_meta, v_codes, v_meta, causal, scale, kv_bits, window,
                       softcap, *, out_shape=None, **kwargs):
        batch, heads, seq_len, head_dim = q
        return attention_flops(batch, heads, seq_len, head_dim, causal=causal, window=window, kv_bits=kv_bits,
                               backward=True)

    for packet, formula in ((torch.ops.memgraph.attention, forward_flops),
                            (torch.ops.memgraph.attention_backward, backward_flops)):
        if packet not in flop_registry:  # re-importing this module must not raise "duplicate registrations"
            register_flop_formula(packet)(formula)


_register_flop_formulas()


def _register_scratch_formulas():
    """What the backward allocates besides its outputs where cuDNN runs it: cuDNN's workspace, and the contiguous
    copies it is given of inputs that are not (``cudnn.backward``). The Triton kernels' own buffers are small."""
    from memgraph.cost_model.values import register_scratch

    def backward_scratch(grad_out, q, k, v, out, lse, k_codes, k_meta, v_codes, v_meta, causal, scale, kv_bits,
                         window, softcap, q_segments=None, k_segments=None):
        segments = None if q_segments is None else (q_segments, k_segments)
        if kv_bits != 16 or k is None or not cudnn.applies(q, k, v, window, softcap, segments):
            return 0
        batch, heads, seq_len, head_dim = q.shape
        copies = sum(x.numel() * x.element_size() for x in (grad_out, q, k, v, out) if not x.is_contiguous())
        return cudnn.backward_workspace_bytes(batch, heads, k.shape[1], seq_len, head_dim) + copies

    register_scratch(_ATTENTION_BACKWARD, backward_scratch)


_register_scratch_formulas()


def saved_bytes(batch, heads, kv_heads, seq_len, head_dim, *, kv_bits=16, dtype=torch.bfloat16) -> int:
    """Bytes the op keeps for backward: kv_bits=16: q, k, v, out, lse; kv_bits<16: q + packed K/V."""
    element = torch.empty((), dtype=dtype).element_size()
    q_bytes = batch * heads * seq_len * head_dim * element
    if kv_bits == 16:
        return 2 * q_bytes + 2 * batch * kv_heads * seq_len * head_dim * element + batch * heads * seq_len * 4
    sizes = packed_kv_shapes(batch, kv_heads, seq_len, head_dim, kv_bits)
    packed = sum(math.prod(shape) * torch.empty((), dtype=d).element_size() for shape, d in zip(sizes, PACKED_DTYPES))
    return q_bytes + packed


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
              kv_bits: int = 16, window: Optional[int] = None, softcap: Optional[float] = None,
              q_segments: Optional[Tensor] = None, k_segments: Optional[Tensor] = None) -> Tensor:
    """Fused attention; q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D] in q's dtype.

    kv_bits=8 or 4 keeps K/V for backward in that many bits (the output is exact; gradients are those of
    attention with the dequantized K/V). See the module docstring for window, softcap and the packed format.
    q_segments/k_segments ([B, S] integers; both or neither): query i also needs q_segments[b, i] ==
    k_segments[b, j] to see key j (padded and packed batches: see ``padding_segments``/``packed_segments``);
    a row that sees no key gives 0."""
    _check(q, k, v, kv_bits, window, softcap, q_segments, k_segments)
    traced = torch.compiler.is_compiling() or has_torch_function((q, k, v))
    if not traced and direct_eager(q, k, v):
        # Plain eager (see "autograd" above): what the dispatcher would run, without entering it. Dynamo and torch
        # function modes/subclasses get the op through the dispatcher.
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _AttentionFunction.apply(q, k, v, (causal, scale, kv_bits, window, softcap), True, q_segments,
                                            k_segments)[0]
        return _forward(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)[0]
    return _ATTENTION(q, k, v, causal, scale, kv_bits, window, softcap, q_segments, k_segments)[0]


def padding_segments(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(q_segments, k_segments) for HF's causal-and-padding mask from a [B, S] ``attention_mask``: every query in
    segment 0, keys where the mask is 0 in segment -1 (seen by no query)."""
    k_segments = attention_mask.ne(0).to(torch.int32) - 1
    return torch.zeros_like(k_segments), k_segments


def packed_segments(position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(q_segments, k_segments) for sequences packed into one row, from [B, S] ``position_ids``: a new sequence
    starts wherever the position does not follow the previous one by 1 (HF's ``find_packed_sequence_indices``)."""
    before_first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=before_first, dim=-1).ne(1)
    segments = starts.cumsum(-1).to(torch.int32)
    return segments, segments
