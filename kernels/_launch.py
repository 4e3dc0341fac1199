"""Launch memgraph's Triton kernels with less host work than ``kernel[grid](...)``.

A training step launches our kernels ~2,500 times (Llama-3-8B QLoRA at 2048 tokens: LoRA reductions, NF4
dequantization), and at that size the step is host-bound: the host needs longer to issue it than the GPU to run
it. ``JITFunction.run`` does, per launch: bind the arguments and specialize each one, hash the specialization
with the options into a cache key, read Triton's knobs, check the kernel's globals, build launch metadata, then
call the compiled binary's C launcher. Inductor's own kernels skip all of that: their launcher is made once per
compiled binary and calls it directly. ``launch`` does the same for ours:

* the first launch of a kernel for a given specialization goes through ``kernel[grid](...)`` (Triton compiles or
  finds the binary, and launches it) and keeps the binary it returns;
* later launches with the same specialization key call that binary's launcher with the arguments in parameter
  order (constexprs included, as Triton >= 3.3 passes them).

The key is built from exactly what Triton specializes a runtime argument on, or finer (``specialization_key``):
a tensor's dtype and 16-byte alignment; an int's value 1, divisibility by 16 and integer width; a bool's, float's
or None's type; any other value itself. Constexprs and options (such as ``num_warps``) are part of the key with
their values and types. A finer key costs at most an extra lookup in Triton's own cache, never a wrong binary.

Under the interpreter, with a launch hook installed (a Triton profiler) or with ``MEMGRAPH_FAST_LAUNCH=0``
every launch is Triton's own. If the direct call fails (a Triton release changed its launcher), that failure is
logged once and Triton's path serves every later launch.

The Triton internals read here (``CompiledKernel.run / function / packed_metadata``, ``knobs.runtime``'s launch
hooks) are the ones Inductor's launcher reads too; torch's private stream query is in ``memgraph._compat``.
"""
from __future__ import annotations

import logging
import os

import torch

from memgraph import _compat
from memgraph.kernels._dispatch import HAS_TRITON, INTERPRET

__all__ = ["launch", "specialization_key", "fast_launch_enabled"]

log = logging.getLogger("memgraph.kernels.launch")

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_UINT64_FROM = 2**63
_ALIGNMENT_MASK = 15  # Triton marks a pointer (and an int) divisible by 16 as aligned
_TENSOR = torch.Tensor


class _State:
    enabled = HAS_TRITON and not INTERPRET and os.environ.get("MEMGRAPH_FAST_LAUNCH", "1") != "0"


if HAS_TRITON:
    from triton import knobs as _KNOBS


def fast_launch_enabled() -> bool:
    return _State.enabled


def _value_key(value):
    """A constexpr's or option's value with its type (Triton compiles ``True``, ``1`` and ``1.0`` apart; floats
    by their text, so ``-0.0`` and ``0.0`` differ too)."""
    kind = type(value)
    return kind, repr(value) if kind is float else value


def specialization_key(args: tuple, meta: dict, constexpr_positions: tuple = ()) -> tuple:
    """What selects a compiled binary for these arguments, as one flat tuple: per runtime argument what Triton
    specializes it on (a tensor: its dtype, then its 16-byte alignment; an int: 1, divisible by 16, or neither,
    and its width beyond int32; a bool, float or None: its type; anything else, e.g. an int subclass: its type
    and value), the values of positional constexprs, and the keyword arguments' values (constexprs and options),
    each with its type. Only a tensor contributes a dtype, always followed by its alignment, so the tuple reads
    back one way: two different specializations never give one key. ~2.5 µs for a 16-argument kernel."""
    key = []
    append = key.append
    for value in args:
        kind = type(value)
        if kind is int:
            if _INT32_MIN <= value <= _INT32_MAX:
                append(1 if value == 1 else (0 if value & _ALIGNMENT_MASK else 16))
            else:
                append((value >= _UINT64_FROM, not value & _ALIGNMENT_MASK))
        elif kind is _TENSOR or isinstance(value, _TENSOR):
            append(value.dtype)
            append(not value.data_ptr() & _ALIGNMENT_MASK)
        elif kind is bool or kind is float or value is None:  # u1, fp32, constexpr None: never by value
            append(kind)
        else:  # IntEnum, tl.constexpr, tuples, ...: by value (finer than Triton, never coarser)
            append((kind, value))
    for position in constexpr_positions:
        if position < len(args):
            append(("constexpr", _value_key(args[position])))
    kinds = tuple(map(type, meta.values()))
    if float in kinds:  # 0.0 == -0.0: floats by their text
        append(tuple((name, _value_key(value)) for name, value in meta.items()))
    else:  # values and their types (True == 1 but compiles apart)
        append(tuple(meta.items()))
        append(kinds)
    return tuple(key)


