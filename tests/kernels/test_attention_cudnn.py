"""memgraph.kernels.attention.cudnn: where the cuDNN kernels replace ours, the fallback when they fail, and (CUDA)
their outputs and gradients against a float64 reference and against the Triton kernels."""
import logging

import pytest
import torch

from memgraph.kernels import attention as A
from memgraph.kernels.attention import cudnn, op as OP


def _leaves(device, dtype, heads=4, kv_heads=2, seq_len=256, head_dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(1, h, seq_len, head_dim, generator=generator).to(device, dtype)
                         for h in (heads, kv_heads, kv_heads, heads))
    return q, k, v, grad_out


def _fwd_bwd(q, k, v, grad_out, dtype=None, **kwargs):
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    attention = A.reference_attention if dtype is torch.float64 else A.attention
    out = attention(*leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), *(x.grad for x in leaves)]


@pytest.fixture
def cudnn_state(monkeypatch):
    monkeypatch.setattr(cudnn, "ENABLED", True)
    monkeypatch.setattr(cudnn, "_disabled_reason", None)
    return cudnn


def test_not_on_cpu_nor_where_cudnn_computes_something_else(cudnn_state):
    q = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16)
    assert not cudnn.applies(q, None, None, None)  # a CPU tensor: the interpreter or plain torch runs it
    meta_cuda = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16, device="meta")
    assert not cudnn.applies(meta_cuda, None, None, None)


@pytest.mark.cuda
@pytest.mark.parametrize("change", ["window", "softcap", "segments", "float32", "head_dim_32", "deterministic",
                                    "switched_off"])
def test_applies_only_to_plain_16_bit_attention(cudnn_state, monkeypatch, change):
    q = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16, device="cuda")
    if torch.backends.cudnn.is_available():
        assert cudnn.applies(q, None, None, None)
    window, softcap, segments = None, None, None
    if change == "window":
        window = 8
    elif change == "softcap":
        softcap = 30.0
    elif change == "segments":
        segments = (torch.zeros(1, 16, dtype=torch.int32), torch.zeros(1, 16, dtype=torch.int32))
    elif change == "float32":
        q = q.float()
    elif change == "head_dim_32":
        q = torch.empty(1, 4, 16, 32, dtype=torch.bfloat16, device="cuda")
    elif change == "deterministic":  # ours are deterministic; cuDNN's backward need not be
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    else:
        monkeypatch.setattr(cudnn, "ENABLED", False)
    assert not cudnn.applies(q, window, softcap, segments)


@pytest.mark.cuda
def test_a_failing_cudnn_call_falls_back_to_triton_once_and_says_so(cudnn_state, monkeypatch, caplog):
    q, k, v, grad_out = _leaves("cuda", torch.bfloat16)

    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no engine")

    monkeypatch.setattr(cudnn, "forward", broken)
    with caplog.at_level(logging.WARNING, logger="memgraph.kernels.attention"):
        out, dq, dk, dv = _fwd_bwd(q, k, v, grad_out)
    assert cudnn.disabled_reason().startswith("RuntimeError: cuDNN Frontend error")
    assert not cudnn.applies(q, None, None, None)
    assert sum("cuDNN attention failed" in record.getMessage() for record in caplog.records) == 1
    monkeypatch.setattr(cudnn, "ENABLED", False)
    expected = _fwd_bwd(q, k, v, grad_out)
    for got, want in zip((out, dq, dk, dv), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the Triton kernels ran


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_the_reference_and_the_triton_kernels(cudnn_state, monkeypatch, heads, kv_heads, causal, head_dim):
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    q, k, v, grad_out = _leaves("cuda", torch.bfloat16, heads, kv_heads, 300, head_dim, seed=heads + kv_heads)
    reference = _fwd_bwd(q, k, v, grad_out, torch.float64, causal=causal)
    ours = _fwd_bwd(q, k, v, grad_out, causal=causal)
    assert cudnn.disabled_reason() is None
    monkeypatch.setattr(cudnn, "ENABLED", False)
    triton = _fwd_bwd(q, k, v, grad_out, causal=causal)
    for name, got, via_triton, want in zip(("out", "dq", "dk", "dv"), ours, triton, reference):
        error = ((got.double() - want).norm() / want.norm()).item()
        triton_error = ((via_triton.double() - want).norm() / want.norm()).item()
        assert error <= 2 * triton_error + 2e-3, (name, error, triton_error)


@pytest.mark.cuda
def test_either_forward_pairs_with_either_backward(cudnn_state, monkeypatch):
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    q, k, v, grad_out = _leaves("cuda", torch.bfloat16, 8, 2, 512, 128, seed=3)
    with torch.no_grad():
        monkeypatch.setattr(cudnn, "ENABLED", False)
        out_t, lse_t, *_ = OP._attention_impl(q, k, v)
        monkeypatch.setattr(cudnn, "ENABLED", True)
        out_c, lse_c, *_ = OP._attention_impl(q, k, v)
        torch.testing.assert_close(lse_c, lse_t, rtol=0, atol=2e-2)  # both natural-log LSE, [B, H, S]
        none = (None,) * 4
        from_triton = OP._attention_backward_impl(grad_out, q, k, v, out_t, lse_t, *none, True, None, 16, None, None)
        from_cudnn = OP._attention_backward_impl(grad_out, q, k, v, out_c, lse_c, *none, True, None, 16, None, None)
    for a, b in zip(from_triton, from_cudnn):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
