"""memgraph.attention's Triton kernels, top to bottom as the data flows: shared helpers, K/V quantization
(forward, kv_bits < 16), the forward, the backward pre-passes (kv_bits < 16: K'/V' dequantized once, then LSE'
and delta'), dQ per query block, dK/dV per key block (and the sum of their split partials).

See ``__init__.py`` for how the pieces fit; ``launch.py`` launches these kernels; every constant a kernel reads
is named below (triton only lets jitted code read constexpr globals).
"""
import types

from memgraph.kernels._dispatch import HAS_TRITON
from memgraph.kernels.kv_quant import K_GROUP_TOKENS, V_GROUP_CHANNELS

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the kernels below are still defined (as plain functions) but never launched
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f),
                                   cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

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
def _visible(q_idx, k_idx, seq_len, window, q_seg, k_seg, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_SEGMENTS: tl.constexpr):
    """Which (query, key) pairs attend; q_idx/k_idx (and the segment ids q_seg/k_seg, when HAS_SEGMENTS) are
    broadcastable tiles (either orientation)."""
    vis = (k_idx < seq_len) & (q_idx < seq_len)
    if HAS_SEGMENTS:
        vis = vis & (q_seg == k_seg)
    if CAUSAL:
        vis = vis & (k_idx <= q_idx)
    if HAS_WINDOW:
        vis = vis & (k_idx > q_idx - window)
        if not CAUSAL:
            vis = vis & (k_idx < q_idx + window)
    return vis


# Segment tables (QSEG, KSEG): int32 [B, 3, S]. Row 0: each position's segment id. Rows 1 and 2: the span
# [lo, hi) of positions on the other side that can share its segment (QSEG: keys per query, KSEG: queries per key),
# a superset the kernels use to skip whole blocks; the element-wise test on the ids decides.
@triton.jit
def _segments(SEG, b, offs, seq_len, HAS_SEGMENTS: tl.constexpr):
    """Segment ids of positions offs of batch row b; without segments, offs itself (unused)."""
    if HAS_SEGMENTS:
        seg = tl.load(SEG + b * (3 * seq_len) + offs, mask=offs < seq_len, other=-1)
    else:
        seg = offs
    return seg


@triton.jit
def _segment_span(SEG, b, offs, seq_len, HAS_SEGMENTS: tl.constexpr):
    """[lo, hi): the other side's positions any of positions offs can see by segment (everything without)."""
    lo = 0
    hi = seq_len
    if HAS_SEGMENTS:
        row = SEG + b * (3 * seq_len) + offs
        lo = tl.min(tl.load(row + seq_len, mask=offs < seq_len, other=seq_len), 0)
        hi = tl.max(tl.load(row + 2 * seq_len, mask=offs < seq_len, other=0), 0)
    return lo, hi


