"""NF4 frozen weights in bitsandbytes' storage format: Triton dequantize kernel, linear ops, reference.

Storage (byte-compatible with ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")``):
- ``packed``: uint8, ``ceil(N*K/2)`` bytes over the row-major flattened weight; element ``2i`` is the HIGH
  nibble of byte ``i``, element ``2i+1`` the low nibble (bnb keeps it as shape ``[(N*K+1)//2, 1]``).
- ``absmax``: float32, one per block of ``blocksize`` consecutive flattened elements (the last block may be
  short, so any shape works: blocks never need to align with rows).
- double quantization (bnb's ``compress_statistics=True``): ``absmax`` becomes uint8 codes into the 256-entry
  signed dynamic map ``nested_code``, with one float32 ``nested_absmax`` per ``nested_blocksize`` (256) codes
  and a scalar float32 ``nested_offset`` (the mean of the original absmax):
  ``absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + nested_offset`` - a product and then a sum,
  each rounded to float32 (never a fused multiply-add, or the bits would differ from bitsandbytes).
- value = ``NF4_CODE[nibble] * absmax[block]`` computed in float32, then rounded once to the output dtype.

Strategy for the linear (why not a fused dequant-in-GEMM kernel): training runs M = 2048..8192 tokens per
step. Dequantizing W costs N*K*(0.5 + 2) bytes of memory traffic, i.e. ~42 MB ≈ 10 µs for a 4096x4096 layer
on an H200, against ~87 µs for the bf16 GEMM at M=2048 (and ~350 µs at M=8192). A Triton GEMM that decodes
NF4 in its inner loop would have to match cuBLAS's tensor-core efficiency to win, and on Hopper it loses
more than the 3-11% the separate dequantize costs. So both ``nf4_linear`` (y = x Wᵀ) and
``nf4_linear_grad_input`` (dx = dy W) run: Triton dequantize kernel -> one bf16 workspace of N*K elements ->
cuBLAS matmul, and the workspace is released right after the matmul. The caching allocator hands the same
block to the next layer of equal shape, so it behaves as one reused workspace without pinning memory
between layers (and stays visible to memory accounting as a transient; see
``nf4_linear_workspace_bytes``). Decode-sized M (< ~16) would favour a fused GEMV; training never runs there.
Backward dequantizes again instead of saving the bf16 W: saving it would cost ~4x the NF4 bytes per layer. In a
compiled step the joint graph holds ``nf4_dequantize`` and the matmuls instead of these ops
(``passes.nf4.expose_dequantized_weights``), so the planner sees the weight as a value: never saved (a policy,
``cost_model.policies.never_save``), but a backward that recomputes a forward matmul may read its weight for dx too
(``passes.shared_dequantize``).

Host overhead: a 4096->1024 layer's whole fwd+bwd is ~0.1 ms of GPU time at M=2048, so the per-call Python
matters as much as the kernels. The linear ops are registered with torch.library's low-level API (no
custom_op wrappers), each call launches one kernel (double-quantized absmax decoded in registers), and in plain
eager the autograd kernel runs the implementation itself instead of redispatching (see "autograd" below).

Where the kernel runs: CUDA tensors use Triton. CPU tensors use the same Triton kernel under the Triton
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported (the tests do), otherwise the
plain-torch ``nf4_dequantize_reference`` (bit-identical, vectorised, fine for CPU-sized models). Without an
importable triton everything falls back to the torch path (logged once).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from memgraph import _compat
from memgraph.kernels._dispatch import (HAS_TRITON, INTERPRET, builds_graph, device_guard, direct_eager,
                                        persistent_tensor, use_triton)
from memgraph.kernels._launch import launch

log = logging.getLogger("memgraph.kernels.nf4")

__all__ = [
    "NF4Weight",
    "NF4_CODE",
    "NF4_BLOCKSIZE",
    "NESTED_BLOCKSIZE",
    "VALID_BLOCKSIZES",
    "dynamic_map",
    "nf4_dequantize_reference",
    "nf4_linear_reference",
    "nf4_linear_workspace_bytes",
    "nf4_storage_bytes",
]

# NF4 (QLoRA) code table, exactly the float32 values of bitsandbytes.functional.get_4bit_type("nf4").
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCKSIZE = 64  # bitsandbytes' default block of the 4-bit absmax
NESTED_BLOCKSIZE = 256  # bitsandbytes' block of the double-quantized absmax (fixed by its quantize_4bit)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes accepts
NESTED_CODE_SIZE = 256  # entries of the 8-bit dynamic map used for double quantization
_MIN_ABSMAX = 1e-38  # bitsandbytes' guard against all-zero blocks (their values quantize to code 7 = 0.0)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations / dequantized dtypes we support

# Dequantize kernel launch shape: 4096 packed bytes (8192 outputs) per program over 8 warps = 16 bytes per
# thread, i.e. one 16-byte load and two (bf16) or four (fp32) 16-byte stores per thread.
_BYTES_PER_PROGRAM = 4096
_NUM_WARPS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the ops run the plain-torch path
    triton = None
    tl = None


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True, 7, 8)``), float32, sorted."""
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        values += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (NESTED_CODE_SIZE - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


_CODE_CACHE: dict[torch.device, torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    """The NF4 table on ``device`` (a constant of the kernels, not an op input)."""
    code = _CODE_CACHE.get(device)
    if code is None:
        code = _CODE_CACHE[device] = persistent_tensor(
            lambda: torch.tensor(NF4_CODE, dtype=torch.float32, device=device), device)
    return code


# ---------------------------------------------------------------------------------------------- validation
def _check_storage(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                   nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor], numel: int,
                   blocksize: int, nested_blocksize: int) -> None:
    """Clear errors for storage that the kernels would misread (wrong dtype, size, layout or device)."""
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize={blocksize} is not supported; choose one of {list(VALID_BLOCKSIZES)}")
    if packed.dtype != torch.uint8:
        raise ValueError(
            f"NF4 packed weight must be uint8, got {packed.dtype} (bitsandbytes weights stored with another "
            "quant_storage dtype can be passed as param.data.view(torch.uint8))"
        )
    if not packed.is_contiguous():
        raise ValueError("NF4 packed weight must be contiguous (the kernels read it as a flat byte array); "
                         "call .contiguous() on it")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"NF4 packed weight has {packed.numel()} bytes; a weight of {numel} elements needs "
                         f"{(numel + 1) // 2}")
    blocks = -(-numel // blocksize)
    if absmax.numel() != blocks or absmax.dim() != 1:
        raise ValueError(f"NF4 absmax must be 1-D with {blocks} entries ({numel} elements / blocksize "
                         f"{blocksize}), got shape {tuple(absmax.shape)}")
    if not absmax.is_contiguous():
        raise ValueError("NF4 absmax must be contiguous")
    # Runs on every linear call (twice per layer per step), so plain comparisons rather than any()/all()/set
    # generators. Not cached per tensor identity: the bnb pass feeds a fresh .view(torch.uint8) each call, and an
    # in-place `param.data = ...` would keep the identity while changing what the kernel reads.
    if nested_absmax is None:
        if nested_code is not None or nested_offset is not None:
            raise ValueError("double-quantized NF4 needs nested_absmax, nested_code and nested_offset together")
        if absmax.dtype != torch.float32:
            raise ValueError(f"NF4 absmax must be float32 (or uint8 with double quantization), got {absmax.dtype}")
        on_one_device = absmax.device == packed.device
    else:
        if nested_code is None or nested_offset is None:
            raise ValueError("double-quantized NF4 needs nested_absmax, nested_code and nested_offset together")
        if nested_blocksize <= 0:
            raise ValueError(f"nested_blocksize must be positive, got {nested_blocksize}")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"double-quantized NF4 absmax must be uint8 codes, got {absmax.dtype}")
        nested_blocks = -(-blocks // nested_blocksize)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != nested_blocks:
            raise ValueError(f"nested_absmax must be float32 with {nested_blocks} entries, got "
                             f"{nested_absmax.dtype} with {nested_absmax.numel()}")
        if nested_code.dtype != torch.float32 or nested_code.numel() != NESTED_CODE_SIZE:
            raise ValueError(f"nested_code must be float32 with {NESTED_CODE_SIZE} entries, got "
                             f"{nested_code.dtype} with {nested_code.numel()}")
        if nested_offset.dtype != torch.float32 or nested_offset.numel() != 1:
            raise ValueError(f"nested_offset must be a float32 scalar, got {nested_offset.dtype} with "
                             f"{nested_offset.numel()} elements")
        if not (nested_absmax.is_contiguous() and nested_code.is_contiguous()):
            raise ValueError("nested_absmax and nested_code must be contiguous")
        device = packed.device
        on_one_device = (absmax.device == device and nested_absmax.device == device
                         and nested_code.device == device and nested_offset.device == device)
    if not on_one_device:
        tensors = (packed, absmax, nested_absmax, nested_code, nested_offset)
        devices = {str(t.device) for t in tensors if t is not None}
        raise ValueError(f"NF4 storage tensors must be on one device, got {sorted(devices)}")


def _check_activation(x: torch.Tensor, features: int, name: str, packed: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"nf4 linear {name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"nf4 linear {name} has last dimension {tuple(x.shape)[-1:]}, expected {features}")
    if x.device != packed.device:
        raise ValueError(f"nf4 linear {name} is on {x.device} but the NF4 weight is on {packed.device}")


# ------------------------------------------------------------------------------------ reference (plain torch)
def _absmax_float(absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                  nested_offset: Optional[torch.Tensor], nested_blocksize: int) -> torch.Tensor:
    if nested_absmax is None:
        return absmax
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
    # Two separately rounded float32 ops, as bitsandbytes does (dequantize_blockwise, then += offset).
    return nested_code[absmax.long()] * scale + nested_offset.reshape(())


def nf4_dequantize_reference(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                             nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor],
                             shape: Sequence[int], blocksize: int = NF4_BLOCKSIZE,
                             nested_blocksize: int = NESTED_BLOCKSIZE,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch dequantization, bit-identical to ``bitsandbytes.functional.dequantize_4bit``."""
    numel = math.prod(shape)
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:numel].long()
    scale = _absmax_float(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    values = _nf4_code(packed.device)[nibbles] * scale.repeat_interleave(blocksize)[:numel]
    return values.to(dtype).reshape(tuple(shape))


def nf4_linear_reference(x: torch.Tensor, weight: "NF4Weight") -> torch.Tensor:
    """``x @ dequantize(W).T`` with the torch dequantizer (tests compare the op against this and float64)."""
    return F.linear(x, weight.dequantize_reference(x.dtype))


# ------------------------------------------------------------------------------------------- Triton kernel
if triton is not None:

    @triton.jit
    def _nf4_dequantize_kernel(
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, code_ptr, out_ptr,
        n_bytes, numel,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
        BF16_BITS: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    ):
        # One row per absmax block ([blocks, blocksize/2] bytes): each block's scale is loaded once, and
        # consecutive rows are consecutive memory, so a thread's 16 bytes are one 16-byte load.
        HALF: tl.constexpr = BLOCKSIZE // 2
        block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
        in_range = byte < n_bytes
        q = tl.load(packed_ptr + byte, mask=in_range, other=0)
        block_valid = block * HALF < n_bytes
        if NESTED:
            code8 = tl.load(absmax_ptr + block, mask=block_valid, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + code8) * tl.load(
                nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=block_valid, other=0.0)
            scale = scale + tl.load(nested_offset_ptr)  # launched with enable_fp_fusion=False: no FMA
        else:
            scale = tl.load(absmax_ptr + block, mask=block_valid, other=0.0)
        high = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, None]
        low = tl.load(code_ptr + (q & 0xF).to(tl.int32)) * scale[:, None]
        values = tl.interleave(high, low)  # element 2i is the high nibble of byte i
        index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        valid = index < numel  # an odd element count leaves the last low nibble as padding
        if BF16_BITS:
            # The interpreter's float32->bfloat16 cast truncates; round to nearest even on the bits instead.
            bits = values.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(values != values, 0x7FC0, rounded)  # NaN stays the canonical bf16 quiet NaN
            tl.store(out_ptr + index, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
        else:
            tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=valid)


def _check_linear(activation: torch.Tensor, features: int, name: str, packed, absmax, nested_absmax, nested_code,
                  nested_offset, out_features: int, in_features: int, blocksize: int, nested_blocksize: int) -> None:
    """The checks every linear op and its fake run: the NF4 storage of an [out, in] weight, then the activation."""
    _check_storage(packed, absmax, nested_absmax, nested_code, nested_offset, out_features * in_features,
                   blocksize, nested_blocksize)
    _check_activation(activation, features, name, packed)


# ------------------------------------------------------------------------------------------------ launcher
# Everything below runs on every nf4_linear / grad-input call, i.e. twice per layer per training step; at
# M=2048 a 4096x1024 layer's whole fwd+bwd is ~0.1 ms of GPU time, so each µs of Python here is visible.
def _launch_grid(numel: int, blocksize: int) -> tuple[tuple[int], int]:
    """``(grid, blocks per program)``: one program per ``_BYTES_PER_PROGRAM`` packed bytes.

    Plain integer ceil-divisions: recent triton wraps ``triton.cdiv`` as a ConstexprFunction, whose call from
    Python (argument unwrapping) costs ~2 µs.
    """
    blocks_per_program = max(1, _BYTES_PER_PROGRAM // (blocksize // 2))
    blocks = -(-numel // blocksize)
    return (-(-blocks // blocks_per_program),), blocks_per_program


def _dequantize_triton(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                       nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor],
                       shape: Sequence[int], blocksize: int, nested_blocksize: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """One launch: the double-quantized absmax is decoded in registers, never materialised by a second kernel."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)  # allocated in the final shape: no view per call
    numel = out.numel()
    if numel == 0:
        return out
    bf16_bits = INTERPRET and dtype == torch.bfloat16
    nested = nested_absmax is not None
    grid, blocks_per_program = _launch_grid(numel, blocksize)
    with device_guard(packed):
        # Without double quantization the three nested pointers are unused (NESTED=False): absmax stands in.
        launch(
            _nf4_dequantize_kernel, grid,
            packed, absmax,
            nested_absmax if nested else absmax, nested_code if nested else absmax,
            nested_offset if nested else absmax,
            _nf4_code(packed.device), out.view(torch.int16) if bf16_bits else out,
            packed.numel(), numel,
            BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize if nested else 1, NESTED=nested,
            BF16_BITS=bf16_bits, BLOCKS_PER_PROGRAM=blocks_per_program,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
    return out


def _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, shape: Sequence[int], blocksize: int,
                nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight of ``shape`` (the workspace of the linear ops)."""
    if use_triton(packed, log):
        return _dequantize_triton(packed, absmax, nested_absmax, nested_code, nested_offset, shape, blocksize,
                                  nested_blocksize, dtype)
    return nf4_dequantize_reference(packed, absmax, nested_absmax, nested_code, nested_offset, shape, blocksize,
                                    nested_blocksize, dtype)


# --------------------------------------------------------------------------------------------- custom ops
# All three ops are registered with torch.library's low-level API (define / impl) rather than custom_op, whose
# generic Python wrapper costs more host time per call than a dequantize of a small layer takes on the GPU (see
# the linear ops below). The dequantize op runs once per NF4 weight and use in a compiled step
# (``passes.nf4.expose_dequantized_weights``), so its call is as hot as theirs.
_LIB = torch.library.Library("memgraph", "FRAGMENT")  # module-level: the registrations live as long as it does
_LIB.define("nf4_dequantize(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
            "Tensor? nested_offset, SymInt[] shape, SymInt blocksize, SymInt nested_blocksize, ScalarType dtype) "
            "-> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
nf4_dequantize = torch.ops.memgraph.nf4_dequantize
_NF4_DEQUANTIZE = nf4_dequantize.default


def _check_dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, shape, blocksize,
                      nested_blocksize, dtype) -> None:
    _check_storage(packed, absmax, nested_absmax, nested_code, nested_offset, math.prod(shape), blocksize,
                   nested_blocksize)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"NF4 dequantize dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")


def _nf4_dequantize_impl(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                         nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor],
                         shape: Sequence[int], blocksize: int, nested_blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight of ``shape`` in ``dtype``."""
    _check_dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, shape, blocksize,
                      nested_blocksize, dtype)
    return _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, tuple(shape), blocksize,
                       nested_blocksize, dtype)


_LIB.impl("nf4_dequantize", _nf4_dequantize_impl, "CompositeExplicitAutograd")


def _nf4_dequantize_autograd(packed, absmax, nested_absmax, nested_code, nested_offset, *rest):
    """The Autograd-key kernel: the NF4 storage is frozen, so a call that would need a derivative raises (autograd's
    fallback would only warn, and return a wrong gradient)."""
    if builds_graph(packed, absmax, nested_absmax, nested_code, nested_offset):
        raise RuntimeError("memgraph.nf4_dequantize has no derivative: NF4 storage is frozen (call it on tensors that "
                           "do not require grad)")
    with _compat.below_autograd():
        return _NF4_DEQUANTIZE(packed, absmax, nested_absmax, nested_code, nested_offset, *rest)


_LIB.impl("nf4_dequantize", _nf4_dequantize_autograd, "Autograd")


@torch.library.register_fake("memgraph::nf4_dequantize")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, shape, blocksize, nested_blocksize, dtype):
    _check_dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, shape, blocksize,
                      nested_blocksize, dtype)
    return packed.new_empty(shape, dtype=dtype)


