"""NF4 storage and kernels: bit-identity with bitsandbytes, linear fwd/bwd accuracy, tracing, errors.

On CPU the Triton kernel runs under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from memgraph import _compat
from memgraph.kernels import _dispatch, nf4
from memgraph.kernels._dispatch import use_triton
from memgraph.kernels.nf4 import NF4Weight
from tests.helpers import RecordOps

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPOTHESIS = settings(max_examples=15, deadline=None, derandomize=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative (Frobenius) error allowed for the linear against a float64 reference built from the same
# dequantized weight: the output rounding of the activation dtype dominates.
LINEAR_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def bnb_call(fn, *args, **kwargs):
    # bitsandbytes' odd-shape CPU fallback is torch.compile'd per shape; eager is the same math, much faster.
    with torch.compiler.set_stance("force_eager"):
        return fn(*args, **kwargs)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def random_weight(rows, cols, dtype, seed, outliers=True):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * 0.05
    if outliers and w.numel() > 3:  # a few large values make blocks with very different absmax
        w.view(-1)[:: max(1, w.numel() // 3)] *= 40
    return w.to(dtype).to(DEVICE)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


shapes = st.tuples(st.integers(1, 70), st.integers(1, 150))


# ------------------------------------------------------------------------------------------ format parity
def test_code_tables_match_bitsandbytes():
    assert torch.equal(torch.tensor(nf4.NF4_CODE), BF.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(nf4.dynamic_map(), BF.create_dynamic_map())


def test_kernel_path_is_triton():
    # The bit-identity tests below must exercise the Triton kernel, not only the torch fallback.
    assert use_triton(torch.empty(0, device=DEVICE), nf4.log)


def bnb_portable_dequantize(packed, state):
    """bitsandbytes' device-independent torch implementation (its 'default' backend) of dequantize_4bit.

    bitsandbytes 0.50.2's native CPU kernel indexes absmax per row (absmax[row * (K // blocksize) + ...]),
    which is only right when in_features is a multiple of the block size; its CUDA kernel and this
    implementation index the flattened weight, which is the format (and what quantize_4bit writes).
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnb_call(BF.dequantize_blockwise, state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(packed.view(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


@HYPOTHESIS
@given(rows=st.integers(1, 70), blocks=st.integers(1, 3), cols=st.integers(1, 150), aligned=st.booleans(),
       dtype=st.sampled_from(FLOAT_DTYPES), double_quant=st.booleans(), blocksize=st.sampled_from([64, 32, 128]),
       seed=st.integers(0, 2**16))
def test_dequantize_bit_identical_to_bitsandbytes(rows, blocks, cols, aligned, dtype, double_quant, blocksize,
                                                  seed):
    cols = blocks * blocksize if aligned else cols
    w = random_weight(rows, cols, dtype, seed)
    packed, state = bnb_call(BF.quantize_4bit, w, blocksize=blocksize, compress_statistics=double_quant,
                             quant_type="nf4")
    weight = NF4Weight.from_bnb(packed, state)
    ours = weight.dequantize()
    assert same_bits(ours, bnb_portable_dequantize(packed, state))
    if cols % blocksize == 0 or w.is_cuda:  # where bitsandbytes' public function is itself right
        assert same_bits(ours, bnb_call(BF.dequantize_4bit, packed, state, quant_type="nf4"))
    assert same_bits(weight.dequantize_reference(), ours)
    # Any output dtype is the float32 value rounded once (bitsandbytes' float32 result when dtype is float32).
    as_float32 = weight.dequantize(torch.float32)
    for out_dtype in FLOAT_DTYPES:
        assert same_bits(weight.dequantize(out_dtype), as_float32.to(out_dtype))
        assert same_bits(weight.dequantize_reference(out_dtype), as_float32.to(out_dtype))


@HYPOTHESIS
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), blocksize=st.sampled_from([64, 32, 256]),
       seed=st.integers(0, 2**16))
def test_quantize_same_bytes_as_bitsandbytes(shape, dtype, blocksize, seed):
    w = random_weight(*shape, dtype, seed)
    packed, state = bnb_call(BF.quantize_4bit, w, blocksize=blocksize, quant_type="nf4")
    ours = NF4Weight.quantize(w, blocksize=blocksize)
    assert ours.packed.shape == packed.shape and torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.dtype == dtype and ours.shape == w.shape


@HYPOTHESIS
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**16))
def test_double_quant_matches_bitsandbytes_format(shape, dtype, seed):
    w = random_weight(*shape, dtype, seed)
    packed, state = bnb_call(BF.quantize_4bit, w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Weight.quantize(w, double_quant=True)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.nested_offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    assert ours.nested_blocksize == state.state2.blocksize
    # Our codes are the nearest dynamic-map entries (bitsandbytes' CUDA rule); its CPU kernel's 65536-bin
    # lookup table may pick a neighbour. Ours are never farther, and at most one code away.
    absmax = NF4Weight.quantize(w).absmax
    nested_scale = ours.nested_absmax.clamp(min=1e-38).repeat_interleave(256)[: absmax.numel()]
    target = ((absmax - ours.nested_offset) * (1 / nested_scale)).clamp(-1, 1)
    code = ours.nested_code
    ours_err = (code[ours.absmax.long()] - target).abs()
    bnb_err = (code[state.absmax.long()] - target).abs()
    assert torch.all(ours_err <= bnb_err + 1e-7)
    scaled = nested_scale > 1e-38  # an all-equal absmax group decodes to 0 * code: any code is exact there
    assert torch.all((ours.absmax.int() - state.absmax.int()).abs()[scaled] <= 1)
    # bitsandbytes reads our double-quantized storage back to the same values we do.
    our_state = BF.QuantState(absmax=ours.absmax, shape=ours.shape, code=state.code, blocksize=64,
                              quant_type="nf4", dtype=dtype, offset=ours.nested_offset,
                              state2=BF.QuantState(absmax=ours.nested_absmax, code=ours.nested_code, blocksize=256,
                                                   dtype=torch.float32))
    assert same_bits(ours.dequantize(), bnb_portable_dequantize(ours.packed, our_state))


def test_from_bnb_params4bit_is_zero_copy():
    w = random_weight(32, 64, torch.bfloat16, 0)
    param = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).to(DEVICE)
    weight = NF4Weight.from_bnb(param)
    assert weight.packed.data_ptr() == param.data.data_ptr()
    assert weight.absmax.data_ptr() == param.quant_state.absmax.data_ptr()
    assert weight.nested_absmax.data_ptr() == param.quant_state.state2.absmax.data_ptr()
    assert weight.double_quant and weight.shape == (32, 64) and weight.dtype == torch.bfloat16
    assert same_bits(weight.dequantize(), bnb_call(BF.dequantize_4bit, param.data, param.quant_state))
    assert weight.nbytes() == nf4.nf4_storage_bytes(32, 64, double_quant=True)


