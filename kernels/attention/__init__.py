"""Fused attention whose backward keeps K/V in 4 (or 8) bits: Triton kernels, custom ops, FLOP formulas, references.

    out = attention(q, k, v, causal=True, scale=None, kv_bits=16, window=None, softcap=None,
                    q_segments=None, k_segments=None)

q is ``[B, Hq, S, D]``, k and v are ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query head ``h`` reads
KV head ``h // (Hq // Hkv)``, the order HF's ``repeat_kv`` produces). ``window=W`` (Mistral-style sliding window)
lets query ``i`` see key ``j`` only when ``i - W < j`` (and ``j < i + W`` when not causal): the W most recent
keys, itself included. ``softcap=c`` (Gemma-2 style) replaces each scaled logit ``x`` by ``c * tanh(x / c)``.
``q_segments``/``k_segments`` ([B, S] integers) restrict query ``i`` to keys ``j`` with ``q_segments[b, i] ==
k_segments[b, j]``: padded batches (``padding_segments(attention_mask)``: keys at padding get a segment no query
has) and packed ones (``packed_segments(position_ids)``: one segment per sequence), with no S x S mask. The kernels
then mask every block element-wise (they skip no block by segment); a row that sees no key gives 0.

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

Where each piece lives (one concern per file, as Liger-Kernel's ``ops/``): ``triton_kernels.py`` (the Triton
kernels), ``launch.py`` (configurations and launchers), ``reference.py`` (plain torch: fallback and test
reference), ``op.py`` (checks, custom ops, autograd, FLOP formulas, ``attention()``), ``cudnn.py`` (the
16-bit forward and backward on torch's cuDNN SDPA kernels where they compute the same thing), and the packed
K/V data type in ``memgraph/kernels/kv_quant.py``; the Triton-or-torch choice is
``memgraph/kernels/_dispatch.py``'s, shared with the NF4 ops.

Custom ops (traceable by torch.compile/AOTAutograd, no graph break):
``torch.ops.memgraph.attention(q, k, v, causal, scale, kv_bits, window, softcap) -> (out, lse, k_codes, k_meta,
v_codes, v_meta)`` is the forward (the packed tensors are empty when ``kv_bits=16``), and
``torch.ops.memgraph.attention_backward`` the backward, so AOTAutograd sees the packed K/V as the saved tensors.
They are registered with torch.library's low-level API, and in plain eager (ordinary CPU/CUDA tensors, no dispatch
mode, transform or tracer) ``attention()`` and the ops' autograd kernels run the implementation without another
trip through the dispatcher: host time matters at short sequences (see "Custom ops" below).
"""
from memgraph.kernels.attention.op import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, attention, attention_flops,
                                           packed_segments, padding_segments, quantize_kv, saved_bytes,
                                           visible_pairs)
from memgraph.kernels.attention.reference import reference_attention, reference_quantized_grads, visible_mask
from memgraph.kernels.kv_quant import KV_BITS, META_DTYPE, dequantize_kv, packed_kv_shapes, quantize_kv_reference

__all__ = [
    "attention", "attention_flops", "dequantize_kv", "packed_segments", "padding_segments", "packed_kv_shapes",
    "quantize_kv", "quantize_kv_reference",
    "reference_attention", "reference_quantized_grads", "saved_bytes", "visible_pairs", "visible_mask",
    "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "KV_BITS", "META_DTYPE",
]