@triton.jit
def _key_block_ranges(start_m, seq_len, window, span_lo, span_hi, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    if HAS_SEGMENTS:  # blocks outside the rows' segment span are skipped; the rest take the masked path
        lo = tl.maximum(lo, (span_lo // BLOCK_N) * BLOCK_N)
        hi = tl.maximum(tl.minimum(hi, span_hi), lo)
        full_lo = lo
        full_hi = lo
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_block_ranges(start_n, seq_len, window, span_lo, span_hi, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    if HAS_SEGMENTS:
        lo = tl.maximum(lo, (span_lo // BLOCK_M) * BLOCK_M)
        hi = tl.maximum(tl.minimum(hi, span_hi), lo)
        full_lo = lo
        full_hi = lo
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
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, q_seg, KSEG, b, seq_len,
              scale, window, softcap, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the online softmax: rescale the running sum/accumulator to the new row max, add P V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(k_base, offs_n, stride_ks, offs_d, seq_len, MASKED)
    v = _load_rows(v_base, offs_n, stride_vs, offs_d, seq_len, MASKED)
    s, _ = _scores(_dot(q, tl.trans(k), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    if MASKED:
        k_seg = _segments(KSEG, b, offs_n, seq_len, HAS_SEGMENTS)
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, window, q_seg[:, None], k_seg[None, :],
                              CAUSAL, HAS_WINDOW, HAS_SEGMENTS), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(_cast(p, v.dtype, DOT_PRECISION), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, QSEG, KSEG, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, num_heads, group, seq_len, scale, window, softcap,
                     seq_bucket, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch * query head, query block). seq_bucket is only an autotuning key. With segments
    (QSEG, KSEG: [B, S] int32) query i sees key j only where QSEG[b, i] == KSEG[b, j]; a row that sees no key
    gets output 0 (as SDPA gives a boolean mask's fully masked row)."""
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
    q_seg = _segments(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    span_lo, span_hi = _segment_span(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
    lo, full_lo, full_hi, hi = _key_block_ranges(start_m, seq_len, window, span_lo, span_hi, CAUSAL, HAS_WINDOW,
                                                 HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, q_seg,
                                  KSEG, b, seq_len, scale, window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                  HAS_SEGMENTS, DOT_PRECISION, BLOCK_N, True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, q_seg,
                                  KSEG, b, seq_len, scale, window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                  HAS_SEGMENTS, DOT_PRECISION, BLOCK_N, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_m, q_seg,
                                  KSEG, b, seq_len, scale, window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                  HAS_SEGMENTS, DOT_PRECISION, BLOCK_N, True)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past the sequence end (or masked whole by segments) see no key
    row = bh.to(tl.int64) * seq_len
    in_seq = offs_m < seq_len
    # A row that sees no key stores LSE = +inf: the backward's exp2(s - LSE) is then 0 for it, whatever s is.
    tl.store(LSE + row + offs_m, tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * LN2, float("inf")), mask=in_seq)
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
def _stats_step(m_i, l_i, u_i, q, do, K, V, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n, offs_m, q_seg,
                KSEG, b, seq_len, scale, window, softcap, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr):
    """Online logsumexp and u = sum_j p_ij dp_ij (unnormalised), with dequantized K', V'."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _cast(_load_k(K, stride_ks, KC, KM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    v = _cast(_load_v(V, stride_vs, VC, VM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    s, _ = _scores(_dot(q, tl.trans(k), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    if MASKED:
        k_seg = _segments(KSEG, b, offs_n, seq_len, HAS_SEGMENTS)
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, window, q_seg[:, None], k_seg[None, :],
                              CAUSAL, HAS_WINDOW, HAS_SEGMENTS), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    u_i = u_i * alpha + tl.sum(p * dp, 1)
    return m_new, l_i, u_i


@triton.jit
def _attn_bwd_stats_kernel(Q, K, V, KC, KM, VC, VM, DO, LSE, DELTA, QSEG, KSEG, stride_qb, stride_qh, stride_qs,
                           stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_heads, group, seq_len,
                           scale, window, softcap, seq_bucket, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
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
    q_seg = _segments(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    u_i = tl.zeros([BLOCK_M], tl.float32)
    span_lo, span_hi = _segment_span(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
    lo, full_lo, full_hi, hi = _key_block_ranges(start_m, seq_len, window, span_lo, span_hi, CAUSAL, HAS_WINDOW,
                                                 HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        m_i, l_i, u_i = _stats_step(m_i, l_i, u_i, q, do, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv,
                                    start_n, offs_m, q_seg, KSEG, b, seq_len, scale, window, softcap, KV_BITS,
                                    HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION, BLOCK_N,
                                    True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        m_i, l_i, u_i = _stats_step(m_i, l_i, u_i, q, do, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv,
                                    start_n, offs_m, q_seg, KSEG, b, seq_len, scale, window, softcap, KV_BITS,
                                    HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION, BLOCK_N,
                                    False)
    for start_n in range(full_hi, hi, BLOCK_N):
        m_i, l_i, u_i = _stats_step(m_i, l_i, u_i, q, do, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv,
                                    start_n, offs_m, q_seg, KSEG, b, seq_len, scale, window, softcap, KV_BITS,
                                    HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION, BLOCK_N,
                                    True)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    in_seq = offs_m < seq_len
    tl.store(LSE + row + offs_m, tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * LN2, float("inf")), mask=in_seq)
    tl.store(DELTA + row + offs_m, u_i / l_safe, mask=in_seq)


# ------------------------------------------------------------------------------------------------------------
# Triton: backward, dQ per query block
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(dq, q, do, lse2, delta, K, V, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n, offs_m, q_seg, KSEG,
             b, seq_len, scale, window, softcap, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Add one key block's share to dQ: P and dP recomputed from the saved LSE and delta, dQ += dS k."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _cast(_load_k(K, stride_ks, KC, KM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    v = _cast(_load_v(V, stride_vs, VC, VM, bhkv, start_n, seq_len, MASKED, KV_BITS, HEAD_DIM, BLOCK_N), q.dtype,
              DOT_PRECISION)
    s, t = _scores(_dot(q, tl.trans(k), None, DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        k_seg = _segments(KSEG, b, offs_n, seq_len, HAS_SEGMENTS)
        p = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, window, q_seg[:, None], k_seg[None, :],
                              CAUSAL, HAS_WINDOW, HAS_SEGMENTS), p, 0.0)
    dp = _dot(do, tl.trans(v), None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(_cast(ds, k.dtype, DOT_PRECISION), k, dq, DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, KC, KM, VC, VM, O, DO, LSE, DELTA, DQ, QSEG, KSEG, stride_qb, stride_qh, stride_qs,
                        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_heads, group, seq_len,
                        scale, window, softcap, seq_bucket, KV_BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        HAS_SEGMENTS: tl.constexpr, DELTA_FROM_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    q_seg = _segments(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    span_lo, span_hi = _segment_span(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
    lo, full_lo, full_hi, hi = _key_block_ranges(start_m, seq_len, window, span_lo, span_hi, CAUSAL, HAS_WINDOW,
                                                 HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n,
                      offs_m, q_seg, KSEG, b, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL, HAS_WINDOW,
                      HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION, BLOCK_N, True)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n,
                      offs_m, q_seg, KSEG, b, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL, HAS_WINDOW,
                      HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION, BLOCK_N, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, KC, KM, VC, VM, bhkv, start_n,
                      offs_m, q_seg, KSEG, b, seq_len, scale, window, softcap, KV_BITS, HEAD_DIM, CAUSAL, HAS_WINDOW,
                      HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION, BLOCK_N, True)
    dq = _cast(dq * scale, DQ.dtype.element_ty, DOT_PRECISION)
    tl.store(DQ + (row + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dq, mask=in_seq[:, None])


# ------------------------------------------------------------------------------------------------------------
# Triton: backward, dK/dV per key block
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, QSEG, k_seg, stride_qb, stride_qh, stride_qs, b, num_heads, head,
               start_m, offs_n, seq_len, scale, window, softcap, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
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
        q_seg = _segments(QSEG, b, offs_m, seq_len, HAS_SEGMENTS)
        p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], seq_len, window, q_seg[None, :], k_seg[:, None],
                                CAUSAL, HAS_WINDOW, HAS_SEGMENTS), p_t, 0.0)
    dv = _dot(_cast(p_t, do.dtype, DOT_PRECISION), do, dv, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)  # d/dx of softcap * tanh(x / softcap)
    dk = _dot(_cast(ds_t, q.dtype, DOT_PRECISION), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["heads_per_program"])  # 4, 2 or 1 per split: one compiled kernel for all
def _attn_bwd_dkdv_kernel(Q, K, V, KC, KM, VC, VM, DO, LSE, DELTA, DK, DV, QSEG, KSEG, stride_qb, stride_qh, stride_qs,
                          stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, num_heads, num_kv_heads,
                          heads_per_program, seq_len, scale, window, softcap, seq_bucket, KV_BITS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    k_seg = _segments(KSEG, b, offs_n, seq_len, HAS_SEGMENTS)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Causal: only the query blocks crossing the diagonal (lo..full_lo) are masked; the rest run unmasked.
    span_lo, span_hi = _segment_span(KSEG, b, offs_n, seq_len, HAS_SEGMENTS)
    lo, full_lo, full_hi, hi = _query_block_ranges(start_n, seq_len, window, span_lo, span_hi, CAUSAL, HAS_WINDOW,
                                                   HAS_SEGMENTS, BLOCK_M, BLOCK_N)
    first_head = (hkv * (num_heads // num_kv_heads) + split * heads_per_program).to(tl.int64)
    # Each range is one flat loop over (query head, query block) pairs: Triton software-pipelines innermost loops,
    # and one long loop keeps the pipeline full across the group's heads instead of draining at every head.
    blocks = (full_lo - lo) // BLOCK_M
    for i in range(0, heads_per_program * blocks):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, QSEG, k_seg, stride_qb, stride_qh, stride_qs, b, num_heads,
                            first_head + i // blocks, lo + (i % blocks) * BLOCK_M, offs_n, seq_len, scale, window,
                            softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION,
                            BLOCK_M, True)
    blocks = (full_hi - full_lo) // BLOCK_M
    for i in range(0, heads_per_program * blocks):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, QSEG, k_seg, stride_qb, stride_qh, stride_qs, b, num_heads,
                            first_head + i // blocks, full_lo + (i % blocks) * BLOCK_M, offs_n, seq_len, scale,
                            window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION,
                            BLOCK_M, False)
    blocks = tl.cdiv(hi - full_hi, BLOCK_M)
    for i in range(0, heads_per_program * blocks):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, QSEG, k_seg, stride_qb, stride_qh, stride_qs, b, num_heads,
                            first_head + i // blocks, full_hi + (i % blocks) * BLOCK_M, offs_n, seq_len, scale,
                            window, softcap, HEAD_DIM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_SEGMENTS, DOT_PRECISION,
                            BLOCK_M, True)
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
