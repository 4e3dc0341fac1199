"""Runtime of each node: FLOPs from ``torch.utils.flop_counter``'s registered formulas, bytes moved, and a
roofline time ``max(flops / peak_flops, bytes / bandwidth)``. Solvers use it as the cost of recomputing.

FLOP formulas are the counter's own (``flop_registry``); custom ops contribute theirs by registering with
``torch.utils.flop_counter.register_flop_formula`` (memgraph's kernels do so in their own files). An op
without a formula costs its memory traffic only. Views and other metadata ops cost nothing.
"""
from __future__ import annotations

import dataclasses
import operator
import time
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from memgraph import _compat
from memgraph.cost_model.symbolic import as_size, evaluate
from memgraph.cost_model.values import host_arguments, tensors_in

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Ceilings of one accelerator. Defaults: H100/H200, bf16 dense matmul as measured (~790 TFLOP/s) and
    device-to-device copy bandwidth (~4.0 TB/s). ``DeviceSpec.measure()`` replaces them with this GPU's."""

    name: str = "H200"
    matmul_flops_per_s: float = 790e12  # bf16 / fp16
    fp32_matmul_flops_per_s: float = 60e12  # without TF32 (torch's default for matmul)
    fp8_matmul_flops_per_s: float = 1580e12
    bandwidth_bytes_per_s: float = 4.0e12
    host_link_bytes_per_s: float = 25e9  # pinned host<->device copies (PCIe 5 x16 as measured, one direction)
    launch_seconds: float = 0.0  # per-kernel overhead; 0 = pure roofline (Inductor fuses small ops)

    def flops_per_s(self, dtype: torch.dtype | None) -> float:
        if dtype == torch.float32 or dtype == torch.float64:
            return self.fp32_matmul_flops_per_s
        if dtype is not None and dtype.itemsize == 1 and dtype.is_floating_point:
            return self.fp8_matmul_flops_per_s
        return self.matmul_flops_per_s

    @classmethod
    def measure(cls, device: str = "cuda", *, size: int = 8192, copy_bytes: int = 2**30, repeats: int = 10) -> "DeviceSpec":
        """Measure this GPU's bf16 matmul FLOP/s and copy bandwidth (a few hundred ms)."""
        if not torch.cuda.is_available():
            raise RuntimeError("DeviceSpec.measure needs a CUDA device; use DeviceSpec() defaults on the CPU")
        with _compat.real_tensors():  # also when called while a graph is traced with fake tensors
            a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            matmul_s = _time_cuda(lambda: a @ b, repeats)
            src = torch.empty(copy_bytes // 2, device=device, dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            copy_s = _time_cuda(lambda: dst.copy_(src), repeats)
        name = torch.cuda.get_device_name(device)
        return cls(name=name, matmul_flops_per_s=2 * size**3 / matmul_s,
                   bandwidth_bytes_per_s=2 * copy_bytes / copy_s)


def measured_host_link(device: str = "cuda", *, copy_bytes: int = 2**28, repeats: int = 5) -> float | None:
    """This GPU's pinned host<->device copy bandwidth (bytes/s, the slower direction), measured once per machine
    and GPU model and cached beside torch's compile caches; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import json
    from pathlib import Path

    name = torch.cuda.get_device_name(device)
    # host_link.json held figures timed on fake tensors (the partitioner runs inside a fake-tensor trace), 15-20x
    # any PCIe link: a new file, so that no cached figure of that kind is read again
    path = Path(_compat.inductor_cache_dir()) / "memgraph" / "host_link_bytes_per_s.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if name in cached:
        return float(cached[name])
    with _compat.real_tensors():
        host = torch.empty(copy_bytes, dtype=torch.uint8, device="cpu", pin_memory=True)
        gpu = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
        if _compat.is_fake_tensor(host) or _compat.is_fake_tensor(gpu):
            raise RuntimeError("measured_host_link made fake tensors: the copies it would time do not run")
        to_host = _time_cuda(lambda: host.copy_(gpu, non_blocking=True), repeats)
        to_device = _time_cuda(lambda: gpu.copy_(host, non_blocking=True), repeats)
    bandwidth = copy_bytes / max(to_host, to_device)
    cached[name] = bandwidth
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=2))
    except OSError:
        pass  # a read-only cache directory: measure again next time
    return bandwidth


def _time_cuda(function, repeats: int) -> float:
    function()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def is_view_like(node: fx.Node) -> bool:
    """Ops that only make metadata: views, aliases, getitem, size arithmetic."""
    target = node.target
    if node.op != "call_function" or target is operator.getitem:
        return True
    if _compat.is_op_overload(target):
        return target.is_view or target in _METADATA_OPS
    return not any(True for _ in tensors_in(node.meta.get("val")))


_METADATA_OPS = {aten._unsafe_view.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default,
                 aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}


def _hint(value: Any, hints) -> int:
    size = as_size(value)
    return size if isinstance(size, int) else evaluate(size, hints)


def node_flops(node: fx.Node, hints=None) -> int:
    """FLOPs of ``node`` by torch's registered formula (0 if none), at the traced sizes."""
    target = node.target
    if not _compat.is_op_overload(target):
        return 0
    formula = flop_registry.get(target.overloadpacket)
    if formula is None:
        return 0
    args, kwargs = _fake_args(node)
    try:
        flops = formula(*args, out_val=node.meta.get("val"), **kwargs)
    except Exception:  # noqa: BLE001 - a formula that cannot read these arguments counts as no FLOPs
        return 0
    return _hint(flops, hints or {})


def has_flop_formula(node: fx.Node) -> bool:
    return _compat.is_op_overload(node.target) and node.target.overloadpacket in flop_registry


def _fake_args(node: fx.Node):
    def value(arg):
        if isinstance(arg, fx.Node):
            return arg.meta.get("val")
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    return value(node.args), {k: value(v) for k, v in node.kwargs.items()}


def tensor_bytes(value: Any, hints=None) -> int:
    """Bytes of the tensors' elements (not their storages: a slice reads only its part)."""
    total = 0
    for tensor in tensors_in(value):
        total += _hint(tensor.numel(), hints or {}) * tensor.element_size()
    return total


def node_bytes_moved(node: fx.Node, hints=None) -> int:
    """Bytes read (inputs) and written (outputs) by one unfused execution of ``node``."""
    if is_view_like(node):
        return 0
    on_host = host_arguments(node)  # a host table is read row by row over the host link, not streamed from HBM
    read = sum(tensor_bytes(n.meta.get("val"), hints) for n in node.all_input_nodes if n not in on_host)
    return read + tensor_bytes(node.meta.get("val"), hints)


def node_dtype(node: fx.Node) -> torch.dtype | None:
    for arg in node.all_input_nodes:
        for tensor in tensors_in(arg.meta.get("val")):
            if tensor.is_floating_point():
                return tensor.dtype
    return None


def node_seconds(node: fx.Node, device: DeviceSpec = DeviceSpec(), hints=None) -> float:
    """Roofline time of ``node`` on ``device``; 0 for views and placeholders."""
    if node.op != "call_function" or is_view_like(node):
        return 0.0
    return roofline_seconds(node, node_bytes_moved(node, hints), device, hints)


def roofline_seconds(node: fx.Node, bytes_moved: int, device: DeviceSpec, hints=None) -> float:
    """Roofline time of ``node``'s FLOPs and of ``bytes_moved`` (its unfused traffic, or a fused kernel's)."""
    compute = node_flops(node, hints) / device.flops_per_s(node_dtype(node))
    return max(compute, bytes_moved / device.bandwidth_bytes_per_s) + device.launch_seconds


# --- node kinds, for solvers --------------------------------------------------------------------------
INPUT, VIEW, MATMUL, POINTWISE, REDUCTION, RANDOM, CUSTOM, COLLECTIVE, OTHER = (
    "input", "view", "matmul", "pointwise", "reduction", "random", "custom", "collective", "other")


def node_kind(node: fx.Node) -> str:
    """A coarse kind: input, view, matmul (has a FLOP formula), random, pointwise, reduction, custom,
    collective or other. Solvers use it for policies (never recompute random ops without replaying the RNG)."""
    if node.op == "placeholder":
        return INPUT
    if node.op != "call_function":
        return OTHER
    target = node.target
    if is_view_like(node):
        return VIEW
    if not _compat.is_op_overload(target):
        return OTHER
    namespace = target.namespace
    tags = target.tags
    if torch.Tag.nondeterministic_seeded in tags:
        return RANDOM
    if namespace in ("_c10d_functional", "c10d_functional"):
        return COLLECTIVE
    if namespace not in ("aten", "prims"):
        return CUSTOM
    if has_flop_formula(node):
        return MATMUL
    if torch.Tag.pointwise in tags:
        return POINTWISE
    if target.overloadpacket in _REDUCTIONS:
        return REDUCTION
    return OTHER


_REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.var_mean,
               aten.std, aten.prod, aten.argmax, aten.argmin, aten._log_softmax, aten._softmax, aten.logsumexp,
               aten.native_layer_norm, aten.nll_loss_forward, aten.cumsum}
