"""A frozen input-embedding table that lives in host memory: only the rows a step looks up reach the GPU.

Llama-3-8B's input embedding is 128,256 x 4,096 bf16 = 1 GiB of the 5.5 GiB a QLoRA step keeps on the GPU, yet a
step of S tokens reads S rows of it (16 MiB at 2048 tokens). ``memgraph.offload_embeddings_(model)`` moves a frozen
table to pinned host memory; its lookups become ``torch.ops.memgraph.host_embedding(ids, table)``:

* CUDA ids, pinned table: ``_gather_rows_kernel`` reads each looked-up row straight from host memory over PCIe
  (pinned memory is mapped into the GPU's address space), one program per (token, column block), on the
  current stream: no host synchronization, no staging copy, nothing of the table's size on the GPU.
* otherwise (a pageable table, a GPU that cannot map it, a CPU): the ids go to the host, ``index_select`` gathers
  the rows there and they are copied to the ids' device (a synchronization on CUDA, logged once).

No gradient flows to the table (it is frozen; ``offload_embeddings_`` refuses a trainable one) or to the ids.
"""
from __future__ import annotations

import functools
import logging
import types

import torch
from torch import Tensor

from memgraph._compat import CUDAGRAPH_UNSAFE_TAGS
from memgraph.kernels._dispatch import HAS_TRITON, INTERPRET, device_guard
from memgraph.kernels._launch import launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the kernel below is still defined (as a plain function) but never launched
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["host_embedding", "TABLE_DTYPES"]

log = logging.getLogger("memgraph.kernels.host_embedding")

TABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_D = 32 if INTERPRET else 1024  # columns per program: a 4096-wide bf16 row is 4 programs of 2 KiB reads
NUM_WARPS = 4


@triton.jit
def _gather_rows_kernel(TABLE, stride_table, IDS, OUT, stride_out, dim, BLOCK_D: tl.constexpr):
    """OUT[token, :] = TABLE[IDS[token], :] for one token and one block of columns."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.load(IDS + token).to(tl.int64)
    values = tl.load(TABLE + row * stride_table + cols, mask=cols < dim)
    tl.store(OUT + token.to(tl.int64) * stride_out + cols, values, mask=cols < dim)


def _gathered(ids: Tensor, table: Tensor) -> Tensor:
    """table[ids] (ids flat and contiguous) into a new tensor on the ids' device, by the kernel."""
    (tokens,), dim = ids.shape, table.shape[1]
    out = torch.empty((tokens, dim), dtype=table.dtype, device=ids.device)
    with device_guard(ids):
        launch(_gather_rows_kernel, (tokens, -(-dim // BLOCK_D)), table, table.stride(0), ids, out, out.stride(0),
               dim, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


def _gather_on_host(ids: Tensor, table: Tensor) -> Tensor:
    rows = table.index_select(0, ids.to(table.device))
    return rows.to(ids.device, non_blocking=rows.is_pinned())


@functools.lru_cache(maxsize=None)
def _note_once(reason: str) -> None:
    log.warning("memgraph.host_embedding: %s; gathering on the host (the step waits for its ids)", reason)


# A graph input in host memory: the op stays out of CUDA graphs (``Options.cudagraphs``).
@torch.library.custom_op("memgraph::host_embedding", mutates_args=(), tags=CUDAGRAPH_UNSAFE_TAGS)
def _host_embedding_op(ids: Tensor, table: Tensor) -> Tensor:
    """``table[ids]`` on the ids' device, for a ``table`` [V, D] in host memory."""
    _check(ids, table)
    flat = ids.reshape(-1).contiguous()
    if ids.is_cuda and table.is_pinned() and HAS_TRITON:
        try:
            return _gathered(flat, table).view(*ids.shape, table.shape[1])
        except (RuntimeError, ValueError) as error:  # e.g. a GPU without mapped host memory
            _note_once(f"the GPU could not read the pinned table ({type(error).__name__}: {error})")
    elif ids.is_cuda:
        _note_once("the table is not in pinned memory" if HAS_TRITON else "triton is not importable")
    elif INTERPRET and HAS_TRITON:  # CPU tests: the same kernel under the interpreter
        return _gathered(flat, table).view(*ids.shape, table.shape[1])
    return _gather_on_host(flat, table).view(*ids.shape, table.shape[1])


@_host_embedding_op.register_fake
def _(ids, table):
    _check(ids, table)
    return ids.new_empty((*ids.shape, table.shape[1]), dtype=table.dtype)


def _register_formulas() -> None:
    from memgraph.cost_model.values import register_host_argument

    register_host_argument(torch.ops.memgraph.host_embedding.default, "table")


_register_formulas()


def host_embedding(ids: Tensor, table: Tensor) -> Tensor:
    """``torch.nn.functional.embedding(ids, table)`` for a frozen ``table`` kept in host memory; the rows arrive on
    ``ids``' device."""
    return torch.ops.memgraph.host_embedding(ids, table)


def _check(ids: Tensor, table: Tensor) -> None:
    if table.dim() != 2 or table.dtype not in TABLE_DTYPES:
        raise ValueError(f"host_embedding: need a table [V, D] of one of {TABLE_DTYPES}; got {tuple(table.shape)} "
                         f"{table.dtype}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"host_embedding: ids must be int64 or int32, got {ids.dtype}")
    if table.device.type not in ("cpu", "meta"):
        raise ValueError(f"host_embedding: the table must be in host memory, got {table.device}")
