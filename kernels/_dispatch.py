"""What every memgraph op shares between its launcher and its custom op: whether Triton runs it, on which
device, and whether an eager call may skip the dispatcher.

* ``use_triton(tensor, log)``: Triton on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set
  before triton was imported (the test suite does); otherwise the op's plain-torch implementation runs, and the
  reason is logged once per op logger.
* ``device_guard(tensor)``: Triton launches on the current CUDA device; switch only when the tensor is on
  another one (the usual call then skips building, entering and leaving a ``torch.cuda.device``).
* ``direct_eager(*tensors)``: ordinary dense CPU/CUDA tensors and no dispatch mode, transform, tracer or
  profiler: an autograd kernel may then call the implementation itself instead of redispatching (host time
  matters at training sizes: each layer calls every op twice per step).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Callable, Optional

import torch

from memgraph import _compat

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kernel module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401 - imported for its availability

    TRITON_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as error:
    TRITON_IMPORT_ERROR = error

HAS_TRITON = TRITON_IMPORT_ERROR is None
_SAME_DEVICE = contextlib.nullcontext()  # reusable: nullcontext keeps no state


def use_triton(tensor: torch.Tensor, log: logging.Logger) -> bool:
    if not HAS_TRITON:
        _log_once(log, f"triton is not importable ({TRITON_IMPORT_ERROR})")
        return False
    if tensor.is_cuda or (tensor.device.type == "cpu" and INTERPRET):
        return True
    _log_once(log, f"tensors are on {tensor.device.type} and TRITON_INTERPRET=1 was not set before import")
    return False


@functools.lru_cache(maxsize=None)
def _log_once(log: logging.Logger, reason: str) -> None:
    log.warning("%s: %s; running the plain-torch implementation (same math, slower)", log.name, reason)


def device_guard(tensor: torch.Tensor):
    if tensor.is_cuda and tensor.get_device() != _compat.current_cuda_device():
        return torch.cuda.device(tensor.device)
    return _SAME_DEVICE


def direct_eager(first: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    return _compat.plain_dispatch_context() and _compat.plain_tensors(first, *others)


def builds_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """Grad mode is on and some tensor needs a gradient: the call must record autograd history. Compiled graphs
    run with grad mode off, so their calls stop at the first check."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def without_derivative(op, forward_op: str) -> type:
    """An autograd.Function running the backward op ``op`` below autograd, whose own backward raises (as
    torch.library.custom_op does for an op without an autograd formula) instead of autograd's fallback warning
    and missing gradients: ``forward_op`` (e.g. "memgraph.attention") has no double backward."""

    class WithoutDerivative(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with _compat.below_autograd():
                return op(*args)

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(f"Trying to backward through {op} but no autograd formula was registered: "
                               f"{forward_op} has no double backward")

    return WithoutDerivative


def persistent_tensor(make: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """``make()`` for a tensor the kernels keep between steps (a table, arrival counters), made outside any CUDA
    graph memory pool. Inductor's cudagraph trees send the step's allocations to their pool (by thread or by
    stream, depending on the release), whose memory each replay rewrites; they refuse a step that
    leaves a tensor there that is not an output. A helper thread on its own stream allocates from the ordinary
    pool and waits for its stream, so the tensor is ready when returned. While the caller's stream captures a
    graph, the tensor is made in place, in the capture's pool: a capture in torch.cuda.graph's default "global"
    mode forbids other threads' allocations, and a graph the caller captures itself owns what it made (the
    cudagraph trees warm up on their capture stream first, so every such tensor exists before they capture)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return make()
    made: dict[str, object] = {}

    def run() -> None:
        try:
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                made["tensor"] = make()
                torch.cuda.current_stream().synchronize()
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            made["error"] = error

    helper = threading.Thread(target=run, name="memgraph-persistent-tensor")
    helper.start()
    helper.join()
    if "error" in made:
        raise made["error"]
    return made["tensor"]
