"""Fused attention whose backward keeps K/V in 4 (or 8) bits: Triton kernels, custom ops, FLOP formulas, references.

    out = attention(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None)

q is ``[B, Hq, S, D]``, k and v are ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query head ``h`` reads
KV head ``h // (Hq // Hkv)``, the order HF's ``repeat_kv`` produces). ``window=W`` (Mistral-style sliding window)
lets query ``i`` see key ``j`` only when ``i - W < j`` (and ``j < i + W`` when not causal): the W most recent
keys, itself included. ``softcap=c`` (Gemma-2 style) replaces each scaled logit ``x`` by ``c * tanh(x / c)``.

How the pieces fit (one direction, top to bottom in this file):

1. Forward kernel (``_attn_fwd_kernel``): flash attention with an online softmax in base 2; it writes O and the
   natural-log LSE per query row. With ``kv_bits < 16`` a small kernel (``_quantize_kv_kernel``) also packs K and
   V: K per channel over blocks of ``K_GROUP_TOKENS`` tokens, V per token over groups of ``V_GROUP_CHANNELS``
   channels, asymmetric min/max, fp16 step and minimum, two 4-bit codes per byte. The forward output itself is
   exact (computed from the unquantized K/V).
2. What the backward keeps: ``kv_bits=16``: q, k, v, O, LSE (as flash attention does). ``kv_bits<16``: q and the
   packed K/V only (no bf16 K or V, no O, no LSE): 4.75 bits per K/V element, 0.297x the bf16 bytes.
3. Backward pre-passes, ``kv_bits<16`` only: K'/V' are dequantized once into a 16-bit transient
   (``_dequantize_kv_kernel``; ``KV_DEQUANT="in_kernel"`` instead unpacks K/V tiles inside the kernels below),
   then ``_attn_bwd_stats_kernel`` recomputes LSE' and ``delta' = rowsum(P' * dP')`` from K'/V', so the backward
   is the exact gradient of attention(q, K', V') (straight-through for dK/dV). Reusing the exact forward's LSE/O
   with quantized K/V makes gradient errors explode on outlier channels (see NOTES.md). ``kv_bits=16`` has no
   pre-pass.
4. ``_attn_bwd_dq_kernel``: one program per query head and query block (BLOCK_M rows), looping over the visible
   key blocks; with ``kv_bits=16`` it also forms ``delta = rowsum(dO * O)`` for the next kernel.
   ``_attn_bwd_dkdv_kernel``: one program per KV head and key block (BLOCK_N keys), looping over the query heads
   of its GQA group and the query blocks that can see the keys; short sequences split the group over several
   programs whose float32 partials ``_sum_partials_kernel`` adds (no atomics, deterministic). Both work in base 2
   (scale and log2(e) folded into one multiply before exp2), as the forward does.

Every kernel splits its loop into at most three ranges: blocks that need the causal/window/tail mask, the
unmasked middle, and masked blocks again; the unmasked middle is the bulk of the work and pays for no mask.

Where the kernels run: on CUDA tensors; on CPU tensors when ``TRITON_INTERPRET=1`` was set before this module
was imported (the test suite does that). Otherwise (CPU without the interpreter, or triton not importable) a
plain-torch implementation of the same math runs (float32, chunked over queries), and a warning is logged once.

Custom ops (traceable by torch.compile/AOTAutograd, no graph break):
``torch.ops.memgraph.attention(q, k, v, causal, scale, kv_bits, window, softcap) -> (out, lse, k_codes, k_meta,
v_codes, v_meta)`` is the forward (the packed tensors are empty when ``kv_bits=16``), and
``torch.ops.memgraph.attention_backward`` the backward, so AOTAutograd sees the packed K/V as the saved tensors.
They are registered with torch.library's low-level API, and in plain eager (ordinary CPU/CUDA tensors, no dispatch
mode, transform or tracer) ``attention()`` and the ops' autograd kernels run the implementation without another
trip through the dispatcher: host time matters at short sequences (see "Custom ops" below).
"""
import contextlib
import functools
import logging
import math
import os
import types
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from memgraph import _compat

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernels below are still defined (as plain functions) but never launched
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f),
                                   cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = [
    "attention",
    "attention_flops",
    "dequantize_kv",
    "packed_kv_shapes",
    "quantize_kv",
    "quantize_kv_reference",
    "reference_attention",
    "reference_quantized_grads",
    "saved_bytes",
    "visible_pairs",
    "SUPPORTED_HEAD_DIMS",
    "KV_BITS",
]

log = logging.getLogger("memgraph.kernels.attention")

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: tl.arange needs them; 16 is tl.dot's minimum
KV_BITS = (16, 8, 4)
K_GROUP_TOKENS = 32  # K: one (step, min) per channel per 32 tokens; per-channel groups survive outlier channels
V_GROUP_CHANNELS = 64  # V: one (step, min) per token per 64 channels (or the whole head when D < 64)
META_DTYPE = torch.float16  # step and minimum of a group; 2 x 2 bytes per group
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TORCH_FALLBACK_QUERY_CHUNK = 512  # query rows per step of the plain-torch path: bounds its S x S temporaries

# Module constants visible inside kernels (triton only lets jitted code read constexpr globals).
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the kernels work in base 2
LN2 = tl.constexpr(0.6931471805599453)
# Initial running max: finite, so that a row whose keys are all masked (only padding rows past the sequence end)
# gives exp2(-inf - NEG_LARGE) = 0 and exp2(NEG_LARGE - NEG_LARGE) = 1 instead of NaN.
NEG_LARGE = tl.constexpr(-1.0e30)
KG = tl.constexpr(K_GROUP_TOKENS)
VG = tl.constexpr(V_GROUP_CHANNELS)


# ------------------------------------------------------------------------------------------------------------
# Triton: shared helpers
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc) in float32. DOT_PRECISION "upcast" works around the triton 3.9 interpreter, whose tl.dot
    multiplies bfloat16's uint16 storage as integers: the operands are widened first (exact, same result)."""
    if DOT_PRECISION == "upcast":
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        result = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return result