def test_from_bnb_rejects_fp4_and_missing_state():
    packed, state = BF.quantize_4bit(random_weight(8, 64, torch.float32, 1), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb(packed, state)
    with pytest.raises(ValueError, match="quant_state"):
        NF4Weight.from_bnb(packed)


def test_quantize_roundtrip_error_is_bounded():
    w = random_weight(48, 200, torch.float32, 2)
    weight = NF4Weight.quantize(w)
    block_absmax = weight.absmax.repeat_interleave(64)[: w.numel()].view_as(w)
    max_half_gap = max(b - a for a, b in zip(nf4.NF4_CODE, nf4.NF4_CODE[1:])) / 2
    assert torch.all((weight.dequantize() - w).abs() <= block_absmax * max_half_gap * (1 + 1e-6))
    assert rel_err(weight.dequantize(), w) < 0.12  # ~4-bit precision on Gaussian weights


def test_storage_and_workspace_bytes():
    weight = NF4Weight.quantize(random_weight(40, 96, torch.bfloat16, 3), double_quant=False)
    assert weight.nbytes() == nf4.nf4_storage_bytes(40, 96, double_quant=False) == 40 * 96 // 2 + 4 * 60
    assert nf4.nf4_linear_workspace_bytes(4096, 14336, torch.bfloat16) == 4096 * 14336 * 2
    assert nf4.nf4_linear_workspace_bytes(40, 96, torch.float32) == 40 * 96 * 4


# ----------------------------------------------------------------------------------------- linear op
@HYPOTHESIS
@given(m=st.integers(1, 40), n=st.integers(1, 48), k=st.integers(1, 130), dtype=st.sampled_from(FLOAT_DTYPES),
       double_quant=st.booleans(), batched=st.booleans(), seed=st.integers(0, 2**16))
def test_nf4_linear_forward_backward_match_reference(m, n, k, dtype, double_quant, batched, seed):
    weight = NF4Weight.quantize(random_weight(n, k, torch.float32, seed), double_quant=double_quant)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (2, m, k) if batched else (m, k)
    x = torch.randn(shape, generator=generator).to(dtype).to(DEVICE).requires_grad_()
    w64 = weight.dequantize(torch.float32).double()
    y = weight.linear(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], n)
    assert rel_err(y, x.detach().double() @ w64.T) < LINEAR_TOLERANCE[dtype]
    dy = torch.randn(y.shape, generator=generator).to(dtype).to(DEVICE)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert rel_err(dx, dy.double() @ w64) < LINEAR_TOLERANCE[dtype]


