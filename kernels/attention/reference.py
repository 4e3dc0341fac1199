"""memgraph.attention in plain torch: the fallback where Triton cannot run (CPU without the interpreter) and the
references the tests compare the kernels with. Float32 (or float64 for references), chunked over queries so
the S x S temporaries stay bounded."""
from typing import Optional

import torch
from torch import Tensor

from memgraph.kernels.kv_quant import dequantize_kv, quantize_kv_reference

TORCH_FALLBACK_QUERY_CHUNK = 512  # query rows per step of the plain-torch path: bounds its S x S temporaries


def visible_mask(rows: Tensor, cols: Tensor, causal: bool, window: Optional[int]) -> Tensor:
    """[rows, cols] bool: which (query, key) pairs the causal / sliding-window pattern lets through."""
    vis = torch.ones(rows.shape[0], cols.shape[0], dtype=torch.bool, device=rows.device)
    i, j = rows[:, None], cols[None, :]
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
        if not causal:
            vis &= j < i + window
    return vis


def segment_mask(rows: Tensor, cols: Tensor, segments) -> Optional[Tensor]:
    """[B, rows, cols] bool: query i and key j share a segment (q_segments[b, i] == k_segments[b, j]); None
    without segments."""
    if segments is None:
        return None
    q_segments, k_segments = segments
    return q_segments[:, rows, None] == k_segments[:, None, cols]


def _pair_mask(rows: Tensor, cols: Tensor, causal: bool, window: Optional[int], segments) -> Tensor:
    """Which pairs attend, shaped to broadcast over grouped scores [B, Hkv, G, rows, cols]."""
    vis = visible_mask(rows, cols, causal, window)
    by_segment = segment_mask(rows, cols, segments)
    return vis if by_segment is None else (vis & by_segment)[:, None, None]


def _softmax_stats(s: Tensor) -> Tensor:
    """logsumexp over keys, with rows that see no key at +inf: exp(s - lse) is then 0 there (output and gradients
    0, as SDPA gives a boolean mask's fully masked row) instead of NaN."""
    lse = torch.logsumexp(s, dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


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


def torch_forward(q, k, v, causal, scale, window, softcap, segments=None):
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
        s = s.masked_fill(~_pair_mask(rows, cols, causal, window, segments), float("-inf"))
        lse[:, :, :, rows] = _softmax_stats(s)
        out[:, :, :, rows] = torch.einsum("bhgmn,bhnd->bhgmd", torch.exp(s - lse[:, :, :, rows, None]), vf)
    return out.view(q.shape).to(q.dtype), lse.view(batch, heads, seq_len)


def torch_backward(do, q, k, v, out, lse, causal, scale, window, softcap, segments=None):
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
        s = s.masked_fill(~_pair_mask(rows, cols, causal, window, segments), float("-inf"))
        do_rows = dof[:, :, :, rows]
        dp = torch.einsum("bhgmd,bhnd->bhgmn", do_rows, vf)
        if lse is None:
            p = torch.exp(s - _softmax_stats(s)[..., None])
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
                        q_segments: Optional[Tensor] = None, k_segments: Optional[Tensor] = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """Differentiable plain-torch attention computed in ``dtype`` (float64 for tests); GQA by repeating K/V.
    A row that sees no key (segments) gives 0, with zero gradients."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    x = qd @ kd.transpose(-1, -2) * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    positions = torch.arange(q.shape[2], device=q.device)
    vis = visible_mask(positions, positions, causal, window)
    if q_segments is not None:
        vis = (vis & segment_mask(positions, positions, (q_segments, k_segments)))[:, None]
    sees_any = vis.any(-1, keepdim=True)
    # Rows that see nothing softmax over zeros (finite) and are then zeroed: no NaN in values or gradients.
    x = x.masked_fill(~vis, float("-inf")).masked_fill(~sees_any, 0.0)
    return (torch.softmax(x, dim=-1) * sees_any) @ vd


def reference_quantized_grads(q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, *, kv_bits: int,
                              causal: bool = True, scale: Optional[float] = None, window: Optional[int] = None,
                              softcap: Optional[float] = None, q_segments: Optional[Tensor] = None,
                              k_segments: Optional[Tensor] = None, dtype: torch.dtype = torch.float64):
    """(dQ, dK, dV) of the quantized scheme: the exact gradient of attention(q, K', V') with K', V' the
    dequantized K/V (cast to the input dtype, as the kernels do), passed straight through to K and V."""
    k_deq, v_deq = dequantize_kv(*quantize_kv_reference(k, v, kv_bits), kv_bits, dtype=k.dtype)
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k_deq, v_deq)]
    out = reference_attention(*leaves, causal=causal, scale=scale, window=window, softcap=softcap,
                              q_segments=q_segments, k_segments=k_segments, dtype=dtype)
    return torch.autograd.grad(out, leaves, grad_out.to(dtype))
