"""memgraph.kernels._launch: the direct launch path picks the binary Triton would pick (its specialization key is
at least as fine as Triton's own), launches it with the arguments in parameter order, and falls back to Triton's
path when it cannot."""
from __future__ import annotations

import enum
import logging
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memgraph.kernels import _launch

try:  # Triton's own per-argument specializer (private; the reference for the key)
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:
    native_specialize_impl = None

needs_triton_specializer = pytest.mark.skipif(native_specialize_impl is None,
                                              reason="this triton has no native_specialize_impl")


def _triton_specialization(value):
    return native_specialize_impl(BaseBackend, value, False, True, True)


class _Size(enum.IntEnum):
    ONE = 1
    THIRTY_TWO = 32


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32]
_BASE = torch.zeros(4096, dtype=torch.uint8)


def _tensor(dtype, offset_bytes):
    """A view whose data pointer is offset_bytes past a 64-byte-aligned allocation's start."""
    size = torch.tensor([], dtype=dtype).element_size()
    start = offset_bytes // size * size
    return _BASE[start:start + 64].view(dtype)


_INTS = st.one_of(st.integers(-40, 40), st.sampled_from([1, 16, 32, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
                                                          -(2**31), -(2**31) - 16, 2**63 - 16, 2**63, 2**64 - 16]),
                  st.integers(-(2**40), 2**40))
_VALUES = st.one_of(_INTS, st.floats(allow_nan=False), st.booleans(), st.none(),
                    st.builds(_tensor, st.sampled_from(_DTYPES), st.integers(0, 63)),
                    st.sampled_from([_Size.ONE, _Size.THIRTY_TWO]))


@needs_triton_specializer
@settings(max_examples=40, deadline=None)
@given(values=st.lists(_VALUES, min_size=20, max_size=60))
def test_one_key_never_covers_two_triton_specializations(values):
    """Grouped by our key, every group has one Triton specialization: a cached binary is never reused for
    arguments Triton would compile differently (a finer key only costs a lookup)."""
    seen = {}
    for value in values:
        key = _launch.specialization_key((value,), {})
        seen.setdefault(key, set()).add(_triton_specialization(value))
    for key, specializations in seen.items():
        assert len(specializations) == 1, (key, specializations)


def test_keys_tell_apart_what_triton_specializes_on():
    key = lambda *args, **meta: _launch.specialization_key(args, meta)  # noqa: E731
    assert key(1) != key(2) and key(16) != key(17) and key(16) == key(32) and key(3) == key(5)
    assert key(2**31 - 16) != key(2**31) and key(2**63 - 16) != key(2**63)
    assert key(_tensor(torch.float32, 0)) != key(_tensor(torch.float32, 4))
    assert key(_tensor(torch.float32, 0)) != key(_tensor(torch.bfloat16, 0))
    assert key(_tensor(torch.float32, 0)) == key(_tensor(torch.float32, 16))
    assert key(1.0) == key(2.5) and key(True) == key(False) and key(True) != key(1) and key(None) != key(0)
    assert key(4, BLOCK=16) != key(4, BLOCK=32) and key(4, num_warps=4) != key(4, num_warps=8)
    # a positional constexpr is keyed by its value, as Triton compiles one binary per value
    assert (_launch.specialization_key((4, 5), {}, (1,)) != _launch.specialization_key((4, 6), {}, (1,)))
    # values of another type are never merged with equal ones: Triton compiles True, 1 and 1.0 apart
    assert key(4, FLAG=True) != key(4, FLAG=1) != key(4, FLAG=1.0) and key(4, X=0.0) != key(4, X=-0.0)
    # an int subclass is keyed by value (Triton specializes IntEnum(1) as the constant 1)
    assert key(_Size.ONE) != key(_Size.THIRTY_TWO) and key(_Size.ONE) != key(1)



# ------------------------------------------------------------------------------------------------------------
# The launch path's mechanics, on a stand-in for a JITFunction and its CompiledKernel (no GPU needed)
# ------------------------------------------------------------------------------------------------------------
class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "function", "metadata"

    def _init_handles(self):
        pass

    def run(self, *args):
        self.log.append(("direct", args))


class _Kernel:
    """X, n, then the constexprs BLOCK and FLAG (FLAG has a default)."""

    def __init__(self):
        self.calls = []
        param = lambda name, constexpr, default=None: types.SimpleNamespace(  # noqa: E731
            name=name, is_constexpr=constexpr, has_default=default is not None, default=default)
        self.params = [param("X", False), param("n", False), param("BLOCK", True), param("FLAG", True, 7)]
        self.__name__ = "kernel"

    error = None  # a callable that raises: Triton's own launch refuses the arguments too

    def __getitem__(self, grid):
        def run(*args, **meta):
            if self.error is not None:
                self.error()
            self.calls.append(("triton", grid, args, meta))
            return _Compiled(self.calls)
        return run


@pytest.fixture
def direct_path(monkeypatch):
    monkeypatch.setattr(_launch._State, "enabled", True)
    monkeypatch.setattr(_launch, "_KERNELS", {})
    monkeypatch.setattr(_launch._compat, "current_cuda_device", lambda: 0, raising=False)
    monkeypatch.setattr(_launch._compat, "current_raw_stream", lambda device: 1234, raising=False)


def test_later_launches_call_the_binary_with_every_parameter_in_order(direct_path):
    kernel = _Kernel()
    x = torch.zeros(8)
    _launch.launch(kernel, (3,), x, 5, BLOCK=16, num_warps=4)
    _launch.launch(kernel, (4, 2), x, 7, BLOCK=16, num_warps=4)
    assert [call[0] for call in kernel.calls] == ["triton", "direct"]
    assert kernel.calls[1][1] == (4, 2, 1, 1234, "function", "metadata", None, None, None, x, 7, 16, 7)


