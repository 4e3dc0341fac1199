"""Measure what the cost model predicts, on real tensors: live storage bytes after every op, and the peak.

``MemoryTracker`` is a TorchDispatchMode. Every tensor an op returns is registered under its storage (views
and in-place results share their base's storage, so nothing is counted twice); a ``weakref.finalize`` on
each registered tensor notices its death, and a storage is released once none of its tensors is alive and
its StorageImpl is really gone (checked through a weak storage reference, so a reference held in C++ —
autograd's saved variables — keeps it counted). Sizes are rounded like the prediction's
(``granularity``, CUDA's 512 by default). Scratch memory inside a kernel is invisible to both.

``run_step`` runs a partitioned (forward, backward) pair the way torch's AOTAutograd runtime does (boxed
backward inputs freed as consumed, autograd's materialized zero tangents, AccumulateGrad's steal-or-clone),
recording the tracker's bytes after each node.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from memgraph import _compat
from memgraph.cost_model.symbolic import rounded_allocation

__all__ = ["MemoryTracker", "GraphRunner", "StepMeasurement", "run_step", "accumulate_grad"]


class _Storage:
    __slots__ = ("ref", "nbytes", "tensors", "label")

    def __init__(self, ref: StorageWeakRef, nbytes: int, label: str):
        self.ref, self.nbytes, self.tensors, self.label = ref, nbytes, 0, label


class MemoryTracker(_compat.TorchDispatchMode):
    """Counts bytes of live tensor storages created or registered while active.

    current_bytes / peak_bytes: live now / the most ever live (updated after every op's outputs exist, while
    its inputs are still referenced). timeline: (label, bytes live after it) per op or ``mark``.
    """

    def __init__(self, granularity: int = 512):
        super().__init__()
        self.granularity = granularity
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_label: str | None = None
        self.timeline: list[tuple[str, int]] = []
        self._storages: dict[int, _Storage] = {}
        self._tensor_ids: set[int] = set()
        self._dying: set[int] = set()  # storages whose registered tensors all died; freed once expired

    # --- registration -----------------------------------------------------------------------------
    def track(self, *trees: Any, label: str = "track") -> None:
        """Count tensors that already exist (parameters, inputs, anything created outside the mode)."""
        for leaf in _compat.tree_leaves(trees):
            if isinstance(leaf, torch.Tensor):
                self._register(leaf, label)
        self._update_peak(label)

    def _register(self, tensor: torch.Tensor, label: str) -> None:
        if tensor.device.type == "meta" or id(tensor) in self._tensor_ids or _is_fake(tensor):
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse / wrapper subclasses own no plain storage
            return
        key = storage._cdata
        record = self._storages.get(key)
        if record is None:
            nbytes = rounded_allocation(storage.nbytes(), self.granularity)
            record = self._storages[key] = _Storage(StorageWeakRef(storage), nbytes, label)
            self.current_bytes += nbytes
        record.tensors += 1
        self._dying.discard(key)
        self._tensor_ids.add(id(tensor))
        weakref.finalize(tensor, self._tensor_died, id(tensor), key)

    def _tensor_died(self, tensor_id: int, key: int) -> None:
        self._tensor_ids.discard(tensor_id)
        record = self._storages.get(key)
        if record is None:
            return
        record.tensors -= 1
        if record.tensors <= 0:
            self._dying.add(key)
            self._release_expired()

    def _release_expired(self) -> None:
        for key in [k for k in self._dying if self._storages[k].ref.expired()]:
            self._dying.discard(key)
            self.current_bytes -= self._storages.pop(key).nbytes

    def _update_peak(self, label: str) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_label = self.current_bytes, label

    # --- the mode --------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        label = str(func)
        self._release_expired()
        for leaf in _compat.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._register(leaf, label)
        self._update_peak(label)
        self.timeline.append((label, self.current_bytes))
        return out

    def mark(self, label: str) -> int:
        """Record the live bytes now under ``label`` (e.g. after an FX node ran); returns them."""
        self._release_expired()
        self.timeline.append((label, self.current_bytes))
        return self.current_bytes

    def reset_peak(self) -> None:
        self._release_expired()
        self.peak_bytes, self.peak_label = self.current_bytes, "reset"


def _is_fake(tensor: torch.Tensor) -> bool:
    return _compat.is_fake_tensor(tensor)


@dataclasses.dataclass
class StepMeasurement:
    """What ``run_step`` saw: the peak, the bytes live after each node (by node name) and the results."""

    peak_bytes: int
    peak_label: str | None
    per_node: list[tuple[str, str, int]]  # (node name, phase, bytes live after it)
    user_outputs: list[Any]
    grads: list[Any]


class GraphRunner(fx.Interpreter):
    """Runs a graph node by node, freeing every value after its last use and a value nobody uses right after
    it is made (as FX's generated code and Inductor do; plain ``fx.Interpreter`` keeps unused values to the
    end). ``sample(name)``, if given, is called after each node, while the node's inputs and outputs are
    still referenced: it sees the node's high-water mark, the prediction's "during"."""

    def __init__(self, gm: fx.GraphModule, phase: str = "", sample: Callable[[str], int] | None = None,
                 record: list | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.phase, self.sample, self.record = phase, sample, record

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node.op in ("placeholder", "output"):
            return result
        if self.sample is not None:
            value = self.sample(node.name)
            if self.record is not None:
                self.record.append((node.name, self.phase, value))
        return None if not node.users else result


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """What AccumulateGrad stores in an empty ``.grad``: the gradient itself if its strides match the
    parameter's, else a copy laid out like the parameter (the original is then dropped)."""
    conforms = grad.shape == param.shape and all(
        g == p for g, p, n in zip(grad.stride(), param.stride(), grad.shape) if n != 1)
    if conforms:
        return grad
    return torch.empty_strided(param.shape, param.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)