# The two linear ops run twice per layer per training step in eager, so they too are registered with the
# low-level API (define / impl / an autograd kernel) instead of torch.library.custom_op. custom_op wraps every
# call in generic Python (default-argument filling for setup_context, an output-aliasing check, a dynamo-disable
# wrapper, a Metadata object, a Python redispatch): for a trivial op, 127 µs against 77 µs per fwd+bwd on a CPU
# host. Schemas, tags, fake impls and autograd behave as they did under custom_op.
_STORAGE_ARGS = ("Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? nested_offset, "
                 "SymInt out_features, SymInt in_features, SymInt blocksize, SymInt nested_blocksize")
_LIB.define(f"nf4_linear(Tensor x, {_STORAGE_ARGS}) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define(f"nf4_linear_grad_input(Tensor grad_output, {_STORAGE_ARGS}) -> Tensor",
            tags=(torch.Tag.pt2_compliant_tag,))
nf4_linear = torch.ops.memgraph.nf4_linear
nf4_linear_grad_input = torch.ops.memgraph.nf4_linear_grad_input
_NF4_LINEAR = nf4_linear.default
_NF4_LINEAR_GRAD_INPUT = nf4_linear_grad_input.default


def _nf4_linear_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                     nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                     nested_offset: Optional[torch.Tensor], out_features: int, in_features: int, blocksize: int,
                     nested_blocksize: int) -> torch.Tensor:
    """``y = x Wᵀ`` for a frozen NF4 ``W`` of shape ``[out_features, in_features]``; y has x's dtype."""
    _check_linear(x, in_features, "input", packed, absmax, nested_absmax, nested_code, nested_offset,
                  out_features, in_features, blocksize, nested_blocksize)
    workspace = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, (out_features, in_features),
                            blocksize, nested_blocksize, x.dtype)
    return F.linear(x, workspace)  # cuBLAS; the workspace is freed when this frame returns


