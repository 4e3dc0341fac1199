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


def test_workspace_formula_reproduces_the_h100_measurements():
    """backward_workspace_bytes against what cuDNN's backward allocated besides dQ/dK/dV on an H100 (torch 2.11):
    (batch, heads, kv heads, seq, head dim) -> MiB."""
    measured_mib = {(1, 32, 8, 2048, 128): 64.25, (1, 32, 8, 8192, 128): 258.0, (1, 28, 4, 8192, 128): 224.9,
                    (1, 16, 16, 8192, 256): 128.5}
    for shape, mib in measured_mib.items():
        assert abs(cudnn.backward_workspace_bytes(*shape) / 2**20 - mib) <= 2.5, shape


@pytest.fixture
def fake_cuda(cudnn_state, monkeypatch):
    """Fake CUDA tensors on any machine, with cuDNN reported available: what the cost model sees on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    mode = FakeTensorMode()
    return lambda *shape: FakeTensor(mode, torch.empty(*shape, dtype=torch.bfloat16, device="meta"),
                                     torch.device("cuda"))


def test_long_sequences_keep_the_triton_kernels(fake_cuda):
    q, k = fake_cuda(1, 32, 8192, 128), fake_cuda(1, 8, 8192, 128)
    assert cudnn.applies(q, k, k, None, None, None)  # 256 MiB of workspace
    q, k = fake_cuda(1, 32, 32768, 128), fake_cuda(1, 8, 32768, 128)
    assert not cudnn.applies(q, k, k, None, None, None)  # 1 GiB: above MAX_WORKSPACE_BYTES


def test_cost_model_counts_the_cudnn_workspace(fake_cuda, monkeypatch):
    from memgraph.cost_model import values

    formula = values._SCRATCH[torch.ops.memgraph.attention_backward.default]
    q, k, lse = fake_cuda(1, 32, 2048, 128), fake_cuda(1, 8, 2048, 128), fake_cuda(1, 32, 2048)
    args = dict(grad_out=q, q=q, k=k, v=k, out=q, lse=lse, k_codes=None, k_meta=None, v_codes=None, v_meta=None,
                causal=True, scale=None, window=None, softcap=None)
    assert formula(**args, kv_bits=16) == cudnn.backward_workspace_bytes(1, 32, 8, 2048, 128)
    transposed = fake_cuda(1, 2048, 32, 128).transpose(1, 2)  # HF's layout: copied before cuDNN reads it
    assert formula(**{**args, "q": transposed}, kv_bits=16) == (cudnn.backward_workspace_bytes(1, 32, 8, 2048, 128)
                                                               + transposed.numel() * 2)
    assert formula(**args, kv_bits=16, q_segments=q, k_segments=q) == 0  # segments: the Triton kernels
    assert formula(**{**args, "k": None, "v": None}, kv_bits=4) == 0  # 4-bit K/V: the Triton kernels
    monkeypatch.setattr(cudnn, "ENABLED", False)
    assert formula(**args, kv_bits=16) == 0


@pytest.mark.parametrize("change", ["window", "softcap", "segments", "float32", "head_dim_32", "deterministic",
                                    "strided_k", "cudnn_off", "sdpa_cudnn_off", "switched_off"])
def test_applies_only_to_plain_16_bit_attention(fake_cuda, monkeypatch, change):
    q, k = fake_cuda(1, 4, 16, 64), fake_cuda(1, 2, 16, 64)
    v = k
    assert cudnn.applies(q, k, v, None, None, None)
    window, softcap, segments = None, None, None
    if change == "window":
        window = 8
    elif change == "softcap":
        softcap = 30.0
    elif change == "segments":
        segments = (fake_cuda(1, 16), fake_cuda(1, 16))
    elif change == "float32":
        q = q.float()
    elif change == "head_dim_32":
        q = fake_cuda(1, 4, 16, 32)
    elif change == "deterministic":  # ours are deterministic; cuDNN's backward need not be
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    elif change == "strided_k":
        k = fake_cuda(1, 2, 64, 16).transpose(-1, -2)
    elif change == "cudnn_off":
        monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    elif change == "sdpa_cudnn_off":
        monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    else:
        monkeypatch.setattr(cudnn, "ENABLED", False)
    assert not cudnn.applies(q, k, v, window, softcap, segments)