def run_step(fw: fx.GraphModule, bw: fx.GraphModule, primals: Sequence[Any], num_fwd_outputs: int, *,
             tracker: MemoryTracker | None = None, sample: Callable[[str], int] | None = None,
             outputs_alive: bool = True, tangents: Callable[[list[fx.Node], list[Any]], list[Any]] | None = None,
             node_by_node: bool = True) -> StepMeasurement:
    """Run one training step of partitioned graphs as torch's AOTAutograd runtime does, and measure it.

    primals: real forward inputs (parameters, buffers, inputs), held by the caller for the whole step.
    tracker: a MemoryTracker (entered here; ``primals`` are registered); or ``sample``: a function returning
    the bytes live now (e.g. ``lambda _: torch.cuda.memory_allocated()``) when measuring on a GPU.
    tangents: builds backward's incoming gradients from its tangent placeholders and the user outputs;
    default: ones for the first (the loss) and zeros for the rest, as autograd materializes them.
    node_by_node: False runs the graphs' generated code (boxed, values freed after last use: the same memory)
    at full speed, sampling only after the forward and after the backward; for timing a step.
    """
    if tracker is None and sample is None:
        raise ValueError("run_step needs a tracker or a sample function")
    record: list[tuple[str, str, int]] = []
    sample = sample or (lambda name: tracker.mark(name))
    context = tracker if tracker is not None else _NullContext()
    with context, torch.no_grad():
        if tracker is not None:
            tracker.track(list(primals), label="primals")
        run = _node_by_node_runner if node_by_node else _generated_code_runner
        outputs = run(fw, "forward", sample, record)(list(primals))
        user_outputs = list(outputs[:num_fwd_outputs])
        saved = list(outputs[num_fwd_outputs:])
        del outputs
        bw_placeholders = [n for n in bw.graph.nodes if n.op == "placeholder"]
        tangent_nodes = bw_placeholders[len(saved):]
        made = (tangents or _autograd_tangents)(tangent_nodes, user_outputs)
        if not outputs_alive:
            user_outputs = []
        seed = made[:1]  # torch.autograd.backward holds the loss's ones until backward returns
        args = saved + list(made)
        del saved, made
        grads = run(bw, "backward", sample, record)(args)
        del seed
        grads = list(grads) if isinstance(grads, (list, tuple)) else [grads]
        for index, (param, grad) in enumerate(zip(primals, grads)):
            if isinstance(grad, torch.Tensor) and isinstance(param, torch.Tensor):
                grads[index] = accumulate_grad(param, grad)
                del grad
                record.append((f"accumulate_grad({index})", "backward", sample(f"accumulate_grad({index})")))
    peak = tracker.peak_bytes if tracker is not None else max((r[2] for r in record), default=0)
    return StepMeasurement(peak, tracker.peak_label if tracker is not None else None, record, user_outputs, grads)


def _node_by_node_runner(gm: fx.GraphModule, phase: str, sample: Callable[[str], int], record: list):
    return GraphRunner(gm, phase, sample, record).boxed_run


_BOXED: "weakref.WeakKeyDictionary[fx.GraphModule, fx.GraphModule]" = weakref.WeakKeyDictionary()


def _generated_code_runner(gm: fx.GraphModule, phase: str, sample: Callable[[str], int], record: list):
    if gm not in _BOXED:  # generate once: a timed step must not pay for code generation
        _BOXED[gm] = _compat.boxed_graph_module(gm)
    boxed = _BOXED[gm]

    def run(args: list) -> Any:
        result = boxed(args)
        record.append((f"end of {phase}", phase, sample(f"end of {phase}")))
        return result

    return run


def _autograd_tangents(nodes: list[fx.Node], user_outputs: list[Any]) -> list[Any]:
    """``loss.backward()`` passes ones for the loss; autograd materializes zeros for every other output."""
    made = []
    for index, node in enumerate(nodes):
        value = node.meta.get("val")
        shape = [_compat.concrete_int(s) for s in value.shape]
        fill = torch.ones if index == 0 else torch.zeros
        made.append(fill(shape, dtype=value.dtype, device=_device_of(value, user_outputs)))
    return made


def _device_of(value: Any, user_outputs: list[Any]) -> torch.device:
    for output in user_outputs:
        if isinstance(output, torch.Tensor):
            return output.device
    return torch.device("cpu") if value.device.type == "meta" else value.device


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
