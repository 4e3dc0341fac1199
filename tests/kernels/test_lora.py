"""memgraph.lora_linear: the Triton kernels (interpreter on CPU, the GPU when there is one) and the chunked
plain-torch path against PEFT's own arithmetic (float32 adapters) and a float64 reference."""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memgraph.kernels import lora


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(lead, features, outputs, rank, dtype, *, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, features, generator=generator).to(device, dtype).requires_grad_()
    base = torch.randn(*lead, outputs, generator=generator).to(device, dtype).requires_grad_()
    a = (torch.randn(rank, features, generator=generator) / features ** 0.5).to(device).requires_grad_()
    b = (torch.randn(outputs, rank, generator=generator) / rank ** 0.5).to(device).requires_grad_()
    return base, x, a, b


def _check_against_references(base, x, a, b, scale, round_delta, *, out_ulps, grad_tol):
    out = lora.lora_linear(base, x, a, b, scale, round_delta=round_delta)
    peft = lora.reference_lora_linear(base, x, a, b, scale, round_delta=round_delta)
    assert out.dtype == base.dtype and out.shape == base.shape
    leaves64 = [t.detach().double().requires_grad_() for t in (base, x, a, b)]
    exact = lora.reference_lora_linear(*leaves64, scale, round_delta=False)
    if base.dtype == torch.float32:
        assert rel(out, exact) < 1e-6
    else:  # the same float32 arithmetic summed in another order: one rounding step from PEFT's per rounding, a
        # step of the delta's size where the delta is rounded by itself (round_delta) and the sum cancels it
        size = peft.detach().float().abs()
        if round_delta:
            size = torch.maximum(size, (exact - base.double()).detach().float().abs())
        step = torch.finfo(base.dtype).eps * size.clamp_min(1.0)
        assert ((out.float() - peft.float()).abs() <= out_ulps * step).all()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    ours = torch.autograd.grad(out, (base, x, a, b), g)
    expected = torch.autograd.grad(exact, leaves64, g.double())
    assert torch.equal(ours[0], g)  # dL/dbase passes through exactly
    for got, want, name in zip(ours[1:], expected[1:], ("x", "A", "B")):
        assert got.dtype == {"x": x.dtype, "A": a.dtype, "B": b.dtype}[name]
        assert rel(got, want) < grad_tol, name


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), features=st.integers(1, 70), outputs=st.integers(1, 70), rank=st.integers(1, 20),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), round_delta=st.booleans(),
       scale=st.sampled_from([1.0, 2.0, 0.125]), seed=st.integers(0, 2**16))
def test_kernels_match_peft_and_float64(rows, features, outputs, rank, dtype, round_delta, scale, seed):
    base, x, a, b = _inputs((rows,), features, outputs, rank, dtype, seed=seed)
    # x's 16-bit gradient is the float64 one rounded once; float32 gradients are near-exact
    tolerance = 1e-5 if dtype == torch.float32 else 4e-3
    # round_delta rounds twice (the delta, then the sum): one step each
    _check_against_references(base, x, a, b, scale, round_delta, out_ulps=1 + round_delta, grad_tol=tolerance)


