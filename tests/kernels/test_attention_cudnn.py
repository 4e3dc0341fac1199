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
    assert not cudnn.applies(q, q, q, None, None, None)  # a CPU tensor: the interpreter or plain torch runs it
    meta = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16, device="meta")
    assert not cudnn.applies(meta, meta, meta, None, None, None)


@pytest.mark.cuda
@pytest.mark.parametrize("change", ["window", "softcap", "segments", "float32", "head_dim_32", "deterministic",
                                    "strided_k", "cudnn_off", "sdpa_cudnn_off", "switched_off"])
def test_applies_only_to_plain_16_bit_attention(cudnn_state, monkeypatch, change):
    q = torch.empty(1, 4, 16, 64, dtype=torch.bfloat16, device="cuda")
    k = v = torch.empty(1, 2, 16, 64, dtype=torch.bfloat16, device="cuda")
    if torch.backends.cudnn.is_available():
        assert cudnn.applies(q, k, v, None, None, None)
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
    elif change == "strided_k":
        k = torch.empty(1, 2, 64, 16, dtype=torch.bfloat16, device="cuda").transpose(-1, -2)
    elif change == "cudnn_off":
        monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    elif change == "sdpa_cudnn_off":
        monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    else:
        monkeypatch.setattr(cudnn, "ENABLED", False)
    assert not cudnn.applies(q, k, v, window, softcap, segments)


@pytest.mark.cuda
@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_a_failing_cudnn_call_falls_back_to_triton_once_and_says_so(cudnn_state, monkeypatch, caplog, failing):
    q, k, v, grad_out = _leaves("cuda", torch.bfloat16)

    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no engine")

    monkeypatch.setattr(cudnn, failing, broken)
    with caplog.at_level(logging.WARNING, logger="memgraph.kernels.attention"):
        got = _fwd_bwd(q, k, v, grad_out)
    assert cudnn.disabled_reason().startswith("RuntimeError: cuDNN Frontend error")
    assert not cudnn.applies(q, k, v, None, None, None)
    assert sum("cuDNN attention failed" in record.getMessage() for record in caplog.records) == 1
    monkeypatch.setattr(cudnn, "ENABLED", False)
    expected = _fwd_bwd(q, k, v, grad_out)
    for a, b in zip(got, expected):
        if failing == "forward":  # the Triton kernels ran all of it
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:  # cuDNN's forward, then the Triton backward from its O and LSE
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


@pytest.mark.cuda
def test_out_of_memory_is_not_taken_for_missing_support(cudnn_state, monkeypatch):
    q, k, v, grad_out = _leaves("cuda", torch.bfloat16)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cudnn, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        _fwd_bwd(q, k, v, grad_out)
    assert cudnn.disabled_reason() is None


@pytest.mark.cuda
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, "bhsd"), (torch.float16, "bhsd"),
                                          (torch.bfloat16, "bshd")])
def test_matches_the_reference_and_the_triton_kernels(cudnn_state, monkeypatch, heads, kv_heads, causal, head_dim,
                                                      dtype, layout):
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    q, k, v, grad_out = _leaves("cuda", dtype, heads, kv_heads, 300, head_dim, seed=heads + kv_heads)
    if layout == "bshd":  # HF's q/k/v: [B, S, H, D] storage seen as [B, H, S, D]
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
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
@pytest.mark.parametrize("forward_on,backward_on", [("cudnn", "triton"), ("triton", "cudnn")])
def test_either_forward_pairs_with_either_backward(cudnn_state, monkeypatch, forward_on, backward_on):
    """A graph may run its forward with one and its backward with the other (cuDNN switched off mid-step): the
    same O and LSE convention make the gradients agree with an all-Triton step."""
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    q, k, v, grad_out = _leaves("cuda", torch.bfloat16, 8, 2, 512, 128, seed=3)
    none = (None,) * 4
    with torch.no_grad():
        monkeypatch.setattr(cudnn, "ENABLED", False)
        out_t, lse_t, *_ = OP._attention_impl(q, k, v)
        expected = OP._attention_backward_impl(grad_out, q, k, v, out_t, lse_t, *none, True, None, 16, None, None)
        monkeypatch.setattr(cudnn, "ENABLED", forward_on == "cudnn")
        out, lse, *_ = OP._attention_impl(q, k, v)
        monkeypatch.setattr(cudnn, "ENABLED", backward_on == "cudnn")
        mixed = OP._attention_backward_impl(grad_out, q, k, v, out, lse, *none, True, None, 16, None, None)
    assert cudnn.disabled_reason() is None
    assert lse.shape == lse_t.shape and lse.dtype == torch.float32
    torch.testing.assert_close(lse, lse_t, rtol=0, atol=2e-2)  # both natural-log LSE, [B, H, S]
    for a, b in zip(mixed, expected):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