def test_nf4_linear_equals_dequantize_then_linear():
    weight = NF4Weight.quantize(random_weight(24, 64, torch.bfloat16, 4), double_quant=True)
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(weight.linear(x), nf4.nf4_linear_reference(x, weight))


def test_double_backward():
    weight = NF4Weight.quantize(random_weight(12, 64, torch.float32, 5))
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.float64).float().requires_grad_()
    (dx,) = torch.autograd.grad(weight.linear(x).square().sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    w = weight.dequantize(torch.float32).double()
    expected = 2 * (torch.ones(3, 64, dtype=torch.float64, device=DEVICE) @ w.T) @ w
    assert rel_err(ddx, expected) < 1e-5


def test_flop_formula_counts_matmul_flops():
    from torch.utils.flop_counter import FlopCounterMode

    m, n, k = 8, 24, 64
    weight = NF4Weight.quantize(random_weight(n, k, torch.float32, 6))
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        weight.linear(x).sum().backward()
    assert counter.get_total_flops() == 2 * (2 * m * n * k)  # forward + grad-input, no weight gradient


def test_ops_pass_opcheck():
    weight = NF4Weight.quantize(random_weight(16, 64, torch.float32, 7), double_quant=True)
    storage = weight.storage()
    torch.library.opcheck(torch.ops.memgraph.nf4_linear, (torch.randn(3, 64, device=DEVICE, requires_grad=True),
                                                          *storage))
    torch.library.opcheck(torch.ops.memgraph.nf4_linear_grad_input,
                          (torch.randn(3, 16, device=DEVICE, requires_grad=True), *storage))
    torch.library.opcheck(torch.ops.memgraph.nf4_dequantize,
                          (*storage[:5], [16, 64], 64, 256, torch.bfloat16))


def test_traces_under_torch_compile_without_graph_breaks():
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    weight = NF4Weight.quantize(random_weight(32, 64, torch.float32, 8), double_quant=True)

    def step(x, *storage):
        return torch.ops.memgraph.nf4_linear(x, *storage).relu().sum()

    x = torch.randn(2, 7, 64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=True)
    compiled(x, *weight.storage()).backward()
    x_eager = x.detach().clone().requires_grad_()
    step(x_eager, *weight.storage()).backward()
    assert len(graphs) == 1
    nf4_linear = (torch.ops.memgraph.nf4_linear, torch.ops.memgraph.nf4_linear.default)
    assert any(n.target in nf4_linear for n in graphs[0].graph.nodes)
    assert torch.allclose(x.grad, x_eager.grad, rtol=1e-5, atol=1e-6)


def test_torch_fallback_matches_kernel(monkeypatch):
    weight = NF4Weight.quantize(random_weight(20, 70, torch.bfloat16, 9), double_quant=True)
    kernel = weight.dequantize()
    monkeypatch.setattr(nf4, "use_triton", lambda tensor, log: False)
    assert same_bits(weight.dequantize(), kernel)


def test_without_triton_falls_back_to_torch_and_logs_once(monkeypatch, caplog):
    weight = NF4Weight.quantize(random_weight(20, 70, torch.bfloat16, 12), double_quant=True)
    kernel = weight.dequantize()
    monkeypatch.setattr(_dispatch, "HAS_TRITON", False)
    _dispatch._log_once.cache_clear()
    with caplog.at_level("WARNING", logger="memgraph.kernels.nf4"):
        assert same_bits(weight.dequantize(), kernel)
        x = torch.randn(2, 70, device=DEVICE, dtype=torch.bfloat16)
        assert torch.equal(weight.linear(x), nf4.nf4_linear_reference(x, weight))
    assert caplog.text.count("triton is not importable") == 1


# --------------------------------------------------------------------------------------- dispatch paths
# In plain eager the autograd kernel runs the implementation itself (no second dispatcher round trip); whatever
# observes or transforms ops (dispatch modes, fake/functional tensors, functorch, AOTAutograd) must still see them.
NF4_OPS = (torch.ops.memgraph.nf4_linear.default, torch.ops.memgraph.nf4_linear_grad_input.default)


def test_op_schemas_are_stable():
    # The graph pass, the cost model and saved graphs call these by schema; keep it as it was under custom_op.
    storage_args = ("Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
                    "Tensor? nested_offset, SymInt out_features, SymInt in_features, SymInt blocksize, "
                    "SymInt nested_blocksize")
    expected = (f"memgraph::nf4_linear(Tensor x, {storage_args}) -> Tensor",
                f"memgraph::nf4_linear_grad_input(Tensor grad_output, {storage_args}) -> Tensor")
    assert tuple(str(op._schema) for op in NF4_OPS) == expected
    assert all(torch.Tag.pt2_compliant_tag in op.tags for op in NF4_OPS)


def test_plain_eager_is_detected_and_nothing_else():
    weight = NF4Weight.quantize(random_weight(8, 64, torch.float32, 13), double_quant=True)
    storage = weight.storage()
    x = torch.randn(2, 64, device=DEVICE)
    assert _compat.plain_dispatch_context() and _compat.plain_tensors(x, *storage[:5])
    assert _compat.plain_tensors(torch.nn.Parameter(x), *storage[:5])
    with RecordOps():
        assert not _compat.plain_dispatch_context()
    with FakeTensorMode() as fake_mode:
        fake_x = fake_mode.from_tensor(x)
    assert not _compat.plain_tensors(fake_x, *storage[:5])
    assert not _compat.plain_tensors(x.to("meta"), *storage[:5])
    with torch.inference_mode():
        inference_x = torch.randn(2, 64, device=DEVICE)
    assert not _compat.plain_tensors(inference_x, *storage[:5])

    def inside_vmap(row):
        assert not _compat.plain_dispatch_context()
        return row

    torch.func.vmap(inside_vmap)(x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_plain_eager_fwd_bwd_runs_both_matmuls_without_redispatch(device, monkeypatch):
    # On CUDA the backward runs on autograd's device thread: its context must still count as plain eager.
    weight = NF4Weight.quantize(random_weight(8, 64, torch.float32, 14).to(device), double_quant=True)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    below_autograd, calls = nf4._below_autograd, []

    def record(impl, op, activation, storage, direct):
        calls.append((impl.__name__, direct))
        return below_autograd(impl, op, activation, storage, direct)

    monkeypatch.setattr(nf4, "_below_autograd", record)
    torch.autograd.grad(weight.linear(x).sum(), x)
    assert calls == [("_nf4_linear_impl", True), ("_nf4_linear_grad_input_impl", True)]


def test_dispatch_modes_see_forward_and_backward_ops():
    weight = NF4Weight.quantize(random_weight(8, 64, torch.float32, 15), double_quant=True)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    with RecordOps() as recorder:
        torch.autograd.grad(weight.linear(x).sum(), x)
    assert [op for op in recorder.ops if op in NF4_OPS] == list(NF4_OPS)
    y = weight.linear(x)  # forward in plain eager, backward under a mode: the mode still sees grad-input
    with RecordOps() as recorder:
        torch.autograd.grad(y.sum(), x)
    assert [op for op in recorder.ops if op in NF4_OPS] == [NF4_OPS[1]]


@pytest.mark.parametrize("double_quant", [False, True])
def test_direct_and_dispatched_paths_are_bit_identical(double_quant):
    weight = NF4Weight.quantize(random_weight(24, 96, torch.float32, 16), double_quant=double_quant)
    x = torch.randn(5, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(5, 24, device=DEVICE, dtype=torch.bfloat16)
    y = weight.linear(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    with RecordOps():
        y_dispatched = weight.linear(x)
        (dx_dispatched,) = torch.autograd.grad(y_dispatched, x, dy)
    assert same_bits(y, y_dispatched) and same_bits(dx, dx_dispatched)


def test_backward_graph_calls_grad_input_op():
    # AOTAutograd must record nf4_linear_grad_input in the backward graph (the cost model and passes read it).
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    weight = NF4Weight.quantize(random_weight(16, 64, torch.float32, 17), double_quant=True)
    step = aot_function(lambda x, *storage: torch.ops.memgraph.nf4_linear(x, *storage).relu().sum(),
                        fw_compiler=compiler, bw_compiler=compiler)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    step(x, *weight.storage()).backward()
    forward, backward = ({n.target for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs)
    assert NF4_OPS[0] in forward and NF4_OPS[1] in backward


# ----------------------------------------------------------------------------------------------- errors
def _storage(n=8, k=64, double_quant=False):
    return list(NF4Weight.quantize(random_weight(n, k, torch.float32, 10), double_quant=double_quant).storage())


def test_bad_activation_raises():
    storage = _storage()
    with pytest.raises(ValueError, match="last dimension"):
        torch.ops.memgraph.nf4_linear(torch.randn(3, 63, device=DEVICE), *storage)
    with pytest.raises(ValueError, match="must be one of"):
        torch.ops.memgraph.nf4_linear(torch.ones(3, 64, dtype=torch.int32, device=DEVICE), *storage)
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.memgraph.nf4_linear_grad_input(torch.randn(3, 9, device=DEVICE), *storage)


def test_bad_storage_raises():
    storage = _storage()
    wrong_dtype = list(storage)
    wrong_dtype[0] = storage[0].view(torch.int8)
    with pytest.raises(ValueError, match="uint8"):
        torch.ops.memgraph.nf4_linear(torch.randn(2, 64, device=DEVICE), *wrong_dtype)
    non_contiguous = list(storage)
    non_contiguous[0] = storage[0].view(16, 16).t()
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.memgraph.nf4_linear(torch.randn(2, 64, device=DEVICE), *non_contiguous)
    wrong_shape = list(storage)
    wrong_shape[6] = 65  # in_features no longer matches the stored bytes
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.memgraph.nf4_linear(torch.randn(2, 65, device=DEVICE), *wrong_shape)
    wrong_absmax = list(storage)
    wrong_absmax[1] = storage[1].double()
    with pytest.raises(ValueError, match="float32"):
        torch.ops.memgraph.nf4_linear(torch.randn(2, 64, device=DEVICE), *wrong_absmax)
    bad_blocksize = list(storage)
    bad_blocksize[7] = 48
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.memgraph.nf4_linear(torch.randn(2, 64, device=DEVICE), *bad_blocksize)
    nested = _storage(double_quant=True)
    nested[4] = None  # offset missing
    with pytest.raises(ValueError, match="together"):
        torch.ops.memgraph.nf4_linear(torch.randn(2, 64, device=DEVICE), *nested)


def test_bad_storage_raises_at_trace_time():
    storage = _storage()
    compiled = torch.compile(lambda x, *s: torch.ops.memgraph.nf4_linear(x, *s), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="last dimension"):
        compiled(torch.randn(2, 32, device=DEVICE), *storage)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        NF4Weight.quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight.quantize(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="2-D"):
        NF4Weight.quantize(torch.randn(4, 4, 64)).storage()


def test_any_in_features_is_supported():
    # Blocks run over the flattened weight, so in_features need not be a multiple of the block size.
    w = random_weight(5, 37, torch.float32, 11)
    weight = NF4Weight.quantize(w)
    x = torch.randn(3, 37, device=DEVICE)
    assert math.isclose(rel_err(weight.linear(x), x.double() @ weight.dequantize().double().T), 0, abs_tol=1e-5)


# ------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_kernel_bit_identical_to_bitsandbytes_cuda():
    for double_quant in (False, True):
        w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        weight = NF4Weight.from_bnb(packed, state)
        assert same_bits(weight.dequantize(), BF.dequantize_4bit(packed, state, quant_type="nf4"))
        ours = NF4Weight.quantize(w, double_quant=double_quant)
        assert torch.equal(ours.packed, packed)


@pytest.mark.cuda
def test_fwd_bwd_replays_from_a_cuda_graph():
    # benchmarks/bench_nf4.py times nf4_linear fwd+bwd from a CUDA graph: capture must work and replay must match.
    weight = NF4Weight.quantize(torch.randn(256, 512, device="cuda") * 0.02, double_quant=True)
    storage = weight.storage()
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    step = lambda: torch.autograd.grad(torch.ops.memgraph.nf4_linear(x, *storage), x, dy)[0]  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        expected = step()  # warm-up outside the capture (Triton compile, cuBLAS handles, the NF4 table)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):  # replays reuse the captured workspace
        graph.replay()
        torch.cuda.synchronize()
        # cuBLAS may pick another algorithm inside a capture: compare at the linear's tolerance, not bitwise.
        assert rel_err(captured, expected) < LINEAR_TOLERANCE[torch.bfloat16]



def test_dequantize_has_no_derivative():
    """The NF4 storage is frozen: asking for a derivative through the dequantize raises (autograd's fallback would
    only warn and return a wrong gradient); without one it runs."""
    weight = NF4Weight.quantize(torch.randn(8, 16), double_quant=True)
    storage, sizes = list(weight.storage()[:5]), weight.storage()[5:]
    index = next(i for i, t in enumerate(storage) if t is not None and t.is_floating_point())
    storage[index] = storage[index].clone().requires_grad_()
    arguments = (*storage, list(sizes[:2]), sizes[2], sizes[3], torch.float32)
    with pytest.raises(RuntimeError, match="nf4_dequantize has no derivative"):
        torch.ops.memgraph.nf4_dequantize(*arguments)
    with torch.no_grad():
        out = torch.ops.memgraph.nf4_dequantize(*arguments)
    assert torch.equal(out, weight.dequantize(torch.float32))
