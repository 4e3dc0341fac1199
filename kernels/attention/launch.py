"""Launching memgraph.attention's kernels: configurations (autotuned on CUDA, small fixed blocks under the
interpreter), the launchers of the forward, the K/V (de)quantization and the backward, and ``kernel_runner``
(one kernel alone, for ``benchmarks/bench_attention.py --tune``)."""
import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from memgraph.kernels._dispatch import HAS_TRITON, INTERPRET, device_guard
from memgraph.kernels._launch import launch
from memgraph.kernels.attention.triton_kernels import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                                       _attn_bwd_stats_kernel, _attn_fwd_kernel,
                                                       _dequantize_kv_kernel, _quantize_kv_kernel,
                                                       _sum_partials_kernel, triton)
from memgraph.kernels.kv_quant import K_GROUP_TOKENS, PACKED_DTYPES, packed_kv_shapes

# ------------------------------------------------------------------------------------------------------------
# Launch configurations: autotuned on CUDA, small fixed blocks under the interpreter
# ------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (16 and 32 use the 64 lists). BLOCK_M counts
# query rows, BLOCK_N keys, in every kernel. The first entry is the default when autotuning is off: for D=128 (and
# dK/dV at D=256) the fastest one measured on an H200 (benchmarks/results/attention_tuning.json, S=2048 and 8192,
# the same winner at both). How the entries were chosen, for Hopper (sm_90):
# * wgmma computes 64 rows per warpgroup (4 warps): the tile side that carries an MMA's rows (fwd/stats/dQ:
#   BLOCK_M, dK/dV: BLOCK_N) is 64 with 4 warps or 128 with 8 warps. The other side is the dK/dV step's BLOCK_M
#   (32 or 64 query rows: the K dimension of dV += P^T dO, too thin at 16) or dQ's BLOCK_N (32 or 64 keys).
# * Registers: the float32 accumulators ([rows, D]; dK/dV has two) take <= 128 registers per thread, so D=256
#   uses half the rows per warp (dK/dV: BLOCK_N=64 with 8 warps; dQ: 64 rows/4 warps or 128/8).
# * Shared memory (227 KiB per block on H100/H200): the tiles loaded once (dK/dV: K, V; fwd/stats/dQ: Q, dO)
#   plus num_stages copies of the streamed ones, counted to stay within ~192 KiB (room for layout-conversion
#   scratch). An entry that does not fit anyway is skipped by the autotuner and reported by the tuner.
# * BLOCK_N is a multiple of K_GROUP_TOKENS (the in-kernel dequantizing loads broadcast one K (step, min) row per
#   32 keys).
# The lists stay short (<= 8) so that `benchmarks/bench_attention.py --tune` times every entry within its budget
# and the autotuner's first call stays short; pin the winners from attention_tuning.json by reordering/pruning.
CONFIGS = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3)],
        128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 4),
              (128, 32, 8, 3), (128, 32, 8, 4)],
        256: [(64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
    },
    "stats": {
        64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
              (128, 32, 8, 4), (128, 64, 4, 3)],
        256: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 4, 5), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (128, 32, 8, 5), (64, 64, 4, 3),
              (64, 64, 4, 4), (64, 32, 4, 4)],
        256: [(128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 4)],
    },
    "dkdv": {
        64: [(32, 128, 4, 3), (32, 128, 4, 5), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
        128: [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 8, 4), (32, 128, 8, 5), (64, 128, 8, 2), (32, 64, 4, 3),
              (32, 64, 4, 4), (64, 64, 4, 3)],
        256: [(32, 32, 4, 3), (32, 64, 8, 2), (32, 64, 8, 3), (32, 64, 8, 4), (64, 64, 8, 2), (16, 64, 8, 3),
              (64, 32, 4, 2)],
    },
}
AUTOTUNE = True  # False: each kernel runs its first config (fewer compiles; the benchmark's correctness check)
INTERPRETER_BLOCKS = {"fwd": (16, 32), "stats": (16, 32), "dq": (16, 32), "dkdv": (16, 32)}  # (M, N): small
AUTOTUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_SEGMENTS", "DOT_PRECISION",
                "KV_BITS", "DELTA_FROM_O"]