class _Binary:
    """A compiled kernel's direct launcher and the constexpr values that follow the positional arguments."""

    __slots__ = ("compiled", "run", "function", "metadata", "tail")

    def __init__(self, compiled, tail: tuple):
        compiled._init_handles()
        self.compiled = compiled  # keeps the module loaded (a CompiledKernel unloads it when collected)
        self.run = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.tail = tail


class _KernelCache:
    """One kernel's binaries by (device, specialization key), and the positions of its constexpr parameters."""

    __slots__ = ("kernel", "constexpr_positions", "binaries")

    def __init__(self, kernel):
        self.kernel = kernel  # held: the id this cache is found under is never reused
        self.constexpr_positions = tuple(i for i, p in enumerate(kernel.params) if p.is_constexpr)
        self.binaries: dict = {}


# id(kernel) -> _KernelCache: a JITFunction hashes through its source's cache key (~0.4 µs a lookup)
_KERNELS: dict = {}


def _kernel_cache(kernel) -> _KernelCache:
    cache = _KERNELS.get(id(kernel))
    if cache is None:
        cache = _KERNELS[id(kernel)] = _KernelCache(kernel)
    return cache


def cached_binaries() -> dict:
    """Every kept binary by (kernel, device, specialization key)."""
    return {(cache.kernel, *device_and_key): binary for cache in _KERNELS.values()
            for device_and_key, binary in cache.binaries.items()}


def _tail(kernel, args: tuple, meta: dict) -> tuple:
    """The parameters after the positional ones, in order: from ``meta`` or the parameter's default."""
    tail = []
    for param in kernel.params[len(args):]:
        if param.name in meta:
            tail.append(meta[param.name])
        elif param.has_default:
            tail.append(param.default)
        else:
            raise TypeError(f"{kernel.__name__}: no value for parameter {param.name!r}")
    return tuple(tail)


def _hooks_installed() -> bool:
    """A launch hook (a Triton profiler such as Proton) wants every launch through Triton's own path."""
    runtime = _KNOBS.runtime
    return _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)


def _active(hook) -> bool:
    """A hook that does something: not None, and (triton >= 3.7's HookChain) not an empty chain."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else bool(calls)


def _disable(reason: BaseException) -> None:
    _State.enabled = False
    log.warning("memgraph's direct Triton launch failed (%s: %s); every launch goes through Triton's "
                "JITFunction.run from now on (same kernels, more host time per launch)", type(reason).__name__,
                reason)


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, with Triton's per-launch host work done once per specialization.
    ``grid`` is a tuple of up to three ints; ``args`` are the kernel's leading parameters, ``meta`` its
    constexprs (by name) and launch options. Not followed by the direct path: Triton's debug and instrumentation
    knobs changed after a kernel's first launch (set them before), and its check that a kernel's globals did not
    change since it was compiled (memgraph's kernels read constants only)."""
    if not _State.enabled or _hooks_installed():
        kernel[grid](*args, **meta)
        return
    device = _compat.current_cuda_device()
    cache = _kernel_cache(kernel)
    cache_key = (device, specialization_key(args, meta, cache.constexpr_positions))
    try:
        binary = cache.binaries.get(cache_key)
    except TypeError:  # an unhashable argument (a list): Triton's path, uncached
        kernel[grid](*args, **meta)
        return
    if binary is None:
        compiled = kernel[grid](*args, **meta)  # compiles (or finds) and launches
        if getattr(kernel, "pre_run_hooks", None):
            return  # hooks that must see every launch
        try:
            cache.binaries[cache_key] = _Binary(compiled, _tail(kernel, args, meta))
        except Exception as error:  # not the CompiledKernel layout this module knows: keep Triton's path
            _disable(error)
        return
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    try:
        binary.run(grid_x, grid_y, grid_z, _compat.current_raw_stream(device), binary.function, binary.metadata,
                   None, None, None, *args, *binary.tail)
    except (TypeError, ValueError, SystemError) as error:  # the launcher refused its arguments: nothing ran
        kernel[grid](*args, **meta)  # the caller's mistake raises here, and the direct path stays on
        _disable(error)  # Triton's launch worked where ours did not: Triton's path from now on