@pytest.mark.parametrize("round_delta", [False, True])
def test_plain_torch_chunks_equal_peft_bit_for_bit(monkeypatch, round_delta):
    """The chunked plain-torch path (a CPU without the interpreter) runs PEFT's operations on row chunks: the
    same numbers, here across three chunks."""
    monkeypatch.setattr(lora, "use_triton", lambda tensor, log: False)
    monkeypatch.setattr(lora, "TORCH_CHUNK_ROWS", 7)
    base, x, a, b = _inputs((2, 10), 24, 40, 4, torch.bfloat16, seed=3)
    out = lora.lora_linear(base, x, a, b, 2.0, round_delta=round_delta)
    peft = lora.reference_lora_linear(base, x, a, b, 2.0, round_delta=round_delta)
    assert torch.equal(out, peft)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (base, x, a, b), g)
    theirs = torch.autograd.grad(peft, (base, x, a, b), g)
    for got, want in zip(ours, theirs):
        assert rel(got, want) < 1e-6


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 600), length=st.integers(1, 20000), block=st.sampled_from([16, 32, 64, 128]))
def test_split_reductions_cover_the_length_once(blocks, length, block):
    splits, per_split = lora._splits(blocks, length, block, torch.device("cpu"))
    assert per_split % block == 0 and splits >= 1
    assert (splits - 1) * per_split < length <= splits * per_split  # every index in exactly one split
    assert splits == 1 or blocks * splits <= lora.PROGRAMS_PER_MULTIPROCESSOR * lora.INTERPRETER_MULTIPROCESSORS


@pytest.mark.parametrize("processors", [1, 64])
def test_split_reductions_sum_to_the_unsplit_result(monkeypatch, processors):
    """Long reductions (xa, gxa over K; dA, dB over the rows) split across programs add up in float32 partials:
    the same numbers as one program per output block (up to float32 summation order)."""
    monkeypatch.setattr(lora, "INTERPRETER_MULTIPROCESSORS", processors)
    base, x, a, b = _inputs((70,), 150, 40, 4, torch.float32, seed=11)
    out = lora.lora_linear(base, x, a, b, 2.0)
    grads = torch.autograd.grad(out, (x, a, b), torch.ones_like(out))
    monkeypatch.setattr(lora, "INTERPRETER_MULTIPROCESSORS", 1)
    monkeypatch.setattr(lora, "PROGRAMS_PER_MULTIPROCESSOR", 1)  # one split
    base1, x1, a1, b1 = (t.detach().requires_grad_() for t in (base, x, a, b))
    out1 = lora.lora_linear(base1, x1, a1, b1, 2.0)
    grads1 = torch.autograd.grad(out1, (x1, a1, b1), torch.ones_like(out1))
    assert rel(out, out1) < 1e-6
    for got, want in zip(grads, grads1):
        assert rel(got, want) < 1e-6


def test_split_reductions_rearm_their_arrival_counters(monkeypatch):
    """The last program of each split block sums the partials and zeroes its arrival counter: a second step on
    the same counters gives the same numbers, and every counter is zero between launches."""
    monkeypatch.setattr(lora, "INTERPRETER_MULTIPROCESSORS", 64)
    monkeypatch.setattr(lora, "_COUNTERS", {})
    base, x, a, b = _inputs((70,), 150, 40, 4, torch.float32, seed=13)
    results = []
    for _ in range(2):
        out = lora.lora_linear(base, x, a, b, 2.0)
        results.append((out, *torch.autograd.grad(out, (x, a, b), torch.ones_like(out))))
    (counters,) = lora._COUNTERS.values()  # one device, one stream: one set, used by all 4 reductions
    assert int(counters.abs().sum()) == 0
    for first, second in zip(*results):
        assert torch.equal(first, second)  # deterministic: the partials are summed in split order


def test_a_stale_arrival_counter_would_show():
    """The counters decide which program sums: one left non-zero by a lost re-arm makes the sum happen early
    (or never), so the reduction is wrong (the test above can fail)."""
    x = torch.randn(64, 96)
    w = torch.randn(96, 4)
    want = x.double() @ w.double()
    for stale in (False, True):
        out = torch.zeros(64, 4)
        blocks = lora._cdiv(64, lora.ROWS_TIMES_SMALL["BLOCK_M"])
        counters = torch.zeros(lora.MIN_COUNTERS, dtype=torch.int32)
        counters[:blocks] = int(stale)
        parts = torch.zeros(3, 64, 4)
        lora.launch(lora._rows_times_small_kernel, (blocks, 3), x, x.stride(0), x.stride(1), w, w.stride(0),
                    w.stride(1), out, out.stride(0), out.stride(1), parts, counters, 64, 96, 4, 1.0, 32,
                    R_PAD=16, BF16_PARTS=False, SUM_SPLITS=True, **lora.ROWS_TIMES_SMALL)
        assert (rel(out, want) < 1e-6) != stale


