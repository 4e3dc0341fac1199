"""memgraph.linear_cross_entropy: the Triton row kernel (interpreter on CPU) and the chunked op against a float64
reference that materializes the logits."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memgraph.kernels import cross_entropy as ce

OP = torch.ops.memgraph.linear_cross_entropy.default


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(rows, features, vocab, dtype, *, seed, ignored=0.0, bias=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, features, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, features, generator=generator) / math.sqrt(features)).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=generator) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < ignored] = -100
    return hidden, weight, b, labels


def _grads(loss, leaves):
    leaves = [x for x in leaves if x is not None]
    return torch.autograd.grad(loss, leaves)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), vocab=st.integers(2, 150), chunk=st.integers(1, 48),
       reduction=st.sampled_from(ce.REDUCTIONS), softcap=st.sampled_from([None, 2.5]),
       scale=st.sampled_from([1.0, 0.25]), bias=st.booleans(), ignored=st.sampled_from([0.0, 0.4]))
def test_matches_the_float64_reference(rows, vocab, chunk, reduction, softcap, scale, bias, ignored):
    """float32: loss and every gradient within 1e-5 of the materialized float64 computation, for any vocabulary
    (not a multiple of the kernel's block), chunking and row count."""
    hidden, weight, b, labels = _inputs(rows, 16, vocab, torch.float32, seed=rows * vocab + chunk, ignored=ignored,
                                        bias=bias)
    kwargs = dict(bias=b, logit_scale=scale, softcap=softcap, reduction=reduction)
    loss, logits = ce.linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, return_logits=True, **kwargs)
    want, want_logits = ce.reference_linear_cross_entropy(hidden, weight, labels, **kwargs)
    if bool((labels == -100).all()) and reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(want)
        return
    assert rel(loss, want) < 1e-5 and rel(logits, want_logits) < 1e-5
    for got, expected in zip(_grads(loss, (hidden, weight, b)), _grads(want, (hidden, weight, b))):
        assert got.dtype == hidden.dtype and rel(got, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_within_its_rounding(dtype):
    hidden, weight, b, labels = _inputs(37, 32, 300, dtype, seed=3, ignored=0.2, bias=True)
    loss, _ = ce.linear_cross_entropy(hidden, weight, labels, bias=b, softcap=30.0, chunk_tokens=8)
    want, _ = ce.reference_linear_cross_entropy(hidden, weight, labels, bias=b, softcap=30.0)
    assert rel(loss, want) < 1e-3
    for got, expected in zip(_grads(loss, (hidden, weight, b)), _grads(want, (hidden, weight, b))):
        assert got.dtype == dtype and rel(got, expected) < 2e-2


def test_all_ignored_rows_as_torch_does():
    """Mean over no kept row is NaN with zero gradients (torch's cross_entropy); sum is 0; a row of ignored
    labels contributes nothing either way."""
    hidden, weight, _, labels = _inputs(6, 8, 20, torch.float32, seed=4)
    labels[:] = -100
    loss, _ = ce.linear_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    assert torch.isnan(loss)
    assert all(float(g.abs().max()) == 0.0 for g in _grads(loss, (hidden, weight)))
    total, _ = ce.linear_cross_entropy(hidden, weight, labels, reduction="sum")
    assert float(total) == 0.0


def test_a_label_outside_the_vocabulary_makes_the_loss_nan():
    hidden, weight, _, labels = _inputs(6, 8, 20, torch.float32, seed=5)
    labels[2] = 20
    loss, _ = ce.linear_cross_entropy(hidden, weight, labels)
    assert torch.isnan(loss)


def test_triton_and_plain_torch_compute_the_same(monkeypatch):
    hidden, weight, b, labels = _inputs(19, 16, 90, torch.float32, seed=6, ignored=0.3, bias=True)
    kwargs = dict(bias=b, softcap=4.0, logit_scale=0.5, chunk_tokens=5, return_logits=True)
    kernel = ce.linear_cross_entropy(hidden, weight, labels, **kwargs)
    kernel_grads = _grads(kernel[0], (hidden, weight, b))
    monkeypatch.setattr(ce, "use_triton", lambda tensor, log: False)
    torch_path = ce.linear_cross_entropy(hidden, weight, labels, **kwargs)
    for a, b_ in zip((*kernel, *kernel_grads), (*torch_path, *_grads(torch_path[0], (hidden, weight, b)))):
        assert rel(a, b_) < 1e-6


def test_backward_only_scales_what_the_forward_made():
    """The op's outputs hold the gradients; backward multiplies them by the incoming gradient."""
    hidden, weight, _, labels = _inputs(9, 8, 30, torch.float32, seed=7)
    loss, _ = ce.linear_cross_entropy(hidden, weight, labels)
    (3.0 * loss).backward()
    want, _ = ce.reference_linear_cross_entropy(hidden, weight, labels)
    expected = torch.autograd.grad(3.0 * want, (hidden, weight))
    assert rel(hidden.grad, expected[0]) < 1e-5 and rel(weight.grad, expected[1]) < 1e-5
    outputs = OP(hidden.detach(), weight.detach(), None, labels, 1.0, None, -100, "mean", False, 4, True, False, False)
    assert outputs[1].numel() == 0 and outputs[3].numel() == 0 and outputs[2].shape == hidden.shape


def test_no_vocabulary_sized_float32_tensor_and_the_fake_agrees():
    """Under a fake mode the op promises exactly its outputs: no [N, V] float32 logits; logits only when asked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden = torch.empty(2, 5, 8, dtype=torch.bfloat16)
        weight = torch.empty(100, 8, dtype=torch.bfloat16)
        labels = torch.empty(10, dtype=torch.long)
        loss, logits, gh, gw, gb = OP(hidden, weight, None, labels, 1.0, None, -100, "mean", True, 4, True, True, False)
    assert loss.shape == () and loss.dtype == torch.float32
    assert logits.shape == (2, 5, 100) and logits.dtype == torch.bfloat16
    assert gh.shape == hidden.shape and gw.shape == (100, 8) and gw.dtype == torch.float32 and gb.numel() == 0


def test_flop_and_scratch_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, _, labels = _inputs(12, 8, 30, torch.float32, seed=8)
    with FlopCounterMode(display=False) as counter:
        ce.linear_cross_entropy(hidden, weight, labels)
    assert counter.get_total_flops() == 3 * 2 * 12 * 8 * 30  # logits, dhidden, dweight
    assert ce.scratch_bytes(1000, 128256, torch.bfloat16, 512) == 512 * 128256 * 2
    assert ce.scratch_bytes(100, 128256, torch.bfloat16, 512) == 100 * 128256 * 2


def test_chunk_size_comes_from_bytes():
    vocab = 128256
    default = ce.chunk_tokens_for(vocab, torch.bfloat16, None)
    assert default * vocab * 2 <= ce.DEFAULT_CHUNK_BYTES and default % ce.CHUNK_ALIGN == 0
    assert ce.chunk_tokens_for(vocab, torch.bfloat16, 6 * 2**30) == ce.MATMUL_EFFICIENT_TOKENS  # a tight budget
    large = ce.chunk_tokens_for(vocab, torch.bfloat16, 512 * 2**30)
    assert large > default and large * vocab * 2 <= 512 * 2**30 * ce.CHUNK_BUDGET_SHARE


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="none"), "reduction"), (dict(softcap=-1.0), "softcap"), (dict(chunk_tokens=0), "chunk_tokens"),
])
def test_rejects_unsupported_arguments(kwargs, message):
    hidden, weight, _, labels = _inputs(4, 8, 10, torch.float32, seed=9)
    with pytest.raises(ValueError, match=message):
        ce.linear_cross_entropy(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="dtype"):
        ce.linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels"):
        ce.linear_cross_entropy(hidden, weight, labels[:3])


@pytest.mark.cuda
def test_cuda_bf16_trainable_lm_head_accumulates_in_float32():
    hidden, weight, b, labels = _inputs(1000, 64, 5000, torch.bfloat16, seed=10, ignored=0.1, bias=True)
    hidden, weight, b, labels = (x.detach().cuda().requires_grad_(x.requires_grad) if x.is_floating_point()
                                 else x.cuda() for x in (hidden, weight, b, labels))
    loss, _ = ce.linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=128)
    want, _ = ce.reference_linear_cross_entropy(hidden, weight, labels, bias=b)
    assert rel(loss, want) < 1e-3
    for got, expected in zip(_grads(loss, (hidden, weight, b)), _grads(want, (hidden, weight, b))):
        assert rel(got, expected) < 1e-2