def _nf4_linear_grad_input_impl(grad_output: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                                nested_offset: Optional[torch.Tensor], out_features: int, in_features: int,
                                blocksize: int, nested_blocksize: int) -> torch.Tensor:
    """``dx = dy W`` for a frozen NF4 ``W`` of shape ``[out_features, in_features]``."""
    _check_linear(grad_output, out_features, "grad_output", packed, absmax, nested_absmax, nested_code,
                  nested_offset, out_features, in_features, blocksize, nested_blocksize)
    workspace = _dequantize(packed, absmax, nested_absmax, nested_code, nested_offset, (out_features, in_features),
                            blocksize, nested_blocksize, grad_output.dtype)
    return torch.matmul(grad_output, workspace)


_LIB.impl("nf4_linear", _nf4_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("nf4_linear_grad_input", _nf4_linear_grad_input_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("memgraph::nf4_linear")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features, blocksize,
      nested_blocksize):
    _check_linear(x, in_features, "input", packed, absmax, nested_absmax, nested_code, nested_offset,
                  out_features, in_features, blocksize, nested_blocksize)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("memgraph::nf4_linear_grad_input")
def _(grad_output, packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features, blocksize,
      nested_blocksize):
    _check_linear(grad_output, out_features, "grad_output", packed, absmax, nested_absmax, nested_code,
                  nested_offset, out_features, in_features, blocksize, nested_blocksize)
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


# ------------------------------------------------------------------------------------------------ autograd
# What the dispatcher does between the autograd kernel and ours for ordinary dense CPU/CUDA tensors with no
# Python dispatch mode, functorch transform or tracer active: nothing. Calling the implementation directly then
# saves a C++ -> Python round trip (boxing 10 arguments) per call. Anything else - FakeTensor, FunctionalTensor,
# FlopCounterMode, vmap, jit.trace, the profiler, inference tensors - goes through the dispatcher, which sees
# (records) the op.
def _below_autograd(impl, op, activation: torch.Tensor, storage: tuple, direct: bool) -> torch.Tensor:
    """The op's result without autograd history: ``impl`` itself when ``direct``, else a redispatch."""
    if direct:
        return impl(activation, *storage)
    with _compat.below_autograd():
        return op(activation, *storage)


def _nf4_matmul_function(impl, op, transpose_impl, transpose_op) -> type:
    """The autograd.Function of one of the two NF4 matmul ops, whose gradient is the other op.

    ``y = x Wᵀ`` has ``dx = dy W`` and ``dx = dy W`` has ``d(dy) = d(dx) Wᵀ``: each backward dequantizes W again
    instead of saving it (saving the bf16 W would cost ~4x the NF4 bytes per layer). The storage travels as one
    tuple argument: ``apply`` then tracks 1 activation instead of 10 inputs and backward returns 2 gradients.
    """

    class NF4MatmulFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, activation, storage, direct):
            ctx.save_for_backward(*storage[:5])  # the frozen, already resident NF4 tensors (version-checked)
            ctx.sizes = storage[5:]
            ctx.direct = direct
            return _below_autograd(impl, op, activation, storage, direct)

        @staticmethod
        def backward(ctx, grad):
            if not ctx.needs_input_grad[0]:
                return None, None, None
            storage = (*ctx.saved_tensors, *ctx.sizes)
            if torch.is_grad_enabled():  # create_graph=True: the gradient needs its own autograd history
                return transpose_op(grad, *storage), None, None
            # Backward has its own context (a mode may be entered between forward and backward).
            direct = ctx.direct and direct_eager(grad)
            return _below_autograd(transpose_impl, transpose_op, grad, storage, direct), None, None

    return NF4MatmulFunction