@pytest.mark.parametrize("processors", [1, 64])
def test_adapter_gradients_are_written_whole(monkeypatch, processors):
    """dA and dB start uninitialised (no fill launch): with torch's NaN-filled empty tensors every element must
    still come out finite, one split or several."""
    import torch.utils.deterministic

    monkeypatch.setattr(lora, "INTERPRETER_MULTIPROCESSORS", processors)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    base, x, a, b = _inputs((70,), 150, 40, 4, torch.float32, seed=12)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(3).isnan().all()  # the check below can fail
        out = lora.lora_linear(base, x, a, b, 2.0)
        grad_a, grad_b = torch.autograd.grad(out, (a, b), torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert grad_a.isfinite().all() and grad_b.isfinite().all()


def test_bfloat16_activations_give_float32_exact_reductions():
    """With bfloat16 x (and gradient), xa = x @ A.T, dA and dB are float32 dots of the bfloat16 values: the three
    bfloat16 parts of each float32 operand must add up to it exactly (a lost part costs 2**-9 or 2**-17)."""
    base, x, a, b = _inputs((3, 50), 300, 90, 8, torch.bfloat16, seed=21)
    out, xa = torch.ops.memgraph.lora_linear(base, x, a, b, 2.0, False)
    want = x.detach().double() @ a.detach().double().T
    assert rel(xa, want) < 1e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    _, grad_a, grad_b = torch.ops.memgraph.lora_linear_backward(grad, x.detach(), xa, a.detach(), b.detach(), 2.0,
                                                                 True, True, True)
    g64, x64, xa64 = 2.0 * grad.double().flatten(0, 1), x.detach().double().flatten(0, 1), xa.double().flatten(0, 1)
    assert rel(grad_b, g64.T @ xa64) < 1e-6
    assert rel(grad_a, (g64 @ b.detach().double()).T @ x64) < 1e-6


def test_double_backward_is_refused_not_silently_wrong():
    base, x, a, b = _inputs((5,), 16, 24, 4, torch.float32, seed=1)
    out = lora.lora_linear(base, x, a, b)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.sum(), (x, a), create_graph=True)


def test_only_requested_gradients_are_made():
    base, x, a, b = _inputs((5,), 16, 24, 4, torch.float32, seed=1)
    x.requires_grad_(False)
    base.requires_grad_(False)
    out = lora.lora_linear(base, x, a, b)
    grad_a, grad_b = torch.autograd.grad(out.sum(), (a, b))
    _, xa = torch.ops.memgraph.lora_linear(base, x, a, b, 1.0, False)
    grad_x, *_ = torch.ops.memgraph.lora_linear_backward(torch.ones_like(out), x, xa, a, b, 1.0, False, True, True)
    assert grad_x.numel() == 0 and grad_a.shape == a.shape and grad_b.shape == b.shape


@pytest.mark.parametrize("bad, message", [
    (lambda base, x, a, b: (base, x, a.double(), b.double()), "A and B must share one dtype"),
    (lambda base, x, a, b: (base, x, a, b[:, :1]), r"need A \[R, K\] and B \[N, R\]"),
    (lambda base, x, a, b: (base[..., :5], x, a, b), r"need x \[..., K\] and base \[..., N\]"),
    (lambda base, x, a, b: (base, x.to(torch.int32), a, b), "x and base must be one of"),
])
def test_bad_arguments_name_what_is_expected(bad, message):
    arguments = bad(*(t.detach() for t in _inputs((3,), 8, 12, 2, torch.float32, seed=0)))
    with pytest.raises(ValueError, match=message):
        lora.lora_linear(*arguments)