@pytest.mark.parametrize("change", ["int becomes 1", "other dtype", "misaligned", "constexpr", "option"])
def test_another_specialization_goes_through_triton_again(direct_path, change):
    kernel = _Kernel()
    x = torch.zeros(8)
    _launch.launch(kernel, (1,), x, 5, BLOCK=16, num_warps=4)
    args, meta = {"int becomes 1": ((x, 1), {"BLOCK": 16, "num_warps": 4}),
                  "other dtype": ((x.half(), 5), {"BLOCK": 16, "num_warps": 4}),
                  "misaligned": ((x[1:], 5), {"BLOCK": 16, "num_warps": 4}),
                  "constexpr": ((x, 5), {"BLOCK": 32, "num_warps": 4}),
                  "option": ((x, 5), {"BLOCK": 16, "num_warps": 8})}[change]
    _launch.launch(kernel, (1,), *args, **meta)
    assert [call[0] for call in kernel.calls] == ["triton", "triton"]


def _raising(error: BaseException):
    def call(*args, **meta):
        raise error
    return call


def _launched_once(kernel, x):
    """Launch once (Triton's path) and return the binary kept for later launches."""
    _launch.launch(kernel, (1,), x, 5, BLOCK=16)
    (binary,) = _launch.cached_binaries().values()
    return binary


def test_a_refused_direct_launch_falls_back_once_and_for_all(direct_path, caplog):
    kernel = _Kernel()
    x = torch.zeros(8)
    _launched_once(kernel, x).run = _raising(TypeError("launcher takes 12 arguments"))
    with caplog.at_level(logging.WARNING, logger="memgraph.kernels.launch"):
        _launch.launch(kernel, (1,), x, 5, BLOCK=16)
        _launch.launch(kernel, (1,), x, 5, BLOCK=16)
    assert [call[0] for call in kernel.calls] == ["triton"] * 3
    assert not _launch.fast_launch_enabled()
    assert "launcher takes 12 arguments" in caplog.text and caplog.text.count("direct Triton launch failed") == 1


def test_arguments_triton_refuses_too_raise_and_keep_the_direct_path(direct_path):
    """A caller's mistake (Triton's own launch raises as well) is the caller's error, not the path's."""
    kernel = _Kernel()
    x = torch.zeros(8)
    _launched_once(kernel, x).run = kernel.error = _raising(ValueError("pointer argument is a CPU tensor"))
    with pytest.raises(ValueError, match="CPU tensor"):
        _launch.launch(kernel, (1,), x, 5, BLOCK=16)
    assert _launch.fast_launch_enabled()


def test_unhashable_arguments_take_tritons_path(direct_path):
    kernel = _Kernel()
    _launch.launch(kernel, (1,), torch.zeros(8), [1, 2], BLOCK=16)
    _launch.launch(kernel, (1,), torch.zeros(8), [1, 2], BLOCK=16)
    assert [call[0] for call in kernel.calls] == ["triton", "triton"] and not _launch.cached_binaries()


def test_an_installed_launch_hook_gets_every_launch(direct_path, monkeypatch):
    kernel = _Kernel()
    x = torch.zeros(8)
    _launch.launch(kernel, (1,), x, 5, BLOCK=16)
    monkeypatch.setattr(_launch, "_hooks_installed", lambda: True)
    _launch.launch(kernel, (1,), x, 5, BLOCK=16)
    assert [call[0] for call in kernel.calls] == ["triton", "triton"]


def test_a_missing_parameter_keeps_tritons_path(direct_path):
    kernel = _Kernel()
    kernel.params[3].has_default = False  # FLAG now required, and not given: Triton's own call decides
    _launch.launch(kernel, (1,), torch.zeros(8), 5, BLOCK=16)
    assert not _launch.cached_binaries() and not _launch.fast_launch_enabled()


def test_hook_chains_count_only_when_they_hold_hooks():
    assert not _launch._active(None)
    assert not _launch._active(types.SimpleNamespace(calls=[]))
    assert _launch._active(types.SimpleNamespace(calls=[print]))
    assert _launch._active(print)


# ------------------------------------------------------------------------------------------------------------
# On the GPU: the direct path runs the very binary Triton selects, with the same results
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_gpu_direct_launch_runs_tritons_binary():
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_copy(X, OUT, n, factor, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(OUT + offsets, tl.load(X + offsets, mask=offsets < n) * factor, mask=offsets < n)

    assert _launch.fast_launch_enabled()
    for n, offset in [(1000, 0), (1000, 1), (1024, 0), (1, 0), (17, 3)]:
        x = torch.randn(n + offset, device="cuda")[offset:]
        first, second = torch.empty_like(x), torch.empty_like(x)
        grid = (triton.cdiv(n, 128),)
        _launch.launch(scaled_copy, grid, x, first, n, 2.0, BLOCK=128)  # Triton's path, kept
        _launch.launch(scaled_copy, grid, x, second, n, 2.0, BLOCK=128)  # direct
        assert torch.equal(first, x * 2) and torch.equal(second, x * 2)
        key = (scaled_copy, torch.cuda.current_device(),
               _launch.specialization_key((x, second, n, 2.0), {"BLOCK": 128}, (4,)))
        binary = _launch.cached_binaries()[key]
        compiled = scaled_copy.warmup(x, second, n, 2.0, BLOCK=128, grid=grid)
        assert binary.function == compiled.function  # the binary Triton selects for these arguments
