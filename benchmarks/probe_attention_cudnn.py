"""The 16-bit attention kernels side by side on one GPU: memgraph's Triton kernels against torch's cuDNN SDPA ops
(``aten._scaled_dot_product_cudnn_attention`` and its backward, GQA K/V as they are) and flash attention (K/V
repeated to every query head, dK/dV summed back), at the reference models' attention shapes. Checks what
``memgraph.kernels.attention.cudnn`` relies on, and times it.

    python benchmarks/probe_attention_cudnn.py        # writes attention_cudnn_probe.json

Per shape (batch, query heads, KV heads, seq, head dim; causal, bfloat16, q/k/v in HF's [B, S, H, D] storage):
* ``*_fwd_ms`` / ``*_bwd_ms``: median of 10 CUDA-event timings after 3 warm-ups (Triton: each kernel's first,
  tuned config, no autotuning); ``cudnn_contig_*``: cuDNN on contiguous q/k/v/O/dO.
* ``cudnn_out_maxdiff``, ``cudnn_lse_maxdiff``, ``cudnn_grad_maxdiff`` (dq, dk, dv): largest absolute difference
  from the Triton kernels (``grad_scale``: the largest |gradient|, for scale); ``cudnn_contig_grad_maxdiff``
  likewise with contiguous tensors; ``cudnn_bwd_from_triton_fwd_maxdiff``: cuDNN's backward given the Triton
  forward's contiguous O and LSE while q stays in HF's layout (the case ``cudnn.backward`` avoids by making every
  tensor contiguous).
* ``cudnn_bwd_scratch_mib`` / ``triton_bwd_scratch_mib``: the backward's peak allocation above what was allocated
  before it, outputs included.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402

SHAPES = [(1, 32, 8, 2048, 128), (1, 32, 8, 8192, 128), (1, 16, 16, 8192, 256), (1, 28, 4, 8192, 128)]
WARMUP, REPEATS = 3, 10
aten = torch.ops.aten


def median_ms(fn) -> float:
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def max_diffs(got, want) -> list[float]:
    return [(a.float() - b.float()).abs().max().item() for a, b in zip(got, want)]


def probe(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int) -> dict:
    from memgraph.kernels.attention.launch import bwd_triton, fwd_triton

    torch.manual_seed(0)
    hf_layout = lambda h: torch.randn(batch, seq, h, head_dim, device="cuda",  # noqa: E731
                                      dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = hf_layout(heads), hf_layout(kv_heads), hf_layout(kv_heads)
    grad_out = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    row = dict(batch=batch, heads=heads, kv_heads=kv_heads, seq=seq, head_dim=head_dim)

    def triton_backward(out, lse):
        return bwd_triton(grad_out, q, k, v, out, lse, (None,) * 4, True, scale, 16, None, None, kv_heads, None)

    out_t, lse_t = fwd_triton(q, k, v, True, scale, None, None, None)
    grads_t = triton_backward(out_t, lse_t)
    row["triton_fwd_ms"] = median_ms(lambda: fwd_triton(q, k, v, True, scale, None, None, None))
    row["triton_bwd_ms"] = median_ms(lambda: triton_backward(out_t, lse_t))
    row["triton_bwd_scratch_mib"] = peak_mib(lambda: triton_backward(out_t, lse_t))

    def cudnn_forward(q, k, v):
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)

    def cudnn_backward(q, k, v, forward, out=None, lse=None):
        out = forward[0] if out is None else out
        lse = forward[1] if lse is None else lse
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse, forward[6], forward[7], None, forward[2], forward[3], seq, seq, 0.0, True,
            scale=scale)

    forward = cudnn_forward(q, k, v)
    row["cudnn_lse_shape"] = list(forward[1].shape)
    row["cudnn_out_maxdiff"] = max_diffs([forward[0]], [out_t])[0]
    row["cudnn_lse_maxdiff"] = max_diffs([forward[1].reshape(lse_t.shape)], [lse_t])[0]
    row["cudnn_grad_maxdiff"] = max_diffs(cudnn_backward(q, k, v, forward), grads_t)
    row["grad_scale"] = [g.float().abs().max().item() for g in grads_t]
    row["cudnn_fwd_ms"] = median_ms(lambda: cudnn_forward(q, k, v))
    row["cudnn_bwd_ms"] = median_ms(lambda: cudnn_backward(q, k, v, forward))
    row["cudnn_bwd_scratch_mib"] = peak_mib(lambda: cudnn_backward(q, k, v, forward))
    mixed = cudnn_backward(q, k, v, forward, out_t, lse_t.reshape(forward[1].shape).contiguous())
    row["cudnn_bwd_from_triton_fwd_maxdiff"] = max_diffs(mixed, grads_t)

    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    contiguous = cudnn_forward(qc, kc, vc)
    row["cudnn_contig_fwd_ms"] = median_ms(lambda: cudnn_forward(qc, kc, vc))
    out_c = contiguous[0].contiguous()
    row["cudnn_contig_grad_maxdiff"] = max_diffs(cudnn_backward(qc, kc, vc, contiguous, out_c), grads_t)
    row["cudnn_contig_bwd_ms"] = median_ms(lambda: cudnn_backward(qc, kc, vc, contiguous, out_c))

    group = heads // kv_heads
    k_all, v_all = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    flash = aten._scaled_dot_product_flash_attention(q, k_all, v_all, 0.0, True, False, scale=scale)

    def flash_backward():
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k_all, v_all, flash[0], flash[1], flash[2], flash[3], seq, seq, 0.0, True, flash[6],
            flash[7], scale=scale)
        return dq, dk.unflatten(1, (kv_heads, group)).sum(2), dv.unflatten(1, (kv_heads, group)).sum(2)

    row["flash_grad_maxdiff"] = max_diffs(flash_backward(), grads_t)
    row["flash_fwd_ms_with_repeat"] = median_ms(lambda: aten._scaled_dot_product_flash_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), 0.0, True, False, scale=scale))
    row["flash_bwd_ms_with_sum"] = median_ms(flash_backward)
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_attention_cudnn needs a CUDA GPU")
        return 2
    from memgraph.kernels.attention import launch

    launch.AUTOTUNE = False
    rows = []
    for shape in SHAPES:
        try:
            rows.append(probe(*shape))
        except Exception as error:  # noqa: BLE001 - one shape's failure is recorded, the others still run
            rows.append(dict(zip(("batch", "heads", "kv_heads", "seq", "head_dim"), shape), error=repr(error)[:300]))
        torch.cuda.empty_cache()
    write_results("attention_cudnn_probe", rows, cudnn_version=torch.backends.cudnn.version(), causal=True,
                  dtype="bfloat16")
    print_table([{k: v for k, v in row.items() if not isinstance(v, list)} for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