def _autograd_kernel(function, impl, op):
    """The op's Autograd-key kernel: only the activation can need a gradient (the NF4 weight is frozen)."""

    def kernel(activation, *storage):
        # the storage must be on the activation's device anyway: the same keys
        direct = direct_eager(activation, *storage[:5])
        if activation.requires_grad and torch.is_grad_enabled():
            return function.apply(activation, storage, direct)
        return _below_autograd(impl, op, activation, storage, direct)

    return kernel


_NF4LinearFunction = _nf4_matmul_function(_nf4_linear_impl, _NF4_LINEAR, _nf4_linear_grad_input_impl,
                                          _NF4_LINEAR_GRAD_INPUT)
_NF4LinearGradInputFunction = _nf4_matmul_function(_nf4_linear_grad_input_impl, _NF4_LINEAR_GRAD_INPUT,
                                                   _nf4_linear_impl, _NF4_LINEAR)
_LIB.impl("nf4_linear", _autograd_kernel(_NF4LinearFunction, _nf4_linear_impl, _NF4_LINEAR), "Autograd")
_LIB.impl("nf4_linear_grad_input",
          _autograd_kernel(_NF4LinearGradInputFunction, _nf4_linear_grad_input_impl, _NF4_LINEAR_GRAD_INPUT),
          "Autograd")


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def matmul_flops(activation_shape, *args, out_shape=None, **kwargs) -> int:
        # [M.., A] x [A, B] -> [M.., B]: 2*M*A*B multiply-adds, whichever direction.
        return 2 * math.prod(out_shape) * activation_shape[-1]

    def dequantize_flops(*args, out_shape=None, **kwargs) -> int:
        return math.prod(out_shape)  # one multiply per element

    for packet, formula in ((torch.ops.memgraph.nf4_linear, matmul_flops),
                            (torch.ops.memgraph.nf4_linear_grad_input, matmul_flops),
                            (torch.ops.memgraph.nf4_dequantize, dequantize_flops)):
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