# kv_bits < 16: "prepass" dequantizes K/V once per backward into a 16-bit K'/V' (a transient the size of dK + dV,
# freed when the backward returns) and runs the 16-bit kernels on it; "in_kernel" dequantizes every K/V tile inside
# the stats/dQ/dK-dV kernels (no transient, but each key block is unpacked again by every query block and head of
# the stats and dQ passes, and the packed loads cannot feed the MMAs straight from the async copy pipeline).
# Both compute identical gradients.
KV_DEQUANT = "prepass"
KV_DEQUANT_MODES = ("prepass", "in_kernel")
DEQUANT_BLOCK_N = 64  # tokens per program of the memory-bound dequantization pre-pass (a multiple of K_GROUP_TOKENS)
REDUCE_BLOCK = 1024  # elements per program of the memory-bound dK/dV partial sum
# dK/dV GQA split: enough (split x KV head x key block) programs per SM that the longest program (the first key
# block, causal) is not longer than an SM's share of the work; see _dkdv_split.
DKDV_TARGET_PROGRAMS_PER_SM = 1.75


def _config_list(kind: str, head_dim: int) -> list:
    return CONFIGS[kind][max(head_dim, 64)]


def _autotuned(kernel, kind: str):
    """The kernel wrapped in triton.autotune over CONFIGS[kind] (pruned to the head dim's list); None where
    there is no compiled triton (no triton, or the interpreter)."""
    if not HAS_TRITON or INTERPRET:
        return None
    every = list(dict.fromkeys(config for configs in CONFIGS[kind].values() for config in configs))

    def prune(configs, named_args, **kwargs):
        wanted = set(_config_list(kind, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    key = [name for name in AUTOTUNE_KEY if name in kernel.arg_names]
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every],
        key=key,
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


_KERNELS = {
    kind: (kernel, _autotuned(kernel, kind))
    for kind, kernel in (("fwd", _attn_fwd_kernel), ("stats", _attn_bwd_stats_kernel), ("dq", _attn_bwd_dq_kernel),
                         ("dkdv", _attn_bwd_dkdv_kernel))
}

# Tests set this to force a dK/dV split (GQA group divided across programs) on small problems.
_FORCE_DKDV_SPLIT: Optional[int] = None


def _launch(kind: str, grid, *args, config=None, **meta) -> None:
    """config=(BLOCK_M, BLOCK_N, num_warps, num_stages) runs exactly that config (the tuner). Otherwise: small
    fixed blocks under the interpreter; on CUDA autotuned, or the first config when AUTOTUNE is False."""
    kernel, tuned = _KERNELS[kind]
    if config is None and INTERPRET:
        config = (*INTERPRETER_BLOCKS[kind], 4, 1)  # warps and stages mean nothing to the interpreter
    elif config is None and not AUTOTUNE:
        config = _config_list(kind, meta["HEAD_DIM"])[0]
    if config is None:
        tuned[grid](*args, **meta)
    else:
        block_m, block_n, warps, stages = config
        kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# Host work per launch (up to 4 launches per fwd+bwd): the constexpr flags are built once per combination, and
# ceil-divisions and powers of two are plain integer arithmetic (triton.cdiv / triton.next_power_of_2 are
# ConstexprFunction wrappers costing ~2 µs per call from Python).
_FLAGS_CACHE: dict = {}


def _flags(q: Tensor, causal: bool, window: Optional[int], softcap: Optional[float], tables=None) -> dict:
    """The kernels' constexpr flags (a shared dict: callers unpack it, never mutate it)."""
    key = (q.shape[-1], bool(causal), window is not None, softcap is not None, tables is not None, q.dtype)
    flags = _FLAGS_CACHE.get(key)
    if flags is None:
        flags = _FLAGS_CACHE[key] = {
            "HEAD_DIM": q.shape[-1],
            "CAUSAL": bool(causal),
            "HAS_WINDOW": window is not None,
            "HAS_SOFTCAP": softcap is not None,
            "HAS_SEGMENTS": tables is not None,
            "DOT_PRECISION": _dot_precision(q.dtype),
        }
    return flags


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _runtime(seq_len: int, scale: float, window: Optional[int], softcap: Optional[float]) -> tuple:
    """The kernels' runtime arguments after the shapes: seq_len, scale, window, softcap, seq_bucket."""
    return seq_len, scale, window or 0, softcap or 0.0, _seq_bucket(seq_len)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # true float32 products (the GPU default for float32 tl.dot is TF32)
    if INTERPRET and dtype == torch.bfloat16:
        return "upcast"  # see _dot
    return "tf32"  # ignored for 16-bit inputs


def _seq_bucket(seq_len: int) -> int:
    """The autotuning key's sequence bucket: max(next power of two >= seq_len, 64)."""
    return max(1 << (seq_len - 1).bit_length(), 64) if seq_len > 64 else 64


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def segment_tables(q_segments: Tensor, k_segments: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' (QSEG, KSEG) tables, int32 [B, 3, S] (see triton_kernels.py): ids, and per position the span of
    the other side's positions with the same id, for skipping blocks. Ids are bucketed by clamping into
    [-1, S) first (padding_segments and packed_segments stay inside it): ids that share a bucket only widen a
    span, which stays a superset. No host synchronization (no unique, no data-dependent shapes)."""
    batch, seq_len = q_segments.shape
    positions = torch.arange(seq_len, device=q_segments.device, dtype=torch.int32).expand(batch, seq_len)

    def buckets(segments: Tensor) -> Tensor:
        return (segments.to(torch.int64) + 1).clamp(0, seq_len)

    def span(source: Tensor, lookup: Tensor) -> tuple[Tensor, Tensor]:
        """For each position of `lookup`, [first, last + 1) of the positions of `source` in its bucket."""
        shape = (batch, seq_len + 1)
        first = torch.full(shape, seq_len, dtype=torch.int32, device=source.device)
        last = torch.full(shape, -1, dtype=torch.int32, device=source.device)
        first = first.scatter_reduce(1, buckets(source), positions, "amin")
        last = last.scatter_reduce(1, buckets(source), positions, "amax")
        index = buckets(lookup)
        return first.gather(1, index), last.gather(1, index) + 1

    q_ids, k_ids = q_segments.to(torch.int32), k_segments.to(torch.int32)
    q_table = torch.stack([q_ids, *span(k_ids, q_ids)], dim=1).contiguous()
    k_table = torch.stack([k_ids, *span(q_ids, k_ids)], dim=1).contiguous()
    return q_table, k_table


def _segment_pointers(tables, q: Tensor) -> tuple:
    """(QSEG, KSEG): the segment tables, or q twice without segments (never read)."""
    return (q, q) if tables is None else tables


class _KV(NamedTuple):
    """K and V as the backward kernels read them: 16-bit tensors (bits=16) or the packed codes (bits 8/4)."""

    tensors: tuple  # (K, V, K codes, K meta, V codes, V meta); the unused ones repeat a valid tensor
    strides: tuple  # batch, head and sequence strides of K, then of V (zeros when packed)
    bits: int  # KV_BITS as the kernels see it
    heads: int


def _kv_16bit(k: Tensor, v: Tensor) -> _KV:
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _KV((k, v, k, k, k, k), (*k.stride()[:3], *v.stride()[:3]), 16, k.shape[1])


def _kv_packed(packed, bits: int) -> _KV:
    return _KV((packed[0], packed[0], *packed), (0,) * 6, bits, packed[0].shape[1])


def _kv_for_backward(packed, bits: int, dtype: torch.dtype, mode: Optional[str] = None) -> _KV:
    """What the kv_bits < 16 backward reads, by KV_DEQUANT mode."""
    mode = mode or KV_DEQUANT
    if mode not in KV_DEQUANT_MODES:
        raise ValueError(f"KV_DEQUANT must be one of {KV_DEQUANT_MODES}, got {mode!r}")
    if mode == "prepass":
        return _kv_16bit(*dequantize_triton(packed, bits, dtype))
    return _kv_packed(packed, bits)


def fwd_triton(q, k, v, causal, scale, window, softcap, segments=None, config=None):
    batch, heads, seq_len, head_dim = q.shape
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    grid = lambda meta: (batch * heads, _cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    with device_guard(q):
        tables = None if segments is None else segment_tables(*segments)
        _launch("fwd", grid, q, k, v, out, lse, *_segment_pointers(tables, q), *q.stride()[:3], *k.stride()[:3],
                *v.stride()[:3], heads, heads // k.shape[1], *_runtime(seq_len, scale, window, softcap),
                config=config, **_flags(q, causal, window, softcap, tables))
    return out, lse


def quantize_triton(k: Tensor, v: Tensor, bits: int):
    batch, kv_heads, seq_len, head_dim = k.shape
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    shapes = packed_kv_shapes(batch, kv_heads, seq_len, head_dim, bits)
    k_codes, k_meta, v_codes, v_meta = (
        torch.empty(shape, dtype=dtype, device=k.device) for shape, dtype in zip(shapes, PACKED_DTYPES)
    )
    with device_guard(k):
        launch(
            _quantize_kv_kernel, (batch * kv_heads, _cdiv(seq_len, K_GROUP_TOKENS)),
            k, v, k_codes, k_meta, v_codes, v_meta, *k.stride()[:3], *v.stride()[:3], kv_heads, seq_len,
            HEAD_DIM=head_dim, KV_BITS=bits,
        )
    return k_codes, k_meta, v_codes, v_meta


def dequantize_triton(packed, bits: int, dtype: torch.dtype):
    """(K', V') [B, Hkv, S, D] in dtype from the packed format (bit-identical to dequantize_kv(..., dtype))."""
    k_codes = packed[0]
    batch, kv_heads, seq_len, code_bytes = k_codes.shape
    head_dim = code_bytes * 8 // bits
    k = torch.empty((batch, kv_heads, seq_len, head_dim), dtype=dtype, device=k_codes.device)
    v = torch.empty_like(k)
    with device_guard(k):
        launch(
            _dequantize_kv_kernel, (batch * kv_heads, _cdiv(seq_len, DEQUANT_BLOCK_N)),
            *packed, k, v, seq_len, HEAD_DIM=head_dim, KV_BITS=bits, DOT_PRECISION=_dot_precision(dtype),
            BLOCK_N=DEQUANT_BLOCK_N)
    return k, v


def _launch_stats(q, kv: _KV, do, causal, scale, window, softcap, tables=None, config=None):
    """(LSE', delta') from K'/V' (kv_bits < 16)."""
    batch, heads, seq_len, _ = q.shape
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    grid = lambda meta: (batch * heads, _cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    with device_guard(q):
        _launch("stats", grid, q, *kv.tensors, do, lse, delta, *_segment_pointers(tables, q), *q.stride()[:3],
                *kv.strides, heads, heads // kv.heads, *_runtime(seq_len, scale, window, softcap), config=config,
                KV_BITS=kv.bits, **_flags(q, causal, window, softcap, tables))
    return lse, delta


def _launch_dq(q, kv: _KV, out, do, lse, delta, causal, scale, window, softcap, tables=None, config=None):
    """dQ. out given (kv_bits=16): the kernel also writes delta = rowsum(dO * O) into `delta` for dK/dV."""
    batch, heads, seq_len, head_dim = q.shape
    dq = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)
    grid = lambda meta: (batch * heads, _cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    with device_guard(q):
        _launch("dq", grid, q, *kv.tensors, do if out is None else out, do, lse, delta, dq,
                *_segment_pointers(tables, q), *q.stride()[:3], *kv.strides, heads, heads // kv.heads,
                *_runtime(seq_len, scale, window, softcap), config=config, KV_BITS=kv.bits,
                DELTA_FROM_O=out is not None, **_flags(q, causal, window, softcap, tables))
    return dq


def _launch_dkdv(q, kv: _KV, do, lse, delta, split, causal, scale, window, softcap, tables=None, config=None):
    """(dK, dV); split > 1 divides each GQA group over `split` programs and sums their float32 partials."""
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch, kv.heads, seq_len, head_dim)
    dk = torch.empty(shape, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    parts = None if split == 1 else torch.empty((2, split, *shape), dtype=torch.float32, device=q.device)
    targets = (dk, dv) if split == 1 else (parts[0], parts[1])
    grid = lambda meta: (split * batch * kv.heads, _cdiv(seq_len, meta["BLOCK_N"]))  # noqa: E731
    flags = _flags(q, causal, window, softcap, tables)
    with device_guard(q):
        _launch("dkdv", grid, q, *kv.tensors, do, lse, delta, *targets, *_segment_pointers(tables, q),
                *q.stride()[:3], *kv.strides, heads,
                kv.heads, heads // kv.heads // split, *_runtime(seq_len, scale, window, softcap), config=config,
                KV_BITS=kv.bits, **flags)
        if split > 1:
            numel = dk.numel()
            launch(_sum_partials_kernel, (_cdiv(numel, REDUCE_BLOCK), 2), parts, dk, dv, numel, split,
                   DOT_PRECISION=flags["DOT_PRECISION"], BLOCK=REDUCE_BLOCK)
    return dk, dv


def _dkdv_split(batch: int, kv_heads: int, group: int, seq_len: int, head_dim: int, device: torch.device) -> int:
    """How many programs share one KV head's query heads (1 = no float32 partials, no reduction).

    Why: a dK/dV program's work is (query blocks that see its keys) x (heads it loops over); causal, the first key
    block's programs are the longest, twice the average. The kernel takes at least max(longest program, total
    work / SMs), and the longest program is at most the per-SM share once there are 2 programs per SM. Splitting
    the group by s divides the longest program by s, but writes and re-reads 2 s float32 copies of dK/dV.
    H100/H200 (132 SMs), Llama-3-8B (B=1, Hkv=8, group 4), D=128, BLOCK_N=128: S=2048 has 8 x 16 = 128 programs,
    the longest twice an SM's share: split 2 gives 256 (1.94 per SM; 33 MB of partials written and read again,
    ~20 us); split 4 would double that traffic to even out the last 3%, hence a target of 1.75 programs per SM
    rather than 2. S=8192 has 512 programs: no split. `bench_attention.py --tune` times splits 1, 2 and 4."""
    if _FORCE_DKDV_SPLIT is not None:
        return _FORCE_DKDV_SPLIT if group % _FORCE_DKDV_SPLIT == 0 else 1
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    block_n = _config_list("dkdv", head_dim)[0][1]  # the usual key block for this head dim
    programs = batch * kv_heads * _cdiv(seq_len, block_n)
    split = 1
    while programs * split < DKDV_TARGET_PROGRAMS_PER_SM * sms and group % (split * 2) == 0:
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def bwd_triton(do, q, k, v, out, lse, packed, causal, scale, kv_bits, window, softcap, kv_heads, segments=None):
    """(dq, dk, dv). kv_bits=16: dQ (forming delta), then dK/dV; no pre-pass. kv_bits < 16: K'/V' (KV_DEQUANT),
    the stats pre-pass (LSE', delta' from K'/V'), dQ, dK/dV."""
    batch, heads, seq_len, head_dim = q.shape
    q = _last_dim_contiguous(q)
    do = do.contiguous()
    tables = None if segments is None else segment_tables(*segments)  # once for the three kernels
    options = (causal, scale, window, softcap, tables)
    if kv_bits == 16:
        kv = _kv_16bit(k, v)
        out = out.contiguous()
        delta = torch.empty_like(lse)  # written by the dQ kernel
    else:
        kv = _kv_for_backward(packed, kv_bits, q.dtype)
        lse, delta = _launch_stats(q, kv, do, *options)
        out = None
    dq = _launch_dq(q, kv, out, do, lse, delta, *options)
    split = _dkdv_split(batch, kv_heads, heads // kv_heads, seq_len, head_dim, q.device)
    dk, dv = _launch_dkdv(q, kv, do, lse, delta, split, *options)
    return dq, dk, dv


TUNED_KINDS = ("fwd", "stats", "dq", "dkdv", "dequant")


def kernel_runner(kind: str, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor, *, kv_bits: int = 16,
                  kv_dequant: Optional[str] = None, dkdv_split: int = 1, causal: bool = True,
                  scale: Optional[float] = None, window: Optional[int] = None, softcap: Optional[float] = None,
                  exact_inputs: bool = True):
    """run(config=None) -> outputs, launching only the kernel `kind` (one of TUNED_KINDS) with config =
    (BLOCK_M, BLOCK_N, num_warps, num_stages) from CONFIGS[kind] ("dequant" has none): for
    ``benchmarks/bench_attention.py --tune``, which times each kernel alone.

    The kernel's inputs from earlier steps (O, LSE, packed K/V, K'/V', LSE', delta) are prepared once, as the op
    does (each earlier kernel with its first config); exact_inputs=False leaves them as zeros (compile-only runs).
    kv_bits < 16 runs the kernels the given kv_dequant mode runs ("stats" and "dq" see K'/V' with "prepass");
    "dkdv" includes the partial sum when dkdv_split > 1."""
    if kind not in TUNED_KINDS:
        raise ValueError(f"kernel_runner: kind must be one of {TUNED_KINDS}, got {kind!r}")
    batch, heads, seq_len, head_dim = q.shape
    options = (causal, q.shape[-1] ** -0.5 if scale is None else scale, window, softcap)
    q, do = _last_dim_contiguous(q), grad_out.contiguous()
    if kind == "fwd":
        return lambda config=None: fwd_triton(q, k, v, *options, config=config)
    prep = lambda name: None if INTERPRET else _config_list(name, head_dim)[0]  # noqa: E731 (no autotuning)
    if exact_inputs:
        out, lse = fwd_triton(q, k, v, *options, config=prep("fwd"))
        packed = quantize_triton(k, v, kv_bits) if kv_bits < 16 else None
    else:
        out = torch.zeros_like(q)
        lse = torch.zeros((batch, heads, seq_len), dtype=torch.float32, device=q.device)
        shapes = packed_kv_shapes(batch, k.shape[1], seq_len, head_dim, kv_bits) if kv_bits < 16 else ()
        packed = tuple(torch.zeros(shape, dtype=dtype, device=q.device) for shape, dtype in zip(shapes, PACKED_DTYPES))
    if kind == "dequant":
        if kv_bits == 16:
            raise ValueError("kernel_runner: kv_bits=16 has no dequantization")
        return lambda config=None: dequantize_triton(packed, kv_bits, q.dtype)
    if kv_bits == 16:
        if kind == "stats":
            raise ValueError("kernel_runner: kv_bits=16 has no stats pass")
        kv = _kv_16bit(k, v)
        delta = torch.zeros_like(lse)
        if exact_inputs and kind == "dkdv":
            _launch_dq(q, kv, out, do, lse, delta, *options, config=prep("dq"))  # fills delta
    else:
        kv = _kv_for_backward(packed, kv_bits, q.dtype, kv_dequant)
        if kind == "stats":
            return lambda config=None: _launch_stats(q, kv, do, *options, config=config)
        if exact_inputs:
            lse, delta = _launch_stats(q, kv, do, *options, config=prep("stats"))
        else:
            delta = torch.zeros_like(lse)
        out = None
    if kind == "dq":
        return lambda config=None: _launch_dq(q, kv, out, do, lse, delta, *options, config=config)
    return lambda config=None: _launch_dkdv(q, kv, do, lse, delta, dkdv_split, *options, config=config)