@triton.jit
def _cast(x, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x.to(dtype). Under "upcast" (the interpreter with bfloat16) float32 -> bfloat16 is rounded to nearest even
    by hand: the triton 3.9 interpreter truncates there, the GPU rounds; this keeps CPU errors GPU-like."""
    if DOT_PRECISION == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(x):
    # tl.sigmoid exists in the interpreter and every triton >= 3.0; tanh(x) = 2 sigmoid(2x) - 1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _scores(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Logits in base-2 units from raw q.k, and tanh(scaled / softcap) (needed by the softcap derivative)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        t = qk
        s = qk * (scale * LOG2E)
    return s, t


@triton.jit
def _visible(q_idx, k_idx, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs attend; q_idx/k_idx are broadcastable index tiles (either orientation)."""
    vis = (k_idx < seq_len) & (q_idx < seq_len)
    if CAUSAL:
        vis = vis & (k_idx <= q_idx)
    if HAS_WINDOW:
        vis = vis & (k_idx > q_idx - window)
        if not CAUSAL:
            vis = vis & (k_idx < q_idx + window)
    return vis


@triton.jit
def _key_block_ranges(start_m, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by queries [start_m, start_m + BLOCK_M): [lo, full_lo) and [full_hi, hi) need masks,
    [full_lo, full_hi) is visible to every row (inside the sequence, causal and window satisfied)."""
    lo = 0
    hi = seq_len
    full_hi = (seq_len // BLOCK_N) * BLOCK_N  # blocks past this one run off the end of the sequence
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
        full_hi = tl.minimum(full_hi, ((start_m + 1) // BLOCK_N) * BLOCK_N)  # last key <= first query
    full_lo = lo
    if HAS_WINDOW:
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        # first key > last query - window
        full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N)
        if not CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M - 1 + window)
            full_hi = tl.minimum(full_hi, ((start_m + window) // BLOCK_N) * BLOCK_N)  # last key < first q + window
    full_lo = tl.minimum(full_lo, tl.cdiv(hi, BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_block_ranges(start_n, seq_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see keys [start_n, start_n + BLOCK_N), split like _key_block_ranges."""
    lo = 0
    hi = seq_len
    full_lo = 0
    full_hi = (seq_len // BLOCK_M) * BLOCK_M  # query rows past the end must be masked when loaded
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # first query >= last key
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 + window)
        full_hi = tl.minimum(full_hi, ((start_n + window) // BLOCK_M) * BLOCK_M)  # last query < first key + window
        if not CAUSAL:
            lo = (tl.maximum(start_n - window + 1, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - window, 0), BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(full_lo, lo)
    full_lo = tl.minimum(full_lo, tl.cdiv(hi, BLOCK_M) * BLOCK_M)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _load_rows(base, offs_rows, stride_row, offs_cols, seq_len, MASKED: tl.constexpr):
    """A [rows, cols] tile; rows past seq_len read as 0 when MASKED (only blocks at the sequence end need it)."""
    ptrs = base + offs_rows[:, None] * stride_row + offs_cols[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=(offs_rows < seq_len)[:, None], other=0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_codes(codes_base, offs_n, seq_len, MASKED: tl.constexpr, KV_BITS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Integer codes of a [BLOCK_N, HEAD_DIM] tile as float32. 4-bit: byte c holds channel 2c (low nibble)
    and channel 2c + 1 (high nibble)."""
    if KV_BITS == 8:
        raw = _load_rows(codes_base, offs_n, HEAD_DIM, tl.arange(0, HEAD_DIM), seq_len, MASKED)
        codes = raw.to(tl.float32)
    else:
        raw = _load_rows(codes_base, offs_n, HEAD_DIM // 2, tl.arange(0, HEAD_DIM // 2), seq_len, MASKED)
        low = (raw & 0xF).to(tl.float32)
        high = (raw >> 4).to(tl.float32)
        codes = tl.reshape(tl.join(low, high), (BLOCK_N, HEAD_DIM))
    return codes


@triton.jit
def _load_k(K, stride_ks, KC, KM, bhkv, start_n, seq_len, MASKED: tl.constexpr, KV_BITS: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """K tile [BLOCK_N, HEAD_DIM] (K points at this head's first row), dequantized when KV_BITS < 16."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if KV_BITS == 16:
        k = _load_rows(K, offs_n, stride_ks, offs_d, seq_len, MASKED)
    else:
        bh = bhkv.to(tl.int64)
        codes = _load_codes(KC + bh * seq_len * (HEAD_DIM * KV_BITS // 8), offs_n, seq_len, MASKED, KV_BITS,
                            HEAD_DIM, BLOCK_N)
        # One (step, min) row per K_GROUP_TOKENS tokens: load BLOCK_N // KG rows and broadcast them.
        num_groups = tl.cdiv(seq_len, KG)
        groups = start_n // KG + tl.arange(0, BLOCK_N // KG)
        meta = KM + (bh * num_groups + groups[:, None]) * (2 * HEAD_DIM) + offs_d[None, :]
        in_seq = (groups < num_groups)[:, None]
        step = tl.load(meta, mask=in_seq, other=0).to(tl.float32)
        low = tl.load(meta + HEAD_DIM, mask=in_seq, other=0).to(tl.float32)
        step = tl.reshape(tl.broadcast_to(step[:, None, :], (BLOCK_N // KG, KG, HEAD_DIM)), (BLOCK_N, HEAD_DIM))
        low = tl.reshape(tl.broadcast_to(low[:, None, :], (BLOCK_N // KG, KG, HEAD_DIM)), (BLOCK_N, HEAD_DIM))
        k = codes * step + low
    return k


@triton.jit
def _load_v(V, stride_vs, VC, VM, bhkv, start_n, seq_len, MASKED: tl.constexpr, KV_BITS: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """V tile [BLOCK_N, HEAD_DIM], dequantized when KV_BITS < 16 (one (step, min) per token per channel group)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if KV_BITS == 16:
        v = _load_rows(V, offs_n, stride_vs, offs_d, seq_len, MASKED)
    else:
        bh = bhkv.to(tl.int64)
        codes = _load_codes(VC + bh * seq_len * (HEAD_DIM * KV_BITS // 8), offs_n, seq_len, MASKED, KV_BITS,
                            HEAD_DIM, BLOCK_N)
        GROUP: tl.constexpr = VG if HEAD_DIM > VG else HEAD_DIM
        NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
        meta_base = VM + bh * seq_len * (2 * NUM_GROUPS)
        step = _load_rows(meta_base, offs_n, 2 * NUM_GROUPS, tl.arange(0, NUM_GROUPS), seq_len, MASKED)
        low = _load_rows(meta_base + NUM_GROUPS, offs_n, 2 * NUM_GROUPS, tl.arange(0, NUM_GROUPS), seq_len, MASKED)
        step = tl.reshape(tl.broadcast_to(step.to(tl.float32)[:, :, None], (BLOCK_N, NUM_GROUPS, GROUP)),
                          (BLOCK_N, HEAD_DIM))
        low = tl.reshape(tl.broadcast_to(low.to(tl.float32)[:, :, None], (BLOCK_N, NUM_GROUPS, GROUP)),
                         (BLOCK_N, HEAD_DIM))
        v = codes * step + low
    return v


# ------------------------------------------------------------------------------------------------------------
# Triton: K/V quantization (forward, kv_bits < 16)
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _quant_params(lo, hi, QMAX: tl.constexpr):
    """(step, min) rounded through fp16 exactly as they are stored, so codes are computed against stored values."""
    low = lo.to(tl.float16).to(tl.float32)
    step = ((hi - low) / QMAX).to(tl.float16).to(tl.float32)
    inv_step = tl.where(step > 0, 1.0 / tl.where(step > 0, step, 1.0), 0.0)  # a constant group codes to 0
    return step, low, inv_step


@triton.jit
def _codes_of(x, low, inv_step, QMAX: tl.constexpr):
    return tl.minimum(tl.maximum(tl.floor((x - low) * inv_step + 0.5), 0.0), QMAX)


@triton.jit
def _store_codes(codes_base, codes, offs_n, seq_len, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 ROWS: tl.constexpr):
    in_seq = (offs_n < seq_len)[:, None]
    if KV_BITS == 8:
        ptrs = codes_base + offs_n[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        tl.store(ptrs, codes.to(tl.uint8), mask=in_seq)
    else:
        even, odd = tl.split(tl.reshape(codes.to(tl.uint8), (ROWS, HEAD_DIM // 2, 2)))
        ptrs = codes_base + offs_n[:, None] * (HEAD_DIM // 2) + tl.arange(0, HEAD_DIM // 2)[None, :]
        tl.store(ptrs, even | (odd << 4), mask=in_seq)


@triton.jit
def _quantize_kv_kernel(K, V, KC, KM, VC, VM, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        num_kv_heads, seq_len, HEAD_DIM: tl.constexpr, KV_BITS: tl.constexpr):
    """One program per (batch * KV head, block of K_GROUP_TOKENS tokens): K per channel over the block, V per
    token per channel group; asymmetric min/max."""
    QMAX: tl.constexpr = (1 << KV_BITS) - 1
    block = tl.program_id(1)
    bhkv = tl.program_id(0)
    b = (bhkv // num_kv_heads).to(tl.int64)
    h = (bhkv % num_kv_heads).to(tl.int64)
    bh = bhkv.to(tl.int64)
    offs_n = block * KG + tl.arange(0, KG)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = (offs_n < seq_len)[:, None]
    codes_per_head = seq_len * (HEAD_DIM * KV_BITS // 8)

    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_ks, offs_d, seq_len, True).to(tl.float32)
    k_lo = tl.min(tl.where(in_seq, k, float("inf")), 0)
    k_hi = tl.max(tl.where(in_seq, k, float("-inf")), 0)
    step, low, inv_step = _quant_params(k_lo, k_hi, QMAX)
    codes = _codes_of(k, low[None, :], inv_step[None, :], QMAX)
    _store_codes(KC + bh * codes_per_head, codes, offs_n, seq_len, KV_BITS, HEAD_DIM, KG)
    meta = KM + (bh * tl.cdiv(seq_len, KG) + block) * (2 * HEAD_DIM) + offs_d
    tl.store(meta, step.to(tl.float16))
    tl.store(meta + HEAD_DIM, low.to(tl.float16))

    GROUP: tl.constexpr = VG if HEAD_DIM > VG else HEAD_DIM
    NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vs, offs_d, seq_len, True).to(tl.float32)
    v = tl.reshape(v, (KG, NUM_GROUPS, GROUP))
    step, low, inv_step = _quant_params(tl.min(v, 2), tl.max(v, 2), QMAX)
    codes = tl.reshape(_codes_of(v, low[:, :, None], inv_step[:, :, None], QMAX), (KG, HEAD_DIM))
    _store_codes(VC + bh * codes_per_head, codes, offs_n, seq_len, KV_BITS, HEAD_DIM, KG)
    offs_g = tl.arange(0, NUM_GROUPS)
    meta = VM + (bh * seq_len + offs_n[:, None]) * (2 * NUM_GROUPS) + offs_g[None, :]
    tl.store(meta, step.to(tl.float16), mask=in_seq)
    tl.store(meta + NUM_GROUPS, low.to(tl.float16), mask=in_seq)


# ------------------------------------------------------------------------------------------------------------
# Triton: forward
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, seq_len, scale, window,
              softcap, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the online softmax: rescale the running sum/accumulator to the new row max, add P V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(k_base, offs_n, stride_ks, offs_d, seq_len, MASKED)
    v = _load_rows(v_base, offs_n, stride_vs, offs_d, seq_len, MASKED)
    s, _ = _scores(_dot(q, tl.trans(k), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    if MASKED:
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, window, CAUSAL, HAS_WINDOW), s,
                     float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(_cast(p, v.dtype, DOT_PRECISION), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, num_heads, group, seq_len, scale, window, softcap,
                     seq_bucket, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """One program per (batch * query head, query block). seq_bucket is only an autotuning key."""
    bh = tl.program_id(0)
    # Causal rows near the end see the most keys: launch them first so the last wave is made of short ones.
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hkv = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qs, offs_d, seq_len, True)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, full_lo, full_hi, hi = _key_block_ranges(start_m, seq_len, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, seq_len,
                                  scale, window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION,
                                  BLOCK_N, True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, seq_len,
                                  scale, window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION,
                                  BLOCK_N, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, seq_len,
                                  scale, window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION,
                                  BLOCK_N, True)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only rows past the sequence end have no visible key
    row = bh.to(tl.int64) * seq_len
    in_seq = offs_m < seq_len
    tl.store(LSE + row + offs_m, (m_i + tl.log2(l_safe)) * LN2, mask=in_seq)
    out = _cast(acc / l_safe[:, None], O.dtype.element_ty, DOT_PRECISION)
    tl.store(O + (row + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], out, mask=in_seq[:, None])


# ------------------------------------------------------------------------------------------------------------
# Triton: backward pre-passes (kv_bits < 16 only: K'/V' dequantized once, then LSE' and delta')
# ------------------------------------------------------------------------------------------------------------
# kv_bits=16 has no pre-pass: delta = rowsum(dO * O) is formed by the dQ kernel, which loads dO anyway.
@triton.jit
def _dequantize_kv_kernel(KC, KM, VC, VM, K, V, seq_len, HEAD_DIM: tl.constexpr, KV_BITS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """K', V' as contiguous [B * Hkv, S, D] tensors in the compute dtype (KV_DEQUANT="prepass"): tile for tile
    what the in-kernel path builds (_load_k/_load_v, then the same cast), so both modes give the same gradients."""
    bhkv = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    out = (bhkv.to(tl.int64) * seq_len + offs_n[:, None]) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    in_seq = (offs_n < seq_len)[:, None]
    k = _load_k(KC, 0, KC, KM, bhkv, start_n, seq_len, True, KV_BITS, HEAD_DIM, BLOCK_N)
    tl.store(K + out, _cast(k, K.dtype.element_ty, DOT_PRECISION), mask=in_seq)
    v = _load_v(VC, 0, VC, VM, bhkv, start_n, seq_len, True, KV_BITS, HEAD_DIM, BLOCK_N)
    tl.store(V + out, _cast(v, V.dtype.element_ty, DOT_PRECISION), mask=in_seq)


@triton.jit
def _stats_step(m_i, l_i, u_i, q, do, K, V, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n, offs_m, seq_len,
                scale, window, softcap, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online logsumexp and u = sum_j p_ij dp_ij (unnormalised), with dequantized K', V'."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _cast(_load_k(K, stride_ks, KC, KM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    v = _cast(_load_v(V, stride_vs, VC, VM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    s, _ = _scores(_dot(q, tl.trans(k), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    if MASKED:
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, window, CAUSAL, HAS_WINDOW), s,
                     float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    u_i = u_i * alpha + tl.sum(p * dp, 1)
    return m_new, l_i, u_i


@triton.jit
def _attn_bwd_stats_kernel(Q, K, V, KC, KM, VC, VM, DO, LSE, DELTA, stride_qb, stride_qh, stride_qs, stride_kb,
                           stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_heads, group, seq_len, scale,
                           window, softcap, seq_bucket, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LSE' and delta' = rowsum(P' * dP') with P', dP' from the dequantized K', V' (kv_bits < 16).

    delta' is formed from the same dP = dO V'^T the dK/dV and dQ kernels compute, so rowsum(dS) = 0 holds to
    rounding: the backward is the exact gradient of attention with K', V'."""
    bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hkv = (h // group).to(tl.int64)
    bhkv = b * (num_heads // group) + hkv
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = bh.to(tl.int64) * seq_len
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qs, offs_d, seq_len, True)
    do = _load_rows(DO + row * HEAD_DIM, offs_m, HEAD_DIM, offs_d, seq_len, True)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    u_i = tl.zeros([BLOCK_M], tl.float32)
    lo, full_lo, full_hi, hi = _key_block_ranges(start_m, seq_len, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        m_i, l_i, u_i = _stats_step(m_i, l_i, u_i, q, do, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv,
                                    start_n, offs_m, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL,
                                    HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        m_i, l_i, u_i = _stats_step(m_i, l_i, u_i, q, do, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv,
                                    start_n, offs_m, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL,
                                    HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        m_i, l_i, u_i = _stats_step(m_i, l_i, u_i, q, do, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv,
                                    start_n, offs_m, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL,
                                    HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, True)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    in_seq = offs_m < seq_len
    tl.store(LSE + row + offs_m, (m_i + tl.log2(l_safe)) * LN2, mask=in_seq)
    tl.store(DELTA + row + offs_m, u_i / l_safe, mask=in_seq)


# ------------------------------------------------------------------------------------------------------------
# Triton: backward, dQ per query block
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n, offs_m, seq_len,
             scale, window, softcap, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Add one key block's share to dQ: P and dP recomputed from the saved LSE and delta, dQ += dS k."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _cast(_load_k(K, stride_ks, KC, KM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    v = _cast(_load_v(V, stride_vs, VC, VM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    s, t = _scores(_dot(q, tl.trans(k), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, window, CAUSAL, HAS_WINDOW), p, 0.0)
    dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(_cast(ds, k.dtype, DOT_PRECISION), k, dq, DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, KC, KM, VC, VM, O, DO, LSE, DELTA, DQ, stride_qb, stride_qh, stride_qs,
                        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_heads, group, seq_len,
                        scale, window, softcap, seq_bucket, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        DELTA_FROM_O: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """One program per (batch * query head, query block of BLOCK_M rows), looping over the visible key blocks of
    BLOCK_N keys (same ranges as the forward). DELTA_FROM_O (kv_bits=16): delta = rowsum(dO * O) is formed here
    and stored for the dK/dV kernel, which runs after this one; otherwise the stats pre-pass wrote it."""
    bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # causal: the longest rows first
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hkv = (h // group).to(tl.int64)
    bhkv = b * (num_heads // group) + hkv
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = bh.to(tl.int64) * seq_len
    in_seq = offs_m < seq_len
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qs, offs_d, seq_len, True)
    do = _load_rows(DO + row * HEAD_DIM, offs_m, HEAD_DIM, offs_d, seq_len, True)
    if DELTA_FROM_O:
        o = _load_rows(O + row * HEAD_DIM, offs_m, HEAD_DIM, offs_d, seq_len, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + row + offs_m, delta, mask=in_seq)
    else:
        delta = tl.load(DELTA + row + offs_m, mask=in_seq, other=0.0)
    lse2 = tl.load(LSE + row + offs_m, mask=in_seq, other=0.0) * LOG2E
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, full_lo, full_hi, hi = _key_block_ranges(start_m, seq_len, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n,
                      offs_m, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                      DOT_PRECISION, BLOCK_N, True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n,
                      offs_m, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                      DOT_PRECISION, BLOCK_N, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n,
                      offs_m, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                      DOT_PRECISION, BLOCK_N, True)
    dq = _cast(dq * scale, DQ.dtype.element_ty, DOT_PRECISION)
    tl.store(DQ + (row + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dq, mask=in_seq[:, None])


# ------------------------------------------------------------------------------------------------------------
# Triton: backward, dK/dV per key block
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qs, b, num_heads, head, start_m,
               offs_n, seq_len, scale, window, softcap, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """Add one query block's share (query head `head`, rows start_m + [0, BLOCK_M)) to dK, dV.

    Everything is computed on the key side, [keys, queries] tiles (s_t = k q^T, dp_t = v dO^T), so that the
    products dV += P^T dO and dK += dS^T q need no transposed register tiles."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = (b * num_heads + head) * seq_len
    q = _load_rows(Q + b * stride_qb + head * stride_qh, offs_m, stride_qs, offs_d, seq_len, MASKED)
    do = _load_rows(DO + row * HEAD_DIM, offs_m, HEAD_DIM, offs_d, seq_len, MASKED)
    if MASKED:
        in_seq = offs_m < seq_len
        lse2 = tl.load(LSE + row + offs_m, mask=in_seq, other=0.0) * LOG2E
        delta = tl.load(DELTA + row + offs_m, mask=in_seq, other=0.0)
    else:
        lse2 = tl.load(LSE + row + offs_m) * LOG2E
        delta = tl.load(DELTA + row + offs_m)
    # Base 2: the scale and log2(e) are folded into one multiply (an FMA with the LSE subtraction), then exp2.
    s_t, t_t = _scores(_dot(k, tl.trans(q), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED:
        p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], seq_len, window, CAUSAL, HAS_WINDOW), p_t, 0.0)
    dv = _dot(_cast(p_t, do.dtype, DOT_PRECISION), do, dv, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)  # d/dx of softcap * tanh(x / softcap)
    dk = _dot(_cast(ds_t, q.dtype, DOT_PRECISION), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["heads_per_program"])  # 4, 2 or 1 per split: one compiled kernel for all
def _attn_bwd_dkdv_kernel(Q, K, V, KC, KM, VC, VM, DO, LSE, DELTA, DK, DV, stride_qb, stride_qh, stride_qs,
                          stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_heads, num_kv_heads,
                          heads_per_program, seq_len, scale, window, softcap, seq_bucket, KV_BITS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """One program per (split, batch * KV head, key block of BLOCK_N keys). K and V of the block are loaded (and
    dequantized) once; the query blocks of `heads_per_program` heads of the GQA group stream past them, BLOCK_M
    rows per step. No atomics: with a split > 1 (see _dkdv_split) each split writes float32 partials that
    _sum_partials_kernel adds up."""
    num_splits = (num_heads // num_kv_heads) // heads_per_program
    pid = tl.program_id(0)
    split = pid % num_splits
    bhkv = pid // num_splits
    b = (bhkv // num_kv_heads).to(tl.int64)
    hkv = bhkv % num_kv_heads
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hkv.to(tl.int64) * stride_vh
    compute_dtype = Q.dtype.element_ty
    k = _load_k(k_base, stride_ks, KC, KM, bhkv, start_n, seq_len, True, KV_BITS, HEAD_DIM, BLOCK_N)
    v = _load_v(v_base, stride_vs, VC, VM, bhkv, start_n, seq_len, True, KV_BITS, HEAD_DIM, BLOCK_N)
    k = _cast(k, compute_dtype, DOT_PRECISION)
    v = _cast(v, compute_dtype, DOT_PRECISION)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Causal: only the query blocks crossing the diagonal (lo..full_lo) are masked; the rest run unmasked.
    lo, full_lo, full_hi, hi = _query_block_ranges(start_n, seq_len, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    first_head = (hkv * (num_heads // num_kv_heads) + split * heads_per_program).to(tl.int64)
    # Each range is one flat loop over (query head, query block) pairs: Triton software-pipelines innermost loops,
    # and one long loop keeps the pipeline full across the group's heads instead of draining at every head.
    blocks = (full_lo - lo) // BLOCK_M
    for i in range(0, heads_per_program * blocks):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qs, b, num_heads,
                            first_head + i // blocks, lo + (i % blocks) * BLOCK_M, offs_n, seq_len, scale, window,
                            softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, BLOCK_M, True)
    blocks = (full_hi - full_lo) // BLOCK_M
    for i in range(0, heads_per_program * blocks):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qs, b, num_heads,
                            first_head + i // blocks, full_lo + (i % blocks) * BLOCK_M, offs_n, seq_len, scale,
                            window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, BLOCK_M,
                            False)
    blocks = tl.cdiv(hi - full_hi, BLOCK_M)
    for i in range(0, heads_per_program * blocks):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qs, b, num_heads,
                            first_head + i // blocks, full_hi + (i % blocks) * BLOCK_M, offs_n, seq_len, scale,
                            window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, BLOCK_M,
                            True)
    out = ((split * (tl.num_programs(0) // num_splits) + bhkv).to(tl.int64) * seq_len + offs_n[:, None]) * HEAD_DIM
    out = out + offs_d[None, :]
    in_seq = (offs_n < seq_len)[:, None]
    tl.store(DK + out, _cast(dk * scale, DK.dtype.element_ty, DOT_PRECISION), mask=in_seq)
    tl.store(DV + out, _cast(dv, DV.dtype.element_ty, DOT_PRECISION), mask=in_seq)


@triton.jit
def _sum_partials_kernel(PARTS, DK, DV, numel, num_splits, DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    """dK, dV = the sums over splits of the float32 partials PARTS [2 (dK, dV), splits, numel], in DK's dtype.
    A fixed summation order: the result does not depend on which program finished first."""
    which = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    parts = PARTS + which.to(tl.int64) * num_splits * numel + offs
    total = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, num_splits):
        total += tl.load(parts, mask=in_range, other=0.0)
        parts += numel  # pointer arithmetic: 64-bit however large split x numel gets
    if which == 0:
        tl.store(DK + offs, _cast(total, DK.dtype.element_ty, DOT_PRECISION), mask=in_range)
    else:
        tl.store(DV + offs, _cast(total, DV.dtype.element_ty, DOT_PRECISION), mask=in_range)


# ------------------------------------------------------------------------------------------------------------
# Launch configurations: autotuned on CUDA, small fixed blocks under the interpreter
# ------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (16 and 32 use the 64 lists). BLOCK_M counts
# query rows, BLOCK_N keys, in every kernel. The first entry is the default when autotuning is off: for D=128 (and
# dK/dV at D=256) the fastest one measured on an H200 (benchmarks/results/attention_tuning.json, S=2048 and 8192,
# the same winner at both). How the entries were chosen, for Hopper (sm_90):
# * wgmma computes 64 rows per warpgroup (4 warps): the tile side that carries an MMA's rows (fwd/stats/dQ:
#   BLOCK_M, dK/dV: BLOCK_N) is 64 with 4 warps or 128 with 8 warps. The other side is the dK/dV step's BLOCK_M
#   (32 or 64 query rows: the K dimension of dV += P^T dO, too thin at 16) or dQ's BLOCK_N (32 or 64 keys).
# * Registers: the float32 accumulators ([rows, D]; dK/dV has two) take <= 128 registers per thread, so D=256
#   uses half the rows per warp (dK/dV: BLOCK_N=64 with 8 warps; dQ: 64 rows/4 warps or 128/8).
# * Shared memory (227 KiB per block on H100/H200): the tiles loaded once (dK/dV: K, V; fwd/stats/dQ: Q, dO)
#   plus num_stages copies of the streamed ones, counted to stay within ~192 KiB (room for layout-conversion
#   scratch). An entry that does not fit anyway is skipped by the autotuner and reported by the tuner.
# * BLOCK_N is a multiple of K_GROUP_TOKENS (the in-kernel dequantizing loads broadcast one K (step, min) row per
#   32 keys).
# The lists stay short (<= 8) so that `benchmarks/bench_attention.py --tune` times every entry within its budget
# and the autotuner's first call stays short; pin the winners from attention_tuning.json by reordering/pruning.
CONFIGS = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3)],
        128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 4),
              (128, 32, 8, 3), (128, 32, 8, 4)],
        256: [(64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
    },
    "stats": {
        64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
              (128, 32, 8, 4), (128, 64, 4, 3)],
        256: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 4, 5), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (128, 32, 8, 5), (64, 64, 4, 3),
              (64, 64, 4, 4), (64, 32, 4, 4)],
        256: [(128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 4)],
    },
    "dkdv": {
        64: [(32, 128, 4, 3), (32, 128, 4, 5), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
        128: [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 4), (32, 128, 8, 5), (64, 128, 8, 2), (32, 64, 4, 3),
              (32, 64, 4, 4), (64, 64, 4, 3)],
        256: [(32, 32, 4, 3), (32, 64, 8, 2), (32, 64, 8, 3), (32, 64, 8, 4), (64, 64, 8, 2), (16, 64, 8, 3),
              (64, 32, 4, 2)],
    },
}
AUTOTUNE = True  # False: each kernel runs its first config (fewer compiles; the benchmark's correctness check)
INTERPRETER_BLOCKS = {"fwd": (16, 32), "stats": (16, 32), "dq": (16, 32), "dkdv": (16, 32)}  # (M, N): small
AUTOTUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "DOT_PRECISION", "KV_BITS",
                "DELTA_FROM_O"]
# kv_bits < 16: "prepass" dequantizes K/V once per backward into a 16-bit K'/V' (a transient the size of dK + dV,
# freed when the backward returns) and runs the 16-bit kernels on it; "in_kernel" dequantizes every K/V tile inside
# the stats/dQ/dK-dV kernels (no transient, but each key block is unpacked again by every query block and head of
# the stats and dQ passes, and the packed loads cannot feed the MMAs straight from the async copy pipeline).
# Both compute identical gradients.
KV_DEQUANT = "prepass"
KV_DEQUANT_MODES = ("prepass", "in_kernel")
DEQUANT_BLOCK_N = 64  # tokens per program of the memory-bound dequantization pre-pass (a multiple of K_GROUP_TOKENS)
REDUCE_BLOCK = 1024  # elements per program of the memory-bound dK/dV partial sum
# dK/dV GQA split: enough (split x KV head x key block) programs per SM that the longest program (the first key
# block, causal) is not longer than an SM's share of the work; see _dkdv_split.
DKDV_TARGET_PROGRAMS_PER_SM = 1.75


def _config_list(kind: str, head_dim: int) -> list:
    return CONFIGS[kind][max(head_dim, 64)]


def _autotuned(kernel, kind: str):
    """The kernel wrapped in triton.autotune over CONFIGS[kind] (pruned to the head dim's list); None where
    there is no compiled triton (no triton, or the interpreter)."""
    if not HAS_TRITON or INTERPRET:
        return None
    every = list(dict.fromkeys(config for configs in CONFIGS[kind].values() for config in configs))

    def prune(configs, named_args, **kwargs):
        wanted = set(_config_list(kind, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    key = [name for name in AUTOTUNE_KEY if name in kernel.arg_names]
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every],
        key=key,
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


_KERNELS = {
    kind: (kernel, _autotuned(kernel, kind))
    for kind, kernel in (("fwd", _attn_fwd_kernel), ("stats", _attn_bwd_stats_kernel), ("dq", _attn_bwd_dq_kernel),
                         ("dkdv", _attn_bwd_dkdv_kernel))
}

# Tests set this to force a dK/dV split (GQA group divided across programs) on small problems.
_FORCE_DKDV_SPLIT: Optional[int] = None


def _launch(kind: str, grid, *args, config=None, **meta) -> None:
    """config=(BLOCK_M, BLOCK_N, num_warps, num_stages) runs exactly that config (the tuner). Otherwise: small
    fixed blocks under the interpreter; on CUDA autotuned, or the first config when AUTOTUNE is False."""
    kernel, tuned = _KERNELS[kind]
    if config is None and INTERPRET:
        config = (*INTERPRETER_BLOCKS[kind], 4, 1)  # warps and stages mean nothing to the interpreter
    elif config is None and not AUTOTUNE:
        config = _config_list(kind, meta["HEAD_DIM"])[0]
    if config is None:
        tuned[grid](*args, **meta)
    else:
        block_m, block_n, warps, stages = config
        kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# Host work per launch (up to 4 launches per fwd+bwd): the constexpr flags are built once per combination, and
# ceil-divisions and powers of two are plain integer arithmetic (triton.cdiv / triton.next_power_of_2 are
# ConstexprFunction wrappers costing ~2 µs per call from Python).
_FLAGS_CACHE: dict = {}


def _flags(q: Tensor, causal: bool, window: Optional[int], softcap: Optional[float]) -> dict:
    """The kernels' constexpr flags (a shared dict: callers unpack it, never mutate it)."""
    key = (q.shape[-1], bool(causal), window is not None, softcap is not None, q.dtype)
    flags = _FLAGS_CACHE.get(key)
    if flags is None:
        flags = _FLAGS_CACHE[key] = {
            "HEAD_DIM": q.shape[-1],
            "CAUSAL": bool(causal),
            "HAS_WINDOW": window is not None,
            "HAS_SOFTCAP": softcap is not None,
            "DOT_PRECISION": _dot_precision(q.dtype),
        }
    return flags


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _runtime(seq_len: int, scale: float, window: Optional[int], softcap: Optional[float]) -> tuple:
    """The kernels' runtime arguments after the shapes: seq_len, scale, window, softcap, seq_bucket."""
    return seq_len, scale, window or 0, softcap or 0.0, _seq_bucket(seq_len)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # true float32 products (the GPU default for float32 tl.dot is TF32)
    if INTERPRET and dtype == torch.bfloat16:
        return "upcast"  # see _dot
    return "tf32"  # ignored for 16-bit inputs


def _seq_bucket(seq_len: int) -> int:
    """The autotuning key's sequence bucket: max(next power of two >= seq_len, 64)."""
    return max(1 << (seq_len - 1).bit_length(), 64) if seq_len > 64 else 64


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


_SAME_DEVICE = contextlib.nullcontext()  # reusable: nullcontext keeps no state


def _device_guard(x: Tensor):
    """Triton launches on the current CUDA device: switch to x's GPU only when it is another one (the usual call
    then skips building, entering and leaving a torch.cuda.device, two device queries and sets each)."""
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _SAME_DEVICE


class _KV(NamedTuple):
    """K and V as the backward kernels read them: 16-bit tensors (bits=16) or the packed codes (bits 8/4)."""

    tensors: tuple  # (K, V, K codes, K meta, V codes, V meta); the unused ones repeat a valid tensor
    strides: tuple  # batch, head and sequence strides of K, then of V (zeros when packed)
    bits: int  # KV_BITS as the kernels see it
    heads: int


def _kv_16bit(k: Tensor, v: Tensor) -> _KV:
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _KV((k, v, k, k, k, k), (*k.stride()[:3], *v.stride()[:3]), 16, k.shape[1])


def _kv_packed(packed, bits: int) -> _KV:
    return _KV((packed[0], packed[0], *packed), (0,) * 6, bits, packed[0].shape[1])


def _kv_for_backward(packed, bits: int, dtype: torch.dtype, mode: Optional[str] = None) -> _KV:
    """What the kv_bits < 16 backward reads, by KV_DEQUANT mode."""
    mode = mode or KV_DEQUANT
    if mode not in KV_DEQUANT_MODES:
        raise ValueError(f"KV_DEQUANT must be one of {KV_DEQUANT_MODES}, got {mode!r}")
    if mode == "prepass":
        return _kv_16bit(*_dequantize_triton(packed, bits, dtype))
    return _kv_packed(packed, bits)


def _fwd_triton(q, k, v, causal, scale, window, softcap, config=None):
    batch, heads, seq_len, head_dim = q.shape
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    grid = lambda meta: (batch * heads, _cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    with _device_guard(q):
        _launch("fwd", grid, q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], heads,
                heads // k.shape[1], *_runtime(seq_len, scale, window, softcap), config=config,
                **_flags(q, causal, window, softcap))
    return out, lse


def _quantize_triton(k: Tensor, v: Tensor, bits: int):
    batch, kv_heads, seq_len, head_dim = k.shape
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    shapes = packed_kv_shapes(batch, kv_heads, seq_len, head_dim, bits)
    k_codes, k_meta, v_codes, v_meta = (
        torch.empty(shape, dtype=dtype, device=k.device) for shape, dtype in zip(shapes, _PACKED_DTYPES)
    )
    with _device_guard(k):
        _quantize_kv_kernel[(batch * kv_heads, _cdiv(seq_len, K_GROUP_TOKENS))](
            k, v, k_codes, k_meta, v_codes, v_meta, *k.stride()[:3], *v.stride()[:3], kv_heads, seq_len,
            HEAD_DIM=head_dim, KV_BITS=bits,
        )
    return k_codes, k_meta, v_codes, v_meta


def _dequantize_triton(packed, bits: int, dtype: torch.dtype):
    """(K', V') [B, Hkv, S, D] in dtype from the packed format (bit-identical to dequantize_kv(..., dtype))."""
    k_codes = packed[0]
    batch, kv_heads, seq_len, code_bytes = k_codes.shape
    head_dim = code_bytes * 8 // bits
    k = torch.empty((batch, kv_heads, seq_len, head_dim), dtype=dtype, device=k_codes.device)
    v = torch.empty_like(k)
    with _device_guard(k):
        _dequantize_kv_kernel[(batch * kv_heads, _cdiv(seq_len, DEQUANT_BLOCK_N))](
            *packed, k, v, seq_len, HEAD_DIM=head_dim, KV_BITS=bits, DOT_PRECISION=_dot_precision(dtype),
            BLOCK_N=DEQUANT_BLOCK_N)
    return k, v


def _launch_stats(q, kv: _KV, do, causal, scale, window, softcap, config=None):
    """(LSE', delta') from K'/V' (kv_bits < 16)."""
    batch, heads, seq_len, _ = q.shape
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    grid = lambda meta: (batch * heads, _cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    with _device_guard(q):
        _launch("stats", grid, q, *kv.tensors, do, lse, delta, *q.stride()[:3], *kv.strides, heads,
                heads // kv.heads, *_runtime(seq_len, scale, window, softcap), config=config, KV_BITS=kv.bits,
                **_flags(q, causal, window, softcap))
    return lse, delta


def _launch_dq(q, kv: _KV, out, do, lse, delta, causal, scale, window, softcap, config=None):
    """dQ. out given (kv_bits=16): the kernel also writes delta = rowsum(dO * O) into `delta` for dK/dV."""
    batch, heads, seq_len, head_dim = q.shape
    dq = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)
    grid = lambda meta: (batch * heads, _cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    with _device_guard(q):
        _launch("dq", grid, q, *kv.tensors, do if out is None else out, do, lse, delta, dq, *q.stride()[:3],
                *kv.strides, heads, heads // kv.heads, *_runtime(seq_len, scale, window, softcap), config=config,
                KV_BITS=kv.bits, DELTA_FROM_O=out is not None, **_flags(q, causal, window, softcap))
    return dq


def _launch_dkdv(q, kv: _KV, do, lse, delta, split, causal, scale, window, softcap, config=None):
    """(dK, dV); split > 1 divides each GQA group over `split` programs and sums their float32 partials."""
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch, kv.heads, seq_len, head_dim)
    dk = torch.empty(shape, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    parts = None if split == 1 else torch.empty((2, split, *shape), dtype=torch.float32, device=q.device)
    targets = (dk, dv) if split == 1 else (parts[0], parts[1])
    grid = lambda meta: (split * batch * kv.heads, _cdiv(seq_len, meta["BLOCK_N"]))  # noqa: E731
    flags = _flags(q, causal, window, softcap)
    with _device_guard(q):
        _launch("dkdv", grid, q, *kv.tensors, do, lse, delta, *targets, *q.stride()[:3], *kv.strides, heads,
                kv.heads, heads // kv.heads // split, *_runtime(seq_len, scale, window, softcap), config=config,
                KV_BITS=kv.bits, **flags)
        if split > 1:
            numel = dk.numel()
            _sum_partials_kernel[(_cdiv(numel, REDUCE_BLOCK), 2)](
                parts, dk, dv, numel, split, DOT_PRECISION=flags["DOT_PRECISION"], BLOCK=REDUCE_BLOCK)
    return dk, dv


def _dkdv_split(batch: int, kv_heads: int, group: int, seq_len: int, head_dim: int, device: torch.device) -> int:
    """How many programs share one KV head's query heads (1 = no float32 partials, no reduction).

    Why: a dK/dV program's work is (query blocks that see its keys) x (heads it loops over); causal, the first key
    block's programs are the longest, twice the average. The kernel takes at least max(longest program, total
    work / SMs), and the longest program is at most the per-SM share once there are 2 programs per SM. Splitting
    the group by s divides the longest program by s, but writes and re-reads 2 s float32 copies of dK/dV.
    H100/H200 (132 SMs), Llama-3-8B (B=1, Hkv=8, group 4), D=128, BLOCK_N=128: S=2048 has 8 x 16 = 128 programs,
    the longest twice an SM's share: split 2 gives 256 (1.94 per SM; 33 MB of partials written and read again,
    ~20 us); split 4 would double that traffic to even out the last 3%, hence a target of 1.75 programs per SM
    rather than 2. S=8192 has 512 programs: no split. `bench_attention.py --tune` times splits 1, 2 and 4."""
    if _FORCE_DKDV_SPLIT is not None:
        return _FORCE_DKDV_SPLIT if group % _FORCE_DKDV_SPLIT == 0 else 1
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    block_n = _config_list("dkdv", head_dim)[0][1]  # the usual key block for this head dim
    programs = batch * kv_heads * _cdiv(seq_len, block_n)
    split = 1
    while programs * split < DKDV_TARGET_PROGRAMS_PER_SM * sms and group % (split * 2) == 0:
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_triton(do, q, k, v, out, lse, packed, causal, scale, kv_bits, window, softcap, kv_heads):
    """(dq, dk, dv). kv_bits=16: dQ (forming delta), then dK/dV; no pre-pass. kv_bits < 16: K'/V' (KV_DEQUANT),
    the stats pre-pass (LSE', delta' from K'/V'), dQ, dK/dV."""
    batch, heads, seq_len, head_dim = q.shape
    q = _last_dim_contiguous(q)
    do = do.contiguous()
    options = (causal, scale, window, softcap)
    if kv_bits == 16:
        kv = _kv_16bit(k, v)
        out = out.contiguous()
        delta = torch.empty_like(lse)  # written by the dQ kernel
    else:
        kv = _kv_for_backward(packed, kv_bits, q.dtype)
        lse, delta = _launch_stats(q, kv, do, *options)
        out = None
    dq = _launch_dq(q, kv, out, do, lse, delta, *options)
    split = _dkdv_split(batch, kv_heads, heads // kv_heads, seq_len, head_dim, q.device)
    dk, dv = _launch_dkdv(q, kv, do, lse, delta, split, *options)
    return dq, dk, dv


TUNED_KINDS = ("fwd", "stats", "dq", "dkdv", "dequant")


def kernel_runner(kind: str, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, *, kv_bits: int = 16,
                  kv_dequant: Optional[str] = None, dkdv_split: int = 1, causal: bool = True,
                  scale: Optional[float] = None, window: Optional[int] = None, softcap: Optional[float] = None,
                  exact_inputs: bool = True):
    """run(config=None) -> outputs, launching only the kernel `kind` (one of TUNED_KINDS) with config =
    (BLOCK_M, BLOCK_N, num_warps, num_stages) from CONFIGS[kind] ("dequant" has none): for
    ``benchmarks/bench_attention.py --tune``, which times each kernel alone.

    The kernel's inputs from earlier steps (O, LSE, packed K/V, K'/V', LSE', delta) are prepared once, as the op
    does (each earlier kernel with its first config); exact_inputs=False leaves them as zeros (compile-only runs).
    kv_bits < 16 runs the kernels the given kv_dequant mode runs ("stats" and "dq" see K'/V' with "prepass");
    "dkdv" includes the partial sum when dkdv_split > 1."""
    if kind not in TUNED_KINDS:
        raise ValueError(f"kernel_runner: kind must be one of {TUNED_KINDS}, got {kind!r}")
    batch, heads, seq_len, head_dim = q.shape
    options = (causal, q.shape[-1] ** -0.5 if scale is None else scale, window, softcap)
    q, do = _last_dim_contiguous(q), grad_out.contiguous()
    if kind == "fwd":
        return lambda config=None: _fwd_triton(q, k, v, *options, config=config)
    prep = lambda name: None if INTERPRET else _config_list(name, head_dim)[0]  # noqa: E731 (no autotuning)
    if exact_inputs:
        out, lse = _fwd_triton(q, k, v, *options, config=prep("fwd"))
        packed = _quantize_triton(k, v, kv_bits) if kv_bits < 16 else None
    else:
        out = torch.zeros_like(q)
        lse = torch.zeros((batch, heads, seq_len), dtype=torch.float32, device=q.device)
        shapes = packed_kv_shapes(batch, k.shape[1], seq_len, head_dim, kv_bits) if kv_bits < 16 else ()
        packed = tuple(torch.zeros(shape, dtype=dtype, device=q.device) for shape, dtype in zip(shapes, _PACKED_DTYPES))
    if kind == "dequant":
        if kv_bits == 16:
            raise ValueError("kernel_runner: kv_bits=16 has no dequantization")
        return lambda config=None: _dequantize_triton(packed, kv_bits, q.dtype)
    if kv_bits == 16:
        if kind == "stats":
            raise ValueError("kernel_runner: kv_bits=16 has no stats pass")
        kv = _kv_16bit(k, v)
        delta = torch.zeros_like(lse)
        if exact_inputs and kind == "dkdv":
            _launch_dq(q, kv, out, do, lse, delta, *options, config=prep("dq"))  # fills delta
    else:
        kv = _kv_for_backward(packed, kv_bits, q.dtype, kv_dequant)
        if kind == "stats":
            return lambda config=None: _launch_stats(q, kv, do, *options, config=config)
        if exact_inputs:
            lse, delta = _launch_stats(q, kv, do, *options, config=prep("stats"))
        else:
            delta = torch.zeros_like(lse)
        out = None
    if kind == "dq":
        return lambda config=None: _launch_dq(q, kv, out, do, lse, delta, *options, config=config)
    return lambda config=None: _launch_dkdv(q, kv, do, lse, delta, dkdv_split, *options, config=config)


# ------------------------------------------------------------------------------------------------------------
# Packed K/V format and the plain-torch implementation (fallback and reference)
# ------------------------------------------------------------------------------------------------------------
_PACKED_DTYPES = (torch.uint8, META_DTYPE, torch.uint8, META_DTYPE)


def _v_group(head_dim: int) -> int:
    return min(V_GROUP_CHANNELS, head_dim)


def packed_kv_shapes(batch, kv_heads, seq_len, head_dim, bits: int):
    """Shapes of (k_codes, k_meta, v_codes, v_meta); works with SymInts. Meta [..., 0, :] = step, [..., 1, :] = min."""
    code_bytes = head_dim * bits // 8
    k_groups = (seq_len + K_GROUP_TOKENS - 1) // K_GROUP_TOKENS
    return (
        (batch, kv_heads, seq_len, code_bytes),
        (batch, kv_heads, k_groups, 2, head_dim),
        (batch, kv_heads, seq_len, code_bytes),
        (batch, kv_heads, seq_len, 2, head_dim // _v_group(head_dim)),
    )


def _quant_params_torch(lo: Tensor, hi: Tensor, qmax: int):
    low = lo.to(META_DTYPE).float()
    step = ((hi - low) / qmax).to(META_DTYPE).float()
    inv_step = torch.where(step > 0, 1.0 / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(step))
    return step, low, inv_step


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_codes(packed: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return packed.float()
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).float()


def quantize_kv_reference(k: Tensor, v: Tensor, bits: int):
    """Plain-torch quantization into the kernels' packed format (bit-identical to ``_quantize_kv_kernel``)."""
    batch, kv_heads, seq_len, head_dim = k.shape
    qmax = (1 << bits) - 1
    groups = -(-seq_len // K_GROUP_TOKENS)
    pad = groups * K_GROUP_TOKENS - seq_len
    kf = k.float()
    k_lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(
        batch, kv_heads, groups, K_GROUP_TOKENS, head_dim).amin(3)
    k_hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(
        batch, kv_heads, groups, K_GROUP_TOKENS, head_dim).amax(3)
    k_step, k_low, k_inv = _quant_params_torch(k_lo, k_hi, qmax)
    per_token = lambda x: x.repeat_interleave(K_GROUP_TOKENS, dim=2)[:, :, :seq_len]  # noqa: E731
    k_codes = torch.clamp(torch.floor((kf - per_token(k_low)) * per_token(k_inv) + 0.5), 0, qmax)
    k_meta = torch.stack((k_step, k_low), dim=3).to(META_DTYPE)

    group = _v_group(head_dim)
    vf = v.float().view(batch, kv_heads, seq_len, head_dim // group, group)
    v_step, v_low, v_inv = _quant_params_torch(vf.amin(-1), vf.amax(-1), qmax)
    v_codes = torch.clamp(torch.floor((vf - v_low[..., None]) * v_inv[..., None] + 0.5), 0, qmax)
    v_meta = torch.stack((v_step, v_low), dim=3).to(META_DTYPE)
    return (_pack_codes(k_codes, bits).contiguous(), k_meta.contiguous(),
            _pack_codes(v_codes.flatten(-2), bits).contiguous(), v_meta.contiguous())


def dequantize_kv(k_codes: Tensor, k_meta: Tensor, v_codes: Tensor, v_meta: Tensor, bits: int,
                  dtype: torch.dtype = torch.float32):
    """(K', V') from the packed format, computed in float32 then cast (the kernels cast to the input dtype)."""
    seq_len = k_codes.shape[2]
    k_step = k_meta[:, :, :, 0].float().repeat_interleave(K_GROUP_TOKENS, dim=2)[:, :, :seq_len]
    k_low = k_meta[:, :, :, 1].float().repeat_interleave(K_GROUP_TOKENS, dim=2)[:, :, :seq_len]
    k_deq = _unpack_codes(k_codes, bits) * k_step + k_low
    head_dim = k_deq.shape[-1]
    group = _v_group(head_dim)
    v_step = v_meta[:, :, :, 0].float().repeat_interleave(group, dim=-1)
    v_low = v_meta[:, :, :, 1].float().repeat_interleave(group, dim=-1)
    v_deq = _unpack_codes(v_codes, bits) * v_step + v_low
    return k_deq.to(dtype), v_deq.to(dtype)


def _visible_torch(rows: Tensor, cols: Tensor, causal: bool, window: Optional[int]) -> Tensor:
    vis = torch.ones(rows.shape[0], cols.shape[0], dtype=torch.bool, device=rows.device)
    i, j = rows[:, None], cols[None, :]
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
        if not causal:
            vis &= j < i + window
    return vis


def _scores_torch(q: Tensor, k: Tensor, scale: float, softcap: Optional[float]):
    """Natural-log logits and tanh (for the softcap derivative); q [B, Hkv, G, M, D], k [B, Hkv, N, D]."""
    x = torch.einsum("bhgmd,bhnd->bhgmn", q, k) * scale
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, t


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    batch, heads, seq_len, head_dim = x.shape
    return x.view(batch, kv_heads, heads // kv_heads, seq_len, head_dim)


def _torch_forward(q, k, v, causal, scale, window, softcap):
    """Plain-torch forward in float32, chunked over queries; returns (out in q.dtype, lse float32)."""
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    qf, kf, vf = _grouped(q.float(), kv_heads), k.float(), v.float()
    out = torch.empty(qf.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(qf.shape[:-1], dtype=torch.float32, device=q.device)
    cols = torch.arange(seq_len, device=q.device)
    for start in range(0, seq_len, TORCH_FALLBACK_QUERY_CHUNK):
        rows = cols[start:start + TORCH_FALLBACK_QUERY_CHUNK]
        s, _ = _scores_torch(qf[:, :, :, rows], kf, scale, softcap)
        s = s.masked_fill(~_visible_torch(rows, cols, causal, window), float("-inf"))
        lse[:, :, :, rows] = torch.logsumexp(s, dim=-1)
        out[:, :, :, rows] = torch.einsum("bhgmn,bhnd->bhgmd", torch.exp(s - lse[:, :, :, rows, None]), vf)
    return out.view(q.shape).to(q.dtype), lse.view(batch, heads, seq_len)


def _torch_backward(do, q, k, v, out, lse, causal, scale, window, softcap):
    """Plain-torch backward in float32. k/v are the (dequantized) K/V; out/lse None = recompute LSE and delta
    from them (the quantized scheme), else delta = rowsum(dO * O) and the forward's LSE."""
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    qf, dof, kf, vf = _grouped(q.float(), kv_heads), _grouped(do.float(), kv_heads), k.float(), v.float()
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    cols = torch.arange(seq_len, device=q.device)
    for start in range(0, seq_len, TORCH_FALLBACK_QUERY_CHUNK):
        rows = cols[start:start + TORCH_FALLBACK_QUERY_CHUNK]
        s, t = _scores_torch(qf[:, :, :, rows], kf, scale, softcap)
        s = s.masked_fill(~_visible_torch(rows, cols, causal, window), float("-inf"))
        do_rows = dof[:, :, :, rows]
        dp = torch.einsum("bhgmd,bhnd->bhgmn", do_rows, vf)
        if lse is None:
            p = torch.softmax(s, dim=-1)
            delta = (p * dp).sum(-1)
        else:
            p = torch.exp(s - _grouped(lse[..., None], kv_heads)[:, :, :, rows])
            delta = (do_rows * _grouped(out.float(), kv_heads)[:, :, :, rows]).sum(-1)
        ds = p * (dp - delta[..., None])
        if t is not None:
            ds = ds * (1 - t * t)
        dq[:, :, :, rows] = torch.einsum("bhgmn,bhnd->bhgmd", ds, kf) * scale
        dk += torch.einsum("bhgmn,bhgmd->bhnd", ds, qf[:, :, :, rows]) * scale
        dv += torch.einsum("bhgmn,bhgmd->bhnd", p, do_rows)
    return dq.view(q.shape).to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
                        window: Optional[int] = None, softcap: Optional[float] = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """Differentiable plain-torch attention computed in ``dtype`` (float64 for tests); GQA by repeating K/V."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    x = qd @ kd.transpose(-1, -2) * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    positions = torch.arange(q.shape[2], device=q.device)
    x = x.masked_fill(~_visible_torch(positions, positions, causal, window), float("-inf"))
    return torch.softmax(x, dim=-1) @ vd


def reference_quantized_grads(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, *, kv_bits: int,
                              causal: bool = True, scale: Optional[float] = None, window: Optional[int] = None,
                              softcap: Optional[float] = None, dtype: torch.dtype = torch.float64):
    """(dQ, dK, dV) of the quantized scheme: the exact gradient of attention(q, K', V') with K', V' the
    dequantized K/V (cast to the input dtype, as the kernels do), passed straight through to K and V."""
    k_deq, v_deq = dequantize_kv(*quantize_kv_reference(k, v, kv_bits), kv_bits, dtype=k.dtype)
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k_deq, v_deq)]
    out = reference_attention(*leaves, causal=causal, scale=scale, window=window, softcap=softcap, dtype=dtype)
    return torch.autograd.grad(out, leaves, grad_out.to(dtype))


# ------------------------------------------------------------------------------------------------------------
# Dispatch: Triton (CUDA, or the interpreter) or plain torch
# ------------------------------------------------------------------------------------------------------------
def _use_triton(x: Tensor) -> bool:
    if not HAS_TRITON:
        _log_fallback_once("triton is not importable")
        return False
    if x.is_cuda or INTERPRET:
        return True
    _log_fallback_once(f"tensors are on {x.device.type} and TRITON_INTERPRET=1 was not set before import")
    return False


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    log.warning("memgraph.attention: %s; running the plain-torch implementation (same math, float32, slower)",
                reason)


def quantize_kv(k: Tensor, v: Tensor, bits: int):
    """Pack K and V into (k_codes, k_meta, v_codes, v_meta) with the Triton kernel or its torch twin."""
    if bits not in (8, 4):
        raise ValueError(f"quantize_kv: bits must be 8 or 4, got {bits}")
    if _use_triton(k):
        return _quantize_triton(k, v, bits)
    return quantize_kv_reference(k, v, bits)


def _check(q: Tensor, k: Tensor, v: Tensor, kv_bits: int, window: Optional[int], softcap: Optional[float]):
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


def _empty_packed(q: Tensor):
    return tuple(torch.empty(0, dtype=dtype, device=q.device) for dtype in _PACKED_DTYPES)


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
            "SymInt? window=None, float? softcap=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("attention_backward(Tensor grad_out, Tensor q, Tensor? k, Tensor? v, Tensor? out, Tensor? lse, "
            "Tensor? k_codes, Tensor? k_meta, Tensor? v_codes, Tensor? v_meta, bool causal, float? scale, "
            "SymInt kv_bits, SymInt? window, float? softcap) -> (Tensor, Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_ATTENTION = torch.ops.memgraph.attention.default
_ATTENTION_BACKWARD = torch.ops.memgraph.attention_backward.default


def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: Optional[float], kv_bits: int,
             window: Optional[int], softcap: Optional[float]):
    """The forward op's work on checked arguments: (out, lse, k_codes, k_meta, v_codes, v_meta)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _use_triton(q):
        out, lse = _fwd_triton(q, k, v, causal, scale, window, softcap)
    else:
        out, lse = _torch_forward(q, k, v, causal, scale, window, softcap)
    packed = _empty_packed(q) if kv_bits == 16 else quantize_kv(k, v, kv_bits)
    # Contiguous, as the fake impl promises: Inductor asserts the strides it was told (q may arrive transposed).
    return (out.contiguous(), lse.contiguous(), *packed)


def _attention_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None,
                    kv_bits: int = 16, window: Optional[int] = None, softcap: Optional[float] = None):
    """(out, lse, k_codes, k_meta, v_codes, v_meta); the packed four are empty when kv_bits=16."""
    _check(q, k, v, kv_bits, window, softcap)
    return _forward(q, k, v, causal, scale, kv_bits, window, softcap)


def _attention_backward_impl(grad_out: Tensor, q: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                             out: Optional[Tensor], lse: Optional[Tensor], k_codes: Optional[Tensor],
                             k_meta: Optional[Tensor], v_codes: Optional[Tensor], v_meta: Optional[Tensor],
                             causal: bool, scale: Optional[float], kv_bits: int, window: Optional[int],
                             softcap: Optional[float]):
    """(dq, dk, dv). kv_bits=16 reads k, v, out, lse; kv_bits<16 reads only q and the packed K/V."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = (k_codes, k_meta, v_codes, v_meta)
    kv_heads = k.shape[1] if kv_bits == 16 else k_codes.shape[1]
    if _use_triton(q):
        grads = _bwd_triton(grad_out, q, k, v, out, lse, packed, causal, scale, kv_bits, window, softcap, kv_heads)
    elif kv_bits == 16:
        grads = _torch_backward(grad_out, q, k, v, out, lse, causal, scale, window, softcap)
    else:
        k_deq, v_deq = dequantize_kv(*packed, kv_bits, dtype=q.dtype)
        grads = _torch_backward(grad_out, q, k_deq, v_deq, None, None, causal, scale, window, softcap)
    dq, dk, dv = grads
    # The fake impl's strides (see _forward); the kernels' outputs are fresh contiguous tensors already.
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


_LIB.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_LIB.impl("attention_backward", _attention_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("memgraph::attention")
def _attention_fake(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None):
    batch, heads, seq_len, head_dim = q.shape
    out = q.new_empty((batch, heads, seq_len, head_dim))
    lse = q.new_empty((batch, heads, seq_len), dtype=torch.float32)
    if kv_bits == 16:
        return (out, lse, *(q.new_empty((0,), dtype=dtype) for dtype in _PACKED_DTYPES))
    shapes = packed_kv_shapes(batch, k.shape[1], seq_len, head_dim, kv_bits)
    return (out, lse, *(q.new_empty(shape, dtype=dtype) for shape, dtype in zip(shapes, _PACKED_DTYPES)))


@torch.library.register_fake("memgraph::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, k_codes, k_meta, v_codes, v_meta, causal, scale, kv_bits,
                             window, softcap):
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
    def forward(ctx, q, k, v, options, direct):
        # options = (causal, scale, kv_bits, window, softcap): one argument, so apply() tracks 5 inputs, not 9.
        causal, scale, kv_bits, window, softcap = options
        if direct:  # arguments already checked by the caller
            outputs = _forward(q, k, v, causal, scale, kv_bits, window, softcap)
        else:
            with _compat.below_autograd():
                outputs = _ATTENTION(q, k, v, causal, scale, kv_bits, window, softcap)
        out, lse, k_codes, k_meta, v_codes, v_meta = outputs
        if kv_bits == 16:
            ctx.save_for_backward(q, k, v, out, lse)
        else:
            # Only q and the packed K/V: no bf16 K or V, no O, no LSE (the backward recomputes LSE' and delta').
            ctx.save_for_backward(q, k_codes, k_meta, v_codes, v_meta)
        ctx.mark_non_differentiable(lse, k_codes, k_meta, v_codes, v_meta)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the five non-differentiable outputs
        ctx.options = options
        ctx.direct = direct
        return outputs

    @staticmethod
    def backward(ctx, grad_out, *_unused_grads):
        causal, scale, kv_bits, window, softcap = ctx.options
        if kv_bits == 16:
            q, k, v, out, lse = ctx.saved_tensors
            packed = (None, None, None, None)
        else:
            q, *packed = ctx.saved_tensors
            k = v = out = lse = None
        if grad_out is None:  # the output was not used: every gradient is zero
            grad_out = torch.zeros_like(q)
        args = (grad_out, q, k, v, out, lse, *packed, causal, scale, kv_bits, window, softcap)
        if torch.is_grad_enabled():  # create_graph=True: the gradients get the op's autograd history
            dq, dk, dv = _ATTENTION_BACKWARD(*args)
        # Backward has its own context (a mode may be entered between forward and backward).
        elif ctx.direct and _compat.plain_dispatch_context() and _compat.plain_tensors(grad_out):
            dq, dk, dv = _attention_backward_impl(*args)
        else:
            with _compat.below_autograd():
                dq, dk, dv = _ATTENTION_BACKWARD(*args)
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None


def _attention_autograd(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None):
    """memgraph.attention's Autograd-key kernel (the op called through the dispatcher)."""
    direct = _compat.plain_dispatch_context() and _compat.plain_tensors(q, k, v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if direct:
            _check(q, k, v, kv_bits, window, softcap)
        return _AttentionFunction.apply(q, k, v, (causal, scale, kv_bits, window, softcap), direct)
    if direct:
        return _attention_impl(q, k, v, causal, scale, kv_bits, window, softcap)
    with _compat.below_autograd():
        return _ATTENTION(q, k, v, causal, scale, kv_bits, window, softcap)


class _AttentionBackwardFunction(torch.autograd.Function):
    """memgraph.attention_backward under create_graph=True: its gradients have history, and backpropagating
    through them raises (as custom_op did for an op without an autograd formula) instead of autograd's fallback
    warning and returning wrong gradients."""

    @staticmethod
    def forward(ctx, *args):
        with _compat.below_autograd():
            return _ATTENTION_BACKWARD(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("Trying to backward through memgraph.attention_backward.default but no autograd formula "
                           "was registered: memgraph.attention has no double backward")


def _attention_backward_autograd(*args):
    """memgraph.attention_backward's Autograd-key kernel. Compiled backward graphs call the op with grad mode
    off: in plain eager that runs the implementation directly, as the forward op's kernel does."""
    if torch.is_grad_enabled():
        for tensor in args[:10]:
            if tensor is not None and tensor.requires_grad:
                return _AttentionBackwardFunction.apply(*args)
    if _compat.plain_dispatch_context() and _compat.plain_tensors(*args[:10]):
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


def saved_bytes(batch, heads, kv_heads, seq_len, head_dim, *, kv_bits=16, dtype=torch.bfloat16) -> int:
    """Bytes the op keeps for backward: kv_bits=16: q, k, v, out, lse; kv_bits<16: q + packed K/V."""
    element = torch.empty((), dtype=dtype).element_size()
    q_bytes = batch * heads * seq_len * head_dim * element
    if kv_bits == 16:
        return 2 * q_bytes + 2 * batch * kv_heads * seq_len * head_dim * element + batch * heads * seq_len * 4
    sizes = packed_kv_shapes(batch, kv_heads, seq_len, head_dim, kv_bits)
    packed = sum(math.prod(shape) * torch.empty((), dtype=d).element_size() for shape, d in zip(sizes, _PACKED_DTYPES))
    return q_bytes + packed


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
              kv_bits: int = 16, window: Optional[int] = None, softcap: Optional[float] = None) -> Tensor:
    """Fused attention; q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D] in q's dtype.

    kv_bits=8 or 4 keeps K/V for backward in that many bits (the output is exact; gradients are those of
    attention with the dequantized K/V). See the module docstring for window, softcap and the packed format."""
    _check(q, k, v, kv_bits, window, softcap)
    traced = torch.compiler.is_compiling() or has_torch_function((q, k, v))
    if not traced and _compat.plain_dispatch_context() and _compat.plain_tensors(q, k, v):
        # Plain eager (see "autograd" above): what the dispatcher would run, without entering it. Dynamo and torch
        # function modes/subclasses get the op through the dispatcher.
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _AttentionFunction.apply(q, k, v, (causal, scale, kv_bits, window, softcap), True)[0]
        return _forward(q, k, v, causal, scale, kv_bits, window, softcap)[0]
    return _ATTENTION(q, k, v, causal, scale, kv_bits, window, softcap)[0]