def test_rank_above_the_register_limit_is_refused():
    base, x, a, b = (t.detach() for t in _inputs((2,), 600, 600, lora.MAX_RANK + 1, torch.float32, seed=0))
    with pytest.raises(ValueError, match="MAX_RANK"):
        lora.lora_linear(base, x, a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("round_delta", [False, True])
def test_forward_halves_equal_the_fused_op(dtype, round_delta):
    """lora_project and lora_apply (compiled joint graphs hold the forward as these two) give lora_linear's
    (out, xa) bit for bit."""
    base, x, a, b = (t.detach() for t in _inputs((2, 5), 24, 40, 4, dtype, seed=9))
    out, xa = torch.ops.memgraph.lora_linear(base, x, a, b, 2.0, round_delta)
    projected = torch.ops.memgraph.lora_project(x, a)
    assert torch.equal(projected, xa)
    assert torch.equal(torch.ops.memgraph.lora_apply(base, projected, b, 2.0, round_delta), out)
    assert rel(projected, x.double() @ a.double().T) < 1e-6
    torch.library.opcheck(torch.ops.memgraph.lora_project.default, (x, a))
    torch.library.opcheck(torch.ops.memgraph.lora_apply.default, (base, xa, b, 2.0, round_delta))


@pytest.mark.parametrize("call, message", [
    (lambda base, x, xa, a, b: torch.ops.memgraph.lora_project(x, a[:, :3]), r"lora_project: need x \[..., K\]"),
    (lambda base, x, xa, a, b: torch.ops.memgraph.lora_project(x, a.double()), "lora_project: A must be one of"),
    (lambda base, x, xa, a, b: torch.ops.memgraph.lora_apply(base, xa[..., :1], b, 1.0, False),
     r"lora_apply: need base \[..., N\] and xa \[..., R\]"),
    (lambda base, x, xa, a, b: torch.ops.memgraph.lora_apply(base, xa.double(), b, 1.0, False),
     "xa must have B's dtype"),
    (lambda base, x, xa, a, b: torch.ops.memgraph.lora_apply(base.int(), xa, b, 1.0, False),
     "lora_apply: base must be one of"),
])
def test_forward_halves_name_what_is_expected(call, message):
    base, x, a, b = (t.detach() for t in _inputs((3,), 8, 12, 2, torch.float32, seed=0))
    xa = torch.ops.memgraph.lora_project(x, a)
    with pytest.raises(ValueError, match=message):
        call(base, x, xa, a, b)


@pytest.mark.parametrize("product_dots", [0, 3, 6])
def test_output_kernel_sums_the_rank_in_slices(monkeypatch, product_dots):
    """The [M, N] kernel multiplies RANK_SLICE ranks at a time (here 16 of a rank of 40, in 4 slices: the last one
    partly padding) with each PRODUCT_DOTS setting, and gives the float32 product: float32 out and dx against
    float64."""
    monkeypatch.setattr(lora, "RANK_SLICE", 16)
    monkeypatch.setattr(lora, "SMALL_TIMES_COLS", {**lora.SMALL_TIMES_COLS, "PRODUCT_DOTS": product_dots})
    base, x, a, b = _inputs((2, 7), 24, 40, 40, torch.float32, seed=11)
    tolerance = 1e-4 if product_dots == 3 else 1e-6  # 3: pairs of parts down to 2^-8 only
    out = lora.lora_linear(base, x, a, b, 2.0)
    exact = lora.reference_lora_linear(*(t.detach().double() for t in (base, x, a, b)), 2.0)
    assert rel(out, exact) < tolerance
    g = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, (x,), g)
    assert rel(grad_x, (g.double() @ b.detach().double() * 2.0) @ a.detach().double()) < tolerance


