"""16-bit attention through torch's cuDNN SDPA kernels where they compute exactly what memgraph.attention does.

``aten._scaled_dot_product_cudnn_attention`` and its backward take GQA K/V as they are (no repeated heads) and
return O and the natural-log LSE, as our forward does. They apply to CUDA tensors in bfloat16/float16 with a head
dim of 64, 128 or 256, causal or not, without a sliding window, softcap or segments, unless deterministic
algorithms are requested (ours are deterministic) or the backward's workspace would exceed MAX_WORKSPACE_BYTES.
There they run faster than our Triton kernels (H100, ``benchmarks/results/attention_cudnn_probe.json``: 1.25x
forward and 1.4x backward for Llama-3-8B at 8192 tokens). What they do not replace: the K/V quantization and the
kv_bits < 16 backward (dequantized K'/V', recomputed statistics), which only our kernels do.

Both forwards return the same O and LSE (LSE as ``[B, H, S]`` float32), so either forward pairs with either
backward. The backward hands cuDNN contiguous tensors only: given an O laid out unlike Q it returned wrong dQ/dK
without an error. A cuDNN error (an unsupported shape, an old cuDNN) switches this path off for the process with
one logged warning, and the Triton kernels run instead; out-of-memory and CUDA errors propagate.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from memgraph import _compat
from memgraph.kernels._dispatch import persistent_tensor

log = logging.getLogger("memgraph.kernels.attention")

# False (or MEMGRAPH_ATTENTION_CUDNN=0 in the environment): every attention runs the Triton kernels
ENABLED = os.environ.get("MEMGRAPH_ATTENTION_CUDNN", "1") != "0"
CUDNN_DTYPES = (torch.bfloat16, torch.float16)
CUDNN_HEAD_DIMS = (64, 128, 256)
# cuDNN's backward allocates a workspace (see backward_workspace_bytes): 256 MiB for Llama-3-8B at 8192 tokens,
# 3.1 GiB at 100k. Above this bound the Triton kernels (no such workspace) run, forward and backward alike, so the
# longest sequence a card trains is what it was.
MAX_WORKSPACE_BYTES = 512 * 2**20
_ACCELERATOR_ERRORS = tuple(e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)  # torch 2.8+
_disabled_reason: Optional[str] = None


def backward_workspace_bytes(batch, heads: int, kv_heads: int, seq_len, head_dim: int):
    """Bytes cuDNN's backward allocates besides dQ/dK/dV (measured on an H100, torch 2.11, cuDNN 9: 64, 256 and
    224 MiB for 32/8 heads at 2048 and 8192 tokens and 28/4 at 8192, D=128; 128 MiB for 16/16 heads, D=256): a
    float32 dQ accumulator, and with grouped K/V a 16-bit dK and dV per query head before the group sum."""
    per_query_head = batch * heads * seq_len * head_dim
    return per_query_head * 4 + (per_query_head * 2 * 2 if heads != kv_heads else 0)


def _workspace_fits(q: Tensor, k: Tensor) -> bool:
    batch, heads, seq_len, head_dim = (_compat.concrete_int(n) for n in q.shape)
    return backward_workspace_bytes(batch, heads, _compat.concrete_int(k.shape[1]), seq_len,
                                    head_dim) <= MAX_WORKSPACE_BYTES


def applies(q: Tensor, k: Tensor, v: Tensor, window: Optional[int], softcap: Optional[float], segments) -> bool:
    """Whether the cuDNN kernels compute this attention (see the module docstring). Off where the user turned
    cuDNN or its SDPA backend off (``torch.backends.cudnn.enabled``, ``sdpa_kernel``) or asked for deterministic
    algorithms (ours are deterministic)."""
    return (ENABLED and _disabled_reason is None and q.is_cuda and q.dtype in CUDNN_DTYPES
            and q.shape[-1] in CUDNN_HEAD_DIMS and window is None and softcap is None and segments is None
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and _workspace_fits(q, k)
            and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
            and torch.backends.cuda.cudnn_sdp_enabled() and not torch.are_deterministic_algorithms_enabled())


def failed(error: RuntimeError) -> None:
    """Handle ``error`` from a cuDNN call: out of memory and CUDA errors propagate (they are not about cuDNN's
    support, and a broken context must not run more kernels); anything else switches the path off."""
    if isinstance(error, (torch.OutOfMemoryError, *_ACCELERATOR_ERRORS)):
        raise error
    disable(error)


def disabled_reason() -> Optional[str]:
    """Why an earlier call switched the path off in this process (None: it is on)."""
    return _disabled_reason


def disable(error: BaseException) -> None:
    """Switch the path off for this process after ``error`` (the caller then runs the Triton kernels)."""
    global _disabled_reason
    _disabled_reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    log.warning("memgraph.attention: cuDNN attention failed (%s); running the Triton kernels from now on",
                _disabled_reason)


def forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, S, D], lse [B, H, S] float32, natural log)."""
    outputs = torch.ops.aten._scaled_dot_product_cudnn_attention.default(
        q, k, v, None, True, 0.0, causal, False, scale=scale)
    return outputs[0], outputs[1].reshape(q.shape[:3])


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the attention whose O and LSE are ``out`` and ``lse`` (from either forward); dropout 0."""
    seq_len = q.shape[2]
    seed = offset = _unused_random_state(q.device)
    # Every tensor contiguous: measured on an H100, an O whose layout differs from Q's (e.g. Q in HF's [B, S, H, D]
    # storage, O contiguous) gives wrong dQ and dK without any error. The LSE as cuDNN's forward returns it
    # ([B, H, S, 1]); no bias and no cumulative lengths (not a varlen batch).
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default(
        grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.unsqueeze(-1),
        seed, offset, None, None, None, seq_len, seq_len, 0.0, causal, scale=scale)


@functools.lru_cache(maxsize=None)
def _unused_random_state(device: torch.device) -> Tensor:
    """The dropout seed/offset argument (a 0-d int64, as the forward returns it): read by no kernel at p = 0."""
    return persistent_tensor(lambda: torch.zeros((), dtype=torch.int64, device=device), device)
