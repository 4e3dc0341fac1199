"""The packed K/V format of ``memgraph.attention`` with ``kv_bits`` 8 or 4: the data type, its shapes, and
plain-torch quantization and dequantization (the reference the Triton kernels are bit-identical to).

K is quantized per channel over blocks of ``K_GROUP_TOKENS`` tokens, V per token over groups of
``V_GROUP_CHANNELS`` channels; asymmetric min/max, fp16 step and minimum, two 4-bit codes per byte. Per-channel
K groups survive outlier channels (see NOTES.md). Importing this module needs torch only (``Options`` reads
``KV_BITS`` from it without loading Triton).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KV_BITS", "K_GROUP_TOKENS", "V_GROUP_CHANNELS", "META_DTYPE", "PACKED_DTYPES", "packed_kv_shapes",
           "quantize_kv_reference", "dequantize_kv"]

KV_BITS = (16, 8, 4)  # 16 = the exact K/V (nothing packed)
K_GROUP_TOKENS = 32  # K: one (step, min) per channel per 32 tokens; per-channel groups survive outlier channels
V_GROUP_CHANNELS = 64  # V: one (step, min) per token per 64 channels (or the whole head when D < 64)
META_DTYPE = torch.float16  # step and minimum of a group; 2 x 2 bytes per group
PACKED_DTYPES = (torch.uint8, META_DTYPE, torch.uint8, META_DTYPE)  # k_codes, k_meta, v_codes, v_meta

def v_group(head_dim: int) -> int:
    """Channels per V group."""
    return min(V_GROUP_CHANNELS, head_dim)


def packed_kv_shapes(batch, kv_heads, seq_len, head_dim, bits: int):
    """Shapes of (k_codes, k_meta, v_codes, v_meta); works with SymInts. Meta [..., 0, :] = step, [..., 1, :] = min."""
    code_bytes = head_dim * bits // 8
    k_groups = (seq_len + K_GROUP_TOKENS - 1) // K_GROUP_TOKENS
    return (
        (batch, kv_heads, seq_len, code_bytes),
        (batch, kv_heads, k_groups, 2, head_dim),
        (batch, kv_heads, seq_len, code_bytes),
        (batch, kv_heads, seq_len, 2, head_dim // v_group(head_dim)),
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

    group = v_group(head_dim)
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
    group = v_group(head_dim)
    v_step = v_meta[:, :, :, 0].float().repeat_interleave(group, dim=-1)
    v_low = v_meta[:, :, :, 1].float().repeat_interleave(group, dim=-1)
    v_deq = _unpack_codes(v_codes, bits) * v_step + v_low
    return k_deq.to(dtype), v_deq.to(dtype)