@pytest.mark.cuda
@pytest.mark.parametrize("rank", [16, 64, 256])
@pytest.mark.parametrize("product_dots", [0, 6])
def test_gpu_output_kernel_is_float32_accurate_at_every_rank(monkeypatch, rank, product_dots):
    """On the GPU the six bfloat16-part dots give a float32 product (the same accuracy as one ieee float32 dot),
    up to MAX_RANK (256: four rank slices)."""
    monkeypatch.setattr(lora, "SMALL_TIMES_COLS", {**lora.SMALL_TIMES_COLS, "PRODUCT_DOTS": product_dots})
    generator = torch.Generator().manual_seed(rank)
    p = torch.randn(1000, rank, generator=generator).cuda()
    w = torch.randn(rank, 3000, generator=generator).cuda()
    base = torch.randn(1000, 3000, generator=generator).cuda()
    out = torch.empty_like(base)
    lora._small_times_cols(p, w, base, out, 0.5, False)
    exact = base.double() + 0.5 * (p.double() @ w.double())
    assert rel(out, exact) < 3e-7


def test_forward_halves_have_no_derivative():
    """lora_project and lora_apply run in graphs already differentiated: a call that would need their derivative
    raises (autograd's fallback would warn and leave A's and B's gradients missing); without grad they run."""
    base, x, a, b = _inputs((3,), 8, 12, 2, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="lora_project has no derivative"):
        torch.ops.memgraph.lora_project(x, a)
    with torch.no_grad():
        xa = torch.ops.memgraph.lora_project(x, a)
    with pytest.raises(RuntimeError, match="lora_apply has no derivative"):
        torch.ops.memgraph.lora_apply(base, xa, b, 1.0, False)
    with torch.no_grad():
        assert torch.ops.memgraph.lora_apply(base, xa, b, 1.0, False).shape == base.shape


def test_opcheck():
    base, x, a, b = _inputs((2, 3), 16, 20, 4, torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.memgraph.lora_linear.default, (base, x, a, b, 0.5, False))
    _, xa = torch.ops.memgraph.lora_linear(base, x, a, b, 0.5, False)
    torch.library.opcheck(torch.ops.memgraph.lora_linear_backward.default,
                          (torch.randn_like(base), x.detach(), xa, a.detach(), b.detach(), 0.5, True, True, True))

    accumulate = torch.randn_like(x)
    torch.library.opcheck(torch.ops.memgraph.lora_linear_backward_into.default,
                          (torch.randn_like(base), x.detach(), xa, a.detach(), b.detach(), 0.5, True, True, accumulate))


@pytest.mark.parametrize("watched", [False, True])
def test_backward_into_writes_in_place_and_moves_the_version(watched):
    """Eager calls skip the dispatcher below autograd (no mode active) or go through it (a mode watching): either
    way dx lands in ``accumulate`` and its version counter moves, as for any in-place op."""
    from torch.utils.flop_counter import FlopCounterMode

    base, x, a, b = (t.detach() for t in _inputs((4,), 12, 10, 3, torch.float32, seed=6))
    _, xa = torch.ops.memgraph.lora_linear(base, x, a, b, 2.0, False)
    grad, other = torch.randn_like(base), torch.randn_like(x)
    expected, want_a, want_b = torch.ops.memgraph.lora_linear_backward(grad, x, xa, a, b, 2.0, True, True, True,
                                                                       accumulate=other)
    target = other.clone()
    version = target._version
    with FlopCounterMode(display=False) if watched else contextlib.nullcontext():
        grad_a, grad_b = torch.ops.memgraph.lora_linear_backward_into(grad, x, xa, a, b, 2.0, True, True, target)
    assert torch.equal(target, expected) and torch.equal(grad_a, want_a) and torch.equal(grad_b, want_b)
    assert target._version > version