_register_flop_formulas()


# ------------------------------------------------------------------------------------------ cost-model API
def nf4_linear_workspace_bytes(out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Transient bytes one nf4_linear / nf4_linear_grad_input call allocates beyond its output.

    The dequantized weight ``[out_features, in_features]`` in the activation dtype, alive from the dequantize
    kernel until the matmul returns (double-quantized absmax is decoded in registers: no extra buffer).
    Works with ints or sympy expressions.
    """
    return out_features * in_features * dtype.itemsize


def _register_scratch_formulas() -> None:
    """The cost model counts each matmul's dequantized weight while the op runs (112 MiB for Llama-3-8B's MLP
    projections: the largest transient of a short step's backward)."""
    from memgraph.cost_model.values import register_scratch

    register_scratch(_NF4_LINEAR, lambda x, out_features, in_features, **_: nf4_linear_workspace_bytes(
        out_features, in_features, x.dtype))
    register_scratch(_NF4_LINEAR_GRAD_INPUT, lambda grad_output, out_features, in_features, **_:
                     nf4_linear_workspace_bytes(out_features, in_features, grad_output.dtype))


_register_scratch_formulas()


def _register_never_saved() -> None:
    """A compiled step's dequantized weight (``passes.nf4.expose_dequantized_weights``) is recomputed wherever
    backward needs it: saving it would hold 4x (bf16) its NF4 bytes per weight for the whole step."""
    from memgraph.cost_model.policies import register_never_saved

    register_never_saved(_NF4_DEQUANTIZE, "a frozen NF4 weight's dequantized copy (recomputed from its storage)")


_register_never_saved()


def nf4_storage_bytes(out_features: int, in_features: int, blocksize: int = NF4_BLOCKSIZE,
                      double_quant: bool = True, nested_blocksize: int = NESTED_BLOCKSIZE) -> int:
    """Resident bytes of one NF4 weight (packed nibbles + absmax, + nested state when double-quantized)."""
    numel = out_features * in_features
    blocks = -(-numel // blocksize)
    if not double_quant:
        return (numel + 1) // 2 + 4 * blocks
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // nested_blocksize) + 4 * NESTED_CODE_SIZE + 4


# ------------------------------------------------------------------------------------------------- storage
class NF4Weight:
    """A frozen weight in bitsandbytes' NF4 storage format (see the module docstring for the layout)."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
                 blocksize: int = NF4_BLOCKSIZE, nested_absmax: Optional[torch.Tensor] = None,
                 nested_code: Optional[torch.Tensor] = None, nested_offset: Optional[torch.Tensor] = None,
                 nested_blocksize: int = NESTED_BLOCKSIZE) -> None:
        self.packed = packed
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_offset = nested_offset
        self.nested_blocksize = int(nested_blocksize)
        _check_storage(packed, absmax, nested_absmax, nested_code, nested_offset, self.numel, self.blocksize,
                       self.nested_blocksize)

    # ---- construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = False,
                 nested_blocksize: int = NESTED_BLOCKSIZE) -> "NF4Weight":
        """Quantize like ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant,
        quant_type="nf4")``: same packed bytes and absmax. The double-quant codes are the nearest entries of the
        dynamic map (as bitsandbytes' CUDA kernel picks them; its CPU kernel uses a 65536-bin lookup table that
        can pick a neighbour one code away)."""
        if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"NF4 quantize needs a float32/bfloat16/float16 tensor, got "
                             f"{getattr(weight, 'dtype', type(weight))}")
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"NF4 blocksize={blocksize} is not supported; choose one of {list(VALID_BLOCKSIZES)}")
        if weight.numel() == 0:
            raise ValueError("NF4 quantize needs a non-empty tensor")
        with torch.no_grad():
            flat = weight.detach().reshape(-1).float()
            code = _nf4_code(flat.device)
            scaled, absmax = _blockwise_scale(flat, blocksize)
            if scaled.numel() % 2:
                scaled = F.pad(scaled, (0, 1))  # the padding nibble is code 7 (0.0), as bitsandbytes writes
            nibbles = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
            packed = ((nibbles[0::2] << 4) | nibbles[1::2]).unsqueeze(1)
            if not double_quant:
                return cls(packed, absmax, weight.shape, weight.dtype, blocksize)
            offset = absmax.mean()
            nested_code = dynamic_map().to(flat.device)
            scaled_absmax, nested_absmax = _blockwise_scale(absmax - offset, nested_blocksize)
            codes = torch.bucketize(scaled_absmax, (nested_code[:-1] + nested_code[1:]) / 2, out_int32=True)
            return cls(packed, codes.to(torch.uint8), weight.shape, weight.dtype, blocksize, nested_absmax,
                       nested_code, offset, nested_blocksize)

    @classmethod
    def from_bnb(cls, param: torch.Tensor, quant_state=None) -> "NF4Weight":
        """Zero-copy view of a ``bitsandbytes.nn.Params4bit`` (or a packed tensor plus its ``QuantState``)."""
        state = quant_state if quant_state is not None else getattr(param, "quant_state", None)
        if state is None:
            raise ValueError("from_bnb needs a bitsandbytes Params4bit with a quant_state (quantize it by moving it "
                             "to a device first) or an explicit quant_state")
        if getattr(state, "quant_type", None) != "nf4":
            raise ValueError(f"from_bnb supports quant_type='nf4' only, got {getattr(state, 'quant_type', None)!r}")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("this Params4bit was repacked for bitsandbytes' CPU inference kernel; move it to the "
                             "accelerator (or reload it) to restore the standard layout")
        code = state.code
        if code is not None and not torch.equal(code.detach().float().cpu(), torch.tensor(NF4_CODE)):
            raise ValueError("quant_state.code is not the NF4 table")
        data = param.data if isinstance(param, torch.nn.Parameter) else param
        packed = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        if state.nested:
            offset = state.offset
            if not isinstance(offset, torch.Tensor):
                offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
            return cls(packed, state.absmax, state.shape, state.dtype, state.blocksize, state.state2.absmax,
                       state.state2.code, offset, state.state2.blocksize)
        return cls(packed, state.absmax, state.shape, state.dtype, state.blocksize)

    # ---- properties
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def storage(self) -> tuple:
        """The op arguments after the activation: tensors, then ints (for the 2-D weight of a linear)."""
        if len(self.shape) != 2:
            raise ValueError(f"an NF4 linear weight must be 2-D [out_features, in_features], got {tuple(self.shape)}")
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.nested_offset,
                self.shape[0], self.shape[1], self.blocksize, self.nested_blocksize)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.nested_absmax,
                                                         self.nested_code, self.nested_offset) if t is not None)

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         move(self.nested_absmax), move(self.nested_code), move(self.nested_offset),
                         self.nested_blocksize)

    # ---- compute
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the dtype it was quantized from), via the Triton kernel."""
        return torch.ops.memgraph.nf4_dequantize(self.packed, self.absmax, self.nested_absmax, self.nested_code,
                                                 self.nested_offset, list(self.shape), self.blocksize,
                                                 self.nested_blocksize, dtype or self.dtype)

    def dequantize_reference(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return nf4_dequantize_reference(self.packed, self.absmax, self.nested_absmax, self.nested_code,
                                        self.nested_offset, self.shape, self.blocksize, self.nested_blocksize,
                                        dtype or self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` through ``torch.ops.memgraph.nf4_linear``."""
        return torch.ops.memgraph.nf4_linear(x, *self.storage())

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamp(x * (1/absmax_block), -1, 1), absmax)`` per block of the flat float32 tensor (short last block).

    Multiplying by the float32 reciprocal (not dividing) is what bitsandbytes does; it decides rounding ties.
    """
    numel = flat.numel()
    blocks = -(-numel // blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - numel)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inverse = 1.0 / absmax.clamp(min=_MIN_ABSMAX)
    scaled = torch.clamp(padded * inverse[:, None], -1, 1).reshape(-1)[:numel]
    return scaled, absmax