def test_backward_ops_have_no_derivative():
    base, x, a, b = _inputs((5,), 16, 24, 4, torch.float32, seed=1)
    _, xa = torch.ops.memgraph.lora_linear(base.detach(), x.detach(), a.detach(), b.detach(), 1.0, False)
    grad_x, grad_a, _ = torch.ops.memgraph.lora_linear_backward(torch.ones_like(base), x, xa, a, b, 1.0, True, True,
                                                                True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        (grad_x.sum() + grad_a.sum()).backward()
    with pytest.raises(RuntimeError, match="has no derivative"):
        torch.ops.memgraph.lora_linear_backward_into(torch.ones_like(base), x, xa, a, b, 1.0, True, True,
                                                     torch.zeros_like(x, requires_grad=True))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("round_delta", [False, True])
def test_gpu_kernels_match_peft_at_training_shapes(dtype, round_delta):
    base, x, a, b = _inputs((1, 1000), 4096, 14336, 16, dtype, seed=5, device="cuda")
    _check_against_references(base, x, a, b, 2.0, round_delta, out_ulps=1 + round_delta, grad_tol=4e-3)


@pytest.mark.cuda
def test_gpu_split_reductions_are_deterministic():
    """On the GPU the last program of a split block is whichever arrives last: the sum is in split order all the
    same, so repeated runs give identical bits (2048 rows at rank 16: every reduction splits)."""
    base, x, a, b = _inputs((1, 2048), 4096, 4096, 16, torch.bfloat16, seed=8, device="cuda")
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(3)).to(base)
    runs = []
    for _ in range(5):
        out = lora.lora_linear(base, x, a, b, 2.0)
        runs.append((out, *torch.autograd.grad(out, (x, a, b), g)))
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)
    assert all(int(c.abs().sum()) == 0 for c in lora._COUNTERS.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_adds_into_another_gradient_as_autograd_sums(dtype):
    """``accumulate``: x's gradient from elsewhere; dx = accumulate + (the adapter's dx in x's dtype), the sum
    autograd forms, without the adapter's part as a tensor of its own."""
    base, x, a, b = (t.detach() for t in _inputs((3, 9), 20, 30, 4, dtype, seed=4))
    _, xa = torch.ops.memgraph.lora_linear(base, x, a, b, 2.0, False)
    grad = torch.randn_like(base)
    other = torch.randn_like(x)
    alone, grad_a, grad_b = torch.ops.memgraph.lora_linear_backward(grad, x, xa, a, b, 2.0, True, True, True)
    summed, grad_a2, grad_b2 = torch.ops.memgraph.lora_linear_backward(grad, x, xa, a, b, 2.0, True, True, True,
                                                                       accumulate=other)
    assert torch.equal(summed, other + alone)
    assert torch.equal(grad_a, grad_a2) and torch.equal(grad_b, grad_b2)
    with pytest.raises(ValueError, match="accumulate must be x's gradient"):
        torch.ops.memgraph.lora_linear_backward(grad, x, xa, a, b, 2.0, True, True, True, accumulate=other[:1])


@pytest.mark.cuda
def test_split_reductions_capture_in_a_cuda_graph_of_the_callers():
    """A graph the caller captures (torch.cuda.graph's default "global" mode) on a stream with no arrival
    counters yet: they are made in the capture's own pool (another thread may not allocate during such a
    capture), and replays give eager's gradients (at bf16 tolerance: cuBLAS may pick another algorithm inside
    a capture)."""
    base, x, a, b = _inputs((1, 2048), 4096, 4096, 16, torch.bfloat16, seed=8, device="cuda")
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(3)).to(base)
    step = lambda: torch.autograd.grad(lora.lora_linear(base, x, a, b, 2.0), (x, a, b), g)  # noqa: E731
    expected = step()
    warm = torch.cuda.Stream()  # the capture stream below is a new one: its counters do not exist yet
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=warm):
        captured = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for ours, reference in zip(captured, expected):
            error = float((ours.double() - reference.double()).norm() / reference.double().norm())
            assert error < 1e-2, error
